"""moetune.load_model on tiny checkpoints of every family (CPU).

For each family the same weights (bf16-representable fp32, see
test_hf_exactness) are written in the published per-expert key layout
(sharded) and in the fused transformers-5 layout (one file), and loaded
three ways:
* moetune.load_model(dtype=float32): experts streamed into the engine;
* transformers' from_pretrained, then moetune.hf.patch: the same engine math
  on the same weights, so the logits must be bit-identical;
* plain transformers (fp32 reference): logits within 8 u max|ref| (u = 2^-8,
  the bound test_hf_exactness derives for one engine pass per layer).
Then FP8 (DeepSeek-V3 block scales), tied embeddings, and bad checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from ckpt_util import host_need_besides_packed, rewrite, state_dict_of, to_layout, write_checkpoint  # noqa: E402
from test_hf_exactness import FAMILIES, U, batch, build, ctx, rel_max  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
from moetune.hf import fp8, loader  # noqa: E402
from moetune.hf.keymap import fallback_rules, key_map  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout,shards", [("per_expert", 3), ("fused", 1)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits(family, layout, shards, tmp_path):
    ref = build(family)
    folder = write_checkpoint(
        tmp_path / "ckpt", to_layout(state_dict_of(ref), layout, ref.config.model_type), ref.config, shards=shards
    )
    ids = batch()
    want = _logits(ref, ids)
    ours = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False)
    handle = ours.moetune_handle
    assert handle.families == [FAMILIES[family]] and len(handle.module_names) == 2
    # Experts live only in the engine: placeholders, no storage.
    for m in ours.modules():
        if experts_state(m) is not None:
            assert isinstance(m.gate_up_proj, moetune.hf.EngineHeldTensor)
            assert isinstance(m.down_proj, moetune.hf.EngineHeldTensor)
    assert not any(p.device.type == "meta" for p in ours.parameters())
    assert ours.config._experts_implementation == "moetune" and not ours.training
    got = _logits(ours, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moetune.hf.patch(hf, ctx=ctx(), keep_original=False)
    assert torch.equal(got, _logits(hf, ids)), "load_model and from_pretrained+patch differ"
    err = rel_max(got, want)
    print(f"{family} {layout}: {err / U:.3f} u")
    assert err <= 8 * U


def test_transformers_saved_checkpoint(tmp_path):
    """What this transformers' save_pretrained writes (per-expert keys on 5.23), sharded."""
    ref = build("qwen3_moe")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = moetune.load_model(tmp_path / "hf", dtype=torch.float32, ctx=ctx(), progress=False)
    ids = batch()
    assert rel_max(_logits(ours, ids), _logits(ref, ids)) <= 8 * U


def test_bf16_default_and_engine_options(tmp_path):
    ref = build("olmoe")
    ref.save_pretrained(tmp_path / "c")
    ours = moetune.load_model(
        tmp_path / "c", ctx=ctx(), progress=False, backward_weights="transposed_copy", activations="recompute"
    )
    assert all(p.dtype == torch.bfloat16 for n, p in ours.named_parameters() if "experts" not in n)
    st = next(experts_state(m) for m in ours.modules() if experts_state(m) is not None)
    assert st.engine.ctx is ctx()
    patched = moetune.hf.patch(build("olmoe"), ctx=ctx(), keep_original=False)
    # transposed_copy keeps a second packed copy: twice the bytes of the default layout ...
    one = patched.packed_bytes // len(patched.module_names)
    assert st.engine.packed_bytes == 2 * one
    # ... and the host-RAM check's estimate is exact for both.
    E, I2, H = build("olmoe").model.layers[0].mlp.experts.gate_up_proj.shape
    O = moetune.ExpertsOptions
    assert loader.packed_bytes_estimate(E, H, I2 // 2, O()) == one
    assert loader.packed_bytes_estimate(E, H, I2 // 2, O(backward_weights="transposed_copy")) == 2 * one
    ids = batch()
    assert rel_max(_logits(ours, ids).float(), _logits(ref, ids)) <= 32 * U  # bf16 attention too


def test_tied_embeddings(tmp_path):
    cls, cfg = __import__("test_hf_exactness").tiny("qwen3_moe")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    ref = cls(cfg).float()
    __import__("test_hf_exactness").bf16_round_(ref)
    ref.save_pretrained(tmp_path / "c")
    ours = moetune.load_model(tmp_path / "c", dtype=torch.float32, ctx=ctx(), progress=False)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = batch()
    assert rel_max(_logits(ours, ids), _logits(ref, ids)) <= 8 * U


def test_key_map_from_transformers_agrees_with_fallback():
    for family in FAMILIES:
        model = build(family)
        km = key_map(model)
        assert km.source == "transformers", family
        names, pairs = fallback_rules(model.config.model_type)
        assert km.proj_names == names, family
        probe = "model.layers.3.block_sparse_moe.gate.weight"
        want = probe
        for a, b in pairs:
            want = want.replace(a, b)
        assert km.rename(probe) == want, family


# ---- block FP8 (DeepSeek-V3) ----

BLOCK = (16, 24)  # small blocks so the tiny weights hold several, with ragged edges (64 = 4x16, 32 = 24 + 8)


def _dequant_reference(q, s, block):
    """Elementwise definition: W[r, c] = q[r, c] * s[r // bo, c // bi]."""
    out = torch.empty(q.shape)
    for r in range(q.shape[0]):
        for c0 in range(0, q.shape[1], block[1]):
            out[r, c0 : c0 + block[1]] = q[r, c0 : c0 + block[1]].float() * s[r // block[0], c0 // block[1]]
    return out.bfloat16()


def _fp8_pair(tmp_path):
    ref = build("deepseek_v3")
    sd = to_layout(state_dict_of(ref), "per_expert", "deepseek_v3")
    q8, deq = {}, {}
    for k, v in sd.items():
        quantized = k.endswith(".weight") and v.dim() == 2 and ("experts." in k or "self_attn." in k)
        if quantized:
            q, s = fp8.quantize(v, BLOCK)
            q8[k], q8[k + "_scale_inv"] = q, s
            deq[k] = _dequant_reference(q, s, BLOCK)
        else:
            q8[k] = deq[k] = v
    extra = {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK),
        }
    }
    a = write_checkpoint(tmp_path / "fp8", q8, ref.config, config_extra=extra)
    b = write_checkpoint(tmp_path / "deq", deq, ref.config)
    return ref, sd, a, b, deq


def test_fp8_checkpoint_matches_dequantized(tmp_path):
    ref, sd, a, b, deq = _fp8_pair(tmp_path)
    k = "model.layers.0.mlp.experts.3.gate_proj.weight"
    # The quantization is real (not the identity) and correct to e4m3's precision (3 mantissa bits).
    assert not torch.equal(deq[k].float(), sd[k])
    assert ((deq[k].float() - sd[k]).abs().max() / sd[k].abs().max()) < 2.0**-3
    m8 = moetune.load_model(a, dtype=torch.float32, ctx=ctx(), progress=False)
    mb = moetune.load_model(b, dtype=torch.float32, ctx=ctx(), progress=False)
    assert getattr(m8.config, "quantization_config", None) is None
    ids = batch()
    got, want = _logits(m8, ids), _logits(mb, ids)
    assert torch.equal(got, want)
    q = m8.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.float32 and torch.equal(q, deq["model.layers.0.self_attn.q_proj.weight"].float())
    # And the dequantized model stays close to the original weights' logits.
    assert rel_max(got, _logits(ref, ids)) < 0.25


def test_fp8_without_scale_is_refused(tmp_path):
    _, _, a, _, _ = _fp8_pair(tmp_path)
    rewrite(a, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"})
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight has dtype "
        r"torch\.float8_e4m3fn without a weight_scale_inv",
    ):
        moetune.load_model(a, ctx=ctx(), progress=False)


# ---- bad checkpoints: clear errors before any weight is read ----


@pytest.fixture
def qwen_ckpt(tmp_path):
    ref = build("qwen3_moe")
    return write_checkpoint(tmp_path / "c", to_layout(state_dict_of(ref), "per_expert", "qwen3_moe"), ref.config)


def _no_engine(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an engine was created before the checkpoint was validated")

    monkeypatch.setattr(moetune.MoEExperts, "empty", classmethod(boom))


def test_missing_expert_key(qwen_ckpt, monkeypatch):
    rewrite(qwen_ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.experts.6.up_proj.weight"})
    _no_engine(monkeypatch)
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight"):
        moetune.load_model(qwen_ckpt, ctx=ctx(), progress=False)


def test_wrong_expert_shape(qwen_ckpt, monkeypatch):
    def edit(t):
        t["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(64, 16)
        return t

    rewrite(qwen_ckpt, edit)
    _no_engine(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.experts\.2\.down_proj\.weight has shape \[64, 16\], "
        r"expected \[64, 32\]",
    ):
        moetune.load_model(qwen_ckpt, ctx=ctx(), progress=False)


def test_wrong_dense_shape_and_unexpected_and_missing(qwen_ckpt, monkeypatch):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 64)
        t["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
        del t["model.norm.weight"]
        return t

    rewrite(qwen_ckpt, edit)
    _no_engine(monkeypatch)
    with pytest.raises(ValueError) as e:
        moetune.load_model(qwen_ckpt, ctx=ctx(), progress=False)
    msg = str(e.value)
    assert "missing keys: model.norm.weight" in msg
    assert "unexpected keys: model.layers.0.mlp.mystery.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight has shape [8, 64], the model's" in msg


def test_non_float_expert_dtype(qwen_ckpt):
    def edit(t):
        t["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64, dtype=torch.int8)
        return t

    rewrite(qwen_ckpt, edit)
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight has dtype torch\.int8"):
        moetune.load_model(qwen_ckpt, ctx=ctx(), progress=False)


def test_unsupported_model_lists_families(tmp_path):
    cfg = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no supported MoE experts module") as e:
        moetune.load_model(tmp_path / "dense", ctx=ctx(), progress=False)
    for family in moetune.hf.SUPPORTED_FAMILIES:
        assert family in str(e.value)


def test_not_enough_host_ram(qwen_ckpt, monkeypatch):
    monkeypatch.setattr(loader, "available_host_memory", lambda: 100_000)
    _no_engine(monkeypatch)
    with pytest.raises(MemoryError, match=r"needs about .* MiB of host RAM \(packed experts .* but only 0\.10 MiB"):
        moetune.load_model(qwen_ckpt, ctx=ctx(), progress=False)


@pytest.mark.parametrize("family,fmt", [("qwen3_moe", "int4"), ("gpt_oss", "int8")])
def test_host_ram_check_counts_the_real_format(family, fmt, tmp_path, monkeypatch):
    """Defect 1 (issue 10), loader half: the check asks exactly what the engine allocates for the
    options given (biases included where the family has them): a quantized load that fits the
    available memory succeeds where the bf16 packing would not, and one byte less refuses it,
    naming the sizes."""
    if family == "gpt_oss":
        from test_hf_gptoss import build as build_gptoss

        ref = build_gptoss()
        folder = write_checkpoint(tmp_path / "c", state_dict_of(ref), ref.config)
    else:
        ref = build(family)
        folder = write_checkpoint(tmp_path / "c", to_layout(state_dict_of(ref), "per_expert", family), ref.config)
    kw = dict(dtype=torch.float32, ctx=ctx(), progress=False, placement="cpu")
    packed = {
        f: moetune.load_model(folder, weight_format=f, check_memory=False, **kw).moetune_handle.packed_bytes
        for f in ("bf16", fmt)
    }
    model = moetune.load_model(folder, check_memory=False, **kw)
    common = host_need_besides_packed(folder, model)
    need = packed[fmt] + common
    assert packed[fmt] < packed["bf16"]
    monkeypatch.setattr(loader, "available_host_memory", lambda: need)
    got = moetune.load_model(folder, weight_format=fmt, **kw)  # fits exactly
    assert got.moetune_handle.packed_bytes == packed[fmt]
    monkeypatch.setattr(loader, "available_host_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=f"packed experts {packed[fmt] / 2**20:.2f} MiB as {fmt}"):
        moetune.load_model(folder, weight_format=fmt, **kw)
    monkeypatch.setattr(loader, "available_host_memory", lambda: need)
    with pytest.raises(
        MemoryError,
        match=rf"needs about {(packed['bf16'] + common) / 2**20:.2f} MiB of host RAM "
        rf"\(packed experts {packed['bf16'] / 2**20:.2f} MiB as bf16 \+ one layer's",
    ):
        moetune.load_model(folder, **kw)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        moetune.load_model(tmp_path, ctx=ctx(), progress=False)
    build("qwen3_moe").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        moetune.load_model(tmp_path, ctx=ctx(), progress=False)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="x.safetensors"):
        moetune.load_model(tmp_path, ctx=ctx(), progress=False)


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_bf16_matches_from_pretrained(family, tmp_path):
    """dtype=bf16 gives the tensors from_pretrained(dtype=bf16) gives (the
    routing bias stays fp32 where the model says so), hence identical logits."""
    ref = build(family)
    ref.save_pretrained(tmp_path / "c")
    ours = moetune.load_model(tmp_path / "c", dtype=torch.bfloat16, ctx=ctx(), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    moetune.hf.patch(hf, ctx=ctx(), keep_original=False)
    a = dict(ours.state_dict())
    b = dict(hf.state_dict())
    assert a.keys() == b.keys()
    for k in a:
        if "experts" not in k:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = batch()
    assert torch.equal(_logits(ours, ids), _logits(hf, ids))


def test_device_map_placement_and_refusals(tmp_path):
    ref = build("qwen3_moe")
    ref.save_pretrained(tmp_path / "c")
    for bad in ({}, {"model.layers.1": "cpu", "": "cuda:0"}):
        with pytest.raises(ValueError, match="device_map"):
            moetune.load_model(tmp_path / "c", device=bad, ctx=ctx(), progress=False)
    with pytest.raises(ValueError, match="places no module prefix over"):
        moetune.load_model(tmp_path / "c", device={"model.layers": "cpu"}, ctx=ctx(), progress=False)
    ours = moetune.load_model(
        tmp_path / "c", device={"model.embed_tokens": "cpu", "": "cpu"}, dtype=torch.float32, ctx=ctx(), progress=False
    )
    ids = batch()
    assert rel_max(_logits(ours, ids), _logits(ref, ids)) <= 8 * U


def test_engine_load_expert_matches_load_and_checks_arguments():
    """MoEExperts.empty + load_expert (what the loader uses) packs exactly what
    the all-at-once constructor packs; bad arguments name the expert and shape."""
    E, H, I = 4, 64, 32
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(E, I, H, generator=g).bfloat16(), torch.randn(E, I, H, generator=g).bfloat16()
    down = torch.randn(E, H, I, generator=g).bfloat16()
    whole = moetune.MoEExperts(ctx(), gate, up, down)
    parts = moetune.MoEExperts.empty(ctx(), E, H, I)
    for e in reversed(range(E)):
        parts.load_expert(e, gate[e], up[e], down[e])
    assert parts.packed_bytes == whole.packed_bytes
    x = torch.randn(8, H, generator=g)
    ids = torch.randint(0, E, (8, 2), generator=g)
    w = torch.rand(8, 2, generator=g)
    assert torch.equal(moetune.moe_experts(parts, x, ids, w), moetune.moe_experts(whole, x, ids, w))
    with pytest.raises(ValueError, match=r"up_proj \(expert 1\) has shape \[32, 32\], expected \[32, 64\]"):
        parts.load_expert(1, gate[1], up[1][:, :32].contiguous(), down[1])
    with pytest.raises(ValueError, match=r"expert id 4 outside \[0, 4\)"):
        parts.load_expert(4, gate[0], up[0], down[0])
    with pytest.raises(ValueError, match="expert 2: down_proj must be a floating-point tensor"):
        parts.load_expert(2, gate[2], up[2], down[2].to(torch.int32))


@pytest.mark.parametrize("shards", [1, 3])
def test_gpt_oss(shards, tmp_path):
    """gpt-oss's fused layout (transposed, interleaved gate/up, biases, clamped
    SwiGLU with a quarter of the units clamped) streams into the engine."""
    from test_hf_gptoss import build as build_gptoss

    ref = build_gptoss()
    folder = write_checkpoint(tmp_path / "c", state_dict_of(ref), ref.config, shards=shards)
    ids = batch()
    ours = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False)
    assert ours.moetune_handle.families == ["gpt-oss"]
    st = next(experts_state(m) for m in ours.modules() if experts_state(m) is not None)
    assert st.engine.has_biases == (True, True, True) and st.engine.activation == "gpt_oss"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moetune.hf.patch(hf, ctx=ctx(), keep_original=False)
    got = _logits(ours, ids)
    assert torch.equal(got, _logits(hf, ids))
    assert rel_max(got, _logits(ref, ids)) <= 8 * U
    rewrite_key = "model.layers.0.mlp.experts.down_proj_bias"
    if shards == 1:
        rewrite(folder, lambda t: {k: v for k, v in t.items() if k != rewrite_key})
        with pytest.raises(ValueError, match=f"missing keys: {rewrite_key}"):
            moetune.load_model(folder, ctx=ctx(), progress=False)
