"""The GPU side of MoE layers: a runtime shared by all layers and one GpuExperts per layer.

`GpuRuntime(device, options)` owns what layers share: the Device (copy stream), the Gemm (grouped
or per-expert), the ResidentStore (GPU budget for resident experts), one Streamer per packed
format (staging buffers), the keep budget, and the queue of pending timing records.

`GpuExperts(runtime, experts, layer_key)` is one layer: the engine's packed buffers as host views
(page-locked in place on CUDA for the lifetime of the MoEExperts object), their PackedFormat, the
activation and the frozen biases on the device, the layer's resident pool, the plan memo (a
checkpoint recompute gets the same plan as its forward) and the keep slot (a recompute's streamed
weights, handed to the backward that follows it). `close()` releases all of it at a step boundary
(the layer's experts were replaced: moetune.hf.placement.ModelPlacement.replace_engine); the calls
whose backward is still to come (`open_calls`, registered by op.py) make it refuse.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Callable, Hashable, Iterable

import torch

from moetune.engine import MoEExperts
from moetune.placement import _engine
from moetune.placement.device import Device
from moetune.placement.formats import PackedFormat, format_of
from moetune.placement.gemm import Gemm
from moetune.placement.gpu_math import Activation
from moetune.placement.plan import LayerPlan, Where
from moetune.placement.resident import ResidentStore
from moetune.placement.streamer import Streamer


@dataclasses.dataclass(frozen=True)
class GpuOptions:
    """resident_budget_bytes: GPU memory for resident experts (all layers); keep_budget_bytes: GPU
    memory a checkpoint recompute may keep for its backward (all layers; 0 = never keep);
    stream_chunk_bytes: target stored-format bytes per streamed chunk (at least one expert);
    stream_buffers: raw staging slots per streamer (2 = double, 3 = triple buffering);
    gemm: "auto" | "grouped" | "per_expert" (gemm.py); plan_memo: plans remembered per layer."""

    resident_budget_bytes: int = 0
    keep_budget_bytes: int = 0
    stream_chunk_bytes: int = 64 << 20
    stream_buffers: int = 3
    gemm: str = "auto"
    plan_memo: int = 4

    def __post_init__(self):
        for name in ("resident_budget_bytes", "keep_budget_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"GpuOptions.{name} must be >= 0, got {getattr(self, name)}")
        if self.stream_chunk_bytes < 1 or self.stream_buffers < 1 or self.plan_memo < 1:
            raise ValueError("GpuOptions: stream_chunk_bytes, stream_buffers and plan_memo must be >= 1")


class KeepBudget:
    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.used_bytes = int(budget_bytes), 0

    def try_acquire(self, nbytes: int) -> bool:
        if self.used_bytes + nbytes > self.budget_bytes:
            return False
        self.used_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used_bytes -= nbytes


class GpuRuntime:
    def __init__(self, device="cuda", options: GpuOptions = GpuOptions()):
        self.device = device if isinstance(device, Device) else Device(device)
        self.options = options
        self.gemm = Gemm(self.device.torch, options.gemm)
        self.store = ResidentStore(self.device, options.resident_budget_bytes)
        self.keep = KeepBudget(options.keep_budget_bytes)
        self._streamers: dict[PackedFormat, Streamer] = {}
        self.pending: collections.deque = collections.deque()  # timing records (op.py)
        self.trace = None  # a trace.Trace the op records its calls into (None: not tracing)

    def streamer(self, fmt: PackedFormat) -> Streamer:
        s = self._streamers.get(fmt)
        if s is None:
            chunk = max(1, self.options.stream_chunk_bytes // fmt.stored_bytes_per_expert)
            chunk = min(chunk, fmt.num_experts)
            s = self._streamers[fmt] = Streamer(self.device, fmt, chunk, self.options.stream_buffers)
        return s

    @property
    def staging_bytes(self) -> int:
        return sum(s.staging_bytes for s in self._streamers.values())

    def drop_streamers(self, keep: Iterable[PackedFormat]) -> None:
        """Frees the staging of every streamer whose format is not in `keep` (the formats some
        layer still streams); between steps, with no GPU work of a call in flight."""
        keep = set(keep)
        for fmt in [f for f in self._streamers if f not in keep]:
            del self._streamers[fmt]

    def apply_residency(self, layers, wanted: Callable) -> None:
        """Makes each GpuExperts of `layers` hold wanted(layer_key) (bool [E]: a ResidencyPolicy's
        `wanted`), shrinking layers first so that the budget holds at every step. Between steps:
        a call whose backward is still to come recomputes with streamed weights for the experts
        that stopped being resident meanwhile (same results)."""
        todo = [(g, wanted(g.layer_key)) for g in layers]
        todo.sort(key=lambda gw: int(torch.as_tensor(gw[1]).sum()) - gw[0].pool.capacity)
        for g, w in todo:
            g.set_resident(w)


class GpuExperts:
    """One MoE layer's experts as the GPU path sees them (see the module docstring)."""

    def __init__(self, runtime: GpuRuntime, experts: MoEExperts, layer_key: Hashable = None):
        if not isinstance(experts, MoEExperts):
            raise TypeError(f"experts must be a moetune.MoEExperts, got {type(experts).__name__}")
        self.runtime, self.experts = runtime, experts
        self.layer_key = layer_key if layer_key is not None else id(self)
        self.fmt = format_of(experts)
        buffers = _engine.packed_buffers(experts)
        self.host = self.fmt.host_views(buffers)
        dev = runtime.device
        self.registration = dev.register_host(
            experts,
            [(t.data_ptr(), t.numel()) for t in self.host.values()],
            what=f"layer {self.layer_key!r}'s packed experts",
            keepalive=_engine.memory_owner(experts),
        )
        kind, alpha, limit = _engine.activation(experts)
        self.activation = Activation(kind, alpha, limit)
        self.biases = tuple(None if b is None else b.to(dev.torch) for b in _engine.biases(experts))
        self.pool = runtime.store.pool(self.layer_key, self.fmt)
        self._memo: collections.OrderedDict = collections.OrderedDict()
        self._keep: tuple[tuple, list, int] | None = None  # (chunks, weights per chunk, bytes)
        self.sync_free_cache = None  # op.py's (pool version, index tensors) of the sync-free path
        # op.py's calls of this layer whose backward is still to come (weak: a graph dropped
        # without its backward releases its calls); close() refuses while there are any
        self.open_calls: weakref.WeakSet = weakref.WeakSet()
        self.closed = False

    def check_idle(self) -> None:
        """Raises unless the layer is at a step boundary: no call of it has its backward to come."""
        if self.open_calls:
            raise RuntimeError(
                f"moetune.placement: layer {self.layer_key!r}'s GPU experts cannot be released in the middle of a "
                f"step: {len(self.open_calls)} call(s) of the layer still have their backward to come (replace a "
                "layer's experts between optimizer steps)"
            )

    def close(self) -> None:
        """Releases what the layer holds: its resident pool (freed and removed from the store), the
        keep slot, the plan memo, the device biases and the page-locking of the engine's buffers
        (now, not when the engine is collected). Only at a step boundary: refused (nothing
        released) while a call of this layer still has its backward to come. Unusable afterwards
        (placed_moe_experts refuses it); idempotent."""
        if self.closed:
            return
        self.check_idle()
        self.release_keep()
        self._memo.clear()
        self.sync_free_cache = None
        self.runtime.store.drop(self.layer_key)
        self.runtime.device.unregister_host(self.experts)
        self.experts, self.host, self.biases = None, {}, (None, None, None)
        self.closed = True

    @property
    def streamer(self) -> Streamer:
        return self.runtime.streamer(self.fmt)

    # ---- residency ----
    def resident_mask(self) -> torch.Tensor:
        return self.pool.mask()

    def set_resident(self, wanted) -> None:
        """Makes exactly `wanted` (bool [E] or ids) resident (ResidencyPolicy.wanted(layer_key))."""
        self.pool.apply(wanted, self.host, self.streamer)

    def holds_all(self) -> bool:
        """Whether the pool holds every expert, one slot each (no free slot): the sync-free path's
        condition (op.py)."""
        slots = self.pool.slot_expert
        return len(slots) == self.fmt.num_experts and min(slots, default=-1) >= 0

    def load_resident(self, experts) -> None:
        self.pool.load(experts, self.host, self.streamer)

    def evict_resident(self, experts) -> None:
        self.pool.evict(experts)

    # ---- the plan memo ----
    def plan(self, planner, layer_key, counts: torch.Tensor) -> tuple[LayerPlan, tuple]:
        """(plan, memo key): the planner's plan for these counts, remembered per (planner, counts,
        residency) until `forget_plan(key)` (the call's backward), so that a checkpoint recompute
        (same routing, same residency) gets the plan its forward got. At most options.plan_memo
        plans are remembered per layer (calls without a backward, e.g. under no_grad, age out)."""
        resident = self.resident_mask()
        key = (id(planner), layer_key, counts.numpy().tobytes(), resident.numpy().tobytes())
        # The entry holds its planner: while it is remembered, no other planner can be created at
        # the same address (id) and be handed this planner's plan.
        entry = self._memo.get(key)
        if entry is not None and entry[0] is planner:
            self._memo.move_to_end(key)
            return entry[1], key
        plan = planner.plan(layer_key, counts, resident)
        check_plan(plan, counts, resident, layer_key)
        self._memo[key] = (planner, plan)
        while len(self._memo) > self.runtime.options.plan_memo:
            self._memo.popitem(last=False)
        return plan, key

    def forget_plan(self, key) -> None:
        self._memo.pop(key, None)

    # ---- the keep slot ----
    @property
    def kept_bytes(self) -> int:
        return 0 if self._keep is None else self._keep[2]

    def keep(self, chunks, weights: list) -> bool:
        """Keeps a recompute's decoded streamed weights for its backward, if the keep budget allows."""
        nbytes = sum(t.numel() * t.element_size() for W in weights for t in W)
        self.release_keep()
        if not self.runtime.keep.try_acquire(nbytes):
            return False
        self._keep = (tuple(map(tuple, chunks)), weights, nbytes)
        return True

    def take_keep(self, chunks) -> list | None:
        """The kept weights if they are those of `chunks` (then released from the slot), else None."""
        k = self._keep
        if k is None or k[0] != tuple(map(tuple, chunks)):
            return None
        self.release_keep()
        return k[1]

    def release_keep(self) -> None:
        if self._keep is not None:
            self.runtime.keep.release(self._keep[2])
            self._keep = None


def check_plan(plan: LayerPlan, counts: torch.Tensor, resident: torch.Tensor, layer_key) -> None:
    """A plan must cover every expert with a known placement and may place an expert with tokens
    on GPU_RESIDENT only if it is resident."""
    E = counts.numel()
    if not isinstance(plan, LayerPlan):
        raise TypeError(f"planner returned {type(plan).__name__} for layer {layer_key!r}, expected a LayerPlan")
    w = plan.where
    if w.shape != (E,) or w.dtype != torch.int8:
        raise ValueError(f"plan for layer {layer_key!r}: where must be int8 [{E}], got {w.dtype} {list(w.shape)}")
    known = {int(v) for v in Where}
    bad = sorted({int(v) for v in w.tolist()} - known)
    if bad:
        raise ValueError(f"plan for layer {layer_key!r}: unknown placement values {bad}")
    if not torch.equal(plan.counts, counts):
        raise ValueError(f"plan for layer {layer_key!r} was made for other counts than this call's")
    missing = ((w == int(Where.GPU_RESIDENT)) & ~resident & (counts > 0)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"plan for layer {layer_key!r} places experts {missing} as GPU_RESIDENT but they are not resident"
        )


class FixedPlanner:
    """A planner for tests and fixed policies: where_fn(layer_key, counts, resident_mask) returns a
    LayerPlan, a Where (every expert), or an int8/int [E] tensor of Where values. Records every
    observation in `observed` (layer_key, plan, timings). steady=True: its layers are "steady"
    (Scheduler.steady): a layer whose pool holds every expert takes the sync-free path, where
    where_fn is not consulted (every expert is computed resident)."""

    def __init__(self, where_fn: Callable, *, steady: bool = False):
        self.where_fn = where_fn
        self.observed: list[tuple[Hashable, LayerPlan, dict]] = []
        self.calls = 0
        self._steady = bool(steady)

    def steady(self, layer_key) -> bool:
        return self._steady

    def plan(self, layer_key, counts: torch.Tensor, resident_mask: torch.Tensor) -> LayerPlan:
        self.calls += 1
        r = self.where_fn(layer_key, counts, resident_mask)
        if isinstance(r, LayerPlan):
            return r
        if isinstance(r, (Where, int)):
            return LayerPlan.uniform(counts, Where(r))
        return LayerPlan(torch.as_tensor(r).to(torch.int8).clone(), counts.to(torch.int64))

    def observe(self, layer_key, plan: LayerPlan, timings: dict) -> None:
        self.observed.append((layer_key, plan, dict(timings)))
