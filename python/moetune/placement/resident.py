"""Experts kept decoded (bf16) on the GPU within a byte budget.

`ResidentStore` is shared by all layers: it owns the budget and the accounting. Each layer has a
`ResidentPool` (store.pool(key, fmt)): three bf16 tensors gate [S, I, H], up [S, I, H] (the
halves of one [S, 2I, H] buffer: one GEMM for both), down [S, H, I] of S slots and the expert held by each slot (-1: free). The GPU computes a call's
resident experts with one grouped GEMM over the whole pool (slots this call does not use are
empty groups), so nothing is gathered per call.

Accounting is exact: `used_bytes` is the sum of the pools' tensor bytes (free slots included: they
are allocated); a change that would exceed `budget_bytes` raises ResidentBudgetError before any
allocation and leaves the pool as it was. Resizing a pool allocates the new tensors before the old
ones are freed; when old + new would exceed the budget the old pool is dropped first and the
kept experts are loaded again from the host (slower, never over budget).

Loads copy the experts' stored bytes with the layer's Streamer (copy stream, staging) and decode
them into their slots on the device; between steps (the residency policy's refresh) they take
milliseconds per expert at most.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from moetune.placement.device import Device
from moetune.placement.formats import PackedFormat
from moetune.placement.streamer import Streamer


class ResidentBudgetError(ValueError):
    pass


class ResidentStore:
    def __init__(self, device: Device, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"resident budget must be >= 0 bytes, got {budget_bytes}")
        self.device, self.budget_bytes = device, int(budget_bytes)
        self._pools: dict[Hashable, ResidentPool] = {}

    @property
    def used_bytes(self) -> int:
        return sum(p.nbytes for p in self._pools.values())

    def pool(self, key: Hashable, fmt: PackedFormat) -> ResidentPool:
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = ResidentPool(self, key, fmt)
        elif p.fmt != fmt:
            raise ValueError(f"resident pool {key!r} holds {p.fmt}, asked for {fmt}")
        return p

    def pools(self) -> dict[Hashable, ResidentPool]:
        return dict(self._pools)

    def drop(self, key: Hashable) -> None:
        """Frees layer `key`'s pool and forgets it (its layer's experts were replaced: the next
        `pool(key, fmt)` starts an empty one, of any format)."""
        p = self._pools.pop(key, None)
        if p is not None:
            p.clear()

    def _check(self, pool: ResidentPool, new_slots: int) -> None:
        after = self.used_bytes - pool.nbytes + new_slots * pool.fmt.decoded_bytes_per_expert
        if after > self.budget_bytes:
            raise ResidentBudgetError(
                f"resident experts of layer {pool.key!r}: {new_slots} slots x {pool.fmt.decoded_bytes_per_expert} "
                f"bytes would bring the GPU resident store to {after} bytes, over its budget of "
                f"{self.budget_bytes} bytes ({self.used_bytes} in use)"
            )


class ResidentPool:
    def __init__(self, store: ResidentStore, key: Hashable, fmt: PackedFormat):
        self.store, self.key, self.fmt = store, key, fmt
        self.slot_expert: list[int] = []  # expert per slot, -1 = free
        self.weights: tuple | None = None  # (gate, up, down) [S, out, in] bf16
        self.loads = 0  # experts loaded from the host (all time)
        self.version = 0  # bumped by every change of slots or contents

    @property
    def capacity(self) -> int:
        return len(self.slot_expert)

    @property
    def nbytes(self) -> int:
        return 0 if self.weights is None else sum(t.numel() * t.element_size() for t in self.weights)

    def experts(self) -> list[int]:
        return sorted(e for e in self.slot_expert if e >= 0)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.fmt.num_experts, dtype=torch.bool)
        held = self.experts()
        if held:
            m[torch.tensor(held)] = True
        return m

    # ---- changes ----
    def apply(self, wanted, host: dict[str, torch.Tensor], streamer: Streamer) -> None:
        """Holds exactly the experts of `wanted` (bool [E] or ids) afterwards, in a pool of exactly
        that many slots (memory follows the set)."""
        want = self._ids(wanted)
        self._rebuild(want, host, streamer)

    def load(self, experts, host: dict[str, torch.Tensor], streamer: Streamer) -> None:
        """Adds experts (already held ones are skipped): free slots first, else the pool grows to
        exactly the slots needed."""
        new = [e for e in self._ids(experts) if e not in set(self.slot_expert)]
        if not new:
            return
        free = [s for s, e in enumerate(self.slot_expert) if e < 0]
        if len(new) <= len(free):
            self._fill(list(zip(free, new)), host, streamer)
        else:
            self._rebuild(sorted(set(self.experts()) | set(new)), host, streamer)

    def evict(self, experts) -> None:
        """Frees the experts' slots (memory stays allocated for later loads; `compact()` or
        `apply()` releases it)."""
        drop = set(self._ids(experts))
        self.slot_expert = [-1 if e in drop else e for e in self.slot_expert]
        self.version += 1

    def compact(self, host: dict[str, torch.Tensor], streamer: Streamer) -> None:
        """Shrinks the pool to the experts it holds."""
        if self.capacity != len(self.experts()):
            self._rebuild(self.experts(), host, streamer)

    def clear(self) -> None:
        self.slot_expert, self.weights = [], None
        self.version += 1

    # ---- internals ----
    def _ids(self, experts) -> list[int]:
        if isinstance(experts, torch.Tensor) and experts.dtype == torch.bool:
            if experts.shape != (self.fmt.num_experts,):
                raise ValueError(f"resident mask has shape {list(experts.shape)}, expected [{self.fmt.num_experts}]")
            experts = torch.nonzero(experts).flatten()
        ids = sorted({int(e) for e in (experts.tolist() if isinstance(experts, torch.Tensor) else experts)})
        bad = [e for e in ids if not 0 <= e < self.fmt.num_experts]
        if bad:
            raise ValueError(f"expert ids {bad} outside [0, {self.fmt.num_experts}) (layer {self.key!r})")
        return ids

    def _alloc(self, slots: int) -> tuple:
        return self.fmt.empty_decoded(slots, self.store.device.torch)

    def _rebuild(self, want: list[int], host, streamer) -> None:
        store = self.store
        store._check(self, len(want))
        if not want:
            self.clear()
            return
        keep = [(s, e) for s, e in enumerate(self.slot_expert) if e >= 0 and e in set(want)]
        transient = store.used_bytes + len(want) * self.fmt.decoded_bytes_per_expert
        if transient > store.budget_bytes:  # old + new would not fit: drop the old pool first
            self.clear()
            keep = []
        new_w = self._alloc(len(want))
        kept = {e for _, e in keep}
        if keep:
            src = torch.tensor([s for s, _ in keep], device=store.device.torch)
            for dst_t, src_t in zip(new_w, self.weights):
                dst_t[: len(keep)] = src_t.index_select(0, src)
        old_w = self.weights
        self.weights = new_w
        self.slot_expert = [e for _, e in keep] + [-1] * (len(want) - len(keep))
        self.version += 1
        del old_w
        todo = [e for e in want if e not in kept]
        self._fill(list(zip(range(len(keep), len(want)), todo)), host, streamer)

    def _fill(self, pairs, host, streamer: Streamer) -> None:
        """Loads expert e into slot s for each (s, e)."""
        if not pairs:
            return
        C = streamer.chunk_experts
        chunks = [pairs[i : i + C] for i in range(0, len(pairs), C)]
        dev = self.store.device.torch
        for chunk, W in zip(chunks, streamer.stream(host, [[e for _, e in c] for c in chunks])):
            slots = torch.tensor([s for s, _ in chunk], device=dev)
            for dst, w in zip(self.weights, W):
                dst.index_copy_(0, slots, w)
            for s, e in chunk:
                self.slot_expert[s] = e
            self.loads += len(chunk)
            self.version += 1
