"""Published quantized expert formats in the engine (fp8_block, mxfp4, compressed-tensors INT4).

- The engine's table (moetune.weight_formats) says what each format stores.
- Codes and scales loaded as published (MoEExperts.load_expert_published) dequantize to exactly
  what an independent decoder gives: torch's float8_e4m3fn cast times the block scales
  (DeepSeek's own fp8 -> bf16 recipe), transformers' gpt-oss MXFP4 decoder
  (convert_moe_packed_tensors), compressed-tensors' unpack_from_int32 + dequantize.
- The engine on those weights equals, bit for bit, the bf16 engine run on the dequantized
  weights (forward and every gradient), on every ISA this CPU runs.
- Bad published input is a clear error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from op_cases import ALL, BF16, F32, I64, ISAS, Case, assert_results_equal, isa_ctx_or_skip, make_inputs, run_engine

import moetune

E4M3 = torch.float8_e4m3fn


def test_format_table():
    f = moetune.weight_formats()
    assert list(f) == ["bf16", "int8", "int4", "fp8_block", "mxfp4"]
    assert f["mxfp4"].bytes_per_weight() == 0.5 + 1 / 32  # the checkpoint's own bytes
    assert f["fp8_block"].group_k == 128 and f["fp8_block"].group_n == 128
    assert f["int4"].bytes_per_weight(32) == 0.5 + 4 / 32
    assert moetune.ExpertsOptions(weight_format="mxfp4").group_size == 0
    from moetune.weight_formats import describe

    text = "\n".join(describe())  # `moetune info`
    assert all(f"  {name} " in text for name in f)
    with pytest.raises(ValueError, match="group_size applies to int4 only"):
        moetune.ExpertsOptions(weight_format="fp8_block", group_size=32)


# ---- published arrays, written as the checkpoints hold them ----


def fp8_weight(out, inn, gen):
    """(e4m3 [out, in], fp32 scale_inv [ceil(out/128), ceil(in/128)]) with random codes (no NaN)."""
    codes = torch.randint(0, 256, (out, inn), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    s = torch.rand(-(-out // 128), -(-inn // 128), generator=gen) * 1e-3 + 1e-4
    return codes.view(E4M3), s


def fp8_reference(w, s):
    """DeepSeek's dequantization: fp32(w) * scale_inv per block, to bf16."""
    out, inn = w.shape
    full = s.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inn]
    return (w.float() * full).to(torch.bfloat16)


def mxfp4_weight(out, inn, gen):
    """gpt-oss: (blocks uint8 [out, in/32, 16], scales uint8 [out, in/32])."""
    blocks = torch.randint(0, 256, (out, inn // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 129, (out, inn // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def mxfp4_reference(blocks, scales):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # transformers decodes [E, out, G, 16] into gpt-oss's [E, in, out]; back to [out, in].
    return convert_moe_packed_tensors(blocks[None], scales[None])[0].t().contiguous()


def ct_int4_weight(out, inn, gen, group=32):
    """compressed-tensors pack-quantized: (weight_packed int32 [out, in/8], weight_scale bf16
    [out, in/group]); q in [-8, 7] packed by the package itself."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (out, inn), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out, inn // group, generator=gen) * 1e-2 + 1e-3).to(torch.bfloat16)
    return ct.pack_to_int32(q, 4), scale


def ct_int4_reference(packed, scale, inn, group=32):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    q = ct.unpack_from_int32(packed, 4, torch.Size((packed.shape[0], inn)))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    return dequantize(q, scale, torch.zeros_like(scale, dtype=torch.int8), args=args, dtype=torch.bfloat16)


FORMATS = {
    "fp8_block": (fp8_weight, fp8_reference, {}),
    "mxfp4": (mxfp4_weight, mxfp4_reference, {}),
    "int4": (ct_int4_weight, None, {"group_size": 32}),
}


def published_layer(fmt, E, H, I, seed):
    """Per expert ((codes, scales) x 3) and the independent decoder's bf16 [out, in] weights."""
    make, ref, _ = FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    experts, dq = [], []
    for _ in range(E):
        arrays = [make(I, H, gen), make(I, H, gen), make(H, I, gen)]
        experts.append(arrays)
        if fmt == "int4":
            dq.append(
                [ct_int4_reference(*arrays[0], H), ct_int4_reference(*arrays[1], H), ct_int4_reference(*arrays[2], I)]
            )
        else:
            dq.append([ref(*a) for a in arrays])
    return experts, [torch.stack([d[p] for d in dq]) for p in range(3)]


def load_published(ctx, fmt, experts, E, H, I, **kw):
    ex = moetune.MoEExperts.empty(ctx, E, H, I, weight_format=fmt, **FORMATS[fmt][2], **kw)
    for e, (g, u, d) in enumerate(experts):
        ex.load_expert_published(e, g, u, d)
    return ex


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantization_matches_the_independent_decoder(fmt):
    E, H, I = 3, 256, 160  # fp8: blocks cut at 160 and 256 - 128; mxfp4 / int4: 32-groups
    experts, dq = published_layer(fmt, E, H, I, 11)
    ex = load_published(moetune.Context(1), fmt, experts, E, H, I)
    for e in range(E):
        got = ex.unpack_expert(e)
        for p in range(3):
            assert torch.equal(got[p].view(torch.int16), dq[p][e].view(torch.int16)), (fmt, e, p)
    assert dq[0].abs().max() > 0  # not vacuous


def test_host_bytes_are_the_checkpoint_bytes():
    E, H, I = 4, 256, 128
    w = 3 * H * I * E
    assert moetune.ExpertsOptions(weight_format="mxfp4").host_bytes(E, H, I) == w // 2 + w // 32
    # fp8: 1 byte per weight + a 4-byte scale per 16 x 128 (a published block's scale per panel).
    assert moetune.ExpertsOptions(weight_format="fp8_block").host_bytes(E, H, I) == w + 4 * w // (16 * 128)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_engine_equals_bf16_engine_on_dequantized_weights(fmt, isa):
    ctx = isa_ctx_or_skip(isa)
    case = Case("pub", 12, 64, 96, 4, 2, 4, ALL, F32, I64, BF16)
    inp = make_inputs(case, 3)
    experts, dq = published_layer(fmt, case.E, case.H, case.I, 5)
    inp = dataclasses.replace(inp, gate=dq[0], up=dq[1], down=dq[2])
    for bw in ("repack", "transposed_copy"):
        ex = load_published(ctx, fmt, experts, case.E, case.H, case.I, backward_weights=bw)
        ref = moetune.MoEExperts(ctx, dq[0], dq[1], dq[2], backward_weights=bw)
        assert_results_equal(run_engine(ex, inp), run_engine(ref, inp), f"{fmt} {isa} {bw}")


def test_bad_published_input_is_a_clear_error():
    ctx = moetune.Context(1)
    E, H, I = 1, 128, 64
    gen = torch.Generator().manual_seed(0)
    g, u, d = fp8_weight(I, H, gen), fp8_weight(I, H, gen), fp8_weight(H, I, gen)
    ex = moetune.MoEExperts.empty(ctx, E, H, I, weight_format="fp8_block")
    bad = g[0].view(torch.uint8).clone()
    bad[2, 7] = 0x7F
    with pytest.raises(ValueError, match=r"gate_proj of expert 0 has a NaN e4m3 code at \[2, 7\]"):
        ex.load_expert_published(0, (bad, g[1]), u, d)
    with pytest.raises(ValueError, match=r"scales \(up_proj of expert 0.*shape \[2, 1\], expected \[1, 1\]"):
        ex.load_expert_published(0, g, (u[0], torch.ones(2, 1)), d)
    with pytest.raises(ValueError, match="codes have 63 rows, expected 128"):
        ex.load_expert_published(0, g, u, (d[0][:63], d[1]))
    mx = moetune.MoEExperts.empty(ctx, E, H, I, weight_format="mxfp4")
    b, s = mxfp4_weight(I, H, gen)
    with pytest.raises(ValueError, match="mxfp4 scales must be uint8"):
        mx.load_expert_published(0, (b, s.float()), (b, s), mxfp4_weight(H, I, gen))
    s2 = s.clone()
    s2[1, 2] = 255
    with pytest.raises(ValueError, match=r"scale \[1, 2\] is the e8m0 NaN code 255"):
        mx.load_expert_published(0, (b, s2), (b, s), mxfp4_weight(H, I, gen))
    bf = moetune.MoEExperts.empty(ctx, E, H, I)
    with pytest.raises(ValueError, match="bf16.*no published layout"):
        bf.load_expert_published(0, g, u, d)
