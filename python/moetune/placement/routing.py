"""Which (token, slot) rows the GPU computes, grouped for its GEMMs.

`GpuLayout.build` is a pure host function of one call's plan: the counts, the plan's placement,
the resident pool's slots and the streaming chunk size. It fixes the order of the GPU's rows:
resident experts first, in pool-slot order (their GEMMs run on the whole pool, with empty groups
for the slots this call does not use), then the streamed experts in ascending id, cut into chunks
of at most `chunk_experts` experts (one chunk = one set of staging buffers). Within an expert,
rows keep the (token, slot) order, as in the engine. Every size is known on the host (no device
sync): rows of segment s are [row0, row1) of the GPU rows, its active experts (those with rows,
whose LoRA rows are copied to the device) are [active0, active1) of `active`.

`GpuLayout.resident_all` is the one layout built without host counts (op.py's sync-free path for
a layer whose pool holds every expert): one resident segment over every row (n = T * k) and
every slot, its group sizes a device tensor (Segment.offs; empty groups allowed, also for the
LoRA GEMMs: every expert is "active").

`DeviceRows.build` turns the layout and topk_ids (on the device) into the row permutation with
device ops only (a stable argsort by expert position; no host sync): rows (index into the
flattened [T * k] slots), tok, the expert of each row, and row_of [T, k] (the row of each slot,
or n_rows - a zero row - for slots the GPU does not compute), which `combine` uses to sum the
rows back per token (deterministic: gathers and a reduction, no atomics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from moetune.placement.gemm import device_offsets as offsets_on_device
from moetune.placement.gemm import offsets
from moetune.placement.plan import LayerPlan, Where


@dataclasses.dataclass
class Segment:
    kind: Where  # GPU_RESIDENT or GPU_STREAMED
    experts: list[int]  # experts with rows here, in row order
    group_sizes: list[int]  # rows per weight group (resident: one per pool slot, zeros allowed)
    row0: int
    row1: int
    active0: int
    active1: int
    chunk: int = -1  # streamed: index of its chunk
    offs: torch.Tensor | None = None  # device int32 group ends when group_sizes is None (resident_all)

    @property
    def active_sizes(self) -> list[int] | None:
        return None if self.group_sizes is None else [s for s in self.group_sizes if s > 0]


@dataclasses.dataclass
class GpuLayout:
    segments: list[Segment]
    active: list[int]  # GPU experts with rows, in row order
    n_rows: int
    position: torch.Tensor  # int64 [E] host: rank of each expert in `active`, len(active) if none

    @property
    def streamed_chunks(self) -> list[list[int]]:
        return [s.experts for s in self.segments if s.kind == Where.GPU_STREAMED]

    @staticmethod
    def build(plan: LayerPlan, slot_expert: Sequence[int], chunk_experts: int) -> GpuLayout:
        """slot_expert: the resident pool's expert per slot (-1 for a free slot)."""
        counts = plan.counts.tolist()
        where = plan.where.tolist()
        E = len(counts)
        segments: list[Segment] = []
        active: list[int] = []
        row = 0

        def add(kind, experts, sizes, chunk=-1):
            nonlocal row
            n = sum(sizes)
            segments.append(Segment(kind, experts, sizes, row, row + n, len(active), len(active) + len(experts), chunk))
            active.extend(experts)
            row += n

        res_sizes, res_experts = [], []
        for e in slot_expert:
            use = e >= 0 and where[e] == Where.GPU_RESIDENT and counts[e] > 0
            res_sizes.append(counts[e] if use else 0)
            if use:
                res_experts.append(e)
        if res_experts:
            add(Where.GPU_RESIDENT, res_experts, res_sizes)
        streamed = [e for e in range(E) if where[e] == Where.GPU_STREAMED and counts[e] > 0]
        for c, i in enumerate(range(0, len(streamed), max(1, chunk_experts))):
            chunk = streamed[i : i + max(1, chunk_experts)]
            add(Where.GPU_STREAMED, chunk, [counts[e] for e in chunk], c)
        position = torch.full((E,), len(active), dtype=torch.int64)
        position[torch.tensor(active, dtype=torch.int64)] = torch.arange(len(active), dtype=torch.int64)
        return GpuLayout(segments, active, row, position)

    @staticmethod
    def resident_all(
        slot_expert: Sequence[int], slot_counts: torch.Tensor, n_rows: int, position: torch.Tensor
    ) -> GpuLayout:
        """Every expert resident, one per slot (slot_expert a permutation of range(E)); slot_counts:
        the device int64 [E] rows per slot; n_rows = T * k (every slot of every token); position:
        int64 [E] host, the slot of each expert."""
        E = len(slot_expert)
        seg = Segment(Where.GPU_RESIDENT, list(slot_expert), None, 0, n_rows, 0, E, offs=offsets_on_device(slot_counts))
        return GpuLayout([seg], list(slot_expert), n_rows, position)


@dataclasses.dataclass
class DeviceRows:
    rows: torch.Tensor  # int64 [n]: flattened slot index t * k + j of each GPU row
    tok: torch.Tensor  # int64 [n]
    expert: torch.Tensor  # int64 [n]
    row_of: torch.Tensor  # int64 [T, k]: row of each slot, n for slots not on the GPU

    @staticmethod
    def build(layout: GpuLayout, topk_ids: torch.Tensor, position: torch.Tensor) -> DeviceRows:
        """topk_ids [T, k] and position (layout.position on the same device)."""
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1).to(torch.int64)
        key = position.index_select(0, flat)
        order = torch.argsort(key, stable=True)
        n = layout.n_rows
        rows = order[:n]
        row_of = torch.full((T * k,), n, dtype=torch.int64, device=flat.device)
        row_of.index_copy_(0, rows, torch.arange(n, dtype=torch.int64, device=flat.device))
        return DeviceRows(
            rows, torch.div(rows, k, rounding_mode="floor"), flat.index_select(0, rows), row_of.view(T, k)
        )


def segment_offsets(seg: Segment, device) -> tuple:
    """(offsets of the weight groups, offsets of the active groups) as device int32 tensors."""
    if seg.offs is not None:  # resident_all: every group is active
        return seg.offs, seg.offs
    return offsets(seg.group_sizes, device), offsets(seg.active_sizes, device)


#: combine gathers all k slots at once (a [T, k, H] fp32 temporary) up to this size, else it sums
#: slot by slot: small calls are bound by launches, large ones by memory.
_COMBINE_GATHER_BYTES = 64 << 20


def combine(values: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * values[row_of[t, j]], fp32 (a deterministic sum over the k
    slots: one reduction, or slot by slot in slot order for large calls).

    values: fp32 [n + 1, H] whose last row is zero (slots not computed here); weights fp32 [T, k]
    or None (plain sum)."""
    T, k = row_of.shape
    H = values.shape[1]
    if T * k * H * 4 <= _COMBINE_GATHER_BYTES:  # one gather and one reduction instead of 2k launches
        g = values.index_select(0, row_of.reshape(-1)).view(T, k, H)
        if weights is not None:
            g.mul_(weights.unsqueeze(-1))
        return g.sum(1)
    out = torch.zeros((T, H), dtype=torch.float32, device=values.device)
    for j in range(k):
        v = values.index_select(0, row_of[:, j])
        if weights is None:
            out.add_(v)
        else:
            out.addcmul_(v, weights[:, j : j + 1])
    return out
