#!/usr/bin/env python
"""moetune vs kt-kernel's SFT MoE backend, side by side on identical data.

One MoE layer's routed experts, forward + backward, LoRA (rank r, alpha) on gate, up and
down, through
  moetune    moetune.MoEExperts + moetune.moe_experts (LoRA A/B fp32 nn.Parameters holding
             the bf16 values below; gradients fp32);
  kt-kernel  kt_kernel.sft.amx.AMXSFTMoEWrapper, method "AMXBF16_SFT" (PyPI kt-kernel): the
             lowest Python-level entry of its SFT backend that takes tensors -- constructor
             with an explicit CPUInfer thread count, load_weights_from_tensors(gate, up, down),
             init_lora_weights(6 bf16 LoRA tensors + 6 bf16 gradient buffers),
             forward(x, topk_ids, topk_weights) and backward(dout) -> (dx, d topk_weights).
             Everything above it (KTMoELayerWrapper, the HF/accelerate integration) adds
             routing, GPU staging and checkpoint logic, not expert math. The layer below
             (kt_kernel_ext.moe.AMXBF16_SFT_MOE) takes raw pointers.
Same seeded data for both: bf16 expert weights [E, I, H] / [E, H, I], x [T, H] bf16, k
distinct uniformly random experts per token, fp32 softmax routing weights [T, k], LoRA A/B
rounded to bf16 (kt-kernel keeps LoRA in bf16), dout [T, H] bf16.

Printed per (shape, T, implementation): forward, backward and total ms (median of --reps
after --warmup), TFLOPS = 12*T*k*H*I / total time (the six base GEMMs of forward and
backward; LoRA not counted), the speed ratio (kt-kernel time / moetune time), and -- for
T <= --check-max-tokens -- the relative Frobenius error ||a - ref|| / ||ref|| of the output,
dx, d topk_weights and the worst of the six LoRA gradients against a PyTorch fp32 reference
(per-expert loop with autograd on the same bf16 values, written the obvious way).
A row is printed as soon as it is measured (a crash in one backend keeps earlier rows).

kt-kernel's backward needs Wᵀ products. With share_backward_bb (its training default for
BF16, --kt-share-backward-bb 1) it keeps one layer-sized buffer re-derived from the packed
weights before each backward ("repack"; in training submitted asynchronously for the next
layer while the GPU works); without it, a second (transposed) packed copy per layer. Its
backward does not repack by itself once the buffer holds this layer (measured on the
development machine: same backward time with and without a prior repack, each repack
costing its own time), so a one-layer loop without it would skip a cost every real layer
pays. Here the repack is submitted before every backward, as kt-kernel's training loop
does for every layer, and timed on its own (column "repack ms", counted in total; "ratio
w/o" leaves it out: the best case where it is fully hidden). moetune's counterparts:
--moetune-backward-weights repack (default; 1x packed weights, Wᵀ slices made inside
backward, counted in bwd) or transposed_copy (2x).

Results on this script's development machine (2 shared AMD EPYC cores with AVX512-BF16,
no AMX): kt-kernel's avx512_bf16 build runs forward and backward (its "AMXBF16_SFT" class
falls back to an AVX512-BF16 kernel: "backend=AVX512-BF16" in its log) and agrees with the
fp32 reference to bf16 accuracy, at every shape tried (tiny; H=2048 I=768; H=7168 I=2048 with
8 experts; T 16-256): rel. errors kt-kernel / moetune: out 4.9e-3 / 3.5e-3, dx 7-9e-3 /
3.0e-3, d topk_weights 4.5e-3 / 3.1e-3, worst LoRA grad 5.0e-3 / 3.9e-3 (bf16 rounding of the
exact output alone: 1.7e-3). No timings were taken there (2 cores shared with other jobs).

What kt-kernel needs (found by reading its package, kt-kernel 0.7.2, cp312 wheel):
  - python 3.12 (the wheel is cp312-only); its extensions do not link libtorch, so the
    installed torch version does not matter (the wheel's metadata pins torch==2.9.1; ignored);
  - gguf (pure Python; kt_kernel/utils/loader.py imports it at module level) with numpy and
    pyyaml; not typer/rich/httpx/triton (only its CLI uses those);
  - a CPU with AVX512-BF16 (.ktk keeps only the amx and avx512_bf16 builds; kt-kernel picks
    the variant from /proc/cpuinfo, or from KT_KERNEL_CPU_VARIANT, which --kt-variant sets
    before the import; a failed amx import falls back to avx512_bf16: see "variant=");
  - no GPU, no config file, no NUMA setup (one CPUInfer sub-pool, --kt-numa-pools 1).
  benchmarks/make_ktk.sh builds the trimmed importable copy (.ktk, ~21 MB) from the wheels.
Caveat: CPUInfer is a process-wide singleton, so the first thread count wins for every config.

Usage:
  export PYTHONPATH=$PWD/.ktk:$PYTHONPATH
  python benchmarks/bench_ktkernel.py --threads 16 --tokens 256 1024 4096 16384 --configs qwen3,deepseek
  python benchmarks/bench_ktkernel.py --threads 2 --tokens 32 64 --configs tiny --kt-variant avx512_bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _common import mem_available_bytes

BF16 = torch.bfloat16

CONFIGS = {
    "qwen3": dict(label="Qwen3-30B-A3B", H=2048, I=768, E=128, k=8),
    "deepseek": dict(label="DeepSeek-V3", H=7168, I=2048, E=256, k=8),
    # small shapes for smoke tests (multiples of 32/64 as the AMX packing wants)
    "tiny": dict(label="tiny", H=256, I=128, E=16, k=4),
    "small": dict(label="small(Qwen3 H/I)", H=2048, I=768, E=16, k=8),
}
LORA_NAMES = ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")


# ----------------------------------------------------------------------------- machine


def cpu_summary() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = dict(l.split(":", 1) for l in out.splitlines() if ":" in l)
        kv = {a.strip(): b.strip() for a, b in kv.items()}
        flags = kv.get("Flags", "").split()
        isa = " ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
        return f"{kv.get('Model name', '?')}, {kv.get('CPU(s)', '?')} CPUs, NUMA nodes {kv.get('NUMA node(s)', '?')}, {isa}"
    except Exception as e:  # noqa: BLE001
        return f"{platform.processor()} (lscpu failed: {e})"


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# ----------------------------------------------------------------------------- data


class Layer:
    """Frozen bf16 expert weights and bf16-valued LoRA factors of one layer."""

    def __init__(self, E, H, I, r, alpha, seed):
        g = torch.Generator().manual_seed(seed)
        self.E, self.H, self.I, self.r, self.scaling = E, H, I, r, alpha / r
        self.gate = torch.empty(E, I, H, dtype=BF16)
        self.up = torch.empty(E, I, H, dtype=BF16)
        self.down = torch.empty(E, H, I, dtype=BF16)
        for e in range(E):  # per expert: small fp32 temporaries
            self.gate[e] = torch.randn(I, H, generator=g) / math.sqrt(H)
            self.up[e] = torch.randn(I, H, generator=g) / math.sqrt(H)
            self.down[e] = torch.randn(H, I, generator=g) / math.sqrt(I)
        # LoRA: A ~ N(0, 1/in); B non-zero (PEFT's zero init would hide B's contribution)
        # sized so the LoRA path is ~10% of the base output. bf16 values (kt-kernel's dtype).
        self.lora = {}
        for p, (din, dout) in (("gate", (H, I)), ("up", (H, I)), ("down", (I, H))):
            self.lora[p + "_A"] = (torch.randn(E, r, din, generator=g) / math.sqrt(din)).to(BF16)
            self.lora[p + "_B"] = (torch.randn(E, dout, r, generator=g) * (0.1 / (math.sqrt(r) * self.scaling))).to(
                BF16
            )


class Batch:
    def __init__(self, T, H, E, k, seed):
        g = torch.Generator().manual_seed(seed)
        self.T = T
        self.x = torch.randn(T, H, generator=g).to(BF16)
        self.ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int64).contiguous()
        self.w = torch.softmax(torch.randn(T, k, generator=g), dim=1)  # fp32
        self.dout = torch.randn(T, H, generator=g).to(BF16)


# ----------------------------------------------------------------------------- reference


def reference(layer: Layer, b: Batch) -> dict[str, torch.Tensor]:
    """fp32 PyTorch: per-expert loop with autograd, on the bf16 values of weights and data."""
    s = layer.scaling
    x = b.x.float().requires_grad_()
    w = b.w.clone().requires_grad_()
    # One leaf per (LoRA tensor, expert): indexing one [E, r, in] leaf per expert would make
    # autograd add an E-times-larger zero gradient for every expert visited.
    leaves = {n: [t[e].float().requires_grad_() for e in range(layer.E)] for n, t in layer.lora.items()}
    out = torch.zeros(b.T, layer.H)
    for e in range(layer.E):
        tok, pos = torch.where(b.ids == e)
        if tok.numel() == 0:
            continue
        L = {n: v[e] for n, v in leaves.items()}
        xe = x[tok]
        g = F.linear(xe, layer.gate[e].float()) + s * F.linear(F.linear(xe, L["gate_A"]), L["gate_B"])
        u = F.linear(xe, layer.up[e].float()) + s * F.linear(F.linear(xe, L["up_A"]), L["up_B"])
        h = F.silu(g) * u
        y = F.linear(h, layer.down[e].float()) + s * F.linear(F.linear(h, L["down_A"]), L["down_B"])
        out = out.index_add(0, tok, y * w[tok, pos, None])
    out.backward(b.dout.float())
    res = {"out": out.detach(), "dx": x.grad, "dw": w.grad}
    for n, v in leaves.items():
        res[n] = torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in v])
    return res


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def errors(res: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    e = {k: rel_err(res[k], ref[k]) for k in ("out", "dx", "dw")}
    lora = {n: rel_err(res[n], ref[n]) for n in LORA_NAMES}
    worst = max(lora, key=lora.get)
    e.update(lora=lora[worst], lora_worst=worst, lora_all=lora)
    return e


# ----------------------------------------------------------------------------- implementations


class MoetuneImpl:
    name = "moetune"

    def __init__(self, layer: Layer, args):
        import moetune

        self.ctx = moetune.Context(args.threads, isa=args.isa)
        self.info = f"moetune {self.ctx.info()}, backward_weights={args.moetune_backward_weights}"
        self.experts = moetune.MoEExperts(
            self.ctx, layer.gate, layer.up, layer.down, backward_weights=args.moetune_backward_weights
        )
        self.params = {n: torch.nn.Parameter(t.float()) for n, t in layer.lora.items()}
        P = self.params
        self.lora = moetune.LoraWeights(
            gate=(P["gate_A"], P["gate_B"]),
            up=(P["up_A"], P["up_B"]),
            down=(P["down_A"], P["down_B"]),
            scaling=layer.scaling,
        )
        self._moe = moetune.moe_experts

    def step(self, b: Batch):
        for p in self.params.values():
            p.grad = None
        x = b.x.clone().requires_grad_()
        w = b.w.clone().requires_grad_()
        t0 = time.perf_counter()
        out = self._moe(self.experts, x, b.ids, w, lora=self.lora)
        t1 = time.perf_counter()
        out.backward(b.dout)
        t2 = time.perf_counter()
        res = {"out": out.detach(), "dx": x.grad, "dw": w.grad}
        res.update({n: p.grad for n, p in self.params.items()})
        return (t1 - t0, t2 - t1, 0.0), res

    def close(self):
        del self.experts, self.ctx


def import_ktkernel(variant: str):
    """Imports kt-kernel's SFT wrapper; returns (class, description)."""
    if variant != "auto":
        os.environ["KT_KERNEL_CPU_VARIANT"] = variant  # read by kt_kernel/_cpu_detect.py at import
    import kt_kernel
    from kt_kernel.sft.amx import AMXSFTMoEWrapper
    from kt_kernel.sft.base import KExpertsSFTBuffer

    desc = (
        f"kt-kernel {kt_kernel.__version__} variant={kt_kernel.__cpu_variant__} "
        f"from {os.path.dirname(kt_kernel.__file__)}"
    )
    return AMXSFTMoEWrapper, KExpertsSFTBuffer, desc


class KtImpl:
    name = "kt-kernel"

    def __init__(self, layer: Layer, args, max_tokens: int, classes):
        wrapper_cls, buffer_cls, desc = classes
        # The wrapper's input/output staging buffer is a class-level singleton that grows by
        # qlen only, never checks hidden_size: drop it so a new shape gets a fresh one.
        buffer_cls.clear_cache()
        self.share = bool(args.kt_share_backward_bb)
        self.info = f"{desc}, AMXBF16_SFT, threads={args.kt_threads}, share_backward_bb={self.share}"
        kt = wrapper_cls(
            layer_idx=0,
            num_experts=layer.E,
            num_experts_per_tok=args.k,
            hidden_size=layer.H,
            moe_intermediate_size=layer.I,
            num_gpu_experts=0,
            cpuinfer_threads=args.kt_threads,
            threadpool_count=args.kt_numa_pools,
            weight_path="",
            chunked_prefill_size=max_tokens,
            lora_rank=layer.r,
            lora_alpha=layer.r * layer.scaling,
            lora_dropout=0.0,
            max_cache_depth=1,
            method="AMXBF16_SFT",
        )
        kt.share_backward_bb = self.share  # attribute read by load_weights (set so by kt's own wrapper.py)
        kt.load_weights_from_tensors(layer.gate, layer.up, layer.down, torch.arange(layer.E, dtype=torch.int64))
        # Plain tensors (not nn.Parameters): kt-kernel then overwrites the gradient buffers at
        # every backward (no "authoritative optimizer grad" accumulation window).
        self.lora = {n: t.clone() for n, t in layer.lora.items()}
        self.grads = {n: torch.zeros_like(t) for n, t in layer.lora.items()}
        kt.init_lora_weights(*(self.lora[n] for n in LORA_NAMES), *(self.grads[n] for n in LORA_NAMES))
        self.kt = kt

    def step(self, b: Batch):
        t0 = time.perf_counter()
        out = self.kt.forward(b.x, b.ids, b.w, save_for_backward=True)
        t1 = time.perf_counter()
        if self.share:
            self.kt.submit_backward_repack()
            self.kt.wait_backward_repack()
        t2 = time.perf_counter()
        dx, dw = self.kt.backward(b.dout)
        t3 = time.perf_counter()
        res = {"out": out, "dx": dx, "dw": dw}
        res.update({n: g.clone() for n, g in self.grads.items()})
        return (t1 - t0, t3 - t2, t2 - t1), res

    def close(self):
        del self.kt


# ----------------------------------------------------------------------------- driver


def run_impl(impl, b: Batch, reps: int, warmup: int):
    """(median fwd, median bwd, median repack) seconds and the last step's results."""
    times = []
    res = None
    for i in range(warmup + reps):
        t, res = impl.step(b)
        if i >= warmup:
            times.append(t)
    med = tuple(statistics.median(t[j] for t in times) for j in range(3))
    return med, res


def fmt_err(e: dict | None) -> str:
    if not e:
        return f"{'-':>9} {'-':>9} {'-':>9} {'-':>9}"
    return f"{e['out']:9.2e} {e['dx']:9.2e} {e['dw']:9.2e} {e['lora']:9.2e}"


HEADER = (
    f"{'shape':20s} {'T':>6s} {'impl':10s} {'fwd ms':>9s} {'bwd ms':>9s} {'repack ms':>9s} {'total ms':>9s} "
    f"{'TFLOPS':>7s} {'ratio':>6s} {'ratio w/o':>9s} {'err out':>9s} {'err dx':>9s} {'err dw':>9s} {'err LoRA':>9s}"
)


def print_row(row: dict):
    if row.get("error"):
        print(f"{row['shape']:20s} {row['T']:6d} {row['impl']:10s} FAILED: {row['error']}", flush=True)
        return
    ratio = f"{row['ratio']:6.2f}" if row.get("ratio") else f"{'-':>6s}"
    ratio2 = f"{row['ratio_no_repack']:9.2f}" if row.get("ratio_no_repack") else f"{'-':>9s}"
    print(
        f"{row['shape']:20s} {row['T']:6d} {row['impl']:10s} {row['fwd_ms']:9.1f} {row['bwd_ms']:9.1f} "
        f"{row['repack_ms']:9.1f} {row['total_ms']:9.1f} {row['tflops']:7.2f} {ratio} {ratio2} "
        f"{fmt_err(row.get('err'))}",
        flush=True,
    )


def fit_deepseek_experts(c: dict, tokens: list[int], args) -> (int, str):
    """Experts to use for DeepSeek-V3 shapes so that the run fits in memory (power of two)."""
    if args.deepseek_experts:
        return args.deepseek_experts, "--deepseek-experts"
    H, I, k = c["H"], c["I"], c["k"]
    per_expert = 3 * H * I * 2
    # source bf16 copy + moetune (1x, 2x with transposed_copy) + kt-kernel (packed + backward
    # buffer: 2x either way).
    copies = 1 + (2 if args.moetune_backward_weights == "transposed_copy" else 1) + 2
    # Activations held between forward and backward plus scratch, mostly kt-kernel's: measured
    # ~70 KB per token-slot at Qwen3 shapes (H+I = 2816) -> ~25 bytes * (H+I) per slot.
    acts = max(tokens) * k * 25 * (H + I) * 2  # x2: moetune's and the fp32 reference's on top
    avail = mem_available_bytes() or 0
    fit = int((0.85 * avail - acts) // (copies * per_expert))
    E = c["E"]
    while E > k and E > fit:
        E //= 2
    return E, f"memory: {avail / 2**30:.0f} GiB available, {copies} weight copies + activations"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads for moetune's Context, kt-kernel's CPUInfer and the torch reference",
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--configs", default="qwen3,deepseek", help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--experts", type=int, default=None, help="override E for every config (smoke tests)")
    ap.add_argument(
        "--deepseek-experts",
        type=int,
        default=None,
        help="E for DeepSeek-V3 shapes (default: 256, halved until the run fits in memory)",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--check-max-tokens",
        type=int,
        default=4096,
        help="compare against the fp32 reference for T up to this (the reference is slow)",
    )
    ap.add_argument("--isa", default="auto", help="moetune ISA: auto | avx512_bf16 | amx_bf16 | ...")
    ap.add_argument("--moetune-backward-weights", default="repack", choices=["repack", "transposed_copy"])
    ap.add_argument(
        "--kt-variant",
        default="auto",
        choices=["auto", "amx", "avx512_bf16"],
        help="kt-kernel extension variant (sets KT_KERNEL_CPU_VARIANT before the import)",
    )
    ap.add_argument(
        "--kt-share-backward-bb",
        type=int,
        default=1,
        choices=[0, 1],
        help="kt-kernel's share_backward_bb (1: its training default for BF16)",
    )
    ap.add_argument("--kt-numa-pools", type=int, default=1, help="kt-kernel CPUInfer sub-pools (NUMA nodes)")
    ap.add_argument(
        "--kt-threads", type=int, default=None, help="kt-kernel CPUInfer worker threads (default: --threads)"
    )
    ap.add_argument("--skip-kt", action="store_true")
    ap.add_argument("--skip-moetune", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every row to this file")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"unknown config {c!r}; choose from {list(CONFIGS)}")
    tokens = sorted(args.tokens)
    args.kt_threads = args.kt_threads or args.threads
    torch.set_num_threads(args.threads)

    print(f"machine : {cpu_summary()}; load {os.getloadavg()[0]:.2f}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}")
    print(
        f"LoRA r={args.rank} alpha={args.alpha} on gate/up/down; routing uniform random, k distinct experts; "
        f"median of {args.reps} reps after {args.warmup} warm-up; threads {args.threads}"
    )

    kt_classes, kt_failure = None, None
    if not args.skip_kt:
        try:
            kt_classes = import_ktkernel(args.kt_variant)
            print(f"kt-kernel: {kt_classes[2]}")
        except Exception as e:  # noqa: BLE001 -- report exactly why and go on with moetune
            kt_failure = f"import failed: {type(e).__name__}: {e}"
            print(f"kt-kernel: {kt_failure}\n{traceback.format_exc()}")

    rows: list[dict] = []
    for cname in configs:
        c = dict(CONFIGS[cname])
        E = args.experts or c["E"]
        label = c["label"]
        if cname == "deepseek" and not args.experts:
            E, why = fit_deepseek_experts(c, tokens, args)
            if E != c["E"]:
                print(
                    f"NOTE: DeepSeek-V3 shapes with {E} of its {c['E']} experts ({why}): "
                    f"tokens per expert are {c['E'] // E}x the real model's at the same T"
                )
        if E != c["E"]:
            label = f"{label}[E={E}]"
        H, I, k = c["H"], c["I"], c["k"]
        args.k = k
        t0 = time.perf_counter()
        layer = Layer(E, H, I, args.rank, args.alpha, args.seed)
        print(
            f"\n== {label}: E={E} H={H} I={I} k={k}, weights {3 * E * H * I * 2 / 2**30:.2f} GiB bf16 "
            f"(made in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

        impls = []
        if not args.skip_moetune:
            impls.append(MoetuneImpl(layer, args))
        if kt_classes is not None:
            try:
                impls.append(KtImpl(layer, args, max(tokens), kt_classes))
            except Exception as e:  # noqa: BLE001
                print(f"kt-kernel: construction/load failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                kt_failure = f"construction failed: {type(e).__name__}: {e}"
        for impl in impls:
            print(f"   {impl.info}")
        print(f"   RSS after loading: {rss_gib():.1f} GiB")
        print(HEADER, flush=True)

        for T in tokens:
            b = Batch(T, H, E, k, seed=args.seed + 7919 * T)
            ref = None
            if T <= args.check_max_tokens:
                t0 = time.perf_counter()
                ref = reference(layer, b)
                ref_s = time.perf_counter() - t0
            flops = 12.0 * T * k * H * I
            base = None
            for impl in impls:
                row = dict(shape=label, config=cname, E=E, H=H, I=I, k=k, T=T, impl=impl.name)
                time.sleep(0.2)  # let the other backend's spinning workers go to sleep
                try:
                    (f, bw, rp), res = run_impl(impl, b, args.reps, args.warmup)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    print_row(row)
                    continue
                total = f + bw + rp
                row.update(
                    fwd_ms=f * 1e3,
                    bwd_ms=bw * 1e3,
                    repack_ms=rp * 1e3,
                    total_ms=total * 1e3,
                    tflops=flops / total / 1e12,
                    tokens_per_s=T / total,
                )
                if base is None:
                    base = total
                else:
                    row["ratio"] = total / base
                    row["ratio_no_repack"] = (f + bw) / base
                if ref is not None:
                    row["err"] = errors(res, ref)
                rows.append(row)
                print_row(row)
            if ref is not None:
                print(
                    f"{'':20s} {T:6d} {'(fp32 ref':10s} {ref_s * 1e3:9.0f} ms; bf16 rounding of the reference "
                    f"output alone: err {rel_err(ref['out'].to(BF16), ref['out']):.2e})",
                    flush=True,
                )
            del b, ref
            gc.collect()
        print(f"   peak RSS so far: {peak_rss_gib():.1f} GiB")
        for impl in impls:
            impl.close()
        del impls, layer
        gc.collect()

    print(
        "\nratio = kt-kernel total time / moetune total time (> 1: moetune faster); 'ratio w/o' leaves out "
        "kt-kernel's backward repack (overlapped with other work in kt-kernel's training loop)."
    )
    print(
        "err = ||impl - ref||_F / ||ref||_F vs the fp32 reference on the same bf16 values; 'err LoRA' is the "
        "worst of the six LoRA gradients (kt-kernel returns them in bf16, moetune in fp32)."
    )
    if kt_failure:
        print(f"kt-kernel: {kt_failure}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), kt_failure=kt_failure, rows=rows), fh, indent=2, default=str)
        print(f"wrote {args.json}")


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
