"""The placement cost model written out the obvious way (plain Python loops over experts), and
the exhaustive search over placements, for the placement tests to compare against."""

import itertools

import numpy as np

from moetune.placement.plan import Where


def reference_makespan(shape, coeffs, counts, where, phase, *, copies=True, staging=2, scales=None, slowdown=None):
    """The model written out term by term, with plain Python loops (the obvious way)."""
    scales = scales or {}
    p = "backward" if phase == "backward" else "forward"
    c = getattr(coeffs, p)
    sc, sg = scales.get(f"cpu/{p}", 1.0), scales.get(f"gpu/{p}", 1.0)
    s = coeffs.cpu_slowdown if slowdown is None else slowdown
    X = R = G = 0.0
    m = 0
    any_cpu = any_gpu = False
    dq = c.dequant if shape.weight_format != "bf16" else 0.0
    res_dq = dq if (shape.weight_format != "bf16" and shape.resident_size < shape.gpu_bytes) else 0.0
    for n, w in zip(counts, where):
        if n == 0:
            continue
        if w == Where.CPU:
            X += (c.cpu_expert + c.cpu_token * n) * sc
            any_cpu = True
        elif w == Where.GPU_RESIDENT:
            R += (c.gpu_expert + c.gpu_token * n + res_dq) * sg
            any_gpu = True
        else:
            G += (c.gpu_expert + c.gpu_token * n + dq) * sg
            m += 1
            any_gpu = True
    if any_cpu:
        X += c.cpu_call * sc
    cp = (coeffs.copy_latency + shape.stored_bytes / coeffs.copy_bandwidth) * scales.get("copy", 1.0) if copies else 0.0
    C = m * cp
    if not any_gpu:
        Y = 0.0
    elif m == 0:
        Y = c.gpu_call * sg + R
    elif staging >= 2:
        Y = c.gpu_call * sg + max(C + G / m, max(cp, R) + G)
    else:
        Y = c.gpu_call * sg + max(cp, R) + (C - cp) + G
    Xe = X * s if X * s <= C else X + C * (1 - 1 / s)
    return max(Xe, Y), Xe, Y, C


def reference_objective(shape, coeffs, counts, where, phases, *, copies, staging=2, scales=None, slowdown=None):
    """Sum over the charged phases (phase -> weight) of the reference makespan."""
    return sum(
        w
        * reference_makespan(
            shape, coeffs, counts, where, p, copies=copies(p), staging=staging, scales=scales, slowdown=slowdown
        )[0]
        for p, w in phases.items()
    )


def brute_force(shape, coeffs, counts, resident, phases, *, copies, staging=2, cap=None, scales=None, slowdown=None):
    """(best objective, its placement) over every CPU/GPU choice of the experts with pairs (a GPU
    expert is GPU_RESIDENT if resident, else GPU_STREAMED; at most `cap` streamed)."""
    counts = np.asarray(counts)
    resident = np.asarray(resident, dtype=bool)
    active = np.flatnonzero(counts > 0)
    best, best_where = np.inf, None
    for choice in itertools.product((False, True), repeat=active.size):
        where = np.zeros(counts.size, dtype=np.int8)
        for e, on_gpu in zip(active, choice):
            if on_gpu:
                where[e] = Where.GPU_RESIDENT if resident[e] else Where.GPU_STREAMED
        if cap is not None and int((where == Where.GPU_STREAMED).sum()) > cap:
            continue
        obj = reference_objective(
            shape, coeffs, counts, where, phases, copies=copies, staging=staging, scales=scales, slowdown=slowdown
        )
        if obj < best:
            best, best_where = obj, where
    return best, best_where
