"""A timeline of the placement machinery as a Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev).

Spans are (lane, name, start, duration) on four lanes: the Python (training) thread, the CPU
engine, the GPU compute stream and the GPU copy stream. They are written as complete events
("ph": "X", microseconds since the trace started) in {"traceEvents": [...]}, with the host lanes
in process 1 and the GPU lanes in process 2, one thread id per lane, and "M" metadata events
naming them, so one timeline shows them side by side.

Host spans use time.perf_counter (the default clock). GPU spans come from CUDA events
(`add_cuda`): they are resolved at `flush_cuda()` (after the events completed, e.g. at the end of
a step) against an anchor, a CUDA event recorded while the host read the clock with the device
idle (`cuda_anchor`), so GPU times land on the host time axis: t = anchor_host +
anchor_event.elapsed_time(event). Re-anchor now and then (each step) to bound clock drift.

Disabled (`Trace(enabled=False)`, the default for training without --trace) every method returns
at once; `span()` hands back one shared no-op context manager.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from collections.abc import Callable
from typing import Any


class Lane(enum.Enum):
    PYTHON = "python thread"
    CPU_ENGINE = "CPU engine"
    GPU_COMPUTE = "GPU compute stream"
    GPU_COPY = "GPU copy stream"


# (pid, tid) of each lane: host lanes in process 1, GPU lanes in process 2.
LANE_IDS = {Lane.PYTHON: (1, 1), Lane.CPU_ENGINE: (1, 2), Lane.GPU_COMPUTE: (2, 1), Lane.GPU_COPY: (2, 2)}
PROCESS_NAMES = {1: "host", 2: "GPU"}

_NULL = contextlib.nullcontext()


class Trace:
    """Recorded spans; `write(path)` produces the JSON trace. max_events bounds memory (later
    spans are dropped and counted in `dropped`). Not thread-safe: record from one thread, or
    give each thread its own Trace and merge their events()."""

    def __init__(
        self, enabled: bool = True, *, clock: Callable[[], float] = time.perf_counter, max_events: int = 2_000_000
    ):
        self.enabled = bool(enabled)
        self.clock = clock
        self.origin = clock()
        self.max_events = int(max_events)
        self.dropped = 0
        self._events: list[dict[str, Any]] = []
        self._pending_cuda: list[tuple] = []
        self._anchor = None  # (event, host seconds)

    def add(self, lane: Lane, name: str, start_s: float, duration_s: float, args: dict[str, Any] | None = None) -> None:
        """A span on `lane` from start_s (this trace's clock, seconds) lasting duration_s."""
        if not self.enabled:
            return
        if len(self._events) >= self.max_events:
            self.dropped += 1
            return
        pid, tid = LANE_IDS[lane]
        ev = {
            "name": str(name),
            "ph": "X",
            "ts": (start_s - self.origin) * 1e6,
            "dur": max(0.0, duration_s) * 1e6,
            "pid": pid,
            "tid": tid,
        }
        if args:
            ev["args"] = dict(args)
        self._events.append(ev)

    def span(self, lane: Lane, name: str, args: dict[str, Any] | None = None):
        """Context manager recording the enclosed block as a span (a shared no-op when disabled)."""
        if not self.enabled:
            return _NULL
        return self._span(lane, name, args)

    @contextlib.contextmanager
    def _span(self, lane, name, args):
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(lane, name, t0, self.clock() - t0, args)

    # CUDA ---------------------------------------------------------------------------------
    def set_anchor(self, event, host_s: float) -> None:
        """`event` (anything with elapsed_time(other) in ms, e.g. torch.cuda.Event) completed at
        host time host_s."""
        self._anchor = (event, float(host_s))

    def cuda_anchor(self, device=None) -> None:
        """Anchors GPU time to this trace's clock: synchronizes, records an event, waits for it
        and reads the clock (the device is idle, so the event's time is the host's)."""
        if not self.enabled:
            return
        import torch

        torch.cuda.synchronize(device)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        self.set_anchor(ev, self.clock())

    def add_cuda(self, lane: Lane, name: str, start_event, end_event, args: dict[str, Any] | None = None) -> None:
        """A span between two CUDA events (recorded with enable_timing=True); resolved at flush_cuda()."""
        if not self.enabled:
            return
        self._pending_cuda.append((lane, name, start_event, end_event, args))

    def flush_cuda(self) -> None:
        """Turns the pending CUDA spans into events (their events must have completed)."""
        if not self._pending_cuda:
            return
        if self._anchor is None:
            raise RuntimeError("Trace.flush_cuda: no anchor; call cuda_anchor() (or set_anchor) first")
        anchor, host = self._anchor
        for lane, name, start, end, args in self._pending_cuda:
            t0 = host + anchor.elapsed_time(start) / 1e3
            self.add(lane, name, t0, start.elapsed_time(end) / 1e3, args)
        self._pending_cuda.clear()

    # output -------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """The trace events: lane metadata ("M") followed by the recorded spans ("X")."""
        meta = []
        for pid, pname in PROCESS_NAMES.items():
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": pname}})
        for lane, (pid, tid) in LANE_IDS.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane.value}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        return meta + list(self._events)

    def write(self, path: str) -> str:
        """Writes the JSON trace (atomically: temp + rename); pending CUDA spans are flushed first."""
        self.flush_cuda()
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(
                {
                    "traceEvents": self.events(),
                    "displayTimeUnit": "ms",
                    "otherData": {"producer": "moetune.placement.trace", "dropped_events": self.dropped},
                },
                fh,
            )
        os.replace(tmp, path)
        return path

    def drop_before(self, t_s: float) -> None:
        """Forgets the recorded spans that start before t_s (this trace's clock, seconds): keeps a
        long run's trace to its last steps."""
        cut = (t_s - self.origin) * 1e6
        self._events = [e for e in self._events if e["ts"] >= cut]

    def clear(self) -> None:
        self._events.clear()
        self._pending_cuda.clear()
        self.dropped = 0
