"""The placed op (moetune.placement.placed_moe_experts) on the CPU stand-in device.

Outputs, dx, d topk_weights and every LoRA gradient must not depend on placement beyond bf16
rounding: all-CPU (bit-identical to moe_experts), all-GPU streamed, all-GPU resident and mixed
plans, bf16 / int8 / int4 weights, SwiGLU and gpt-oss with biases, each against the fp32
reference (placement_cases.TOL_C_GPU); and the training semantics: checkpointing (reentrant and
not; the recompute sees its forward's plan; the keep slot), gradient accumulation, retained
graphs, several layers in flight, grads only where required, AdamW steps.
"""

from __future__ import annotations

import dataclasses

import pytest
import reference as R
import torch
from op_cases import ALL, BF16, F32, I32, I64, TOL_C, Case, Result, fresh_lora, get_ctx, make_inputs, moetune
from placement_cases import (
    FORMATS,
    assert_equal,
    compare,
    dq_inputs,
    gptoss_reference,
    gptoss_setup,
    make_setup,
    placement,
    plan_fn,
    reference,
    resident_set,
    run_moe_experts,
    run_placed,
)

CASE = Case("op", 24, 64, 48, 8, 2, 8, ALL, BF16, I64, F32, "skewed")
CASE_F32 = Case("op32", 19, 64, 32, 6, 3, 4, ALL, F32, I32, BF16)


def _setup(case=CASE, seed=1, plan="mixed", **kw):
    inp = make_inputs(case, seed)
    return inp, make_setup(inp, resident=resident_set(plan, case.E), **kw)


@pytest.mark.parametrize("fmt,group", [("bf16", None), ("int8", None)], ids=["bf16", "int8"])
@pytest.mark.parametrize("case", [CASE, CASE_F32], ids=str)
def test_all_cpu_plan_is_todays_path(case, fmt, group):
    inp, st = _setup(case, 3, "mixed", weight_format=fmt, group_size=group)
    loaded = st.gpu.streamer.bytes_copied  # the resident experts' loads
    res = run_placed(st, inp, "cpu")
    assert_equal(res, run_moe_experts(st.experts, inp), "all-CPU plan vs moe_experts")
    assert sum(st.runtime.gemm.calls.values()) == 0 and st.gpu.streamer.bytes_copied == loaded


@pytest.mark.parametrize("plan", ["streamed", "resident", "mixed"])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
def test_placements_match_reference(fmt, group, plan):
    for case, seed in ((CASE, 11), (CASE_F32, 12)):
        inp, st = _setup(case, seed, plan, weight_format=fmt, group_size=group)
        res = run_placed(st, inp, plan)
        ref = reference(dq_inputs(inp, fmt, group))
        compare(res, ref, inp)
        # The all-CPU plan of the same setup meets the engine's own (tighter) table.
        compare(run_placed(st, inp, "cpu"), ref, inp, table=TOL_C)
        copied = st.gpu.streamer.bytes_copied
        if plan == "resident":
            assert copied == st.gpu.fmt.stored_bytes_per_expert * case.E  # the loads only
        else:
            assert copied > st.gpu.fmt.stored_bytes_per_expert * int(resident_set(plan, case.E).sum())


@pytest.mark.parametrize("fmt", [("bf16", None), ("int4", 32)], ids=["bf16", "int4g32"])
def test_gpt_oss_mixed_plan(fmt):
    case = Case("go_mix", 18, 64, 48, 6, 2, 8, ALL, F32, I64, F32, "uniform")
    inp, biases, limit, st = gptoss_setup(case, 61, fmt=fmt, resident=resident_set("mixed", case.E))
    gpu_experts = [e for e in range(case.E) if e % 3 != 0]  # plan_fn("mixed")
    compare(run_placed(st, inp, "mixed"), gptoss_reference(inp, biases, limit, fmt, gpu_experts), inp)
    assert_equal(run_placed(st, inp, "cpu"), run_moe_experts(st.experts, inp), "gpt-oss all-CPU")


def test_mixed_plan_uses_every_placement_and_lora_grads_add():
    inp, st = _setup(CASE, 5, "mixed")
    res = run_placed(st, inp, "mixed")
    counts = torch.bincount(inp.ids.flatten(), minlength=CASE.E)
    where = plan_fn("mixed")(None, counts, st.gpu.resident_mask())
    W = placement().Where
    assert {int(W.CPU), int(W.GPU_RESIDENT), int(W.GPU_STREAMED)} <= set(where[counts > 0].tolist())
    # Each expert's LoRA gradient comes from the one side that ran it: compare per side.
    cpu_only = run_placed(st, inp, "cpu")
    for p in ALL:
        for kind in ("dA", "dB"):
            g, c = getattr(res, kind)[p], getattr(cpu_only, kind)[p]
            for e in range(CASE.E):
                if where[e] == int(W.CPU):
                    assert torch.equal(g[e], c[e]), f"{kind}.{p}[{e}] (CPU expert) differs from the CPU engine's"
                elif counts[e] > 0:
                    assert not torch.equal(g[e], c[e]), f"{kind}.{p}[{e}] (GPU expert) is bit-equal to the CPU's"


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("plan", ["streamed", "mixed"])
def test_checkpointing(plan, use_reentrant):
    inp, st = _setup(CASE, 21, plan)
    plain = run_placed(st, inp, plan)
    P = placement()
    planner = P.FixedPlanner(plan_fn(plan))
    ck = run_placed(st, inp, plan, ckpt=use_reentrant, planner=planner)
    assert_equal(plain, ck, f"checkpoint(use_reentrant={use_reentrant}) vs plain")
    assert planner.calls == 1, "the recompute asked the planner again instead of reusing its forward's plan"
    phases = [t["phase"] for _, _, t in planner.observed]
    assert phases == ["forward", "recompute", "backward"], phases
    assert not st.gpu._memo, "the plan memo kept the finished call's plan"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_keep_slot_between_recompute_and_backward(use_reentrant):
    inp = make_inputs(CASE, 22)
    base = None
    copied = {}
    for keep in (0, 1 << 30):
        st = make_setup(inp, keep_bytes=keep)
        res = run_placed(st, inp, "streamed", ckpt=use_reentrant)
        copied[keep] = st.gpu.streamer.bytes_copied
        assert st.runtime.keep.used_bytes == 0 and st.gpu._keep is None, "the keep slot was not released"
        if base is None:
            base = res
        else:
            assert_equal(base, res, "kept vs re-streamed weights")
    one_pass = st.gpu.fmt.stored_bytes_per_expert * int((torch.bincount(inp.ids.flatten(), minlength=CASE.E) > 0).sum())
    assert copied[0] == 3 * one_pass  # forward, recompute, backward
    assert copied[1 << 30] == 2 * one_pass  # the backward used the recompute's weights


def test_keep_budget_too_small_streams_again():
    inp = make_inputs(CASE, 23)
    st = make_setup(inp, keep_bytes=1)
    run_placed(st, inp, "streamed", ckpt=False)
    one_pass = st.gpu.fmt.stored_bytes_per_expert * int((torch.bincount(inp.ids.flatten(), minlength=CASE.E) > 0).sum())
    assert st.gpu.streamer.bytes_copied == 3 * one_pass and st.runtime.keep.used_bytes == 0


@pytest.mark.parametrize("plan", ["streamed", "mixed"])
def test_gradient_accumulation(plan):
    inp1, st = _setup(CASE, 31, plan)
    inp2 = dataclasses.replace(
        make_inputs(CASE, 32),
        gate=inp1.gate,
        up=inp1.up,
        down=inp1.down,
        lora_params=inp1.lora_params,
        scaling=inp1.scaling,
    )
    params, _ = fresh_lora(inp1, ALL)
    r1 = run_placed(st, inp1, plan)
    r2 = run_placed(st, inp2, plan)
    run_placed(st, inp1, plan, params=params)
    run_placed(st, inp2, plan, params=params)
    for p in ALL:
        assert torch.equal(params[p][0].grad, r1.dA[p] + r2.dA[p]), f"dA.{p} does not accumulate"
        assert torch.equal(params[p][1].grad, r1.dB[p] + r2.dB[p]), f"dB.{p} does not accumulate"


def test_adamw_steps_agree_across_placements():
    """Four AdamW steps from the same LoRA: every placement stays as close to the fp32-reference
    trajectory as the CPU engine does (AdamW normalises each step to ~lr, so elements whose gradient
    is at the rounding level move differently under any bf16 rounding: the CPU engine itself is a
    few percent of the motion away from the fp32 trajectory)."""
    inp = make_inputs(CASE, 41)
    P = placement()

    def train(step_grads):
        params, _ = fresh_lora(inp, ALL)
        opt = torch.optim.AdamW([t for p in ALL for t in params[p]], lr=1e-2, weight_decay=0.01)
        for _ in range(4):
            opt.zero_grad()
            step_grads(params)
            opt.step()
        return torch.cat([t.detach().flatten() for p in ALL for t in params[p]]), params

    def ref_grads(params):
        r = R.reference_forward_backward(
            inp.x,
            inp.ids,
            inp.w,
            inp.gate,
            inp.up,
            inp.down,
            {p: (params[p][0].detach(), params[p][1].detach()) for p in ALL},
            inp.scaling,
            inp.dout,
        )
        for p in ALL:
            params[p][0].grad, params[p][1].grad = r["dA"][p].clone(), r["dB"][p].clone()

    ref, _ = train(ref_grads)
    p0 = torch.cat([t.flatten() for p in ALL for t in inp.lora_params[p]]).float()
    moved = (ref - p0).norm()
    dist = {}
    for plan in ("cpu", "streamed", "mixed"):
        st = make_setup(inp, resident=resident_set(plan, CASE.E))
        final, params = train(lambda params: run_placed(st, inp, plan, params=params))
        dist[plan] = ((final - ref).norm() / moved).item()
        with torch.no_grad():
            out = P.placed_moe_experts(
                st.experts,
                inp.x,
                inp.ids,
                inp.w,
                moetune.LoraWeights(**params, scaling=inp.scaling),
                planner=P.FixedPlanner(plan_fn(plan)),
                gpu=st.gpu,
            )
        ref_out = R.reference_forward_backward(
            inp.x,
            inp.ids,
            inp.w,
            inp.gate,
            inp.up,
            inp.down,
            {p: (params[p][0].detach(), params[p][1].detach()) for p in ALL},
            inp.scaling,
            inp.dout,
        )["out"]
        compare_out = (out.float() - ref_out).abs().max() / ref_out.abs().max()
        assert compare_out <= 13 * 2.0**-8, f"{plan}: output after training off by {compare_out:.3g}"
    assert 0 < dist["cpu"] <= 0.05, dist
    for plan in ("streamed", "mixed"):
        assert dist[plan] <= 2 * dist["cpu"], f"{plan} drifts from the fp32 trajectory more than the CPU engine: {dist}"


def test_retained_graph_backward_twice():
    inp, st = _setup(CASE, 51, "mixed")
    P = placement()
    x = inp.x.clone().requires_grad_(True)
    params, lw = fresh_lora(inp, ALL)
    leaves = [x] + [t for p in ALL for t in params[p]]
    out = P.placed_moe_experts(st.experts, x, inp.ids, inp.w, lw, planner=P.FixedPlanner(plan_fn("mixed")), gpu=st.gpu)
    g1 = torch.autograd.grad(out, leaves, inp.dout, retain_graph=True)
    g2 = torch.autograd.grad(out, leaves, inp.dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_grads_only_where_required_and_no_grad():
    inp, st = _setup(CASE_F32, 52, "mixed")
    P = placement()
    planner = P.FixedPlanner(plan_fn("mixed"))
    params, _ = fresh_lora(inp, ALL)
    params["gate"][0].requires_grad_(False)
    lw = moetune.LoraWeights(**params, scaling=inp.scaling)
    x, w = inp.x.clone(), inp.w.clone()
    out = P.placed_moe_experts(st.experts, x, inp.ids, w, lw, planner=planner, gpu=st.gpu)
    out.backward(inp.dout)
    assert x.grad is None and w.grad is None and params["gate"][0].grad is None
    full = run_placed(st, inp, "mixed")
    assert torch.equal(params["gate"][1].grad, full.dB["gate"])
    for p in ("up", "down"):
        assert torch.equal(params[p][0].grad, full.dA[p]) and torch.equal(params[p][1].grad, full.dB[p])
    with torch.no_grad():
        o = P.placed_moe_experts(st.experts, inp.x, inp.ids, inp.w, lw, planner=planner, gpu=st.gpu)
    assert not o.requires_grad and torch.equal(o, full.out)


def test_lora_param_dtypes():
    inp, st = _setup(CASE, 53, "mixed")
    inp.lora_params = {p: (a.to(BF16), b.to(F32)) for p, (a, b) in inp.lora_params.items()}
    res = run_placed(st, inp, "mixed")
    for p in ALL:
        assert res.dA[p].dtype == BF16 and res.dB[p].dtype == F32
    compare(res, reference(inp), inp)


def test_several_layers_in_flight():
    P = placement()
    inA, inB = make_inputs(CASE, 61), make_inputs(CASE_F32, 62)
    stA = make_setup(inA, resident=resident_set("mixed", CASE.E))
    exB = moetune.MoEExperts(get_ctx(), inB.gate, inB.up, inB.down)
    gB = P.GpuExperts(stA.runtime, exB, layer_key="B")  # same runtime: shared store and streamer
    gB.set_resident(resident_set("mixed", CASE_F32.E))
    from placement_cases import Setup

    stB = Setup(exB, stA.runtime, gB)
    sepA, sepB = run_placed(stA, inA, "mixed"), run_placed(stB, inB, "mixed")
    xs = [i.x.clone().requires_grad_(True) for i in (inA, inB)]
    pA, lwA = fresh_lora(inA, ALL)
    pB, lwB = fresh_lora(inB, ALL)
    planner = P.FixedPlanner(plan_fn("mixed"))
    oA = P.placed_moe_experts(stA.experts, xs[0], inA.ids, inA.w, lwA, planner=planner, gpu=stA.gpu)
    oB = P.placed_moe_experts(exB, xs[1], inB.ids, inB.w, lwB, planner=planner, gpu=gB)
    (oB.float() * inB.dout.float()).sum().backward()
    (oA.float() * inA.dout.float()).sum().backward()
    assert torch.equal(oA.detach(), sepA.out) and torch.equal(oB.detach(), sepB.out)
    assert torch.equal(xs[0].grad, sepA.dx) and torch.equal(xs[1].grad, sepB.dx)
    for p in ALL:
        assert torch.equal(pA[p][0].grad, sepA.dA[p]) and torch.equal(pB[p][1].grad, sepB.dB[p])


def test_plan_memo_never_hands_a_plan_to_another_planner():
    """The plan memo is keyed by id(planner): its entry holds the planner, so a planner freed after
    its call (an all-CPU call has no backward to forget the plan) cannot be replaced by a new one at
    the same address that would then get the old plan (seen as a flaky all-CPU plan)."""
    import gc
    import weakref

    inp, st = _setup(CASE, 71, "mixed")
    P = placement()
    counts = torch.bincount(inp.ids.reshape(-1).to(torch.int64), minlength=CASE.E)
    first = P.FixedPlanner(plan_fn("cpu"))
    ref = weakref.ref(first)
    plan, _ = st.gpu.plan(first, "layer", counts)
    assert (plan.where == int(P.Where.CPU)).all()
    del first
    gc.collect()
    assert ref() is not None, "the memo must keep its planner (and so its id) alive"
    resident = st.gpu.resident_mask()
    assert resident.any()
    for _ in range(64):  # new planners, some possibly at freed addresses: each gets its own plan
        other = P.FixedPlanner(lambda k, c, r: torch.where(r, int(P.Where.GPU_RESIDENT), int(P.Where.CPU)))
        assert (st.gpu.plan(other, "layer", counts)[0].where == int(P.Where.GPU_RESIDENT)).eq(resident).all()


def test_observed_timings():
    inp, st = _setup(CASE, 71, "mixed")
    P = placement()
    planner = P.FixedPlanner(plan_fn("mixed"))
    run_placed(st, inp, "mixed", planner=planner)
    run_placed(st, inp, "cpu")
    (k1, plan, fwd), (_, _, bwd) = planner.observed
    assert k1 == "layer" and isinstance(plan, P.LayerPlan)
    for t, phase in ((fwd, "forward"), (bwd, "backward")):
        assert set(t) == {"cpu", "gpu", "copy", "wall", "phase", "copy_bytes"} and t["phase"] == phase
        assert t["cpu"] > 0 and t["gpu"] > 0 and t["copy"] > 0 and t["wall"] >= t["gpu"]
        # The streamed experts' stored bytes, copied again in backward (no keep slot here).
        n_streamed = int(((plan.where == int(P.Where.GPU_STREAMED)) & (plan.counts > 0)).sum())
        assert t["copy_bytes"] == n_streamed * st.gpu.fmt.stored_bytes_per_expert > 0
    resident_only = P.FixedPlanner(lambda k, c, r: torch.where(r, int(P.Where.GPU_RESIDENT), int(P.Where.CPU)))
    run_placed(st, inp, "mixed", planner=resident_only)
    t = resident_only.observed[0][2]
    assert t["copy"] == 0.0 and t["copy_bytes"] == 0 and t["gpu"] > 0 and t["cpu"] > 0


def test_bad_input():
    inp, st = _setup(CASE, 81, "mixed")
    P = placement()
    fp = P.FixedPlanner(plan_fn("mixed"))
    call = lambda **kw: P.placed_moe_experts(
        **{
            **dict(
                experts=st.experts,
                x=inp.x,
                topk_ids=inp.ids,  # noqa: E731
                topk_weights=inp.w,
                planner=fp,
                gpu=st.gpu,
            ),
            **kw,
        }
    )
    bad = inp.ids.clone()
    bad[3, 1] = CASE.E
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        call(topk_ids=bad)
    with pytest.raises(ValueError, match="other experts"):
        call(experts=moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down))
    with pytest.raises(ValueError, match=r"x must be \[T, H=64\]"):
        call(x=inp.x[:, :10])
    with pytest.raises(ValueError, match="topk_weights"):
        call(topk_weights=inp.w[:, :1])
    not_resident = P.FixedPlanner(lambda k, c, r: P.Where.GPU_RESIDENT)
    with pytest.raises(ValueError, match="GPU_RESIDENT but they are not resident"):
        call(planner=not_resident)
    with pytest.raises(TypeError, match="LayerPlan"):
        call(planner=type("Bad", (), {"plan": lambda self, *a: "cpu", "observe": lambda self, *a: None})())
    with pytest.raises(ValueError, match="unknown placement"):
        call(planner=P.FixedPlanner(lambda k, c, r: torch.full((CASE.E,), 7, dtype=torch.int8)))
    # Still works afterwards.
    assert_equal(run_placed(st, inp, "mixed"), run_placed(st, inp, "mixed"), "after errors")


def test_residency_change_between_forward_and_backward():
    """A residency refresh while a backward is still to come: the backward streams the experts
    that left the pool (and finds moved ones in their new slots); results as without the change."""
    inp, st = _setup(CASE, 91, "resident")
    P = placement()
    want = run_placed(st, inp, "resident")
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    params, lw = fresh_lora(inp, ALL)
    planner = P.FixedPlanner(plan_fn("resident"))
    out = P.placed_moe_experts(st.experts, x, inp.ids, w, lw, planner=planner, gpu=st.gpu)
    copied = st.gpu.streamer.bytes_copied
    st.gpu.set_resident(torch.arange(CASE.E) % 2 == 0)  # half leave; the rest move to new slots
    (out.float() * inp.dout.float()).sum().backward()
    got = Result(out.detach(), x.grad, w.grad, {p: params[p][0].grad for p in ALL}, {p: params[p][1].grad for p in ALL})
    compare(got, reference(inp), inp)
    assert torch.equal(got.out, want.out)
    for name in ("dx", "dtopk_weights"):
        a, b = getattr(got, name).float(), getattr(want, name).float()
        assert (a - b).abs().max() <= 2 * 2.0**-8 * b.abs().max(), name
    assert st.gpu.streamer.bytes_copied > copied + CASE.E // 2 * st.gpu.fmt.stored_bytes_per_expert  # loads + streams


def test_apply_residency_shrinks_first():
    P = placement()
    inA = make_inputs(CASE, 92)
    stA = make_setup(inA)
    per = stA.gpu.fmt.decoded_bytes_per_expert
    rt = P.GpuRuntime("cpu", P.GpuOptions(resident_budget_bytes=6 * per))
    gA = P.GpuExperts(rt, stA.experts, layer_key="A")
    gB = P.GpuExperts(rt, moetune.MoEExperts(get_ctx(), inA.gate, inA.up, inA.down), layer_key="B")
    gA.set_resident([0, 1, 2, 3, 4])
    wanted = {"A": torch.arange(CASE.E) < 1, "B": torch.arange(CASE.E) < 5}
    rt.apply_residency([gB, gA], lambda key: wanted[key])  # B first would exceed the budget
    assert gA.pool.experts() == [0] and gB.pool.experts() == [0, 1, 2, 3, 4] and rt.store.used_bytes == 6 * per
