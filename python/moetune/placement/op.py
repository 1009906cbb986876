"""The placed op: one MoE layer's routed experts split between the CPU engine and the GPU.

    out = placed_moe_experts(experts, x, topk_ids, topk_weights, lora, planner=..., gpu=..., layer_key=...)

Same contract as moetune.moe_experts (x [T, H] bf16/fp32 on any device, topk_ids/topk_weights
[T, k]; returns x's dtype on x's device; differentiable in x, topk_weights and the LoRA tensors).
Per call:
 0. the sync-free path, for a layer whose pool holds every expert while the planner reports it
    `steady` (planned once per step, Scheduler.refresh_steady): every expert computes from its
    resident copy with group sizes that stay on the device (no host sync, no plan, no layout
    built from host counts); the counts go to a page-locked host buffer by an asynchronous copy
    and are observed, as a LayerPlan with every expert GPU_RESIDENT, once the call's GPU work
    completed. Ids outside [0, E) cannot raise before the call returns there: their slots get a
    NaN routing weight (so the output of their tokens is NaN, never a plausible wrong value) and
    the ValueError naming them is raised when the call is observed (the next call's start, or
    end_step / flush_timings). Results equal the planned all-resident path's;
 1. counts per expert from topk_ids on its device; fetching them is the call's one host sync
    (ids outside [0, E) are counted apart and reported, never indexed with);
 2. the plan: GpuExperts.plan asks planner.plan(layer_key, counts, resident_mask), memoized by
    (counts, residency) so a checkpoint recompute sees its forward's plan;
 3. a plan without GPU rows takes exactly today's path: moetune.moe_experts (bit-identical);
 4. otherwise one autograd.Function: the CPU engine's forward restricted to plan.cpu_mask (fp32
    output) is queued first, the GPU experts (resident pool, then streamed chunks) are launched
    meanwhile, then the CPU part is waited for and the two fp32 parts are added and cast.
    Backward mirrors it: the engine backward on the forward's handle and the GPU backward run at
    once; dx = dx_cpu + dx_gpu in fp32; d topk_weights and the LoRA gradients of an expert come
    from the one side that ran it (the other side's are exact zeros), so the parts add exactly.
The LoRA parameters stay one set of tensors (where the caller keeps them): the CPU engine reads
them host-side as today, the GPU gets bf16 copies of the active experts' rows per call (forward
and again in backward: nothing but the op's inputs is kept for backward), and their gradients are
returned in fp32 summed over both sides, in the parameter's dtype and device.

Saved for backward: x, topk_ids, topk_weights and the LoRA tensors (ctx.save_for_backward, so
checkpointing frees and restores them), the CPU engine's handle (as moe_experts), the plan.
A call with a backward to come is registered in its GpuExperts' `open_calls` until that backward
ran (or its graph was dropped): the layer is mid-step, and its GPU side cannot be released.
The GPU's g, u, h are recomputed in backward and weights are fetched again (resident pool, the
layer's keep slot filled by a checkpoint recompute when the keep budget allows, else streamed).

Timings: after each forward, recompute and backward, planner.observe(layer_key, plan, timings)
with seconds "cpu" (the engine's busy time for the job), "gpu" (compute-stream span of the GPU
part), "copy" (sum of the streamed chunks' copy times), "wall" (the call: host time, or the GPU's
end when later), "phase" ("forward" | "recompute" | "backward") and "copy_bytes" (the stored-format
bytes the call streamed; 0 when a backward reused its recompute's kept weights). On CUDA the GPU figures
are read from events once they completed (no sync): a call's observation is delivered at a later
call's start or by `flush_timings(runtime)`. Plans without GPU rows report their forward only
(their backward is moe_experts' own).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from moetune.engine import EngineCall, LoraWeights, MoEExperts, moe_experts
from moetune.placement._engine import cpu_call
from moetune.placement.experts import GpuExperts, GpuRuntime
from moetune.placement.gpu_math import SegmentOperands, backward_segment, forward_segment
from moetune.placement.plan import LayerPlan, Where
from moetune.placement.routing import DeviceRows, GpuLayout, combine, segment_offsets
from moetune.placement.trace import Lane

BF16, F32 = torch.bfloat16, torch.float32
_PROJ = ("gate", "up", "down")


# ---------------------------------------------------------------------------- timings


class _Timing:
    """One call's measurements; GPU parts are events read once complete."""

    def __init__(self, runtime: GpuRuntime, planner, layer_key, plan: LayerPlan | None, phase: str, host_counts=None):
        """plan None: the sync-free path's call, whose plan is made from host_counts (int64 [E + 1]
        page-locked, the last entry the ids outside [0, E)) once its GPU work is done."""
        self.runtime, self.planner, self.layer_key, self.plan, self.phase = runtime, planner, layer_key, plan, phase
        self.host_counts = host_counts
        dev = runtime.device
        self.t0 = time.perf_counter()
        self.gpu_start, self.gpu_end = dev.event(True), dev.event(True)
        self.copies: list = []
        self.cpu = 0.0
        self.host_wall = 0.0
        self.launch = 0.0
        self.copy_bytes = 0  # stored-format bytes this call streamed (host -> device)

    def start_gpu(self):
        self.runtime.device.record(self.gpu_start)
        self.launch = time.perf_counter() - self.t0

    def end_gpu(self):
        self.runtime.device.record(self.gpu_end)

    def finish(self, cpu_seconds: float):
        self.cpu = cpu_seconds
        self.host_wall = time.perf_counter() - self.t0
        self.runtime.pending.append(self)
        poll_timings(self.runtime)

    def ready(self) -> bool:
        return self.gpu_end.query()

    def resolved_plan(self) -> LayerPlan:
        if self.plan is None:
            self.plan = _resident_plan(self.host_counts, self.layer_key)
        return self.plan

    def timings(self) -> dict:
        gpu = self.gpu_start.elapsed_time(self.gpu_end) / 1e3
        copy = sum(a.elapsed_time(b) for a, b in self.copies) / 1e3
        wall = max(self.host_wall, self.launch + gpu) if self.runtime.device.is_cuda else self.host_wall
        return {
            "cpu": self.cpu,
            "gpu": gpu,
            "copy": copy,
            "wall": wall,
            "phase": self.phase,
            "copy_bytes": self.copy_bytes,
        }

    def trace(self, tr) -> None:
        """This call's spans: the Python thread (the call on the host), the CPU engine job (from
        its submission at the call's start, for its busy time: the engine runs one job at a
        time), the GPU compute stream and each streamed chunk's copy (CUDA events, resolved when
        the trace is flushed)."""
        name = f"layer {self.layer_key} {self.phase}"
        args = {
            "gpu_experts": int((self.plan.where != int(Where.CPU)).sum()),
            "streamed": int((self.plan.where == int(Where.GPU_STREAMED)).sum()),
        }
        tr.add(Lane.PYTHON, name, self.t0, self.host_wall, args)
        if self.cpu > 0:
            tr.add(Lane.CPU_ENGINE, name, self.t0, self.cpu)
        tr.add_cuda(Lane.GPU_COMPUTE, name, self.gpu_start, self.gpu_end, args)
        for i, (a, b) in enumerate(self.copies):
            tr.add_cuda(Lane.GPU_COPY, f"{name} copy {i}", a, b)


def poll_timings(runtime: GpuRuntime) -> None:
    """Delivers the observations whose GPU work has completed, in call order (no host sync);
    records their spans into runtime.trace when tracing."""
    q = runtime.pending
    while q and q[0].ready():
        t = q.popleft()
        t.planner.observe(t.layer_key, t.resolved_plan(), t.timings())
        if runtime.trace is not None:
            t.trace(runtime.trace)


def flush_timings(runtime: GpuRuntime) -> None:
    """Waits for the pending calls' GPU work and delivers every observation (end of a step, tests)."""
    q = runtime.pending
    while q:
        q[0].gpu_end.synchronize()
        poll_timings(runtime)


# ---------------------------------------------------------------------------- the call


@dataclasses.dataclass(eq=False)  # identity: calls are kept in GpuExperts.open_calls (a WeakSet)
class _Call:
    gpu: GpuExperts
    planner: object
    layer_key: object
    plan: LayerPlan
    memo_key: tuple
    layout: GpuLayout
    pool_version: int
    scaling: float
    phase: str
    has_cpu: bool
    needs: tuple = ()
    cpu: EngineCall | None = None
    index: _ActiveIndex | None = None  # layout.active as an index (set with the layout)
    # the sync-free path (plan None until needed): its rows, valid slots and host counts
    rows: DeviceRows | None = None
    valid: torch.Tensor | None = None  # bool [T, k] on the device: ids inside [0, E)
    host_counts: torch.Tensor | None = None  # int64 [E + 1], filled asynchronously (_Timing)


def _routing_counts(topk_ids: torch.Tensor, E: int) -> torch.Tensor:
    """int64 [E] host counts; the call's one host sync. Raises on ids outside [0, E)."""
    flat = topk_ids.detach().reshape(-1).to(torch.int64)
    idx = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    counts = counts.cpu()
    if counts[E]:
        bad = flat[(flat < 0) | (flat >= E)][:5].tolist()
        raise ValueError(f"topk_ids: {int(counts[E])} expert id(s) outside [0, {E}), e.g. {bad}")
    return counts[:E]


def _resident_plan(host_counts: torch.Tensor, layer_key) -> LayerPlan:
    """The sync-free path's plan from its host counts (valid once its GPU work completed): every
    expert GPU_RESIDENT. Raises for ids that were outside [0, E)."""
    E = host_counts.numel() - 1
    bad = int(host_counts[E])
    if bad:
        raise ValueError(
            f"topk_ids of layer {layer_key!r}: {bad} expert id(s) outside [0, {E}) (found after the call by the "
            "sync-free resident path; the outputs of their tokens were set to NaN)"
        )
    return LayerPlan.uniform(host_counts[:E].clone(), Where.GPU_RESIDENT)


def _relayout(call: _Call) -> None:
    """The resident pool changed since this call's forward (residency refreshed with a backward
    still to come): experts planned resident that are not any more are streamed instead; the
    others find their (possibly moved) slots. Same math, so the same results."""
    gpu = call.gpu
    if call.plan is None:  # a sync-free call: its counts first (one sync), then a planned layout
        gpu.runtime.device.synchronize()
        call.plan = _resident_plan(call.host_counts, call.layer_key)
        call.rows = None
    where = call.plan.where.clone()
    gone = (where == int(Where.GPU_RESIDENT)) & ~gpu.resident_mask()
    where[gone] = int(Where.GPU_STREAMED)
    plan = LayerPlan(where, call.plan.counts, call.plan.predicted)
    call.layout = GpuLayout.build(plan, gpu.pool.slot_expert, gpu.streamer.chunk_experts)
    call.index = _ActiveIndex(call.layout.active, len(where))
    call.pool_version = gpu.pool.version


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def placed_moe_experts(
    experts: MoEExperts,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    lora: LoraWeights | None = None,
    *,
    planner,
    gpu: GpuExperts,
    layer_key=None,
) -> torch.Tensor:
    """moetune.moe_experts with each expert computed where `planner` puts it (see the module doc).
    gpu: the layer's GpuExperts (built for these experts); layer_key: the planner's id of the layer
    (default gpu.layer_key)."""
    if not isinstance(gpu, GpuExperts):
        raise TypeError(f"gpu must be a moetune.placement.GpuExperts, got {type(gpu).__name__}")
    if gpu.closed:
        raise ValueError(f"gpu (GpuExperts of layer {gpu.layer_key!r}) was closed: its layer's experts were replaced")
    if experts is not gpu.experts:
        raise ValueError("gpu (GpuExperts) was built for other experts than the ones passed")
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    E, H = experts.num_experts, experts.hidden_size
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"x must be [T, H={H}], got shape {list(x.shape)}")
    if x.dtype not in (BF16, F32) or topk_weights.dtype not in (BF16, F32):
        raise ValueError(f"x and topk_weights must be bfloat16 or float32, got {x.dtype} and {topk_weights.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"topk_ids must be int32/int64 [T={x.shape[0]}, k], got {topk_ids.dtype} {list(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights has shape {list(topk_weights.shape)}, expected {list(topk_ids.shape)}")
    layer_key = gpu.layer_key if layer_key is None else layer_key
    runtime = gpu.runtime
    poll_timings(runtime)
    if _sync_free(planner, gpu, layer_key):
        return _placed_sync_free(experts, gpu, planner, layer_key, x, topk_ids, topk_weights, lora)
    counts = _routing_counts(topk_ids, E)
    plan, memo_key = gpu.plan(planner, layer_key, counts)
    phase = "recompute" if _in_backward() else "forward"
    on_gpu = (plan.where != int(Where.CPU)) & (counts > 0)
    if not bool(on_gpu.any()):
        t0 = time.perf_counter()
        out = moe_experts(experts, x, topk_ids, topk_weights, lora)
        wall = time.perf_counter() - t0
        planner.observe(
            layer_key, plan, {"cpu": wall, "gpu": 0.0, "copy": 0.0, "wall": wall, "phase": phase, "copy_bytes": 0}
        )
        if runtime.trace is not None:
            name = f"layer {layer_key} {phase} (all CPU)"
            runtime.trace.add(Lane.PYTHON, name, t0, wall)
            runtime.trace.add(Lane.CPU_ENGINE, name, t0, wall)
        return out
    flat = _lora_flat(lora)
    lora = lora or LoraWeights()
    layout = GpuLayout.build(plan, gpu.pool.slot_expert, gpu.streamer.chunk_experts)
    has_cpu = bool(((plan.where == int(Where.CPU)) & (counts > 0)).any())
    call = _Call(gpu, planner, layer_key, plan, memo_key, layout, gpu.pool.version, float(lora.scaling), phase, has_cpu)
    call.index = _ActiveIndex(layout.active, E)
    return _Placed.apply(call, x, topk_ids, topk_weights, *flat)


def _lora_flat(lora: LoraWeights | None) -> list:
    flat = (lora or LoraWeights()).flat()
    for i, t in enumerate(flat):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype not in (BF16, F32)):
            raise ValueError(f"lora.{_PROJ[i // 2]}.{'AB'[i % 2]} must be a bfloat16 or float32 tensor")
    return flat


def _sync_free(planner, gpu: GpuExperts, layer_key) -> bool:
    """Whether this call takes the sync-free path (module doc, step 0): the planner reports the
    layer steady, the pool holds every expert, and the device runs GEMMs whose group sizes stay
    on the device (grouped_mm; H and I multiples of 8, as every released MoE model has)."""
    steady = getattr(planner, "steady", None)
    if steady is None or not steady(layer_key) or not gpu.holds_all():
        return False
    I, H = gpu.fmt.dims("gate")
    return I % 8 == 0 and H % 8 == 0 and gpu.runtime.gemm.device_sized


def _placed_sync_free(experts, gpu: GpuExperts, planner, layer_key, x, topk_ids, topk_weights, lora):
    runtime = gpu.runtime
    dev = runtime.device
    E = experts.num_experts
    T, k = topk_ids.shape
    flat = topk_ids.detach().to(dev.torch).reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < E)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev.torch)
    counts.index_add_(0, torch.where(valid, flat, E), torch.ones_like(flat))  # ids outside: bucket E
    host_counts = dev.download_async(counts)  # read once the call's GPU work is done (_Timing)
    lay = _SyncFreeLayout.of(gpu)
    slot_counts = counts[:E] if lay.index.identity else counts.index_select(0, lay.index.on(dev.torch))
    layout = GpuLayout.resident_all(gpu.pool.slot_expert, slot_counts, T * k, lay.position.host)
    safe = torch.where(valid, flat, 0).view(T, k)
    rows = DeviceRows.build(layout, safe, lay.position.on(dev.torch))
    flat_lora = _lora_flat(lora)
    scaling = float(lora.scaling) if lora is not None else 1.0
    phase = "recompute" if _in_backward() else "forward"
    call = _Call(gpu, planner, layer_key, None, None, layout, gpu.pool.version, scaling, phase, False)
    call.index, call.rows, call.valid, call.host_counts = lay.index, rows, valid.view(T, k), host_counts
    return _Placed.apply(call, x, topk_ids, topk_weights, *flat_lora)


class _Placed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, x, topk_ids, topk_weights, *lora):
        ctx.save_for_backward(x, topk_ids, topk_weights, *lora)
        ctx.call = call
        call.needs = ctx.needs_input_grad[1:]
        if any(call.needs):  # a backward may follow: the layer is mid-step until it ran (GpuExperts.close)
            call.gpu.open_calls.add(call)
        runtime = call.gpu.runtime
        dev = runtime.device
        tm = _Timing(runtime, call.planner, call.layer_key, call.plan, call.phase, call.host_counts)
        if call.has_cpu:  # queued first: the CPU works while the GPU part is launched and runs
            call.cpu = cpu_call(
                call.gpu.experts, x, topk_ids, topk_weights, call.plan.cpu_mask, lora, call.scaling, pinned=dev.is_cuda
            )
        copied0 = call.gpu.streamer.bytes_copied
        out = _gpu_forward(call, x, topk_ids, topk_weights, lora, tm)
        tm.copy_bytes = call.gpu.streamer.bytes_copied - copied0
        busy = 0.0
        if call.cpu is not None:
            out_cpu = call.cpu.wait_forward()
            busy = call.cpu.busy_seconds
            out.add_(dev.upload(out_cpu))
        tm.finish(busy)
        return out.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_ids, topk_weights, *lora = ctx.saved_tensors
        call: _Call = ctx.call
        call.gpu.open_calls.discard(call)
        call.gpu.forget_plan(call.memo_key)  # its forward and recompute are done
        if call.gpu.pool.version != call.pool_version:
            _relayout(call)
        need_x, _, need_w, *need_l = call.needs
        need_l = [bool(n) and t is not None for n, t in zip(need_l, lora)]
        runtime = call.gpu.runtime
        dev = runtime.device
        tm = _Timing(runtime, call.planner, call.layer_key, call.plan, "backward", call.host_counts)
        if call.cpu is not None:
            call.cpu.submit_backward(grad_out, need_x, need_w, need_l, grad_dtype=F32)
        copied0 = call.gpu.streamer.bytes_copied
        dx, dw, lgrads = _gpu_backward(call, x, topk_ids, topk_weights, lora, grad_out, need_x, need_w, need_l, tm)
        tm.copy_bytes = call.gpu.streamer.bytes_copied - copied0
        busy = 0.0
        cpu_lora = [None] * 6
        if call.cpu is not None:
            dx_c, dw_c, cpu_lora = call.cpu.wait_backward()
            busy = call.cpu.busy_seconds
            if dx is not None:
                dx.add_(dev.upload(dx_c))
            if dw is not None:
                dw.add_(dev.upload(dw_c))
        out_lora = []
        for i, t in enumerate(lora):
            if not need_l[i]:
                out_lora.append(None)
                continue
            out_lora.append(_merge_lora_grad(t, cpu_lora[i], lgrads.get(i), call.index))
        tm.finish(busy)
        return (
            None,
            None if dx is None else dx.to(device=x.device, dtype=x.dtype),
            None,
            None if dw is None else dw.to(device=topk_weights.device, dtype=topk_weights.dtype),
            *out_lora,
        )


# ---------------------------------------------------------------------------- GPU part


def _pad8(r: int) -> int:
    return -(-r // 8) * 8


class _Index:
    """An int64 host index, uploaded once per device (no host sync)."""

    def __init__(self, values: list[int]):
        self.host = torch.tensor(values, dtype=torch.int64)
        self._on: dict = {}

    def on(self, device: torch.device) -> torch.Tensor:
        idx = self._on.get(device)
        if idx is None:
            idx = self.host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else self.host
            self._on[device] = idx
        return idx


class _ActiveIndex(_Index):
    """The call's active experts as an index; `identity` when they are every expert in id order
    (a fully resident layer in its initial slot order): the LoRA tensors are then used as they
    are, with no gather and no scatter."""

    def __init__(self, active: list[int], E: int):
        super().__init__(active)
        self.active = active
        self.identity = len(active) == E and active == list(range(E))


class _SyncFreeLayout:
    """What the sync-free path derives from a pool holding every expert, kept per pool version:
    index (slot -> expert, the LoRA rows' order), position (expert -> slot)."""

    def __init__(self, slot_expert: list[int]):
        E = len(slot_expert)
        self.index = _ActiveIndex(list(slot_expert), E)
        position = [0] * E
        for slot, e in enumerate(slot_expert):
            position[e] = slot
        self.position = _Index(position)

    @staticmethod
    def of(gpu: GpuExperts) -> _SyncFreeLayout:
        cached = gpu.sync_free_cache
        if cached is None or cached[0] != gpu.pool.version:
            cached = gpu.sync_free_cache = (gpu.pool.version, _SyncFreeLayout(gpu.pool.slot_expert))
        return cached[1]


def _lora_rows(lora, index: _ActiveIndex, device) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """proj -> (A [n, r8, in], B [n, out, r8]) bf16 on the GPU device: the active experts' rows,
    rank zero-padded to a multiple of 8 (exact: zero rows/columns add nothing) so that every LoRA
    GEMM meets grouped_mm's 16-byte stride rule; plus "gate_up" (gpu_math's fused gate/up operands:
    [Ag | Au] and the block-diagonal [[Bg, 0], [0, Bu]]) when gate and up have one rank, "gate" and
    "up" then being views of it (one copy of the rows)."""
    out: dict = {}
    rows = {}
    for i, name in enumerate(_PROJ):
        A, B = lora[2 * i], lora[2 * i + 1]
        out[name] = None
        if A is not None:
            rows[name] = tuple(_device_rows(t, index, device) for t in (A, B))
    fuse = "gate" in rows and "up" in rows and rows["gate"][0].shape == rows["up"][0].shape
    for name, (A, B) in rows.items():
        if fuse and name in ("gate", "up"):
            continue
        r8 = _pad8(A.shape[1])
        # Contiguous [n, r8, in] / [n, out, r8] either way: PEFT's factors may be transposed views,
        # and the grouped GEMMs are fastest on (and were tuned with) row-major groups.
        Ap = _zeros_if(r8 != A.shape[1], (A.shape[0], r8, A.shape[2]), A.device)
        Bp = _zeros_if(r8 != A.shape[1], (B.shape[0], B.shape[1], r8), B.device)
        Ap[:, : A.shape[1]].copy_(A)
        Bp[:, :, : A.shape[1]].copy_(B)
        out[name] = (Ap, Bp)
    if fuse:
        (Ag, Bg), (Au, Bu) = rows["gate"], rows["up"]
        n, r, H = Ag.shape
        I, r8 = Bg.shape[1], _pad8(r)
        A2 = _zeros_if(r8 != r, (n, 2 * r8, H), Ag.device)
        A2[:, :r].copy_(Ag)
        A2[:, r8 : r8 + r].copy_(Au)
        B2 = torch.zeros((n, 2 * I, 2 * r8), dtype=BF16, device=Bg.device)
        B2[:, :I, :r].copy_(Bg)
        B2[:, I:, r8 : r8 + r].copy_(Bu)
        out["gate_up"] = (A2, B2)
        out["gate"] = (A2[:, :r8], B2[:, :I, :r8])
        out["up"] = (A2[:, r8:], B2[:, I:, r8:])
    return out


def _device_rows(t: torch.Tensor, index: _ActiveIndex, device) -> torch.Tensor:
    """t's rows of the active experts on the GPU device (t's dtype; the caller converts)."""
    rows = t.detach() if index.identity else t.detach().index_select(0, index.on(t.device))
    return rows if rows.device.type == "cuda" else device.upload(rows.to(BF16).contiguous())


def _zeros_if(pad: bool, shape, dev) -> torch.Tensor:
    return torch.zeros(shape, dtype=BF16, device=dev) if pad else torch.empty(shape, dtype=BF16, device=dev)


def _segments(call: _Call, phase: str, tm: _Timing):
    """(segment, (gate, up, down) weights) in row order: the resident pool, then the streamed
    chunks (from the keep slot, or streamed; a recompute keeps them when the budget allows)."""
    gpu, layout = call.gpu, call.layout
    runtime = gpu.runtime
    streamed = [s for s in layout.segments if s.kind == Where.GPU_STREAMED]
    for seg in layout.segments:
        if seg.kind == Where.GPU_RESIDENT:
            yield seg, gpu.pool.weights
    if not streamed:
        return
    chunks = [s.experts for s in streamed]
    if phase == "backward":
        kept = gpu.take_keep(chunks)
        if kept is not None:
            yield from zip(streamed, kept)
            return
    nbytes = sum(len(c) for c in chunks) * gpu.fmt.decoded_bytes_per_expert
    keep = phase == "recompute" and runtime.keep.used_bytes + nbytes <= runtime.keep.budget_bytes + gpu.kept_bytes
    weights = []
    for seg, W in zip(
        streamed, gpu.streamer.stream(gpu.host, chunks, keep=keep, copy_events=tm.copies, timing=runtime.device.is_cuda)
    ):
        if keep:
            weights.append(W)
        yield seg, W
    if keep:
        gpu.keep(chunks, weights)


def _operands(call: _Call, seg, W, lora_d, rows: DeviceRows, dev) -> SegmentOperands:
    offs, coffs = segment_offsets(seg, dev)
    a0, a1 = seg.active0, seg.active1
    lo = {p: (None if v is None else (v[0][a0:a1], v[1][a0:a1])) for p, v in lora_d.items()}
    G = len(seg.experts) if seg.group_sizes is None else len(seg.group_sizes)
    W = tuple(t[:G] for t in W)
    erow = rows.expert[seg.row0 : seg.row1]
    biases = tuple(None if b is None else b.index_select(0, erow) for b in call.gpu.biases)
    return SegmentOperands(W, offs, seg.group_sizes, coffs, seg.active_sizes, lo, call.scaling, biases)


def _prepare(call: _Call, x, topk_ids, topk_weights, lora):
    dev = call.gpu.runtime.device
    D = dev.torch
    xb = x.detach().to(D).to(BF16)  # fp32 x is rounded to bf16 as the engine does
    w32 = topk_weights.detach().to(D).to(F32)
    rows = call.rows
    if rows is None:
        rows = DeviceRows.build(call.layout, topk_ids.detach().to(D), dev.upload(call.layout.position))
    if call.valid is not None:  # the sync-free path: slots of ids outside [0, E) give NaN (module doc)
        w32 = torch.where(call.valid, w32, float("nan"))
    return xb, w32, rows, _lora_rows(lora, call.index, dev)


def _gpu_forward(call: _Call, x, topk_ids, topk_weights, lora, tm: _Timing) -> torch.Tensor:
    gpu = call.gpu
    runtime = gpu.runtime
    dev = runtime.device
    tm.start_gpu()
    xb, w32, rows, lora_d = _prepare(call, x, topk_ids, topk_weights, lora)
    n = call.layout.n_rows
    Y = torch.empty((n + 1, xb.shape[1]), dtype=F32, device=dev.torch)
    Y[n].zero_()
    for seg, W in _segments(call, call.phase, tm):
        ops = _operands(call, seg, W, lora_d, rows, dev.torch)
        xs = xb.index_select(0, rows.tok[seg.row0 : seg.row1])
        forward_segment(runtime.gemm, gpu.activation, ops, xs, out=Y[seg.row0 : seg.row1])
    out = combine(Y, rows.row_of, w32)
    tm.end_gpu()
    return out


def _gpu_backward(call: _Call, x, topk_ids, topk_weights, lora, grad_out, need_x, need_w, need_l, tm):
    gpu = call.gpu
    runtime = gpu.runtime
    dev = runtime.device
    D = dev.torch
    tm.start_gpu()
    xb, w32, rows, lora_d = _prepare(call, x, topk_ids, topk_weights, lora)
    dob = grad_out.detach().to(D).to(BF16)  # the engine's rounding of dout
    n, H = call.layout.n_rows, xb.shape[1]
    n_act = len(call.layout.active)
    w_rows = w32.reshape(-1).index_select(0, rows.rows)
    DX = torch.empty((n + 1, H), dtype=F32, device=D) if need_x else None
    DW = torch.empty((n + 1,), dtype=F32, device=D) if need_w else None
    if DX is not None:
        DX[n].zero_()
    if DW is not None:
        DW[n].zero_()
    need_lora = {p: (need_l[2 * i], need_l[2 * i + 1]) for i, p in enumerate(_PROJ)}
    acc: dict[int, torch.Tensor] = {}  # index into the flat LoRA list -> fp32 [n_act, ...] (r8-padded)
    for i, p in enumerate(_PROJ):
        if lora_d[p] is None:
            continue
        for j in range(2):
            if need_l[2 * i + j]:
                acc[2 * i + j] = torch.empty((n_act, *lora_d[p][j].shape[1:]), dtype=F32, device=D)
    for seg, W in _segments(call, "backward", tm):
        ops = _operands(call, seg, W, lora_d, rows, D)
        tok = rows.tok[seg.row0 : seg.row1]
        g = backward_segment(
            runtime.gemm,
            gpu.activation,
            ops,
            xb.index_select(0, tok),
            dob.index_select(0, tok),
            w_rows[seg.row0 : seg.row1],
            need_dx=need_x,
            need_dw=need_w,
            need_lora=need_lora,
        )
        if DX is not None:
            DX[seg.row0 : seg.row1] = g.dx
        if DW is not None:
            DW[seg.row0 : seg.row1] = g.dw
        for i, p in enumerate(_PROJ):
            for j in range(2):
                if 2 * i + j in acc:
                    acc[2 * i + j][seg.active0 : seg.active1] = g.lora[p][j]
    dx = combine(DX, rows.row_of) if DX is not None else None
    dw = DW.index_select(0, rows.row_of.reshape(-1)).view(rows.row_of.shape) if DW is not None else None
    lgrads = {}
    for idx, t in acc.items():  # drop the rank padding
        r = lora[idx].shape[1] if idx % 2 == 0 else lora[idx].shape[2]
        lgrads[idx] = t[:, :r] if idx % 2 == 0 else t[:, :, :r]
    tm.end_gpu()
    return dx, dw, lgrads


def _merge_lora_grad(
    param: torch.Tensor, cpu_grad: torch.Tensor | None, gpu_grad: torch.Tensor | None, index: _ActiveIndex
) -> torch.Tensor:
    """fp32 sum of the CPU engine's full gradient (zeros for experts it did not run) and the GPU's
    rows of the active experts, in the parameter's dtype on its device."""
    dev = param.device
    if cpu_grad is None and gpu_grad is not None and index.identity:  # every row is the GPU's
        full = gpu_grad.to(dev)
        return full if param.dtype == F32 else full.to(param.dtype)
    if cpu_grad is None:
        full = torch.zeros(param.shape, dtype=F32, device=dev)
    else:
        full = cpu_grad.to(dev, non_blocking=True) if dev.type == "cuda" else cpu_grad
    if gpu_grad is not None and index.active:
        full.index_add_(0, index.on(dev), gpu_grad.to(dev))
    return full if param.dtype == F32 else full.to(param.dtype)
