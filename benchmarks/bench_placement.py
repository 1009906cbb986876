#!/usr/bin/env python
"""One MoE layer's routed experts, forward + backward with LoRA r16, placed four ways side by side:

  cpu            the CPU engine only (moetune.moe_experts, today's path)
  gpu_resident   every expert on the GPU, weights resident (decoded bf16, loaded before timing)
  gpu_streamed   every expert with tokens on the GPU, weights streamed from the engine's own
                 page-locked buffers in their stored format for every pass (forward and backward)
  mixed          experts with at least --mixed-threshold routed rows (default: the mean load
                 T*k/E) streamed to the GPU, the rest on the CPU engine at the same time

Shapes: Qwen3-30B-A3B (E=128, H=2048, I=768, k=8) and DeepSeek-V3 (E=256, H=7168, I=2048, k=8;
as many experts as host RAM allows: the header says how many), T = 1024 / 4096 / 16384 tokens,
bf16 x and LoRA r16 fp32 parameters on the GPU (as PEFT keeps them), skewed routing (softmax
of random logits plus a Zipf-like expert bias, top-k). Timing: median of --reps steps after one
warm-up, each step = zero grads, forward, backward, torch.cuda.synchronize().

Printed per (shape, T, mode): fwd+bwd ms (fwd / bwd), speed-up vs cpu, experts and rows on the
GPU, stored bytes copied per step and the copy rate (bytes / the copy stream's busy time from the
op's timing events), GPU peak memory, and max|out - out_cpu| / max|out_cpu| (a sanity check of
the placement's exactness on these shapes: bf16 rounding, ~1e-2 at most).

Usage (GPU machine):  python benchmarks/bench_placement.py [--shapes qwen3,deepseek] [--tokens 1024,4096,16384]
Smoke (CPU, CI):      python benchmarks/bench_placement.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import moetune
from moetune.placement import FixedPlanner, GpuExperts, GpuOptions, GpuRuntime, Where, flush_timings, placed_moe_experts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name, mem_available_bytes  # noqa: E402

SHAPES = {"qwen3": dict(E=128, H=2048, I=768, k=8), "deepseek": dict(E=256, H=7168, I=2048, k=8)}
SMOKE_SHAPES = {"tiny": dict(E=8, H=64, I=32, k=2)}
MODES = ("cpu", "gpu_resident", "gpu_streamed", "mixed")


def build_experts(ctx, E, H, I, fmt, group, distinct=4, seed=0):
    """Experts loaded one at a time (peak host memory = the packed experts + a few source experts);
    `distinct` random experts are cycled (timing does not depend on the values)."""
    ex = moetune.MoEExperts.empty(ctx, E, H, I, weight_format=fmt, group_size=group)
    g = torch.Generator().manual_seed(seed)
    pool = [
        (
            (torch.randn(I, H, generator=g) / H**0.5).bfloat16(),
            (torch.randn(I, H, generator=g) / H**0.5).bfloat16(),
            (torch.randn(H, I, generator=g) / I**0.5).bfloat16(),
        )
        for _ in range(min(distinct, E))
    ]
    for e in range(E):
        ex.load_expert(e, *pool[e % len(pool)])
    return ex


def routing(T, E, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    bias = 1.5 * torch.log(1.0 / torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
    logits = torch.randn(T, E, generator=g) + bias
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    return ids.to(device), (w / w.sum(-1, keepdim=True)).bfloat16().to(device)


def lora_params(E, H, I, r, device, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, (din, dout) in (("gate", (H, I)), ("up", (H, I)), ("down", (I, H))):
        out[p] = (
            torch.nn.Parameter((torch.randn(E, r, din, generator=g) / din**0.5).to(device)),
            torch.nn.Parameter((torch.randn(E, dout, r, generator=g) * 0.01).to(device)),
        )
    return out


def plan_for(mode, threshold):
    def fn(_key, counts, resident):
        if mode == "cpu":
            return Where.CPU
        if mode == "gpu_resident":
            return Where.GPU_RESIDENT
        if mode == "gpu_streamed":
            return Where.GPU_STREAMED
        hot = counts >= threshold
        return torch.where(
            hot, torch.where(resident, int(Where.GPU_RESIDENT), int(Where.GPU_STREAMED)), int(Where.CPU)
        ).to(torch.int8)

    return fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, ex, gpu, runtime, x, ids, w, params, dout, scaling, reps, threshold, device):
    lw = moetune.LoraWeights(**params, scaling=scaling)
    planner = FixedPlanner(plan_for(mode, threshold))
    leaves = [t for pair in params.values() for t in pair]
    times, fw, bw, out = [], [], [], None
    copied0 = gpu.streamer.bytes_copied
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for rep in range(reps + 1):
        if rep == 1:
            copied0 = gpu.streamer.bytes_copied
            planner.observed.clear()
        for t in leaves:
            t.grad = None
        xg = x.detach().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        if mode == "cpu":
            out = moetune.moe_experts(ex, xg, ids, w, lw)
        else:
            out = placed_moe_experts(ex, xg, ids, w, lw, planner=planner, gpu=gpu)
        sync(device)
        t1 = time.perf_counter()
        out.backward(dout)
        sync(device)
        t2 = time.perf_counter()
        if rep:
            times.append(t2 - t0)
            fw.append(t1 - t0)
            bw.append(t2 - t1)
    flush_timings(runtime)
    copy_s = sum(t["copy"] for _, _, t in planner.observed)
    copied = gpu.streamer.bytes_copied - copied0
    plan = planner.observed[0][1] if planner.observed else None
    on_gpu = (plan.where != int(Where.CPU)) & (plan.counts > 0) if plan is not None else None
    return dict(
        mode=mode,
        ms=1e3 * statistics.median(times),
        fwd_ms=1e3 * statistics.median(fw),
        bwd_ms=1e3 * statistics.median(bw),
        copied_per_step=copied / reps,
        copy_gbps=(copied / copy_s / 1e9) if copy_s > 0 else 0.0,
        gpu_experts=int(on_gpu.sum()) if on_gpu is not None else 0,
        gpu_rows=int(plan.counts[on_gpu].sum()) if on_gpu is not None else 0,
        peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else 0.0,
        out=out.detach().float(),
    )


def profile_step(mode, ex, gpu, runtime, x, ids, w, params, dout, threshold, device):
    """One more forward + backward of `mode` under torch.profiler: the device kernels by their
    total time, and the host ops by their own time (a path bound by Python / launches shows host
    totals well above the kernels' sum)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_mode(mode, ex, gpu, runtime, x, ids, w, params, dout, 2.0, 1, threshold, device)
    ka = prof.key_averages()
    dev_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"### profile {mode} (2 steps: warm-up + 1; T={x.shape[0]})")
    print(ka.table(sort_by=dev_key, row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU stand-in device (CI)")
    ap.add_argument("--shapes", default="qwen3,deepseek")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--format", default="bf16", choices=("bf16", "int8", "int4"))
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: cores - torch threads)")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--deepseek-experts", type=int, default=None, help="default: as many as host RAM allows")
    ap.add_argument(
        "--mixed-threshold",
        type=int,
        default=None,
        help="rows for an expert to go to the GPU in the mixed plan (default T*k/E)",
    )
    ap.add_argument("--chunk-mib", type=int, default=64, help="stored MiB per streamed chunk")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument(
        "--profile",
        default=None,
        help="MODE: after timing it, one more step of MODE under torch.profiler (kernel and host op tables)",
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device, shapes, tokens, reps = torch.device("cpu"), SMOKE_SHAPES, [32, 64], 1
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_placement: needs a CUDA device (or --smoke)")
        device = torch.device("cuda")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        tokens, reps = [int(t) for t in args.tokens.split(",")], args.reps
    modes = args.modes.split(",")
    torch.set_num_threads(args.torch_threads)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) - args.torch_threads)
    ctx = moetune.Context(threads)
    print(
        f"# bench_placement: {cpu_name()}, engine {ctx.info()['kernel']} x {threads} threads, "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (stand-in)'}, "
        f"torch {torch.__version__}, format {args.format}, LoRA r{args.rank}"
    )
    rows: list[dict] = []
    for name, sh in shapes.items():
        E, H, I, k = sh["E"], sh["H"], sh["I"], sh["k"]
        per_expert = 2 * 3 * H * I  # bf16 packed bytes (the largest format)
        avail = mem_available_bytes()
        if name == "deepseek":
            # Packed experts + the CPU engine's per-call buffers at T = 16384 (~16 GiB) + a margin.
            fit = E if avail is None else max(8, int((avail - (32 << 30)) // per_expert))
            E_use = min(E, args.deepseek_experts or fit)
        else:
            E_use = E
        print(
            f"## {name}: E={E_use}{f' of {E} (host RAM: {(avail or 0) / 2**30:.0f} GiB available)' if E_use < E else ''}"
            f", H={H}, I={I}, k={k}"
        )
        ex = build_experts(ctx, E_use, H, I, args.format, args.group_size)
        fmt_bytes = ex.packed_bytes_per_expert
        chunk = max(1, (args.chunk_mib << 20) // fmt_bytes) * fmt_bytes
        runtime = GpuRuntime(device, GpuOptions(resident_budget_bytes=E_use * per_expert, stream_chunk_bytes=chunk))
        gpu = GpuExperts(runtime, ex, layer_key=name)
        for T in tokens:
            ids, w = routing(T, E_use, k, seed=T, device=device)
            x = (torch.randn(T, H, generator=torch.Generator().manual_seed(T)) * 0.5).bfloat16().to(device)
            dout = (torch.randn(T, H, generator=torch.Generator().manual_seed(T + 1)) * 0.1).bfloat16().to(device)
            params = lora_params(E_use, H, I, args.rank, device, seed=7)
            threshold = args.mixed_threshold or max(1, T * k // E_use)
            base = None
            for mode in modes:
                gpu.set_resident(
                    torch.ones(E_use, dtype=torch.bool)
                    if mode == "gpu_resident"
                    else torch.zeros(E_use, dtype=torch.bool)
                )
                r = run_mode(mode, ex, gpu, runtime, x, ids, w, params, dout, 2.0, reps, threshold, device)
                if args.profile == mode:
                    profile_step(mode, ex, gpu, runtime, x, ids, w, params, dout, threshold, device)
                out = r.pop("out")
                if mode == "cpu":
                    base = (r["ms"], out)
                err = ((out - base[1]).abs().max() / base[1].abs().max()).item() if base is not None else float("nan")
                speed = base[0] / r["ms"] if base is not None else float("nan")
                r.update(shape=name, E=E_use, T=T, speedup_vs_cpu=speed, rel_err_vs_cpu=err)
                rows.append(r)
                print(
                    f"{name:8s} T={T:6d} {mode:13s} {r['ms']:9.1f} ms (fwd {r['fwd_ms']:8.1f} / bwd {r['bwd_ms']:8.1f})"
                    f"  x{speed:5.2f} vs cpu  gpu: {r['gpu_experts']:3d} experts {r['gpu_rows']:7d} rows"
                    f"  copied {r['copied_per_step'] / 2**30:6.2f} GiB/step at {r['copy_gbps']:5.1f} GB/s"
                    f"  peak {r['peak_gib']:5.1f} GiB  err {err:.1e}",
                    flush=True,
                )
            gpu.set_resident(torch.zeros(E_use, dtype=torch.bool))
            del params, x, dout
        del gpu, runtime, ex
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
