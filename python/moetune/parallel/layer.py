"""One MoE layer's experts under expert parallelism (`EPLayer`): the data flow of a call.

On every rank, for its own tokens x [T, H], topk_ids / topk_weights [T, k]:
1. each slot (t, j) belongs to the rank owning expert topk_ids[t, j]; token t is sent ONCE to
   every rank owning at least one of its slots (rows grouped by destination rank, by token
   within), with one entry per slot: (row in that rank's block, the expert's local id, weight);
2. split sizes are exchanged, then rows and slot entries (`exchange.Dispatch`);
3. the owner computes each slot as one row (k = 1) on its engine, which holds only its experts
   (local ids 0..E_local-1), with the LoRA rows of its experts (index_select of the full PEFT
   tensors, so their gradients land in the owned rows only), all in fp32, and sums the slots
   of a token into ONE fp32 partial per (token, source rank);
4. partials go back (`exchange.Combine`) and the source adds them in fp32, then casts to x's
   dtype once. The sum order across ranks differs from the one-process engine's slot order:
   results agree to fp32 rounding before the single cast (bf16-rounding level at most).
Backward is the mirror image: the gradient of each partial goes to its owner, whose engine
backward gives dx rows (fp32, summed per token, sent back and added at the source in fp32),
d topk_weights per slot (back to its source slot) and the gradients of its experts' LoRA rows
(which therefore cover every rank's tokens: see moetune.parallel.grads for the averaging).

A rank that owns no slot of a call still runs every exchange (forward and backward) with
empty blocks: the graph has the same collectives on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetune.engine import LoraWeights
from moetune.parallel.exchange import Combine, Dispatch, exchange_counts
from moetune.parallel.ownership import LayerOwnership
from moetune.parallel.plan import ExpertParallel


def _offsets(splits: list[int], device) -> torch.Tensor:
    """Exclusive prefix sums of split sizes, int64 [N]."""
    s = torch.tensor([0] + splits[:-1], dtype=torch.int64, device=device)
    return torch.cumsum(s, 0)


def local_lora(lora: LoraWeights, owned: torch.Tensor) -> LoraWeights:
    """The LoRA factors of the owned experts only ([E_local, ...], differentiable row slices)."""
    out = LoraWeights(scaling=lora.scaling)
    for name in ("gate", "up", "down"):
        pair = getattr(lora, name)
        if pair is not None:
            A, B = pair
            setattr(out, name, (A.index_select(0, owned.to(A.device)), B.index_select(0, owned.to(B.device))))
    return out


class EPLayer:
    """The expert-parallel side of one patched experts module (ExpertsState.ep).

    own: the layer's ownership; ep: the run's ExpertParallel. Counters (since creation, for
    metrics): `rows` slots computed here, `tokens_in` (token, source) rows received,
    `expert_rows` int64 [E_local] slots per local expert, `routed` int64 [E] slots this rank's
    own tokens routed to each expert of the layer (a routing profile: moetune.parallel.profile)."""

    def __init__(self, ep: ExpertParallel, own: LayerOwnership):
        if own.world_size != ep.world_size:
            raise ValueError(f"ownership for {own.world_size} ranks used with {ep.world_size} ranks")
        self.ep = ep
        self.set_ownership(own)
        self.rows = 0
        self.tokens_in = 0
        self.routed = torch.zeros(own.num_experts, dtype=torch.int64)

    def set_ownership(self, own: LayerOwnership) -> None:
        """Routes by `own` from the next call on (moetune.parallel.rebalance: the engine already holds
        this rank's experts of `own`); `expert_rows` restarts for the new local experts."""
        if own.world_size != self.ep.world_size:
            raise ValueError(f"ownership for {own.world_size} ranks used with {self.ep.world_size} ranks")
        dev = self.ep.device
        self.own = own
        self.owned = torch.tensor(own.owned(self.ep.rank), dtype=torch.int64)
        self.owner = own.owner_tensor().to(dev)
        self.local_id = own.local_id_tensor().to(dev)
        self.expert_rows = torch.zeros(len(self.owned), dtype=torch.int64)

    @property
    def num_local(self) -> int:
        return len(self.owned)

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: LoraWeights,
        compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LoraWeights], torch.Tensor],
    ) -> torch.Tensor:
        """y [T, H] in x's dtype on x's device. compute(x_rows fp32 [S, H], local ids [S, 1],
        weights fp32 [S, 1], local LoRA) runs this rank's experts (engine or placement)."""
        ep, N, dev = self.ep, self.ep.world_size, self.ep.device
        T, H = x.shape
        k = topk_ids.shape[1]
        ids = topk_ids.detach().to(dev, torch.int64)
        slot_owner = self.owner[ids]  # [T, k]
        present = torch.zeros((N, T), dtype=torch.bool, device=dev)
        present[slot_owner.t(), torch.arange(T, device=dev).expand(k, T)] = True
        r_idx, t_idx = present.nonzero(as_tuple=True)  # rows by destination rank, then token
        x_splits = present.sum(1).tolist()
        pos = torch.full((N, T), -1, dtype=torch.int64, device=dev)
        pos[r_idx, t_idx] = torch.arange(len(t_idx), device=dev)
        flat_owner = slot_owner.reshape(-1)
        order = torch.argsort(flat_owner, stable=True)  # slots by destination rank, then (t, j)
        s_owner = flat_owner[order]
        s_splits = torch.bincount(flat_owner, minlength=N).tolist()
        s_tok = pos[s_owner, order // k] - _offsets(x_splits, dev)[s_owner]
        ids_send = torch.stack([s_tok, self.local_id[ids.reshape(-1)[order]]], 1)
        x_send = x.to(dev).float()[t_idx]
        w_send = topk_weights.to(dev).float().reshape(-1)[order]

        recv = exchange_counts(torch.tensor([x_splits, s_splits], dtype=torch.int64, device=dev).t(), ep)
        x_recv_splits, s_recv_splits = recv[:, 0].tolist(), recv[:, 1].tolist()
        anchor = torch.empty(0, device=dev, requires_grad=True) if torch.is_grad_enabled() else None
        x_recv, w_recv, ids_recv = Dispatch.apply(
            x_send, w_send, ids_send, anchor, x_splits, x_recv_splits, s_splits, s_recv_splits, x.dtype, ep
        )
        src = torch.repeat_interleave(torch.arange(N, device=dev), torch.tensor(s_recv_splits, device=dev))
        tok = ids_recv[:, 0] + _offsets(x_recv_splits, dev)[src]
        lid = ids_recv[:, 1]
        x_rows = x_recv[tok]
        S = len(tok)
        if S > 0:
            out_rows = compute(x_rows, lid[:, None], w_recv[:, None], local_lora(lora, self.owned)).float()
        else:  # nothing to compute here: an empty expression keeps x_recv / w_recv in the graph
            out_rows = x_rows * w_recv[:, None]
        partial = torch.zeros((len(x_recv), H), dtype=torch.float32, device=dev).index_add(0, tok, out_rows.to(dev))
        back = Combine.apply(partial, anchor, x_splits, x_recv_splits, ep)
        y = torch.zeros((T, H), dtype=torch.float32, device=dev).index_add(0, t_idx, back)

        self.rows += S
        self.routed += torch.bincount(ids.reshape(-1).cpu(), minlength=self.own.num_experts)
        self.tokens_in += len(x_recv)
        if S > 0:
            self.expert_rows += torch.bincount(lid.cpu(), minlength=self.num_local)
        return y.to(device=x.device, dtype=x.dtype)
