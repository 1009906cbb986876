"""INT8 / INT4 expert weights through moetune.moe_experts.

The quantized engine must equal (bit for bit) the bf16 engine run on the
dequantized weights dq(q(W)) computed by the plain-PyTorch reference
(quant_reference.py), and match the fp32 PyTorch reference on dq(q(W)) with
the op's usual tolerance table: only the weights change, the rest of the
computation is the bf16 one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from op_cases import (
    ALL,
    BF16,
    F32,
    I64,
    ISAS,
    SWEEP,
    Case,
    assert_results_equal,
    compare,
    get_ctx,
    isa_ctx_or_skip,
    make_experts,
    make_inputs,
    moetune,
    reference,
    run_engine,
    sweep_seed,
)
from quant_reference import dequantized

FORMATS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
CASES = [c for c in SWEEP if c.name in ("odd_all_r16", "H40_I24_down", "no_lora", "skewed", "lora_bf16", "larger")]


def dq_inputs(inp, fmt, g):
    return dataclasses.replace(
        inp,
        gate=dequantized(inp.gate, fmt, g or 0),
        up=dequantized(inp.up, fmt, g or 0),
        down=dequantized(inp.down, fmt, g or 0),
    )


@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_quantized_equals_bf16_on_dequantized_weights(case, fmt, group):
    inp = make_inputs(case, sweep_seed(case))
    kw = {"weight_format": fmt} if group is None else {"weight_format": fmt, "group_size": group}
    ex = make_experts(inp, **kw)
    assert ex.weight_format == fmt and ex.group_size == (group or 0)
    res = run_engine(ex, inp)
    dq = dq_inputs(inp, fmt, group)
    assert not torch.equal(dq.gate, inp.gate), "quantization changed nothing: the test would be vacuous"
    assert_results_equal(res, run_engine(make_experts(dq), dq), f"{fmt}{group or ''} vs bf16(dq(q(W)))")
    compare(res, reference(dq), dq)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bw", ["repack", "transposed_copy"])
def test_every_isa_and_backward_weights(isa, bw):
    ctx = isa_ctx_or_skip(isa)
    case = Case("q_isa", 12, 40, 24, 5, 2, 4, ALL, F32, I64, BF16)
    inp = make_inputs(case, 7)
    for fmt, g in (("int8", None), ("int4", 32)):
        dq = dq_inputs(inp, fmt, g)
        ex = moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format=fmt, group_size=g, backward_weights=bw)
        ref_ex = moetune.MoEExperts(ctx, dq.gate, dq.up, dq.down, backward_weights=bw)
        assert_results_equal(run_engine(ex, inp), run_engine(ref_ex, dq), f"{isa} {bw} {fmt}")


def test_default_group_size_and_memory_per_expert():
    case = Case("q_mem", 4, 256, 128, 2, 1, 4, ())
    inp = make_inputs(case, 1)
    ctx = get_ctx()
    n = 3 * 256 * 128
    bf = moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down)
    i8 = moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format="int8")
    i4 = moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format="int4")
    assert i4.group_size == 128
    assert bf.packed_bytes_per_expert == 2 * n
    assert i8.packed_bytes_per_expert == n + 4 * (128 + 128 + 256)
    assert i4.packed_bytes_per_expert == n // 2 + 4 * n // 128


def test_bad_format_and_group_size_errors():
    inp = make_inputs(Case("q_err", 2, 32, 16, 2, 1, 4, ()), 0)
    ctx = get_ctx()
    with pytest.raises(ValueError, match="int4 group_size must be 32, 64 or 128, got 48"):
        moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format="int4", group_size=48)
    with pytest.raises(ValueError, match="group_size applies to int4 only; weight format int8"):
        moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format="int8", group_size=64)
    with pytest.raises(
        ValueError, match="weight_format must be 'bf16', 'int8', 'int4', 'fp8_block' or 'mxfp4', got 'fp8'"
    ):
        moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, weight_format="fp8")
    bad = inp.up.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="up_proj of expert 1 has a non-finite value at row 3, column 5"):
        moetune.MoEExperts(ctx, inp.gate, bad, inp.down, weight_format="int4", group_size=32)


def _gptoss_run(ex, x, ids, w, lora, dout):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    params = {p: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for p, (a, b) in lora.items()}
    out = moetune.moe_experts(ex, xl, ids, wl, moetune.LoraWeights(**params, scaling=2.0))
    out.backward(dout)
    return [out, xl.grad, wl.grad] + [t.grad for pair in params.values() for t in pair]


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 64)])
def test_quantized_with_gpt_oss_activation_and_biases(fmt, group):
    """Quantization composes with the clamped SwiGLU and expert biases: bit-identical to
    the bf16 engine on dq(q(W)) with the same biases and activation."""
    g = torch.Generator().manual_seed(11)
    E, H, I, T, k, r = 4, 72, 40, 10, 2, 4
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W = [(rn(E, I, H) / H**0.5).bfloat16(), (rn(E, I, H) / H**0.5).bfloat16(), (rn(E, H, I) / I**0.5).bfloat16()]
    biases = dict(gate_bias=rn(E, I) * 0.1, up_bias=rn(E, I) * 0.1, down_bias=rn(E, H) * 0.1)
    act = dict(activation="gpt_oss", alpha=1.702, limit=7.0)
    ins, outs = dict(gate=H, up=H, down=I), dict(gate=I, up=I, down=H)
    lora = {p: (rn(E, r, ins[p]) / ins[p] ** 0.5, rn(E, outs[p], r) * 0.1) for p in ("gate", "up", "down")}
    x = (rn(T, H) * 3).bfloat16()
    w, ids = torch.softmax(rn(T, E), -1).topk(k, -1)
    dout = rn(T, H).bfloat16()
    ctx = get_ctx()
    q = moetune.MoEExperts(ctx, *W, weight_format=fmt, group_size=group, **biases, **act)
    ref = moetune.MoEExperts(ctx, *[dequantized(t, fmt, group or 0) for t in W], **biases, **act)
    assert q.has_biases == (True, True, True)
    for a, b in zip(_gptoss_run(q, x, ids, w, lora, dout), _gptoss_run(ref, x, ids, w, lora, dout)):
        assert torch.equal(a, b)
