"""moetune.hf with the rest of the model on a GPU: the experts stay in the CPU
engine (their placeholders never move), everything else runs on CUDA, and the
results match plain transformers + PEFT in fp32 on the CPU within the same
bf16-derived tolerances as test_hf_exactness.py. Skipped without CUDA.

These are the CPU engine's tests with the model on CUDA: they ask for placement "cpu" (the
default "auto" would also compute experts on the GPU there; test_hf_placement.py covers that)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_hf_exactness import U, batch, check_on_cuda, pair, rel_max  # noqa: E402

from moetune.hf import EngineHeldTensor  # noqa: E402


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
def test_rest_of_model_on_cuda(patch_first):
    ref, ours, handle = pair("qwen3_moe", patch_first=patch_first, placement="cpu")
    ours.to("cuda")
    held = [p for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert held and all(isinstance(p, EngineHeldTensor) and p.device.type == "cpu" for p in held)
    assert all(p.device.type == "cuda" for n, p in ours.named_parameters() if "lora_" in n)
    check_on_cuda(ref, ours, f"cuda patch_first={patch_first}")
    handle.undo()
    assert all(p.device.type == "cpu" for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))


# ---- moetune.load_model(device="cuda"): non-expert parts on the GPU, experts never ----


def _big_experts(family):
    """The family's tiny test model with experts large enough (32 experts of
    I = 1024: 25 MiB per layer in fp32) that one expert layer on the GPU would
    stand out far above the activations of a 2 x 16-token batch."""
    from test_hf_exactness import tiny

    if family == "gpt_oss":
        import transformers

        cls = transformers.GptOssForCausalLM
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
    else:
        cls, cfg = tiny(family)
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 32)
    if hasattr(cfg, "moe_intermediate_size"):
        cfg.moe_intermediate_size = 1024
    else:  # Mixtral, OLMoE: intermediate_size is the experts'
        cfg.intermediate_size = 1024
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(20.0)
            p.copy_(p.bfloat16().float())
    return model


def _tensor_bytes(model, device_type):
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == device_type and id(t) not in seen and not isinstance(t, EngineHeldTensor):
            seen.add(id(t))
            n += -(-t.numel() * t.element_size() // 512) * 512  # the caching allocator's 512-byte blocks
    return n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")
@pytest.mark.parametrize(
    "family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"]
)
def test_load_model_cuda_train_step(family, tmp_path):
    import peft
    from test_hf_exactness import LORA, ctx, lora_init_

    import moetune

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = _big_experts(family)
    ref.save_pretrained(tmp_path / "c")
    expert_layer_bytes = max(
        m.gate_up_proj.numel() * 4 + m.down_proj.numel() * 4 for m in ref.modules() if hasattr(m, "gate_up_proj")
    )
    assert expert_layer_bytes >= 24 * 2**20
    del ref
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = moetune.load_model(
        tmp_path / "c", device="cuda", dtype=torch.float32, ctx=ctx(), progress=False, placement="cpu"
    )
    loaded = torch.cuda.max_memory_allocated() - before
    nonexpert = _tensor_bytes(model, "cuda")
    print(
        f"{family}: GPU peak during load {loaded / 2**20:.2f} MiB, non-expert tensors {nonexpert / 2**20:.2f} MiB, "
        f"one expert layer {expert_layer_bytes / 2**20:.1f} MiB"
    )
    assert loaded <= nonexpert  # nothing but the non-expert tensors ever reached the GPU while loading
    assert all(p.device.type == "cpu" for p in model.parameters() if isinstance(p, EngineHeldTensor))
    assert all(p.device.type == "cuda" for p in model.parameters() if not isinstance(p, EngineHeldTensor))

    pm = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    lora_init_(pm)
    pm.train()
    lora_params = [p for p in pm.parameters() if p.requires_grad]
    # Not foreach: its temporaries would add the size of all LoRA tensors to the peak.
    opt = torch.optim.AdamW(lora_params, lr=1e-3, foreach=False)
    ids = batch().cuda()

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated between steps
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        return out

    step()  # warm-up: gradients, optimizer state, cuBLAS workspace
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    step_peak = torch.cuda.max_memory_allocated() - base
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
    print(f"  train step: GPU peak above steady state {step_peak / 2**20:.2f} MiB (LoRA {lora_bytes / 2**20:.2f} MiB)")
    # Above the steady state (weights, LoRA, its gradients and Adam state): the activations of
    # 32 tokens (well under 2 MiB) and transient gradient buffers of the GPU-side LoRA —
    # together under 3x the LoRA bytes. One expert layer (24 MiB) would not fit in that budget.
    budget = 3 * lora_bytes + 2 * 2**20
    assert budget < expert_layer_bytes
    assert step_peak <= budget
    # The experts' LoRA factors live with their base weights, on the CPU where the engine
    # reads them and writes their gradients (no PCIe round trip per step); every other
    # LoRA factor is on the GPU. Each gets a gradient on its own device.
    placed = {
        n: (p.device.type, p.grad.device.type if p.grad is not None else None)
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    expert_lora = {n for n in placed if ".experts." in n}
    assert expert_lora and len(expert_lora) < len(placed), sorted(placed)
    for n, (dev, gdev) in placed.items():
        want = "cpu" if n in expert_lora else "cuda"
        assert dev == want and gdev == want, (n, dev, gdev)

    # Same weights and adapter on the CPU path: same logits (8 u as in test_hf_exactness).
    cpu = peft.get_peft_model(
        moetune.load_model(tmp_path / "c", dtype=torch.float32, ctx=ctx(), progress=False), peft.LoraConfig(**LORA)
    )
    cpu.load_state_dict({k: v.cpu() for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    pm.eval()
    cpu.eval()
    with torch.no_grad():
        a = pm(input_ids=ids).logits.cpu()
        b = cpu(input_ids=ids.cpu()).logits
    err = rel_max(a, b)
    print(f"  logits cuda vs cpu: {err / U:.3f} u")
    assert err <= 8 * U


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_load_model_device_map_two_gpus(tmp_path):
    from test_hf_exactness import build, ctx

    import moetune

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = build("qwen3_moe")
    ref.save_pretrained(tmp_path / "c")
    dm = {"": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    model = moetune.load_model(
        tmp_path / "c", device=dm, dtype=torch.float32, ctx=ctx(), progress=False, placement="cpu"
    )
    assert model.model.layers[0].self_attn.q_proj.weight.device == torch.device("cuda", 0)
    assert model.model.layers[1].self_attn.q_proj.weight.device == torch.device("cuda", 1)
    assert model.lm_head.weight.device == torch.device("cuda", 1)
    ids = batch()
    with torch.no_grad():
        got = model(input_ids=ids.cuda(0)).logits.cpu()
        want = ref(input_ids=ids).logits
    assert rel_max(got, want) <= 8 * U
