"""Gathering every rank's expert LoRA rows: one standard PEFT adapter with every expert.

`sync(model)` makes every rank's full expert LoRA tensors equal to the owners' rows (an
all-reduce of each tensor masked to its owned entries: each entry has exactly one owner, so
the sum is the owner's value, bit for bit). After it, `save_pretrained` on any rank (rank 0 by
convention) writes ONE adapter holding every expert's trained factors, loadable by PEFT with
any number of ranks, or none. `sync_optimizer` does the same for the optimizer's per-entry
state (AdamW's exp_avg / exp_avg_sq), so a checkpoint resumes with another number of ranks.
Collectives: every rank must call these at the same point.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetune.parallel.expert_lora import ExpertLoraTensor, expert_lora_tensors


def _owned_sum_(t: torch.Tensor, mask: torch.Tensor, ep) -> None:
    """t <- sum over ranks of ep.group of (t where this rank owns the entry, else 0), in place."""
    buf = torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))
    with ep.guard("the adapter sync"):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ep.group)
    t.copy_(buf)


@torch.no_grad()
def sync(model, tensors: list[ExpertLoraTensor] | None = None) -> int:
    """Every rank's expert LoRA tensors <- their owners' values; returns how many tensors."""
    tensors = expert_lora_tensors(model) if tensors is None else tensors
    for t in tensors:
        _owned_sum_(t.param.data, t.owned_mask(), t.layer.ep)
    return len(tensors)


@torch.no_grad()
def sync_optimizer(optimizer: torch.optim.Optimizer, tensors: list[ExpertLoraTensor]) -> None:
    """The optimizer's per-entry state of the expert LoRA tensors <- their owners' values."""
    for t in tensors:
        state = optimizer.state.get(t.param)
        if not state:
            continue
        mask = t.owned_mask()
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == t.param.shape:
                _owned_sum_(v, mask, t.layer.ep)
