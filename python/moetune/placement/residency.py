"""Which experts stay on the GPU: the residency policy and its GPU byte budget.

Counts: `record(layer_key, counts)` after each forward call (the Scheduler does it from observe);
`end_step()` once per optimizer step folds the step's sums into exponential moving averages per
(layer, expert): tokens per step (mu) and active calls per step (a, calls in which the expert got
any pair). Averages are bias-corrected (like Adam's moments), so early refreshes are not
dragged toward zero.

Refresh: at step `warmup_steps`, then every `refresh_every` steps (a low rate: the GPU path loads
and evicts between steps, and a copy of the whole set costs about one step), the policy picks the
set of experts, across ALL layers, with the largest predicted time saved per GPU byte within the
budget (greedy by benefit / bytes; an item that does not fit is skipped and smaller ones still
fill the rest). Benefit of one expert per step, from its layer's current cost model
(online-corrected) and the scheduler's phases:
    nu = mu / a (pairs per active call),
    benefit = a * sum_phases w_p * max(0, min(cpu_p(nu), streamed_p(nu)) - resident_p(nu))
i.e. what it would cost elsewhere (the cheaper of the CPU engine and a streamed copy + compute)
minus what it costs resident. This ranks experts in isolation (it ignores that CPU and GPU run in
parallel); the per-step scheduler then balances whatever is resident.
Hysteresis: an expert already wanted has its score multiplied by (1 + hysteresis) when ranked,
so it is replaced only by an expert whose benefit per byte is clearly higher (default 25%);
routing noise between refreshes (a few % on the averages) does not swap experts.

Budget: an explicit GiB value, or "auto": measured at every refresh from the CUDA caching
allocator and the driver (`auto_budget_bytes`):
    others   = total - free - reserved          (other processes, the CUDA context, non-torch)
    own      = peak_reserved - resident_bytes   (this process's peak without the residents)
    budget   = total - others - own - margin,   margin = margin_bytes + margin_fraction * total
peak_reserved is the allocator's peak since the previous measurement (CudaMemoryProbe resets the
peak counters after reading, keeping run-wide peaks in its own attributes), so it covers the
model, its activations and the staging buffers of the steps just run. The margin (default
1 GiB + 5% of the card) covers allocator fragmentation around the resident tensors, cuBLAS /
NCCL workspaces that appear later, and step-to-step variation of the activations (a longer
sequence than any seen so far needs an explicit budget or a larger margin). The budget never
goes below 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from moetune.placement.cost import CostModel, _as_numpy, cost_phase

GIB = 1 << 30
DEFAULT_MARGIN_BYTES = 1 * GIB
DEFAULT_MARGIN_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class GpuMemory:
    """One reading of a CUDA device (bytes): total and free (the driver's mem_get_info), reserved
    now and its peak since the last reading (the caching allocator's)."""

    total: int
    free: int
    reserved: int
    peak_reserved: int


def auto_budget_bytes(mem: GpuMemory, *, resident_bytes: int, margin_bytes: int = DEFAULT_MARGIN_BYTES,
                      margin_fraction: float = DEFAULT_MARGIN_FRACTION) -> int:
    """GPU bytes the resident experts may take (module docstring). resident_bytes: the residents
    held during the measured window (part of peak_reserved, given back to the budget)."""
    if mem.total <= 0:
        raise ValueError(f"GpuMemory.total must be > 0, got {mem.total}")
    others = max(0, mem.total - mem.free - mem.reserved)
    own = max(0, mem.peak_reserved - int(resident_bytes))
    margin = int(margin_bytes) + int(margin_fraction * mem.total)
    return max(0, int(mem.total - others - own - margin))


class CudaMemoryProbe:
    """Reads GpuMemory of one CUDA device and resets its peak counters, so each reading covers the
    steps since the previous one. The run-wide peaks (what a summary reports) are kept here:
    run_peak_allocated / run_peak_reserved (torch.cuda.max_memory_allocated would only show the
    peak since the last reading)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaMemoryProbe needs a CUDA device, got {self.device}")
        self.run_peak_allocated = 0
        self.run_peak_reserved = 0

    def __call__(self) -> GpuMemory:
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_reserved(self.device)
        self.run_peak_allocated = max(self.run_peak_allocated, torch.cuda.max_memory_allocated(self.device))
        self.run_peak_reserved = max(self.run_peak_reserved, peak)
        torch.cuda.reset_peak_memory_stats(self.device)
        return GpuMemory(total=int(total), free=int(free), reserved=int(reserved), peak_reserved=int(peak))


class _Layer:
    __slots__ = ("E", "tokens", "active", "ema_tokens", "ema_active", "wanted")

    def __init__(self, E: int):
        self.E = E
        self.tokens = np.zeros(E)
        self.active = np.zeros(E)
        self.ema_tokens = np.zeros(E)
        self.ema_active = np.zeros(E)
        self.wanted = np.zeros(E, dtype=bool)


class ResidencyPolicy:
    """Decides the resident experts of every layer (module docstring).

    cost_model_for: layer_key -> CostModel (e.g. Scheduler.cost_model); phases: the phases and
    weights a call is charged for, copies: phase -> whether it copies streamed experts (take both
    from the Scheduler: `ResidencyPolicy.attach(scheduler, ...)`).
    budget: "auto" (needs memory_probe, e.g. CudaMemoryProbe(device)) or GiB as a number.
    refresh_every, warmup_steps: refresh cadence in end_step() calls; ema: the averages' decay per
    step; hysteresis: an incumbent's bonus when ranked.
    Not thread-safe (one training thread).
    """

    def __init__(self, cost_model_for: Callable[[Hashable], CostModel], *, budget: Union[str, float] = "auto",
                 refresh_every: int = 50, warmup_steps: int = 10, ema: float = 0.9, hysteresis: float = 0.25,
                 phases: Union[Sequence[str], Mapping[str, float]] = ("forward", "backward"),
                 copies: Callable[[str], bool] = lambda phase: True,
                 memory_probe: Optional[Callable[[], GpuMemory]] = None,
                 margin_bytes: int = DEFAULT_MARGIN_BYTES, margin_fraction: float = DEFAULT_MARGIN_FRACTION):
        if isinstance(budget, str):
            if budget != "auto":
                raise ValueError(f"budget must be 'auto' or a number of GiB, got {budget!r}")
            if memory_probe is None:
                raise ValueError("budget='auto' measures the GPU: give memory_probe (CudaMemoryProbe(device)), "
                                 "or an explicit budget in GiB")
            self._budget_bytes = None
        else:
            if not (isinstance(budget, (int, float)) and budget >= 0):
                raise ValueError(f"budget must be >= 0 GiB, got {budget!r}")
            self._budget_bytes = int(budget * GIB)
        if int(refresh_every) < 1 or int(warmup_steps) < 1:
            raise ValueError(f"refresh_every and warmup_steps must be >= 1, got {refresh_every}, {warmup_steps}")
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.cost_model_for = cost_model_for
        self.refresh_every, self.warmup_steps = int(refresh_every), int(warmup_steps)
        self.ema, self.hysteresis = float(ema), float(hysteresis)
        items = phases.items() if isinstance(phases, Mapping) else ((p, 1.0) for p in phases)
        self.phases = {}
        for p, w in items:
            cost_phase(p)
            self.phases[p] = float(w)
        self.copies = copies
        self.memory_probe = memory_probe
        self.margin_bytes, self.margin_fraction = int(margin_bytes), float(margin_fraction)
        self.steps = 0
        self.version = 0  # bumped at every refresh that changed the wanted sets
        self.budget_bytes = self._budget_bytes
        self.last_refresh: Dict[str, int] = {}
        self._layers: Dict[Hashable, _Layer] = {}

    @classmethod
    def attach(cls, scheduler, **kw) -> "ResidencyPolicy":
        """A policy using the scheduler's cost models and phases, fed by its observe()."""
        policy = cls(scheduler.cost_model, phases=scheduler.phases, copies=scheduler.copies, **kw)
        scheduler.residency = policy
        return policy

    def _layer(self, layer_key: Hashable) -> _Layer:
        layer = self._layers.get(layer_key)
        if layer is None:
            layer = self._layers[layer_key] = _Layer(self.cost_model_for(layer_key).shape.num_experts)
        return layer

    # inputs -------------------------------------------------------------------------------
    def record(self, layer_key: Hashable, counts) -> None:
        """Pairs per expert [E] of one forward call of this layer."""
        layer = self._layer(layer_key)
        n = _as_numpy(counts, np.float64, "counts")
        if n.shape != (layer.E,):
            raise ValueError(f"layer {layer_key!r}: counts has shape {list(n.shape)}, expected [{layer.E}]")
        layer.tokens += n
        layer.active += n > 0

    def end_step(self) -> bool:
        """Closes one optimizer step; True when the wanted sets were refreshed (the GPU path should
        then load/evict to match `wanted`)."""
        self.steps += 1
        b = self.ema
        for layer in self._layers.values():
            layer.ema_tokens = b * layer.ema_tokens + (1 - b) * layer.tokens
            layer.ema_active = b * layer.ema_active + (1 - b) * layer.active
            layer.tokens[:] = 0
            layer.active[:] = 0
        k = self.steps - self.warmup_steps
        if k >= 0 and k % self.refresh_every == 0:
            self.refresh()
            return True
        return False

    # outputs ------------------------------------------------------------------------------
    def wanted(self, layer_key: Hashable) -> torch.Tensor:
        """bool [E]: the experts of this layer that should be resident now."""
        return torch.from_numpy(self._layer(layer_key).wanted.copy())

    def wanted_bytes(self) -> int:
        return int(sum(int(layer.wanted.sum()) * self.cost_model_for(key).shape.resident_size
                       for key, layer in self._layers.items()))

    def benefit(self, layer_key: Hashable) -> np.ndarray:
        """Predicted seconds saved per step by making each expert of the layer resident."""
        layer = self._layer(layer_key)
        debias = 1.0 - self.ema ** max(1, self.steps)
        mu = layer.ema_tokens / debias
        a = layer.ema_active / debias
        nu = np.where(a > 0, mu / np.maximum(a, 1e-12), 0.0)
        model = self.cost_model_for(layer_key)
        saved = np.zeros(layer.E)
        for p, w in self.phases.items():
            t = model.terms(p, self.copies(p))
            gpu = t.gpu_expert + t.gpu_token * nu
            cpu = t.cpu_expert + t.cpu_token * nu
            streamed = gpu + t.stream_extra + t.copy
            resident = gpu + t.resident_extra
            saved += w * np.maximum(0.0, np.minimum(cpu, streamed) - resident)
        return np.where(a > 0, a * saved, 0.0)

    def refresh(self) -> None:
        """Recomputes the wanted sets now (end_step calls it at the cadence)."""
        held = self.wanted_bytes()
        if self._budget_bytes is None:
            self.budget_bytes = auto_budget_bytes(self.memory_probe(), resident_bytes=held,
                                                  margin_bytes=self.margin_bytes, margin_fraction=self.margin_fraction)
        budget = int(self.budget_bytes)
        keys = list(self._layers)
        scores, sizes, owners, index, incumbent = [], [], [], [], []
        for li, key in enumerate(keys):
            layer = self._layers[key]
            size = self.cost_model_for(key).shape.resident_size
            ben = self.benefit(key)
            score = ben / size * np.where(layer.wanted, 1.0 + self.hysteresis, 1.0)
            scores.append(score)
            sizes.append(np.full(layer.E, size, dtype=np.int64))
            owners.append(np.full(layer.E, li, dtype=np.int64))
            index.append(np.arange(layer.E))
            incumbent.append(layer.wanted)
        if not keys:
            return
        score, size = np.concatenate(scores), np.concatenate(sizes)
        owner, idx, inc = np.concatenate(owners), np.concatenate(index), np.concatenate(incumbent)
        # Highest score first; ties: incumbents, then layer / expert order (deterministic).
        order = np.lexsort((idx, owner, ~inc, -score))
        chosen = np.zeros(score.size, dtype=bool)
        used = 0
        for i in order:
            if score[i] <= 0:
                break
            if used + size[i] <= budget:
                chosen[i] = True
                used += int(size[i])
        swaps_in = int((chosen & ~inc).sum())
        swaps_out = int((~chosen & inc).sum())
        for li, key in enumerate(keys):
            self._layers[key].wanted = chosen[owner == li].copy()
        if swaps_in or swaps_out:
            self.version += 1
        self.last_refresh = {"step": self.steps, "experts": int(chosen.sum()), "bytes": used, "budget": budget,
                             "swaps_in": swaps_in, "swaps_out": swaps_out}

    def stats(self) -> Dict[str, float]:
        """Numbers for metrics.jsonl: wanted experts / bytes, budget, swaps at the last refresh."""
        r = self.last_refresh
        return {"resident_experts": float(r.get("experts", 0)), "resident_bytes": float(r.get("bytes", 0)),
                "resident_budget": float(self.budget_bytes or 0), "resident_swaps": float(r.get("swaps_in", 0)
                                                                                           + r.get("swaps_out", 0))}
