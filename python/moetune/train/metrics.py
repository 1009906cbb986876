"""What a run shows and records while it trains: the progress bar (tqdm),
metrics.jsonl (one JSON object per logged step / eval) and TensorBoard events
(tensorboardX: a small pure-Python writer, no TensorFlow / tensorboard server
needed to write). Peak-memory probes for the summary live here too."""

from __future__ import annotations

import json
import os
import resource
import sys
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

    def __init__(self, output_dir: str, *, tensorboard: bool, resume_step: int | None):
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
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print(
                    "moetune train: tensorboardX is not installed; no TensorBoard events (pip install tensorboardX)",
                    file=sys.stderr,
                )
            else:
                self.tb = SummaryWriter(
                    os.path.join(output_dir, "tensorboard"),
                    purge_step=resume_step + 1 if resume_step is not None else None,
                )

    def log(self, kind: str, step: int, **values) -> None:
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.records.append(rec)
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A tqdm bar over optimizer steps (ETA from tqdm's rate) or nothing."""

    def __init__(self, enabled: bool, total: int, initial: int, fallback=print):
        self.bar = None
        self._fallback = fallback
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train"
            )

    def update(self, *, loss: float, lr: float, tokens_per_s: float, expert_share: float, placement: str = "") -> None:
        """placement: the expert placement's short step text (PlacementMetrics.progress), if any."""
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                f"experts {100 * expert_share:.0f}%" + (f"  {placement}" if placement else ""),
                refresh=False,
            )
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self._fallback(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
