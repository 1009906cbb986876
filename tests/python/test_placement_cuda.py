"""The placement GPU path on a real CUDA device (skipped without one; run on the GPU test machine):
the CPU-stand-in cases of test_placement_*.py on CUDA tensors, plus what only CUDA has: the
engine's buffers page-locked in place (and released with the experts), copies on the copy
stream overlapping compute, grouped_mm's fast path, and no host sync in a steady-state call
except the one that fetches the routing counts.
"""

from __future__ import annotations

import gc
import inspect
import warnings

import pytest
import torch
from op_cases import ALL, BF16, F32, I64, TOL_C, Case, get_ctx, make_inputs, moetune
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
    to_device,
)
from quant_reference import dequantized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU test machine)")

CASE = Case("cu", 40, 128, 64, 8, 2, 16, ALL, BF16, I64, F32, "skewed")
CASE_F32 = Case("cu32", 33, 64, 96, 6, 3, 4, ALL, F32, I64, BF16)


def _setup(case, seed, plan, **kw):
    inp = make_inputs(case, seed)
    st = make_setup(inp, "cuda", resident=resident_set(plan, case.E), **kw)
    return inp, to_device(inp, "cuda"), st


@pytest.mark.parametrize("fmt,group", FORMATS + [("int4", 64)], ids=lambda v: str(v))
def test_decode_on_cuda_is_exact(fmt, group):
    P = placement()
    from moetune.placement import _engine

    g = torch.Generator().manual_seed(1)
    W = [
        torch.randn(5, 96, 128, generator=g).bfloat16(),
        torch.randn(5, 96, 128, generator=g).bfloat16(),
        torch.randn(5, 128, 96, generator=g).bfloat16(),
    ]
    ex = moetune.MoEExperts(get_ctx(), *W, weight_format=fmt, group_size=group)
    pf = P.format_of(ex)
    host = pf.host_views(_engine.packed_buffers(ex))
    for pi, proj in enumerate(("gate", "up", "down")):
        raw = {n: host[n][[4, 1]].cuda() for n in pf.buffer_names(proj)}
        got = pf.decode(proj, raw)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), dequantized(W[pi][[4, 1]], fmt, group or 0)), f"{fmt} {proj}"


@pytest.mark.parametrize("plan", ["cpu", "streamed", "resident", "mixed"])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
def test_placements_on_cuda_match_reference(fmt, group, plan):
    for case, seed in ((CASE, 11), (CASE_F32, 12)):
        inp, dinp, st = _setup(case, seed, plan, weight_format=fmt, group_size=group)
        res = run_placed(st, dinp, plan)
        assert res.out.device.type == "cuda" and res.dx.device.type == "cuda"
        ref = reference(dq_inputs(inp, fmt, group))
        if plan == "cpu":
            assert_equal(res, run_moe_experts(st.experts, dinp), "all-CPU plan vs moe_experts (CUDA inputs)")
            compare(res, ref, inp, table=TOL_C)
        else:
            compare(res, ref, inp)


def test_gpt_oss_mixed_on_cuda():
    case = Case("cu_go", 30, 64, 48, 6, 2, 8, ALL, F32, I64, F32, "uniform")
    inp, biases, limit, st = gptoss_setup(case, 61, "cuda", resident=resident_set("mixed", case.E))
    res = run_placed(st, to_device(inp, "cuda"), "mixed")
    compare(res, gptoss_reference(inp, biases, limit, gpu_experts=[e for e in range(case.E) if e % 3]), inp)


def test_cuda_matches_cpu_stand_in():
    """The same plan on CUDA and on the CPU stand-in: the same math, so bf16-rounding close."""
    inp = make_inputs(CASE, 13)
    cpu = run_placed(make_setup(inp, "cpu", resident=resident_set("mixed", CASE.E)), inp, "mixed")
    cu = run_placed(make_setup(inp, "cuda", resident=resident_set("mixed", CASE.E)), to_device(inp, "cuda"), "mixed")
    for name in ("out", "dx", "dtopk_weights"):
        a, b = getattr(cu, name).cpu().float(), getattr(cpu, name).float()
        assert (a - b).abs().max() <= 4 * 2.0**-8 * b.abs().max(), name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_and_keep_slot_on_cuda(use_reentrant):
    inp, dinp, st = _setup(CASE, 21, "mixed", keep_bytes=1 << 30)
    plain = run_placed(st, dinp, "mixed")
    before = st.gpu.streamer.bytes_copied
    ck = run_placed(st, dinp, "mixed", ckpt=use_reentrant)
    assert_equal(plain, ck, "checkpointed vs plain on CUDA")
    one = st.gpu.streamer.bytes_copied - before
    assert one > 0 and st.runtime.keep.used_bytes == 0


def test_engine_buffers_page_locked_in_place_and_released():
    P = placement()
    from moetune.placement import _engine

    inp = make_inputs(CASE, 31)
    ex = moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down)
    rt = P.GpuRuntime("cuda", P.GpuOptions())
    gpu = P.GpuExperts(rt, ex)
    views = _engine.packed_buffers(ex)  # keep the engine memory alive past the MoEExperts object
    assert gpu.registration.failed == [] and gpu.registration.nbytes >= sum(t.numel() for t in gpu.host.values())
    for name in gpu.fmt.names:
        assert views[name].is_pinned(), f"{name} is not page-locked"
    assert P.GpuExperts(rt, ex).registration is gpu.registration  # one registration per experts object
    # Only the engine's own pages are locked: copies of unrelated small tensors (which may share a
    # heap page with nothing of the engine's now) still work both ways.
    for n in range(1, 200, 7):
        t = torch.randn(n)
        assert torch.equal(t.cuda().cpu(), t)
    del gpu, ex
    gc.collect()
    for name in views:
        assert not views[name].is_pinned(), f"{name} is still page-locked after its experts were dropped"


def test_grouped_mm_fast_path_is_used():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped_mm's fast path needs compute capability 9.0+")
    inp, dinp, st = _setup(CASE, 41, "mixed", gemm="grouped")
    run_placed(st, dinp, "mixed")
    assert st.runtime.gemm.calls["grouped"] > 0 and st.runtime.gemm.calls["per_expert"] == 0


def _segment_timeline(monkeypatch, st, dinp, plan):
    """(copy intervals, compute intervals) in ms from a common start, for one forward."""
    from moetune.placement import op as OP

    compute, records = [], []
    orig_fwd, orig_finish = OP.forward_segment, OP._Timing.finish

    def timed(*a, **k):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y = orig_fwd(*a, **k)
        e.record()
        compute.append((s, e))
        return y

    def finish(self, cpu_seconds):
        records.append(self)
        orig_finish(self, cpu_seconds)

    monkeypatch.setattr(OP, "forward_segment", timed)
    monkeypatch.setattr(OP._Timing, "finish", finish)
    t0 = torch.cuda.Event(enable_timing=True)
    t0.record()
    P = placement()
    planner = P.FixedPlanner(plan_fn(plan))
    with torch.no_grad():
        P.placed_moe_experts(st.experts, dinp.x, dinp.ids, dinp.w, None, planner=planner, gpu=st.gpu)
    torch.cuda.synchronize()
    monkeypatch.setattr(OP, "forward_segment", orig_fwd)
    monkeypatch.setattr(OP._Timing, "finish", orig_finish)
    P.flush_timings(st.runtime)
    (rec,) = records
    ms = lambda pairs: [(t0.elapsed_time(a), t0.elapsed_time(b)) for a, b in pairs]  # noqa: E731
    return ms(rec.copies), ms(compute), planner


def test_copies_overlap_compute(monkeypatch):
    """Streamed chunk i + 1 is copied (copy stream) while chunk i is computed (compute stream)."""
    # 4 experts of 4096 rows per chunk: each chunk's copy and compute (~1 ms each) outlast the host's
    # launches for a chunk (~0.5 ms of Python), so the GPU, not the host, sets the pace.
    case = Case("ovl", 16384, 2048, 768, 32, 8, 16, (), BF16, I64, F32, "uniform")
    inp = make_inputs(case, 51)
    st = make_setup(inp, "cuda", chunk_experts=4)  # 8 chunks, triple buffering (the default)
    dinp = to_device(inp, "cuda")
    _segment_timeline(monkeypatch, st, dinp, "streamed")  # warm-up (allocator, probe)
    copies, compute, planner = _segment_timeline(monkeypatch, st, dinp, "streamed")
    chunks = case.E // 4
    assert len(copies) == len(compute) == chunks
    busy = lambda spans: sum(b - a for a, b in spans)  # noqa: E731
    # Overlap: the GPU part of the call (first copy to last compute) takes clearly less than its
    # copies and computes one after the other would.
    span = max(b for _, b in compute) - min(a for a, _ in copies)
    assert span < 0.85 * (busy(copies) + busy(compute)), (
        f"copies do not overlap compute: span {span:.2f} ms, copies {busy(copies):.2f} ms, compute "
        f"{busy(compute):.2f} ms; copies {copies} compute {compute}"
    )
    t = planner.observed[-1][2]
    gbps = st.gpu.fmt.stored_bytes_per_expert * case.E / t["copy"] / 1e9
    print(f"copy {t['copy'] * 1e3:.2f} ms for {case.E} experts: {gbps:.1f} GB/s; gpu {t['gpu'] * 1e3:.2f} ms")
    assert gbps > 5, f"host->device copies at {gbps:.1f} GB/s: not from page-locked memory?"


def test_no_host_sync_but_the_counts():
    P = placement()
    from moetune.placement import op as OP

    inp, dinp, st = _setup(CASE, 61, "mixed")
    planner = P.FixedPlanner(lambda k, c, r: torch.where(r, int(P.Where.GPU_RESIDENT), int(P.Where.GPU_STREAMED)))
    for _ in range(2):  # warm-up: the GEMM probe, allocator pools
        run_placed(st, dinp, "mixed", planner=planner)
    src, first = inspect.getsourcelines(OP._routing_counts)
    counts_lines = {first + i for i, line in enumerate(src) if ".cpu()" in line}
    from op_cases import fresh_lora

    params, _ = fresh_lora(dinp, ALL)
    lw = moetune.LoraWeights(**params, scaling=dinp.scaling)
    x = dinp.x.clone().requires_grad_(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = P.placed_moe_experts(st.experts, x, dinp.ids, dinp.w, lw, planner=planner, gpu=st.gpu)
            out.backward(dinp.dout)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's own "sync debug mode is a prototype feature" notice also says "synchroniz": only the
    # reports of a synchronizing operation count.
    syncs = [
        (w.filename, w.lineno)
        for w in caught
        if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)
    ]
    assert syncs, "sync debug mode reported nothing: the check would be vacuous"
    others = [s for s in syncs if not (s[0].endswith("placement/op.py") and s[1] in counts_lines)]
    assert not others, f"host syncs besides the routing counts: {others}"


def test_sync_free_path_makes_no_host_sync():
    """A layer whose pool holds every expert, planned per step (a steady planner): forward and
    backward without a single host sync (not even the routing counts), results equal to the
    planned all-resident path's, and the call's counts observed afterwards."""
    P = placement()
    inp, dinp, st = _setup(CASE, 62, "resident")
    fast = P.FixedPlanner(plan_fn("resident"), steady=True)
    planned = P.FixedPlanner(plan_fn("resident"))
    for _ in range(2):  # warm-up: the GEMM probe, allocator pools, pinned index uploads
        run_placed(st, dinp, "resident", planner=fast)
    assert_equal(
        run_placed(st, dinp, "resident", planner=fast),
        run_placed(st, dinp, "resident", planner=planned),
        "sync-free vs planned on CUDA",
    )
    from op_cases import fresh_lora

    params, _ = fresh_lora(dinp, ALL)
    lw = moetune.LoraWeights(**params, scaling=dinp.scaling)
    x = dinp.x.clone().requires_grad_(True)
    n_obs = len(fast.observed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = P.placed_moe_experts(st.experts, x, dinp.ids, dinp.w, lw, planner=fast, gpu=st.gpu)
        out.backward(dinp.dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    P.flush_timings(st.runtime)
    assert fast.calls == 0 and len(fast.observed) == n_obs + 2
    counts = torch.bincount(inp.ids.flatten(), minlength=CASE.E)
    assert all(torch.equal(p.counts, counts) for _, p, _ in fast.observed[n_obs:])


def test_sync_free_bad_ids_give_nan_then_an_error():
    """The error comes when the call is observed: at the call's own end when its GPU work is done
    by then (small calls), else at a later call or flush_timings, the outputs of the tokens with
    bad ids being NaN meanwhile (never a plausible wrong value)."""
    P = placement()
    inp, dinp, st = _setup(CASE, 63, "resident")
    fast = P.FixedPlanner(plan_fn("resident"), steady=True)
    bad = dinp.ids.clone()
    bad[3, 1] = CASE.E
    out = None
    with pytest.raises(ValueError, match=r"1 expert id\(s\) outside \[0, 8\)"):
        out = P.placed_moe_experts(st.experts, dinp.x, bad, dinp.w, None, planner=fast, gpu=st.gpu)
        P.flush_timings(st.runtime)
    if out is not None:  # the call returned before its GPU work was observed
        nan_rows = torch.isnan(out.float()).any(1).cpu()
        assert nan_rows.tolist() == [t == 3 for t in range(CASE.T)]
