"""Which experts stay on the GPU: the residency policy and its GPU byte budget.

Counts: `record(layer_key, counts)` after each forward call (the Scheduler does it from observe);
`end_step()` once per optimizer step folds the step's sums into exponential moving averages per
(layer, expert): tokens per step (mu) and active calls per step (a: calls in which the expert got
any pair), and per layer the calls per step (c). Averages are bias-corrected (like Adam's
moments), so early refreshes are not dragged toward zero.

Refresh: at step `warmup_steps`, then every `refresh_every` steps (a low rate: the GPU path loads
and evicts between steps, and loading the whole set costs about one step's copies), the policy
picks the set of experts, across ALL layers, that maximises the predicted time saved per GPU byte
within the budget:
1. Within a layer, experts are ranked by their benefit in isolation, per step,
       nu = mu / a (pairs per active call),
       benefit = a * sum_phases w_p * max(0, min(cpu_p(nu) - resident_p(nu), streamed_p(nu) - resident_p(nu)))
   (what the expert costs elsewhere, the cheaper of the CPU engine and a streamed copy + compute,
   minus what it costs resident), ties (every expert busy enough to be streamed saves exactly one
   copy) broken by mu: the busiest first.
2. Per layer, the step's predicted time with the top-r experts resident, f(r) = c * (the
   scheduler's "auto" makespan of a call with the expected counts mu / c), on a grid of
   `curve_points` values of r (and the current r); its lower convex hull gives the layer's
   marginal gains, largest first. (Making experts resident helps a layer only until it is bound
   by its GPU compute or its CPU share: a layer's gains diminish, so the budget spreads over the
   layers instead of filling the first ones.)
3. Across layers, hull segments are taken by gain per byte (greedy; a segment that does not fit
   is cut to whole experts, and smaller experts of other layers still fill the rest).
Hysteresis: the current residents' benefit is multiplied by (1 + hysteresis) in step 1 and the
hull segments that keep a layer's current residents in step 3, so an expert is swapped out only
for a replacement whose benefit is clearly higher (default 25%); routing noise between refreshes
(a few % on the averages) does not swap experts.
Cost: layers x (curve_points + 1) scheduler searches per refresh (about 0.5 s for 48 layers of
128 experts in Python), every `refresh_every` steps.

Budget: an explicit GiB value, or "auto": measured at every refresh from the CUDA caching
allocator and the driver (`auto_budget_bytes`):
    others   = total - free - reserved          (other processes, the CUDA context, non-torch)
    own      = peak_reserved - resident_bytes   (this process's peak without the residents)
    budget   = total - others - own - margin,   margin = margin_bytes + margin_fraction * total
peak_reserved is the allocator's peak since the previous measurement (CudaMemoryProbe resets the
peak counters after reading, keeping run-wide peaks in its own attributes), so it covers the
model, its activations and the staging buffers of the steps just run. Longer forwards than the
measured ones: a step's activations (peak_allocated - allocated at the step boundary) grow with
its tokens, so `own` is raised by activations x (max_tokens / tokens_seen - 1), where tokens_seen
is the largest experts call of the measured window and max_tokens the largest the run will see
(PlacementOptions.max_tokens; moetune train sets micro_batch_size x max_length) or, without that
hint, the largest seen so far. Linear in tokens holds for the model's activations, logits and
loss and for attention kernels with linear memory (sdpa / flash); "eager" attention grows
quadratically: give it an explicit budget. The margin (default 1 GiB + 5% of the card) covers
allocator fragmentation around the resident tensors, cuBLAS / NCCL workspaces that appear later,
and the rest of the step-to-step variation. The budget never goes below 0.

Replaced experts (ModelPlacement.replace_engine, experts moved between ranks): `forget(layer_key)`
drops the layer's averages and wanted set (keyed by its old expert indices); its averages restart,
debiased over the steps since, and the next end_step after the warm-up refreshes (off the cadence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

import numpy as np
import torch

from moetune.placement.cost import CostModel, _as_numpy

GIB = 1 << 30
DEFAULT_MARGIN_BYTES = 1 * GIB
DEFAULT_MARGIN_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class GpuMemory:
    """One reading of a CUDA device (bytes): total and free (the driver's mem_get_info), reserved
    now and its peak since the last reading, allocated now and its peak since the last reading
    (the caching allocator's). Read at a step boundary, `allocated` is what persists across steps
    (model, optimizer state, residents), so peak_allocated - allocated is the steps' activations."""

    total: int
    free: int
    reserved: int
    peak_reserved: int
    allocated: int = 0
    peak_allocated: int = 0


def auto_budget_bytes(
    mem: GpuMemory,
    *,
    resident_bytes: int,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    token_scale: float = 1.0,
) -> int:
    """GPU bytes the resident experts may take (module docstring). resident_bytes: the residents
    held during the measured window (part of peak_reserved, given back to the budget).
    token_scale: the largest forward the run will see over the largest measured one (>= 1); the
    measured activations are reserved that many times."""
    if mem.total <= 0:
        raise ValueError(f"GpuMemory.total must be > 0, got {mem.total}")
    if not (token_scale >= 1.0):
        raise ValueError(f"token_scale must be >= 1, got {token_scale}")
    others = max(0, mem.total - mem.free - mem.reserved)
    own = max(0, mem.peak_reserved - int(resident_bytes))
    own += int((token_scale - 1.0) * max(0, mem.peak_allocated - mem.allocated))
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
        allocated = torch.cuda.memory_allocated(self.device)
        peak_allocated = torch.cuda.max_memory_allocated(self.device)
        self.run_peak_allocated = max(self.run_peak_allocated, peak_allocated)
        self.run_peak_reserved = max(self.run_peak_reserved, peak)
        torch.cuda.reset_peak_memory_stats(self.device)
        return GpuMemory(
            total=int(total),
            free=int(free),
            reserved=int(reserved),
            peak_reserved=int(peak),
            allocated=int(allocated),
            peak_allocated=int(peak_allocated),
        )


class _Layer:
    __slots__ = ("E", "since", "tokens", "active", "calls", "ema_tokens", "ema_active", "ema_calls", "wanted")

    def __init__(self, E: int, since: int = 0):
        self.E = E
        self.since = since  # the policy's step count its averages start from (debiasing)
        self.tokens = np.zeros(E)
        self.active = np.zeros(E)
        self.calls = 0.0
        self.ema_tokens = np.zeros(E)
        self.ema_active = np.zeros(E)
        self.ema_calls = 0.0
        self.wanted = np.zeros(E, dtype=bool)


def _lower_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of points sorted by x (monotone chain)."""
    hull = []
    for i in range(x.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b if it lies on or above the segment a -> i.
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return np.array(hull, dtype=np.int64)


class ResidencyPolicy:
    """Decides the resident experts of every layer (module docstring).

    scheduler: the Scheduler whose cost models, phases and search the policy weighs plans with
    (`ResidencyPolicy.attach(scheduler, ...)` also makes its observe() feed the policy).
    budget: "auto" (needs memory_probe, e.g. CudaMemoryProbe(device)) or GiB as a number.
    refresh_every, warmup_steps: refresh cadence in end_step() calls; ema: the averages' decay per
    step; hysteresis: the incumbents' bonus; curve_points: grid size of each layer's f(r).
    max_tokens: the largest experts call (tokens) the run will see, for the "auto" budget's
    activation reserve (None: the largest seen so far; `observe_tokens` reports each call).
    Not thread-safe (one training thread).
    """

    def __init__(
        self,
        scheduler,
        *,
        budget: str | float = "auto",
        refresh_every: int = 50,
        warmup_steps: int = 10,
        ema: float = 0.9,
        hysteresis: float = 0.25,
        curve_points: int = 12,
        memory_probe: Callable[[], GpuMemory] | None = None,
        margin_bytes: int = DEFAULT_MARGIN_BYTES,
        margin_fraction: float = DEFAULT_MARGIN_FRACTION,
        max_tokens: int | None = None,
    ):
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
        if isinstance(budget, str):
            if budget != "auto":
                raise ValueError(f"budget must be 'auto' or a number of GiB, got {budget!r}")
            if memory_probe is None:
                raise ValueError(
                    "budget='auto' measures the GPU: give memory_probe (CudaMemoryProbe(device)), "
                    "or an explicit budget in GiB"
                )
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
        if int(curve_points) < 2:
            raise ValueError(f"curve_points must be >= 2, got {curve_points}")
        self.scheduler = scheduler
        self.refresh_every, self.warmup_steps = int(refresh_every), int(warmup_steps)
        self.ema, self.hysteresis, self.curve_points = float(ema), float(hysteresis), int(curve_points)
        self.memory_probe = memory_probe
        self.margin_bytes, self.margin_fraction = int(margin_bytes), float(margin_fraction)
        self.max_tokens = max_tokens
        self.window_tokens = 0  # the largest experts call since the last memory reading
        self.seen_tokens = 0  # the largest experts call of the run
        self.steps = 0
        self.version = 0  # bumped at every refresh that changed the wanted sets
        self.budget_bytes = self._budget_bytes
        self.last_refresh: dict[str, int] = {}
        self._layers: dict[Hashable, _Layer] = {}
        self._since: dict[Hashable, int] = {}  # forgotten layers: the step their new averages start from
        self._refresh_due = False  # a layer was forgotten after the warm-up: refresh at the next end_step

    @classmethod
    def attach(cls, scheduler, **kw) -> ResidencyPolicy:
        """A policy for the scheduler, fed by its observe() (forward calls)."""
        policy = cls(scheduler, **kw)
        scheduler.residency = policy
        return policy

    def _model(self, layer_key: Hashable) -> CostModel:
        return self.scheduler.cost_model(layer_key)

    def _layer(self, layer_key: Hashable) -> _Layer:
        layer = self._layers.get(layer_key)
        if layer is None:
            E = self._model(layer_key).shape.num_experts
            layer = self._layers[layer_key] = _Layer(E, self._since.get(layer_key, 0))
        return layer

    def forget(self, layer_key: Hashable) -> None:
        """Drops layer `layer_key`'s averages and wanted set: its experts were replaced (an expert
        index now means another expert; the number of experts may differ too). Its averages start
        again at its next recorded call, debiased over the steps from now on (not from the run's
        start); after the warm-up the next end_step refreshes, so the new experts get their share
        of the budget after one step of their routing instead of at the next cadence point. Until
        then the layer wants no resident expert, as every layer at the start."""
        self._layers.pop(layer_key, None)
        self._since[layer_key] = self.steps
        if self.steps >= self.warmup_steps:
            self._refresh_due = True

    # inputs -------------------------------------------------------------------------------
    def record(self, layer_key: Hashable, counts) -> None:
        """Pairs per expert [E] of one forward call of this layer."""
        layer = self._layer(layer_key)
        n = _as_numpy(counts, np.float64, "counts")
        if n.shape != (layer.E,):
            raise ValueError(f"layer {layer_key!r}: counts has shape {list(n.shape)}, expected [{layer.E}]")
        layer.tokens += n
        layer.active += n > 0
        layer.calls += 1

    def observe_tokens(self, tokens: int) -> None:
        """The token count of one experts call (forward or recompute), for the budget's activation
        reserve."""
        self.window_tokens = max(self.window_tokens, int(tokens))
        self.seen_tokens = max(self.seen_tokens, int(tokens))

    def token_scale(self) -> float:
        """The largest forward the run will see over the largest of the measured window (>= 1)."""
        if self.window_tokens <= 0:
            return 1.0
        return max(1.0, max(self.max_tokens or 0, self.seen_tokens) / self.window_tokens)

    def end_step(self) -> bool:
        """Closes one optimizer step; True when the wanted sets were refreshed (the GPU path should
        then load/evict to match `wanted`)."""
        self.steps += 1
        b = self.ema
        for layer in self._layers.values():
            layer.ema_tokens = b * layer.ema_tokens + (1 - b) * layer.tokens
            layer.ema_active = b * layer.ema_active + (1 - b) * layer.active
            layer.ema_calls = b * layer.ema_calls + (1 - b) * layer.calls
            layer.tokens[:] = 0
            layer.active[:] = 0
            layer.calls = 0.0
        k = self.steps - self.warmup_steps
        if k >= 0 and (k % self.refresh_every == 0 or self._refresh_due):
            self.refresh()
            return True
        return False

    # outputs ------------------------------------------------------------------------------
    def wanted(self, layer_key: Hashable) -> torch.Tensor:
        """bool [E]: the experts of this layer that should be resident now."""
        return torch.from_numpy(self._layer(layer_key).wanted.copy())

    def wanted_bytes(self) -> int:
        return int(
            sum(int(layer.wanted.sum()) * self._model(key).shape.resident_size for key, layer in self._layers.items())
        )

    def _averages(self, layer: _Layer):
        debias = 1.0 - self.ema ** max(1, self.steps - layer.since)
        return layer.ema_tokens / debias, layer.ema_active / debias, layer.ema_calls / debias

    def benefit(self, layer_key: Hashable) -> np.ndarray:
        """Predicted seconds saved per step by making each expert resident, in isolation."""
        layer = self._layer(layer_key)
        mu, a, _ = self._averages(layer)
        nu = np.where(a > 0, mu / np.maximum(a, 1e-12), 0.0)
        model = self._model(layer_key)
        saved = np.zeros(layer.E)
        for p, w in self.scheduler.phases.items():
            t = model.terms(p, self.scheduler.copies(p))
            # Differences written out so that equal savings (one copy) are exactly equal.
            vs_cpu = (t.cpu_expert - t.gpu_expert - t.resident_extra) + (t.cpu_token - t.gpu_token) * nu
            vs_stream = t.copy + t.stream_extra - t.resident_extra
            saved += w * np.maximum(0.0, np.minimum(vs_cpu, vs_stream))
        return np.where(a > 0, a * saved, 0.0)

    def refresh(self) -> None:
        """Recomputes the wanted sets now (end_step calls it at the cadence)."""
        self._refresh_due = False
        if self._budget_bytes is None:
            self.budget_bytes = auto_budget_bytes(
                self.memory_probe(),
                resident_bytes=self.wanted_bytes(),
                margin_bytes=self.margin_bytes,
                margin_fraction=self.margin_fraction,
                token_scale=self.token_scale(),
            )
            self.window_tokens = 0
        budget = int(self.budget_bytes)
        boost = 1.0 + self.hysteresis
        keys = list(self._layers)
        ranks, segments = {}, []
        for li, key in enumerate(keys):
            layer = self._layers[key]
            mu, _, calls = self._averages(layer)
            cand = np.flatnonzero(mu > 0)
            if calls <= 0 or cand.size == 0:
                ranks[key] = cand
                continue
            score = self.benefit(key) * np.where(layer.wanted, boost, 1.0)
            rank = cand[np.lexsort((cand, -mu[cand], -score[cand]))]
            ranks[key] = rank
            cur = int(layer.wanted[rank].sum())  # incumbents rank high (bonus): ~ the top `cur`
            grid = np.unique(np.concatenate([np.linspace(0, rank.size, self.curve_points).round(), [cur]]))
            grid = grid.astype(np.int64)
            per_call = mu / calls
            f = np.empty(grid.size)
            for i, r in enumerate(grid):
                res = np.zeros(layer.E, dtype=bool)
                res[rank[:r]] = True
                f[i] = calls * self.scheduler.best_makespan(key, per_call, res)
            f = np.minimum.accumulate(f)
            hull = _lower_hull(grid.astype(np.float64), f)
            size = self._model(key).shape.resident_size
            for a_, b_ in zip(hull[:-1], hull[1:]):
                r0, r1, gain = int(grid[a_]), int(grid[b_]), float(f[a_] - f[b_])
                # Split a segment at the current count: the part keeping incumbents gets the bonus.
                pieces = [(r0, r1)] if not (r0 < cur < r1) else [(r0, cur), (cur, r1)]
                for p0, p1 in pieces:
                    g = gain * (p1 - p0) / (r1 - r0)
                    if g <= 0:
                        continue
                    density = g / ((p1 - p0) * size) * (boost if p1 <= cur else 1.0)
                    segments.append((density, li, p0, p1, size))
        # Largest gain per byte first; a layer's segments stay in order (densities decrease along
        # a hull; ties by r).
        segments.sort(key=lambda s: (-s[0], s[1], s[2]))
        take = {li: 0 for li in range(len(keys))}
        closed = set()
        used = 0
        for _density, li, r0, r1, size in segments:
            if li in closed or take[li] != r0:
                continue
            fit = min(r1 - r0, (budget - used) // size)
            if fit <= 0:
                closed.add(li)
                continue
            take[li] = r0 + fit
            used += fit * size
            if fit < r1 - r0:
                closed.add(li)
        chosen = [ranks[key][: take[li]] for li, key in enumerate(keys)]
        used += self._fill(keys, chosen, budget - used)
        swaps_in = swaps_out = chosen_n = 0
        for li, key in enumerate(keys):
            layer = self._layers[key]
            new = np.zeros(layer.E, dtype=bool)
            new[chosen[li]] = True
            swaps_in += int((new & ~layer.wanted).sum())
            swaps_out += int((~new & layer.wanted).sum())
            chosen_n += int(new.sum())
            layer.wanted = new
        if swaps_in or swaps_out:
            self.version += 1
        self.last_refresh = {
            "step": self.steps,
            "experts": chosen_n,
            "bytes": used,
            "budget": budget,
            "swaps_in": swaps_in,
            "swaps_out": swaps_out,
        }

    def _fill(self, keys: list, chosen: list, left: int) -> int:
        """Budget the gains left unused goes to more experts (in place in `chosen`; returns the
        bytes added): a resident expert is never slower than a streamed or CPU one (no copy, no
        staging), so unused budget buys nothing, while the cost model's predicted gain of the last
        experts is 0 wherever it expects their copies to hide behind compute - which real steps
        do not always achieve. Incumbents first (no swaps for a fill), then the busiest (tokens per
        step), then the idle ones, across layers; an expert that does not fit is skipped for
        smaller ones of other layers."""
        if left <= 0:
            return 0
        extra = []
        for li, key in enumerate(keys):
            layer = self._layers[key]
            mu, _, _ = self._averages(layer)
            size = self._model(key).shape.resident_size
            rest = np.ones(layer.E, dtype=bool)
            rest[chosen[li]] = False
            for e in np.flatnonzero(rest):
                extra.append((not bool(layer.wanted[e]), -float(mu[e]), li, int(e), size))
        extra.sort()
        added = {li: [] for li in range(len(keys))}
        used = 0
        for _inc, _mu, li, e, size in extra:
            if size <= left - used:
                added[li].append(e)
                used += size
        for li, more in added.items():
            if more:
                chosen[li] = np.concatenate([np.asarray(chosen[li], dtype=np.int64), np.asarray(more, dtype=np.int64)])
        return used

    def stats(self) -> dict[str, float]:
        """Numbers for metrics.jsonl: wanted experts / bytes, budget, swaps at the last refresh."""
        r = self.last_refresh
        return {
            "resident_experts": float(r.get("experts", 0)),
            "resident_bytes": float(r.get("bytes", 0)),
            "resident_budget": float(self.budget_bytes or 0),
            "resident_swaps": float(r.get("swaps_in", 0) + r.get("swaps_out", 0)),
        }
