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
Under FSDP2 (moetune.parallel.fsdp) the non-expert gradients are DTensors holding this rank's
chunk (the chunks of the ranks are disjoint): their squares are summed over ranks with the
expert ones (one all-reduce), each entry again counted once.
"""

from __future__ import annotations

import contextlib

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
    expert = torch.zeros((), dtype=torch.float32)  # entries held by one rank each: expert rows, FSDP2 chunks
    meshes = []
    for p in params:
        if p.grad is None:
            continue
        g = _shard(p.grad, meshes)
        sq = g.detach().float().pow(2).sum().cpu()
        if id(p) in expert_ids or g is not p.grad:
            expert += sq
        else:
            dense += sq
    if tensors or meshes:
        group = (tensors[0].layer.ep.group if tensors else meshes[0].get_group()) if group is None else group
        _check_mesh_ranks(meshes, group)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        e = expert.to(dev)
        guard = tensors[0].layer.ep.guard("the global gradient norm") if tensors else contextlib.nullcontext()
        with guard:
            dist.all_reduce(e, op=dist.ReduceOp.SUM, group=group)
        expert = e.cpu()
    return (dense + expert).sqrt()


def _shard(grad: torch.Tensor, meshes: list) -> torch.Tensor:
    """An FSDP2 gradient (a DTensor sharded on a 1-D mesh): this rank's chunk (the mesh noted in
    `meshes`); any other gradient: itself. In no_grad, DTensor.to_local() is the local tensor itself
    (in-place changes reach the DTensor)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(grad, DTensor):
        return grad
    if grad.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in grad.placements):
        raise ValueError(
            f"moetune: a gradient of placements {grad.placements} on a {grad.device_mesh.ndim}-D mesh: only "
            "FSDP2's 1-D sharding is supported"
        )
    if not any(m is grad.device_mesh for m in meshes):
        meshes.append(grad.device_mesh)
    return grad.to_local()


def _check_mesh_ranks(meshes: list, group) -> None:
    """Sums over `group` count each FSDP2 chunk once only if every mesh spans exactly its ranks."""
    want = dist.get_process_group_ranks(group)
    for m in meshes:
        got = dist.get_process_group_ranks(m.get_group())
        if sorted(got) != sorted(want):
            raise ValueError(f"moetune: FSDP2 mesh over ranks {got}, the expert-parallel group over {want}")


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, tensors: list[ExpertLoraTensor], group=None) -> torch.Tensor:
    """Clip every gradient of `params` by the global norm (returned, before clipping)."""
    params = list(params)
    total = global_grad_norm(params, tensors, group)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = _shard(p.grad, [])
            g.mul_(coef.to(g.device, g.dtype))
    return total
