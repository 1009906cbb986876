"""load_model on quantized checkpoints written in their published layouts (issue 11):

- DeepSeek-V3 block FP8 (per-expert e4m3 `weight` + fp32 `weight_scale_inv`, 128 x 128 blocks),
- gpt-oss MXFP4 (fused `gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`),
- Kimi-K2 style compressed-tensors pack-quantized INT4 on the DeepSeek-V3 architecture
  (per-expert `weight_packed` int32, bf16 `weight_scale`, `weight_shape`),

each sharded, with the real key names and config.json quantization_config. With
weight_format="auto" the experts stay in the published format (the engine's format says so, its
host bytes are the checkpoint's expert bytes); logits and a few LoRA training steps equal, bit for
bit, those of the same model loaded from a bf16 checkpoint holding the weights dequantized in
PyTorch (for MXFP4 by transformers' own decoder). An explicit format converts and logs it. Bad
published input is a clear error before any weight is read.
"""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_util import state_dict_of, to_layout, write_checkpoint  # noqa: E402
from test_hf_exactness import LORA, batch, build, ctx  # noqa: E402
from test_hf_gptoss import build as build_gptoss  # noqa: E402

import moetune  # noqa: E402
from moetune.hf import fp8  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ---- the published layouts, written here from a model's bf16 weights ----


def fp8_checkpoint(tmp_path):
    """DeepSeek-V3: every expert and attention weight block-FP8 (128 x 128), 2 shards."""
    ref = build("deepseek_v3")
    sd = to_layout(state_dict_of(ref), "per_expert", "deepseek_v3")
    q8, deq = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and ("experts." in k or "self_attn." in k):
            q, s = fp8.quantize(v, (128, 128))
            q8[k], q8[k + "_scale_inv"] = q, s
            deq[k] = fp8.dequantize(q, s, (128, 128))  # DeepSeek's own recipe: fp32(w) * scale_inv -> bf16
        else:
            q8[k] = deq[k] = v
    extra = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    a = write_checkpoint(tmp_path / "fp8", q8, ref.config, shards=2, config_extra=extra)
    b = write_checkpoint(tmp_path / "fp8_deq", deq, ref.config)
    return a, b


def mxfp4_quantize(w: torch.Tensor):
    """OCP MX quantization of [..., out, in] (in % 32 == 0): (blocks uint8 [..., out, in/32, 16],
    scales uint8 [..., out, in/32]); codes nearest e2m1 of w / 2^(floor(log2 amax) - 2)."""
    *lead, out, inn = w.shape
    g = w.float().reshape(*lead, out, inn // 32, 32)
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    x = g / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32))[..., None]
    code = (x.abs()[..., None] - E2M1).abs().argmin(-1) | ((x < 0).to(torch.int64) << 3)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def gptoss_checkpoint(tmp_path):
    """gpt-oss as published: MXFP4 experts (fused blocks / scales), everything else bf16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = build_gptoss()
    sd = state_dict_of(ref)
    q4, deq = {}, {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            blocks, scales = mxfp4_quantize(v.transpose(1, 2))  # gpt-oss stores [E, in, out]: rows = out
            q4[k + "_blocks"], q4[k + "_scales"] = blocks, scales
            deq[k] = convert_moe_packed_tensors(blocks, scales)  # transformers' decoder: [E, in, out] bf16
        else:
            q4[k] = deq[k] = v
    extra = {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    a = write_checkpoint(tmp_path / "mxfp4", q4, ref.config, shards=2, config_extra=extra)
    b = write_checkpoint(tmp_path / "mxfp4_deq", deq, ref.config)
    return a, b, deq


def int4_pack(w: torch.Tensor, group: int = 32):
    """compressed-tensors pack-quantized symmetric int4 of [out, in], written from its public
    layout: (weight_packed int32 [out, in/8]: nibble i of a word = q(8 w + i) + 8, weight_scale
    bf16 [out, in/group] = amax / 7.5 rounded, q = clamp(round(w / s), -8, 7))."""
    out, inn = w.shape
    g = w.float().reshape(out, inn // group, group)
    s = (g.abs().amax(-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / s.float()[..., None]), -8, 7).to(torch.int32).reshape(out, inn)
    u = (q + 8).reshape(out, inn // 8, 8)
    words = torch.zeros(out, inn // 8, dtype=torch.int64)
    for i in range(8):
        words |= u[..., i].to(torch.int64) << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    deq = (q.reshape(out, inn // group, group).float() * s.float()[..., None]).reshape(out, inn).to(torch.bfloat16)
    return words, s, deq


def kimi_checkpoint(tmp_path):
    """Kimi-K2 layout on DeepSeek-V3: routed experts compressed-tensors int4 (group 32), 3 shards."""
    ref = build("deepseek_v3")
    sd = to_layout(state_dict_of(ref), "per_expert", "deepseek_v3")
    q4, deq = {}, {}
    for k, v in sd.items():
        if ".mlp.experts." in k and k.endswith(".weight"):
            packed, scale, d = int4_pack(v)
            base = k[: -len("weight")]
            q4[base + "weight_packed"], q4[base + "weight_scale"] = packed, scale
            q4[base + "weight_shape"] = torch.tensor(list(v.shape), dtype=torch.int32)
            deq[k] = d
        else:
            q4[k] = deq[k] = v
    extra = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": 32,
                    },
                }
            },
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.gate$"],
        }
    }
    a = write_checkpoint(tmp_path / "kimi", q4, ref.config, shards=3, config_extra=extra)
    b = write_checkpoint(tmp_path / "kimi_deq", deq, ref.config)
    return a, b


CHECKPOINTS = {"fp8_block": fp8_checkpoint, "mxfp4": gptoss_checkpoint, "int4": kimi_checkpoint}


def load(folder, **kw):
    return moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False, **kw)


def engines(model):
    states = [experts_state(m) for m in model.modules()]
    return [st.engine for st in states if st is not None]


def train_losses(model, steps: int = 3):
    """A few LoRA SFT steps (AdamW) on a fixed batch; the loss of each."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", list(CHECKPOINTS))
def test_published_checkpoint_keeps_its_format_and_trains_like_the_dequantized_one(fmt, tmp_path):
    a, b, *_ = CHECKPOINTS[fmt](tmp_path)
    m_pub, m_deq = load(a), load(b)
    assert {e.weight_format for e in engines(m_pub)} == {fmt}
    assert {e.weight_format for e in engines(m_deq)} == {"bf16"}
    if fmt == "int4":
        assert {e.group_size for e in engines(m_pub)} == {32}
    ids = batch()
    with torch.no_grad():
        got, want = m_pub(input_ids=ids).logits, m_deq(input_ids=ids).logits
    assert torch.isfinite(got).all() and torch.equal(got, want)
    losses = train_losses(m_pub)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert losses == train_losses(m_deq)


def test_host_bytes_are_the_checkpoints_expert_bytes(tmp_path):
    """MXFP4 in the engine takes exactly the published blocks + scales bytes."""
    a, _, _ = gptoss_checkpoint(tmp_path)
    from safetensors import safe_open

    published = 0
    for f in a.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            published += sum(r.get_tensor(k).nbytes for k in r.keys() if k.endswith(("_blocks", "_scales")))
    m = load(a)
    assert sum(e.host_bytes(e.num_experts, e.hidden_size, e.intermediate_size, e.options) for e in engines(m)) == (
        published
    )


def test_explicit_format_converts_and_says_so(tmp_path, caplog):
    a, b, _ = gptoss_checkpoint(tmp_path)
    with caplog.at_level(logging.INFO, logger="moetune"):
        m = load(a, weight_format="bf16")
    assert "converting the mxfp4 experts to bf16" in caplog.text
    assert {e.weight_format for e in engines(m)} == {"bf16"}
    ids = batch()
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, load(b)(input_ids=ids).logits)  # exact dequantization
    m8 = load(a, weight_format="int8")
    assert {e.weight_format for e in engines(m8)} == {"int8"}


def test_bad_published_input_is_a_clear_error(tmp_path):
    a, _, _ = gptoss_checkpoint(tmp_path / "g")
    k, kd = "model.layers.1.mlp.experts.gate_up_proj_scales", "model.layers.0.mlp.experts.down_proj_scales"

    def edit(folder, fn):
        import json

        idx = json.loads((folder / "model.safetensors.index.json").read_text())
        from safetensors.torch import load_file, save_file

        for f in sorted(set(idx["weight_map"].values())):
            t = fn(load_file(str(folder / f)))
            save_file(t, str(folder / f), metadata={"format": "pt"})
            idx["weight_map"] = {n: f2 for n, f2 in idx["weight_map"].items() if n in t or f2 != f}
        (folder / "model.safetensors.index.json").write_text(json.dumps(idx))

    edit(a, lambda t: {n: v for n, v in t.items() if n != k})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj_scales is missing"):
        load(a)
    a, _, _ = gptoss_checkpoint(tmp_path / "h")
    edit(a, lambda t: {n: (v[:, :-1].contiguous() if n == kd else v) for n, v in t.items()})
    with pytest.raises(
        ValueError, match=r"down_proj_scales is torch\.uint8 \[8, 63, 1\], expected torch\.uint8 \[8, 64, 1\]"
    ):
        load(a)

    k_a, _ = kimi_checkpoint(tmp_path / "k")
    sk = "model.layers.0.mlp.experts.2.up_proj.weight_scale"
    edit(k_a, lambda t: {n: v for n, v in t.items() if n != sk})
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj\.weight_packed has no scale tensor"):
        load(k_a)

    cfg = (k_a / "config.json").read_text().replace('"compressed-tensors"', '"awq"')
    (k_a / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        load(k_a)

    # config.json says MXFP4, the experts are plain bf16.
    _, b, _ = gptoss_checkpoint(tmp_path / "m")
    import json

    c = json.loads((b / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4"}
    (b / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="declares quant_method 'mxfp4' but the layer's experts are not quantized"):
        load(b)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4", "fp8_block"])
def test_merge_and_save_writes_bf16_merged(fmt, tmp_path):
    """A published source merges into a bf16 checkpoint under the unquantized model's keys
    (no scales, no quantization_config) whose plain-transformers logits equal the trained PEFT
    model's within one more bf16 rounding per weight (W + dW) than the engine path."""
    import json

    from safetensors import safe_open
    from test_hf_exactness import U, rel_max
    from test_merge_export import _plain_logits, _trained

    a, *_ = CHECKPOINTS[fmt](tmp_path)
    pm = _trained(a, steps=1)
    ids = batch(seed=12)
    with torch.no_grad():
        ours = pm(input_ids=ids).logits
    out = moetune.merge_and_save(pm, tmp_path / "merged", progress=False)
    keys = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            keys.update({k: r.get_slice(k).get_dtype() for k in r.keys()})
    assert not [k for k in keys if k.endswith(("_scale_inv", "_scale", "_scales", "_blocks", "_packed", "_shape"))]
    want = (
        "model.layers.0.mlp.experts.gate_up_proj" if fmt == "mxfp4" else "model.layers.0.mlp.experts.1.up_proj.weight"
    )
    assert keys[want] == "BF16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert rel_max(_plain_logits(out, ids), ours) <= 8 * U


def test_expert_cache_holds_the_published_format(tmp_path):
    """The disk cache stores the kept MXFP4 experts as they are; a hit gives the same model."""
    a, _, _ = gptoss_checkpoint(tmp_path)
    first = load(a, cache_dir=tmp_path / "cache")
    assert set(first.moetune_cache.values()) == {"miss: no cache entry"}
    second = load(a, cache_dir=tmp_path / "cache")
    assert set(second.moetune_cache.values()) == {"hit"}
    assert {e.weight_format for e in engines(second)} == {"mxfp4"}
    ids = batch()
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_fp8_config_with_unquantized_experts_cannot_be_kept(tmp_path):
    a, b = fp8_checkpoint(tmp_path)
    (b / "config.json").write_text((a / "config.json").read_text())  # bf16 weights, FP8 config
    with pytest.raises(ValueError, match=r"experts\.\d+\.\w+_proj\.weight is torch\.bfloat16, not block-FP8 e4m3"):
        load(b)
    assert {e.weight_format for e in engines(load(b, weight_format="bf16"))} == {"bf16"}


def test_options_naming_a_format_convert(tmp_path, caplog):
    """options= naming a non-default format (what `moetune train --expert-format int8` passes)
    converts even with weight_format="auto"."""
    a, _ = kimi_checkpoint(tmp_path)
    with caplog.at_level(logging.INFO, logger="moetune"):
        m = load(a, options=moetune.ExpertsOptions(weight_format="int8"))
    assert {e.weight_format for e in engines(m)} == {"int8"}
    assert "converting the compressed-tensors experts to int8" in caplog.text


def test_torch_requantizers_equal_the_engines_and_the_published_decoders():
    """published.mxfp4_quantize / int4_quantize (merged_format="published") give the codes the
    engine's own quantizer gives (mxfp4: bit for bit after decoding) and round trip through the
    independent decoders within half a quantization step (int4: |w - dq| <= s / 2 + bf16 roundings)."""
    from moetune.hf import published

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(2, 48, 96, generator=g) * 0.02).to(torch.bfloat16)
    w[0, 3, :32] = 0.0  # an all-zero group
    w[1, 5, 7] = 8.0 * 2.0**-6  # a power of two as the amax
    blocks, scales = published.mxfp4_quantize(w)
    ex = moetune.MoEExperts(ctx(), w, w, w.transpose(1, 2).contiguous(), weight_format="mxfp4")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ours = convert_moe_packed_tensors(blocks, scales).transpose(1, 2)  # [E, out, in]
    for e in range(2):
        assert torch.equal(ours[e].view(torch.int16), ex.unpack_expert(e)[0].view(torch.int16))
    q = published.Quantization("compressed-tensors", "int4", group_size=32)
    packed, s = published.int4_quantize(w[0].float(), 32)
    dq = published.dequantize(q, packed, s, 96).float()
    step = s.float().repeat_interleave(32, 1)
    # |w - q s| <= s / 2, plus the bf16 rounding of s itself (amax / s up to 7.5 (1 + 2^-8): the
    # clamped extreme is off by 7.5 s 2^-8 more), plus dq = bf16(q s)'s own rounding (|dq| 2^-8).
    bound = step / 2 + 7.5 * step * 2.0**-8 + dq.abs() * 2.0**-8
    assert ((dq - w[0].float()).abs() <= bound).all(), ((dq - w[0].float()).abs() - bound).max()
    assert (dq != 0).sum() > dq.numel() // 2


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_merge_back_into_the_published_format(fmt, tmp_path):
    """merged_format="published": the same keys, dtypes and config as the source; loads back in
    the published format; its weights are exactly the bf16-merged ones re-quantized (mxfp4: what
    the engine's own quantizer makes of the bf16-merged checkpoint, bit for bit; int4: the torch
    quantizer checked above applied to the bf16-merged weights)."""
    import json

    from safetensors import safe_open
    from test_merge_export import _trained

    from moetune.hf import published

    a, *_ = CHECKPOINTS[fmt](tmp_path)
    pm = _trained(a, steps=1)
    out = moetune.merge_and_save(pm, tmp_path / "merged", progress=False, merged_format="published")
    bf = moetune.merge_and_save(pm, tmp_path / "merged_bf16", progress=False)

    def tensors(folder):
        d = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as r:
                d.update({k: r.get_tensor(k) for k in r.keys()})
        return d

    got, src, merged = tensors(out), tensors(a), tensors(bf)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in src.items()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((a / "config.json").read_text())["quantization_config"]
    m = load(out)
    assert {e.weight_format for e in engines(m)} == {fmt}
    if fmt == "mxfp4":
        ref = load(bf, weight_format="mxfp4")  # the engine quantizes the bf16-merged weights itself
        for e1, e2 in zip(engines(m), engines(ref)):
            for e in range(e1.num_experts):
                assert all(
                    torch.equal(x.view(torch.int16), y.view(torch.int16))
                    for x, y in zip(e1.unpack_expert(e), e2.unpack_expert(e))
                )
    else:
        n = 0
        for k, v in merged.items():
            if ".mlp.experts." in k:
                packed, scale = published.int4_quantize(v, 32)
                base = k[: -len("weight")]
                assert torch.equal(got[base + "weight_packed"], packed) and torch.equal(
                    got[base + "weight_scale"], scale
                )
                n += 1
        assert n > 0
    assert not torch.equal(
        got[next(k for k in got if "experts" in k and k.endswith(("_blocks", "_packed")))],
        src[next(k for k in got if "experts" in k and k.endswith(("_blocks", "_packed")))],
    )
    with pytest.raises(ValueError, match="merged_format must be"):
        moetune.merge_and_save(pm, tmp_path / "x", progress=False, merged_format="int8")
