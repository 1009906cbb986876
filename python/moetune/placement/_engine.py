"""The placement package's only window into the CPU engine's internals.

Everything the GPU path needs from `moetune.MoEExperts` beyond its public API lives here, so
that a change of the engine's Python layer (typed options, packed-buffer strides, ...) is
re-pointed in one file:

- `packed_buffers(experts)`: the engine's own packed weight buffers as zero-copy uint8 CPU
  tensors (what is streamed to the GPU; no second host copy), by name ("gate.bf16", "up.q",
  "down.scales", ...), plus the layout version they follow.
- `activation(experts)`, `biases(experts)`: the expert math's parameters.
- `CpuJob`: one engine forward (with an expert mask, fp32 output) and its backward, queued on
  the engine's Context so that the caller can run GPU work meanwhile. It mirrors what
  `moetune.engine._Submit/_Wait` do for `moe_experts` (host copies of the inputs, the saved
  handle, keeping the buffers the job writes alive until it is waited on).
- `busy_seconds(ctx)`: the engine's accumulated phase time (the CPU-time measurement).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from moetune import _moetune_ext as _ext
from moetune.engine import MoEExperts, _host

# The packed layouts formats.py decodes (kernels/gemm.h panels, kernels/quant.h).
DECODED_LAYOUT_VERSION = 1


def check_layout() -> None:
    if _ext.PACKED_LAYOUT_VERSION != DECODED_LAYOUT_VERSION:
        raise NotImplementedError(
            f"moetune.placement decodes packed layout version {DECODED_LAYOUT_VERSION}, the engine packs "
            f"version {_ext.PACKED_LAYOUT_VERSION}: update placement/formats.py")


def packed_buffers(experts: MoEExperts) -> Dict[str, torch.Tensor]:
    """name -> uint8 CPU tensor over the engine's own memory (no copy). Each view keeps the
    engine object alive; the memory moves only if the experts are re-created."""
    check_layout()
    return {name: torch.from_numpy(arr) for name, arr in experts._ex.packed_buffers()}


def activation(experts: MoEExperts) -> Tuple[str, float, float]:
    """(kind, alpha, limit): kind "swiglu" or "gpt_oss" (alpha, limit used by gpt_oss only)."""
    return experts.activation, float(experts.alpha), float(experts.limit)


def biases(experts: MoEExperts) -> Tuple[Optional[torch.Tensor], ...]:
    """(gate [E, I], up [E, I], down [E, H]) fp32 CPU tensors or None: the engine's frozen biases."""
    return tuple(experts.biases)


def busy_seconds(ctx) -> float:
    """Seconds the engine of `ctx` (a moetune.Context) has spent in its phases so far. Jobs of a
    Context run one at a time, so the difference around one job is that job's busy time."""
    return float(sum(sec for _name, sec, _calls in ctx._ctx.phase_profile()))


class CpuJob:
    """One engine forward restricted to `expert_mask` (fp32 output on the host), then optionally
    its backward. Thread-compatible like moe_experts: one caller drives it.

    x, topk_ids, topk_weights: any device (copied to the host as moe_experts does); lora: the
    six LoRA tensors (A_gate, B_gate, A_up, B_up, A_down, B_down, None where absent).
    pinned: allocate the host outputs in page-locked memory (for fast uploads to a GPU).
    """

    def __init__(self, experts: MoEExperts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 expert_mask: torch.Tensor, lora: Sequence[Optional[torch.Tensor]], scaling: float, *,
                 pinned: bool = False):
        self.experts, self.scaling, self.pinned = experts, float(scaling), pinned
        self.job = self.bwd_job = None
        xh = _host(x)
        ids = topk_ids.detach().to("cpu").contiguous()
        wh = _host(topk_weights)
        mask = expert_mask.detach().to("cpu", torch.bool).contiguous()
        self.lora_h = [None if t is None else _host(t) for t in lora]
        self.k = ids.shape[1]
        self.out = torch.empty(xh.shape, dtype=torch.float32, pin_memory=pinned)
        self.busy0 = busy_seconds(experts.ctx)
        self.handle, self.job = experts._ex.forward(xh, ids, wh, mask, *self.lora_h, self.scaling, self.out)
        self.keep = (xh, ids, wh, mask)  # read by the engine until the job is waited on
        self.grads = None

    def wait_forward(self) -> Tuple[torch.Tensor, float]:
        """(out fp32 [T, H] host, busy seconds of the job)."""
        self.job.wait()
        self.job = self.keep = None
        out, self.out = self.out, None
        return out, busy_seconds(self.experts.ctx) - self.busy0

    def submit_backward(self, grad_out: torch.Tensor, need_dx: bool, need_dw: bool,
                        need_lora: Sequence[bool]) -> None:
        if self.bwd_job is not None:
            raise RuntimeError("moetune.placement: a backward of this engine call is already running")
        g = _host(grad_out)
        T, H = g.shape
        pin = self.pinned
        dx = torch.empty((T, H), dtype=torch.float32, pin_memory=pin) if need_dx else None
        dw = torch.empty((T, self.k), dtype=torch.float32, pin_memory=pin) if need_dw else None
        grads: List[Optional[torch.Tensor]] = [
            torch.empty(t.shape, dtype=torch.float32, pin_memory=pin) if (t is not None and n) else None
            for t, n in zip(self.lora_h, need_lora)]
        self.busy0 = busy_seconds(self.experts.ctx)
        self.bwd_job = self.experts._ex.backward(self.handle, g, *self.lora_h, self.scaling, dx, dw, *grads)
        self.grads = (dx, dw, grads)
        self.keep = g

    def wait_backward(self):
        """((dx fp32 [T, H] | None, dw fp32 [T, k] | None, [LoRA grads fp32 | None] x 6), busy seconds);
        the LoRA grads of experts outside the mask are exact zeros."""
        self.bwd_job.wait()
        self.bwd_job = self.keep = None
        grads, self.grads = self.grads, None
        return grads, busy_seconds(self.experts.ctx) - self.busy0

    def __del__(self):
        # A queued job writes into buffers this object owns: never free them under it (autograd
        # may drop a half-run recompute, or an output may never be waited on).
        for name in ("job", "bwd_job"):
            job = getattr(self, name, None)
            if job is not None:
                try:
                    job.wait()
                except Exception:  # its error was (or will be) reported where it was awaited
                    pass
