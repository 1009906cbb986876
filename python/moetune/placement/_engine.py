"""The placement package's only window into the CPU engine's internals.

Everything the GPU path needs from `moetune.MoEExperts` beyond its public API lives here, so
that a change of the engine's Python layer (typed options, packed-buffer strides, ...) is
re-pointed in one file:

- `packed_buffers(experts)`: the engine's own packed weight buffers as zero-copy uint8 CPU
  tensors (what is streamed to the GPU; no second host copy), by name ("gate.bf16", "up.q",
  "down.scales", ...), plus the layout version they follow.
- `activation(experts)`, `biases(experts)`: the expert math's parameters.
- `cpu_call`: the CPU share of a split layer, an `moetune.engine.EngineCall` (the one
  mechanism that queues engine jobs and keeps their buffers alive) with an expert mask and
  fp32 outputs; `EngineCall.busy_seconds` is the CPU-time measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moetune import _moetune_ext as _ext
from moetune.engine import EngineCall, MoEExperts

# The packed layouts formats.py decodes (kernels/gemm.h panels, kernels/quant.h).
DECODED_LAYOUT_VERSION = 1


def check_layout() -> None:
    if _ext.PACKED_LAYOUT_VERSION != DECODED_LAYOUT_VERSION:
        raise NotImplementedError(
            f"moetune.placement decodes packed layout version {DECODED_LAYOUT_VERSION}, the engine packs "
            f"version {_ext.PACKED_LAYOUT_VERSION}: update placement/formats.py"
        )


def packed_buffers(experts: MoEExperts) -> dict[str, torch.Tensor]:
    """name -> uint8 CPU tensor over the engine's own memory (no copy). Each view keeps the
    engine object alive; the memory moves only if the experts are re-created."""
    check_layout()
    return {b.name: torch.from_numpy(b.array) for b in experts.packed_buffers()}


def memory_owner(experts: MoEExperts):
    """The object whose lifetime bounds the packed buffers' memory (the C++ experts)."""
    return experts._ex


def activation(experts: MoEExperts) -> tuple[str, float, float]:
    """(kind, alpha, limit): kind "swiglu" or "gpt_oss" (alpha, limit used by gpt_oss only)."""
    o = experts.options
    return o.activation, float(o.alpha), float(o.limit)


def biases(experts: MoEExperts) -> tuple[torch.Tensor | None, ...]:
    """(gate [E, I], up [E, I], down [E, H]) fp32 CPU tensors or None: the engine's frozen biases."""
    return tuple(experts.biases)


def cpu_call(
    experts: MoEExperts,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_mask: torch.Tensor,
    lora: Sequence[torch.Tensor | None],
    scaling: float,
    *,
    pinned: bool = False,
) -> EngineCall:
    """The CPU share of a split layer: one engine forward restricted to `expert_mask`, fp32
    output on the host (pinned for fast uploads when `pinned`); its backward gives fp32 dx."""
    return EngineCall(
        experts, x, topk_ids, topk_weights, expert_mask, lora, scaling, out_dtype=torch.float32, pinned=pinned
    )
