"""benchmarks/bench_ep_one_host.py at its smallest size on this CPU (the GPU machine runs the 16-core
size: `bash benchmarks/device_run.sh ep-one-host`): one process on all the cores and 2 torchrun ranks
(gloo) pinned to disjoint halves of them train the same tokens; the figures are printed side by
side, and the experts are held once across the ranks. One warm-up and one timed step: the test
checks the benchmark's plumbing and figures, not a speed."""

import importlib.util
import os
import pathlib
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_ep_one_host_tiny(tmp_path, capsys):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores (one per rank)")
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_ep_one_host", ROOT / "benchmarks" / "bench_ep_one_host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--size", "tiny", "--cores", "2", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    one, ranks = res["one"], res["ep"]
    cfg = mod.SIZES["tiny"]
    # the same global batch: the one process takes both ranks' sequences
    assert one["tokens_per_step"] == sum(r["tokens_per_step"] for r in ranks) == 2 * cfg["batch"] * cfg["seq"]
    # one copy of the experts: each rank holds half of every layer's experts, their bytes add up to the one
    # process's exactly (same format, same bytes per expert)
    assert one["experts_here"] == [cfg["experts"]] * cfg["layers"]
    assert [r["experts_here"] for r in ranks] == [[cfg["experts"] // 2] * cfg["layers"]] * 2
    assert res["expert_bytes_ep_sum"] == res["expert_bytes_one"] > 0
    # (a) on all C cores, (b) pinned to disjoint halves of them
    assert one["engine_threads"] == 2 and sorted(one["engine_cpus"]) == sorted(os.sched_getaffinity(0))[:2]
    assert [r["engine_threads"] for r in ranks] == [1, 1]
    assert not set(ranks[0]["engine_cpus"]) & set(ranks[1]["engine_cpus"])
    assert set(ranks[0]["engine_cpus"]) | set(ranks[1]["engine_cpus"]) == set(one["engine_cpus"])
    # the measured figures: the ranks exchange tokens, the one process does not
    assert one["exchange_s"] == 0 and all(r["exchange_s"] > 0 for r in ranks)
    for r in (one, *ranks):
        assert r["step_s"] > 0 and r["busy_s"] >= 0 and r["rss_gib"] > 0 and r["loss"] > 0
    assert res["ratio"] == pytest.approx(res["tokens_per_s_ep"] / res["tokens_per_s_one"])
    # printed side by side
    assert "(a) 1 process" in out and "(b) rank 0" in out and "(b) rank 1" in out
    for word in ("tokens/s", "engine busy s", "exchange s", "expert MiB", "RSS GiB", "(b) / (a) tokens/s"):
        assert word in out, word
    assert "not a multi-GPU speed test" not in out  # said only where the ranks share a GPU
    assert (tmp_path / "ep-logs").is_dir() and (tmp_path / "one.log").is_file()
