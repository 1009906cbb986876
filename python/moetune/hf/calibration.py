"""Start-up calibration of a model's placement cost models (moetune.placement.calibrate, wired).

`coefficients(shape, engine, device, options, lora=, top_k=)` gives one layer shape's cost-model
coefficients and how they were obtained: "defaults" (options.calibrate False: the reference
machine's rates), "cached" (calibration_cache_dir holds them for this machine, shape, format,
engine options, top-k and LoRA ranks) or "measured". Measuring (a few seconds) times on this
machine: the CPU engine (a real call of `engine` with synthetic routing), the GPU experts on
resident weights (the placed op with a throw-away runtime sharing the model's Device, when the
layer's decoded experts take at most a quarter of the free GPU memory), and on CUDA the pinned
copy bandwidth and the CPU engine's slowdown under copies.

The measurement runs in a helper thread: its own forward and backward must not inherit the
calling thread's autograd state (no_grad, a gradient checkpoint's saved-tensor hooks) when the
placement starts inside a model's forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from moetune.engine import LoraWeights, MoEExperts
from moetune.placement import calibrate as calib
from moetune.placement.cost import CostCoefficients, LayerShape
from moetune.placement.device import Device
from moetune.placement.experts import FixedPlanner, GpuExperts, GpuOptions, GpuRuntime
from moetune.placement.formats import format_of
from moetune.placement.op import flush_timings, placed_moe_experts
from moetune.placement.options import PlacementOptions
from moetune.placement.plan import Where


def coefficients(
    shape: LayerShape,
    engine: MoEExperts,
    device: Device,
    options: PlacementOptions,
    *,
    lora: LoraWeights | None,
    top_k: int,
) -> tuple[CostCoefficients, str]:
    """(coefficients, "defaults" | "cached" | "measured") for layers of `shape` (module docstring)."""
    if not options.calibrate:
        return CostCoefficients.defaults(shape), "defaults"
    cache = identity = None
    if options.calibration_cache_dir is not None:
        cache = calib.CalibrationCache(options.calibration_cache_dir)
        ctx = engine.ctx
        machine = calib.machine_fingerprint(engine_threads=ctx.num_threads, isa=ctx.isa, device=device.torch)
        ranks = {
            p: None if getattr(lora, p, None) is None else int(getattr(lora, p)[0].shape[-2])
            for p in ("gate", "up", "down")
        }
        identity = calib.CalibrationCache.identity(
            shape,
            machine,
            {
                "experts": engine.options.to_dict(),
                "top_k": top_k,
                "lora_ranks": ranks,
                "staging_buffers": options.staging_buffers,
                "device": device.torch.type,
            },
        )
        got = cache.load(identity)
        if got is not None:
            return got, "cached"
    measured = _in_thread(lambda: _measure(shape, engine, device, top_k, lora))
    if cache is not None:
        cache.save(identity, measured)
    if device.is_cuda:  # the calibration's buffers are not the run's memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device.torch)
    return measured, "measured"


def _measure(
    shape: LayerShape, engine: MoEExperts, device: Device, top_k: int, lora: LoraWeights | None
) -> CostCoefficients:
    cpu_time = calib.engine_timer(engine, top_k=top_k, lora=lora)
    kw = {}
    if device.is_cuda:
        chunk = 4 * shape.stored_bytes
        kw.update(
            copy_time=calib.cuda_copy_timer(device.torch, chunk),
            cpu_time_under_copy=calib.under_copies(cpu_time, device.torch, chunk_bytes=chunk),
        )
    return calib.calibrate(shape, top_k=top_k, cpu_time=cpu_time, gpu_time=gpu_timer(engine, device, top_k, lora), **kw)


def gpu_timer(engine: MoEExperts, device: Device, top_k: int, lora: LoraWeights | None):
    """gpu_time(phase, counts): the GPU experts of `engine` on resident weights, the compute
    stream's busy time as the placed op measures it; None (the defaults stay) when the layer's
    decoded experts would take more than a quarter of the free GPU memory."""
    E, H = engine.num_experts, engine.hidden_size
    nbytes = E * format_of(engine).decoded_bytes_per_expert
    if device.is_cuda and nbytes > torch.cuda.mem_get_info(device.torch)[0] // 4:
        return None
    runtime = GpuRuntime(device, GpuOptions(resident_budget_bytes=nbytes))
    gpu = GpuExperts(runtime, engine, layer_key="calibration")
    gpu.set_resident(torch.ones(E, dtype=torch.bool))
    planner = FixedPlanner(lambda key, counts, resident: Where.GPU_RESIDENT)
    lora = _clone_lora(lora, device.torch)
    gen = torch.Generator().manual_seed(1)

    def run(phase: str, counts) -> float:
        ids = calib.routing_from_counts(counts, top_k)
        T = ids.shape[0]
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device.torch).requires_grad_(True)
        w = torch.softmax(torch.randn(T, top_k, generator=gen), dim=-1).to(device.torch)
        planner.observed.clear()
        out = placed_moe_experts(engine, x, ids.to(device.torch), w, lora, planner=planner, gpu=gpu)
        if phase == "backward":
            out.backward(torch.ones_like(out))
        flush_timings(runtime)
        want = "backward" if phase == "backward" else "forward"
        return [t["gpu"] for _, _, t in planner.observed if t["phase"] == want][-1]

    run.keep_alive = (runtime, gpu)  # the resident pool lives as long as the timer
    return run


def _clone_lora(lora: LoraWeights | None, device: torch.device) -> LoraWeights | None:
    """Detached copies of the LoRA factors on `device` (timings must not touch the real ones)."""
    if lora is None:
        return None

    def c(pair):
        return None if pair is None else tuple(t.detach().to(device).clone().requires_grad_(True) for t in pair)

    return LoraWeights(gate=c(lora.gate), up=c(lora.up), down=c(lora.down), scaling=lora.scaling)


def _in_thread(fn: Callable):
    """fn() in a fresh thread (default autograd state: grad on, no saved-tensor hooks), its
    result or exception returned / raised here."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name="moetune-placement-calibration")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
