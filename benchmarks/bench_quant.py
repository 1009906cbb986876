#!/usr/bin/env python
"""Time of one MoE layer's routed experts, forward + backward, per frozen-weight format.

bf16 vs int8 vs int4 (group 32/64/128, --groups) vs fp8_block / mxfp4 (the published formats,
quantized here from the same bf16 weights), LoRA r=16 on gate/up/down (fp32 params),
uniform random top-k routing, bf16 x; same data for every format. Prints per (shape, T, format):
forward / backward / total ms (median of --reps after one warm-up), tokens/s, achieved TFLOPS
(2*T*k*3*H*I forward + the same backward + 18*T*k*r*(H+I) LoRA, as BENCHMARKS.md), the packed
weight memory, and the weight bytes streamed per fwd+bwd over the total time (the packed bytes of
the experts that got tokens, read once in forward and once in backward; twice that with
--activations recompute). With --peak-tflops / --peak-gbs (the machine's measured AMX peak and
DRAM read bandwidth, `benchmarks/ceiling`), also each as a percentage of that ceiling.

With --dequant-paths / --dequant-cols, every quantized format runs once per (path, slice width):
the ExpertsOptions dequant_path ("panels": dequantize a column slice into a bf16 panel, then the
bf16 GEMM; "tiles": the ISA's fused kernel dequantizes each K block right before its tiles, AMX
only, elsewhere the same as panels) and dequant_cols (the panels slice width, 0 = auto from the
kernel bundle's L2 budget; 32 = the width before the per-ISA budget). bf16 runs once. The
"vs bf16" column is total time / bf16's total time at the same T (1.00 = no quantization cost).
Results are bit-identical across paths and widths; only the time moves.

  python benchmarks/bench_quant.py --threads 16 --configs qwen3 --tokens 256 1024 4096 16384
  python benchmarks/bench_quant.py --threads 16 --configs deepseek --deepseek-experts 64 --tokens 256 1024 4096 16384
  python benchmarks/bench_quant.py --threads 16 --configs qwen3 --tokens 256 4096 --formats bf16 int8 int4 \
      fp8_block mxfp4 --dequant-paths panels tiles --dequant-cols 32 0
"""

from __future__ import annotations

import argparse

import torch
from _common import cpu_name, time_fwd_bwd

import moetune

CONFIGS = {
    "qwen3": dict(label="Qwen3-30B-A3B", H=2048, I=768, E=128, k=8),
    "deepseek": dict(label="DeepSeek-V3", H=7168, I=2048, E=256, k=8),
    "tiny": dict(label="tiny", H=256, I=128, E=16, k=4),
}


def weights(E, rows, cols, g):
    """[E, rows, cols] bf16 ~ N(0, 0.02), generated per expert (no fp32 copy of the whole tensor)."""
    out = torch.empty(E, rows, cols, dtype=torch.bfloat16)
    for e in range(E):
        out[e] = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--configs", nargs="+", default=["qwen3"], choices=list(CONFIGS))
    ap.add_argument("--deepseek-experts", type=int, default=64, help="experts of the DeepSeek layer (memory)")
    ap.add_argument("--experts", type=int, default=None, help="experts of every layer (overrides; memory)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--groups", type=int, nargs="+", default=[128], help="int4 group sizes")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backward-weights", default="repack")
    ap.add_argument("--activations", default="save")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads while timing (the engine owns the cores; torch's idle "
        "OpenMP workers spin on them after each torch op)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="measured compute ceiling, for a %% column")
    ap.add_argument("--peak-gbs", type=float, default=None, help="measured DRAM read bandwidth, for a %% column")
    ap.add_argument(
        "--dequant-paths",
        nargs="+",
        default=["panels"],
        choices=["panels", "tiles"],
        help="ExpertsOptions.dequant_path values to run each quantized format with",
    )
    ap.add_argument(
        "--dequant-cols",
        type=int,
        nargs="+",
        default=[0],
        help="ExpertsOptions.dequant_cols values (panels path; 0 = auto) to run each quantized format with",
    )
    args = ap.parse_args()
    ctx = moetune.Context(args.threads, isa=args.isa)
    torch.set_num_threads(args.torch_threads)
    print(f"machine: {cpu_name()}, engine {ctx.info()}, torch {torch.__version__}")
    print(
        f"options: backward_weights={args.backward_weights} activations={args.activations}, LoRA r={args.rank} "
        f"on gate/up/down, routing uniform random, reps={args.reps} (median, after 1 warm-up), "
        f"torch threads {torch.get_num_threads()}, grads set to None before each rep"
    )
    fmts = [(f, None) for f in args.formats if f != "int4"]
    if "int4" in args.formats:
        fmts += [("int4", gs) for gs in args.groups]
    fmts.sort(key=lambda fg: fg[0] != "bf16")  # bf16 first: the ratio's base
    # (format, group, dequant_path, dequant_cols): the dequant axes apply to quantized formats only;
    # the tiles path does not use the slice width (its first value labels it).
    runs = []
    for fmt, gs in fmts:
        if fmt == "bf16":
            runs.append((fmt, gs, "panels", 0))
            continue
        for path in args.dequant_paths:
            for cols in args.dequant_cols if path == "panels" else args.dequant_cols[:1]:
                runs.append((fmt, gs, path, cols))
    show_dq = len(args.dequant_paths) > 1 or args.dequant_cols != [0]
    for name in args.configs:
        c = dict(CONFIGS[name])
        if name == "deepseek":
            c["E"] = args.deepseek_experts
        if args.experts is not None:
            c["E"] = args.experts
        H, I, E, k, r = c["H"], c["I"], c["E"], c["k"], args.rank
        g = torch.Generator().manual_seed(0)
        W = (weights(E, I, H, g), weights(E, I, H, g), weights(E, H, I, g))
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
        print(f"\n## {c['label']}: H={H} I={I} E={E} k={k}")
        pk = f" {'% peak':>6} |" if args.peak_tflops else ""
        bw_hdr = f" {'% BW':>5} |" if args.peak_gbs else ""
        dq_hdr = f" {'dequant':>11} |" if show_dq else ""
        print(
            f"| {'T':>6} | {'format':>9} |{dq_hdr} {'fwd ms':>8} | {'bwd ms':>8} | {'total ms':>9} | "
            f"{'vs bf16':>7} | {'tokens/s':>9} | {'TFLOPS':>6} |{pk} {'packed GiB':>10} | {'weight GB/s':>11} |{bw_hdr}"
        )
        print("|---" * (10 + bool(show_dq) + bool(pk) + bool(bw_hdr)) + "|")
        bf16_total = {}
        for fmt, gs, path, cols in runs:
            ex = moetune.MoEExperts(
                ctx,
                *W,
                weight_format=fmt,
                group_size=gs,
                backward_weights=args.backward_weights,
                activations=args.activations,
                dequant_path=path,
                dequant_cols=cols,
            )
            label = fmt if gs is None else f"int4 g{gs}"
            dq = "" if fmt == "bf16" else (path if path == "tiles" else f"panels/{cols or 'auto'}")
            dq_col = f" {dq:>11} |" if show_dq else ""
            for T in args.tokens:
                gt = torch.Generator().manual_seed(T)
                x = torch.randn(T, H, generator=gt).bfloat16().requires_grad_()
                w, ids = torch.softmax(torch.randn(T, E, generator=gt), -1).topk(k, -1)
                w = w.detach().requires_grad_()
                dout = torch.randn(T, H, generator=gt).bfloat16()
                f, b = time_fwd_bwd(
                    lambda ex=ex: moetune.moe_experts(ex, x, ids, w, lora), dout, [x, w, *lora_params], args.reps
                )
                flops = 2 * (2 * T * k * 3 * H * I) + 18 * T * k * r * (H + I)
                active = torch.unique(ids).numel()
                passes = 3 if args.activations == "recompute" else 2
                streamed = ex.packed_bytes_per_expert * active * passes
                tflops, gbs = flops / (f + b) / 1e12, streamed / (f + b) / 1e9
                pk = f" {100 * tflops / args.peak_tflops:5.1f}% |" if args.peak_tflops else ""
                bwc = f" {100 * gbs / args.peak_gbs:4.1f}% |" if args.peak_gbs else ""
                if fmt == "bf16":
                    bf16_total[T] = f + b
                ratio = f"{(f + b) / bf16_total[T]:7.2f}" if T in bf16_total else f"{'-':>7}"
                print(
                    f"| {T:>6} | {label:>9} |{dq_col} {f * 1e3:8.1f} | {b * 1e3:8.1f} | {(f + b) * 1e3:9.1f} | "
                    f"{ratio} | {T / (f + b):9.0f} | {tflops:6.2f} |{pk} {ex.packed_bytes / 2**30:10.2f} | "
                    f"{gbs:11.1f} |{bwc}",
                    flush=True,
                )
            del ex


if __name__ == "__main__":
    main()
