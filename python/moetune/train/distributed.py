"""`moetune train` over several processes (torchrun / accelerate launch): expert parallelism for
the routed experts, DDP for the rest (or FSDP2: `data_parallel`, moetune.parallel.fsdp), rank 0
the only one that prints, logs and saves.

Data: every rank reads the same batch stream (same seed, same state: checkpoints resume on any
number of ranks) and takes micro-batches j*N + rank of each step's N * grad_accum; the step's
loss tokens are counted over all of them (every rank knows every batch), each rank's loss is
scaled by N (DDP averages), so a step equals one process's step over the same N * grad_accum
micro-batches (token-weighted, as moetune.train.loop normalises).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os

import torch
import torch.distributed as dist

from moetune.parallel import ExpertParallel, adapter, failure, fsdp, grads, ownership, profile, rebalance
from moetune.parallel.cpus import rank_context
from moetune.parallel.expert_lora import expert_lora_tensors
from moetune.parallel.launcher import Launch, init_from_launcher, launched
from moetune.parallel.rebalance_options import RebalanceOptions
from moetune.placement.metrics import PREFIX as PLACEMENT_PREFIX

# Per rank and step in metrics.jsonl (ep_<name>_rank<r>): expert rows (token slots) its experts
# computed, of them on its CPU engine / on its GPU (resident or streamed), and its placement's CPU /
# GPU busy seconds (only where a GPU placement runs).
STEP_NUMBERS = ("rows", "cpu_rows", "gpu_rows", "cpu_s", "gpu_s")


@dataclasses.dataclass
class Distributed:
    """One rank of a multi-process run (None of it when not launched by torchrun)."""

    launch: Launch
    ep: ExpertParallel
    rebalancer: rebalance.Rebalancer | None = None  # experts moving between ranks (start_rebalancing)
    data_parallel: fsdp.DataParallel = fsdp.DEFAULT

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    def start(self, prepare, say):
        """(say, prepare()'s result): rank 0 prepares the run folder (and prints); the others
        get its result (or its error) and print nothing."""
        obj = [None]
        if self.is_main:
            try:
                obj[0] = ("ok", prepare())
            except Exception as e:
                obj[0] = ("error", f"{type(e).__name__}: {e}")
                with self.ep.guard("the start of the run"):
                    dist.broadcast_object_list(obj, src=0)
                raise
        with self.ep.guard("the start of the run"):
            dist.broadcast_object_list(obj, src=0)
        status, value = obj[0]
        if status != "ok":
            raise RuntimeError(f"moetune train: rank 0 failed to start the run: {value}")
        return (say if self.is_main else _quiet), value

    def balance_ownership(self, load, batches: list[dict], out_dir: str, say) -> ExpertParallel:
        """Expert ownership balanced by the routing of `batches` (this rank's profile micro-batches):
        load(ep) builds the model under the current ownership (by index), its routers are counted
        on every rank and summed (moetune.parallel.profile), the model is dropped, and the run's
        ExpertParallel gets the counts (by_load then decides every layer's owners, the same on
        every rank). Rank 0 writes the choice to ep_ownership.json in the run folder."""
        model = load(self.ep)
        counts = profile.routing_profile(model, batches, self.ep)
        del model
        gc.collect()  # the by-index engines go before the balanced ones load
        self.ep = dataclasses.replace(self.ep, routing_counts=counts)
        if self.is_main:
            record, by_idx, by_ld = {}, 0.0, 0.0
            for i, c in counts.items():
                own, idx = self.ep.ownership(i, len(c)), ownership.by_index(len(c), self.world_size)
                a, b = ownership.load_per_rank(idx, c), ownership.load_per_rank(own, c)
                record[str(i)] = {"counts": c, "owner": list(own.owner), "load_by_index": a, "load_by_load": b}
                by_idx, by_ld = by_idx + max(a), by_ld + max(b)
            with open(os.path.join(out_dir, "ep_ownership.json"), "w") as f:
                json.dump(record, f, indent=1)
            say(
                f"expert ownership by the routing of {len(batches)} micro-batches per rank: the busiest rank's "
                f"token slots {by_idx:,.0f} by index -> {by_ld:,.0f} by load (all MoE layers)"
            )
        return self.ep

    def device(self, device: torch.device) -> torch.device:
        """The rank's device: its own GPU (cuda:LOCAL_RANK) where the run is on CUDA."""
        return torch.device("cuda", self.launch.local_rank) if device.type == "cuda" else device

    def begin_step(self) -> None:
        """At the start of an optimizer step (local): what this rank's experts computed so far."""
        self._rows_at_start = self._rows()

    def end_step(self, placed: dict[str, float]) -> None:
        """At the end of the step (local): this rank's numbers of the step, from its experts'
        counters and its placement's numbers (`placed`: ModelPlacement.end_step(), {} when the
        experts run on the CPU engine only), in STEP_NUMBERS order."""
        rows = float(self._rows() - self._rows_at_start)
        if placed:  # the placement computed the rows: its split and busy seconds
            cpu = placed.get(PLACEMENT_PREFIX + "tokens_cpu", 0.0)
            gpu = placed.get(PLACEMENT_PREFIX + "tokens_resident", 0.0) + placed.get(
                PLACEMENT_PREFIX + "tokens_streamed", 0.0
            )
            cpu_s, gpu_s = placed.get(PLACEMENT_PREFIX + "cpu_s", 0.0), placed.get(PLACEMENT_PREFIX + "gpu_s", 0.0)
        else:  # the CPU engine computed every row; its busy time is not measured apart
            cpu, gpu, cpu_s, gpu_s = rows, 0.0, math.nan, math.nan
        self._step_numbers = [rows, cpu, gpu, cpu_s, gpu_s]

    def step_metrics(self) -> dict[str, float]:
        """Every rank's numbers of the last step, for rank 0's metrics (one all_gather of
        len(STEP_NUMBERS) numbers; a collective: every rank calls it at the same steps):
        ep_{name}_rank{r} for each name of STEP_NUMBERS (seconds only where a placement ran)."""
        out = {}
        for r, values in enumerate(self.gather_list(self._step_numbers)):
            for name, v in zip(STEP_NUMBERS, values):
                if not math.isnan(v):
                    out[f"ep_{name}_rank{r}"] = v
        return out

    def context(self, isa: str = "auto"):
        """This rank's engine Context, pinned to its own CPUs."""
        return rank_context(self.launch.local_rank, self.launch.local_world_size, isa=isa)

    def load_device(self, device: torch.device) -> torch.device:
        """Where the model loads: the rank's device (DDP), or host RAM under FSDP2, whose wrap moves
        each unit's shard to the device (the non-expert part never has to fit one GPU whole)."""
        return torch.device("cpu") if self.data_parallel == fsdp.DataParallel.FSDP2 else device

    def wrap(self, pm, device: torch.device | None = None):
        """The PEFT model under DDP (expert LoRA and engine-held weights excluded), or sharded by
        FSDP2 in place onto `device` (the rank's; the routed experts ignored); returns the module to
        call and remembers the expert LoRA tensors."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.tensors = expert_lora_tensors(pm)
        if self.data_parallel == fsdp.DataParallel.FSDP2:
            if device is None:
                device = next(p.device for p in pm.parameters() if p.requires_grad)
            self.fsdp = fsdp.shard(pm, device=device)  # over the default group (see fsdp's doc)
            return self.fsdp
        grads.ddp_ignore(pm, self.tensors)
        dev = next(p.device for p in pm.parameters() if p.requires_grad)
        self.ddp = DDP(pm, device_ids=[dev.index] if dev.type == "cuda" else None)
        return self.ddp

    def optimizer_options(self, params) -> dict:
        """Keyword arguments of the run's optimizer over `params` (FSDP2: fsdp.optimizer_options)."""
        return fsdp.optimizer_options(params) if self.data_parallel == fsdp.DataParallel.FSDP2 else {}

    def start_rebalancing(self, pm, every: int, min_gain: float) -> None:
        """Experts move between ranks every `every` optimizer steps (moetune.parallel.rebalance; 0: never)."""
        opts = RebalanceOptions(every, min_gain)
        self.rebalancer = rebalance.Rebalancer(pm, opts) if opts.every else None

    def rebalance(self, step: int, optimizer) -> dict | None:
        """At the end of optimizer step `step` (a collective when due): the rebalance's numbers, or None."""
        return None if self.rebalancer is None else self.rebalancer.maybe(step, optimizer)

    def no_sync(self, last: bool):
        if self.data_parallel == fsdp.DataParallel.FSDP2:  # gradients reduce-scattered after the last only
            self.fsdp.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def my_batches(self, batches: list) -> list:
        """Of one step's N * grad_accum micro-batches, this rank's (j*N + rank)."""
        return batches[self.launch.rank :: self.world_size]

    def finish_grads(self, params, max_grad_norm: float | None) -> float:
        """Expert gradients to DDP's average, then the global norm (clipped if asked)."""
        grads.scale_expert_grads(self.tensors, self.world_size)
        if max_grad_norm is not None:
            return float(grads.clip_grad_norm_(params, max_grad_norm, self.tensors, self.ep.group))
        return float(grads.global_grad_norm(params, self.tensors, self.ep.group))

    def sum(self, value: float) -> float:
        """The sum over ranks of a per-rank number (fp64 on the CPU group)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.ep.device)
        with self.ep.guard("a sum over ranks"):
            dist.all_reduce(t, group=self.ep.group)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (a collective)."""
        return self.sum(float(flag)) > 0

    def gather_list(self, values: list[float]) -> list[list[float]]:
        """Every rank's list (same length on every rank)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.ep.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self.ep.guard("a gather over ranks"):
            dist.all_gather(out, t, group=self.ep.group)
        return [o.tolist() for o in out]

    def sync(self, pm, optimizer=None):
        """Every expert's LoRA (and optimizer state) from its owner: before saving (all ranks).
        Returns what rank 0 saves: (pm, optimizer) themselves, or under FSDP2 a
        fsdp.FullStateSaver of both, gathered into full tensors (a collective)."""
        adapter.sync(pm, self.tensors)
        if optimizer is not None:
            adapter.sync_optimizer(optimizer, self.tensors)
        if self.data_parallel != fsdp.DataParallel.FSDP2:
            return pm, optimizer
        opt = None if optimizer is None else fsdp.full_optimizer_state(optimizer)
        saver = fsdp.FullStateSaver(pm, fsdp.full_trainable_state(pm), opt)
        return saver, (None if optimizer is None else saver)

    def loadable(self, optimizer):
        """The optimizer as moetune.train.checkpoint.load fills it (FSDP2: full state cut to this
        rank's shards; the model's own load hook does the same for the LoRA)."""
        return fsdp.ShardingOptimizer(optimizer) if self.data_parallel == fsdp.DataParallel.FSDP2 else optimizer

    @contextlib.contextmanager
    def guard_step(self, step: int):
        """Around one optimizer step (and what follows it: eval, checkpoint): a lost rank, seen
        by one of moetune's collectives or by DDP's gradient all-reduce, is one RankLostError
        naming the step; every other error passes unchanged."""
        try:
            yield
        except failure.RankLostError as e:
            raise e.at_step(step) from e.__cause__
        except RuntimeError as e:
            if not failure.is_backend_failure(e):
                raise
            raise failure.RankLostError(
                self.launch.rank,
                self.world_size,
                "DDP's gradient all-reduce" if self.data_parallel == fsdp.DataParallel.DDP else "FSDP2's collectives",
                self.ep.timeout_s,
                failure.first_line(e),
                step,
            ) from e

    def _rows(self) -> int:
        """Expert rows (token slots) this rank's experts computed so far, all MoE layers."""
        seen, rows = set(), 0
        for t in self.tensors:
            if id(t.layer) not in seen:
                seen.add(id(t.layer))
                rows += t.layer.rows
        return rows


def _quiet(*_args, **_kw) -> None:
    """`say` of the ranks other than 0."""


class NullLog:
    """The metrics log of ranks other than 0 (rank 0 writes the one metrics file)."""

    def __init__(self, *_args, **_kw):
        self.records: list[dict] = []
        self.trackers = self

    def store_config(self, *_args) -> None:
        pass

    def log(self, kind: str, step: int, **values) -> None:
        self.records.append({"kind": kind, "step": step, **values})

    def close(self) -> None:
        pass


def setup(
    expert_parallel: str, timeout_s: float, device_type: str = "cpu", data_parallel: str = fsdp.DEFAULT.value
) -> Distributed | None:
    """The run's Distributed when launched by torchrun / accelerate launch with more than one
    process and expert_parallel is "auto"; None otherwise. device_type: the run's device
    ("cuda": NCCL, each rank on its own GPU; else gloo, also on a machine with GPUs);
    data_parallel: the non-expert part's wrapper (moetune.parallel.fsdp.DataParallel)."""
    launch = launched()
    if launch is None or launch.world_size == 1 or expert_parallel == "off":
        if launch is not None and launch.world_size > 1:
            raise ValueError(
                f"moetune train: launched with {launch.world_size} processes but expert_parallel='off': "
                "several processes need expert parallelism (or launch one process)"
            )
        return None
    launch = init_from_launcher(backend="nccl" if device_type == "cuda" else "gloo", timeout_s=timeout_s)
    # the experts' group gets the run's timeout too (new_group's own default is torch's 30 min)
    group = dist.new_group(list(range(launch.world_size)), timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(launch, ExpertParallel.from_group(group, timeout_s=timeout_s), fsdp.DataParallel(data_parallel))
