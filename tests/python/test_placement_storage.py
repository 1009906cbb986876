"""Weights on the GPU side (CPU stand-in device): the resident store's budget and exact accounting,
its pools' contents, the streamer's chunking, staging reuse and copy merging, the GPU layout of a
call's rows and their per-token combination, and the CPU stand-in Device.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import get_ctx, moetune
from placement_cases import placement
from quant_reference import dequantized


def _layer(E=6, H=32, I=16, fmt="bf16", group=None, seed=0, budget_experts=None, chunk=2, buffers=2, key="L"):
    P = placement()
    g = torch.Generator().manual_seed(seed)
    W = [
        torch.randn(E, I, H, generator=g).bfloat16(),
        torch.randn(E, I, H, generator=g).bfloat16(),
        torch.randn(E, H, I, generator=g).bfloat16(),
    ]
    ex = moetune.MoEExperts(get_ctx(), *W, weight_format=fmt, group_size=group)
    fmt_ = P.format_of(ex)
    budget = (E if budget_experts is None else budget_experts) * fmt_.decoded_bytes_per_expert
    rt = P.GpuRuntime(
        "cpu",
        P.GpuOptions(
            resident_budget_bytes=budget,
            stream_buffers=buffers,
            stream_chunk_bytes=chunk * fmt_.stored_bytes_per_expert,
        ),
    )
    return W, ex, rt, P.GpuExperts(rt, ex, layer_key=key)


def _pool_holds(gpu, W, fmt="bf16", group=None):
    for s, e in enumerate(gpu.pool.slot_expert):
        if e < 0:
            continue
        for t, w in zip(gpu.pool.weights, W):
            assert torch.equal(t[s], dequantized(w[e], fmt, group or 0)), f"slot {s} does not hold expert {e}"


@pytest.mark.parametrize("fmt,group", [("bf16", None), ("int4", 32)])
def test_resident_pool_contents_and_exact_accounting(fmt, group):
    W, ex, rt, gpu = _layer(fmt=fmt, group=group)
    per = gpu.fmt.decoded_bytes_per_expert
    assert rt.store.used_bytes == 0 and not gpu.resident_mask().any()
    gpu.set_resident(torch.tensor([True, False, True, False, False, True]))
    assert gpu.pool.experts() == [0, 2, 5] and gpu.pool.capacity == 3
    assert rt.store.used_bytes == 3 * per == sum(t.numel() * t.element_size() for t in gpu.pool.weights)
    _pool_holds(gpu, W, fmt, group)
    gpu.set_resident([2, 3])  # keeps 2, loads 3, drops 0 and 5; the pool shrinks to 2 slots
    assert gpu.pool.experts() == [2, 3] and rt.store.used_bytes == 2 * per
    _pool_holds(gpu, W, fmt, group)
    gpu.evict_resident([2])
    assert gpu.pool.experts() == [3] and rt.store.used_bytes == 2 * per  # the slot stays allocated
    gpu.load_resident([4])  # reuses the free slot
    assert gpu.pool.capacity == 2 and gpu.pool.experts() == [3, 4]
    gpu.load_resident([0, 1])  # grows to exactly 4 slots
    assert gpu.pool.capacity == 4 and rt.store.used_bytes == 4 * per
    _pool_holds(gpu, W, fmt, group)
    gpu.evict_resident([0, 1])
    gpu.pool.compact(gpu.host, gpu.streamer)
    assert gpu.pool.capacity == 2 and rt.store.used_bytes == 2 * per
    _pool_holds(gpu, W, fmt, group)
    gpu.set_resident(torch.zeros(6, dtype=torch.bool))
    assert rt.store.used_bytes == 0 and gpu.pool.weights is None


def test_budget_is_enforced_across_layers():
    P = placement()
    W, ex, rt, gpu = _layer(budget_experts=4)
    ex2 = moetune.MoEExperts(get_ctx(), *W)
    gpu2 = P.GpuExperts(rt, ex2, layer_key="L2")
    gpu.set_resident([0, 1, 2])
    with pytest.raises(P.ResidentBudgetError, match=r"layer 'L2'.*over its budget"):
        gpu2.set_resident([0, 1])
    assert gpu2.pool.experts() == [] and gpu.pool.experts() == [0, 1, 2]  # nothing changed
    gpu2.set_resident([5])
    assert rt.store.used_bytes == rt.store.budget_bytes
    with pytest.raises(P.ResidentBudgetError):
        gpu.load_resident([3])
    assert gpu.pool.experts() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        gpu.set_resident([6])


def test_resize_never_exceeds_the_budget():
    """Old + new pool would not fit: the old pool is dropped first and kept experts are reloaded."""
    W, ex, rt, gpu = _layer(budget_experts=4)
    gpu.set_resident([0, 1, 2])
    loads = gpu.pool.loads
    gpu.set_resident([0, 1, 2, 3])  # 3 + 4 slots > 4: drop, reload all four
    assert gpu.pool.loads == loads + 4 and rt.store.used_bytes == rt.store.budget_bytes
    _pool_holds(gpu, W)
    W, ex, rt, gpu = _layer(budget_experts=6)
    gpu.set_resident([0, 1])
    loads = gpu.pool.loads
    gpu.set_resident([0, 1, 2])  # 2 + 3 fit: kept experts are copied on the device, only 2 is loaded
    assert gpu.pool.loads == loads + 1
    _pool_holds(gpu, W)


def test_streamer_chunks_staging_and_copies():
    W, ex, rt, gpu = _layer(E=7, chunk=3, buffers=2)
    s = gpu.streamer
    assert s.chunk_experts == 3 and s.buffers == 2
    per = gpu.fmt.stored_bytes_per_expert
    chunks = [[0, 1, 2], [4, 6], [5]]
    events = []
    seen = []
    for c, Wd in zip(chunks, s.stream(gpu.host, chunks, copy_events=events)):
        for t, w in zip(Wd, W):
            assert torch.equal(t, w[c])
        seen.append([t.data_ptr() for t in Wd])
    assert len(events) == 3 and s.bytes_copied == 6 * per
    assert seen[0] == seen[1] == seen[2], "the decoded staging is not reused"
    kept = list(s.stream(gpu.host, chunks, keep=True))
    assert len({t.data_ptr() for Wd in kept for t in Wd}) == 9, "keep=True must give fresh tensors"
    for c, Wd in zip(chunks, kept):
        assert torch.equal(Wd[2], W[2][c])
    with pytest.raises(ValueError, match="1..3"):
        list(s.stream(gpu.host, [[0, 1, 2, 3]]))
    it = s.stream(gpu.host, chunks)
    next(it)
    with pytest.raises(RuntimeError, match="already streaming"):
        next(s.stream(gpu.host, chunks))
    it.close()
    assert next(s.stream(gpu.host, [[1]]))[0].shape[0] == 1  # usable again after close


def test_copy_runs_merge_consecutive_experts():
    from moetune.placement.streamer import _runs

    assert _runs([0, 1, 2]) == [(0, 3, 0)]
    assert _runs([4, 6, 7, 9]) == [(0, 1, 4), (1, 3, 6), (3, 4, 9)]
    assert _runs([3, 2]) == [(0, 1, 3), (1, 2, 2)]


def test_layout_and_device_rows():
    P = placement()
    from moetune.placement.routing import DeviceRows, GpuLayout, combine

    E, T, k = 7, 9, 2
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    counts = torch.bincount(ids.flatten(), minlength=E)
    W = P.Where
    where = torch.tensor(
        [W.CPU, W.GPU_RESIDENT, W.GPU_STREAMED, W.GPU_STREAMED, W.GPU_RESIDENT, W.GPU_STREAMED, W.CPU], dtype=torch.int8
    )
    plan = P.LayerPlan(where, counts)
    slot_expert = [4, -1, 1, 6]  # expert 6 is resident but planned on the CPU
    lay = GpuLayout.build(plan, slot_expert, chunk_experts=2)
    res = [e for e in (4, 1) if counts[e] > 0]
    streamed = [e for e in (2, 3, 5) if counts[e] > 0]
    assert lay.active == res + streamed
    seg0 = lay.segments[0]
    assert seg0.kind == W.GPU_RESIDENT and seg0.group_sizes == [int(counts[4]), 0, int(counts[1]), 0]
    assert [s.experts for s in lay.segments[1:]] == [streamed[i : i + 2] for i in range(0, len(streamed), 2)]
    assert lay.n_rows == int(counts[res + streamed].sum())
    rows = DeviceRows.build(lay, ids, lay.position)
    flat = ids.flatten()
    assert rows.expert.tolist() == [e for e in lay.active for _ in range(int(counts[e]))]
    assert torch.equal(flat[rows.rows], rows.expert) and torch.equal(rows.tok, rows.rows // k)
    for seg in lay.segments:  # within an expert, (token, slot) order
        r = rows.rows[seg.row0 : seg.row1]
        for e in seg.experts:
            re = r[flat[r] == e]
            assert torch.equal(re, torch.sort(re).values)
    gpu_slot = torch.isin(flat, torch.tensor(lay.active))
    assert torch.equal(rows.row_of.flatten() < lay.n_rows, gpu_slot)
    vals = torch.randn(lay.n_rows + 1, 5)
    vals[-1] = 0
    w = torch.rand(T, k)
    want = torch.zeros(T, 5)
    for t in range(T):
        for j in range(k):
            if bool(gpu_slot[t * k + j]):
                want[t] += w[t, j] * vals[rows.row_of[t, j]]
    assert torch.allclose(combine(vals, rows.row_of, w), want, rtol=1e-6, atol=1e-6)


def test_cpu_stand_in_device():
    P = placement()
    d = P.Device("cpu")
    assert not d.is_cuda and d.copy_stream is None and d.compute_stream() is None
    a, b = d.event(True), d.event(True)
    d.record(a)
    d.record(b)
    assert a.query() and a.elapsed_time(b) >= 0
    t = torch.arange(4)
    assert d.upload(t) is t
    reg = d.register_host(object, [(t.data_ptr(), 32)])
    assert reg.registered == [] and reg.nbytes == 0
    with pytest.raises(ValueError, match="device"):
        P.Device("meta")


def test_gemm_mode_and_errors():
    from moetune.placement.gemm import Gemm

    with pytest.raises(ValueError, match="gemm mode"):
        Gemm(torch.device("cpu"), "fast")
    gm = Gemm(torch.device("cpu"), "per_expert")
    assert not gm.grouped_available
    with pytest.raises(ValueError, match="non-empty"):
        gm.mm_tn(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16), None, [2, 0])
    assert Gemm(torch.device("cpu"), "grouped").grouped_available  # the probe passes on the CPU


def test_combine_gather_and_slot_by_slot_agree(monkeypatch):
    """combine's two ways (one gather + reduction for small calls, slot by slot above
    _COMBINE_GATHER_BYTES) give the same sums (fp32; order may differ in the last bit)."""
    from moetune.placement import routing

    g = torch.Generator().manual_seed(3)
    T, k, H, n = 37, 4, 16, 100
    vals = torch.randn(n + 1, H, generator=g)
    vals[-1] = 0
    row_of = torch.randint(0, n + 1, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    want_w = sum(w[:, j : j + 1] * vals[row_of[:, j]] for j in range(k))
    want = sum(vals[row_of[:, j]] for j in range(k))
    small = routing.combine(vals, row_of, w), routing.combine(vals, row_of)
    monkeypatch.setattr(routing, "_COMBINE_GATHER_BYTES", 0)
    large = routing.combine(vals, row_of, w), routing.combine(vals, row_of)
    for got in (small, large):
        assert torch.allclose(got[0], want_w, rtol=1e-6, atol=1e-6)
        assert torch.allclose(got[1], want, rtol=1e-6, atol=1e-6)


def test_gemm_device_sized_groups():
    """sizes=None (group sizes only on the device, the sync-free path): grouped_mm must run them,
    empty token-contraction groups give zeros; the per-expert mode cannot (device_sized False)."""
    from moetune.placement.gemm import Gemm, device_offsets

    gm = Gemm(torch.device("cpu"), "grouped")
    assert gm.device_sized and not Gemm(torch.device("cpu"), "per_expert").device_sized
    g = torch.Generator().manual_seed(4)
    sizes = [3, 0, 9, 0]
    offs = device_offsets(torch.tensor(sizes))
    a = torch.randn(sum(sizes), 16, generator=g).bfloat16()
    b = torch.randn(sum(sizes), 24, generator=g).bfloat16()
    w = torch.randn(len(sizes), 16, 24, generator=g).bfloat16()
    assert torch.equal(gm.mm(a, w, offs, None), gm.mm(a, w, offs, sizes))
    tn = gm.mm_tn(a, b, offs, None)
    assert tn.shape == (4, 16, 24) and not tn[1].any() and not tn[3].any()
    o = 0
    for gi, s in enumerate(sizes):
        if s:
            assert torch.equal(tn[gi], torch.mm(a[o : o + s].t(), b[o : o + s]))
        o += s
    pe = Gemm(torch.device("cpu"), "per_expert")
    with pytest.raises(RuntimeError, match="device-only group sizes"):
        pe.mm(a, w, offs, None)
