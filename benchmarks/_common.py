"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`,
which puts this folder on sys.path)."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable


def cpu_name() -> str:
    """The CPU model as lscpu names it (platform.processor() where lscpu fails)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor()


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (bytes); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def time_fwd_bwd(forward: Callable, dout, params: Iterable, reps: int) -> tuple[float, float]:
    """Median forward and backward seconds over `reps` steps after one warm-up. Each step is
    a training step after optimizer.zero_grad(): the grads of `params` are set to None (fresh
    grads, no accumulation), then forward() runs and its output is backpropagated with dout."""
    params = list(params)
    fw, bw = [], []
    for rep in range(reps + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        if rep:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
    return statistics.median(fw), statistics.median(bw)
