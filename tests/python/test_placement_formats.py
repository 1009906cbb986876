"""Decoding the engine's own packed buffers (moetune.placement.formats) on a torch device.

Exact: for a subset of experts, decoding gives bit for bit what the CPU engine computes with:
the original bf16 weights (bf16 format) or quant_reference.dequantized(W) = dq(q(W)) (int8, int4
with group sizes 32/64/128), for every projection, including shapes whose panels and K are padded.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import get_ctx, moetune
from placement_cases import placement
from quant_reference import dequantized

FORMATS = [("bf16", 0), ("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
SHAPES = [(4, 64, 48), (3, 33, 17), (5, 40, 24), (2, 160, 96)]  # (E, H, I): aligned, odd, short last group


def _weights(E, H, I, seed):
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)]
    W[1][0, :3] = 0.0  # an all-zero int8 row / int4 group: scale 0, q 0
    W[2][-1, 2, :] *= 1e3  # a row with one large scale
    return [t.to(torch.bfloat16) for t in W]


@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f"{f}{g or ''}" for f, g in FORMATS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}H{}I{}".format(*s))
def test_decode_is_exact(fmt, group, shape):
    P = placement()
    E, H, I = shape
    W = _weights(E, H, I, sum(shape))
    ex = moetune.MoEExperts(get_ctx(), *W, weight_format=fmt, group_size=group or None)
    pf = P.format_of(ex)
    from moetune.placement import _engine

    host = pf.host_views(_engine.packed_buffers(ex))
    subsets = [list(range(E)), [E - 1], [E - 1, 0]]
    for sub in subsets:
        for pi, proj in enumerate(("gate", "up", "down")):
            raw = {n: host[n][sub] for n in pf.buffer_names(proj)}
            got = pf.decode(proj, raw)
            want = dequantized(W[pi][sub], fmt, group)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            if fmt != "bf16":
                assert not torch.equal(want, W[pi][sub]), "quantization changed nothing: the test would be vacuous"
            assert torch.equal(got, want), f"{fmt}{group or ''} {proj} experts {sub}: decode differs from dq(q(W))"
            out = torch.full_like(want, float("nan"))
            assert pf.decode(proj, raw, out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize("fmt,group", [("bf16", 0), ("int4", 64)])
def test_buffer_sizes_match_the_engine(fmt, group):
    P = placement()
    E, H, I = 3, 72, 40
    ex = moetune.MoEExperts(get_ctx(), *_weights(E, H, I, 1), weight_format=fmt, group_size=group or None)
    pf = P.format_of(ex)
    assert pf.stored_bytes_per_expert == ex.packed_bytes_per_expert
    assert pf.decoded_bytes_per_expert == 2 * 3 * H * I
    from moetune.placement import _engine

    bufs = _engine.packed_buffers(ex)
    assert set(pf.names) <= set(bufs)
    # The views are the engine's memory, not a copy.
    arrs = {b.name: b.array for b in ex.packed_buffers()}
    for n in pf.names:
        assert bufs[n].data_ptr() == torch.from_numpy(arrs[n]).data_ptr()


def test_transposed_copy_buffers_do_not_disturb_decoding():
    P = placement()
    W = _weights(3, 40, 24, 5)
    ex = moetune.MoEExperts(get_ctx(), *W, weight_format="int8", backward_weights="transposed_copy")
    from moetune.placement import _engine

    pf = P.format_of(ex)
    bufs = _engine.packed_buffers(ex)
    assert any(n.endswith("transposed_bf16") for n in bufs)
    host = pf.host_views(bufs)
    got = pf.decode("down", {n: host[n] for n in pf.buffer_names("down")})
    assert torch.equal(got, dequantized(W[2], "int8"))


def test_mismatched_buffers_are_rejected():
    P = placement()
    pf = P.PackedFormat("int4", 32, 2, 64, 48)
    good = {n: torch.zeros(2 * pf.expert_bytes(n), dtype=torch.uint8) for n in pf.names}
    pf.host_views(good)
    with pytest.raises(ValueError, match=r"up\.scales.*expected"):
        pf.host_views({**good, "up.scales": torch.zeros(7, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"no buffer 'down\.q'"):
        pf.host_views({n: t for n, t in good.items() if n != "down.q"})
    raw = {n: torch.zeros(1, pf.expert_bytes(n) + 2, dtype=torch.uint8) for n in pf.buffer_names("gate")}
    with pytest.raises(ValueError, match=r"decode gate"):
        pf.decode("gate", raw)
    with pytest.raises(ValueError, match="group_size"):
        P.PackedFormat("int4", 48, 2, 64, 48)


def test_layout_version_is_checked(monkeypatch):
    from moetune import _moetune_ext
    from moetune.placement import _engine

    ex = moetune.MoEExperts(get_ctx(), *_weights(2, 32, 16, 2))
    monkeypatch.setattr(_moetune_ext, "PACKED_LAYOUT_VERSION", _engine.DECODED_LAYOUT_VERSION + 1)
    with pytest.raises(NotImplementedError, match="layout version"):
        _engine.packed_buffers(ex)
