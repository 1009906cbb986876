"""A short LoRA run on a tiny transformers Qwen3-MoE with int8 / int4 experts.

Model: tiny random Qwen3-MoE (2 layers, hidden 64, 8 experts, top-2), expert
weights ~ N(0, 1/fan_in) (so the experts carry a real share of the residual
stream: with HF's 0.02 init they would hardly matter and nothing could fail),
bf16-representable; patched with moetune.hf.patch(weight_format=...); PEFT
LoRA r=4 on the experts only (every trained parameter's gradient goes
through the quantized engine); 12 AdamW steps memorising one batch.

What is checked, per format (int8, int4 g32; the other group sizes share
every code path and are covered by test_moe_op_quant.py):
1. Exactness of the quantized path over training: the loss trajectory equals,
   bit for bit, the bf16 engine's trajectory on a model whose expert weights
   were replaced by dq(q(W)) from the plain-PyTorch reference
   (quant_reference.py). So the run trains the quantized model with its exact
   gradients.
2. The quantized model's relative weight error is what symmetric RTN gives for
   Gaussian weights (int8 <= 1.5%, int4 g32 <= 13%; expected ~0.6-0.9% and
   ~10%: step amax/Q, error ~ step/sqrt(12)).
3. Closeness to bf16: cross-entropy is 2-Lipschitz in the max-norm of the
   logits (its gradient softmax - onehot has l1 norm <= 2), so for identical
   LoRA parameters |L_q - L_bf| <= D0 := 2 * mean_t max_v |z_q - z_bf|. D0 is
   measured at step 0 (both runs start from the same parameters). The two
   runs then take different (but small: lr 2e-2, 12 steps) optimizer steps,
   so the test allows twice that: |L_q(t) - L_bf(t)| <= 2 * D0 at every step,
   and requires both runs to train (loss down by >= 15%). A broken quantized
   forward or backward fails 1; gradients of the wrong model fail 1 and
   typically 3.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quant_reference import dequantized  # noqa: E402
from test_hf_exactness import ctx  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402

STEPS = 12


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"]


def build(dq_format=None, dq_group=None):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    m = transformers.Qwen3MoeForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
        for ex in experts_modules(m):
            for w in (ex.gate_up_proj, ex.down_proj):
                w.copy_((torch.randn(w.shape, generator=g) / w.shape[-1] ** 0.5).bfloat16().float())
                if dq_format is not None:
                    w.copy_(dequantized(w, dq_format, dq_group or 0).float())
    return m


def run(weight_format="bf16", group_size=None, *, dq_format=None, dq_group=None):
    """Trains; returns (losses, step-0 logits, expert weights as patched)."""
    m = build(dq_format, dq_group)
    weights = [w.detach().clone() for ex in experts_modules(m) for w in (ex.gate_up_proj, ex.down_proj)]
    moetune.hf.patch(m, ctx(), weight_format=weight_format, group_size=group_size)
    torch.manual_seed(3)  # same LoRA init in every run
    pm = peft.get_peft_model(
        m,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=[],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    losses, logits0 = [], None
    for step in range(STEPS):
        opt.zero_grad()
        out = pm(input_ids=ids, labels=ids)
        if step == 0:
            logits0 = out.logits.detach().clone()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses, logits0, weights


@pytest.fixture(scope="module")
def bf16_run():
    return run()


@pytest.mark.parametrize("fmt,group,max_werr", [("int8", None, 0.015), ("int4", 32, 0.13)], ids=["int8", "int4g32"])
def test_loss_trajectory_close_to_bf16_and_exact_for_quantized_model(bf16_run, fmt, group, max_werr):
    l_bf, z_bf, w_bf = bf16_run
    l_q, z_q, _ = run(fmt, group)
    # 1. exactly the bf16 engine on dq(q(W)).
    l_dq, _, w_dq = run("bf16", dq_format=fmt, dq_group=group)
    assert l_q == l_dq, f"{fmt}{group or ''}: trajectory differs from bf16 on dq(q(W))\n{l_q}\n{l_dq}"
    # 2. the quantized model is the expected perturbation of the bf16 one.
    werr = max(((a - b).norm() / b.norm()).item() for a, b in zip(w_dq, w_bf))
    assert 0 < werr <= max_werr, f"relative expert weight error {werr:.4f}"
    # 3. close to bf16.
    d0 = 2 * (z_q - z_bf).abs().amax(-1)[:, :-1].mean().item()  # the loss uses T-1 positions
    lb, lq = torch.tensor(l_bf), torch.tensor(l_q)
    gap = (lq - lb).abs()
    print(
        f"{fmt}{'g' + str(group) if group else ''}: weight err {werr:.4f}, D0 {d0:.4g}, max|dL| {gap.max():.4g}, "
        f"loss {l_bf[0]:.4f}->{l_bf[-1]:.4f} (bf16) vs {l_q[0]:.4f}->{l_q[-1]:.4f}"
    )
    assert abs(l_q[0] - l_bf[0]) <= d0, "step-0 loss gap above the Lipschitz bound"
    assert (gap <= 2 * d0).all(), f"loss gap {gap.tolist()} > 2*D0 = {2 * d0:.4g}\nbf16 {l_bf}\n{fmt} {l_q}"
    assert l_bf[-1] <= 0.85 * l_bf[0] and l_q[-1] <= 0.85 * l_q[0], "the run did not train"
