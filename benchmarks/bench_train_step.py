"""End-to-end LoRA training steps of a MoE model: moetune with its experts on the CPU
only, moetune with the experts split per step between the CPU and the GPU (placement
"auto", with and without a GPU budget cap), and plain transformers + PEFT on the GPU.

    python benchmarks/bench_train_step.py --shape qwen3 --layers 8 --seq 1024,4096,16384
    python benchmarks/bench_train_step.py --shape deepseek --layers 2 --seq 4096,16384 --methods cpu,auto
    python benchmarks/bench_train_step.py --smoke      # tiny shapes on the CPU (placement on the stand-in device)

The model is built in memory with random weights (real config values of the shape, fewer
decoder layers; no checkpoint on disk: a DeepSeek-V3 layer's experts are 21 GiB) and, for the
moetune methods, handed to `moetune.hf.patch(model, keep_original=False, placement=...)`, the
public path for a model already in memory. LoRA r=16 (alpha 32) on q/k/v/o and on the routed
experts, gradient checkpointing on (non-reentrant), one sequence of `seq` random tokens per
step, AdamW. Each method runs in a fresh process; inside it every sequence length is timed
after warm-up steps (which also cover the start-up calibration and, with a residency budget,
the first residency refresh).

Methods:
  cpu          moetune, every routed expert on the CPU engine (the path before placement)
  auto-third   moetune, placement "auto" with a GPU budget of one third of the model's expert
               bytes (what a 24 GiB card leaves for the full 48-layer Qwen3-30B-A3B)
  auto         moetune, placement "auto", budget measured from free GPU memory
  auto-percall auto with PlacementOptions(plan_per_step=False): every experts call planned from
               its own routing counts (one host sync per call), the path before plan_per_step
  gpu-third    moetune, placement "gpu" (every routed expert on the GPU: resident within the
               auto-third budget, the rest streamed), the all-GPU side of "never slower"
  gpu          moetune, placement "gpu", budget measured from free GPU memory
  peft         transformers + PEFT target_parameters, everything on the GPU

Printed per (method, seq): seconds per step (median), tokens/s, GPU peak (GiB), host RSS peak
(GiB; VmHWM reset per seq length), and the placement split of the last measured step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GiB = 2.0**30


def shape_config(shape: str, layers: int):
    import transformers

    if shape == "qwen3":
        from bench_load import qwen3_30b_config

        return qwen3_30b_config(layers)
    if shape == "deepseek":  # DeepSeek-V3's config.json values, every layer a MoE layer
        return transformers.DeepseekV3Config(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_hidden_layers=layers,
            first_k_dense_replace=0,
            num_attention_heads=128,
            num_key_value_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            max_position_embeddings=163840,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
    if shape == "tiny":
        return transformers.Qwen3MoeConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            norm_topk_prob=True,
            tie_word_embeddings=False,
            mlp_only_layers=[],
        )
    raise ValueError(shape)


# Attention projections of the Qwen3-MoE and DeepSeek-V3 families (a model has some of them).
ATTENTION_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
]


def lora_model(model, target_modules):
    """The PEFT model every training benchmark measures: LoRA r16 (alpha 32) on `target_modules`
    and on the routed experts, gradient checkpointing on (non-reentrant)."""
    import peft

    lcfg = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lcfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def build_model(cfg, device):
    """The model with random weights: non-expert tensors on `device`, the routed experts'
    fused parameters on the CPU (moetune hands them to the engine) unless `device` is where
    everything goes (peft). Expert weights are copies of a few random experts (fast to make;
    never zeros)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    pool = {}
    for name, p in list(model.named_parameters()):
        is_expert = ".experts." in name
        dev = device if not is_expert or device.type == "cuda" and build_model.experts_on_device else "cpu"
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        elif is_expert:
            key = tuple(p.shape[1:])
            if key not in pool:
                pool[key] = [(torch.randn(key, generator=g) * 0.02).to(torch.bfloat16) for _ in range(4)]
            t = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
            for e in range(p.shape[0]):
                t[e].copy_(pool[key][e % 4])
            set_module_tensor_to_device(model, name, dev, value=t)
            continue
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        set_module_tensor_to_device(model, name, dev, value=t.to(dev))
    for name, b in list(model.named_buffers()):
        if b.device != device and b.device.type != "meta":
            set_module_tensor_to_device(model, name, device, value=b)
    return model


build_model.experts_on_device = False


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_method(method: str, a) -> list:
    import torch

    import moetune
    import moetune.hf

    device = torch.device(a.device)
    cfg = shape_config(a.shape, a.layers)
    torch.set_num_threads(a.torch_threads)
    build_model.experts_on_device = method == "peft"
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    handle = None
    if method != "peft":
        from moetune.placement.options import PlacementOptions

        expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        if method == "cpu":
            placement = PlacementOptions(mode="cpu")
        else:
            budget = expert_bytes / 3 / GiB if method.endswith("-third") else None
            trace = os.path.join(a.trace, f"trace-{a.shape}-{method}.json") if a.trace else None
            placement = PlacementOptions(
                mode="gpu" if a.smoke or method.startswith("gpu") else "auto",
                gpu_budget_gib=budget,
                plan_per_step=not method.endswith("-percall"),
                device=a.device,
                warmup_steps=1,
                max_tokens=max(a.seq),
                **({} if a.refresh_every is None else {"refresh_every": a.refresh_every}),
                calibrate=not a.smoke,
                trace=trace,
            )
        ctx = moetune.Context(a.threads)
        handle = moetune.hf.patch(model, ctx=ctx, keep_original=False, placement=placement)
        model.to(device)
    build_s = time.perf_counter() - t0
    model = lora_model(model, ATTENTION_TARGETS)
    if handle is not None and handle.placement is not None:
        # After checkpointing is on (the placement then keeps a recompute's streamed experts for
        # its backward), before the optimizer exists: the expert LoRA moves to the GPU.
        handle.placement.adopt_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    rows = []
    for seq in a.seq:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g).to(device)
        times, split = [], {}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_rss_peak()
        for step in range(a.warmup + a.steps):
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if handle is not None and handle.placement is not None:
                split = handle.placement.end_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= a.warmup:
                times.append(time.perf_counter() - t)
        gpu_peak = 0.0
        if device.type == "cuda":
            gpu_peak = torch.cuda.max_memory_allocated() / GiB
            if handle is not None and handle.placement is not None:
                gpu_peak = max(gpu_peak, (handle.placement.peak_gpu_bytes() or 0) / GiB)
        s = statistics.median(times)
        rows.append(
            dict(
                method=method,
                seq=seq,
                step_s=s,
                tokens_per_s=seq / s,
                gpu_peak_gib=gpu_peak,
                rss_peak_gib=status_kib("VmHWM") * 1024 / GiB,
                build_s=build_s,
                loss=float(loss),
                split={k: v for k, v in split.items() if isinstance(v, (int, float))},
            )
        )
        print("ROW " + json.dumps(rows[-1]), flush=True)
    if handle is not None and handle.placement is not None and a.trace:
        handle.placement.write_trace()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3", choices=("qwen3", "deepseek", "tiny"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--methods", default="cpu,auto-third,auto,peft")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per seq (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--refresh-every",
        type=int,
        default=None,
        help="residency refresh period in steps (default: the library's; the first refresh is after warm-up step 1)",
    )
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="engine threads")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trace", help="folder for one Perfetto trace per placement method")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (placement on the stand-in device)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:
        a.shape, a.layers, a.seq, a.device = "tiny", 2, "64", "cpu"
        a.methods, a.steps, a.warmup, a.threads = "cpu,auto-third,auto", 1, 1, 1
    a.seq = [int(s) for s in str(a.seq).split(",")]
    if a.child:
        run_method(a.child, a)
        return
    import torch

    print(
        f"shape {a.shape}, {a.layers} decoder layers, seq {a.seq}, engine threads {a.threads}, torch threads "
        f"{a.torch_threads}, device {a.device}"
        + (f" ({torch.cuda.get_device_name()})" if a.device.startswith("cuda") and torch.cuda.is_available() else "")
    )
    rows = []
    for method in a.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method] + [x for x in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = [json.loads(x[4:]) for x in r.stdout.splitlines() if x.startswith("ROW ")]
        if r.returncode or len(got) != len(a.seq):
            print(f"{method}: failed (rc {r.returncode})\n{r.stderr[-3000:]}", flush=True)
        rows += got
        for row in got:
            print(
                f"  {method:<11} seq {row['seq']:>6}: {row['step_s']:7.3f} s/step {row['tokens_per_s']:9.1f} tok/s "
                f"GPU peak {row['gpu_peak_gib']:6.2f} GiB  RSS peak {row['rss_peak_gib']:6.2f} GiB",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    base = {r["seq"]: r for r in rows if r["method"] == "cpu"}
    peft_rows = {r["seq"]: r for r in rows if r["method"] == "peft"}
    by = {(r["method"], r["seq"]): r for r in rows}
    all_gpu = {"auto": "gpu", "auto-third": "gpu-third"}  # auto vs all-GPU under the same budget

    def ratio(ref, r):
        return f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"

    print(
        "\n| method | seq | s/step | tokens/s | vs cpu | vs all-GPU same budget | vs peft | GPU peak GiB "
        "| RSS peak GiB | split (last step) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        split = " ".join(
            f"{k.replace('placement_', '')}={v:.3g}"
            for k, v in sorted(r["split"].items())
            if any(w in k for w in ("experts", "tokens", "bytes_copied", "_s", "share"))
        )
        print(
            f"| {r['method']} | {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{ratio(base.get(r['seq']), r)} | {ratio(by.get((all_gpu.get(r['method'], ''), r['seq'])), r)} | "
            f"{ratio(peft_rows.get(r['seq']), r)} | {r['gpu_peak_gib']:.2f} | "
            f"{r['rss_peak_gib']:.2f} | {split} |"
        )


if __name__ == "__main__":
    main()
