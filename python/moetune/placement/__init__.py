"""Every processor computes experts: a MoE layer's routed experts split per step between the CPU
engine and the GPU (resident on it, or streamed to it in their stored format).

This package is the GPU path (decode of the engine's packed formats, resident store, streaming,
the GPU experts math, the placed autograd op), the shared plan types (plan.py) and the decisions:
cost.py (the cost model), calibrate.py (start-up calibration, its cache, the online correction),
scheduler.py (counts -> LayerPlan), residency.py (which experts stay on the GPU within the byte
budget), metrics.py (per-step numbers), trace.py (Chrome/Perfetto trace). Entry points:

    runtime = GpuRuntime("cuda", GpuOptions(resident_budget_bytes=..., keep_budget_bytes=...))
    gpu = GpuExperts(runtime, experts, layer_key=i)          # one per MoE layer
    gpu.set_resident(mask)                                   # between steps
    out = placed_moe_experts(experts, x, topk_ids, topk_weights, lora, planner=planner, gpu=gpu)

`planner` has plan(layer_key, counts, resident_mask) -> LayerPlan and observe(layer_key, plan,
timings); FixedPlanner is the trivial one. With Device "cpu" the same code runs on CPU tensors
(the CI stand-in for a GPU).
"""

from moetune.placement.device import Device
from moetune.placement.experts import FixedPlanner, GpuExperts, GpuOptions, GpuRuntime
from moetune.placement.formats import PackedFormat, format_of
from moetune.placement.op import flush_timings, placed_moe_experts, poll_timings
from moetune.placement.plan import LayerPlan, Where
from moetune.placement.resident import ResidentBudgetError, ResidentStore
from moetune.placement.streamer import Streamer

__all__ = [
    "Device",
    "FixedPlanner",
    "GpuExperts",
    "GpuOptions",
    "GpuRuntime",
    "LayerPlan",
    "PackedFormat",
    "ResidentBudgetError",
    "ResidentStore",
    "Streamer",
    "Where",
    "flush_timings",
    "format_of",
    "placed_moe_experts",
    "poll_timings",
]
