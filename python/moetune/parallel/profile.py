"""Routing profile: the token slots each expert of each MoE layer receives on a few batches,
counted on every rank (its own batches) and summed over the ranks: the load that
moetune.parallel.ownership.by_load balances.

The routers of layer l see the hidden states that layer < l's experts produced, so the profile
runs the whole model: an expert-parallel one (any ownership, e.g. by index) whose EPLayers count
the experts their tokens are routed to (`EPLayer.routed`, before the exchange). Every rank must
call `routing_profile` with the same number of batches (the forwards exchange tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetune.hf import patching


def ep_layers(model) -> list:
    """The EPLayer of every MoE layer of `model`, in moetune.hf.patching.find_experts order (the
    layer numbering of moetune.parallel.ExpertParallel)."""
    layers = [patching.experts_state(f.module).ep for f in patching.find_experts(model)]
    if not layers or any(layer is None for layer in layers):
        raise ValueError("moetune: routing_profile needs a model patched with expert_parallel=")
    return layers


@torch.no_grad()
def routing_profile(model, batches, ep) -> dict[int, list[int]]:
    """{MoE layer: per-expert token slots} of `batches` (model keyword dicts, on the model's
    device) over every rank of ep.group: the routing_counts of moetune.parallel.ExpertParallel."""
    layers = ep_layers(model)
    before = [layer.routed.clone() for layer in layers]
    was = model.training
    model.eval()
    try:
        for b in batches:
            model(**b, use_cache=False)
    finally:
        model.train(was)
    mine = torch.cat([layer.routed - b0 for layer, b0 in zip(layers, before)]).to(ep.device)
    with ep.guard("the routing profile"):
        dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=ep.group)
    out, at = {}, 0
    for i, layer in enumerate(layers):
        E = layer.own.num_experts
        out[i] = mine[at : at + E].cpu().tolist()
        at += E
    return out
