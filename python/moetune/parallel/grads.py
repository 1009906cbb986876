"""Gradients under expert parallelism: what is averaged, what is not, and the global norm.

Scheme: the non-expert LoRA (attention, dense MLP, shared experts) is replicated and averaged
over ranks by DDP; the expert LoRA is NOT all-reduced. Each rank's expert LoRA gradient is
non-zero only on its own experts' entries and already sums the contributions of every rank's
tokens (they were computed here, moetune.parallel.layer): sum_r dL_r/dtheta. DDP's average is
(1/N) sum_r dL_r/dtheta, so `scale_expert_grads` divides them by N once per optimizer step,
and the owner's entries then equal what one process training on all ranks' batches with DDP's
loss convention computes. `ddp_ignore` keeps DDP's all-reduce off them
(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model, before wrapping).

`global_grad_norm`: the norm over every trainable parameter of the whole model, counting each
entry once: the replicated (DDP-averaged, equal on every rank) gradients locally, the expert
gradients summed over ranks (each entry is non-zero on its owner only). `clip_grad_norm_`
clips with it (the same factor on every rank, as torch.nn.utils.clip_grad_norm_ computes it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetune.parallel.expert_lora import ExpertLoraTensor


def ddp_ignore(module: torch.nn.Module, tensors: list[ExpertLoraTensor]) -> None:
    """Before wrapping `module` in DDP: exclude the expert LoRA parameters from its all-reduce, and
    the engine-held expert weights (shape-only placeholders, each rank's engine holds its own
    experts) from its initial broadcast. Names as in module.named_parameters() (pass the module
    DDP wraps)."""
    from torch.nn.parallel import DistributedDataParallel

    from moetune.hf._placeholder import EngineHeldTensor

    names = {n for n, _ in module.named_parameters()}
    held = [n for n, p in module.named_parameters() if isinstance(p, EngineHeldTensor)]
    ignore = [t.name for t in tensors] + held
    missing = [n for n in ignore if n not in names]
    if missing:
        raise ValueError(f"moetune: expert LoRA parameters {missing[:3]} are not parameters of the module DDP wraps")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)


@torch.no_grad()
def scale_expert_grads(tensors: list[ExpertLoraTensor], world_size: int) -> None:
    """Expert LoRA gradients /= world_size (DDP's averaging; once per optimizer step)."""
    for t in tensors:
        if t.param.grad is not None:
            t.param.grad.div_(world_size)


@torch.no_grad()
def global_grad_norm(params, tensors: list[ExpertLoraTensor], group=None) -> torch.Tensor:
    """fp32 scalar: sqrt(sum of squares) of every gradient of `params` (all trainable parameters,
    expert ones included), each entry counted once across ranks (see the module doc)."""
    expert_ids = {id(t.param) for t in tensors}
    dense = torch.zeros((), dtype=torch.float32)
    expert = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum().cpu()
        if id(p) in expert_ids:
            expert += sq
        else:
            dense += sq
    if tensors:
        ep = tensors[0].layer.ep
        group = ep.group if group is None else group
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        e = expert.to(dev)
        with ep.guard("the global gradient norm"):
            dist.all_reduce(e, op=dist.ReduceOp.SUM, group=group)
        expert = e.cpu()
    return (dense + expert).sqrt()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, tensors: list[ExpertLoraTensor], group=None) -> torch.Tensor:
    """Clip every gradient of `params` by the global norm (returned, before clipping)."""
    params = list(params)
    total = global_grad_norm(params, tensors, group)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
