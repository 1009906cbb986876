"""One engine with and without NUMA partitions (moetune.Context(numa=...)), side by side.

Runs one MoE layer (forward + backward with LoRA on every projection) on an engine without
partitions and on one split into each --numa value, checks the outputs are bit-identical and
prints forward / backward ms for each. "auto" = one partition per NUMA node (off on a one-node
host); an int N = N virtual nodes of the allowed CPUs.

On a one-node machine (this 2-core CI box, the one-socket GPU test machine) every partition
shares one memory controller, so the numbers show only the overhead of partitioning (each
partition's workers take only their own experts' tasks: less work stealing); the gain it exists
for, no cross-socket weight reads, needs a 2-socket host: run it there with `--numa auto`.

  python benchmarks/bench_numa.py [--threads N] [--numa 2 auto] [--tokens 128 1024] [--experts E]
"""

from __future__ import annotations

import argparse

import torch
from _common import cpu_name, time_fwd_bwd

import moetune
from moetune.numa import parse_numa


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--numa", nargs="+", default=["2"], help="values to compare with off: auto or N")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    E, H, I, k, r = args.experts, args.hidden, args.inter, args.topk, args.rank
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(s, generator=g).bfloat16() * 0.02 for s in ((E, I, H), (E, I, H), (E, H, I))]
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
    params = [t for pair in (lora.gate, lora.up, lora.down) for t in pair]
    engines = [("off", moetune.Context(args.threads))]
    for v in args.numa:
        engines.append((v, moetune.Context(args.threads, numa=parse_numa(v))))
    print(f"cpu: {cpu_name()}; E={E} H={H} I={I} k={k} r={r}")
    for name, ctx in engines:
        parts = ctx.numa_partitions
        print(f"numa={name}: threads={ctx.num_threads} partitions={[list(p) for p in parts] or 'none'}")
    experts = [(name, moetune.MoEExperts(ctx, *W)) for name, ctx in engines]
    print(f"{'T':>6} {'numa':>6} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'vs off':>7}")
    for T in args.tokens:
        x = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
        w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
        w.requires_grad_()
        dout = torch.randn(T, H, generator=g).bfloat16()
        outs, base = [], None
        for name, ex in experts:
            f, b = (
                t * 1e3
                for t in time_fwd_bwd(
                    lambda ex=ex: moetune.moe_experts(ex, x, ids, w, lora), dout, [x, w, *params], args.reps
                )
            )
            base = base or f + b
            outs.append(moetune.moe_experts(ex, x, ids, w, lora).detach())
            print(f"{T:>6} {name:>6} {f:8.1f} {b:8.1f} {f + b:9.1f} {(f + b) / base:6.2f}x")
        assert all(torch.equal(o, outs[0]) for o in outs), "outputs differ between numa settings"


if __name__ == "__main__":
    main()
