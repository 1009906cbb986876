"""benchmarks/bench_ktkernel.py: its fp32 reference and error measure, checked against moetune.

kt-kernel itself (cp312 wheel, AVX512-BF16 at least) is not importable in CI; the script's
kt-kernel path is exercised by its own run (see its docstring). What must hold everywhere:
the reference the peer is judged against agrees with moetune to bf16 accuracy, and the error
measure does see a wrong result.
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    # As `python benchmarks/bench_ktkernel.py` would, with its folder (benchmarks/_common.py) importable.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_ktkernel", ROOT / "benchmarks" / "bench_ktkernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    import argparse

    d = dict(threads=2, isa="auto", moetune_backward_weights="repack", k=4)
    d.update(kw)
    return argparse.Namespace(**d)


# bf16 unit roundoff 2^-8: outputs and dx are rounded to bf16 once after fp32 accumulation
# (measured ~0.9 u); 4 u leaves room for the bf16-rounded intermediates (h, LoRA products).
TOL = 4 * 2.0**-8


def test_reference_matches_moetune(bench):
    layer = bench.Layer(E=8, H=128, I=64, r=4, alpha=8.0, seed=0)
    b = bench.Batch(T=24, H=128, E=8, k=4, seed=1)
    ref = bench.reference(layer, b)
    impl = bench.MoetuneImpl(layer, _args())
    (f, bw, rp), res = bench.run_impl(impl, b, reps=1, warmup=1)
    assert f > 0 and bw > 0 and rp == 0
    err = bench.errors(res, ref)
    for key in ("out", "dx", "dw", "lora"):
        assert err[key] < TOL, (key, err)
    assert set(err["lora_all"]) == set(bench.LORA_NAMES)


def test_error_measure_sees_a_wrong_scaling(bench):
    layer = bench.Layer(E=8, H=128, I=64, r=4, alpha=8.0, seed=0)
    b = bench.Batch(T=24, H=128, E=8, k=4, seed=1)
    ref = bench.reference(layer, b)
    layer.scaling *= 1.5  # the LoRA path is ~10% of the output: a wrong scale is a few % off
    wrong = bench.reference(layer, b)
    err = bench.errors(wrong, ref)
    assert err["out"] > TOL and err["dx"] > TOL and err["lora"] > TOL, err


def test_unknown_config_is_a_clear_error(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--configs", "nope", "--skip-kt"])
    assert "unknown config 'nope'" in str(e.value)


def test_main_runs_moetune_only(bench, capsys):
    bench.main(["--configs", "tiny", "--tokens", "16", "--threads", "2", "--reps", "1", "--skip-kt"])
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("tiny") and "moetune" in l)
    errs = [float(v) for v in row.split()[-4:]]
    assert all(e < TOL for e in errs), row
