"""Measuring the cost model's coefficients on this machine, caching them, and correcting them online.

Start-up calibration (`calibrate`) times what the cost model predicts, through callables so tests
inject fakes and the GPU path supplies its own:
- cpu_time(phase, counts) -> seconds of the CPU engine for one call (`engine_timer` builds it from
  a real MoEExperts: synthetic routing with exactly `counts` pairs per expert, the real shape);
- gpu_time(phase, counts) -> seconds of the GPU experts on resident weights (the GPU path's);
- copy_time(nbytes) -> seconds of one pinned host->GPU copy (`cuda_copy_timer`);
- cpu_time_under_copy(phase, counts, cover_s) -> the CPU engine's seconds while copies run for at
  least cover_s (`under_copies` wraps cpu_time with copies on a side CUDA stream).
Design: `token_counts` x `active_fractions` points (how many experts get the pairs, so that the
per-call and per-expert fixed costs separate) per phase; each resource is fit as
t = call + expert * active_experts + token * pairs by non-negative least squares (exhaustive over
the 8 active sets of the 3 coefficients: tiny and robust); copy as t = latency + bytes / bandwidth;
slowdown = (CPU time with copies) / (CPU time alone) at the largest point. What is not measured
(no GPU, no CUDA) keeps the `base` coefficients (ReferenceRates defaults). The defaults take a
few seconds on the reference machine (12 engine calls of at most 4096 tokens, a few copies).

Cache (`CalibrationCache`): one JSON file per key = hash of (machine fingerprint, layer shape,
format, options); the file repeats the key's content and a mismatch, a parse error or missing
fields make it a miss (reported, then re-measured and rewritten atomically), never a wrong hit.

Online correction (`OnlineCorrection.observe`): after each observed call, per resource and phase
("cpu/forward", "cpu/backward", "gpu/forward", "gpu/backward", "copy") the model's factor moves
toward observed/predicted in log space: log f += rate * clamp(log(obs/pred), +-max_step), within
[1/max_factor, max_factor]. An observation whose log-residual is farther than
max(outlier_mads * MAD, outlier_floor) from the median of the last `window` residuals is ignored
(it still enters the window, so a lasting change becomes the median and is followed). A wrong
start-up guess of any size converges (the clamp bounds each step, not the distance).
The CPU time observed is the slowed one (cost.py: X_eff = X*s or X + C(1 - 1/s), with the
predicted copy time C); its log-residual is divided by its sensitivity to log(s) or log(X) and
credited to the slowdown when copies cover most of the engine's run (sensitivity to s >=
`overlap`), else to the phase's CPU factor (i.e. de-slowed). Calls without copies (all-CPU
layers, backwards that reuse their weights) pin the CPU factors; when every call overlaps fully
the two are confounded and the slowdown absorbs a CPU error (the slowed time, which is what the
plans need, is still learned).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from moetune.placement.cost import CostCoefficients, CostModel, LayerShape, PhaseCoefficients, _as_numpy, cost_phase
from moetune.placement.plan import Where

CALIBRATION_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# synthetic routing
def synthetic_counts(num_experts: int, active: int, tokens: int, top_k: int) -> np.ndarray:
    """Pairs per expert [E]: tokens * top_k pairs spread as evenly as possible over `active`
    experts spaced across the ids (each gets at most `tokens`, so a routing exists)."""
    if not (top_k <= active <= num_experts):
        raise ValueError(f"active experts must be in [top_k={top_k}, E={num_experts}], got {active}")
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    ids = np.unique(np.linspace(0, num_experts - 1, active).round().astype(np.int64))
    pairs = tokens * top_k
    counts = np.zeros(num_experts, dtype=np.int64)
    counts[ids] = pairs // ids.size
    counts[ids[: pairs % ids.size]] += 1
    return counts


def routing_from_counts(counts, top_k: int) -> torch.Tensor:
    """topk_ids [T, top_k] (int64) in which expert e appears exactly counts[e] times and no token
    picks an expert twice. Requires sum(counts) = T * top_k and every count <= T."""
    n = torch.as_tensor(_as_numpy(counts, np.int64, "counts"))
    total = int(n.sum())
    if total == 0 or total % top_k:
        raise ValueError(f"sum of counts ({total}) must be a positive multiple of top_k={top_k}")
    T = total // top_k
    if int(n.max()) > T:
        raise ValueError(f"expert {int(n.argmax())} has {int(n.max())} pairs, more than the T={T} tokens")
    seq = torch.repeat_interleave(torch.arange(n.numel()), n)  # sorted by expert
    # Column-major fill: a token's k slots are T apart in seq, an expert's run is <= T long.
    return seq.view(top_k, T).t().contiguous()


# ---------------------------------------------------------------------------------------------
# fitting
def fit_nonneg(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||X b - y||^2 subject to b >= 0, exactly, for a handful of columns (enumerates the
    sets of free coefficients; least squares on each; the best feasible one)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"fit_nonneg: X [N, P] and y [N] expected, got {X.shape} and {y.shape}")
    P = X.shape[1]
    if P > 6:
        raise ValueError("fit_nonneg enumerates subsets: at most 6 coefficients")
    best, best_err = np.zeros(P), float(np.sum(y * y))
    for k in range(1, P + 1):
        for cols in itertools.combinations(range(P), k):
            b, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if (b < 0).any():
                continue
            full = np.zeros(P)
            full[list(cols)] = b
            err = float(np.sum((X @ full - y) ** 2))
            if err < best_err - 1e-18:
                best, best_err = full, err
    return best


def _fit_resource(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(call, expert, token) seconds from (active experts, pairs, seconds) points. Rows are weighted
    by 1/t so the fit is in relative error (small calls matter as much as large ones)."""
    A = np.array([[1.0, m, p] for m, p, _ in points])
    t = np.array([s for _, _, s in points])
    w = 1.0 / np.maximum(t, 1e-9)
    b = fit_nonneg(A * w[:, None], t * w)
    return float(b[0]), float(b[1]), float(b[2])


# ---------------------------------------------------------------------------------------------
# start-up calibration
def calibrate(
    shape: LayerShape,
    *,
    top_k: int,
    cpu_time: Callable[[str, np.ndarray], float] | None = None,
    gpu_time: Callable[[str, np.ndarray], float] | None = None,
    copy_time: Callable[[int], float] | None = None,
    cpu_time_under_copy: Callable[[str, np.ndarray, float], float] | None = None,
    dequant_time: Callable[[int], float] | None = None,
    token_counts: Sequence[int] = (256, 1024, 4096),
    active_fractions: Sequence[float] = (0.25, 1.0),
    copy_experts: Sequence[int] = (1, 4),
    repeats: int = 1,
    base: CostCoefficients | None = None,
) -> CostCoefficients:
    """Measured coefficients for `shape` (module docstring). Every callable is optional; what is
    not measured keeps `base` (default: CostCoefficients.defaults(shape)). repeats: each point is
    timed this many times and the minimum kept (after one untimed warm-up call per resource)."""
    base = base if base is not None else CostCoefficients.defaults(shape)
    E = shape.num_experts
    if not (1 <= top_k <= E):
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    design = []
    for T in sorted(set(int(t) for t in token_counts)):
        for f in sorted(set(float(f) for f in active_fractions)):
            m = min(E, max(top_k, int(round(f * E))))
            design.append(synthetic_counts(E, m, T, top_k))
    if len({(int((c > 0).sum()), int(c.sum())) for c in design}) < 3:
        raise ValueError(
            "calibration needs at least 3 distinct (active experts, pairs) points: give more "
            "token_counts / active_fractions"
        )

    def timed(fn, *args):
        return min(float(fn(*args)) for _ in range(repeats))

    def fit(fn, phase):
        fn(phase, design[0])  # warm-up: first-touch of arenas, caches, kernels
        return _fit_resource([(int((c > 0).sum()), int(c.sum()), timed(fn, phase, c)) for c in design])

    phases = {}
    for phase in ("forward", "backward"):
        b = base.phase(phase)
        kw = dataclasses.asdict(b)
        if cpu_time is not None:
            kw["cpu_call"], kw["cpu_expert"], kw["cpu_token"] = fit(cpu_time, phase)
        if gpu_time is not None:
            kw["gpu_call"], kw["gpu_expert"], kw["gpu_token"] = fit(gpu_time, phase)
        if dequant_time is not None and shape.quantized:
            kw["dequant"] = timed(dequant_time, E) / E
        phases[phase] = PhaseCoefficients(**kw)

    bandwidth, latency = base.copy_bandwidth, base.copy_latency
    if copy_time is not None:
        sizes = [int(n) * int(shape.stored_bytes) for n in sorted(set(copy_experts))]
        if len(sizes) < 2:
            raise ValueError("copy_experts needs at least 2 distinct sizes to separate latency and bandwidth")
        copy_time(sizes[0])  # warm-up
        lat, per_byte = fit_nonneg(np.array([[1.0, s] for s in sizes]), np.array([timed(copy_time, s) for s in sizes]))
        if per_byte > 0:
            bandwidth, latency = 1.0 / per_byte, float(lat)

    slowdown = base.cpu_slowdown
    if cpu_time is not None and cpu_time_under_copy is not None:
        big = max(design, key=lambda c: int(c.sum()))
        alone = timed(cpu_time, "forward", big)
        # Copies cover the whole engine run even when it slows 3x.
        loaded = timed(cpu_time_under_copy, "forward", big, 3.0 * alone)
        slowdown = max(1.0, loaded / alone) if alone > 0 else slowdown

    return CostCoefficients(
        forward=phases["forward"],
        backward=phases["backward"],
        copy_bandwidth=float(bandwidth),
        copy_latency=float(latency),
        cpu_slowdown=float(slowdown),
    )


# ---------------------------------------------------------------------------------------------
# real timers (the CPU engine here; CUDA copies on the GPU machine)
def engine_timer(experts, *, top_k: int, lora=None, seed: int = 0) -> Callable[[str, np.ndarray], float]:
    """cpu_time(phase, counts) for a moetune.MoEExperts: one engine call with synthetic routing
    (routing_from_counts) and random bf16 inputs; "forward"/"recompute" time the forward (with
    autograd recording, as in training), "backward" the backward after an untimed forward. lora: a
    LoraWeights whose shapes are used (its tensors are cloned, so no .grad lands on them)."""
    from moetune.engine import LoraWeights, moe_experts

    H = int(experts.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    if lora is not None:

        def clone(pair):
            return None if pair is None else tuple(t.detach().clone().requires_grad_(True) for t in pair)

        lora = LoraWeights(gate=clone(lora.gate), up=clone(lora.up), down=clone(lora.down), scaling=lora.scaling)

    def run(phase: str, counts) -> float:
        p = cost_phase(phase)
        ids = routing_from_counts(counts, top_k)
        T = ids.shape[0]
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).requires_grad_(True)
        w = torch.softmax(torch.randn(T, top_k, generator=gen), dim=-1)
        if p == "forward":
            t0 = time.perf_counter()
            moe_experts(experts, x, ids, w, lora)
            return time.perf_counter() - t0
        out = moe_experts(experts, x, ids, w, lora)
        g = torch.randn(out.shape, generator=gen).to(out.dtype)
        t0 = time.perf_counter()
        out.backward(g)
        return time.perf_counter() - t0

    return run


def cuda_copy_timer(device, max_bytes: int) -> Callable[[int], float]:
    """copy_time(nbytes): one pinned host->GPU copy on a side stream, timed with CUDA events."""
    device = torch.device(device)
    host = torch.empty(int(max_bytes), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(int(max_bytes), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def run(nbytes: int) -> float:
        if nbytes > host.numel():
            raise ValueError(f"copy of {nbytes} bytes exceeds the timer's {host.numel()}-byte buffers")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return run


def under_copies(
    cpu_time: Callable[[str, np.ndarray], float], device, *, chunk_bytes: int
) -> Callable[[str, np.ndarray, float], float]:
    """cpu_time_under_copy: queues pinned host->GPU copies of chunk_bytes on a side stream, enough
    to last cover_s at the rate of one chunk's copy (timed here once), then runs cpu_time while
    they proceed, then waits for them."""
    device = torch.device(device)
    host = torch.empty(int(chunk_bytes), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(int(chunk_bytes), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    one = cuda_copy_timer(device, int(chunk_bytes))
    one(int(chunk_bytes))  # warm-up
    chunk_s = min(one(int(chunk_bytes)) for _ in range(3))

    def run(phase: str, counts, cover_s: float) -> float:
        n = max(1, math.ceil(cover_s / max(chunk_s, 1e-7)))
        with torch.cuda.stream(stream):
            for _ in range(n):
                dev.copy_(host, non_blocking=True)
        try:
            return cpu_time(phase, counts)
        finally:
            stream.synchronize()

    return run


# ---------------------------------------------------------------------------------------------
# cache
def machine_fingerprint(*, engine_threads: int | None = None, isa: str | None = None, device=None) -> dict[str, object]:
    """What makes timings of one machine differ from another's: CPU model, cores usable, the
    engine's threads and ISA, torch version, and the CUDA device's name and memory."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fp: dict[str, object] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "engine_threads": engine_threads,
        "isa": isa,
        "torch": torch.__version__,
    }
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        fp["gpu"] = props.name
        fp["gpu_memory"] = int(props.total_memory)
    return fp


class CalibrationCache:
    """Calibrated coefficients on disk, one JSON file per (machine, shape, options) key."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)

    @staticmethod
    def identity(shape: LayerShape, machine: Mapping[str, object], options: Mapping | None = None) -> dict:
        return {
            "version": CALIBRATION_FORMAT_VERSION,
            "shape": shape.to_dict(),
            "machine": dict(machine),
            "options": dict(options or {}),
        }

    @staticmethod
    def key(identity: Mapping) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"calibration-{key}.json")

    def load(self, identity: Mapping) -> CostCoefficients | None:
        """The cached coefficients for this identity, or None (absent, or unusable: reported)."""
        path = self.path(self.key(identity))
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as fh:
                d = json.load(fh)
            if json.loads(json.dumps(identity, sort_keys=True, default=str)) != d.get("identity"):
                raise ValueError("its identity (machine / shape / options) differs")
            return CostCoefficients.from_dict(d["coefficients"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"moetune: ignoring calibration cache {path}: {e}; measuring again", stacklevel=3)
            return None

    def save(self, identity: Mapping, coefficients: CostCoefficients) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(self.key(identity))
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(
                {
                    "identity": json.loads(json.dumps(identity, sort_keys=True, default=str)),
                    "coefficients": coefficients.to_dict(),
                    "created": time.time(),
                },
                fh,
                indent=1,
                sort_keys=True,
            )
        os.replace(tmp, path)
        return path

    def get_or_measure(
        self, identity: Mapping, measure: Callable[[], CostCoefficients]
    ) -> tuple[CostCoefficients, bool]:
        """(coefficients, hit): the cached ones, else measure() saved for next time."""
        got = self.load(identity)
        if got is not None:
            return got, True
        coefficients = measure()
        self.save(identity, coefficients)
        return coefficients, False


# ---------------------------------------------------------------------------------------------
# online correction
class OnlineCorrection:
    """Moves a CostModel's per-resource factors toward observed/predicted (module docstring).

    rate: step size in log space (0.25: a constant 2x error shrinks to ~1.1x in ~10 observations);
    max_step: clamp of one observation's log-residual; window / outlier_mads / outlier_floor: the
    outlier filter; max_factor: bound of each factor; max_slowdown: bound of the CPU slowdown;
    min_seconds: timings shorter than this are noise-dominated and ignored; overlap: a CPU time
    whose sensitivity to the slowdown (d log cpu_eff / d log slowdown: 1 when the copies outlast
    the engine, 0 without copies) is at least `overlap` teaches the slowdown, a smaller one the
    CPU factor (the residual divided by its sensitivity, i.e. de-slowed).
    """

    def __init__(
        self,
        model: CostModel,
        *,
        rate: float = 0.25,
        max_step: float = 0.7,
        window: int = 15,
        outlier_mads: float = 5.0,
        outlier_floor: float = 0.25,
        max_factor: float = 30.0,
        max_slowdown: float = 4.0,
        min_seconds: float = 20e-6,
        overlap: float = 0.5,
    ):
        if not (0 < rate <= 1):
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.model = model
        self.rate, self.max_step, self.window = float(rate), float(max_step), int(window)
        self.outlier_mads, self.outlier_floor = float(outlier_mads), float(outlier_floor)
        self.max_factor, self.max_slowdown = float(max_factor), float(max_slowdown)
        self.min_seconds, self.overlap = float(min_seconds), float(overlap)
        self._residuals: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=self.window)
        )
        self.updates: dict[str, int] = collections.Counter()
        self.ignored: dict[str, int] = collections.Counter()

    def _accept(self, key: str, r: float) -> bool:
        win = self._residuals[key]
        ok = True
        if len(win) >= 5:  # statistics.median: numpy's result, ~10x cheaper on a 15-value window (per call)
            med = statistics.median(win)
            mad = 1.4826 * statistics.median([abs(v - med) for v in win])
            ok = abs(r - med) <= max(self.outlier_mads * mad, self.outlier_floor)
        win.append(r)
        (self.updates if ok else self.ignored)[key] += 1
        return ok

    def _step(self, r: float) -> float:
        return self.rate * min(self.max_step, max(-self.max_step, r))

    def _update_factor(self, key: str, observed: float, predicted: float) -> None:
        if observed < self.min_seconds or predicted <= 0:
            return
        r = math.log(observed / predicted)
        if self._accept(key, r):
            f = self.model.scales[key] * math.exp(self._step(r))
            self.model.scales[key] = min(self.max_factor, max(1.0 / self.max_factor, f))

    def observe(self, counts, where, phase: str, timings: Mapping[str, object], *, copies: bool = True) -> None:
        """One call's measured seconds ("cpu", "gpu", "copy"; missing or 0 = not measured)."""
        p = cost_phase(phase)
        model = self.model
        n = _as_numpy(counts, np.float64, "counts")
        w = _as_numpy(where, np.int64, "where")
        t = model.terms(phase, copies)
        act = n > 0
        cpu_m = act & (w == int(Where.CPU))
        res_m = act & (w == int(Where.GPU_RESIDENT))
        str_m = act & (w == int(Where.GPU_STREAMED))
        m = int(str_m.sum())

        def obs(name):
            v = timings.get(name)
            return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None

        copy_pred = m * t.copy
        copy_obs = obs("copy")
        if copy_obs is not None and copy_pred > 0:
            self._update_factor("copy", copy_obs, copy_pred)
        gpu_obs = obs("gpu")
        if gpu_obs is not None and (res_m.any() or m > 0):
            g = (
                res_m.sum() * (t.gpu_expert + t.resident_extra)
                + m * (t.gpu_expert + t.stream_extra)
                + n[res_m | str_m].sum() * t.gpu_token
                + t.gpu_call
            )
            self._update_factor(f"gpu/{p}", gpu_obs, float(g))
        cpu_obs = obs("cpu")
        if cpu_obs is not None and cpu_m.any() and cpu_obs >= self.min_seconds:
            X = float(cpu_m.sum() * t.cpu_expert + n[cpu_m].sum() * t.cpu_token + t.cpu_call)
            # The predicted copy time (its factor is learned above): a noisy measured one would
            # bias the nonlinear overlap formula.
            C = copy_pred
            s = max(1.0, model.slowdown)
            if X > 0:
                # Residual of the slowed engine time, and how much log(s) and log(X) move it:
                # X_eff = X*s (full overlap: both 1), X + C(1 - 1/s) (partial: C/(s X_eff) and X/X_eff).
                full = X * s <= C
                X_eff = X * s if full else X + C * (1.0 - 1.0 / s)
                sens_s = 1.0 if full else C / (s * X_eff)
                sens_x = 1.0 if full else X / X_eff
                r = math.log(cpu_obs / X_eff)
                if sens_s >= self.overlap:
                    # Copies cover most of the engine's run: the residual is the slowdown's.
                    if self._accept("slowdown", r / sens_s):
                        s = s * math.exp(self._step(r / sens_s))
                        model.slowdown = min(self.max_slowdown, max(1.0, s))
                elif self._accept(f"cpu/{p}", r / sens_x):
                    f = model.scales[f"cpu/{p}"] * math.exp(self._step(r / sens_x))
                    model.scales[f"cpu/{p}"] = min(self.max_factor, max(1.0 / self.max_factor, f))
        model.invalidate()
