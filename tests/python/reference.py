"""Reference implementation of one MoE layer's routed experts (SwiGLU + LoRA).

This is deliberately the obvious per-expert loop in eager PyTorch, in fp32,
with autograd doing the backward.  It is the ground truth for
tests/python/test_moe_op.py.

Math, per token t and slot j with expert e = topk_ids[t, j], w = topk_weights[t, j]:

    g = Wg[e] x + s Bg[e] (Ag[e] x)
    u = Wu[e] x + s Bu[e] (Au[e] x)
    h = silu(g) * u
    y = Wd[e] h + s Bd[e] (Ad[e] h)
    out[t] = sum_j w * y

Shapes: x [T, H]; topk_ids / topk_weights [T, k]; gate_proj, up_proj [E, I, H];
down_proj [E, H, I]; LoRA A [E, r, in], B [E, out, r]; s = alpha / r.

gpt-oss variant (``activation="gpt_oss"``, optional ``biases``): g and u get
their biases bg, bu [E, I] before the activation, y gets bd [E, H], and

    gc = min(g, limit),  uc = clamp(u, -limit, limit)
    h  = (uc + 1) * gc * sigmoid(alpha * gc)

with torch.clamp's gradient (1 inside the closed interval, 0 outside). The
clamp is continuous but its derivative jumps at the limit, so a pre-activation
that the engine's documented bf16 roundings move across the limit would flip a
whole gradient element: a discontinuity, not an arithmetic error. The
reference therefore decides clamp *membership* on bf16(g_r), g_r being g
computed with the engine's one rounding before it (the LoRA operand
bf16(s * A x)); the values themselves stay exact fp32.

``emulate_bf16=True`` additionally rounds every intermediate the engine is
documented to round (s*(A x), the pre-activations g and u, h, s*(Ad h)) to
bf16 in the forward, and rounds the gradients flowing back through those
points (plus dy) in the backward.  It is *not* used as ground truth: the test
file uses it only to check that its tolerance table is attainable by a
correct bf16 implementation (i.e. that the table is not too tight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

PROJS: tuple[str, str, str] = ("gate", "up", "down")

LoraDict = Mapping[str, tuple[torch.Tensor, torch.Tensor] | None]


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bf16 value (ties to even), keep t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


class _RoundFwdBwd(torch.autograd.Function):
    """Identity up to bf16 rounding: rounds the value in forward and the gradient in backward."""

    @staticmethod
    def forward(ctx, t):  # noqa: D401
        return bf16_round(t)

    @staticmethod
    def backward(ctx, g):
        return bf16_round(g)


class _RoundBwd(torch.autograd.Function):
    """Identity in forward, rounds the incoming gradient to bf16 in backward."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return bf16_round(g)


def _lora_delta(inp, A, B, scaling, emulate):
    z = scaling * F.linear(inp, A)  # s * (A x)  [n, r]
    if emulate:
        z = _RoundFwdBwd.apply(z)
    return F.linear(z, B)  # B (s A x)  [n, out]


def _rounded_preact(xe, W, pair, scaling, bias):
    """The pre-activation as the engine rounds its operands (no autograd), for clamp membership."""
    with torch.no_grad():
        v = F.linear(xe, W)
        if pair is not None:
            A, B = pair
            v = v + F.linear(bf16_round(scaling * F.linear(xe, A)), B)
        return v if bias is None else v + bias


def _activation(g, u, activation, alpha, limit, g_r, u_r):
    if activation == "swiglu":
        return F.silu(g) * u
    assert activation == "gpt_oss", activation
    g_in = bf16_round(g_r) <= limit
    ub = bf16_round(u_r)
    u_in = (ub >= -limit) & (ub <= limit)
    gc = torch.where(g_in, g, g.detach().clamp(max=limit))
    uc = torch.where(u_in, u, u.detach().clamp(-limit, limit))
    return (uc + 1) * (gc * torch.sigmoid(alpha * gc))


def moe_forward_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: LoraDict | None = None,
    scaling: float = 1.0,
    expert_mask: torch.Tensor | None = None,
    emulate_bf16: bool = False,
    activation: str = "swiglu",
    alpha: float = 1.702,
    limit: float = 7.0,
    biases: Mapping[str, torch.Tensor | None] | None = None,
):
    """Forward of the routed experts; differentiable by autograd.

    All floating tensors must already be fp32 (callers upcast bf16 inputs).
    Returns ``(out [T, H], ys [T, k, H])`` where ``ys[t, j]`` is the
    *unweighted* output y of the expert in slot j of token t (zero for masked
    experts); ``ys`` is what d(topk_weights) is a dot product with.
    """
    for name, t in (
        ("x", x),
        ("topk_weights", topk_weights),
        ("gate_proj", gate_proj),
        ("up_proj", up_proj),
        ("down_proj", down_proj),
    ):
        assert t.dtype == torch.float32, f"reference expects fp32 {name}, got {t.dtype}"
    lora = dict(lora or {})
    biases = {p: (None if b is None else b.to(torch.float32)) for p, b in (biases or {}).items()}
    T, H = x.shape
    k = topk_ids.shape[1]
    E = gate_proj.shape[0]
    ids = topk_ids.long()

    out = x.new_zeros(T, H)
    ys = x.new_zeros(T * k, H)
    for e in range(E):
        if expert_mask is not None and not bool(expert_mask[e]):
            continue
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        g = F.linear(xe, gate_proj[e])
        u = F.linear(xe, up_proj[e])
        if lora.get("gate") is not None:
            A, B = lora["gate"]
            g = g + _lora_delta(xe, A[e], B[e], scaling, emulate_bf16)
        if lora.get("up") is not None:
            A, B = lora["up"]
            u = u + _lora_delta(xe, A[e], B[e], scaling, emulate_bf16)
        bg, bu, bd = (None if biases.get(p) is None else biases[p][e] for p in PROJS)
        if bg is not None:
            g = g + bg
        if bu is not None:
            u = u + bu
        if emulate_bf16:
            g = _RoundFwdBwd.apply(g)
            u = _RoundFwdBwd.apply(u)
        g_r = u_r = None
        if activation != "swiglu":
            pair = lambda p: None if lora.get(p) is None else (lora[p][0][e], lora[p][1][e])  # noqa: E731
            g_r = g.detach() if emulate_bf16 else _rounded_preact(xe, gate_proj[e], pair("gate"), scaling, bg)
            u_r = u.detach() if emulate_bf16 else _rounded_preact(xe, up_proj[e], pair("up"), scaling, bu)
        h = _activation(g, u, activation, alpha, limit, g_r, u_r)
        if emulate_bf16:
            h = _RoundFwdBwd.apply(h)
        y = F.linear(h, down_proj[e])
        if lora.get("down") is not None:
            A, B = lora["down"]
            y = y + _lora_delta(h, A[e], B[e], scaling, emulate_bf16)
        if bd is not None:
            y = y + bd
        if emulate_bf16:
            y = _RoundBwd.apply(y)  # dy is a bf16 GEMM operand in backward
        w = topk_weights[tok, slot].unsqueeze(1)
        out = out.index_add(0, tok, w * y)
        ys = ys.index_add(0, tok * k + slot, y)
    return out, ys.view(T, k, H)


def reference_forward_backward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: LoraDict | None,
    scaling: float,
    dout: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
    emulate_bf16: bool = False,
    **variant,
) -> dict:
    """Runs the reference forward and its autograd backward in fp32.

    Inputs may be bf16 or fp32 (they are upcast; bf16 values are exact in
    fp32).  ``dout`` is the upstream gradient of ``out``.  Returns a dict with
    fp32 tensors: ``out``, ``ys`` (see moe_forward_reference), ``dx``,
    ``dtopk_weights``, and ``dA`` / ``dB``: dicts proj -> gradient, only for
    the projections present in ``lora``. ``variant``: activation, alpha, limit,
    biases of moe_forward_reference (the gpt-oss experts).
    """
    f32 = lambda t: t.detach().to(torch.float32)  # noqa: E731
    x32 = f32(x).requires_grad_(True)
    w32 = f32(topk_weights).requires_grad_(True)
    lora32 = {}
    leaves = [x32, w32]
    for p in PROJS:
        pair = (lora or {}).get(p)
        if pair is None:
            continue
        A32 = f32(pair[0]).requires_grad_(True)
        B32 = f32(pair[1]).requires_grad_(True)
        lora32[p] = (A32, B32)
        leaves += [A32, B32]
    with torch.enable_grad():
        out, ys = moe_forward_reference(
            x32,
            topk_ids,
            w32,
            f32(gate_proj),
            f32(up_proj),
            f32(down_proj),
            lora=lora32,
            scaling=scaling,
            expert_mask=expert_mask,
            emulate_bf16=emulate_bf16,
            **variant,
        )
        grads = torch.autograd.grad(out, leaves, grad_outputs=f32(dout), allow_unused=True)
    grads = [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]
    res = {"out": out.detach(), "ys": ys.detach(), "dx": grads[0], "dtopk_weights": grads[1], "dA": {}, "dB": {}}
    i = 2
    for p in PROJS:
        if p in lora32:
            res["dA"][p] = grads[i]
            res["dB"][p] = grads[i + 1]
            i += 2
    return res


def experts_without_tokens(
    topk_ids: torch.Tensor, num_experts: int, expert_mask: torch.Tensor | None = None
) -> Sequence[int]:
    """Experts that receive no (unmasked) token: their LoRA gradients must be exactly zero."""
    used = torch.zeros(num_experts, dtype=torch.bool)
    used[topk_ids.long().flatten()] = True
    if expert_mask is not None:
        used &= expert_mask.bool()
    return [e for e in range(num_experts) if not bool(used[e])]
