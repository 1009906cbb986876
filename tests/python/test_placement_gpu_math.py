"""The GPU experts math (moetune.placement.gpu_math through the placed op with every expert on
the GPU side) against reference.py in fp32, on the CPU stand-in device.

Tolerances: placement_cases.TOL_C_GPU, derived from the bf16-rounded points of the GPU path
(gpu_math.py's table). Both GEMM paths are covered: grouped_mm (shapes whose H, I are multiples
of 8) and the per-expert fallback (odd shapes), checked to have been the ones used.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import ALL, BF16, F32, I32, I64, SWEEP, Case, make_inputs, sweep_seed
from placement_cases import U, compare, gptoss_reference, gptoss_setup, make_setup, reference, resident_set, run_placed

ALIGNED = [
    Case("al_all_r16", 24, 64, 48, 8, 2, 16, ALL, BF16, I64, F32, "skewed"),
    Case("al_r4_f32", 17, 64, 32, 6, 3, 4, ALL, F32, I32, F32),  # rank padded 4 -> 8
    Case("al_r1_down", 9, 48, 40, 5, 2, 1, ("down",), BF16, I64, BF16),  # rank 1, bf16 weights
    Case("al_gate_up_lbf16", 20, 32, 64, 7, 2, 8, ("gate", "up"), F32, I64, F32, "uniform", BF16),
    Case("al_subset", 12, 64, 48, 16, 2, 16, ALL, F32, I64, F32, "subset"),
    Case("al_no_lora", 16, 64, 48, 8, 2, 4, ()),
    Case("al_T1", 1, 64, 48, 4, 4, 8, ALL, BF16, I64, F32),
]


def _check(case, seed, plan, **setup_kw):
    inp = make_inputs(case, seed)
    st = make_setup(inp, resident=resident_set(plan, case.E), **setup_kw)
    res = run_placed(st, inp, plan)
    ratios = compare(res, reference(inp), inp)
    return st, ratios


@pytest.mark.parametrize("plan", ["streamed", "resident"])
@pytest.mark.parametrize("case", ALIGNED, ids=str)
def test_grouped_gemm_path_matches_reference(case, plan):
    st, _ = _check(case, 500 + ALIGNED.index(case), plan)
    assert st.runtime.gemm.calls["grouped"] > 0 and st.runtime.gemm.calls["per_expert"] == 0


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_per_expert_path_matches_reference(case):
    # Odd H / I (grouped_mm's stride rule fails) and the aligned sweep cases with gemm="per_expert".
    st, _ = _check(case, sweep_seed(case), "streamed", gemm="per_expert")
    assert st.runtime.gemm.calls["grouped"] == 0 and st.runtime.gemm.calls["per_expert"] > 0


def test_grouped_and_per_expert_agree():
    case = ALIGNED[0]
    inp = make_inputs(case, 7)
    got = {}
    for mode in ("grouped", "per_expert"):
        st = make_setup(inp, gemm=mode)
        got[mode] = run_placed(st, inp, "streamed")
        assert st.runtime.gemm.calls[mode] > 0
    a, b = got["grouped"], got["per_expert"]
    # Both are bf16(fp32 sums) of the same products: at most a bf16 rounding apart, element-wise.
    for name in ("out", "dx"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        assert (x - y).abs().max() <= 2 * U * y.abs().max(), name


def test_gpu_path_rounds_like_bf16_not_fp32():
    """Not vacuous: the GPU path differs from the fp32 reference (it rounds), within the table."""
    worst = {}
    for i, case in enumerate(ALIGNED):
        _, ratios = _check(case, 500 + i, "streamed")
        for q, v in ratios.items():
            worst[q.split(".")[0]] = max(worst.get(q.split(".")[0], 0.0), v)
    assert worst["out"] > 0 and worst["dx"] > 0 and worst["dA"] > 0, worst


@pytest.mark.parametrize("fmt", [("bf16", None), ("int8", None), ("int4", 64)], ids=lambda f: f"{f[0]}{f[1] or ''}")
def test_gpt_oss_with_biases_matches_reference(fmt):
    case = Case("go", 20, 64, 48, 6, 2, 8, ALL, F32, I64, F32, "skewed")
    inp, biases, limit, st = gptoss_setup(case, 41, fmt=fmt)
    res = run_placed(st, inp, "streamed")
    compare(res, gptoss_reference(inp, biases, limit, fmt, gpu_experts=range(case.E)), inp)


def test_gpt_oss_activation_at_the_bounds():
    """torch.clamp's subgradient at the limits (passes at the bounds, 0 outside, 0 for NaN), as the engine."""
    from moetune.placement.gpu_math import Activation

    act = Activation("gpt_oss", 1.702, 2.0)
    g = torch.tensor([2.0, 2.015625, 0.5, float("nan"), -3.0], dtype=BF16)  # at, above, inside, NaN, inside
    u = torch.tensor([0.5, 0.5, 2.015625, 0.0, -2.0], dtype=BF16)  # inside, inside, above, inside, at -limit
    dh = torch.ones(5)
    dg, du = act.backward(g, u, dh)
    assert dg[0] != 0 and dg[1] == 0 and dg[2] != 0 and dg[3] == 0 and dg[4] != 0
    assert du[0] != 0 and du[1] != 0 and du[2] == 0 and torch.isnan(du[3]) and du[4] != 0
    h = act.forward(g, u)
    assert torch.isnan(h[3]) and torch.isfinite(h[[0, 1, 2, 4]]).all()
    # Above the limit the output is flat in g: h(2.015625, .) == h(2.0, .)
    assert act.forward(g[1:2], u[1:2]) == act.forward(torch.tensor([2.0], dtype=BF16), u[1:2])
    with pytest.raises(ValueError, match="activation"):
        Activation("gelu")


def test_swiglu_activation_matches_autograd():
    from moetune.placement.gpu_math import Activation

    g = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(BF16)
    u = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(BF16)
    dh = torch.randn(64, generator=torch.Generator().manual_seed(3))
    gf, uf = g.float().requires_grad_(True), u.float().requires_grad_(True)
    h = torch.nn.functional.silu(gf) * uf
    h.backward(dh)
    dg, du = Activation().backward(g, u, dh)
    assert torch.equal(Activation().forward(g, u), h.detach().to(BF16))
    assert (dg.float() - gf.grad).abs().max() <= U * gf.grad.abs().max()
    assert (du.float() - uf.grad).abs().max() <= U * uf.grad.abs().max()
