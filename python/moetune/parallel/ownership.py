"""Which rank owns which routed experts of each MoE layer (expert parallelism).

Every expert of a layer is owned by exactly one rank; only its owner holds its frozen
weights (host RAM) and trains its LoRA rows. `LayerOwnership` is one layer's assignment,
`by_index` the assignment before any routing has been observed (contiguous, sizes differ by
at most one: E need not be divisible by the number of ranks), `by_load` the one balanced by
observed routing load (per-expert token counts, e.g. a routing profile of the first batch):
greedy largest-first onto the least-loaded rank, ties broken by the lower rank, so every rank
computes the same assignment from the same counts.

An assignment is computed before the experts load (by index, or by a routing profile), and
may change during training: moetune.parallel.rebalance moves experts (packed buffers, LoRA rows,
optimizer state) between ranks to a by_load assignment of the routing observed since.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerOwnership:
    """owner[e]: the rank that owns expert e of this layer (E = len(owner)), world_size ranks."""

    owner: tuple[int, ...]
    world_size: int

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        bad = [(e, r) for e, r in enumerate(self.owner) if not 0 <= r < self.world_size]
        if bad:
            e, r = bad[0]
            raise ValueError(f"expert {e} owned by rank {r}, outside [0, {self.world_size})")

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def owned(self, rank: int) -> tuple[int, ...]:
        """The global ids of rank's experts, ascending (its engine's local ids 0.. in this order)."""
        return tuple(e for e, r in enumerate(self.owner) if r == rank)

    def owner_tensor(self) -> torch.Tensor:
        """int64 [E]: owner of each expert."""
        return torch.tensor(self.owner, dtype=torch.int64)

    def local_id_tensor(self) -> torch.Tensor:
        """int64 [E]: each expert's id in its owner's engine (its rank in owned(owner))."""
        seen = [0] * self.world_size
        out = []
        for r in self.owner:
            out.append(seen[r])
            seen[r] += 1
        return torch.tensor(out, dtype=torch.int64)


def by_index(num_experts: int, world_size: int) -> LayerOwnership:
    """Contiguous blocks by expert id: rank r owns [r*E//N, (r+1)*E//N) (sizes differ by <= 1)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    owner = []
    for r in range(world_size):
        owner += [r] * ((r + 1) * num_experts // world_size - r * num_experts // world_size)
    return LayerOwnership(tuple(owner), world_size)


def by_load(counts: Sequence[int] | torch.Tensor, world_size: int) -> LayerOwnership:
    """Balanced by observed load: experts by descending token count (ties: lower id first), each
    to the rank with the least load so far (ties: fewer experts, then the lower rank). counts:
    tokens routed to each expert (any non-negative numbers); all zeros gives a round-robin."""
    c = [float(x) for x in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    if not c:
        raise ValueError("by_load: no experts (empty counts)")
    if any(x < 0 for x in c):
        raise ValueError(f"by_load: negative token count in {c}")
    owner = [0] * len(c)
    heap = [(0.0, 0, r) for r in range(world_size)]  # (load, experts, rank)
    for e in sorted(range(len(c)), key=lambda e: (-c[e], e)):
        load, n, r = heapq.heappop(heap)
        owner[e] = r
        heapq.heappush(heap, (load + c[e], n + 1, r))
    return LayerOwnership(tuple(owner), world_size)


def load_per_rank(own: LayerOwnership, counts: Sequence[int] | torch.Tensor) -> list[float]:
    """Tokens each rank computes for this layer under `own` given per-expert counts."""
    c = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    out = [0.0] * own.world_size
    for e, r in enumerate(own.owner):
        out[r] += float(c[e])
    return out
