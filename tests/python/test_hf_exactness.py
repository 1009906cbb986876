"""moetune.hf.patch on real transformers MoE models (+ PEFT LoRA) against plain
transformers + PEFT in fp32.

Setup
=====
Tiny random models from transformers' own config classes (2 layers, hidden 64,
8 experts, top-2; shared experts and group-limited routing where the family has
them). Every weight is rounded to a bf16-representable fp32 value,
and so are the LoRA factors (set to random values so the adapters contribute),
so the engine's rounding of its *operands* to bf16 is exact and only its
rounding of intermediates (the experts' input activations, z = A x, h, the
upstream gradients...) separates it from the fp32 reference (PEFT's own
W + s B A path). The router logits are scaled up (x20) so that top-k choices
have margins far above these perturbations: a flipped expert choice in
layer 2 would be a discontinuity, not an arithmetic error.

Tolerances (u = 2^-8, the bf16 unit roundoff; see test_moe_op.py for the
per-op rounding count)
==========
* logits: max|d| <= 8 u max|ref|. One experts layer's output carries at most
  c = 8 roundings (test_moe_op's `out` row); the two layers' errors enter the
  residual stream additively and the model does not amplify them (observed
  max|d| / (u max|ref|) = 0.09-0.47 over the seven families).
* loss: |d| <= 8 u |ref| (a smooth function of the logits).
* LoRA gradients (experts and attention): ||g - g_ref||_F <= 14 u ||g_ref||_F,
  the worst row of test_moe_op's table (dA, dx: c = 14), norm-wise (observed
  worst tensor 1.2-1.75 u).
* 20 AdamW steps: |loss_t - ref_t| <= 16 u |ref_t| at every step: the one-step
  errors above, compounded over 20 steps of an optimizer that normalises
  updates (observed 0.7-2.7 u).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
import moetune.hf.patching as patch_mod  # noqa: E402

U = 2.0**-8
LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    lora_dropout=0.0,
)
_CTX = None


def ctx():
    global _CTX
    if _CTX is None:
        _CTX = moetune.Context(num_threads=1)
    return _CTX


def tiny(family: str):
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, num_experts=8, head_dim=16, norm_topk_prob=True, **common
        )
        return transformers.Qwen3MoeForCausalLM, cfg
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=32, num_local_experts=8, head_dim=16, **common)
        return transformers.MixtralForCausalLM, cfg
    if family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=32, num_experts=8, norm_topk_prob=False, **common)
        return transformers.OlmoeForCausalLM, cfg
    # Multi-head latent attention (q_lora_rank=None: a plain q_proj, which LORA targets).
    mla = dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16
    )
    if family == "deepseek_v3":
        # Group-limited sigmoid routing (2 groups of 4, 1 group kept), one shared expert, no dense layers.
        cfg = transformers.DeepseekV3Config(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            **{**common, **mla},
        )
        return transformers.DeepseekV3ForCausalLM, cfg
    if family == "deepseek_v2":
        # Softmax routing, not renormalised; routed_scaling_factor 2.5 (V3's) so the expert LoRA visibly matters.
        cfg = transformers.DeepseekV2Config(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5,
            **{**common, **mla},
        )
        return transformers.DeepseekV2ForCausalLM, cfg
    if family == "glm4_moe":
        cfg = transformers.Glm4MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            head_dim=16,
            **common,
        )
        return transformers.Glm4MoeForCausalLM, cfg
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            **common,
        )
        return transformers.Qwen2MoeForCausalLM, cfg
    raise KeyError(family)


def bf16_round_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.bfloat16().float())


def build(family: str, seed: int = 0):
    cls, cfg = tiny(family)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)
    bf16_round_(model)
    return model


def lora_init_(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).bfloat16().float())


def pair(family: str, *, patch_first: bool, seed: int = 0, **patch_kw):
    """(reference PEFT model, moetune PEFT model, handle) with identical weights."""
    return peft_pair(build(family, seed), patch_first=patch_first, **patch_kw)


def peft_pair(base, *, patch_first: bool, **patch_kw):
    """PEFT (LORA) on a deep copy of `base` (the reference) and on `base` patched by moetune
    (patch_kw: moetune.hf.patch's options, e.g. placement=...), before or after PEFT, with
    identical LoRA factors: (ref, ours, handle)."""
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    lora_init_(ref)
    if patch_first:
        handle = moetune.hf.patch(base, ctx=ctx(), **patch_kw)
        ours = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    else:
        ours = peft.get_peft_model(base, peft.LoraConfig(**LORA))
        handle = moetune.hf.patch(ours, ctx=ctx(), **patch_kw)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad
        if "lora_" in n1:
            assert torch.equal(p1, p2)
    return ref, ours, handle


def batch(seed: int = 2, B: int = 2, T: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (B, T), generator=g)


def rel_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_fro(a, b):
    return ((a - b).norm() / b.norm()).item()


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


FAMILIES = {
    "qwen3_moe": "Qwen3-MoE",
    "mixtral": "Mixtral",
    "olmoe": "OLMoE",
    "qwen2_moe": "Qwen2-MoE",
    "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3",
    "glm4_moe": "GLM-4-MoE",
}


def check_one_step(ref, ours, label: str, *, tol_logits: float = 8 * U, tol_grad: float = 14 * U) -> dict:
    """Logits, loss and every LoRA gradient of one step, ours vs the fp32 reference
    (tolerances in the module docstring; tol_*: other tables, e.g. the GPU path's); then the
    adapter disabled through PEFT. Returns ours' logits and LoRA grads."""
    ids = batch()
    # The LoRA matters: disabling it changes the logits far beyond the tolerance.
    with ref.disable_adapter(), torch.no_grad():
        no_lora = ref(input_ids=ids).logits
    out_ref = ref(input_ids=ids, labels=ids)
    out = ours(input_ids=ids, labels=ids)
    assert rel_max(no_lora, out_ref.logits) > 50 * U
    err = rel_max(out.logits, out_ref.logits)
    print(
        f"{label}: logits {err / U:.3f} u, loss "
        f"{abs(out.loss.item() - out_ref.loss.item()) / abs(out_ref.loss.item()) / U:.3f} u"
    )
    assert err <= tol_logits, f"logits max err {err / U:.2f} u"
    assert abs(out.loss.item() - out_ref.loss.item()) <= tol_logits * abs(out_ref.loss.item())
    out_ref.loss.backward()
    out.loss.backward()
    g_ref, g = lora_grads(ref), lora_grads(ours)
    assert g.keys() == g_ref.keys()
    assert any("experts" in n for n in g) and any("q_proj" in n for n in g)
    worst = (0.0, "")
    for n in g_ref:
        assert g_ref[n].norm() > 0, n
        e = rel_fro(g[n], g_ref[n])
        worst = max(worst, (e, n))
        assert e <= tol_grad, f"{n}: grad err {e / U:.2f} u"
    print(f"  worst grad err {worst[0] / U:.3f} u ({worst[1]})")
    # Adapters disabled through PEFT: the engine runs without LoRA.
    with ours.disable_adapter(), torch.no_grad():
        assert rel_max(ours(input_ids=ids).logits, no_lora) <= tol_logits
    return {"logits": out.logits.detach(), "grads": g}


def check_on_cuda(
    ref, ours, label: str, *, tol_logits: float = 8 * U, tol_grad: float = 14 * U, grads_on: str = "cuda"
) -> None:
    """`ours` moved to CUDA against the CPU fp32 reference: logits, loss backward and every LoRA
    grad (on `grads_on`) within the check_one_step tolerances (or the given ones)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = batch()
    out_ref = ref(input_ids=ids, labels=ids)
    out = ours(input_ids=ids.cuda(), labels=ids.cuda())
    assert out.logits.device.type == "cuda"
    err = rel_max(out.logits.cpu(), out_ref.logits)
    print(f"{label}: logits {err / U:.3f} u")
    assert err <= tol_logits
    out_ref.loss.backward()
    out.loss.backward()
    g_ref, g = lora_grads(ref), lora_grads(ours)
    for n in g_ref:
        assert g[n].device.type == grads_on
        assert rel_fro(g[n].cpu(), g_ref[n]) <= tol_grad, n


def check_trajectory(
    ref,
    ours,
    checkpointing,
    monkeypatch,
    label: str,
    *,
    counted=(patch_mod, "moe_experts"),
    tol: float = 16 * U,
    after_step=None,
) -> None:
    """20 AdamW steps on one batch, ours vs the reference, with gradient checkpointing
    off (None), "nonreentrant" or "reentrant". counted: the (module, function) every experts
    call of ours goes through (counted in the first step); after_step: called after each of
    ours' optimizer steps (e.g. the placement's end_step)."""
    calls = []
    real = getattr(*counted)
    monkeypatch.setattr(*counted, lambda *a, **k: calls.append(1) or real(*a, **k))
    for m in (ref, ours):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, ours)]
    losses = ([], [])
    ids = batch(seed=100)  # one batch, memorised: the loss must go down
    for step in range(20):
        for m, opt, rec in zip((ref, ours), opts, losses):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            rec.append(loss.item())
        if after_step is not None:
            after_step()
        if step == 0:
            # 2 MoE layers: forward only, or forward + recompute in backward.
            assert len(calls) == (4 if checkpointing else 2)
            # Every LoRA factor got a gradient through the (checkpointed) layers in
            # both models, so matching trajectories are not matching no-ops.
            for m in (ref, ours):
                dead = [
                    n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.norm() == 0)
                ]
                assert not dead, f"no gradient reached {dead}"
    lr, lo = torch.tensor(losses[0]), torch.tensor(losses[1])
    assert lr[-1] < lr[0] - 0.05, "the reference did not train; the comparison would be vacuous"
    err = ((lo - lr).abs() / lr.abs()).max().item()
    print(f"{label} trajectory: ref {lr[0]:.4f} -> {lr[-1]:.4f}; max rel err {err / U:.3f} u")
    assert err <= tol, f"loss trajectory max rel err {err / U:.2f} u\nref {lr.tolist()}\nours {lo.tolist()}"


CHECKPOINTING = dict(
    argnames="checkpointing",
    argvalues=[None, "nonreentrant", "reentrant"],
    ids=["no_ckpt", "ckpt_nonreentrant", "ckpt_reentrant"],
)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
def test_forward_and_one_step(family, patch_first):
    ref, ours, handle = pair(family, patch_first=patch_first)
    assert handle.families == [FAMILIES[family]]
    check_one_step(ref, ours, f"{family} patch_first={patch_first}")
    handle.undo()


@pytest.mark.parametrize(**CHECKPOINTING)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_trajectory(family, checkpointing, monkeypatch):
    ref, ours, handle = pair(family, patch_first=True)
    check_trajectory(ref, ours, checkpointing, monkeypatch, family)
    handle.undo()


_LOAD_SCRIPT = textwrap.dedent("""
    import sys

    class _NoMoetune:
        def find_spec(self, name, path=None, target=None):
            if name == "moetune" or name.startswith("moetune."):
                raise ImportError("moetune is blocked in this process")
            return None

    sys.meta_path.insert(0, _NoMoetune())
    sys.path = [p for p in sys.path if "moetune" not in p and not p.rstrip("/").endswith("/python")]
    import torch, transformers, peft
    base_dir, adapter_dir, ids_path, out_path = sys.argv[1:5]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter_dir)
    assert "moetune" not in sys.modules
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits
    torch.save(logits, out_path)
""")


def stock_peft_logits(base_dir, adapter_dir, ids, tmp_path):
    """Logits of base + adapter in a subprocess with plain transformers + PEFT and
    moetune blocked from import."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            str(base_dir),
            str(adapter_dir),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_save_pretrained_is_a_standard_adapter(tmp_path):
    base = build("qwen3_moe")
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
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(LORA["target_parameters"])
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in saved) and any("experts" in k for k in saved)
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in saved)
    ids = batch(seed=7)
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
    plain = stock_peft_logits(tmp_path / "base", tmp_path / "adapter", ids, tmp_path)
    err = rel_max(logits, plain)
    print(f"reloaded adapter in plain transformers+peft: logits {err / U:.3f} u")
    assert err <= 8 * U, f"reloaded-adapter logits err {err / U:.2f} u"
    handle.undo()
