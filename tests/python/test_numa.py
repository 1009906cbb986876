"""moetune.Context(numa=...): one engine split over NUMA partitions (moetune.numa).

On a one-node CI machine the partitions are virtual nodes of the allowed CPUs (numa=N); results
must be bit-identical to the unpartitioned engine (forward and every gradient, bf16 and int4,
with LoRA), the partitions must really run expert tasks, and bad values must be clear errors.
"""

from __future__ import annotations

import pytest
from op_cases import ALL, BF16, F32, I64, Case, assert_results_equal, make_experts, make_inputs, run_engine

import moetune
from moetune import _moetune_ext as _ext
from moetune import numa, topology

CPUS = topology.allowed_cpus()
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="2 virtual nodes need 2 allowed CPUs")


@needs_two_cpus
def test_virtual_partitions_are_reported():
    ctx = moetune.Context(2, numa=2)
    want = [n.cpus for n in topology.virtual_nodes(2)]
    assert ctx.numa_partitions == want
    assert ctx.info()["numa_partitions"] == [topology.format_cpulist(c) for c in want]
    assert "numa_partitions=" in repr(ctx)
    off = moetune.Context(2)
    assert off.numa_partitions == [] and off.info()["numa_partitions"] == []


CASE = Case("numa", 40, 72, 300, 7, 3, 4, ALL, F32, I64, BF16, "uniform", BF16)


@needs_two_cpus
@pytest.mark.parametrize("fmt", [{}, {"weight_format": "int4", "group_size": 32}], ids=["bf16", "int4"])
@pytest.mark.parametrize("activations", ["save", "recompute"])
@pytest.mark.parametrize("threads", [2, 3])
def test_results_bit_identical_with_and_without_partitions(fmt, activations, threads):
    inp = make_inputs(CASE, seed=16)
    base = run_engine(make_experts(inp, moetune.Context(1), activations=activations, **fmt), inp)
    ctx = moetune.Context(threads, numa=2)
    got = run_engine(make_experts(inp, ctx, activations=activations, **fmt), inp)
    assert_results_equal(got, base, f"numa=2 threads={threads} {fmt or 'bf16'} {activations}")
    counts = ctx._ctx.partition_task_counts()
    assert len(counts) == 2 and all(c > 0 for c in counts), f"a partition ran no expert task: {counts}"


def test_bad_numa_values_are_clear_errors():
    with pytest.raises(ValueError, match="numa must be 'off', 'auto' or a number"):
        moetune.Context(1, numa="sockets")
    with pytest.raises(TypeError, match="numa must be"):
        moetune.Context(1, numa=True)
    with pytest.raises(ValueError, match="numa: a number of virtual nodes must be >= 1"):
        moetune.Context(1, numa=0)
    with pytest.raises(ValueError, match="numa=2 partitions need at least as many engine threads"):
        moetune.Context(1, numa=2)
    with pytest.raises(ValueError, match=r"virtual_nodes: n=\d+ must be in"):
        moetune.Context(len(CPUS) + 1, numa=len(CPUS) + 1)


def test_bad_partitions_at_the_binding_are_clear_errors():
    c0 = CPUS[0]
    with pytest.raises(ValueError, match=r"partitions\[1\] is empty"):
        _ext.Context(2, [], "auto", [[c0], []])
    with pytest.raises(ValueError, match=r"partitions\[1\]: core 100000 is not one this process may run on"):
        _ext.Context(2, [], "auto", [[c0], [100000]])
    with pytest.raises(ValueError, match="also in an earlier partition"):
        _ext.Context(2, [], "auto", [[c0], [c0]])
    with pytest.raises(ValueError, match="2 NUMA partitions need at least as many threads"):
        _ext.Context(1, [], "auto", [[c0], [c0 + 1]])
    with pytest.raises(ValueError, match="either cpus or NUMA partitions"):
        _ext.Context(2, [c0], "auto", [[c0]])


def test_auto_follows_the_topology(monkeypatch):
    # This machine: one node -> no partitions.
    monkeypatch.setattr(topology, "numa_nodes", lambda: [topology.NumaNode(0, (0, 1, 2, 3))])
    assert numa.numa_partitions("auto", num_threads=4) == []
    # A 2-socket host: one partition per node, restricted to the cpus given; fewer threads than
    # nodes, or one node left after the restriction: off.
    two = [topology.NumaNode(0, (0, 1, 2, 3)), topology.NumaNode(1, (4, 5, 6, 7))]
    monkeypatch.setattr(topology, "numa_nodes", lambda: two)
    assert numa.numa_partitions("auto", num_threads=8) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert numa.numa_partitions("auto", num_threads=4, cpus=[2, 3, 4]) == [(2, 3), (4,)]
    assert numa.numa_partitions("auto", num_threads=1) == []
    assert numa.numa_partitions("auto", num_threads=8, cpus=[0, 1]) == []
    assert numa.numa_partitions(numa.NUMA_DEFAULT, num_threads=8) == []


def test_parse_numa():
    assert numa.parse_numa("auto") == "auto" and numa.parse_numa("OFF") == "off" and numa.parse_numa("2") == 2
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError):
            numa.parse_numa(bad)


def test_moetune_info_reports_partitions(capsys):
    from moetune.cli import main

    if len(CPUS) >= 2:
        assert main(["info", "--threads", "2", "--numa", "2"]) == 0
        assert "'numa_partitions': [" in capsys.readouterr().out
    assert main(["info", "--threads", "1", "--numa", "2"]) == 2
    assert "need at least as many engine threads" in capsys.readouterr().err
    assert main(["info", "--numa", "sockets"]) == 2
    assert "numa must be" in capsys.readouterr().err


def test_train_option_engine_numa(tmp_path):
    from moetune.train.config import ConfigError, make_config
    from moetune.train.model import engine_context

    out = str(tmp_path / "o")
    assert make_config(None, {"output_dir": out}).engine_numa == numa.NUMA_DEFAULT
    with pytest.raises(ConfigError, match="engine_numa: numa must be 'off', 'auto' or a number"):
        make_config(None, {"engine_numa": "sockets", "output_dir": out})
    cfg = make_config(None, {"engine_numa": 2, "engine_threads": 2, "output_dir": out})  # YAML gives an int
    assert cfg.engine_numa == "2"
    if len(CPUS) >= 2:
        assert engine_context(cfg).numa_partitions == [n.cpus for n in topology.virtual_nodes(2)]
    assert engine_context(make_config(None, {"engine_threads": 2, "output_dir": out})).numa_partitions == []
