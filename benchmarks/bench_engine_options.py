"""Memory/time trade-offs of the engine's two options, side by side:

  backward_weights = repack          (1x packed expert memory; W^T slices made per backward task)
                   | transposed_copy (2x packed expert memory; no per-step transposes)
  activations      = save            (gate/up pre-activations kept in bf16 for backward)
                   | recompute       (recomputed in backward: one more pass of the gate/up GEMMs)

Prints, per T: forward ms, backward ms, packed expert bytes, bytes held for
backward, and the phase profile of the default configuration.

  python benchmarks/bench_engine_options.py [--threads N] [--tokens 128 1024 4096] [--experts E]
"""

from __future__ import annotations

import argparse

import torch
from _common import cpu_name, time_fwd_bwd

import moetune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isa", default="auto", help="auto | scalar | avx2 | avx512 | avx512_bf16 | amx_bf16")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--row-groups",
        type=int,
        nargs="+",
        default=[0],
        help="row_group values to compare (0 = auto), each with the default options",
    )
    ap.add_argument("--only-default", action="store_true", help="only repack/save (with each --row-groups)")
    ap.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads while timing (the engine owns the cores)"
    )
    args = ap.parse_args()
    E, H, I, k, r = args.experts, args.hidden, args.inter, args.topk, args.rank
    ctx = moetune.Context(args.threads, isa=args.isa)
    torch.set_num_threads(args.torch_threads)
    print(
        f"machine: {cpu_name()}, engine {ctx.info()}, torch threads {torch.get_num_threads()}, "
        f"grads set to None before each rep"
    )
    print(f"shapes: E={E} H={H} I={I} k={k}, LoRA r={r} on gate/up/down, routing uniform random")
    g = torch.Generator().manual_seed(0)
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
    lora_params = [t for pair in (lora.gate, lora.up, lora.down) for t in pair]
    policies = [(bw, act) for bw in ("repack", "transposed_copy") for act in ("save", "recompute")]
    if args.only_default:
        policies = policies[:1]
    configs = [(bw, act, rg) for rg in args.row_groups for bw, act in policies]
    print(
        f"{'T':>6} {'backward_weights':>16} {'activations':>11} {'row_group':>9} {'fwd ms':>8} {'bwd ms':>8} "
        f"{'total ms':>9} {'TFLOPS':>7} {'packed GiB':>10} {'saved MiB':>9}"
    )
    profiles = {}
    for T in args.tokens:
        x = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
        w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
        w.requires_grad_()
        dout = torch.randn(T, H, generator=g).bfloat16()
        for bw, act, rg in configs:
            ex = moetune.MoEExperts(ctx, *W, backward_weights=bw, activations=act, row_group=rg)
            saved = {}

            def forward(ex=ex):
                p = moetune.moe_experts_async(ex, x, ids, w, lora)
                out = p.wait()
                saved["bytes"] = p.saved_bytes
                return out

            f, b = (t * 1e3 for t in time_fwd_bwd(forward, dout, [x, w, *lora_params], args.reps))
            if (bw, act, rg) == configs[0]:  # one more step, profiled
                ctx._ctx.reset_phase_profile()
                moetune.moe_experts(ex, x, ids, w, lora).backward(dout)
                profiles[T] = ctx._ctx.phase_profile()
            # Base-weight GEMM flops of forward + backward (3 + 3 products of
            # 2*T*k*H*I each; the recompute's extra pass and LoRA not counted).
            tflops = 12 * T * k * H * I / ((f + b) * 1e-3) / 1e12
            print(
                f"{T:>6} {bw:>16} {act:>11} {rg if rg else 'auto':>9} {f:8.1f} {b:8.1f} {f + b:9.1f} {tflops:7.2f} "
                f"{ex.packed_bytes / 2**30:10.2f} {saved['bytes'] / 2**20:9.1f}"
            )
            del ex
    for T, prof in profiles.items():
        total = sum(s for _, s, _ in prof)
        print(
            f"phase profile, T={T} ({'/'.join(str(c) for c in configs[0])}): "
            + ", ".join(f"{n} {s * 1e3:.1f} ms ({100 * s / total:.0f}%)" for n, s, _ in prof)
        )


if __name__ == "__main__":
    main()
