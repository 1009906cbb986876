"""moetune.placement.formats decoding the published formats (fp8_block, mxfp4) on a torch device
(the CPU stand-in here; the same torch ops on CUDA): bit for bit the values the CPU engine's GEMMs
use (MoEExperts.unpack_expert, the scalar oracle, itself checked against torch's e4m3 cast and
transformers' MXFP4 decoder in test_published_formats.py), for experts quantized from bf16 by the
engine (odd shapes: padded panels and K, short last groups) and experts loaded as published."""

from __future__ import annotations

import pytest
import torch
from op_cases import get_ctx, moetune
from placement_cases import placement
from test_published_formats import load_published, published_layer

SHAPES = [(4, 64, 48), (3, 33, 17), (2, 160, 96), (2, 300, 136)]  # (E, H, I); 300: 3 fp8 K blocks


def _check(pf, ex, E):
    from moetune.placement import _engine

    host = pf.host_views(_engine.packed_buffers(ex))
    want = [torch.stack([ex.unpack_expert(e)[p] for e in range(E)]) for p in range(3)]
    for sub in (list(range(E)), [E - 1], [E - 1, 0]):
        for pi, proj in enumerate(("gate", "up", "down")):
            got = pf.decode(proj, {n: host[n][sub] for n in pf.buffer_names(proj)})
            assert torch.equal(got.view(torch.int16), want[pi][sub].view(torch.int16)), (pf.weight_format, proj, sub)
    assert want[0].abs().max() > 0


@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}H{}I{}".format(*s))
def test_decode_is_exact_for_quantized_from_bf16(fmt, shape):
    E, H, I = shape
    g = torch.Generator().manual_seed(sum(shape))
    W = [torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)]
    W[2][-1, 2, :] *= 1e3
    ex = moetune.MoEExperts(get_ctx(), *[w.to(torch.bfloat16) for w in W], weight_format=fmt)
    pf = placement().format_of(ex)
    assert pf.stored_bytes_per_expert == ex.packed_bytes_per_expert
    _check(pf, ex, E)


@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4", "int4"])
def test_decode_is_exact_for_published_experts(fmt):
    E, H, I = 3, 256, 160
    experts, dq = published_layer(fmt, E, H, I, 21)
    ex = load_published(get_ctx(), fmt, experts, E, H, I)
    pf = placement().format_of(ex)
    _check(pf, ex, E)
    from moetune.placement import _engine

    host = pf.host_views(_engine.packed_buffers(ex))
    got = pf.decode("down", {n: host[n] for n in pf.buffer_names("down")})
    assert torch.equal(got.view(torch.int16), dq[2].view(torch.int16))  # = the independent decoder
