"""The engine's NUMA option: one process's engine split over NUMA nodes.

On a 2-socket host a single engine whose workers take any task reads half of its expert weights
across the socket link. With partitions (one per node) the engine pins each node's share of its
workers to that node's CPUs, places each expert's packed weights in one node's memory and runs
that expert's GEMM tasks only there; token rows cross sockets instead, the cheap direction.
Results are bit-identical with and without partitions (csrc/engine/partitions.h).

`numa` values (`moetune.Context(numa=...)`, `moetune info --numa`):
  "off"   no partitions (the default, NUMA_DEFAULT);
  "auto"  one partition per NUMA node (`moetune.topology.numa_nodes()`) where there are at least
          two nodes (and at least as many threads), else off;
  N (int) N virtual nodes of the allowed CPUs (`moetune.topology.virtual_nodes`): for tests and
          experiments on a one-node machine, where it shows only the overhead.
With `cpus` given, the nodes are restricted to those CPUs.
"""

from __future__ import annotations

from moetune import topology

NUMA_DEFAULT = "off"
NUMA_CHOICES = ("off", "auto")


def parse_numa(text: str) -> str | int:
    """A command-line `--numa` value: "off", "auto" or a positive number of virtual nodes."""
    t = str(text).strip().lower()
    if t in NUMA_CHOICES:
        return t
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise ValueError(f"numa must be 'off', 'auto' or a number of virtual nodes >= 1, got {text!r}")


def numa_partitions(numa: str | int, *, num_threads: int, cpus=()) -> list[tuple[int, ...]]:
    """The engine's partitions (one CPU tuple per node) for a `numa` value; [] = none."""
    if isinstance(numa, bool) or not isinstance(numa, (str, int)):
        raise TypeError(f"numa must be 'off', 'auto' or an int, got {numa!r}")
    if isinstance(numa, str):
        numa = parse_numa(numa)
    mine = tuple(sorted(set(cpus))) if cpus else None
    if numa == "off":
        return []
    if numa == "auto":
        nodes = topology.numa_nodes()
        if mine is not None:
            nodes = [n for n in (tuple(c for c in node.cpus if c in mine) for node in nodes) if n]
        else:
            nodes = [node.cpus for node in nodes]
        return nodes if 2 <= len(nodes) <= num_threads else []
    if numa < 1:
        raise ValueError(f"numa: a number of virtual nodes must be >= 1, got {numa}")
    if numa > num_threads:
        raise ValueError(f"numa={numa} partitions need at least as many engine threads, got num_threads={num_threads}")
    return [node.cpus for node in topology.virtual_nodes(numa, mine)]
