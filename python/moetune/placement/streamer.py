"""Streaming experts to the GPU in their stored format: reusable staging, a copy stream, events.

A `Streamer` serves the layers of one PackedFormat (shapes + weight format), one call at a time.
It owns `buffers` raw staging slots, each sized for `chunk_experts` experts in their STORED
format (bf16 panels, or int8/int4 values + scales: fewer bytes over PCIe), plus one decoded bf16
staging set for a chunk. `stream(host, chunks)` yields each chunk's decoded weights in order:

  copy stream:    copy chunk i into slot i % buffers (after the decode of chunk i - buffers freed
                  that slot: an event wait), record "copied i"
  compute stream: wait "copied i", decode chunk i (formats.py) into the decoded staging, record
                  "slot free", then the caller's compute of chunk i; the copy of chunk
                  i + buffers is issued right after the decode of chunk i

so with buffers >= 2 the copy of chunk i + 1 overlaps the decode + compute of chunk i. Every
launch is asynchronous: the host only enqueues (no host sync). The decoded staging is reused by
the next chunk; its reuse is ordered by the compute stream itself (decode i + 1 is enqueued after
compute i). With keep=True each chunk is decoded into fresh device tensors instead, which the
caller may hold (the keep slot between a checkpoint recompute and its backward).

The host side is the engine's own packed buffers ([E, stride] uint8 views, page-locked in place
by the caller, see device.py): nothing is copied on the host. Consecutive expert ids of a chunk
move in one copy per buffer. On the CPU stand-in the same code does plain copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moetune.placement.device import Device
from moetune.placement.formats import PROJS, PackedFormat


def _runs(experts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(j0, j1, e0): staging rows [j0, j1) hold experts e0 .. e0 + j1 - j0 - 1 (consecutive ids)."""
    runs: list[tuple[int, int, int]] = []
    for j, e in enumerate(experts):
        if runs and runs[-1][2] + (j - runs[-1][0]) == e:
            runs[-1] = (runs[-1][0], j + 1, runs[-1][2])
        else:
            runs.append((j, j + 1, e))
    return runs


class Streamer:
    def __init__(self, device: Device, fmt: PackedFormat, chunk_experts: int, buffers: int = 3):
        if chunk_experts < 1 or buffers < 1:
            raise ValueError(f"Streamer needs chunk_experts >= 1 and buffers >= 1, got {chunk_experts}, {buffers}")
        self.device, self.fmt = device, fmt
        self.chunk_experts, self.buffers = int(chunk_experts), int(buffers)
        dev = device.torch
        self._raw = [
            {n: torch.empty((chunk_experts, fmt.expert_bytes(n)), dtype=torch.uint8, device=dev) for n in fmt.names}
            for _ in range(buffers)
        ]
        self._decoded = fmt.empty_decoded(chunk_experts, dev)
        self._free: list[object | None] = [None] * buffers  # per slot: event after its last decode
        self._busy = False
        self.bytes_copied = 0  # stored-format bytes moved host -> device (all calls)

    @property
    def staging_bytes(self) -> int:
        """Device memory held by the staging buffers."""
        return sum(t.numel() for slot in self._raw for t in slot.values()) + sum(
            t.numel() * t.element_size() for t in self._decoded
        )

    def stream(
        self,
        host: dict[str, torch.Tensor],
        chunks: Sequence[Sequence[int]],
        *,
        keep: bool = False,
        copy_events: list | None = None,
        timing: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yields (gate [c, I, H], up [c, I, H], down [c, H, I]) bf16 on the device for each chunk
        of expert ids (each chunk at most chunk_experts long).

        host: the layer's buffers as [E, stride] uint8 CPU views (PackedFormat.host_views).
        keep: decode into fresh tensors (the caller may keep them) instead of the staging.
        copy_events: if given, gets one (start, end) event pair per chunk on the copy stream
        (timing=True makes them timing events)."""
        for c in chunks:
            if not 0 < len(c) <= self.chunk_experts:
                raise ValueError(f"a streamed chunk has {len(c)} experts; this streamer takes 1..{self.chunk_experts}")
        if self._busy:
            raise RuntimeError("moetune.placement: this Streamer is already streaming (one call at a time)")
        self._busy = True
        try:
            yield from self._stream(host, chunks, keep, copy_events, timing)
        finally:
            self._busy = False

    def _stream(self, host, chunks, keep, copy_events, timing):
        dev, nb, fmt = self.device, self.buffers, self.fmt
        copied: list[object | None] = [None] * len(chunks)

        def issue(i: int) -> None:
            slot = i % nb
            cs = dev.copy_stream
            if self._free[slot] is not None:
                dev.wait(self._free[slot], cs)
            start, end = dev.event(timing), dev.event(timing)
            dev.record(start, cs)
            runs = _runs(chunks[i])
            with dev.on(cs):
                for name, dst in self._raw[slot].items():
                    src = host[name]
                    for j0, j1, e0 in runs:
                        dst[j0:j1].copy_(src[e0 : e0 + j1 - j0], non_blocking=True)
                        self.bytes_copied += (j1 - j0) * dst.shape[1]
            dev.record(end, cs)
            copied[i] = end
            if copy_events is not None:
                copy_events.append((start, end))

        for i in range(min(nb, len(chunks))):
            issue(i)
        for i, chunk in enumerate(chunks):
            n = len(chunk)
            dev.wait(copied[i])
            raw = {name: t[:n] for name, t in self._raw[i % nb].items()}
            outs = fmt.empty_decoded(n, dev.torch) if keep else tuple(d[:n] for d in self._decoded)
            W = tuple(fmt.decode(p, raw, out=o) for p, o in zip(PROJS, outs))
            free = dev.event()
            dev.record(free)
            self._free[i % nb] = free
            if i + nb < len(chunks):
                issue(i + nb)
            yield W
