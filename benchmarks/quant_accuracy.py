#!/usr/bin/env python
"""Accuracy and memory of the engine's frozen-weight formats (bf16, int8, int4 g32/64/128).

For Qwen3-30B-A3B- and DeepSeek-V3-shaped random data (bf16 expert weights ~ N(0, 0.02),
x ~ N(0, 1), LoRA r=16 on gate/up/down with non-zero B, softmax top-k routing, dout ~ N(0, 1)),
prints per format the relative error ||a - b||_F / ||b||_F against the bf16 engine of
  out, dx, d topk_weights, dA/dB of gate, up and down (the LoRA gradients),
and the packed memory per expert. The first row ("bf16 vs fp32") is the bf16 engine itself
against an fp32 PyTorch reference on the same bf16 weights: the noise floor of bf16
computation, for scale.

The per-layer error does not depend on E (each expert is quantized on its own), so a subset
of the experts is used (--experts); memory per expert is for the full shapes either way.

  python benchmarks/quant_accuracy.py [--configs qwen3 deepseek] [--tokens 256] [--experts 16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import cpu_name

import moetune

CONFIGS = {
    "qwen3": dict(label="Qwen3-30B-A3B", H=2048, I=768, k=8),
    "deepseek": dict(label="DeepSeek-V3", H=7168, I=2048, k=8),
    "tiny": dict(label="tiny", H=256, I=128, k=4),
}
FORMATS = [("bf16", None), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
PROJ = ("gate", "up", "down")
COLS = ["out", "dx", "d_topk_w"] + [f"{k}_{p}" for p in PROJ for k in ("dA", "dB")]


def make_data(H, I, E, k, T, r, seed):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W = dict(
        gate=(rn(E, I, H) * 0.02).bfloat16(), up=(rn(E, I, H) * 0.02).bfloat16(), down=(rn(E, H, I) * 0.02).bfloat16()
    )
    ins = dict(gate=H, up=H, down=I)
    outs = dict(gate=I, up=I, down=H)
    lora = {p: ((rn(E, r, ins[p]) / ins[p] ** 0.5), (rn(E, outs[p], r) * 0.02)) for p in PROJ}
    x = rn(T, H).bfloat16()
    logits = rn(T, E)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    dout = rn(T, H).bfloat16()
    return W, lora, x, ids, w.float(), dout


def run_engine(ctx, W, lora, x, ids, w, dout, scaling, fmt, group):
    ex = moetune.MoEExperts(ctx, W["gate"], W["up"], W["down"], weight_format=fmt, group_size=group)
    params = {p: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for p, (a, b) in lora.items()}
    xl = x.clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    out = moetune.moe_experts(ex, xl, ids, wl, moetune.LoraWeights(**params, scaling=scaling))
    out.backward(dout)
    res = {"out": out.detach().float(), "dx": xl.grad.float(), "d_topk_w": wl.grad.float()}
    for p in PROJ:
        res[f"dA_{p}"] = params[p][0].grad
        res[f"dB_{p}"] = params[p][1].grad
    per_expert = ex.packed_bytes_per_expert
    del ex
    return res, per_expert


def fp32_reference(W, lora, x, ids, w, dout, scaling):
    """The obvious per-expert loop in fp32 with autograd (same bf16 weight values)."""
    params = {p: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for p, (a, b) in lora.items()}
    xl = x.float().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    out = torch.zeros_like(xl)
    E = W["gate"].shape[0]
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = xl[tok]
        proj = lambda p, inp: (
            inp @ W[p][e].float().t()  # noqa: E731
            + scaling * (inp @ params[p][0][e].t()) @ params[p][1][e].t()
        )
        h = F.silu(proj("gate", xe)) * proj("up", xe)
        y = proj("down", h)
        out = out.index_add(0, tok, wl[tok, slot][:, None] * y)
    out.backward(dout.float())
    res = {"out": out.detach(), "dx": xl.grad, "d_topk_w": wl.grad}
    for p in PROJ:
        res[f"dA_{p}"] = params[p][0].grad
        res[f"dB_{p}"] = params[p][1].grad
    return res


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen3", "deepseek"], choices=list(CONFIGS))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fp32-floor", action="store_true", help="skip the bf16-vs-fp32 row (slow on big shapes)")
    args = ap.parse_args()
    ctx = moetune.Context(args.threads)
    print(f"machine: {cpu_name()}, engine {ctx.info()}")
    print(
        "relative error ||a - b||_F / ||b||_F vs the bf16 engine; bytes per expert = packed frozen weights "
        "(backward_weights='repack')"
    )
    for name in args.configs:
        c = CONFIGS[name]
        H, I, k, E, T, r = c["H"], c["I"], c["k"], args.experts, args.tokens, args.rank
        scaling = 2.0
        print(
            f"\n## {c['label']}: H={H} I={I} k={k}, {E} experts (of the model's; per-expert error is "
            f"independent of E), T={T}, LoRA r={r} scaling={scaling}, weights ~ N(0, 0.02) bf16"
        )
        data = make_data(H, I, E, k, T, r, args.seed)
        base, bf16_bytes = run_engine(ctx, *data, scaling, "bf16", None)
        hdr = f"| {'format':<14} | " + " | ".join(f"{c_:>9}" for c_ in COLS) + " | bytes/expert | vs bf16 |"
        print(hdr)
        print("|" + "|".join("---" for _ in range(len(COLS) + 3)) + "|")
        if not args.no_fp32_floor:
            ref = fp32_reference(*data, scaling)
            print(
                f"| {'bf16 vs fp32':<14} | "
                + " | ".join(f"{rel(base[c_], ref[c_]):9.2e}" for c_ in COLS)
                + f" | {bf16_bytes:>12,} | 1.000 |"
            )
        for fmt, group in FORMATS[1:]:
            res, nbytes = run_engine(ctx, *data, scaling, fmt, group)
            label = fmt if group is None else f"{fmt} g{group}"
            print(
                f"| {label:<14} | "
                + " | ".join(f"{rel(res[c_], base[c_]):9.2e}" for c_ in COLS)
                + f" | {nbytes:>12,} | {nbytes / bf16_bytes:.3f} |"
            )
        del data, base


if __name__ == "__main__":
    main()
