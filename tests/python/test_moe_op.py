"""Tests of moetune.moe_experts (forward + autograd backward) against reference.py.

Tolerances are derived in op_cases.py; bad-input tests are in test_moe_op_errors.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils.checkpoint
from op_cases import (
    ALL,
    BF16,
    F32,
    I32,
    I64,
    ISAS,
    SWEEP,
    TOL_C,
    Case,
    Result,
    _grads_to_result,
    _graph_inputs,
    assert_results_equal,
    check_close,
    compare,
    dw_scale,
    fresh_lora,
    get_ctx,
    isa_ctx_or_skip,
    make_experts,
    make_inputs,
    moetune,
    reference,
    run_engine,
    sweep_seed,
)


def test_context_info_and_experts_properties():
    ctx = get_ctx(2, "auto")
    info = ctx.info()
    for key in ("isa", "num_threads", "cpu"):
        assert key in info, f"ctx.info() lacks {key!r}: {info}"
    assert info["isa"] in ISAS
    assert info["num_threads"] == 2
    inp = make_inputs(Case("p", 2, 40, 24, 6, 2, 4, ALL))
    ex = make_experts(inp)
    assert (ex.num_experts, ex.hidden_size, ex.intermediate_size) == (6, 40, 24)


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_sweep_matches_reference(case):
    inp = make_inputs(case, sweep_seed(case))
    res = run_engine(make_experts(inp), inp)
    ref = reference(inp)
    assert res.out.device == inp.x.device
    compare(res, ref, inp)


def test_tolerance_table_is_attainable():
    """A bf16 emulation of the engine's roundings passes the table on every sweep case (needs no engine)."""
    worst: dict[str, float] = {}
    for case in SWEEP:
        inp = make_inputs(case, sweep_seed(case))
        ref = reference(inp)
        emu = reference(inp, emulate_bf16=True)
        res = Result(
            emu["out"].to(case.x_dtype),
            emu["dx"].to(case.x_dtype),
            emu["dtopk_weights"].to(case.w_dtype),
            {p: emu["dA"][p].to(case.lora_dtype) for p in case.lora},
            {p: emu["dB"][p].to(case.lora_dtype) for p in case.lora},
        )
        for q, v in compare(res, ref, inp).items():
            q = q.split(".")[0]
            worst[q] = max(worst.get(q, 0.0), v)
    # The emulation must also not be *identical* to the fp32 reference, or the check is vacuous.
    assert worst["out"] > 0 and worst["dx"] > 0


def test_dtopk_weights_nonzero_and_match():
    case = Case("dw", 6, 40, 24, 6, 3, 4, ALL, F32, I64, F32)
    inp = make_inputs(case, 7)
    res = run_engine(make_experts(inp), inp)
    ref = reference(inp)
    dw = res.dtopk_weights
    assert dw is not None, "topk_weights requires grad but got no gradient"
    assert dw.shape == inp.w.shape and dw.dtype == inp.w.dtype
    assert torch.count_nonzero(dw) == dw.numel(), f"d topk_weights has zero entries: {dw}"
    check_close("dtopk_weights", dw, ref["dtopk_weights"], TOL_C["dtopk_weights"], scale=dw_scale(ref, inp.dout))
    # Scaling the upstream gradient scales d topk_weights (no hidden dependence on weights themselves).
    inp2 = dataclasses.replace(inp, dout=inp.dout * 2)
    res2 = run_engine(make_experts(inp), inp2)
    assert torch.equal(res2.dtopk_weights, dw * 2)


@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_grads_only_where_required(w_dtype):
    """x / topk_weights / LoRA A not requiring grad: no grad for them, the rest still correct."""
    case = Case("req", 8, 40, 24, 5, 2, 4, ALL, w_dtype)
    inp = make_inputs(case, 11)
    ref = reference(inp)
    experts = make_experts(inp)
    x = inp.x.clone()  # requires_grad False
    w = inp.w.clone()
    params, _ = fresh_lora(inp, ALL)
    params["gate"][0].requires_grad_(False)
    lw = moetune.LoraWeights(gate=params["gate"], up=params["up"], down=params["down"], scaling=inp.scaling)
    out = moetune.moe_experts(experts, x, inp.ids, w, lora=lw)
    assert out.requires_grad
    out.backward(inp.dout)
    assert x.grad is None and w.grad is None and params["gate"][0].grad is None
    check_close("out", out, ref["out"], TOL_C["out"])
    check_close("dB.gate", params["gate"][1].grad, ref["dB"]["gate"], TOL_C["dB"])
    for p in ("up", "down"):
        check_close(f"dA.{p}", params[p][0].grad, ref["dA"][p], TOL_C["dA"])
        check_close(f"dB.{p}", params[p][1].grad, ref["dB"][p], TOL_C["dB"])


def test_no_grad_and_lora_none_equivalents():
    case = Case("ng", 7, 40, 24, 5, 2, 4, ())
    inp = make_inputs(case, 12)
    experts = make_experts(inp)
    with torch.no_grad():
        out_none = moetune.moe_experts(experts, inp.x, inp.ids, inp.w, lora=None)
        empty = moetune.LoraWeights(gate=None, up=None, down=None, scaling=inp.scaling)
        out_empty = moetune.moe_experts(experts, inp.x, inp.ids, inp.w, lora=empty)
    assert not out_none.requires_grad
    assert torch.equal(out_none, out_empty)
    check_close("out", out_none, reference(inp)["out"], TOL_C["out"])


@pytest.mark.parametrize("lora_dtypes", [(BF16, BF16), (BF16, F32), (F32, BF16)], ids=str)
def test_lora_param_dtypes(lora_dtypes):
    """LoRA A/B in bf16 or fp32 (also mixed): grads come back in each param's dtype."""
    a_dt, b_dt = lora_dtypes
    case = Case("ldt", 9, 40, 24, 5, 2, 4, ALL, F32, I64, F32, "uniform", BF16)
    inp = make_inputs(case, 13)
    inp.lora_params = {p: (A.to(a_dt), B.to(b_dt)) for p, (A, B) in inp.lora_params.items()}
    res = run_engine(make_experts(inp), inp)
    ref = reference(inp)
    for p in ALL:
        check_close(f"dA.{p}", res.dA[p], ref["dA"][p], TOL_C["dA"], bf16_out=a_dt == BF16, dtype=a_dt)
        check_close(f"dB.{p}", res.dB[p], ref["dB"][p], TOL_C["dB"], bf16_out=b_dt == BF16, dtype=b_dt)
    check_close("out", res.out, ref["out"], TOL_C["out"])
    check_close("dx", res.dx, ref["dx"], TOL_C["dx"])


def test_fp32_weights_are_rounded_to_bf16():
    case = Case("w32", 6, 40, 24, 4, 2, 4, ALL)
    inp = make_inputs(case, 14)
    gen = torch.Generator().manual_seed(3)
    g32 = inp.gate.float() + torch.randn(inp.gate.shape, generator=gen) * 1e-3  # not bf16-valued
    u32 = inp.up.float() + torch.randn(inp.up.shape, generator=gen) * 1e-3
    d32 = inp.down.float() + torch.randn(inp.down.shape, generator=gen) * 1e-3
    ex32 = moetune.MoEExperts(get_ctx(), g32, u32, d32)
    ex16 = moetune.MoEExperts(get_ctx(), g32.to(BF16), u32.to(BF16), d32.to(BF16))
    assert_results_equal(run_engine(ex32, inp), run_engine(ex16, inp), "fp32 vs bf16-rounded weights")


BITWISE_CASES = [
    Case("bw_a", 40, 48, 40, 8, 2, 4, ALL, F32, I64, F32, "skewed"),
    Case("bw_b", 13, 33, 17, 5, 3, 16, ("gate", "down"), BF16, I32, BF16, "uniform", BF16),
    Case("bw_c", 9, 40, 24, 16, 2, 1, ALL, F32, I64, F32, "subset"),
]


@pytest.mark.parametrize("case", BITWISE_CASES, ids=str)
def test_backward_weights_and_activation_policies_bitwise(case):
    inp = make_inputs(case, 21)
    results = {}
    for bw in ("repack", "transposed_copy"):
        for act in ("save", "recompute"):
            ex = make_experts(inp, backward_weights=bw, activations=act)
            results[(bw, act)] = run_engine(ex, inp)
    base = results[("repack", "save")]
    compare(base, reference(inp), inp)
    for key, r in results.items():
        assert_results_equal(base, r, f"repack/save vs {key[0]}/{key[1]}")


@pytest.mark.parametrize("case", BITWISE_CASES, ids=str)
@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_determinism(case, threads):
    inp = make_inputs(case, 22)
    r1 = run_engine(make_experts(inp, get_ctx(1)), inp)
    rn = run_engine(make_experts(inp, get_ctx(threads)), inp)
    assert_results_equal(r1, rn, f"num_threads=1 vs {threads}")


@pytest.mark.parametrize("case", BITWISE_CASES[:2], ids=str)
@pytest.mark.parametrize("weight_format", ["bf16", "int8"])
def test_row_group_is_a_speed_knob_only(case, weight_format):
    # Rows per GEMM task, from one row per task to every row of an expert in one:
    # same bits as the automatic choice, forward and backward, for either W^T policy.
    inp = make_inputs(case, 23)
    for bw in ("repack", "transposed_copy"):
        base = run_engine(make_experts(inp, backward_weights=bw, weight_format=weight_format), inp)
        for rg in (1, 5, 192, 1000):
            r = run_engine(make_experts(inp, backward_weights=bw, weight_format=weight_format, row_group=rg), inp)
            assert_results_equal(base, r, f"{weight_format} {bw}: row_group=0 vs {rg}")


def test_negative_row_group_rejected():
    inp = make_inputs(BITWISE_CASES[0], 24)
    with pytest.raises(ValueError, match="row_group must be >= 0"):
        make_experts(inp, row_group=-1)


ISA_CASES = [
    Case("isa_odd", 11, 33, 17, 5, 2, 16, ALL, BF16, I32, BF16),
    Case("isa_mid", 30, 64, 48, 8, 3, 4, ("gate", "down"), F32, I64, F32, "skewed"),
    Case("isa_k1", 5, 40, 24, 6, 1, 1, ALL, F32, I64, F32, "single", BF16),
]


@pytest.mark.parametrize("isa", ISAS)
def test_isa_matches_reference(isa):
    ctx = isa_ctx_or_skip(isa)
    assert ctx.info()["isa"] == isa
    for case in ISA_CASES:
        inp = make_inputs(case, 31)
        compare(run_engine(make_experts(inp, ctx), inp), reference(inp), inp)


def test_auto_isa_is_one_of_the_explicit_ones():
    auto = get_ctx(2, "auto").info()["isa"]
    ctx = moetune.Context(num_threads=2, isa=auto)  # whatever auto picked must be constructible explicitly
    inp = make_inputs(ISA_CASES[0], 32)
    assert_results_equal(
        run_engine(make_experts(inp, get_ctx(2, "auto")), inp),
        run_engine(make_experts(inp, ctx), inp),
        f"auto vs {auto}",
    )


def test_unknown_isa_rejected():
    with pytest.raises(ValueError, match="isa|bogus") as e:
        moetune.Context(num_threads=1, isa="bogus")
    for isa in ISAS:  # the message lists every choice
        assert f" {isa}," in str(e.value) or f" {isa};" in str(e.value), (isa, str(e.value))


def test_interleaved_handles():
    """forward A, B, C (B on a second layer), then backward B, C, A; each must match its reference."""
    caseA = Case("A", 12, 40, 24, 6, 2, 4, ALL)
    caseB = Case("B", 7, 40, 24, 6, 3, 16, ("gate", "down"), BF16, I32, BF16)
    caseC = Case("C", 20, 40, 24, 6, 1, 4, ALL, F32, I64, F32, "skewed")
    inA, inB, inC = make_inputs(caseA, 41), make_inputs(caseB, 42), make_inputs(caseC, 43)
    # A and C are micro-batches of layer 1 (same weights and LoRA), B is layer 2.
    inC = dataclasses.replace(
        inC, gate=inA.gate, up=inA.up, down=inA.down, lora_params=inA.lora_params, scaling=inA.scaling
    )
    layer1, layer2 = make_experts(inA), make_experts(inB)
    xA, wA, pA, lwA, leavesA = _graph_inputs(inA, ALL)
    xB, wB, pB, lwB, leavesB = _graph_inputs(inB, caseB.lora)
    xC, wC = inC.x.clone().requires_grad_(True), inC.w.clone().requires_grad_(True)
    leavesC = [xC, wC] + [t for p in ALL for t in pA[p]]  # C shares layer-1 LoRA params with A
    outA = moetune.moe_experts(layer1, xA, inA.ids, wA, lora=lwA)
    outB = moetune.moe_experts(layer2, xB, inB.ids, wB, lora=lwB)
    outC = moetune.moe_experts(layer1, xC, inC.ids, wC, lora=lwA)
    gB = torch.autograd.grad(outB, leavesB, inB.dout)
    gC = torch.autograd.grad(outC, leavesC, inC.dout)
    gA = torch.autograd.grad(outA, leavesA, inA.dout)
    for _name, out, g, inp, projs in (
        ("B", outB, gB, inB, caseB.lora),
        ("C", outC, gC, inC, ALL),
        ("A", outA, gA, inA, ALL),
    ):
        compare(_grads_to_result(out, g, projs), reference(inp), inp)

    # Same three forwards, one backward of the sum with different upstream grads.
    x2 = [t.detach().clone().requires_grad_(True) for t in (inA.x, inB.x, inC.x)]
    w2 = [t.detach().clone().requires_grad_(True) for t in (inA.w, inB.w, inC.w)]
    pA2, lwA2 = fresh_lora(inA, ALL)
    pB2, lwB2 = fresh_lora(inB, caseB.lora)
    oA = moetune.moe_experts(layer1, x2[0], inA.ids, w2[0], lora=lwA2)
    oB = moetune.moe_experts(layer2, x2[1], inB.ids, w2[1], lora=lwB2)
    oC = moetune.moe_experts(layer1, x2[2], inC.ids, w2[2], lora=lwA2)
    loss = (
        (oA.float() * inA.dout.float()).sum()
        + (oB.float() * inB.dout.float()).sum()
        + (oC.float() * inC.dout.float()).sum()
    )
    loss.backward()
    for i, ga in enumerate((gA, gB, gC)):
        assert torch.equal(x2[i].grad, ga[0]), f"{'ABC'[i]}: dx differs from the separate backward"
        assert torch.equal(w2[i].grad, ga[1]), f"{'ABC'[i]}: dtopk_weights differs from the separate backward"
    # Layer-1 LoRA grads accumulate A's and C's contributions.
    # (fp32 addition is commutative, so the accumulation order cannot matter: bitwise.)
    for i, p in enumerate(ALL):
        for j in range(2):
            expect = gA[2 + 2 * i + j] + gC[2 + 2 * i + j]
            assert torch.equal(pA2[p][j].grad, expect), f"layer-1 LoRA {p} grad != A's + C's"
    for i, p in enumerate(caseB.lora):
        for j in range(2):
            assert torch.equal(pB2[p][j].grad, gB[2 + 2 * i + j]), f"layer-2 LoRA {p} grad differs"
    # And a repeated forward/backward of A reproduces the first one bitwise.
    xA3, wA3, _, lwA3, leavesA3 = _graph_inputs(inA, ALL)
    gA3 = torch.autograd.grad(moetune.moe_experts(layer1, xA3, inA.ids, wA3, lora=lwA3), leavesA3, inA.dout)
    for a, b in zip(gA, gA3):
        assert torch.equal(a, b)


def test_retain_graph_backward_twice():
    case = Case("rg", 8, 40, 24, 5, 2, 4, ALL)
    inp = make_inputs(case, 44)
    experts = make_experts(inp)
    x, w, params, lw, leaves = _graph_inputs(inp, ALL)
    out = moetune.moe_experts(experts, x, inp.ids, w, lora=lw)
    g1 = torch.autograd.grad(out, leaves, inp.dout, retain_graph=True)
    g2 = torch.autograd.grad(out, leaves, inp.dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("activations", ["save", "recompute"])
def test_gradient_checkpointing(use_reentrant, activations):
    case = Case("ckpt", 16, 40, 24, 6, 2, 4, ALL, F32, I64, F32, "skewed")
    inp = make_inputs(case, 51)
    experts = make_experts(inp, activations=activations)

    def run(ckpt: bool):
        x = inp.x.clone().requires_grad_(True)
        w = inp.w.clone().requires_grad_(True)
        params, lw = fresh_lora(inp, ALL)

        def fn(x_, w_):
            return moetune.moe_experts(experts, x_, inp.ids, w_, lora=lw)

        if ckpt:
            out = torch.utils.checkpoint.checkpoint(fn, x, w, use_reentrant=use_reentrant)
        else:
            out = fn(x, w)
        (out * inp.dout).sum().backward()
        return Result(
            out.detach(), x.grad, w.grad, {p: params[p][0].grad for p in ALL}, {p: params[p][1].grad for p in ALL}
        )

    plain, ck = run(False), run(True)
    assert_results_equal(plain, ck, f"checkpoint(use_reentrant={use_reentrant})")
    compare(ck, reference(inp), inp)


def test_expert_mask():
    case = Case("mask", 24, 40, 24, 8, 3, 4, ALL, F32, I64, F32, "uniform")
    inp = make_inputs(case, 61)
    experts = make_experts(inp)
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    res = run_engine(experts, inp, expert_mask=mask)
    ref = reference(inp, expert_mask=mask)
    compare(res, ref, inp, expert_mask=mask)  # also: masked experts' LoRA grads are exactly zero
    masked_slots = ~mask[inp.ids.long()]
    assert masked_slots.any()
    assert torch.count_nonzero(res.dtopk_weights[masked_slots]) == 0
    for p in ALL:
        for e in (1, 4, 6):
            assert torch.count_nonzero(res.dA[p][e]) == 0 and torch.count_nonzero(res.dB[p][e]) == 0
    # All-True mask == no mask; all-False mask == zero output and zero grads.
    assert_results_equal(
        run_engine(experts, inp, expert_mask=torch.ones(8, dtype=torch.bool)),
        run_engine(experts, inp),
        "all-True mask vs no mask",
    )
    none = run_engine(experts, inp, expert_mask=torch.zeros(8, dtype=torch.bool))
    assert torch.count_nonzero(none.out) == 0 and torch.count_nonzero(none.dx) == 0
    assert torch.count_nonzero(none.dtopk_weights) == 0
    assert all(torch.count_nonzero(g) == 0 for g in list(none.dA.values()) + list(none.dB.values()))
