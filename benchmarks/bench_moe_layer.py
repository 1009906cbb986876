#!/usr/bin/env python
"""Benchmark one MoE layer's routed experts, forward + backward, LoRA r=16 on gate, up and down.

Implementations, all on the same data (bf16 weights, bf16 x, bf16 topk_weights):

  moetune    moetune.moe_experts (LoRA A/B fp32 nn.Parameters).
  hf_loop    an HF-style per-expert loop in eager PyTorch bf16 (one_hot -> per expert
             F.linear, index_add_), LoRA as x @ A^T @ B^T per projection, bf16 LoRA params,
             one A/B parameter pair per expert and projection (as PEFT makes for per-expert
             nn.Linear experts).
  hf_peft    "what a user gets today": transformers' own experts module (fused 3-D
             parameters gate_up_proj [E, 2I, H], down_proj [E, H, I]) with PEFT LoRA via
             LoraConfig(target_parameters=[...gate_up_proj, ...down_proj]), the experts
             implementation transformers selects by default for the model class
             (config._experts_implementation, determined at run time), PEFT's default
             fp32 adapters.  NB: PEFT puts ONE LoRA on the fused gate_up_proj
             (A [r, H], B [2I, r] per expert) rather than separate gate and up LoRAs;
             its useful math is counted with the same FLOP formula as the others.
             PEFT folds the LoRA into the weight: every forward materialises
             W + s*B@A for ALL E experts (baddbmm) and the backward a dense [E, out, in]
             weight gradient, so its cost hardly depends on T.

Timing: median of --reps fwd+bwd steps after --warmup.  Reps during which other processes
used > 0.25 core (from /proc/stat) are repeated and dropped (the note column says so):
shared machines otherwise give meaningless numbers.

Every implementation computes out = sum_j w[t,j] * expert(x[t]) and, in backward, the
gradients of x, topk_weights and every LoRA A/B (base weights are frozen: no dW).

FLOP count (printed in the header too; T tokens, k top-k, H hidden, I intermediate,
r LoRA rank, per MoE layer):
  base forward      2*T*k*3*H*I          (gate, up, down GEMMs)
  base backward     --flops exact (default): 2*T*k*3*H*I  -- data gradients only
                    (dh = Wd^T dy, dx = Wg^T dg + Wu^T du); frozen weights have no dW GEMMs.
                    --flops 3pass: 2 * (2*T*k*3*H*I), the usual "backward = 2x forward" of
                    training with weight gradients.
  LoRA              per projection and token-slot, forward 2*r*(in+out) (A x and B z);
                    backward 2x that (dz = B^T g, dx-part A^T dz, dB, dA).  3 projections
                    (gate: H->I, up: H->I, down: I->H), so fwd+bwd LoRA = 3 * 3 * 2*T*k*r*(H+I).
  Router, softmax, silu and the weighted sum are not counted.
Achieved TFLOPS = counted FLOPs / measured fwd+bwd time.

Usage examples:
  python benchmarks/bench_moe_layer.py --configs qwen3 --tokens 128,1024 --only-baselines
  python benchmarks/bench_moe_layer.py --configs deepseek --deepseek-experts 32 --tokens 1024 --skip-peft
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
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import mem_available_bytes

BF16 = torch.bfloat16

CONFIGS = {
    "qwen3": dict(label="Qwen3-30B-A3B", H=2048, I=768, E=128, k=8),
    "deepseek": dict(label="DeepSeek-V3", H=7168, I=2048, E=256, k=8),
    # a small Qwen3-style layer for smoke-testing this script
    "tiny": dict(label="tiny(Qwen3-style)", H=256, I=128, E=16, k=4),
}


# ----------------------------------------------------------------------------- machine / misc


def machine_info() -> dict[str, str]:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = {}
        for line in out.splitlines():
            if ":" in line:
                a, b = line.split(":", 1)
                kv[a.strip()] = b.strip()
        info["cpu_model"] = kv.get("Model name", "?")
        info["sockets"] = kv.get("Socket(s)", "?")
        info["cores_per_socket"] = kv.get("Core(s) per socket", "?")
        info["threads_per_core"] = kv.get("Thread(s) per core", "?")
        info["cpus"] = kv.get("CPU(s)", "?")
        flags = kv.get("Flags", "").split()
        info["isa_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except Exception as e:  # noqa: BLE001
        info["cpu_model"] = f"? (lscpu failed: {e})"
    return info


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def flops_fwd_bwd(T, k, H, I, r, convention: str) -> float:
    base_fwd = 2.0 * T * k * 3 * H * I
    base_bwd = base_fwd if convention == "exact" else 2.0 * base_fwd
    lora = 3 * 3 * 2.0 * T * k * r * (H + I)
    return base_fwd + base_bwd + lora


# ----------------------------------------------------------------------------- data


class LayerData:
    """Frozen expert weights of one layer (HF fused layout; per-projection views) and LoRA init."""

    def __init__(self, H, I, E, r, alpha, seed):
        g = torch.Generator().manual_seed(seed)
        self.H, self.I, self.E, self.r = H, I, E, r
        self.scaling = alpha / r
        std_h, std_i = 1.0 / math.sqrt(H), 1.0 / math.sqrt(I)
        # HF layout: gate_up_proj [E, 2I, H] (gate rows first, then up: Qwen3/DeepSeek chunk(2)).
        self.gate_up = torch.empty(E, 2 * I, H, dtype=BF16)
        self.down = torch.empty(E, H, I, dtype=BF16)
        for e in range(E):  # per expert, to keep the fp32 temporary small
            self.gate_up[e] = (torch.randn(2 * I, H, generator=g) * std_h).to(BF16)
            self.down[e] = (torch.randn(H, I, generator=g) * std_i).to(BF16)
        self.gate = self.gate_up[:, :I]  # views: gate[e], up[e] are contiguous [I, H]
        self.up = self.gate_up[:, I:]
        # LoRA init (fp32): A ~ N(0, 1/in), B small but non-zero (zeros would make no
        # difference to dense math, but keep the numbers meaningful).
        self.lora = {}
        for p, (din, dout) in (("gate", (H, I)), ("up", (H, I)), ("down", (I, H))):
            A = torch.randn(E, r, din, generator=g) / math.sqrt(din)
            B = torch.randn(E, dout, r, generator=g) * (0.1 / (math.sqrt(r) * self.scaling))
            self.lora[p] = (A, B)


class BatchData:
    def __init__(self, T, H, E, k, routing, zipf, seed):
        g = torch.Generator().manual_seed(seed)
        self.T = T
        self.x = torch.randn(T, H, generator=g).to(BF16)
        if routing == "uniform":  # k distinct experts per token, uniformly at random
            ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
        elif routing == "skewed":  # Zipf-like popularity; k distinct per token (Gumbel top-k)
            pop = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf
            pop = pop[torch.randperm(E, generator=g)]
            u = torch.rand(T, E, generator=g, dtype=torch.float64).clamp_min(1e-12)
            ids = (pop.log()[None, :] - torch.log(-torch.log(u))).topk(k, dim=1).indices
        else:
            raise ValueError(routing)
        self.ids = ids.to(torch.int64).contiguous()
        logits = torch.randn(T, k, generator=g)
        self.w = torch.softmax(logits, dim=1).to(BF16)  # like the HF router: topk values in bf16
        self.dout = torch.randn(T, H, generator=g).to(BF16)
        counts = torch.bincount(self.ids.flatten(), minlength=E)
        self.load = dict(
            experts_hit=int((counts > 0).sum()),
            max_per_expert=int(counts.max()),
            mean_per_hit_expert=float(counts[counts > 0].float().mean()),
        )


# ----------------------------------------------------------------------------- timing


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy_s() -> float | None:
    """CPU seconds all processes have been busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _HZ
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def time_steps(
    step: Callable[[], None],
    reps: int,
    warmup: int,
    budget_s: float,
    contention_cores: float = 0.25,
    max_extra: int | None = None,
):
    """Times fwd+bwd steps after `warmup`; returns (times of the reps used for the median, note).

    A rep (>= 0.2 s) during which other processes used more than `contention_cores` cores (measured
    from /proc/stat minus this process's CPU time) is "contended" and repeated, up to `max_extra`
    extra reps (default: reps); the median is over the uncontended reps if there are any.
    If a single step takes longer than `budget_s`, timing stops there (possibly at 1 rep).
    """
    max_extra = reps if max_extra is None else max_extra
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if dt > budget_s:
            return [dt], f"1 rep (warmup took {dt:.0f}s > budget {budget_s:.0f}s)"
    clean, contended, worst_other = [], [], 0.0
    attempts = 0
    note = ""
    while len(clean) < reps and attempts < reps + max_extra:
        attempts += 1
        b0, c0 = _system_busy_s(), _own_cpu_s()
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        b1, c1 = _system_busy_s(), _own_cpu_s()
        # CPU accounting is in clock ticks (10 ms): only judge reps long enough to measure.
        measurable = b0 is not None and b1 is not None and dt >= 20.0 / _HZ
        other = ((b1 - b0) - (c1 - c0)) / dt if measurable else 0.0
        worst_other = max(worst_other, other)
        (contended if other > contention_cores else clean).append(dt)
        if dt > budget_s:
            note = f"stopped after a {dt:.0f}s rep (budget {budget_s:.0f}s)"
            break
    times = clean if clean else contended
    if contended:
        note = (note + "; " if note else "") + (
            f"{len(contended)} contended rep(s) dropped (other processes used up to {worst_other:.1f} cores)"
            if clean
            else f"ALL {len(contended)} reps contended (others used up to {worst_other:.1f} cores)"
        )
    return times, note


# ----------------------------------------------------------------------------- moetune


def time_batches(batches: dict, params, forward, args) -> dict:
    """Times fwd+bwd of `forward(x, batch, w)` on every batch: grads of x, w and
    `params` are reset before each step, so every rep does the same work."""
    res = {}
    for key, b in batches.items():
        x = b.x.clone().requires_grad_(True)
        w = b.w.clone().requires_grad_(True)
        last = {}

        def step():
            x.grad = w.grad = None
            for q in params:
                q.grad = None
            out = forward(x, b, w)
            out.backward(b.dout)
            last["out"] = out.detach()

        times, note = time_steps(step, args.reps, args.warmup, args.budget_s)
        res[key] = (times, note, last["out"])
    return res


def bench_moetune(layer: LayerData, batches: dict, args, meta: dict):
    """All moetune timings of one layer config. Returns {(T, routing): (times, note, out)}."""
    import moetune  # only here: --only-baselines must work without the extension

    ctx = moetune.Context(num_threads=args.threads, isa=args.isa)
    meta["moetune_info"] = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dict(ctx.info()).items()
    }
    experts = moetune.MoEExperts(
        ctx,
        layer.gate.contiguous(),
        layer.up.contiguous(),
        layer.down,
        backward_weights=args.backward_weights,
        activations=args.activations,
    )
    gc.collect()
    params = {p: (nn.Parameter(A.clone()), nn.Parameter(B.clone())) for p, (A, B) in layer.lora.items()}
    lora = moetune.LoraWeights(gate=params["gate"], up=params["up"], down=params["down"], scaling=layer.scaling)
    flat = [t for pair in params.values() for t in pair]
    res = time_batches(batches, flat, lambda x, b, w: moetune.moe_experts(experts, x, b.ids, w, lora=lora), args)  # noqa: F821 (del below)
    del experts, ctx
    gc.collect()
    return res


# ----------------------------------------------------------------------------- baseline (a): HF-style loop


def hf_loop_forward(x, ids, w, gate, up, down, lora, s):
    """Per-expert loop in the style of transformers' eager experts forward, with LoRA x A^T B^T.

    lora[proj] = (list of E parameters A_e [r, in], list of E parameters B_e [out, r]): one pair
    per expert, as PEFT creates for per-expert nn.Linear experts (transformers 4.x layout).
    (Indexing a single [E, r, in] parameter per expert instead would make autograd build an
    E-times-larger zero gradient for every expert visited: O(E^2) memory traffic.)
    """
    E = gate.shape[0]
    out = torch.zeros_like(x)
    with torch.no_grad():
        expert_mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    (Ag, Bg), (Au, Bu), (Ad, Bd) = lora["gate"], lora["up"], lora["down"]
    for e in expert_hit.flatten().tolist():
        pos, tok = torch.where(expert_mask[e])
        xe = x[tok]
        g = F.linear(xe, gate[e]) + s * F.linear(F.linear(xe, Ag[e]), Bg[e])
        u = F.linear(xe, up[e]) + s * F.linear(F.linear(xe, Au[e]), Bu[e])
        h = F.silu(g) * u
        y = F.linear(h, down[e]) + s * F.linear(F.linear(h, Ad[e]), Bd[e])
        y = y * w[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def per_expert_params(t: torch.Tensor, dtype) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(t[e].to(dtype).clone()) for e in range(t.shape[0])])


def bench_hf_loop(layer: LayerData, batches: dict, args, meta: dict):
    params = {p: (per_expert_params(A, BF16), per_expert_params(B, BF16)) for p, (A, B) in layer.lora.items()}
    all_params = [q for A, B in params.values() for q in list(A) + list(B)]
    res = time_batches(
        batches,
        all_params,
        lambda x, b, w: hf_loop_forward(x, b.ids, w, layer.gate, layer.up, layer.down, params, layer.scaling),
        args,
    )
    return res


# ----------------------------------------------------------------------------- baseline (b): transformers + PEFT


def _hf_classes(config_name: str):
    if config_name in ("qwen3", "tiny"):
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        return Qwen3MoeConfig, m.Qwen3MoeExperts, m.Qwen3MoeForCausalLM
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    return DeepseekV3Config, m.DeepseekV3Experts, m.DeepseekV3ForCausalLM


def _hf_config(config_name, H, I, E, k):
    cfg_cls, _, _ = _hf_classes(config_name)
    common = dict(
        hidden_size=H,
        moe_intermediate_size=I,
        num_experts_per_tok=k,
        hidden_act="silu",
        num_hidden_layers=1,
        vocab_size=128,
        torch_dtype="bfloat16",
    )
    if config_name in ("qwen3", "tiny"):
        return cfg_cls(
            num_experts=E,
            intermediate_size=4 * I,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=H // 4,
            **common,
        )
    return cfg_cls(
        n_routed_experts=E,
        intermediate_size=4 * I,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=0,
        **common,
    )


def default_experts_implementation(config_name: str) -> str:
    """The experts implementation transformers picks by default for this model class (tiny model)."""
    _, _, model_cls = _hf_classes(config_name)
    tiny = _hf_config(config_name, 64, 32, 4, 2)
    with torch.device("meta"):
        model = model_cls(tiny)
    impl = model.config._experts_implementation
    del model
    return impl


class _ExpertsHolder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, ids, w):
        return self.experts(x, ids, w)


def bench_hf_peft(layer: LayerData, batches: dict, args, meta: dict, config_name: str):
    from peft import LoraConfig, get_peft_model

    _, experts_cls, _ = _hf_classes(config_name)
    cfg = _hf_config(config_name, layer.H, layer.I, layer.E, args.k)
    impl = args.hf_experts_impl or default_experts_implementation(config_name)
    cfg._experts_implementation = impl
    meta.setdefault("hf_experts_implementation", {})[config_name] = impl
    with torch.device("meta"):
        ex = experts_cls(cfg)
    ex.gate_up_proj = nn.Parameter(layer.gate_up, requires_grad=False)  # shares our storage
    ex.down_proj = nn.Parameter(layer.down, requires_grad=False)
    ex.config._experts_implementation = impl
    holder = _ExpertsHolder(ex)
    lcfg = LoraConfig(
        r=layer.r,
        lora_alpha=layer.r * layer.scaling,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    model = get_peft_model(holder, lcfg)
    # Non-zero LoRA weights (PEFT inits B = 0).
    g = torch.Generator().manual_seed(1234)
    lora_params = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                fan = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan) * (0.1 if "lora_B" in n else 1.0))
            lora_params.append(p)
    meta.setdefault("peft_trainable", {})[config_name] = {
        n: [list(p.shape), str(p.dtype).replace("torch.", "")] for n, p in model.named_parameters() if p.requires_grad
    }
    res = time_batches(batches, lora_params, lambda x, b, w: model(x, b.ids, w), args)  # noqa: F821 (del below)
    del model, holder, ex
    gc.collect()
    return res


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="qwen3,deepseek", help="comma list of: qwen3, deepseek")
    ap.add_argument("--tokens", default="128,1024,4096", help="comma list of T")
    ap.add_argument("--routing", default="uniform,skewed", help="comma list of: uniform, skewed")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity for --routing skewed")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="threads for torch (baselines) and moetune (default: all usable cores)",
    )
    ap.add_argument("--reps", type=int, default=5, help="timed reps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="per-baseline time budget: if one rep takes longer, report it with the reps done so far",
    )
    ap.add_argument(
        "--deepseek-experts",
        type=int,
        default=None,
        help="use only N of DeepSeek-V3's 256 experts (default: 256, reduced automatically if memory "
        "is short; the output says so)",
    )
    ap.add_argument("--only-baselines", action="store_true", help="do not import or run moetune")
    ap.add_argument("--skip-loop", action="store_true", help="skip the HF-style loop baseline")
    ap.add_argument("--skip-peft", action="store_true", help="skip the transformers + PEFT baseline")
    ap.add_argument(
        "--hf-experts-impl",
        default=None,
        help="transformers experts implementation for hf_peft (default: what transformers selects for "
        "the model class, e.g. grouped_mm; 'eager' is the per-expert loop)",
    )
    ap.add_argument("--isa", default="auto", help="moetune ISA: auto | scalar | avx2 | avx512 | avx512_bf16 | amx_bf16")
    ap.add_argument("--backward-weights", default="repack", choices=["repack", "transposed_copy"])
    ap.add_argument("--activations", default="save", choices=["save", "recompute"])
    ap.add_argument(
        "--flops",
        default="exact",
        choices=["exact", "3pass"],
        help="FLOP convention for the base backward (see the module docstring)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"unknown config {c!r}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)

    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
        if not args.skip_peft:
            print("peft is not installed: skipping the hf_peft baseline")
            args.skip_peft = True

    mach = machine_info()
    meta = dict(
        machine=mach,
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft_version,
        torch_threads=torch.get_num_threads(),
        moetune_threads=args.threads,
        args=vars(args),
        flops_convention=args.flops,
        notes=[],
    )
    print(
        f"machine : {mach.get('cpu_model')} | {mach.get('sockets')} socket(s) x {mach.get('cores_per_socket')} "
        f"core(s) x {mach.get('threads_per_core')} thread(s) = {mach.get('cpus')} CPUs | {mach.get('isa_flags')}"
    )
    print(
        f"software: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}, "
        f"python {mach['python']}"
    )
    load = os.getloadavg()
    meta["loadavg_at_start"] = load
    print(
        f"load    : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)"
        + ("  WARNING: the machine is busy, timings will be noisy" if load[0] > 0.5 else "")
    )
    print(f"threads : torch.get_num_threads() = {torch.get_num_threads()}, moetune num_threads = {args.threads}")
    print(
        f"LoRA    : r = {args.rank}, alpha = {args.alpha}, on gate, up and down; reps = {args.reps} (median), "
        f"warmup = {args.warmup}, per-rep budget = {args.budget_s:.0f}s"
    )
    bwd = "2*T*k*3*H*I (dh, dx; frozen W)" if args.flops == "exact" else "2*(2*T*k*3*H*I) (3-pass convention)"
    print(f"FLOPs   : fwd+bwd = 2*T*k*3*H*I (fwd) + {bwd} + 3 LoRA projections x 3 x 2*T*k*r*(H+I)")

    rows: list[dict] = []
    moetune_ok = not args.only_baselines
    for cname in configs:
        c = dict(CONFIGS[cname])
        H, I, E, k = c["H"], c["I"], c["E"], c["k"]
        label = c["label"]
        if cname == "deepseek":
            per_expert = 3 * H * I * 2  # bf16 bytes
            # peak: weights + the largest implementation's copies (PEFT: merged W' and its gradient,
            # moetune transposed_copy: 2 packed copies) -> ~4x the weights, keep 20% headroom.
            avail = mem_available_bytes()
            fit = int(0.8 * avail // (4 * per_expert)) if avail else E
            if args.deepseek_experts is not None:
                E = args.deepseek_experts
            elif fit < E:
                E = max(k, fit)
            if E != c["E"]:
                msg = (
                    f"NOTE: DeepSeek-V3 run with {E} of its {c['E']} experts "
                    f"({'--deepseek-experts' if args.deepseek_experts is not None else 'memory: ' + f'{avail / 2**30:.0f} GiB available'}); "
                    f"tokens per expert are {c['E'] / E:.1f}x the real model's"
                )
                print(msg)
                meta["notes"].append(msg)
                label = f"{label}[E={E}]"
        args.k = k
        print(f"\n== {label}: H={H} I={I} E={E} k={k}  (weights {3 * E * H * I * 2 / 2**30:.2f} GiB bf16)")
        t0 = time.perf_counter()
        layer = LayerData(H, I, E, args.rank, args.alpha, seed=args.seed)
        print(f"   weights generated in {time.perf_counter() - t0:.1f}s")
        batches = {}
        for T in tokens:
            for r in routings:
                b = BatchData(T, H, E, k, r, args.zipf, seed=args.seed + 7919 * T + (0 if r == "uniform" else 1))
                batches[(T, r)] = b
                print(
                    f"   T={T:5d} {r:8s}: experts hit {b.load['experts_hit']}/{E}, max tokens/expert "
                    f"{b.load['max_per_expert']}, mean per hit expert {b.load['mean_per_hit_expert']:.1f}"
                )

        results: dict[str, dict] = {}
        if moetune_ok:
            try:
                results["moetune"] = bench_moetune(layer, batches, args, meta)
                print(f"   moetune: {meta.get('moetune_info')}")
            except ImportError as e:
                print(f"   moetune unavailable ({e!r}); continuing with the baselines only")
                meta["notes"].append(f"moetune unavailable: {e!r}")
                moetune_ok = False
        if not args.skip_loop:
            results["hf_loop"] = bench_hf_loop(layer, batches, args, meta)
        if not args.skip_peft:
            results["hf_peft"] = bench_hf_peft(layer, batches, args, meta, cname)
            print(f"   hf_peft experts implementation: {meta['hf_experts_implementation'][cname]}")

        for (T, r), _b in batches.items():
            fl = flops_fwd_bwd(T, k, H, I, args.rank, args.flops)
            mt = results.get("moetune", {}).get((T, r))
            mt_med = statistics.median(mt[0]) if mt else None
            for impl, res in results.items():
                times, note, out = res[(T, r)]
                med = statistics.median(times)
                row = dict(
                    config=label,
                    H=H,
                    I=I,
                    E=E,
                    k=k,
                    T=T,
                    routing=r,
                    impl=impl,
                    time_ms=med * 1e3,
                    reps=len(times),
                    times_ms=[t * 1e3 for t in times],
                    tokens_per_s=T / med,
                    tflops=fl / med / 1e12,
                    flops=fl,
                    note=note,
                    speedup_moetune=(med / mt_med) if (mt_med and impl != "moetune") else None,
                )
                if impl != "moetune" and mt is not None and impl == "hf_loop":
                    # same math (separate gate/up LoRA) -> outputs must agree to bf16 accuracy
                    ref = out.float()
                    row["moetune_vs_loop_rel_maxdiff"] = float((mt[2].float() - ref).abs().max() / ref.abs().max())
                rows.append(row)
        del layer, batches, results
        gc.collect()

    # ------------------------------------------------------------------ table
    hdr = (
        f"{'config':22s} {'T':>5s} {'routing':8s} {'impl':8s} {'time (ms)':>11s} {'min (ms)':>10s} {'tokens/s':>10s} "
        f"{'TFLOPS':>7s} {'moetune speedup':>15s}  note"
    )
    print("\n" + hdr)
    print("-" * len(hdr))
    for row in rows:
        sp = (
            f"{row['speedup_moetune']:.2f}x" if row["speedup_moetune"] else ("-" if row["impl"] == "moetune" else "n/a")
        )
        extra = row["note"]
        if "moetune_vs_loop_rel_maxdiff" in row:
            extra = (
                extra + "; " if extra else ""
            ) + f"max|moetune-loop|/max|loop| = {row['moetune_vs_loop_rel_maxdiff']:.2e}"
        print(
            f"{row['config']:22s} {row['T']:5d} {row['routing']:8s} {row['impl']:8s} {row['time_ms']:11.1f} "
            f"{min(row['times_ms']):10.1f} "
            f"{row['tokens_per_s']:10.1f} {row['tflops']:7.3f} {sp:>15s}  {extra}"
        )
    print(
        "time = median over the timed reps (fwd+bwd), min = fastest rep; tokens/s and TFLOPS use the median;"
        " speedup = baseline median / moetune median."
    )
    n_cont = sum(1 for row in rows if "contended" in row["note"])
    if n_cont:
        print(
            f"WARNING: {n_cont} row(s) had reps during which other processes competed for the cores "
            "(see note); those reps were repeated/dropped where possible."
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
