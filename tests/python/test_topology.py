"""moetune.topology: cpulist parsing, nodes from a made-up sysfs, per-rank disjoint CPU sets."""

import os

import pytest

from moetune import topology
from moetune.topology import NumaNode, format_cpulist, parse_cpulist, rank_cpus, virtual_nodes


def test_cpulist_roundtrip():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpulist((11, 0, 1, 2, 3, 8, 10)) == "0-3,8,10-11"
    assert parse_cpulist("") == ()
    for bad in ("a", "3-1", "1-", "-2"):
        with pytest.raises(ValueError, match="cpulist"):
            parse_cpulist(bad)


def test_numa_nodes_from_sysfs(tmp_path, monkeypatch):
    for i, cl in ((0, "0-1"), (1, "2-3"), (10, "4-5")):
        d = tmp_path / f"node{i}"
        d.mkdir()
        (d / "cpulist").write_text(cl + "\n")
    monkeypatch.setattr(topology, "allowed_cpus", lambda: (0, 1, 3, 4, 5))
    nodes = topology.numa_nodes(str(tmp_path / "node[0-9]*"))
    # numeric order (node10 after node1), only allowed CPUs, empty nodes dropped
    assert nodes == [NumaNode(0, (0, 1)), NumaNode(1, (3,)), NumaNode(10, (4, 5))]


def test_numa_nodes_without_sysfs(tmp_path):
    nodes = topology.numa_nodes(str(tmp_path / "none*"))
    assert nodes == [NumaNode(0, topology.allowed_cpus())]
    assert set(topology.allowed_cpus()) <= set(range(os.cpu_count()))


def test_virtual_nodes_split_evenly():
    v = virtual_nodes(3, tuple(range(8)))
    assert [n.cpus for n in v] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    with pytest.raises(ValueError):
        virtual_nodes(9, tuple(range(8)))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5, 8])
def test_rank_cpus_disjoint_and_within_nodes(ranks):
    nodes = [NumaNode(0, tuple(range(0, 8))), NumaNode(1, tuple(range(8, 16)))]
    shares = [rank_cpus(r, ranks, nodes) for r in range(ranks)]
    seen = [c for s in shares for c in s.cpus]
    assert len(seen) == len(set(seen)), "ranks share a CPU"
    assert set(seen) == set(range(16)), "a CPU is left unused"
    for s in shares:
        assert s.cpus
        if ranks >= 2:  # no rank straddles a node boundary
            assert len(s.nodes) == 1 and set(s.cpus) <= set(nodes[0].cpus if s.nodes == (0,) else nodes[1].cpus)


def test_rank_cpus_errors():
    nodes = [NumaNode(0, (0,))]
    with pytest.raises(ValueError, match="local_rank"):
        rank_cpus(2, 2, nodes)
    with pytest.raises(ValueError, match="1 CPUs for 2 ranks"):
        rank_cpus(0, 2, nodes)
