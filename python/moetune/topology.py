"""The host's CPU topology as moetune uses it: NUMA nodes and the CPUs this process may use.

This module is the one place that reads the topology (Linux sysfs + the process's CPU
affinity); everything that splits cores or memory by node derives from it: `moetune env`,
the per-rank core sets of expert parallelism (`rank_cpus`), and the engine's per-node
partitions. Tests build made-up topologies with `virtual_nodes` / `NumaNode` directly.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

_NODE_GLOB = "/sys/devices/system/node/node[0-9]*"


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its index and the CPUs of it this process may run on (sorted)."""

    index: int
    cpus: tuple[int, ...]


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a Linux cpulist ("0-3,8,10-11") into sorted CPU ids; raise ValueError on junk."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad cpulist entry {part!r} in {text!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"bad cpulist range {part!r} in {text!r}")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def format_cpulist(cpus) -> str:
    """CPU ids as a Linux cpulist ("0-3,8"): the inverse of `parse_cpulist`."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return tuple(range(os.cpu_count() or 1))


def numa_nodes(node_glob: str = _NODE_GLOB) -> list[NumaNode]:
    """NUMA nodes with at least one allowed CPU, from sysfs; one node holding every allowed CPU
    where sysfs has no node information (non-Linux, containers without /sys)."""
    allowed = set(allowed_cpus())
    nodes = []
    for d in sorted(glob.glob(node_glob), key=lambda p: int(os.path.basename(p)[4:])):
        try:
            with open(os.path.join(d, "cpulist")) as f:
                cpus = parse_cpulist(f.read())
        except (OSError, ValueError):
            continue
        mine = tuple(c for c in cpus if c in allowed)
        if mine:
            nodes.append(NumaNode(int(os.path.basename(d)[4:]), mine))
    return nodes or [NumaNode(0, tuple(sorted(allowed)))]


def virtual_nodes(n: int, cpus: tuple[int, ...] | None = None) -> list[NumaNode]:
    """Split `cpus` (default: the allowed CPUs) into `n` contiguous virtual nodes, as evenly as
    possible; used to test per-node partitioning on a one-node machine."""
    cpus = tuple(cpus if cpus is not None else allowed_cpus())
    if n < 1 or n > len(cpus):
        raise ValueError(f"virtual_nodes: n={n} must be in 1..{len(cpus)} (the CPUs given)")
    base, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(NumaNode(i, cpus[start : start + size]))
        start += size
    return out


@dataclass(frozen=True)
class RankCpus:
    """The CPU share of one local rank: the NUMA nodes it lives on and its disjoint CPUs."""

    nodes: tuple[int, ...]
    cpus: tuple[int, ...]


def rank_cpus(local_rank: int, local_world_size: int, nodes: list[NumaNode] | None = None) -> RankCpus:
    """Disjoint CPU sets for the ranks of one host, no rank spanning a node boundary when there
    are at least as many ranks as nodes.

    Ranks are spread over nodes contiguously (ranks 0..a-1 on node 0, ...), a node's CPUs split
    evenly among its ranks; with fewer ranks than nodes each rank takes whole nodes. Raises
    ValueError where a rank would get no CPU.
    """
    nodes = list(nodes if nodes is not None else numa_nodes())
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"rank_cpus: local_rank {local_rank} not in 0..{local_world_size - 1}")
    n = len(nodes)
    if local_world_size <= n:
        # rank r takes nodes [r*n/R, (r+1)*n/R)
        lo, hi = local_rank * n // local_world_size, (local_rank + 1) * n // local_world_size
        mine = nodes[lo:hi]
        return RankCpus(tuple(x.index for x in mine), tuple(c for x in mine for c in x.cpus))
    # more ranks than nodes: node j hosts ranks [j*R/n, (j+1)*R/n)
    for j, node in enumerate(nodes):
        r0, r1 = j * local_world_size // n, (j + 1) * local_world_size // n
        if r0 <= local_rank < r1:
            share = virtual_nodes(r1 - r0, node.cpus) if len(node.cpus) >= r1 - r0 else None
            if share is None:
                raise ValueError(f"rank_cpus: node {node.index} has {len(node.cpus)} CPUs for {r1 - r0} ranks")
            return RankCpus((node.index,), share[local_rank - r0].cpus)
    raise AssertionError("unreachable: every rank maps to a node")
