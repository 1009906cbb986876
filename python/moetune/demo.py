"""The embedded demo: LoRA-tune one MoE layer's experts on the CPU engine.

A "teacher" layer is the frozen base experts plus a hidden low-rank change
of every expert; the "student" is the same base experts with trainable LoRA
(PEFT's init: A random, B zero). Training the student's LoRA through the
engine's exact backward must recover the teacher's outputs: the loss falls
by orders of magnitude. Everything is seeded and made locally.
"""

from __future__ import annotations

import time

import torch

from moetune.engine import Context, LoraWeights, MoEExperts, moe_experts


def run_demo(*, steps: int = 200, num_threads: int | None = None, seed: int = 0,
             log_every: int = 15, quiet: bool = False) -> dict:
    torch.manual_seed(seed)
    E, H, I, k, r, T = 16, 128, 96, 2, 8, 256
    ctx = Context(num_threads)
    say = (lambda *a: None) if quiet else print
    say(f"moetune demo: one MoE layer, E={E} experts, H={H}, I={I}, top-{k}, LoRA r={r} on gate/up/down")
    say(f"engine: {ctx.info()}")

    def rand(*shape, scale):
        return (torch.randn(*shape) * scale).to(torch.bfloat16)

    Wg, Wu, Wd = rand(E, I, H, scale=H ** -0.5), rand(E, I, H, scale=H ** -0.5), rand(E, H, I, scale=I ** -0.5)
    experts = MoEExperts(ctx, Wg, Wu, Wd)
    router = torch.nn.Linear(H, E, bias=False)

    # The hidden change the student has to learn (rank 4 < r).
    def delta(out_dim, in_dim):
        return (torch.randn(E, 4, in_dim) * in_dim ** -0.5, torch.randn(E, out_dim, 4) * 0.5)

    teacher = LoraWeights(gate=delta(I, H), up=delta(I, H), down=delta(H, I), scaling=1.0)

    def lora_pair(out_dim, in_dim):
        A = torch.nn.Parameter(torch.randn(E, r, in_dim) * in_dim ** -0.5)
        B = torch.nn.Parameter(torch.zeros(E, out_dim, r))
        return A, B

    student = LoraWeights(gate=lora_pair(I, H), up=lora_pair(I, H), down=lora_pair(H, I), scaling=2.0)
    params = [t for pair in (student.gate, student.up, student.down) for t in pair]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    def batch():
        x = torch.randn(T, H).to(torch.bfloat16)
        with torch.no_grad():
            probs = torch.softmax(router(x.float()), dim=-1)
        w, ids = probs.topk(k, dim=-1)
        return x, ids, w / w.sum(-1, keepdim=True)

    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, ids, w = batch()
        with torch.no_grad():
            target = moe_experts(experts, x, ids, w, teacher).float()
        out = moe_experts(experts, x, ids, w, student).float()
        loss = torch.nn.functional.mse_loss(out, target) / target.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % log_every == 0 or step == steps:
            say(f"  step {step:4d}  relative MSE to teacher {loss.item():.5f}")
    dt = time.perf_counter() - t0
    tokens = steps * T * 2  # teacher + student passes
    say(f"done: {steps} steps in {dt:.1f} s ({tokens / dt:,.0f} tokens/s through the engine), "
        f"loss {losses[0]:.4f} -> {losses[-1]:.5f} ({losses[0] / max(losses[-1], 1e-12):.0f}x lower)")
    return {"losses": losses, "seconds": dt, "info": ctx.info()}
