"""The training loop of `moetune train`.

One optimizer step = `grad_accum` micro-batches. The step's loss is the
token-weighted mean over all of its loss tokens: each micro-batch's loss is
sum(CE) / (loss tokens of the whole step) (transformers' `num_items_in_batch`),
so the gradients equal those of one big batch, whatever the split, and match
HF Trainer's (which normalises the same way). Everything that decides the
trajectory (LoRA init, data order, dropout, optimizer and schedule state) is
seeded or checkpointed, so `--resume` continues exactly.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict

import torch

from moetune.train import checkpoint, data, metrics, report
from moetune.train.config import ConfigError, TrainConfig, check_resume_compatible, save_run_config, tuple_betas
from moetune.train.model import apply_lora, generate, load_base, load_tokenizer, resolve_device, resolve_devices

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def merged_export_call(model, path: str, say) -> None:
    """The merged-model export (`merge_export`): base + LoRA written as a full HF
    checkpoint, streamed shard by shard from the source folder by
    moetune.merge_and_save (atomic: a temp folder renamed at the end)."""
    import moetune

    moetune.merge_and_save(model, path)
    say(f"merged model written to {path}")


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: abort."""

    def __init__(self, say):
        self.stop = False
        self._say = say
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        self._say("\nmoetune train: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again aborts)")

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, samples, cfg: TrainConfig, pad_id: int, device: torch.device) -> float:
    """Token-weighted mean CE over the eval set."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in data.eval_batches(samples, cfg.micro_batch_size, pad_id):
            n = data.target_count(b)
            if n == 0:
                continue
            out = model(**_to(b, device), num_items_in_batch=n, use_cache=False)
            total += out.loss.item() * n
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def train(cfg: TrainConfig, *, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run `moetune train` for a validated config; returns the summary dict."""
    cfg.validate()
    out_dir = os.path.abspath(cfg.output_dir)
    resume_from = None
    if cfg.resume:
        resume_from = checkpoint.latest_checkpoint(out_dir)
        if resume_from is None:
            raise ConfigError(f"resume: no checkpoint in {os.path.join(out_dir, 'checkpoints')}")
        check_resume_compatible(cfg, os.path.join(out_dir, "config.yaml"))
    os.makedirs(out_dir, exist_ok=True)
    save_run_config(cfg, os.path.join(out_dir, "config.yaml"))
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg)
    from moetune.train.demo_model import demo_data_path

    data_path = cfg.data or demo_data_path()

    # Tokenizer and data first: a bad record fails before the (long) model load.
    tok = load_tokenizer(cfg)
    train_s, eval_s, dstats, fmt = data.prepare(cfg, tok, data_path)
    say(f"data: {data_path} ({fmt}): {len(train_s['input_ids'])} train / "
        f"{0 if eval_s is None else len(eval_s['input_ids'])} eval samples"
        + (f", {dstats['train']['truncated']} truncated" if dstats['train']['truncated'] else "")
        + (f", {dstats['train']['dropped_long'] + dstats['train']['dropped_empty']} dropped"
           if dstats['train']['dropped_long'] + dstats['train']['dropped_empty'] else ""))

    model, handle = load_base(cfg, device, len(tok))
    say(f"model: {'embedded demo (tiny Qwen3-MoE)' if cfg.is_demo else cfg.model}: "
        f"{len(handle.module_names)} MoE layers on the CPU engine ({', '.join(handle.families)}), "
        f"{handle.packed_bytes / 2 ** 20:.1f} MiB packed experts; the rest on {device}; "
        f"engine {handle.ctx.info()['kernel']} x{handle.ctx.num_threads} threads")
    if cfg.expert_cache_dir is not None:
        outcome = getattr(model, "moetune_cache", {}).values()
        hits = sum(why == "hit" for why in outcome)
        say(f"expert cache {cfg.expert_cache_dir}: {hits} MoE layers read from it, {len(outcome) - hits} built from "
            "the checkpoint")
    pm = apply_lora(model, cfg, handle)
    n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    say(f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
        f"{', '.join(n for n, on in (('attention', cfg.lora_attention), ('dense MLP', cfg.lora_mlp), ('experts', cfg.lora_experts)) if on)}: "
        f"{n_train:,} trainable parameters")
    pm.config.use_cache = False
    if cfg.gradient_checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()

    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple_betas(cfg), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    pad_id = tok.pad_token_id
    stream = data.Stream(train_s, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing,
                         max_length=cfg.max_length, shuffle=cfg.shuffle, seed=cfg.seed, pad_id=pad_id)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.rows_per_epoch()
                                                    / (cfg.micro_batch_size * cfg.grad_accum)))
    from transformers import get_scheduler

    sched = get_scheduler(SCHEDULES[cfg.schedule], opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_steps)

    step, tokens, target_tokens, prior_wall = 0, 0, 0, 0.0
    if resume_from is not None:
        st = checkpoint.load(resume_from, model=pm, optimizer=opt, scheduler=sched)
        stream.load_state(st["data"])
        step, tokens, target_tokens, prior_wall = st["step"], st["tokens"], st["target_tokens"], st["wall_seconds"]
        say(f"resumed from {resume_from} (step {step} of {total_steps})")
    checkpoint.clean_partial(out_dir)
    log = metrics.MetricsLog(out_dir, tensorboard=cfg.tensorboard,
                             resume_step=step if resume_from is not None else None)

    before = generate(pm, tok, cfg.sample_prompts, cfg.max_new_tokens, device) if cfg.sample_prompts else []
    ctx = handle.ctx
    stop_at = total_steps if cfg.stop_after_steps is None else min(total_steps, step + cfg.stop_after_steps)
    t_start = time.perf_counter()
    inv_tokens, inv_wait0 = 0, ctx.wait_seconds
    last_saved = None
    first_loss = next((r["loss"] for r in log.records if r["kind"] == "train"), None)
    loss = float("nan")
    for d in resolve_devices(cfg):
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)

    def save_ckpt():
        nonlocal last_saved
        if last_saved == step or step == 0:
            return
        path = checkpoint.save(out_dir, step, model=pm, optimizer=opt, scheduler=sched, keep=cfg.keep_checkpoints,
                               state={"data": stream.state(), "tokens": tokens, "target_tokens": target_tokens,
                                      "wall_seconds": prior_wall + time.perf_counter() - t_start})
        last_saved = step
        bar.write(f"checkpoint: {path}")

    if eval_s is not None and cfg.eval_every and resume_from is None:
        log.log("eval", 0, eval_loss=evaluate(pm, eval_s, cfg, pad_id, device))  # the starting point
    bar = metrics.Progress(cfg.progress, total_steps, step, fallback=say)
    interrupted = False
    with _StopFlag(bar.write) as flag:
        try:
            while step < stop_at:
                t0, w0 = time.perf_counter(), ctx.wait_seconds
                batches, step_tokens = [], 0
                for _ in range(cfg.grad_accum):
                    batches.append(stream.next_batch())
                    step_tokens += stream.last_tokens
                n_items = sum(data.target_count(b) for b in batches)
                lr = sched.get_last_lr()[0]
                loss = 0.0
                for b in batches:
                    if n_items == 0:
                        continue
                    out = pm(**_to(b, device), num_items_in_batch=n_items, use_cache=False)
                    out.loss.backward()
                    loss += out.loss.item()
                if cfg.max_grad_norm is not None:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                else:
                    gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                if not math.isfinite(loss) or not math.isfinite(gnorm):
                    raise FloatingPointError(f"step {step + 1}: loss {loss} / grad norm {gnorm} is not finite; "
                                             "lower lr or check the data")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens += step_tokens
                target_tokens += n_items
                inv_tokens += step_tokens
                dt = time.perf_counter() - t0
                share = (ctx.wait_seconds - w0) / dt if dt > 0 else 0.0
                elapsed = time.perf_counter() - t_start
                tps = inv_tokens / elapsed if elapsed > 0 else 0.0
                if first_loss is None:
                    first_loss = loss
                if step % cfg.log_every == 0 or step == stop_at:
                    log.log("train", step, loss=loss, lr=lr, grad_norm=gnorm, tokens=tokens,
                            target_tokens=n_items, tokens_per_s=step_tokens / dt, expert_share=share,
                            step_seconds=dt, epoch=stream.epoch)
                bar.update(loss=loss, lr=lr, tokens_per_s=tps, expert_share=share)
                if eval_s is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    el = evaluate(pm, eval_s, cfg, pad_id, device)
                    log.log("eval", step, eval_loss=el)
                    bar.write(f"step {step}: eval loss {el:.4f}")
                if cfg.save_every and step % cfg.save_every == 0:
                    save_ckpt()
                if flag.stop:
                    interrupted = True
                    break
        finally:
            bar.close()
        # Interrupted (Ctrl-C or stop_after_steps) or done: the state to resume from.
        if step < total_steps or cfg.save_every:
            save_ckpt()
    wall = time.perf_counter() - t_start
    finished = step >= total_steps
    ev_records = [r for r in log.records if r["kind"] == "eval"]
    if finished and eval_s is not None and (not ev_records or ev_records[-1]["step"] != step):
        el = evaluate(pm, eval_s, cfg, pad_id, device)
        log.log("eval", step, eval_loss=el)
        ev_records = [r for r in log.records if r["kind"] == "eval"]
    adapter_dir = os.path.join(out_dir, "adapter")
    if finished:
        pm.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        if cfg.merge_export:
            merged_export_call(pm, cfg.merge_export, say)
    after = generate(pm, tok, cfg.sample_prompts, cfg.max_new_tokens, device) if cfg.sample_prompts else []
    log.close()
    train_recs = [r for r in log.records if r["kind"] == "train"]
    summary = {
        "finished": finished, "interrupted": interrupted, "steps": step, "total_steps": total_steps,
        "tokens": tokens, "target_tokens": target_tokens,
        "wall_seconds": prior_wall + wall, "tokens_per_s": inv_tokens / wall if wall > 0 else 0.0,
        "expert_share": (ctx.wait_seconds - inv_wait0) / wall if wall > 0 else 0.0,
        "first_loss": first_loss if first_loss is not None else float("nan"),
        "last_loss": train_recs[-1]["loss"] if train_recs else float("nan"),
        "first_eval_loss": ev_records[0]["eval_loss"] if ev_records else None,
        "last_eval_loss": ev_records[-1]["eval_loss"] if ev_records else None,
        "losses": [r["loss"] for r in train_recs],
        "peak_gpu_bytes": metrics.peak_gpu_bytes(resolve_devices(cfg)), "peak_host_rss_bytes": metrics.peak_host_rss_bytes(),
        "adapter_dir": adapter_dir if finished else None,
        "checkpoint": checkpoint.latest_checkpoint(out_dir),
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(cfg.sample_prompts, before, after)],
        "data": dstats,
    }
    if cfg.plot and train_recs:
        png = os.path.join(out_dir, "loss.png")
        if report.plot(log.records, png):
            summary["plot"] = png
    if not finished:
        say(f"stopped at step {step}/{total_steps}; continue with --resume (checkpoint {summary['checkpoint']})")
    say(report.summarize(summary, out_dir))
    return summary
