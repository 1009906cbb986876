#!/usr/bin/env python
"""Where does the wall time of one MoE layer's fwd+bwd go, outside the engine's phases?

Per T: median over reps of the forward / backward wall time, the sum of the engine's
phase times (its parallel loops), and the time the calling thread waited on the engine;
with torch's own intra-op threads at --torch-threads (its OpenMP workers spin after each
op and can take the engine's cores). Qwen3-30B-A3B shapes, LoRA r=16 on gate/up/down.

  python benchmarks/diag_wall_vs_phases.py --threads 16 --torch-threads 16 1 --tokens 256 4096
"""

import argparse
import statistics
import time

import torch

import moetune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backward-weights", default="repack")
    a = ap.parse_args()
    E, H, I, k, r = 128, 2048, 768, 8, 16
    g = torch.Generator().manual_seed(0)
    ctx = moetune.Context(a.threads)
    W = [
        (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16(),
        (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16(),
        (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16(),
    ]
    lora = moetune.LoraWeights(
        **{
            p: (
                torch.nn.Parameter(torch.randn(E, r, H if p != "down" else I, generator=g) * 0.01),
                torch.nn.Parameter(torch.randn(E, I if p != "down" else H, r, generator=g) * 0.01),
            )
            for p in ("gate", "up", "down")
        },
        scaling=2.0,
    )
    ex = moetune.MoEExperts(ctx, *W, backward_weights=a.backward_weights)
    print(f"engine {ctx.info()}; backward_weights={a.backward_weights}")
    print(
        f"{'T':>6} {'torch thr':>9} {'fwd wall':>9} {'fwd phases':>10} {'bwd wall':>9} {'bwd phases':>10} "
        f"{'bwd wait':>9}  (ms, medians of {a.reps})"
    )
    for tt in a.torch_threads:
        torch.set_num_threads(tt)
        for T in a.tokens:
            x = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
            w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
            w.requires_grad_()
            dout = torch.randn(T, H, generator=g).bfloat16()
            rows = []
            for rep in range(a.reps + 1):
                ctx._ctx.reset_phase_profile()
                t0 = time.perf_counter()
                out = moetune.moe_experts(ex, x, ids, w, lora)
                t1 = time.perf_counter()
                w0 = ctx.wait_seconds
                out.backward(dout)
                t2 = time.perf_counter()
                prof = ctx._ctx.phase_profile()
                fp = sum(s for n, s, _ in prof if n.startswith("fwd"))
                bp = sum(s for n, s, _ in prof if n.startswith("bwd"))
                if rep:
                    rows.append((t1 - t0, fp, t2 - t1, bp, ctx.wait_seconds - w0))
            med = [statistics.median(c) * 1e3 for c in zip(*rows)]
            print(f"{T:>6} {tt:>9} {med[0]:9.1f} {med[1]:10.1f} {med[2]:9.1f} {med[3]:10.1f} {med[4]:9.1f}", flush=True)


if __name__ == "__main__":
    main()
