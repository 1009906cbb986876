"""One model's placement runtime: its MoE layers' experts computed by the CPU engine, the GPU, or both.

`moetune.hf.patch(model, placement=...)` and `moetune.load_model(path, placement=...)` attach one
`ModelPlacement` per model (`handle.placement`); every patched experts module routes its calls
through it. What it owns (moetune.placement's parts, built once per model when it starts):

    GpuRuntime (device, resident store, streamers, keep slot)  + one GpuExperts per MoE layer
    Scheduler (one CostModel per layer shape, calibrated at start-up) -> a LayerPlan per call
    ResidencyPolicy (+ CudaMemoryProbe for the "auto" GPU budget)  -> resident experts per layer
    PlacementMetrics (per-step numbers), Trace (Perfetto timeline, when asked for)

Start: at the first experts call (or an explicit `start(device)` / `adopt_lora(model)`), the
options' mode is resolved with the environment (PlacementOptions.resolve_mode): "cpu" keeps
moetune's CPU path exactly (moetune.moe_experts); otherwise the parts above are built on the
experts' device and, with calibrate=True, each layer shape's cost model is measured (a few
seconds; cached per machine / shape / format in calibration_cache_dir; moetune.hf.calibration).

Per optimizer step: `end_step()` (moetune train calls it; HF Trainer: moetune.hf.PlacementCallback)
delivers the step's timings, closes the metrics step, refreshes residency at its cadence (loading
and evicting experts between steps), decides which layers are planned per step rather than per
call (PlacementOptions.plan_per_step) and returns the step's numbers for metrics.jsonl.

Expert LoRA: PEFT creates the expert LoRA factors next to the engine-held placeholders, on the
CPU. When experts may compute on the GPU, `adopt_lora(model, optimizer=None)` moves those
parameters (the same Parameter objects, and any optimizer state of theirs) to the experts'
device, so the GPU experts and the optimizer step need no per-call host copies (the CPU engine's
share copies them to the host per call, as it does for GPU-resident LoRA anyway). Call it after
get_peft_model and before training (moetune train and PlacementCallback do).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from moetune.engine import LoraWeights, MoEExperts
from moetune.hf import calibration
from moetune.placement.cost import CostCoefficients, CostModel, LayerShape
from moetune.placement.device import Device, HostEvent
from moetune.placement.experts import GpuExperts, GpuOptions, GpuRuntime
from moetune.placement.formats import format_of
from moetune.placement.metrics import PREFIX, PlacementMetrics
from moetune.placement.op import flush_timings, placed_moe_experts
from moetune.placement.options import PlacementOptions
from moetune.placement.residency import GIB, CudaMemoryProbe, ResidencyPolicy
from moetune.placement.scheduler import Scheduler
from moetune.placement.trace import Trace


class _Layer:
    """What the placement keeps per MoE layer."""

    __slots__ = ("key", "engine", "module_ref", "state_ref", "shape", "gpu")

    def __init__(self, key: int, engine: MoEExperts, module, state):
        self.key, self.engine = key, engine
        self.module_ref, self.state_ref = weakref.ref(module), weakref.ref(state)
        self.shape = LayerShape.of(engine, resident_bytes=format_of(engine).decoded_bytes_per_expert)
        self.gpu: GpuExperts | None = None


class ModelPlacement:
    """The placement runtime of one patched model (module docstring). Not thread-safe: the
    training thread and autograd's device thread call it, never at the same time."""

    def __init__(
        self, options: PlacementOptions, layers: list[tuple], *, model=None, ctx=None, lora_of: Callable | None = None
    ):
        """layers: (experts module, its ExpertsState) per MoE layer, in model order (the layer
        key is the index); lora_of(module, state) -> LoraWeights (the module's current LoRA)."""
        self.options = options
        self.ctx = ctx
        self._model_ref = weakref.ref(model) if model is not None else None
        self._lora_of = lora_of
        self.layers = [_Layer(i, st.engine, m, st) for i, (m, st) in enumerate(layers)]
        self.mode: str | None = None  # resolved: "cpu" | "auto" | "gpu"; None until started
        self.device: Device | None = None
        self.runtime: GpuRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.planner = None  # what plans each call: the scheduler (anything with plan / observe may stand in)
        self.policy: ResidencyPolicy | None = None
        self.metrics: PlacementMetrics | None = None
        self.probe: CudaMemoryProbe | None = None
        self.trace: Trace | None = None
        self.cost_models: dict[LayerShape, CostModel] = {}
        self.calibration: dict[LayerShape, str] = {}  # shape -> "measured" | "cached" | "defaults"
        self.last_numbers: dict[str, float] = {}
        self.last_progress = ""
        self._step_starts: list[float] = []
        self._keep_cap: int | None = None  # CUDA: the keep slot's cap, a quarter of the memory free at start

    # ---- start ----
    @property
    def active(self) -> bool:
        """Started with experts that may compute on the GPU (mode not "cpu")."""
        return self.mode is not None and self.mode != "cpu"

    def start(self, device=None) -> str:
        """Resolves the mode with the model's device (default: the CPU) and, unless it is "cpu",
        builds the runtime, scheduler, residency and metrics and calibrates. Idempotent; returns
        the resolved mode."""
        if self.mode is not None:
            return self.mode
        mode, dev = self.options.resolve_mode(device if device is not None else "cpu")
        if mode != "cpu":
            self._build(mode, dev)
        self.mode = mode
        return mode

    def _checkpointing(self) -> bool:
        model = self._model_ref() if self._model_ref is not None else None
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers' new name first
            try:
                return bool(getattr(model, name))
            except AttributeError:
                continue
        return False

    def _build(self, mode: str, dev: torch.device) -> None:
        o = self.options
        self.device = Device(dev)
        explicit = o.gpu_budget_gib is not None
        budget_bytes = int(o.gpu_budget_gib * GIB) if explicit else 0
        # The keep slot never takes more than a quarter of what is free at start (a large layer
        # streams again in its backward instead).
        if o.keep_for_backward and self.device.is_cuda:
            self._keep_cap = torch.cuda.mem_get_info(dev)[0] // 4
        self.runtime = GpuRuntime(
            self.device,
            GpuOptions(
                resident_budget_bytes=budget_bytes,
                keep_budget_bytes=self._keep_bytes(),
                stream_buffers=o.staging_buffers,
            ),
        )
        for layer in self.layers:
            self._build_layer(layer)
        self.metrics = PlacementMetrics()
        # A backward copies its streamed experts again unless the checkpoint recompute before it
        # kept them (keep slot): only with gradient checkpointing on (known when training starts).
        backward_copies = not (o.keep_for_backward and self._checkpointing())
        self.scheduler = Scheduler(
            lambda key: self.cost_models[self.layers[key].shape],
            mode=mode,
            backward_copies=backward_copies,
            metrics=self.metrics,
        )
        self.planner = self.scheduler
        if self.device.is_cuda:
            self.probe = CudaMemoryProbe(dev)
        budget = o.gpu_budget_gib if explicit else ("auto" if self.probe is not None else 0.0)
        self.policy = ResidencyPolicy.attach(
            self.scheduler,
            budget=budget,
            memory_probe=self.probe,
            refresh_every=o.refresh_every,
            warmup_steps=o.warmup_steps,
            max_tokens=o.max_tokens,
        )
        self.trace = Trace(enabled=o.trace is not None)
        self.runtime.trace = self.trace if self.trace.enabled else None
        self._anchor()

    def _keep_bytes(self) -> int:
        """The keep slot's budget: one layer's decoded experts at most (the recompute right before
        its backward), the largest layer's, within the cap set at start."""
        if not self.options.keep_for_backward:
            return 0
        keep = max(l.engine.num_experts * format_of(l.engine).decoded_bytes_per_expert for l in self.layers)
        return keep if self._keep_cap is None else min(keep, self._keep_cap)

    def _build_layer(self, layer: _Layer) -> None:
        """One layer's GPU side, at start and when its experts are replaced: its GpuExperts (page-
        locked host views, device biases, an empty resident pool: the residency policy fills it at
        its next refresh) and the cost model of its shape (calibrated, or read from the calibration
        cache, once per shape: layers and replacements of one shape share it)."""
        layer.gpu = GpuExperts(self.runtime, layer.engine, layer_key=layer.key)
        if layer.shape not in self.cost_models:
            self.cost_models[layer.shape] = CostModel(
                layer.shape, self._coefficients(layer), staging_buffers=self.options.staging_buffers
            )

    # ---- calibration ----
    def _coefficients(self, layer: _Layer) -> CostCoefficients:
        """The layer shape's coefficients: calibrated (or read from the cache), or the defaults."""
        coefficients, how = calibration.coefficients(
            layer.shape, layer.engine, self.device, self.options, lora=self._lora(layer), top_k=self._top_k(layer)
        )
        self.calibration[layer.shape] = how
        return coefficients

    def _lora(self, layer: _Layer) -> LoraWeights | None:
        module, state = layer.module_ref(), layer.state_ref()
        if self._lora_of is None or module is None or state is None:
            return None
        lora = self._lora_of(module, state)
        if not any(getattr(lora, p) is not None for p in ("gate", "up", "down")):
            return None
        # Under expert parallelism the engine holds a share of the layer's experts while PEFT's
        # tensors cover all of them: calibration only needs the factors' shapes, so the first rows.
        E = layer.engine.num_experts
        for p in ("gate", "up", "down"):
            pair = getattr(lora, p)
            if pair is not None and pair[0].shape[0] != E:
                setattr(lora, p, tuple(t[:E] for t in pair))
        return lora

    def _top_k(self, layer: _Layer) -> int:
        module = layer.module_ref()
        cfg = getattr(module, "config", None)
        k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", None)
        E = layer.engine.num_experts
        return int(min(max(1, k), E)) if isinstance(k, int) else min(8, E)

    def check_idle(self, layer_key: int) -> None:
        """Raises (RuntimeError, naming the layer) when a call of layer `layer_key` still has its
        backward to come, i.e. it is not at a step boundary: replace_engine would refuse."""
        if self.active:
            self.layers[layer_key].gpu.check_idle()

    def replace_engine(self, layer_key: int, engine: MoEExperts, state) -> None:
        """Layer `layer_key` now computes with `engine` (its ExpertsState `state`), whose experts
        may differ in number and identity from the old engine's (expert parallelism moved experts
        between ranks). At a step boundary only: no call of the layer may have its backward still
        to come (refused, nothing changed, otherwise).

        With the GPU path built, the layer's GPU side is rebuilt for the new experts: pending
        timings are delivered, the old GpuExperts released (resident pool, keep slot, plan memo,
        device biases, page-locking of the old engine's buffers), the new one built as at start
        (`_build_layer`: empty pool, the cost model of its shape, calibrated if the shape is new),
        the keep budget re-derived, staging no layer streams any more freed; and everything kept
        per local expert index or about the old experts forgotten: the scheduler's cost-model
        choice, last routing and steady flag (the layer is planned per call again until the next
        end_step decides), the residency policy's averages and wanted set (refreshed at the next
        end_step after the warm-up, with the new experts' routing of that step)."""
        if not isinstance(engine, MoEExperts):
            raise TypeError(f"moetune: replace_engine needs a moetune.MoEExperts, got {type(engine).__name__}")
        if not (isinstance(layer_key, int) and 0 <= layer_key < len(self.layers)):
            raise KeyError(f"moetune: no experts layer {layer_key!r} in this placement ({len(self.layers)} layers)")
        old = self.layers[layer_key]
        new = _Layer(old.key, engine, old.module_ref(), state)
        if not self.active:
            self.layers[layer_key] = new
            return
        self.check_idle(layer_key)  # mid-step: refused before anything changes
        flush_timings(self.runtime)  # the old experts' observations go to the old state, then it is dropped
        self.device.synchronize()  # no GPU work of a call may still read what is freed below
        old.gpu.close()
        self.layers[layer_key] = new
        self.scheduler.forget(layer_key)
        self.policy.forget(layer_key)
        self._build_layer(new)
        self.runtime.keep.budget_bytes = self._keep_bytes()
        self.runtime.drop_streamers({l.gpu.fmt for l in self.layers})

    # ---- calls ----
    def forward(
        self,
        layer_key: int,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: LoraWeights | None,
    ) -> torch.Tensor:
        """One experts call of layer `layer_key` through the placed op (after start())."""
        layer = self.layers[layer_key]
        self.policy.observe_tokens(hidden_states.shape[0])
        return placed_moe_experts(
            layer.engine, hidden_states, top_k_index, top_k_weights, lora, planner=self.planner, gpu=layer.gpu
        )

    # ---- step boundaries ----
    def end_step(self) -> dict[str, float]:
        """Once per optimizer step: the step's observations delivered, its metrics closed, the
        residency refreshed at its cadence; returns the step's numbers ("placement_*": experts
        and tokens per placement, bytes copied, CPU / GPU / copy busy seconds, resident experts
        and budget, GPU peak). {} when the experts run on the CPU engine only."""
        if not self.active:
            return {}
        flush_timings(self.runtime)
        numbers = self.metrics.end_step()
        if self.policy.end_step():
            self._apply_residency()
        if self.options.plan_per_step:  # fully resident layers: planned once per step (op.py's sync-free path)
            steady = self.scheduler.refresh_steady({l.key: l.gpu.resident_mask() for l in self.layers})
            numbers[PREFIX + "layers_planned_per_step"] = float(sum(steady.values()))
        numbers.update({PREFIX + k: v for k, v in self.policy.stats().items()})
        numbers[PREFIX + "resident_held_bytes"] = float(self.runtime.store.used_bytes)
        peak = self.peak_gpu_bytes()
        if peak is not None:
            numbers[PREFIX + "gpu_peak_bytes"] = float(peak)
        self.last_numbers = numbers
        self.last_progress = PlacementMetrics.progress(numbers)
        self._trace_step()
        return numbers

    def _apply_residency(self) -> None:
        store = self.runtime.store
        new = int(self.policy.budget_bytes)
        # Shrinking layers first may pass through totals above a lowered "auto" budget (never
        # above what was held): the store's check allows that much during the change.
        store.budget_bytes = max(new, store.used_bytes)
        try:
            self.runtime.apply_residency([l.gpu for l in self.layers], self.policy.wanted)
        finally:
            store.budget_bytes = new

    def peak_gpu_bytes(self) -> int | None:
        """The run's peak allocated GPU memory on the experts' device (the probe resets the CUDA
        peak counters at each residency refresh and keeps the run-wide peak); None off CUDA."""
        if not self.active or not self.device.is_cuda:
            return None
        now = int(torch.cuda.max_memory_allocated(self.device.torch))
        return max(now, self.probe.run_peak_allocated) if self.probe is not None else now

    # ---- trace ----
    def _anchor(self) -> None:
        """Anchors GPU event times to the trace clock (the device idle: after a sync)."""
        tr = self.trace
        if tr is None or not tr.enabled:
            return
        if self.device.is_cuda:
            with torch.cuda.device(self.device.torch):
                tr.cuda_anchor(self.device.torch)
        else:
            ev = HostEvent()
            ev.record()
            tr.set_anchor(ev, ev.t)
        self._step_starts.append(tr.clock())

    def _trace_step(self) -> None:
        tr = self.trace
        if tr is None or not tr.enabled:
            return
        tr.flush_cuda()
        n = self.options.trace_steps
        if len(self._step_starts) > n:  # keep the last n steps
            self._step_starts = self._step_starts[-n:]
            tr.drop_before(self._step_starts[0])
        self._anchor()

    def write_trace(self, path: str | None = None) -> str | None:
        """Writes the trace (to `path`, default the options' trace path); None when not tracing."""
        path = path if path is not None else self.options.trace
        if path is None or self.trace is None or not self.trace.enabled:
            return None
        flush_timings(self.runtime)
        return self.trace.write(path)

    # ---- LoRA ----
    def adopt_lora(self, model, optimizer=None) -> int:
        """Moves the expert LoRA parameters of `model` (a PEFT model over this placement's
        experts) to the experts' device when experts may compute there (module docstring);
        `optimizer`'s state of those parameters moves along. Starts the placement on the model's
        device if it has not started. Returns the number of parameters moved."""
        if self.start(_model_device(model)) == "cpu":
            return 0
        dev = self.device.torch
        params = []
        for layer in self.layers:
            module, state = layer.module_ref(), layer.state_ref()
            if module is None or state is None:
                continue
            for w in state.chain(module):
                for a in w.lora_A:
                    params += [w.lora_A[a].weight, w.lora_B[a].weight]
        moved = 0
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        for p in params:
            if p.device == dev:
                continue
            old = p.device
            p.data = p.data.to(dev)
            if p.grad is not None:
                p.grad = p.grad.to(dev)
            if opt is not None and p in opt.state:
                st = opt.state[p]
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.device == old and v.shape == p.shape:
                        st[k] = v.to(dev)
            moved += 1
        return moved

    def __repr__(self) -> str:
        where = "not started" if self.mode is None else self.mode
        dev = "" if self.device is None else f" on {self.device.torch}"
        return f"moetune.hf.ModelPlacement({len(self.layers)} layers, {self.options.mode} -> {where}{dev})"


def _model_device(model) -> torch.device:
    """Where the model's non-expert part computes: its input embeddings' device (else the first
    parameter that is not an engine-held placeholder)."""
    from moetune.hf._placeholder import EngineHeldTensor

    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    for p in model.parameters():
        if not isinstance(p, EngineHeldTensor):
            return p.device
    return torch.device("cpu")


__all__ = ["ModelPlacement"]
