"""The placed op's sync-free path (python/moetune/placement/op.py, step 0) on the CPU stand-in.

A layer whose pool holds every expert, with a planner that reports it steady, computes every
expert from its resident copy with group sizes that stay on the device: no plan, no host counts.
Its results must equal the planned all-resident path's bit for bit (same GEMMs per expert, empty
groups included), with checkpointing and with the pool's slots in any order; its observations
carry the call's counts; ids outside [0, E) give NaN for their tokens and then a ValueError
naming them; a pool missing an expert, or a planner that does not report steady, plans per call.
(CUDA: test_placement_cuda.py checks that the path makes no host sync.)
"""

from __future__ import annotations

import pytest
import torch
from op_cases import ALL, BF16, F32, I32, I64, Case, make_inputs
from placement_cases import (
    FORMATS,
    assert_equal,
    compare,
    dq_inputs,
    make_setup,
    placement,
    plan_fn,
    reference,
    run_placed,
)

CASE = Case("sf", 24, 64, 48, 8, 2, 8, ALL, BF16, I64, F32, "skewed")  # skewed: some experts get no rows
CASE_F32 = Case("sf32", 19, 64, 32, 6, 3, 4, ALL, F32, I32, BF16)


def _setup(case, seed, **kw):
    inp = make_inputs(case, seed)
    return inp, make_setup(inp, resident=torch.ones(case.E, dtype=torch.bool), **kw)


def _planners():
    P = placement()
    return P.FixedPlanner(plan_fn("resident"), steady=True), P.FixedPlanner(plan_fn("resident"))


@pytest.mark.parametrize("ckpt", [None, False, True], ids=["plain", "ckpt", "ckpt-reentrant"])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
def test_equals_planned_resident_path(fmt, group, ckpt):
    P = placement()
    for case, seed in ((CASE, 3), (CASE_F32, 4)):
        inp, st = _setup(case, seed, weight_format=fmt, group_size=group)
        fast, planned = _planners()
        got = run_placed(st, inp, "resident", ckpt=ckpt, planner=fast)
        want = run_placed(st, inp, "resident", ckpt=ckpt, planner=planned)
        assert_equal(got, want, f"sync-free vs planned ({case.name}, {fmt})")
        compare(got, reference(dq_inputs(inp, fmt, group)), inp)
        assert fast.calls == 0, "the sync-free path asked the planner for a plan"
        assert planned.calls == 1
        counts = torch.bincount(inp.ids.flatten().long(), minlength=case.E)
        phases = [t["phase"] for _, _, t in fast.observed]
        assert phases == (["forward", "backward"] if ckpt is None else ["forward", "recompute", "backward"])
        for key, plan, t in fast.observed:
            assert key == "layer" and torch.equal(plan.counts, counts)
            assert bool((plan.where == int(P.Where.GPU_RESIDENT)).all())
            assert t["gpu"] > 0 and t["cpu"] == 0 and t["copy_bytes"] == 0


def test_slots_in_any_order():
    """A pool filled in two steps holds the experts out of id order: LoRA rows are gathered and
    their gradients scattered by slot, with the same results."""
    inp = make_inputs(CASE, 5)
    st = make_setup(inp)
    st.runtime.store.budget_bytes *= 2  # room for the old pool while the new one fills: slots kept in order
    st.gpu.set_resident(torch.arange(CASE.E) % 2 == 0)
    st.gpu.set_resident(torch.ones(CASE.E, dtype=torch.bool))  # the odd experts join after the even ones
    assert st.gpu.pool.slot_expert != list(range(CASE.E)) and st.gpu.holds_all()
    fast, planned = _planners()
    assert_equal(
        run_placed(st, inp, "resident", planner=fast), run_placed(st, inp, "resident", planner=planned), "slot order"
    )
    assert fast.calls == 0


def test_falls_back_to_a_plan_per_call():
    inp = make_inputs(CASE, 6)
    P = placement()
    half = make_setup(inp, resident=torch.arange(CASE.E) < CASE.E - 1)  # one expert not resident
    fast = P.FixedPlanner(plan_fn("mixed"), steady=True)
    compare(run_placed(half, inp, "mixed", planner=fast), reference(inp), inp)
    assert fast.calls == 1
    per_expert = make_setup(inp, resident=torch.ones(CASE.E, dtype=torch.bool), gemm="per_expert")
    fast = P.FixedPlanner(plan_fn("resident"), steady=True)
    compare(run_placed(per_expert, inp, "resident", planner=fast), reference(inp), inp)
    assert fast.calls == 1, "per-expert GEMMs need host group sizes: the call must be planned"


def test_ids_outside_the_experts_are_an_error():
    """Raised once the call is observed: on the CPU stand-in at the call's end (its GPU part is
    done by then); on CUDA at a later call or flush_timings, the tokens' outputs NaN meanwhile
    (test_placement_cuda.py)."""
    inp, st = _setup(CASE, 7)
    P = placement()
    fast, _ = _planners()
    bad = inp.ids.clone()
    bad[3, 1] = CASE.E
    bad[5, 0] = -1
    with pytest.raises(ValueError, match=r"layer 'layer': 2 expert id\(s\) outside \[0, 8\)"):
        P.placed_moe_experts(st.experts, inp.x, bad, inp.w, None, planner=fast, gpu=st.gpu)
        P.flush_timings(st.runtime)
    # The layer works afterwards.
    compare(run_placed(st, inp, "resident", planner=fast), reference(inp), inp)


def test_residency_change_before_backward():
    """The pool changes between a sync-free forward and its backward: the backward reads the
    counts (one sync) and streams the experts that left, with the same results."""
    inp, st = _setup(CASE, 8)
    P = placement()
    fast, planned = _planners()
    want = run_placed(st, inp, "resident", planner=planned)
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    from op_cases import fresh_lora

    params, lw = fresh_lora(inp, ALL)
    out = P.placed_moe_experts(st.experts, x, inp.ids, w, lw, planner=fast, gpu=st.gpu)
    st.gpu.set_resident(torch.arange(CASE.E) % 2 == 0)
    (out.float() * inp.dout.float()).sum().backward()
    P.flush_timings(st.runtime)
    assert torch.equal(out.detach(), want.out)
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    compare_dx = (x.grad.float() - want.dx.float()).abs().max()
    assert compare_dx <= 2 * 2.0**-8 * want.dx.float().abs().max()
    assert fast.calls == 0


def test_scheduler_steady_per_step():
    """Scheduler.refresh_steady: steady only when every expert is resident and the plan for the
    last forward routing puts every expert with pairs on the GPU; "cpu" never; "gpu" always once
    resident; no routing seen: not steady."""
    from moetune.placement.cost import CostModel, LayerShape
    from moetune.placement.plan import LayerPlan, Where
    from moetune.placement.scheduler import Scheduler

    E = 16
    model = CostModel(LayerShape(E, 256, 128, 3 * 256 * 128 * 2))
    all_res, half = torch.ones(E, dtype=torch.bool), torch.arange(E) < E // 2
    busy = torch.full((E,), 4096, dtype=torch.int64)
    for mode, want_busy in (("auto", True), ("gpu", True), ("cpu", False)):
        sched = Scheduler(model, mode=mode)
        assert sched.refresh_steady({"L": all_res}) == {"L": False}  # nothing observed yet
        sched.observe("L", LayerPlan.uniform(busy, Where.GPU_RESIDENT), {"phase": "forward", "gpu": 1e-3})
        assert sched.refresh_steady({"L": all_res, "M": all_res}) == {"L": want_busy, "M": False}
        assert sched.steady("L") == want_busy
        assert sched.refresh_steady({"L": half}) == {"L": False} and not sched.steady("L")
    # A machine whose CPU engine is far faster than its GPU: the plan keeps experts on the CPU,
    # so the layer is planned per call.
    fast_cpu = CostModel(LayerShape(E, 256, 128, 3 * 256 * 128 * 2))
    for key in list(fast_cpu.scales):
        if key.startswith("gpu"):
            fast_cpu.scales[key] = 1e4
    sched = Scheduler(fast_cpu, correction=False)
    sched.observe("L", LayerPlan.uniform(busy, Where.GPU_RESIDENT), {"phase": "forward"})
    assert not bool((sched.plan("L", busy, all_res).where != int(Where.CPU)).all())
    assert sched.refresh_steady({"L": all_res}) == {"L": False}
