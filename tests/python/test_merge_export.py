"""Adapters out of moetune models: resume, merge into a full checkpoint,
per-expert export (CPU, tiny models; tolerances as in test_hf_exactness)."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_util import state_dict_of, to_layout, write_checkpoint  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_hf_exactness import LORA, U, batch, build, ctx, lora_init_, rel_max  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
from moetune.hf import merge as merge_mod  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402


def _trained(folder, steps=2):
    """load_model + PEFT LoRA (random factors) + a few AdamW steps."""
    model = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    lora_init_(pm)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        ids = batch(seed=300 + step)
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    pm.eval()
    return pm


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def _ckpt(tmp_path, family, layout, shards):
    if family == "gpt_oss":
        from test_hf_gptoss import build as build_gptoss

        ref = build_gptoss()
    else:
        ref = build(family)
    return write_checkpoint(
        tmp_path / f"base-{family}",
        to_layout(state_dict_of(ref), layout, ref.config.model_type),
        ref.config,
        shards=shards,
    )


def test_resume_from_saved_adapter(tmp_path):
    base = _ckpt(tmp_path, "qwen3_moe", "per_expert", 2)
    pm = _trained(base)
    pm.save_pretrained(tmp_path / "adapter")
    ids = batch(seed=9)
    want = _logits(pm, ids)
    lora = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    # 1. load_model(..., adapter=)
    resumed = moetune.load_model(base, dtype=torch.float32, ctx=ctx(), progress=False, adapter=tmp_path / "adapter")
    got = {n: p for n, p in resumed.named_parameters() if "lora_" in n}
    assert got.keys() == lora.keys()
    assert all(torch.equal(got[n], lora[n]) and got[n].requires_grad for n in lora)
    assert torch.equal(_logits(resumed, ids), want)
    # Training goes on: gradients reach the resumed expert LoRA.
    resumed.train()
    resumed(input_ids=ids, labels=ids).loss.backward()
    assert all(got[n].grad is not None and got[n].grad.norm() > 0 for n in got if "experts" in n)
    # 2. PeftModel.from_pretrained on a model patched by moetune.hf.patch.
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    moetune.hf.patch(hf, ctx=ctx(), keep_original=False)
    again = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert torch.equal(_logits(again, ids), want)


def _plain_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any(experts_state(m) is not None for m in model.modules())
    return _logits(model, ids)


@pytest.mark.parametrize(
    "family,layout,shards",
    [
        ("qwen3_moe", "per_expert", 3),
        ("mixtral", "per_expert", 1),
        ("deepseek_v3", "fused", 2),
        ("gpt_oss", "fused", 2),
    ],
)
def test_merge_and_save(family, layout, shards, tmp_path):
    base = _ckpt(tmp_path, family, layout, shards)
    pm = _trained(base)
    ids = batch(seed=11)
    ours = _logits(pm, ids)
    out = moetune.merge_and_save(pm, tmp_path / "merged", progress=False)
    # Same layout: keys, shard files, index, config.
    src, dst = sorted(os.listdir(base)), sorted(os.listdir(out))
    assert src == dst
    if shards > 1:
        a = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        b = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert a == b
    # Stock transformers reproduces the moetune + adapter logits.
    plain = _plain_logits(out, ids)
    err = rel_max(plain, ours)
    print(f"{family} merged: {err / U:.3f} u")
    assert err <= 8 * U
    # Without the LoRA the logits are far off (the merge did something).
    assert rel_max(_plain_logits(base, ids), ours) > 50 * U
    # The same merge from the two folders alone (no base weights loaded).
    pm.save_pretrained(tmp_path / "adapter")
    out2 = moetune.merge_and_save((base, tmp_path / "adapter"), tmp_path / "merged2", progress=False)
    for f in (x for x in dst if x.endswith(".safetensors")):
        t1, t2 = load_file(str(out / f)), load_file(str(out2 / f))
        assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1), f


def test_merge_is_atomic(tmp_path, monkeypatch):
    base = _ckpt(tmp_path, "qwen3_moe", "per_expert", 3)
    pm = _trained(base, steps=0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        moetune.merge_and_save(pm, tmp_path / "exists", progress=False)
    calls = []
    real = merge_mod.save_file

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(merge_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        moetune.merge_and_save(pm, tmp_path / "merged", progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted(["base-qwen3_moe", "exists"])  # nothing half-written


def test_per_expert_export_roundtrip(tmp_path):
    base = _ckpt(tmp_path, "mixtral", "per_expert", 1)
    pm = _trained(base, steps=1)
    out = moetune.export_per_expert_adapter(pm, tmp_path / "per_expert")
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.1.mlp.experts.7.w3.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"w1", "w2", "w3", "q_proj", "v_proj"} == set(cfg["target_modules"]) and not cfg["target_parameters"]
    deltas = merge_mod.per_expert_adapter_deltas(out)
    # Oracle: PEFT's own delta of the fused parameters (ParamWrapper.get_delta_weight) and of the Linear LoRAs.
    n = nl = 0
    for name, m in pm.named_modules():
        if isinstance(m, ParamWrapper):
            qual = merge_mod.model_name(name)
            with torch.no_grad():
                d = m.get_delta_weight("default").float()
            E = d.shape[0]
            if m.parameter_name == "gate_up_proj":
                I = d.shape[1] // 2
                parts = {"w1": d[:, :I], "w3": d[:, I:]}
            else:
                parts = {"w2": d}
            for proj, dd in parts.items():
                for e in range(E):
                    got = deltas[f"{qual}.{e}.{proj}"]
                    assert torch.allclose(got, dd[e], rtol=1e-5, atol=1e-7 * dd.abs().max().item()), (qual, e, proj)
                    n += 1
        elif isinstance(m, peft.tuners.lora.Linear):
            assert torch.allclose(deltas[merge_mod.model_name(name)], m.get_delta_weight("default"), rtol=1e-5)
            nl += 1
    assert n == 2 * 8 * 3 and nl == 2 * 2  # layers x experts x projections; layers x (q, v)


def test_merge_fp8_source_writes_bf16(tmp_path):
    """A block-FP8 source (DeepSeek-V3 as published) merges into a bf16 checkpoint
    in the same per-expert layout, without scales or quantization_config."""
    from test_load_model import _fp8_pair

    _, _, fp8_dir, _, _ = _fp8_pair(tmp_path)
    pm = _trained(fp8_dir, steps=1)
    ids = batch(seed=12)
    ours = _logits(pm, ids)
    out = moetune.merge_and_save(pm, tmp_path / "merged", progress=False)
    t = load_file(str(out / "model.safetensors"))
    src = load_file(str(fp8_dir / "model.safetensors"))
    assert set(t) == {k for k in src if not k.endswith("_scale_inv")}
    assert t["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    err = rel_max(_plain_logits(out, ids), ours)
    print(f"fp8 source merged (bf16 weights): {err / U:.3f} u")
    # One more rounding per weight (W + dW to bf16) than the engine path.
    assert err <= 8 * U


def test_per_expert_export_gpt_oss(tmp_path):
    """Transposed, interleaved gate/up (gpt-oss): per-expert deltas in nn.Linear
    orientation [out, in], against PEFT's own delta of the fused parameters."""
    base = _ckpt(tmp_path, "gpt_oss", "fused", 1)
    pm = _trained(base, steps=1)
    deltas = merge_mod.per_expert_adapter_deltas(moetune.export_per_expert_adapter(pm, tmp_path / "pe"))
    n = 0
    for name, m in pm.named_modules():
        if isinstance(m, ParamWrapper):
            qual = merge_mod.model_name(name)
            with torch.no_grad():
                d = m.get_delta_weight("default").float().transpose(1, 2)  # [E, out, in]
            parts = (
                {"gate_proj": d[:, 0::2], "up_proj": d[:, 1::2]}
                if m.parameter_name == "gate_up_proj"
                else {"down_proj": d}
            )
            for proj, dd in parts.items():
                for e in range(dd.shape[0]):
                    got = deltas[f"{qual}.{e}.{proj}"]
                    assert torch.allclose(got, dd[e], rtol=1e-5, atol=1e-7 * dd.abs().max().item()), (qual, e, proj)
                    n += 1
    assert n == 2 * 8 * 3
