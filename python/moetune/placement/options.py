"""moetune.PlacementOptions: where a model's routed experts compute (CPU engine, GPU, or both).

The expert options (moetune.ExpertsOptions) say how the engine holds and computes one layer's
experts; these say which processor computes each expert, decided per step from the routing
(moetune.placement: cost model, scheduler, residency, GPU path). They are taken by
`moetune.hf.patch(model, placement=...)`, `moetune.load_model(path, placement=...)` and
`moetune train` (expert_placement, expert_gpu_budget_gib, placement_trace).

    moetune.PlacementOptions()                        # "auto": split where CUDA is used, else CPU
    moetune.PlacementOptions(mode="gpu", gpu_budget_gib=20)
    moetune.hf.patch(model, placement="cpu")          # a mode string is enough

Defaults of the knobs that configure placement classes are read from those classes (staging
buffers: GpuOptions; residency cadence: ResidencyPolicy), never written here a second time.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from moetune.placement.experts import GpuOptions
from moetune.placement.residency import ResidencyPolicy

MODES = ("auto", "cpu", "gpu")


def _default_of(fn, name: str):
    return inspect.signature(fn).parameters[name].default


@dataclasses.dataclass(frozen=True)
class PlacementOptions:
    """Where the routed experts of one model compute.

    mode: "auto" (each expert of each layer where the layer finishes soonest, per step, from
      the routing counts and a cost model measured at start-up; resolves to "cpu" when the
      model's non-expert part is not on a CUDA device), "cpu" (the CPU engine only: exactly
      moetune's CPU path) or "gpu" (every routed expert on the GPU: resident or streamed).
    gpu_budget_gib: GPU memory for resident experts (all layers), in GiB; None = "auto":
      measured after the first steps (what is free after the model, its activations and a
      safety margin; residency.auto_budget_bytes). Staging buffers for streamed experts and
      the checkpoint keep slot are separate (small / one layer).
    device: the GPU the experts compute on ("cuda", "cuda:1"); None = the device of the
      hidden states at the first experts call (the model's). "cpu" forces the CPU stand-in
      of the GPU path (the same code on CPU tensors: tests, CI).
    staging_buffers: staging buffers of the streamer (2 = double, 3 = triple buffering).
    keep_for_backward: a checkpoint recompute keeps its streamed experts on the GPU for the
      backward that follows (one layer's experts at most, and at most a quarter of the GPU
      memory free at start), instead of copying them again.
    refresh_every, warmup_steps: the residency refresh cadence, in optimizer steps.
    max_tokens: the most tokens one forward of the run will have (micro-batch x sequence
      length); the "auto" budget keeps room for that forward's activations, scaled from the
      measured steps (residency module docstring). None = the largest forward seen so far (a
      later, longer one can then run out of GPU memory).
    plan_per_step: a layer whose experts are all resident, and whose plan for its last forward
      routing put every expert on the GPU, is planned once per step (end_step) instead of per
      call: its calls then skip the routing-count host sync and the plan (op.py's sync-free
      path; counts are still observed, read without a sync once the call's GPU work is done).
      False: every call is planned from its own counts.
    calibrate: measure the cost model on this machine at start-up (a few seconds); False uses
      the reference machine's rates (the online correction still adapts them).
    calibration_cache_dir: a folder caching the calibration per machine, layer shape and
      format (None: measured at every start).
    trace: a path for a Chrome / Perfetto trace (JSON) of the last `trace_steps` steps: the
      CPU engine jobs and the GPU compute / copy streams on one timeline; None = no trace.
    """

    mode: str = "auto"
    gpu_budget_gib: float | None = None
    device: str | None = None
    staging_buffers: int = GpuOptions.stream_buffers
    keep_for_backward: bool = True
    refresh_every: int = _default_of(ResidencyPolicy, "refresh_every")
    warmup_steps: int = _default_of(ResidencyPolicy, "warmup_steps")
    max_tokens: int | None = _default_of(ResidencyPolicy, "max_tokens")
    plan_per_step: bool = True
    calibrate: bool = True
    calibration_cache_dir: str | None = None
    trace: str | None = None
    trace_steps: int = 3

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"placement mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        b = self.gpu_budget_gib
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0):
            raise ValueError(f"gpu_budget_gib must be a number >= 0 (GiB) or None (auto), got {b!r}")
        if b is not None:
            object.__setattr__(self, "gpu_budget_gib", float(b))
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"placement device must be 'cuda', 'cuda:N' or 'cpu' (the stand-in), got {self.device!r}"
                ) from None
            if dev.type not in ("cuda", "cpu"):
                raise ValueError(
                    f"placement device must be 'cuda', 'cuda:N' or 'cpu' (the stand-in), got {self.device!r}"
                )
            object.__setattr__(self, "device", str(dev))
        m = self.max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {m!r}")
        for name in ("staging_buffers", "refresh_every", "warmup_steps", "trace_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("keep_for_backward", "plan_per_step", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("calibration_cache_dir", "trace"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, os.fspath(v))

    @classmethod
    def resolve(
        cls, placement: PlacementOptions | str | Mapping[str, Any] | None = None, **overrides
    ) -> PlacementOptions:
        """placement as given to patch / load_model: a PlacementOptions, a mode string, a dict
        of fields, or None (the defaults), with keyword overrides applied."""
        if placement is None:
            base = cls()
        elif isinstance(placement, PlacementOptions):
            base = placement
        elif isinstance(placement, str):
            base = cls(mode=placement)
        elif isinstance(placement, Mapping):
            unknown = sorted(set(placement) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise TypeError(
                    f"unknown placement option(s) {', '.join(unknown)}; the options are "
                    f"{', '.join(f.name for f in dataclasses.fields(cls))}"
                )
            base = cls(**placement)
        else:
            raise TypeError(
                f"placement must be a moetune.PlacementOptions, a mode string ({', '.join(MODES)}), "
                f"a dict or None, got {type(placement).__name__}"
            )
        return dataclasses.replace(base, **overrides) if overrides else base

    def replace(self, **changes) -> PlacementOptions:
        return dataclasses.replace(self, **changes)

    def resolve_mode(self, model_device) -> tuple[str, torch.device | None]:
        """The one place "auto" meets the environment: (mode, device) with mode "cpu" (the CPU
        engine only; device None) or the scheduler's "auto" / "gpu" on `device` (a CUDA device,
        or the CPU stand-in when `device="cpu"` was given explicitly).

        model_device: where the model's non-expert part computes (the hidden states' device).
        auto -> the split when CUDA is available and the experts' device (the option, else the
        model's) is a CUDA device, else "cpu"; "gpu" without a CUDA device is an error unless
        the stand-in was asked for."""
        if self.mode == "cpu":
            return "cpu", None
        dev = torch.device(self.device if self.device is not None else model_device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"moetune: placement on {dev} requested but torch sees no CUDA device")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            return self.mode, dev
        if self.device is not None:  # the CPU stand-in, asked for explicitly
            return self.mode, torch.device("cpu")
        if self.mode == "auto":
            return "cpu", None
        raise ValueError(
            f"moetune: placement mode 'gpu' needs the model on a CUDA device (it is on {dev}); "
            "use mode 'auto' or 'cpu', or device='cpu' for the CPU stand-in of the GPU path"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
