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

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from moetune.train import banner, checkpoint, data, distributed, metrics, progress, report, run_dir, samples
from moetune.train import model as model_mod
from moetune.train.config import ConfigError, TrainConfig, check_resume_compatible, save_run_config, tuple_betas
from moetune.train.model import apply_lora, generate, load_base, load_tokenizer, resolve_device, resolve_devices

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """warmup_steps, else warmup_ratio of the total steps rounded up (as HF TrainingArguments)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


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


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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


def train(cfg: TrainConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `moetune train` for a validated config; returns the summary dict."""
    # None: one process; NCCL where the run is on CUDA, gloo on the CPU
    dd = distributed.setup(cfg.expert_parallel, cfg.dist_timeout_s, resolve_device(cfg).type, cfg.data_parallel)
    if dd is not None:
        say, (out_dir, resume_from) = dd.start(lambda: _start(cfg, say), say)
    else:
        out_dir, resume_from = _start(cfg, say)
    device = resolve_device(cfg)
    if dd is not None:
        device = dd.device(device)
    try:  # a placement this machine cannot do fails before anything is loaded
        model_mod.placement_options(cfg).resolve_mode(device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"expert_placement={cfg.expert_placement!r}: {e}") from None
    # Tokenizer and data first: a bad record fails before the (long) model load.
    tok, train_s, eval_s, dstats = _load_data(cfg, say)
    pm, handle = _load_model(cfg, device, len(tok), say, dd, lambda: _profile_batches(cfg, train_s, tok, dd, device))
    run = _Run(cfg, out_dir, pm, handle.ctx, tok, train_s, eval_s, device, say, handle.placement, dd)
    run.resume(resume_from)
    say(banner.banner(cfg, pm, handle, run, dstats, device))
    before = generate(pm, tok, cfg.sample_prompts, cfg.max_new_tokens, device) if cfg.sample_prompts else []
    run.start_clock()
    interrupted = run.steps()
    return run.finish(before, interrupted, dstats)


def _start(cfg: TrainConfig, say=print):
    """(run folder, checkpoint to resume from or None): the config validated and
    saved in the run folder (after checking it may resume there, moetune.train.run_dir)."""
    cfg.validate()
    out_dir, resume_from = run_dir.prepare(cfg, say)
    if resume_from is not None:
        check_resume_compatible(cfg, run_dir.resumed_run_config(out_dir, resume_from))
    os.makedirs(out_dir, exist_ok=True)
    save_run_config(cfg, os.path.join(out_dir, "config.yaml"))
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    return out_dir, resume_from


def _load_data(cfg: TrainConfig, say):
    """(tokenizer, train samples, eval samples or None, data statistics)."""
    from moetune.train.demo_model import demo_data_path

    data_path = cfg.data or demo_data_path()
    tok = load_tokenizer(cfg)
    if cfg.chat_template is not None:
        from moetune.train.chat_masking import resolve_chat_template

        tok.chat_template = resolve_chat_template(cfg.chat_template)
    train_s, eval_s, dstats, fmt = data.prepare(cfg, tok, data_path)
    say(
        f"data: {data_path} ({fmt}{', tokenized earlier: cache hit' if dstats.get('cache') == 'hit' else ''}): "
        f"{len(train_s['input_ids'])} train / "
        f"{0 if eval_s is None else len(eval_s['input_ids'])} eval samples"
        + (f", {dstats['train']['truncated']} truncated" if dstats["train"]["truncated"] else "")
        + (
            f", {dstats['train']['dropped_long'] + dstats['train']['dropped_empty']} dropped"
            if dstats["train"]["dropped_long"] + dstats["train"]["dropped_empty"]
            else ""
        )
    )
    return tok, train_s, eval_s, dstats


def _train_stream(cfg: TrainConfig, train_s, pad_id: int) -> data.Stream:
    """The training order's batch stream (the run's own, and the routing profile's copy of it)."""
    return data.Stream(
        train_s,
        micro_batch_size=cfg.micro_batch_size,
        packing=cfg.packing,
        max_length=cfg.max_length,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        pad_id=pad_id,
    )


def _profile_batches(cfg: TrainConfig, train_s, tok, dd, device: torch.device) -> list[dict]:
    """This rank's share (j*N + rank) of the first ep_routing_profile * N micro-batches of the
    training order (a stream of its own: the training stream is untouched)."""
    s = _train_stream(cfg, train_s, tok.pad_token_id)
    batches = [s.next_batch() for _ in range(cfg.ep_routing_profile * dd.world_size)]
    return [{k: v for k, v in _to(b, device).items() if k != "labels"} for b in dd.my_batches(batches)]


def _load_model(cfg: TrainConfig, device: torch.device, vocab_size: int, say, dd=None, profile_batches=None):
    """(PEFT model in training mode, patch handle): the base with its experts on the
    engine, LoRA on top (dd: this rank of a multi-process run, moetune.train.distributed;
    profile_batches: its routing-profile batches, when cfg.ep_routing_profile asks for one)."""
    ep = {} if dd is None else {"expert_parallel": dd.ep, "ctx": dd.context()}
    if dd is not None and cfg.ep_routing_profile:
        ep["expert_parallel"] = dd.balance_ownership(
            lambda e: load_base(cfg, device, vocab_size, expert_parallel=e, ctx=ep["ctx"])[0],
            profile_batches(),
            cfg.output_dir,
            say,
        )
    model, handle = load_base(cfg, device if dd is None else dd.load_device(device), vocab_size, **ep)
    say(
        f"model: {'embedded demo (tiny Qwen3-MoE)' if cfg.is_demo else cfg.model}: "
        f"{len(handle.module_names)} MoE layers on the CPU engine ({', '.join(handle.families)}), "
        f"{handle.packed_bytes / 2**20:.1f} MiB packed experts; the rest on {device}; "
        f"engine {handle.ctx.info()['kernel']} x{handle.ctx.num_threads} threads"
    )
    if cfg.expert_cache_dir is not None:
        outcome = getattr(model, "moetune_cache", {}).values()
        hits = sum(why == "hit" for why in outcome)
        say(
            f"expert cache {cfg.expert_cache_dir}: {hits} MoE layers read from it, {len(outcome) - hits} built from "
            "the checkpoint"
        )
    pm = apply_lora(model, cfg, handle)
    if cfg.init_adapter is not None:
        n = checkpoint.load_adapter(pm, cfg.init_adapter)
        say(f"LoRA initialised from {cfg.init_adapter} ({n} tensors)")
    pm.config.use_cache = False
    if cfg.gradient_checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    _start_placement(handle.placement, pm, device, say)
    return pm, handle


def _start_placement(placement, pm, device: torch.device, say) -> None:
    """Resolves the expert placement on the model's device (calibrating its cost model) and puts
    the expert LoRA parameters where the experts compute (before the optimizer exists)."""
    mode = placement.start(device)
    if mode == "cpu":
        say("experts: computed by the CPU engine")
        return
    moved = placement.adopt_lora(pm)
    cal = ", ".join(sorted(set(placement.calibration.values()))) or "none"
    budget = placement.options.gpu_budget_gib
    say(
        f"experts: placement {mode} between the CPU engine and {placement.device.torch} (GPU budget for resident "
        f"experts: {'auto' if budget is None else f'{budget:g} GiB'}; cost model: {cal}; {moved} expert LoRA "
        f"tensors on {placement.device.torch})"
    )


class _Run:
    """What the steps of one train() call share once the model is loaded: optimizer,
    schedule, batch stream, counters, metrics log; the step loop, checkpoints and
    the end of the run (final eval, adapter, summary)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str,
        pm,
        ctx,
        tok,
        train_s,
        eval_s,
        device: torch.device,
        say,
        placement=None,
        dd=None,
    ):
        self.cfg, self.out_dir, self.pm, self.ctx, self.tok = cfg, out_dir, pm, ctx, tok
        self.dd = dd  # moetune.train.distributed.Distributed of a multi-process run, else None
        self.call = pm if dd is None else dd.wrap(pm, device)  # what a training step calls (DDP under torchrun)
        self.ranks = 1 if dd is None else dd.world_size  # each step reads every rank's micro-batches
        self.eval_s, self.device, self.say = eval_s, device, say
        self.placement = placement  # moetune.hf.placement.ModelPlacement (end_step once per step)
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=tuple_betas(cfg),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            **({} if dd is None else dd.optimizer_options(self.params)),  # FSDP2: no foreach over a DTensor mix
        )
        if dd is not None:  # experts move between ranks every ep_rebalance_every steps (0: never)
            dd.start_rebalancing(pm, cfg.ep_rebalance_every, cfg.ep_rebalance_min_gain)
        self.pad_id = tok.pad_token_id
        self.stream = _train_stream(cfg, train_s, self.pad_id)
        self.total_steps = cfg.max_steps or max(
            1,
            math.ceil(cfg.epochs * self.stream.rows_per_epoch() / (cfg.micro_batch_size * cfg.grad_accum * self.ranks)),
        )
        from transformers import get_scheduler

        self.sched = get_scheduler(
            SCHEDULES[cfg.schedule],
            self.opt,
            num_warmup_steps=warmup_steps(cfg, self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.step, self.tokens, self.target_tokens, self.prior_wall = 0, 0, 0, 0.0
        self.resumed = False

    # ---- before the first step ----
    def resume(self, resume_from: str | None) -> None:
        """Restores the state of `resume_from` (if any), then opens the run's metrics log."""
        if resume_from is not None:
            opt = self.opt if self.dd is None else self.dd.loadable(self.opt)  # FSDP2: full state to shards
            if self.cfg.resume == "latest":  # this run's newest intact checkpoint (a damaged one falls back)
                resume_from, st = checkpoint.load_latest_intact(
                    self.out_dir, model=self.pm, optimizer=opt, scheduler=self.sched, say=self.say
                )
            else:  # the checkpoint the user named: exactly that one, or a clear error
                st = checkpoint.load(resume_from, model=self.pm, optimizer=opt, scheduler=self.sched)
            self.stream.load_state(st["data"])
            self.step, self.tokens = st["step"], st["tokens"]
            self.target_tokens, self.prior_wall = st["target_tokens"], st["wall_seconds"]
            self.resumed = True
            self.say(f"resumed from {resume_from} (step {self.step} of {self.total_steps})")
        checkpoint.clean_partial(self.out_dir)
        self.log = (metrics.MetricsLog if self.dd is None or self.dd.is_main else distributed.NullLog)(
            self.out_dir,
            tensorboard=self.cfg.tensorboard,
            resume_step=self.step if self.resumed else None,
            report_to=self.cfg.report_to,
            say=self.say,
        )
        self.log.trackers.store_config(self.cfg.to_dict())

    def start_clock(self) -> None:
        """This invocation's counters (throughput and expert share count from here)."""
        cfg = self.cfg
        self.stop_at = (
            self.total_steps
            if cfg.stop_after_steps is None
            else min(self.total_steps, self.step + cfg.stop_after_steps)
        )
        self.t_start = time.perf_counter()
        self.inv_tokens, self.inv_wait0 = 0, self.ctx.wait_seconds
        self.last_saved = None
        self.first_loss = next((r["loss"] for r in self.log.records if r["kind"] == "train"), None)
        for d in resolve_devices(cfg):
            if d.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d)

    # ---- the steps ----
    def steps(self) -> bool:
        """Optimizer steps up to stop_at, or until Ctrl-C; then a checkpoint to resume
        from. Returns whether Ctrl-C stopped it."""
        cfg = self.cfg
        if self.eval_s is not None and cfg.eval_every and not self.resumed:
            self.log.log("eval", 0, eval_loss=self.evaluate())  # the starting point
        self.bar = progress.Progress(
            cfg.progress and (self.dd is None or self.dd.is_main),
            self.total_steps,
            self.step,
            fallback=self.say,
            every=cfg.print_every,
        )
        interrupted = False
        with _StopFlag(self.bar.write) as flag:
            try:
                while self.step < self.stop_at:
                    with contextlib.nullcontext() if self.dd is None else self.dd.guard_step(self.step + 1):
                        self._one_step()
                        self._after_step()
                        # several processes: every rank stops after the same step (any rank's Ctrl-C)
                        stop = flag.stop if self.dd is None else self.dd.any(flag.stop)
                    if stop:
                        interrupted = True
                        break
            finally:
                self.bar.close()
                self.steps_wall = time.perf_counter() - self.t_start  # this invocation's steps, for its figures
                self.steps_wait = self.ctx.wait_seconds - self.inv_wait0
            # Interrupted (Ctrl-C or stop_after_steps) or done: the state to resume from.
            if self.step < self.total_steps or cfg.save_every:
                self.save_checkpoint()
        return interrupted

    def _one_step(self) -> None:
        """grad_accum micro-batches, token-weighted (num_items_in_batch), one optimizer step; logged."""
        cfg, ctx = self.cfg, self.ctx
        t0, w0 = time.perf_counter(), ctx.wait_seconds
        batches, step_tokens = [], 0
        if self.dd is not None:
            self.dd.begin_step()
        ranks = 1 if self.dd is None else self.dd.world_size  # every rank reads every rank's batches
        for _ in range(cfg.grad_accum * ranks):
            batches.append(self.stream.next_batch())
            step_tokens += self.stream.last_tokens
        n_items = sum(data.target_count(b) for b in batches)
        lr = self.sched.get_last_lr()[0]
        loss = 0.0
        mine = batches if self.dd is None else self.dd.my_batches(batches)
        for i, b in enumerate(mine):
            if n_items == 0:
                continue
            with contextlib.nullcontext() if self.dd is None else self.dd.no_sync(i == len(mine) - 1):
                out = self.call(**_to(b, self.device), num_items_in_batch=n_items, use_cache=False)
                (out.loss * ranks).backward()  # DDP averages over the ranks: x ranks keeps the step's sum
            loss += out.loss.item()
        if self.dd is not None:
            loss = self.dd.sum(loss)
            gnorm = self.dd.finish_grads(self.params, cfg.max_grad_norm)
        elif cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        else:
            gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        if not math.isfinite(loss) or not math.isfinite(gnorm):
            raise FloatingPointError(
                f"step {self.step + 1}: loss {loss} / grad norm {gnorm} is not finite; lower lr or check the data"
            )
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        placed = self.placement.end_step() if self.placement is not None else {}
        if self.dd is not None:
            self.dd.end_step(placed)  # this rank's expert load and CPU / GPU split (local)
        self.step += 1
        moved = None if self.dd is None else self.dd.rebalance(self.step, self.opt)  # experts follow the routing
        self.tokens += step_tokens
        self.target_tokens += n_items
        self.inv_tokens += step_tokens
        dt = time.perf_counter() - t0
        share = (ctx.wait_seconds - w0) / dt if dt > 0 else 0.0
        elapsed = time.perf_counter() - self.t_start
        tps = self.inv_tokens / elapsed if elapsed > 0 else 0.0
        if self.first_loss is None:
            self.first_loss = loss
        if self.step % cfg.log_every == 0 or self.step == self.stop_at:
            per_rank = {} if self.dd is None else self.dd.step_metrics()  # every rank's, gathered (a collective)
            self.log.log(
                "train",
                self.step,
                loss=loss,
                lr=lr,
                grad_norm=gnorm,
                tokens=self.tokens,
                target_tokens=n_items,
                tokens_per_s=step_tokens / dt,
                expert_share=share,
                step_seconds=dt,
                epoch=self.stream.epoch,
                **placed,
                **per_rank,
            )
        if moved is not None:
            self.log.log("rebalance", self.step, **moved)
            if moved["moved_experts"]:
                self.bar.write(
                    f"step {self.step}: {moved['moved_experts']} experts moved between ranks (busiest rank's token "
                    f"slots {moved['busiest_before']:,.0f} -> {moved['busiest_after']:,.0f})"
                )
        self.bar.update(
            loss=loss,
            lr=lr,
            tokens_per_s=tps,
            expert_share=share,
            placement=self.placement.last_progress if placed else "",
            step_tokens=step_tokens,
            step_seconds=dt,
        )

    def _after_step(self) -> None:
        """The periodic eval and checkpoint."""
        cfg, step = self.cfg, self.step
        if self.eval_s is not None and cfg.eval_every and step % cfg.eval_every == 0:
            el = self.evaluate()
            self.log.log("eval", step, eval_loss=el)
            self.bar.write(f"step {step}: eval loss {el:.4f}")
        if cfg.save_every and step % cfg.save_every == 0:
            self.save_checkpoint()

    def evaluate(self) -> float:
        return evaluate(self.pm, self.eval_s, self.cfg, self.pad_id, self.device)

    def save_checkpoint(self) -> None:
        """A checkpoint of the current step (none at step 0, none twice)."""
        if self.last_saved == self.step or self.step == 0:
            return
        model, opt = self.pm, self.opt
        if self.dd is not None:  # every expert's LoRA and optimizer state from its owner, saved by rank 0
            model, opt = self.dd.sync(self.pm, self.opt)  # FSDP2: gathered into full tensors
            if not self.dd.is_main:
                self.last_saved = self.step
                return
        path = checkpoint.save(
            self.out_dir,
            self.step,
            model=model,
            optimizer=opt,
            scheduler=self.sched,
            keep=self.cfg.keep_checkpoints,
            state={
                "data": self.stream.state(),
                "tokens": self.tokens,
                "target_tokens": self.target_tokens,
                "wall_seconds": self.prior_wall + time.perf_counter() - self.t_start,
            },
        )
        self.last_saved = self.step
        self.bar.write(f"checkpoint: {path}")

    # ---- the end ----
    def finish(self, before: list[str], interrupted: bool, dstats) -> dict[str, Any]:
        """Final eval and the adapter (if finished), samples after, the summary (and plot)."""
        cfg, pm, tok = self.cfg, self.pm, self.tok
        wall = time.perf_counter() - self.t_start
        finished = self.step >= self.total_steps
        if finished and self.eval_s is not None:
            ev_records = self._eval_records()
            if not ev_records or ev_records[-1]["step"] != self.step:
                self.log.log("eval", self.step, eval_loss=self.evaluate())
        adapter_dir = os.path.join(self.out_dir, "adapter")
        saved = pm
        if finished and self.dd is not None:
            saved, _ = self.dd.sync(pm)  # FSDP2: the LoRA gathered into full tensors
        if finished and (self.dd is None or self.dd.is_main):
            saved.save_pretrained(adapter_dir)
            tok.save_pretrained(adapter_dir)
            if cfg.merge_export:  # FSDP2's model holds shards: merged from the saved adapter instead
                merged_export_call(pm if saved is pm else (cfg.model, adapter_dir), cfg.merge_export, self.say)
        after = generate(pm, tok, cfg.sample_prompts, cfg.max_new_tokens, self.device) if cfg.sample_prompts else []
        from_data = samples.generate_for(pm, tok, (dstats or {}).get("sample_records", []), cfg, self.device)
        self.log.close()
        trace = self.placement.write_trace() if self.placement is not None else None
        summary = self._summary(wall, finished, interrupted, adapter_dir if finished else None, before, after, dstats)
        summary["placement_trace"] = trace
        summary["data_samples"] = from_data
        summary["trainable_parameters"] = banner.trainable_parameters(pm)
        summary.update(banner.honest_throughput(self, wall))
        if cfg.plot and summary["losses"] and (self.dd is None or self.dd.is_main):
            png = os.path.join(self.out_dir, "loss.png")
            if report.plot(self.log.records, png):
                summary["plot"] = png
        if not finished:
            self.say(
                f"stopped at step {self.step}/{self.total_steps}; continue with --resume "
                f"(checkpoint {summary['checkpoint']})"
            )
        self.say(report.summarize(summary, self.out_dir))
        return summary

    def _placement_summary(self) -> dict[str, Any] | None:
        """Where the experts computed: the resolved mode and device, and the run's totals of the
        per-step placement numbers (None when the CPU engine computed them all)."""
        p = self.placement
        if p is None or not p.active:
            return None
        recs = [r for r in self.log.records if r["kind"] == "train"]
        keys = ("tokens_cpu", "tokens_resident", "tokens_streamed", "bytes_copied", "cpu_s", "gpu_s", "copy_s")
        totals = {k: sum(r.get(f"placement_{k}", 0.0) for r in recs) for k in keys}
        tokens = totals["tokens_cpu"] + totals["tokens_resident"] + totals["tokens_streamed"]
        totals["gpu_token_share"] = (totals["tokens_resident"] + totals["tokens_streamed"]) / tokens if tokens else 0.0
        return {"mode": p.mode, "device": str(p.device.torch), "logged_steps": len(recs), **totals}

    def _eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.log.records if r["kind"] == "eval"]

    def _summary(
        self,
        wall: float,
        finished: bool,
        interrupted: bool,
        adapter_dir: str | None,
        before: list[str],
        after: list[str],
        dstats,
    ) -> dict[str, Any]:
        train_recs = [r for r in self.log.records if r["kind"] == "train"]
        ev_records = self._eval_records()
        return {
            "finished": finished,
            "interrupted": interrupted,
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "wall_seconds": self.prior_wall + wall,
            "tokens_per_s": self.inv_tokens / wall if wall > 0 else 0.0,
            "expert_share": (self.ctx.wait_seconds - self.inv_wait0) / wall if wall > 0 else 0.0,
            "first_loss": self.first_loss if self.first_loss is not None else float("nan"),
            "last_loss": train_recs[-1]["loss"] if train_recs else float("nan"),
            "first_eval_loss": ev_records[0]["eval_loss"] if ev_records else None,
            "last_eval_loss": ev_records[-1]["eval_loss"] if ev_records else None,
            "losses": [r["loss"] for r in train_recs],
            "peak_gpu_bytes": metrics.peak_gpu_bytes(resolve_devices(self.cfg), self.placement),
            "placement": self._placement_summary(),
            "peak_host_rss_bytes": metrics.peak_host_rss_bytes(),
            "adapter_dir": adapter_dir,
            "checkpoint": checkpoint.latest_checkpoint(self.out_dir),
            "samples": [
                {"prompt": p, "before": b, "after": a} for p, b, a in zip(self.cfg.sample_prompts, before, after)
            ],
            "data": dstats,
        }
