"""benchmarks/bench_placement.py --smoke runs on the CPU stand-in (the GPU machine runs the real
shapes): every mode of every (shape, T) row, outputs close to the CPU engine's."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_placement_smoke(capsys):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_placement", ROOT / "benchmarks" / "bench_placement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke"])
    assert [(r["T"], r["mode"]) for r in rows] == [(T, m) for T in (32, 64) for m in mod.MODES]
    for r in rows:
        assert r["ms"] > 0 and r["rel_err_vs_cpu"] <= 13 * 2.0**-8, r
        if r["mode"] == "cpu":
            assert r["gpu_experts"] == 0 and r["rel_err_vs_cpu"] == 0
        elif r["mode"] == "mixed":
            assert 0 < r["gpu_experts"] < r["E"] and r["copied_per_step"] > 0
        elif r["mode"] == "gpu_streamed":
            assert r["copied_per_step"] > 0
        else:
            assert r["copied_per_step"] == 0 and r["gpu_experts"] > 0
    assert "gpu_streamed" in capsys.readouterr().out
