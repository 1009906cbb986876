"""gpt-oss through moetune.hf.patch + PEFT `target_parameters` LoRA, against plain
transformers + PEFT in fp32 (see test_hf_exactness.py for the setup and the
tolerances, which are the same here), and the adapter round trip into stock
transformers + PEFT without moetune.

gpt-oss's experts differ from the SwiGLU families: gate_up_proj [E, H, 2I]
(transposed, gate/up interleaved along 2I), down_proj [E, I, H], biases on both,
and the clamped SwiGLU (alpha, limit). The tiny model's pre-activations are
O(0.1), far below limit 7, so a quarter of the gate/up bias entries are set to
+-9: those units sit clamped (g above 7; u above 7 or below -7) with a margin
of several units, so the clamps act in the forward and in the gradients
without any pre-activation near a limit (where the engine's bf16 rounding of g,
u could flip the clamp's derivative: a discontinuity, not an arithmetic error).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_hf_exactness import (  # noqa: E402
    CHECKPOINTING,
    LORA,
    U,
    batch,
    bf16_round_,
    check_on_cuda,
    check_one_step,
    check_trajectory,
    ctx,
    lora_init_,
    peft_pair,
    rel_max,
    stock_peft_logits,
)

import moetune  # noqa: E402
import moetune.hf  # noqa: E402


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]


def build(seed: int = 0):
    cfg = transformers.GptOssConfig(
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                p.mul_(20.0)  # top-k margins far above the engine's rounding (see test_hf_exactness)
            if name.endswith("gate_up_proj_bias"):
                pick = torch.rand(p.shape, generator=g)
                p.copy_(torch.where(pick < 0.125, 9.0, torch.where(pick < 0.25, -9.0, p)))
            if name.endswith("down_proj_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # visible in the output and in d topk_weights
    bf16_round_(model)
    for m in experts_modules(model):
        assert (m.alpha, m.limit) == (1.702, 7.0)
    return model


def clamped_fraction(model, ids):
    """Fraction of routed (g, u) elements beyond the limits in the reference model."""
    seen = []

    def hook(m, args, out):
        x, idx = args[0], args[1]
        for e in idx.unique().tolist():
            tok = (idx == e).any(-1)
            gu = x[tok] @ m.gate_up_proj[e] + m.gate_up_proj_bias[e]
            g, u = gu[..., ::2], gu[..., 1::2]
            seen.append(
                (
                    (g > m.limit).float().mean().item(),
                    (u.abs() > m.limit).float().mean().item(),
                    ((g - m.limit).abs().min().item(), ((u.abs() - m.limit).abs().min().item())),
                )
            )

    hs = [m.register_forward_hook(hook) for m in experts_modules(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    return seen


def pair(*, patch_first: bool, seed: int = 0, **patch_kw):
    return peft_pair(build(seed), patch_first=patch_first, **patch_kw)


def test_clamps_act_with_margin():
    model = build()
    stats = clamped_fraction(model, batch())
    assert stats
    assert max(s[0] for s in stats) > 0.05 and max(s[1] for s in stats) > 0.05, "clamps not exercised"
    assert min(s[2][0] for s in stats) > 0.5 and min(s[2][1] for s in stats) > 0.5, "a pre-activation near a limit"


@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
def test_forward_and_one_step(patch_first):
    ref, ours, handle = pair(patch_first=patch_first)
    assert handle.families == ["gpt-oss"]
    for m in experts_modules(ours):
        for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            assert isinstance(getattr(m, n), moetune.hf.EngineHeldTensor), n
    check_one_step(ref, ours, f"gpt-oss patch_first={patch_first}")
    handle.undo()
    for m in experts_modules(ours):
        assert not isinstance(m.gate_up_proj_bias, moetune.hf.EngineHeldTensor)


@pytest.mark.parametrize(**CHECKPOINTING)
def test_training_trajectory(checkpointing, monkeypatch):
    ref, ours, handle = pair(patch_first=True)
    check_trajectory(ref, ours, checkpointing, monkeypatch, "gpt-oss")
    handle.undo()


def test_save_pretrained_loads_in_stock_transformers_peft(tmp_path):
    base = build()
    base.save_pretrained(tmp_path / "base")
    handle = moetune.hf.patch(base, ctx=ctx())
    ours = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    lora_init_(ours)
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=3e-3)
    for step in range(3):
        ids = batch(seed=200 + step)
        opt.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    ours.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in saved) and any("experts" in k for k in saved)
    assert not any(k.endswith(("gate_up_proj", "down_proj", "_bias")) for k in saved)
    ids = batch(seed=7)
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
    plain = stock_peft_logits(tmp_path / "base", tmp_path / "adapter", ids, tmp_path)
    err = rel_max(logits, plain)
    print(f"gpt-oss adapter reloaded in plain transformers+peft: logits {err / U:.3f} u")
    assert err <= 8 * U, f"reloaded-adapter logits err {err / U:.2f} u"
    handle.undo()
    # ... and back into moetune (to resume training): the same logits.
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    handle2 = moetune.hf.patch(again, ctx=ctx())
    again = peft.PeftModel.from_pretrained(again, tmp_path / "adapter", is_trainable=True)
    with torch.no_grad():
        resumed = again(input_ids=ids).logits
    assert torch.equal(resumed, logits), f"resumed logits differ: {rel_max(resumed, logits) / U:.3f} u"
    handle2.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")
def test_rest_of_model_on_cuda():
    """Experts (weights and biases) stay in the CPU engine (placement "cpu"); the rest runs on CUDA; results
    match the CPU fp32 reference within the same tolerances."""
    ref, ours, handle = pair(patch_first=True, placement="cpu")
    ours.to("cuda")
    held = [p for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj", "_proj_bias"))]
    assert len(held) == 8 and all(isinstance(p, moetune.hf.EngineHeldTensor) and p.device.type == "cpu" for p in held)
    check_on_cuda(ref, ours, "gpt-oss cuda")
    handle.undo()
