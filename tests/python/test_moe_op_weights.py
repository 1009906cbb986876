"""What MoEExperts exposes of its packed weights (for a future GPU path, merges, exports).

unpack_expert(e) must give the bf16 values the engine's GEMMs use: the
loaded weights bit for bit for bf16, dq(q(W)) of the plain-PyTorch reference
(quant_reference.py) for int8 / int4 — and running the bf16 engine on those
values must reproduce the quantized engine bit for bit. packed_buffers()
must describe each buffer so that expert e's bytes are exactly
[e * per_expert_bytes, (e + 1) * per_expert_bytes).
"""

from __future__ import annotations

import pytest
import torch
from op_cases import ALL, BF16, Case, assert_results_equal, get_ctx, make_inputs, moetune, run_engine
from quant_reference import dequantized

FORMATS = [("bf16", None), ("int8", None), ("int4", 32), ("int4", 128)]
CASE = Case("w", 10, 40, 24, 4, 2, 4, ALL)


@pytest.mark.parametrize("bw", ["repack", "transposed_copy"])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
def test_unpack_expert_gives_the_values_the_gemms_use(fmt, group, bw):
    inp = make_inputs(CASE, 11)
    # fp32 weights that are not bf16 values: the engine rounds (bf16) or quantizes them (int8/int4) itself.
    W = [
        t.float() + 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
        for i, t in enumerate((inp.gate, inp.up, inp.down))
    ]
    ex = moetune.MoEExperts(get_ctx(), *W, weight_format=fmt, group_size=group, backward_weights=bw)
    want = [dequantized(w, fmt, group or 0) for w in W]  # bf16 -> plain rounding
    assert not torch.equal(want[0], W[0].to(BF16)) or fmt == "bf16"
    for e in range(CASE.E):
        got = ex.unpack_expert(e)
        for name, g, w in zip(("gate", "up", "down"), got, want):
            assert g.dtype == BF16 and g.shape == w[e].shape, name
            assert torch.equal(g, w[e]), f"{fmt}{group or ''} {bw} expert {e} {name}"
    # The unpacked values are what the quantized engine computes with.
    unpacked = [torch.stack([ex.unpack_expert(e)[i] for e in range(CASE.E)]) for i in range(3)]
    ref = moetune.MoEExperts(get_ctx(), *unpacked, backward_weights=bw)
    assert_results_equal(run_engine(ex, inp), run_engine(ref, inp), f"{fmt} vs bf16 engine on unpack_expert")


def test_unpack_expert_rejects_bad_ids():
    ex = moetune.MoEExperts.empty(get_ctx(), 3, 8, 8)
    for e in (3, -1):
        with pytest.raises(ValueError, match=f"expert id {e} outside"):
            ex.unpack_expert(e)


@pytest.mark.parametrize("bw", ["repack", "transposed_copy"])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
def test_packed_buffers_hold_one_expert_per_stride(fmt, group, bw):
    E, H, I = 3, 33, 17
    g = torch.Generator().manual_seed(5)
    Wa = [torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)]
    Wb = [torch.randn(w.shape, generator=g) for w in Wa]
    opts = dict(weight_format=fmt, group_size=group, backward_weights=bw)
    a = moetune.MoEExperts(get_ctx(), *Wa, **opts)
    bufs = a.packed_buffers()
    names = [b.name for b in bufs]
    kinds = {"bf16": ["bf16"], "int8": ["q", "scales"], "int4": ["q", "scales"]}[fmt]
    kinds = kinds + (["transposed_bf16"] if bw == "transposed_copy" else [])
    assert names == [f"{p}.{k}" for p in ("gate", "up", "down") for k in kinds]
    assert sum(len(b.array) for b in bufs) == a.packed_bytes == moetune.MoEExperts.host_bytes(E, H, I, **opts)
    for b in bufs:
        assert b.per_expert_bytes * E == len(b.array), b.name
        fwd = (H, I) if b.projection != "down" else (I, H)
        assert (b.K, b.N) == (fwd[::-1] if b.kind == "transposed_bf16" else fwd), b.name
    # Expert 1 loaded from other weights: its slice of every buffer changes to
    # what an engine loaded with those weights holds there; nothing else moves.
    before = [bytes(b.array) for b in bufs]
    a.load_expert(1, Wb[0][1], Wb[1][1], Wb[2][1])
    other = [bytes(b.array) for b in moetune.MoEExperts(get_ctx(), *Wb, **opts).packed_buffers()]
    for b, old, new in zip(bufs, before, other):
        lo, hi = b.per_expert_bytes, 2 * b.per_expert_bytes
        now = bytes(b.array)
        assert now[:lo] == old[:lo] and now[hi:] == old[hi:], b.name
        assert now[lo:hi] == new[lo:hi] != old[lo:hi], b.name


def test_packed_buffers_are_views_of_the_engine():
    ex = moetune.MoEExperts.empty(get_ctx(), 2, 16, 16)
    ex.load_expert(0, *(torch.ones(16, 16),) * 3)
    ex.load_expert(1, *(torch.full((16, 16), 2.0),) * 3)
    (b, *_) = ex.packed_buffers()
    assert b.name == "gate.bf16" and b.kind == "bf16" and b.projection == "gate"
    # bf16 panels of ones / twos: every element of expert e is e + 1 (0x3f80, 0x4000), no padding at 16 x 16.
    vals = torch.frombuffer(bytearray(bytes(b.array)), dtype=torch.int16)
    per = b.per_expert_bytes // 2
    assert torch.all(vals[:per] == 0x3F80) and torch.all(vals[per:] == 0x4000)


def test_packed_buffers_start_on_and_fill_whole_pages():
    """A GPU runtime page-locks exactly these buffers (moetune.placement): each must start on a page
    and own the rest of its last page, or locking it would also lock a neighbouring allocation."""
    import mmap

    for fmt, group in (("bf16", None), ("int8", None), ("int4", 32)):
        g = torch.Generator().manual_seed(3)
        W = [
            torch.randn(3, 40, 24, generator=g),
            torch.randn(3, 40, 24, generator=g),
            torch.randn(3, 24, 40, generator=g),
        ]
        ex = moetune.MoEExperts(moetune.Context(1), *W, weight_format=fmt, group_size=group)
        for b in ex.packed_buffers():
            assert b.array.ctypes.data % mmap.PAGESIZE == 0, f"{fmt} {b.name} is not page aligned"
