"""Per-step placement numbers: what ran where, what was copied, busy times, predicted vs observed.

`PlacementMetrics.record(layer_key, plan, timings, prediction)` is called once per observed layer
call (Scheduler.observe does it); the training loop calls `end_step()` once per optimizer step
and gets a flat dict of numbers for metrics.jsonl / TensorBoard, and `progress(numbers)` gives a
short string for the progress bar.

Counting rules: experts and tokens per placement count forward calls only (the routed work of the
step; a backward or a checkpoint recompute repeats the same experts and tokens); bytes copied and
busy times count every phase. Busy times are the GPU path's measurements ("cpu": CPU engine job
wall time, "gpu": GPU compute-stream busy time, "copy": copy-stream time, "wall": the layer call);
"predicted" is the cost model's makespan of the same calls, so predicted_ratio = wall / predicted
over the calls that reported a wall time (1.0 = the model is right on average).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np

from moetune.placement.cost import Prediction
from moetune.placement.plan import LayerPlan, Where

PLACEMENTS = {"cpu": Where.CPU, "resident": Where.GPU_RESIDENT, "streamed": Where.GPU_STREAMED}
PREFIX = "placement_"


def _seconds(timings: Mapping[str, object], key: str) -> float:
    v = timings.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else 0.0


class PlacementMetrics:
    """Accumulates one step's layer calls; `end_step()` returns the numbers and starts the next."""

    def __init__(self):
        self.steps = 0
        self._reset()

    def _reset(self) -> None:
        self._n: dict[str, float] = {f"{k}_{p}": 0.0 for k in ("experts", "tokens") for p in PLACEMENTS}
        self._n.update(
            calls=0.0,
            bytes_copied=0.0,
            cpu_s=0.0,
            gpu_s=0.0,
            copy_s=0.0,
            wall_s=0.0,
            predicted_s=0.0,
            predicted_wall_s=0.0,
            predicted_cpu_s=0.0,
            predicted_gpu_s=0.0,
            predicted_copy_s=0.0,
        )

    def record(
        self, layer_key: Hashable, plan: LayerPlan, timings: Mapping[str, object], prediction: Prediction | None = None
    ) -> None:
        n = self._n
        phase = str(timings.get("phase", "forward"))
        n["calls"] += 1
        if phase == "forward":
            where = plan.where.numpy()
            counts = plan.counts.numpy()
            active = counts > 0
            for name, w in PLACEMENTS.items():
                sel = active & (where == int(w))
                n[f"experts_{name}"] += int(sel.sum())
                n[f"tokens_{name}"] += int(counts[sel].sum())
        copy_bytes = timings.get("copy_bytes")
        if isinstance(copy_bytes, (int, float)):
            n["bytes_copied"] += float(copy_bytes)
        elif prediction is not None:
            n["bytes_copied"] += float(prediction.copy_bytes)
        for key in ("cpu", "gpu", "copy", "wall"):
            n[f"{key}_s"] += _seconds(timings, key)
        if prediction is not None:
            n["predicted_s"] += prediction.makespan
            n["predicted_cpu_s"] += prediction.cpu_eff
            n["predicted_gpu_s"] += prediction.gpu
            n["predicted_copy_s"] += prediction.copy
            if _seconds(timings, "wall") > 0:
                n["predicted_wall_s"] += prediction.makespan

    def summary(self) -> dict[str, float]:
        """The current step's numbers (keys prefixed "placement_"), without resetting."""
        n = dict(self._n)
        tokens = sum(n[f"tokens_{p}"] for p in PLACEMENTS)
        gpu_tokens = n["tokens_resident"] + n["tokens_streamed"]
        n["gpu_token_share"] = gpu_tokens / tokens if tokens else 0.0
        n["predicted_ratio"] = (n["wall_s"] / n["predicted_wall_s"]) if n["predicted_wall_s"] > 0 else 0.0
        return {PREFIX + k: float(v) for k, v in n.items()}

    def end_step(self) -> dict[str, float]:
        out = self.summary()
        self.steps += 1
        self._reset()
        return out

    @staticmethod
    def progress(numbers: Mapping[str, float]) -> str:
        """Short progress-bar text from end_step()'s numbers, e.g.
        'gpu 63% tok (res 41%, str 22%) 1.2 GB copied, wall/pred 1.04'."""
        g = numbers.get
        tokens = sum(g(PREFIX + f"tokens_{p}", 0.0) for p in PLACEMENTS)
        if not tokens:
            return "no experts"

        def pct(p):
            return 100.0 * g(PREFIX + f"tokens_{p}", 0.0) / tokens

        s = f"gpu {pct('resident') + pct('streamed'):.0f}% tok (res {pct('resident'):.0f}%, str {pct('streamed'):.0f}%)"
        copied = g(PREFIX + "bytes_copied", 0.0)
        if copied:
            s += f" {copied / 1e9:.1f} GB copied"
        ratio = g(PREFIX + "predicted_ratio", 0.0)
        if ratio:
            s += f", wall/pred {ratio:.2f}"
        return s


def split_counts(plan: LayerPlan) -> dict[str, np.ndarray]:
    """Pairs per expert [E] of each placement (zeros elsewhere), e.g. for a per-layer breakdown."""
    counts = plan.counts.numpy()
    where = plan.where.numpy()
    return {name: np.where(where == int(w), counts, 0) for name, w in PLACEMENTS.items()}
