"""Where each routed expert of one MoE layer runs in one step (the scheduler's output, the GPU
path's input)."""

from __future__ import annotations

import dataclasses
import enum

import torch


class Where(enum.IntEnum):
    CPU = 0  # the CPU engine (moetune.MoEExperts), unchanged results
    GPU_RESIDENT = 1  # weights already held on the GPU (ResidentStore)
    GPU_STREAMED = 2  # weights copied to the GPU for this call (staging buffers), then dropped


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """where: int8 CPU tensor [E] of Where values. counts: int64 CPU tensor [E], routed (token, slot)
    pairs per expert in this call. predicted: the scheduler's predicted seconds, keys
    "cpu", "gpu", "copy" (empty when the plan was not made by the cost model)."""

    where: torch.Tensor
    counts: torch.Tensor
    predicted: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def cpu_mask(self) -> torch.Tensor:  # bool [E]: experts the CPU engine computes
        return self.where == int(Where.CPU)

    def experts(self, where: Where) -> torch.Tensor:  # int64 ids, ascending
        return torch.nonzero(self.where == int(where)).flatten()

    @staticmethod
    def uniform(counts: torch.Tensor, where: Where) -> LayerPlan:
        return LayerPlan(torch.full((counts.numel(),), int(where), dtype=torch.int8), counts.to(torch.int64))
