"""Which modules `moetune train` puts LoRA on: attention, dense MLP (dense layers and
shared experts, never routers/gates), routed experts (engine-held), each switchable."""

from __future__ import annotations

import re

import pytest
import torch

peft = pytest.importorskip("peft")

from test_hf_exactness import tiny  # noqa: E402

import moetune.hf  # noqa: E402
from moetune.hf import peft_lora  # noqa: E402
from moetune.train.config import make_config  # noqa: E402
from moetune.train.model import apply_lora, lora_targets  # noqa: E402


def build(family, **cfg_kw):
    cls, cfg = tiny(family)
    for k, v in cfg_kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = cls(cfg).float()
    return model, moetune.hf.patch(model, num_threads=1)


def lora_names(pm):
    return sorted({n.split(".lora_A")[0] for n, p in pm.named_parameters() if ".lora_A." in n and p.requires_grad})


def test_qwen2_moe_targets(tmp_path):
    model, handle = build("qwen2_moe")
    cfg = make_config(None, {"output_dir": str(tmp_path)})
    regex, params = lora_targets(model, cfg, handle.module_names)
    assert params == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = sorted(n for n in names if re.fullmatch(regex, n))
    assert {n.split(".", 3)[-1] for n in hit} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    }
    assert len(hit) == 2 * 7  # two layers
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate", "lm_head")) for n in hit)
    pm = apply_lora(model, make_config(None, {"output_dir": str(tmp_path), "lora_dropout": 0.1}), handle)
    got = lora_names(pm)
    assert any(n.endswith("self_attn.q_proj") for n in got) and any(n.endswith("shared_expert.up_proj") for n in got)
    wrappers = [m for m in pm.modules() if peft_lora.is_param_wrapper(m)]
    assert len(wrappers) == 4  # gate_up + down per layer
    # dropout on ordinary LoRA layers only; expert LoRA (engine) has none
    drops = [
        type(m.lora_dropout["default"]).__name__
        for m in pm.modules()
        if hasattr(m, "lora_dropout") and "default" in getattr(m, "lora_dropout", {})
    ]
    assert "Dropout" in drops
    assert all(isinstance(w.lora_dropout["default"], torch.nn.Identity) for w in wrappers)
    assert pm.peft_config["default"].lora_dropout == 0.0  # loadable by plain PEFT with target_parameters


@pytest.mark.parametrize("switch", ["lora_attention", "lora_mlp", "lora_experts"])
def test_each_part_switches_off(tmp_path, switch):
    model, handle = build("qwen2_moe")
    pm = apply_lora(model, make_config(None, {"output_dir": str(tmp_path), switch: False}), handle)
    got = lora_names(pm)
    has = {
        "lora_attention": any("self_attn" in n for n in got),
        "lora_mlp": any("shared_expert" in n for n in got),
        "lora_experts": any(peft_lora.is_param_wrapper(m) for m in pm.modules()),
    }
    assert has == {k: k != switch for k in has}, got


def test_seeded_init(tmp_path):
    outs = []
    for seed in (0, 0, 1):
        model, handle = build("qwen3_moe")
        pm = apply_lora(model, make_config(None, {"output_dir": str(tmp_path), "seed": seed}), handle)
        outs.append(torch.cat([p.detach().flatten() for n, p in pm.named_parameters() if "lora_A" in n]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
