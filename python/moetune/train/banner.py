"""The start-up banner of `moetune train` and the figures it and the summary share:
the trainable parameters by kind (the routed experts' LoRA factors, which the
engine reads, included: they are PEFT parameters like the others) and the
throughput a run reports honestly, also when an invocation ran no step."""

from __future__ import annotations

from typing import Any


def trainable_parameters(pm) -> dict[str, int]:
    """Trainable parameters: total and by kind (experts: the LoRA on the routed experts; attention;
    mlp: dense MLP and shared experts; other)."""
    from peft.tuners.lora import LoraLayer

    from moetune.hf import peft_lora

    counted: set[int] = set()
    out = {"experts": 0, "attention": 0, "mlp": 0, "other": 0}
    for name, m in pm.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        kind = (
            "experts"
            if peft_lora.is_param_wrapper(m)
            else "attention"
            if any(k in name.split(".") for k in ("self_attn", "attn", "attention", "self_attention"))
            else "mlp"
        )
        for sub in (m.lora_A, m.lora_B, getattr(m, "lora_embedding_A", {}), getattr(m, "lora_embedding_B", {})):
            for p in sub.parameters() if hasattr(sub, "parameters") else ():
                if p.requires_grad and id(p) not in counted:
                    counted.add(id(p))
                    out[kind] += p.numel()
    for p in pm.parameters():
        if p.requires_grad and id(p) not in counted:
            counted.add(id(p))
            out["other"] += p.numel()
    out["total"] = sum(out.values())
    return out


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _first(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def banner(cfg, pm, handle, run, dstats, device) -> str:
    """The block printed before the first step."""
    config = getattr(pm, "config", None)
    E = _first(config, "num_experts", "num_local_experts", "n_routed_experts")
    k = _first(config, "num_experts_per_tok", "moe_topk", "top_k")
    fmt = cfg.expert_format + (f" (groups of {cfg.int4_group_size})" if cfg.expert_format == "int4" else "")
    model = "embedded demo (tiny Qwen3-MoE)" if cfg.is_demo else cfg.model
    arch = getattr(config, "model_type", "?")
    layers = len(handle.module_names)
    p = handle.placement
    if p is None or not p.active:
        where = f"the CPU engine ({handle.ctx.info()['kernel']}, {handle.ctx.num_threads} threads)"
    else:
        budget = p.options.gpu_budget_gib
        where = (
            f"placement {p.mode}: the CPU engine ({handle.ctx.num_threads} threads) and {p.device.torch} "
            f"(GPU budget {'auto' if budget is None else f'{budget:g} GiB'})"
        )
    ranks = 1 if getattr(run, "dd", None) is None else run.dd.world_size  # several processes: every rank's batches
    eff = cfg.micro_batch_size * cfg.grad_accum * ranks
    lengths = run.stream.lengths
    rows = run.stream.rows_per_epoch()
    per_row = sum(lengths) / rows if rows else 0.0
    tp = trainable_parameters(pm)
    kinds = ", ".join(f"{n} {tp[n]:,}" for n in ("attention", "mlp", "experts", "other") if tp[n])
    unit = "packed rows" if cfg.packing else "samples"
    lines = [
        "moetune train",
        f"  model       {model} ({arch}), non-expert part on {device} in {cfg.dtype}",
        f"  experts     {layers} MoE layers x {E if E is not None else '?'} experts (top-{k if k is not None else '?'}), "
        f"{fmt}, {_size(handle.packed_bytes)} packed, on {where}",
        f"  data        {len(lengths):,} train samples ({dstats.get('format', '?')}), "
        f"{0 if run.eval_s is None else len(run.eval_s['input_ids']):,} eval; {rows:,} {unit} per epoch",
        f"  steps       {run.total_steps:,}"
        + (f" (resumed at {run.step:,})" if run.resumed else "")
        + f"; effective batch {eff} {unit} ({cfg.micro_batch_size} x {cfg.grad_accum} accumulated"
        + (f" x {ranks} ranks), " if ranks > 1 else "), ")
        + f"~{per_row * eff:,.0f} tokens per step",
        f"  LoRA        r={cfg.lora_rank} alpha={cfg.lora_alpha:g}: {tp['total']:,} trainable parameters ({kinds})",
        f"  output      {run.out_dir}",
    ]
    return "\n".join(lines)


def honest_throughput(run, wall: float) -> dict[str, Any]:
    """tokens/s and the CPU-expert share over this invocation's steps (not its evals, generations
    or saves). An invocation that ran no step (a finished run resumed) reports the run's figures
    from before (tokens over the recorded wall time) and no expert share."""
    steps_wall = getattr(run, "steps_wall", wall)
    ran = run.inv_tokens > 0 and steps_wall > 0
    if ran:
        return {
            "tokens_per_s": run.inv_tokens / steps_wall,
            "expert_share": min(1.0, getattr(run, "steps_wait", 0.0) / steps_wall),
            "throughput_of": "this invocation",
        }
    return {
        "tokens_per_s": run.tokens / run.prior_wall if run.prior_wall > 0 else None,
        "expert_share": None,
        "throughput_of": "the run so far",
    }
