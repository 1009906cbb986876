"""What a run records while it trains: metrics.jsonl (one JSON object per
logged step / eval), forwarded to the experiment trackers (moetune.train.
trackers: TensorBoard events by default). The progress bar / lines are
moetune.train.progress. Peak-memory probes for the summary live here too."""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import torch


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(devices, placement=None) -> int | None:
    """Sum of the peak allocated bytes of the CUDA devices among `devices` (None: none). The
    placement's device reports its run-wide peak from the placement's memory probe (which resets
    the CUDA peak counters at each residency refresh)."""
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda:
        return None
    own = placement.peak_gpu_bytes() if placement is not None else None
    total = 0
    for d in cuda:
        peak = int(torch.cuda.max_memory_allocated(d))
        if (
            own is not None
            and torch.device(d.type, torch.cuda.current_device() if d.index is None else d.index)
            == placement.device.torch
        ):
            peak = max(peak, own)
        total += peak
    return total


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, lines past the checkpoint's
    step are dropped so the file reads like one uninterrupted run."""

    def __init__(
        self,
        output_dir: str,
        *,
        tensorboard: bool,
        resume_step: int | None,
        report_to: list[str] | None = None,
        say=print,
    ):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as fh:
                for line in fh:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if r.get("step", 0) <= resume_step:
                        self.records.append(r)
        with open(self.path, "w") as fh:
            for r in self.records:
                fh.write(json.dumps(r) + "\n")
        self._fh = open(self.path, "a")
        from moetune.train import trackers

        names = trackers.resolve(["tensorboard"] if report_to is None else report_to, tensorboard)
        self.trackers = trackers.Trackers(names, output_dir, resume_step=resume_step, say=say)

    def log(self, kind: str, step: int, **values) -> None:
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.records.append(rec)
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        self.trackers.log(kind, step, values)

    def close(self) -> None:
        self._fh.close()
        self.trackers.finish()
