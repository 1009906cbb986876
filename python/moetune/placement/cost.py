"""The cost model: predicted seconds of one MoE layer call for given per-expert counts and a placement.

Model (one layer call, one phase; a plan covers the phases its call goes through, see scheduler.py)
-------------------------------------------------------------------------------------------------
n_e = routed (token, slot) pairs of expert e in this call; only experts with n_e > 0 cost anything.

CPU engine, the experts placed on the CPU (the engine's work is a sum over its experts):
    X = cpu_call + sum_e (cpu_expert + cpu_token * n_e)
cpu_expert is the per-expert fixed cost: reading the expert's packed weights from DRAM (and, in
backward, the W^T repack) plus per-expert task overhead; cpu_token the GEMM FLOPs per pair.
Forward and backward have separate coefficients (on the reference machine the backward's fixed
part is ~4x the forward's, its per-pair part smaller; see ReferenceRates). A checkpoint
recompute is a forward ("recompute" -> "forward").

GPU compute stream, resident (R) and streamed (S) experts, bf16 grouped GEMM:
    g_e = gpu_expert + gpu_token * n_e   (+ dequant, per streamed expert of a quantized format, and
                                           per resident expert when residents are held quantized)
    R = sum over resident g_e,   G = sum over streamed g_e,   m = number of streamed experts

Copy stream: each streamed expert travels in its stored format, c = copy_latency + stored_bytes /
copy_bandwidth; C = m * c (0 in a phase that does not copy, e.g. a backward that reuses the
weights its forward/recompute copied).

GPU side, copies overlapped with compute (a two-stage pipeline, copy then compute; resident
compute runs first, while the first copy is in flight):
    staging_buffers >= 2:  Y = gpu_call + max(C + G/m, max(c, R) + G)
                           (copy-bound: all copies, then the last expert's compute;
                            compute-bound: wait for the first copy (hidden by resident work),
                            then all compute) -- "max(copy, compute) + one chunk's latency"
    staging_buffers == 1:  Y = gpu_call + max(c, R) + (C - c) + G     (copy and compute alternate)
    no streamed expert:    Y = gpu_call + R;  no GPU expert at all: Y = 0

CPU slowed by copies: host->GPU copies share DRAM bandwidth with the engine, which runs `slowdown`
times slower while they run (copies keep their rate). The copies run during the first C seconds:
    X_eff = X * slowdown                       if X * slowdown <= C  (fully overlapped)
          = X + C * (1 - 1/slowdown)           otherwise             (overlapped part slowed)

The layer finishes when both sides have: makespan = max(X_eff, Y).

Assumptions (and where they break): costs are linear in the pairs per expert (small-M GEMM
inefficiency at a few tokens per expert is folded into the fixed part by the calibration's fit);
experts of one layer have one shape and one stored size; the CPU engine and the GPU start at the
same time (routing is known before either runs); copies of one call run back to back from its
start (with >= 2 staging buffers a copy never waits for a buffer: when compute is the bottleneck
the copies finish early anyway, so this only shifts when the CPU is slowed); the slowdown is one
factor for any overlap; layers do not overlap each other. Online correction
(calibrate.OnlineCorrection) scales each resource's coefficients by observed/predicted ratios, so
a machine unlike the reference one converges.

Coefficients are plain seconds for one layer shape (CostCoefficients, JSON save/load); defaults
for a shape come from ReferenceRates, the figures measured on the reference GPU machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import torch

from moetune.placement.plan import Where

#: Phases a layer call goes through and the coefficient set each uses (a gradient-checkpoint
#: recompute is a forward of the same work).
PHASES = ("forward", "backward", "recompute")
COST_PHASE = {"forward": "forward", "recompute": "forward", "backward": "backward"}
#: The resources whose timings the GPU path reports (LayerPlan.predicted / observe's timings).
RESOURCES = ("cpu", "gpu", "copy")


def cost_phase(phase: str) -> str:
    """The coefficient set ("forward" | "backward") a call phase uses; a clear error otherwise."""
    try:
        return COST_PHASE[phase]
    except KeyError:
        raise ValueError(f"unknown phase {phase!r}, expected one of {PHASES}") from None


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What the cost model needs to know about one MoE layer's routed experts.

    stored_bytes: bytes of one expert in its stored format (what a stream copies, what the CPU
    engine reads): take it from the engine, `MoEExperts.packed_bytes_per_expert` (see `of`).
    resident_bytes: bytes one resident expert takes on the GPU (None: the stored size, i.e.
    residents are held in the stored format and dequantized at each use when quantized).
    compute_bytes: bytes of the bf16 weights the GPU GEMMs read per expert (None: 3 * H * I * 2,
    gate/up/down in bf16).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    stored_bytes: int
    weight_format: str = "bf16"
    resident_bytes: int | None = None
    compute_bytes: int | None = None

    def __post_init__(self):
        for name in ("num_experts", "hidden_size", "intermediate_size", "stored_bytes"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"LayerShape.{name} must be a positive int, got {v!r}")
        for name in ("resident_bytes", "compute_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
                raise ValueError(f"LayerShape.{name} must be a positive int or None, got {v!r}")

    @property
    def gpu_bytes(self) -> int:
        """bf16 bytes per expert the GPU compute reads."""
        return int(self.compute_bytes) if self.compute_bytes else 3 * self.hidden_size * self.intermediate_size * 2

    @property
    def resident_size(self) -> int:
        return int(self.resident_bytes) if self.resident_bytes else int(self.stored_bytes)

    @property
    def quantized(self) -> bool:
        return self.weight_format != "bf16"

    @property
    def resident_dequant(self) -> bool:
        """Whether a resident expert is dequantized at each use (held smaller than bf16)."""
        return self.quantized and self.resident_size < self.gpu_bytes

    @classmethod
    def of(cls, experts, **overrides) -> LayerShape:
        """The shape of a moetune.MoEExperts (its engine is the one source of the stored size)."""
        kw = dict(
            num_experts=int(experts.num_experts),
            hidden_size=int(experts.hidden_size),
            intermediate_size=int(experts.intermediate_size),
            stored_bytes=int(experts.packed_bytes_per_expert),
            weight_format=str(experts.weight_format),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReferenceRates:
    """Machine rates behind the default coefficients, from the figures measured on the reference
    GPU machine (one H100, 16-core Emerald Rapids Xeon with AMX; reference-system.md and
    BENCHMARKS.md "Engine options"), turned into rates so that they apply to any layer shape.

    Per layer call and resource: t = active_experts * (expert_overhead + expert_bytes / bytes_per_s)
    + pairs * 12*H*I / flops_per_s (fwd+bwd: 6*H*I FLOPs per pair per pass), fit (least squares
    of log t) to the six fwd+bwd points of each resource, Qwen3-30B-A3B shapes (E=128, H=2048,
    I=768) and DeepSeek-V3 shapes (E=256, H=7168, I=2048), k=8:
      CPU engine (16 threads, amx_bf16, repack/save): Qwen3 92.2 / 129.4 / 211.1 ms at
      T = 128 / 1024 / 4096; DeepSeek-V3 702 / 1074 / 3350 ms at T = 1024 / 4096 / 16384.
      Fit: 679 us + bytes / 75.7 GB/s per expert, 7.83 TFLOPS; the points within -14% .. +14%.
      GPU grouped GEMM with LoRA: Qwen3 3.2 / 6.0 / 19.3 ms, DeepSeek-V3 24 / 38 / 87 ms at
      T = 1024 / 4096 / 16384. Fit: 18.6 us + bytes / 2.09 TB/s per expert, 229 TFLOPS; the
      points within -29% .. +34% (smaller GEMMs run at a lower rate; calibration corrects).
    Forward's share of the fwd+bwd time: CPU fixed part 0.2 and per-pair part 0.585 (Qwen3 at
    16 threads: fwd 158 us per expert + 1.95 us per pair, bwd 640 us + 1.38 us, the line through
    T = 1024 and 4096); GPU 0.4 (assumed: the backward adds the dx GEMMs and LoRA gradients).
    """

    cpu_expert_overhead_s: float = 679e-6
    cpu_expert_bytes_per_s: float = 75.7e9
    cpu_flops_per_s: float = 7.83e12
    cpu_forward_share_fixed: float = 0.2
    cpu_forward_share_token: float = 0.585
    cpu_call_s: float = 100e-6  # job submit + wait per call (assumed; calibrated)
    gpu_expert_overhead_s: float = 18.6e-6
    gpu_expert_bytes_per_s: float = 2.09e12
    gpu_flops_per_s: float = 229e12
    gpu_forward_share: float = 0.4
    gpu_call_s: float = 50e-6  # kernel launches per call (assumed; calibrated)
    # Dequantizing one Qwen3 layer from int8 on the GPU: 3.2 ms for 128 experts = 25 us per
    # expert = 9.44 MB of bf16 written at 0.38 TB/s.
    gpu_dequant_bytes_per_s: float = 0.38e12
    # Pinned host->GPU copy: 55 GB/s (1.13 GiB layer in 22 ms); per-copy latency assumed 2 us (the
    # launch of one async copy; calibrated).
    copy_bytes_per_s: float = 55e9
    copy_latency_s: float = 2e-6
    # The CPU engine runs 1.6-1.8x slower while copies run (shared DRAM bandwidth): middle value.
    cpu_slowdown: float = 1.7


@dataclasses.dataclass(frozen=True)
class PhaseCoefficients:
    """Seconds of one phase (forward or backward) for one layer shape (model: module docstring)."""

    cpu_call: float
    cpu_expert: float
    cpu_token: float
    gpu_call: float
    gpu_expert: float
    gpu_token: float
    dequant: float  # GPU seconds to dequantize one expert (0 for bf16)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"PhaseCoefficients.{f.name} must be a finite number >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class CostCoefficients:
    """The cost model's coefficients for one layer shape, per phase ("forward", "backward")."""

    forward: PhaseCoefficients
    backward: PhaseCoefficients
    copy_bandwidth: float  # bytes/s, pinned host -> GPU
    copy_latency: float  # seconds per copy (one expert)
    cpu_slowdown: float  # >= 1: CPU engine time factor while copies run

    def __post_init__(self):
        if not (math.isfinite(self.copy_bandwidth) and self.copy_bandwidth > 0):
            raise ValueError(f"copy_bandwidth must be > 0 bytes/s, got {self.copy_bandwidth!r}")
        if not (math.isfinite(self.copy_latency) and self.copy_latency >= 0):
            raise ValueError(f"copy_latency must be >= 0 s, got {self.copy_latency!r}")
        if not (math.isfinite(self.cpu_slowdown) and self.cpu_slowdown >= 1.0):
            raise ValueError(f"cpu_slowdown must be >= 1, got {self.cpu_slowdown!r}")

    def phase(self, phase: str) -> PhaseCoefficients:
        return getattr(self, cost_phase(phase))

    @classmethod
    def defaults(cls, shape: LayerShape, rates: ReferenceRates = ReferenceRates()) -> CostCoefficients:
        """Coefficients for `shape` from the reference machine's rates (see ReferenceRates): the CPU
        engine reads the stored format, the GPU computes on bf16 (gpu_bytes)."""
        r = rates
        flops = 12.0 * shape.hidden_size * shape.intermediate_size  # per pair, fwd+bwd
        cpu_fixed = r.cpu_expert_overhead_s + shape.stored_bytes / r.cpu_expert_bytes_per_s
        cpu_token = flops / r.cpu_flops_per_s
        gpu_fixed = r.gpu_expert_overhead_s + shape.gpu_bytes / r.gpu_expert_bytes_per_s
        gpu_token = flops / r.gpu_flops_per_s
        dequant = shape.gpu_bytes / r.gpu_dequant_bytes_per_s if shape.quantized else 0.0

        def phase(cpu_fixed_share, cpu_token_share, gpu_share):
            return PhaseCoefficients(
                cpu_call=r.cpu_call_s,
                cpu_expert=cpu_fixed * cpu_fixed_share,
                cpu_token=cpu_token * cpu_token_share,
                gpu_call=r.gpu_call_s,
                gpu_expert=gpu_fixed * gpu_share,
                gpu_token=gpu_token * gpu_share,
                dequant=dequant,
            )

        return cls(
            forward=phase(r.cpu_forward_share_fixed, r.cpu_forward_share_token, r.gpu_forward_share),
            backward=phase(1 - r.cpu_forward_share_fixed, 1 - r.cpu_forward_share_token, 1 - r.gpu_forward_share),
            copy_bandwidth=r.copy_bytes_per_s,
            copy_latency=r.copy_latency_s,
            cpu_slowdown=r.cpu_slowdown,
        )

    def replace(self, **changes) -> CostCoefficients:
        return dataclasses.replace(self, **changes)

    # JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostCoefficients:
        try:
            return cls(
                forward=PhaseCoefficients(**d["forward"]),
                backward=PhaseCoefficients(**d["backward"]),
                copy_bandwidth=float(d["copy_bandwidth"]),
                copy_latency=float(d["copy_latency"]),
                cpu_slowdown=float(d["cpu_slowdown"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a CostCoefficients dict ({e}): {d!r}") from None

    def save(self, path: str) -> None:
        """Atomic write (temp + rename) of the coefficients as JSON."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> CostCoefficients:
        with open(path) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Terms:
    """Effective (corrected) per-phase numbers the vectorised evaluation uses."""

    cpu_call: float
    cpu_expert: float
    cpu_token: float
    gpu_call: float
    gpu_expert: float
    gpu_token: float
    stream_extra: float  # GPU seconds added per streamed expert (dequant)
    resident_extra: float  # GPU seconds added per resident expert (dequant if held quantized)
    copy: float  # copy-stream seconds per streamed expert (0: this phase does not copy)
    slowdown: float


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted seconds of one phase of one call. cpu: engine time alone; cpu_eff: with the
    slowdown from overlapping copies; gpu: compute-stream busy time; copy: copy-stream time;
    gpu_side: the GPU's finish time (pipelined); makespan = max(cpu_eff, gpu_side)."""

    cpu: float
    cpu_eff: float
    gpu: float
    copy: float
    gpu_side: float
    makespan: float
    streamed: int
    copy_bytes: int


def scale_keys():
    """Keys of CostModel.scales: the online correction's multiplicative factors."""
    return [f"{r}/{p}" for r in ("cpu", "gpu") for p in ("forward", "backward")] + ["copy"]


class CostModel:
    """Coefficients of one layer shape + the online correction's factors; evaluates plans.

    scales: "cpu/forward", "cpu/backward", "gpu/forward", "gpu/backward" multiply that resource's
    phase coefficients, "copy" multiplies the copy time; slowdown is the corrected CPU slowdown
    (both maintained by calibrate.OnlineCorrection). staging_buffers: GPU staging buffers for
    streamed experts (1: copy and compute alternate; >= 2: they overlap).
    Not thread-safe: one training thread plans and observes.
    """

    def __init__(self, shape: LayerShape, coefficients: CostCoefficients | None = None, *, staging_buffers: int = 2):
        if not isinstance(shape, LayerShape):
            raise TypeError(f"shape must be a LayerShape, got {type(shape).__name__}")
        if int(staging_buffers) < 1:
            raise ValueError(f"staging_buffers must be >= 1, got {staging_buffers}")
        self.shape = shape
        self.coefficients = coefficients if coefficients is not None else CostCoefficients.defaults(shape)
        self.staging_buffers = int(staging_buffers)
        self.scales: dict[str, float] = {k: 1.0 for k in scale_keys()}
        self.slowdown = float(self.coefficients.cpu_slowdown)
        self._terms: dict[tuple, object] = {}  # terms / term_columns cache

    def set_coefficients(self, coefficients: CostCoefficients) -> None:
        """New base coefficients (e.g. a calibration); resets the online correction."""
        self.coefficients = coefficients
        self.scales = {k: 1.0 for k in scale_keys()}
        self.slowdown = float(coefficients.cpu_slowdown)
        self.invalidate()

    def invalidate(self) -> None:
        """Call after changing scales / slowdown in place."""
        self._terms.clear()

    def terms(self, phase: str, copies: bool = True) -> Terms:
        key = (phase, bool(copies))
        t = self._terms.get(key)
        if t is None:
            p = cost_phase(phase)
            c = self.coefficients.phase(p)
            sc, sg = self.scales[f"cpu/{p}"], self.scales[f"gpu/{p}"]
            copy = (
                (
                    (self.coefficients.copy_latency + self.shape.stored_bytes / self.coefficients.copy_bandwidth)
                    * self.scales["copy"]
                )
                if copies
                else 0.0
            )
            t = Terms(
                cpu_call=c.cpu_call * sc,
                cpu_expert=c.cpu_expert * sc,
                cpu_token=c.cpu_token * sc,
                gpu_call=c.gpu_call * sg,
                gpu_expert=c.gpu_expert * sg,
                gpu_token=c.gpu_token * sg,
                stream_extra=c.dequant * sg,
                resident_extra=c.dequant * sg if self.shape.resident_dequant else 0.0,
                copy=float(copy),
                slowdown=max(1.0, float(self.slowdown)),
            )
            self._terms[key] = t
        return t

    def term_columns(self, phases: tuple[tuple[str, bool], ...]) -> dict[str, np.ndarray]:
        """Terms of several (phase, copies) as [P, 1] float64 columns by field name (cached; the
        scheduler's vectorised evaluation broadcasts them over candidate placements)."""
        key = ("columns", phases)
        cols = self._terms.get(key)
        if cols is None:
            ts = [self.terms(p, c) for p, c in phases]
            cols = {f.name: np.array([[float(getattr(t, f.name))] for t in ts]) for f in dataclasses.fields(Terms)}
            self._terms[key] = cols
        return cols

    def effective(self) -> CostCoefficients:
        """The coefficients with the online correction folded in (what `save` should persist to
        start the next run from what this one learned)."""

        def ph(p):
            c = self.coefficients.phase(p)
            sc, sg = self.scales[f"cpu/{p}"], self.scales[f"gpu/{p}"]
            return PhaseCoefficients(
                cpu_call=c.cpu_call * sc,
                cpu_expert=c.cpu_expert * sc,
                cpu_token=c.cpu_token * sc,
                gpu_call=c.gpu_call * sg,
                gpu_expert=c.gpu_expert * sg,
                gpu_token=c.gpu_token * sg,
                dequant=c.dequant * sg,
            )

        s = self.scales["copy"]
        return CostCoefficients(
            forward=ph("forward"),
            backward=ph("backward"),
            copy_bandwidth=self.coefficients.copy_bandwidth / s,
            copy_latency=self.coefficients.copy_latency * s,
            cpu_slowdown=max(1.0, self.slowdown),
        )

    def predict(self, counts, where, phase: str, *, copies: bool = True) -> Prediction:
        """Predicted seconds of `phase` for one call with these counts [E] and placement [E]
        (Where values; experts with 0 pairs cost nothing wherever they are)."""
        n = _as_numpy(counts, np.float64, "counts")
        w = _as_numpy(where, np.int64, "where")
        E = self.shape.num_experts
        if n.shape != (E,) or w.shape != (E,):
            raise ValueError(f"counts and where must have shape [{E}], got {list(n.shape)} and {list(w.shape)}")
        t = self.terms(phase, copies)
        act = n > 0
        cpu_m = act & (w == int(Where.CPU))
        res_m = act & (w == int(Where.GPU_RESIDENT))
        str_m = act & (w == int(Where.GPU_STREAMED))
        X = float(cpu_m.sum() * t.cpu_expert + n[cpu_m].sum() * t.cpu_token) + (t.cpu_call if cpu_m.any() else 0.0)
        R = float(res_m.sum() * (t.gpu_expert + t.resident_extra) + n[res_m].sum() * t.gpu_token)
        m = int(str_m.sum())
        G = float(m * (t.gpu_expert + t.stream_extra) + n[str_m].sum() * t.gpu_token)
        any_gpu = bool(res_m.any() or m > 0)
        Xe, Y, C = (
            float(v)
            for v in makespan_parts(
                np.float64(X),
                np.float64(R),
                np.float64(G),
                np.float64(m),
                any_gpu,
                copy=t.copy,
                slowdown=t.slowdown,
                gpu_call=t.gpu_call,
                staging_buffers=self.staging_buffers,
            )
        )
        return Prediction(
            cpu=X,
            cpu_eff=Xe,
            gpu=R + G + (t.gpu_call if any_gpu else 0.0),
            copy=C,
            gpu_side=Y,
            makespan=max(Xe, Y),
            streamed=m,
            copy_bytes=m * int(self.shape.stored_bytes) if copies else 0,
        )


def makespan_parts(X, R, G, m, any_gpu, *, copy, slowdown, gpu_call, staging_buffers: int):
    """The model's formulas (module docstring), vectorised: numpy arrays that broadcast together
    (candidate placements, and phases when the per-phase numbers copy / slowdown / gpu_call are
    column arrays). X: CPU engine seconds (call overhead included); R, G: resident and streamed GPU
    compute seconds (call overhead not included); m: streamed experts; any_gpu: whether any expert
    is on the GPU. Returns (X_eff, Y, C): the slowed CPU time, the GPU side's finish time and the
    copy time."""
    C = m * copy
    RG = np.maximum(copy, R) + G  # compute-bound: the first copy (hidden by resident work), then all
    if staging_buffers >= 2:
        pipe = np.maximum(C + G / np.maximum(m, 1), RG)
    else:
        pipe = RG + (C - copy)
    Y = np.where(m > 0, pipe, R) + gpu_call
    Y *= any_gpu
    # X_eff = min(X * s, X + C (1 - 1/s)) is the piecewise formula (the two agree at X*s = C).
    Xe = np.minimum(X * slowdown, X + C * (1.0 - 1.0 / slowdown))
    return Xe, Y, C


def _as_numpy(x, dtype, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        return x.numpy().astype(dtype, copy=False)
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}") from None
