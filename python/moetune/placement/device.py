"""The GPU path's device: streams, events, host uploads and pinning of memory it does not own.

`Device("cuda:0")` wraps a CUDA device with a dedicated copy stream; `Device("cpu")` is the CI
stand-in on which the same GPU-path code runs: copies are plain tensor copies, streams are
absent (`None`), and events are host timestamps (the work they bracket is synchronous there, so
their elapsed times are real). Code written against this class never calls torch.cuda directly.

Contracts:
- compute work goes on the caller's current stream (`compute_stream()`), copies of streamed
  weights on `copy_stream`; ordering between them only through events (`record`, `wait`).
- `upload(host)` copies a host tensor to the device without a host sync on CUDA (through
  page-locked memory); `host_empty(...)` allocates page-locked host memory on CUDA.
- `register_host(owner, ranges)` page-locks memory owned by someone else (the engine's packed
  buffers) in place, so that streaming needs no second host copy; it is undone when `owner` is
  garbage-collected (weakref.finalize, i.e. before the owner's attributes and so the engine
  buffers are released), by `HostRegistration.release()` or by `unregister_host(owner)`.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
import weakref
from collections.abc import Iterable

import torch

_NOT_PAGE_ALIGNED = -1  # our own code in HostRegistration.failed: the range does not start on a page


class HostEvent:
    """CPU stand-in of torch.cuda.Event: a host timestamp (work on the CPU device is synchronous)."""

    __slots__ = ("t",)

    def __init__(self):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:  # milliseconds, as torch.cuda.Event
        return (end.t - self.t) * 1e3


class Device:
    """A CUDA device (with a copy stream) or the CPU stand-in. One per GpuRuntime."""

    def __init__(self, device="cuda"):
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"moetune.placement: device {device!r} requested but CUDA is not available")
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        elif dev.type != "cpu":
            raise ValueError(f"moetune.placement: device must be 'cuda[:i]' or 'cpu' (the stand-in), got {device!r}")
        self.torch = dev
        self.is_cuda = dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(dev) if self.is_cuda else None
        self._registrations = weakref.WeakKeyDictionary()  # owner -> HostRegistration (one per owner)

    def __repr__(self) -> str:
        return f"moetune.placement.Device({self.torch})"

    def compute_stream(self):
        return torch.cuda.current_stream(self.torch) if self.is_cuda else None

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.is_cuda else HostEvent()

    def record(self, event, stream=None) -> None:
        """Records `event` on `stream` (default: the compute stream)."""
        if self.is_cuda:
            event.record(stream if stream is not None else self.compute_stream())
        else:
            event.record()

    def wait(self, event, stream=None) -> None:
        """Makes `stream` (default: the compute stream) wait for `event` (no host sync)."""
        if self.is_cuda:
            (stream if stream is not None else self.compute_stream()).wait_event(event)

    def on(self, stream):
        """Context manager running torch ops on `stream` (no-op on the CPU stand-in)."""
        return torch.cuda.stream(stream) if (self.is_cuda and stream is not None) else contextlib.nullcontext()

    def host_empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A device copy of a CPU tensor, without a host sync on CUDA (staged through page-locked
        memory when `host` is not page-locked itself)."""
        if not self.is_cuda:
            return host
        if not host.is_pinned():
            host = host.pin_memory()
        return host.to(self.torch, non_blocking=True)

    def download_async(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` without a host sync: page-locked, filled by the compute stream, so
        valid once an event recorded after this call has completed (CPU stand-in: a plain copy)."""
        if not self.is_cuda:
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def register_host(
        self, owner, ranges: Iterable[tuple[int, int]], what: str = "host memory", keepalive=None
    ) -> HostRegistration:
        """Page-locks [ptr, ptr + nbytes) ranges in place for the lifetime of `owner` (CUDA only;
        a no-op registration on the CPU stand-in). On failure: a warning, and copies from that
        memory stay correct but pageable (slower). One registration per owner: a second call for
        the same owner returns the first (its memory is page-locked already)."""
        reg = self._registrations.get(owner)
        if reg is None:
            reg = self._registrations[owner] = HostRegistration(self, owner, list(ranges), what, keepalive)
        return reg

    def unregister_host(self, owner) -> None:
        """Undoes `register_host(owner, ...)` now rather than when `owner` is collected (a layer's
        experts were replaced while the old engine may still be referenced); no-op if none."""
        reg = self._registrations.pop(owner, None)
        if reg is not None:
            reg.release()


class HostRegistration:
    """cudaHostRegister'ed ranges of memory owned by `owner`.

    Only whole pages that the given ranges own are locked: each range must start on a page and
    its allocation must fill its last page (the engine's weight buffers are allocated so,
    WeightStore::kBufferAlign). Rounding out to pages instead would also lock the neighbouring
    allocations that share those pages, and a copy from memory that is only partly registered
    fails (cudaErrorInvalidValue) — an unrelated tensor's copy, later. A range that is not page
    aligned is left pageable (a warning; copies stay correct, slower). `keepalive` (the object
    owning the memory) is held until the ranges are unregistered, so the memory cannot be freed
    while it is still registered."""

    def __init__(self, device: Device, owner, ranges: list[tuple[int, int]], what: str, keepalive=None):
        self.registered: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int, int]] = []
        self._finalizer = None
        if not device.is_cuda or not ranges:
            return
        cudart = torch.cuda.cudart()
        page = os.sysconf("SC_PAGE_SIZE")
        merged: list[list[int]] = []
        for ptr, nbytes in sorted((p, n) for p, n in ranges if n > 0):
            if ptr % page:
                self.failed.append((ptr, nbytes, _NOT_PAGE_ALIGNED))
                continue
            lo, hi = ptr, ptr + -(-nbytes // page) * page
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        with torch.cuda.device(device.torch):
            for lo, hi in merged:
                err = int(cudart.cudaHostRegister(lo, hi - lo, 0))
                if err == 0:
                    self.registered.append((lo, hi - lo))
                else:
                    self.failed.append((lo, hi - lo, err))
        if any(e != _NOT_PAGE_ALIGNED for _, _, e in self.failed):
            _drain_cuda_error(device.torch)
        if self.failed:
            warnings.warn(
                f"moetune.placement: could not page-lock {len(self.failed)} range(s) of {what} "
                f"(errors {sorted({e for _, _, e in self.failed})}; {_NOT_PAGE_ALIGNED} = not page "
                "aligned): streaming from them uses pageable copies (correct, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.registered:
            self._finalizer = weakref.finalize(owner, _unregister, device.torch, list(self.registered), keepalive)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.registered)

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


def _drain_cuda_error(device: torch.device) -> None:
    """A failed cudaHostRegister leaves its error as the runtime's last error; torch's next kernel
    launch check would report it against an unrelated op. A trivial launch consumes it here."""
    try:
        torch.ones(1, dtype=torch.uint8, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass


def _unregister(device: torch.device, ranges: list[tuple[int, int]], keepalive=None) -> None:
    """Unregisters `ranges` (keepalive, the memory's owner, is released only after this)."""
    try:
        cudart = torch.cuda.cudart()
        with torch.cuda.device(device):
            errors = [int(cudart.cudaHostUnregister(ptr)) for ptr, _ in ranges]
        if any(errors):
            _drain_cuda_error(device)
    except Exception:  # interpreter shutdown after CUDA teardown: the process is going away anyway
        pass
