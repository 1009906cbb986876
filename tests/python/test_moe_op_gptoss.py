"""moetune.moe_experts with gpt-oss's experts: the clamped SwiGLU activation
(alpha, limit) and frozen expert biases, against reference.py in fp32 (forward,
dx, d topk_weights and every LoRA gradient), with op_cases.py's tolerance table.

The clamps are made to act: limit 1.0 against O(1) pre-activations (g above
the limit, u on both sides), or gpt-oss's limit 7 with biases large enough to
push pre-activations past it; each case asserts that both clamps were hit.
"""

from __future__ import annotations

import math

import pytest
import reference as R
import torch
from op_cases import (
    ALL,
    BF16,
    F32,
    I32,
    I64,
    ISAS,
    Case,
    Result,
    assert_results_equal,
    compare,
    get_ctx,
    isa_ctx_or_skip,
    make_inputs,
    moetune,
    run_engine,
)

GPT_OSS_CASES = [
    # (case, limit, alpha, biases on (gate, up, down), bias dtype, bias amplitude)
    (Case("g_all", 9, 33, 17, 5, 2, 4, ALL, F32, I64, F32), 1.0, 1.702, "gud", F32, 0.5),
    (Case("g_nolora", 12, 40, 24, 6, 2, 4, (), BF16, I32, BF16), 1.0, 1.702, "gud", BF16, 0.5),
    (Case("g_nobias", 10, 40, 24, 4, 2, 16, ALL, F32, I64, F32), 1.25, 0.8, "", F32, 0.0),
    (Case("g_down_bias_only", 7, 33, 17, 5, 3, 1, ("down",), F32, I32, F32), 1.0, 1.702, "d", F32, 0.5),
    (
        Case("g_gate_up_bias", 8, 48, 32, 6, 2, 4, ("gate", "up"), F32, I64, BF16, "uniform", BF16),
        1.0,
        1.702,
        "gu",
        BF16,
        0.5,
    ),
    (Case("g_limit7_big_bias", 16, 40, 24, 4, 2, 4, ALL, F32, I64, F32, "skewed"), 7.0, 1.702, "gud", F32, 9.0),
    (Case("g_T1_kE", 1, 40, 24, 4, 4, 4, ALL, BF16, I64, F32), 1.0, 1.702, "gud", F32, 0.5),
    (Case("g_empty_experts", 6, 48, 32, 16, 2, 4, ALL, F32, I64, F32, "subset"), 1.0, 1.702, "gud", F32, 0.5),
]


def _ids(v):
    if isinstance(v, Case):
        return str(v)
    return None


def make_biases(case: Case, which: str, dtype, amp: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, flag, n in (("gate", "g", case.I), ("up", "u", case.I), ("down", "d", case.H)):
        out[p] = ((torch.rand(case.E, n, generator=g) * 2 - 1) * amp).to(BF16).to(dtype) if flag in which else None
    return out


def clamp_hits(inp, biases, limit):
    """(# routed g above the limit, # routed u outside [-limit, limit]) as the reference decides them."""
    lora = inp.lora_for_reference()
    x = inp.x.float()
    ng = nu = 0
    for e in range(inp.case.E):
        tok = torch.where(inp.ids.long() == e)[0]
        if tok.numel() == 0:
            continue
        pair = lambda p: None if p not in lora else (lora[p][0][e].float(), lora[p][1][e].float())  # noqa: E731
        bias = lambda p: None if biases[p] is None else biases[p][e].float()  # noqa: E731
        g = R._rounded_preact(x[tok], inp.gate[e].float(), pair("gate"), inp.scaling, bias("gate"))
        u = R._rounded_preact(x[tok], inp.up[e].float(), pair("up"), inp.scaling, bias("up"))
        ng += int((R.bf16_round(g) > limit).sum())
        nu += int((R.bf16_round(u).abs() > limit).sum())
    return ng, nu


def run_case(spec, seed, ctx=None, **engine_kw):
    case, limit, alpha, which, bdt, amp = spec
    inp = make_inputs(case, seed)
    biases = make_biases(case, which, bdt, amp, seed + 1)
    experts = moetune.MoEExperts(
        ctx or get_ctx(),
        inp.gate,
        inp.up,
        inp.down,
        activation="gpt_oss",
        alpha=alpha,
        limit=limit,
        **{f"{p}_bias": b for p, b in biases.items()},
        **engine_kw,
    )
    assert experts.has_biases == tuple(b is not None for b in biases.values())
    return inp, biases, experts


def reference(inp, spec, biases, emulate_bf16=False):
    _, limit, alpha, *_ = spec
    return R.reference_forward_backward(
        inp.x,
        inp.ids,
        inp.w,
        inp.gate,
        inp.up,
        inp.down,
        inp.lora_for_reference(),
        inp.scaling,
        inp.dout,
        emulate_bf16=emulate_bf16,
        activation="gpt_oss",
        alpha=alpha,
        limit=limit,
        biases=biases,
    )


@pytest.mark.parametrize("spec", GPT_OSS_CASES, ids=lambda s: s[0].name)
def test_gpt_oss_matches_reference(spec):
    seed = 3000 + GPT_OSS_CASES.index(spec)
    inp, biases, experts = run_case(spec, seed)
    ng, nu = clamp_hits(inp, biases, spec[1])
    assert ng > 0 and nu > 0, f"the clamps were not exercised (g above: {ng}, u outside: {nu})"
    compare(run_engine(experts, inp), reference(inp, spec, biases), inp)


def test_gpt_oss_tolerance_table_is_attainable():
    """The bf16 emulation of the engine passes the same table on the gpt-oss cases (needs no engine)."""
    worst = 0.0
    for i, spec in enumerate(GPT_OSS_CASES):
        case = spec[0]
        inp = make_inputs(case, 3000 + i)
        biases = make_biases(case, spec[3], spec[4], spec[5], 3001 + i)
        emu = reference(inp, spec, biases, emulate_bf16=True)
        res = Result(
            emu["out"].to(case.x_dtype),
            emu["dx"].to(case.x_dtype),
            emu["dtopk_weights"].to(case.w_dtype),
            {p: emu["dA"][p].to(case.lora_dtype) for p in case.lora},
            {p: emu["dB"][p].to(case.lora_dtype) for p in case.lora},
        )
        worst = max([worst, *compare(res, reference(inp, spec, biases), inp).values()])
    assert worst > 0


@pytest.mark.parametrize("isa", ISAS)
def test_gpt_oss_every_isa(isa):
    ctx = isa_ctx_or_skip(isa)
    spec = GPT_OSS_CASES[0]
    inp, biases, experts = run_case(spec, 3000, ctx=ctx)
    compare(run_engine(experts, inp), reference(inp, spec, biases), inp)


def test_gpt_oss_policies_bitwise():
    spec = GPT_OSS_CASES[0]
    inp, biases, base = run_case(spec, 3000)
    want = run_engine(base, inp)
    for kw in (dict(activations="recompute"), dict(backward_weights="transposed_copy")):
        _, _, ex = run_case(spec, 3000, ctx=get_ctx(3), **kw)
        assert_results_equal(run_engine(ex, inp), want, str(kw))


def test_biases_and_activation_matter():
    """Dropping the biases or the activation variant moves the output far beyond the tolerance."""
    spec = GPT_OSS_CASES[0]
    inp, biases, experts = run_case(spec, 3000)
    got = run_engine(experts, inp).out
    scale = got.abs().max().item()
    for kw in (
        dict(activation="gpt_oss", limit=spec[1]),
        dict(activation="swiglu", **{f"{p}_bias": b for p, b in biases.items()}),
    ):
        other = run_engine(moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **kw), inp).out
        assert (other - got).abs().max().item() > 40 * 2.0**-8 * scale, kw


@pytest.mark.parametrize(
    "which,kw,match",
    [
        ("gate_shape", dict(gate_bias=torch.zeros(4, 25)), r"gate_bias.*\[4, 25\].*\[4, 24\]"),
        ("up_experts", dict(up_bias=torch.zeros(3, 24)), r"up_bias.*\[3, 24\]"),
        ("down_shape", dict(down_bias=torch.zeros(4, 24)), r"down_bias.*\[4, 24\].*\[4, 40\]"),
        ("down_3d", dict(down_bias=torch.zeros(4, 40, 1)), r"down_bias"),
        ("gate_int", dict(gate_bias=torch.zeros(4, 24, dtype=torch.int32)), r"gate_bias.*floating"),
        ("up_list", dict(up_bias=[0.0] * 24), r"up_bias.*floating"),
        ("activation", dict(activation="gelu"), r"activation.*swiglu.*gpt_oss"),
        ("limit", dict(activation="gpt_oss", limit=0.0), r"limit"),
        ("alpha", dict(activation="gpt_oss", alpha=math.nan), r"alpha"),
    ],
)
def test_bad_gpt_oss_arguments(which, kw, match):
    inp = make_inputs(Case("b", 2, 40, 24, 4, 2, 4, ALL), 1)
    with pytest.raises(ValueError, match=match):
        moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **kw)
