"""The non-expert part of an expert-parallel model under FSDP2 (torch.distributed.fsdp.fully_shard),
for models whose attention / shared experts / embeddings do not fit one GPU (the alternative to
DDP, `DataParallel`).

What is sharded: each decoder layer's non-expert modules (attention, norms, router, shared
experts: frozen weights AND their LoRA) are one FSDP unit (`fully_shard(layer)`), the rest
(embeddings, final norm, LM head) the root unit: every rank holds 1/N of each, all-gathered for
its forward / backward, gradients reduce-scattered (averaged over ranks, as DDP's all-reduce).

What is not: the routed experts. Each rank's engine already holds only its own experts, and the
expert LoRA is trained on its owner (moetune.parallel.grads scales it like DDP would); sharding
it again, or averaging its gradients, would be wrong. The mechanism is fully_shard's
`ignored_params` (torch >= 2.7; the torch 2.6 fully_shard has no way to leave a parameter of a
wrapped module alone): every parameter inside a patched experts module or a PEFT ParamWrapper
around one (the engine-held placeholders, `moetune.hf._placeholder`, and the expert LoRA) is
ignored: not sharded, not moved, not reduced; those parameters stay plain tensors. Wrapping only
the non-expert submodules one by one instead would leave the experts to the root unit, and a
separate mesh would still shard them; `ignored_params` is the one way that keeps the decoder
layer (the unit whose all-gather gradient checkpointing repeats) whole. For the same reason moving
experts between ranks (moetune.parallel.rebalance) is the same under FSDP2 as under DDP: what moves
(engine bytes, expert LoRA rows, their optimizer state: plain tensors of ignored parameters) is never
FSDP2's, and a move needs no FSDP2 collective (tests/python/test_parallel_rebalance.py runs both).

The mesh: 1-D over the given group (moetune train: the default group, not the experts' one, so
FSDP's prefetching all-gathers never interleave with the token exchange on one communicator).

State: FSDP2's parameters (and their gradients and optimizer state) are DTensors holding this
rank's dim-0 chunk (torch.chunk's split). Checkpoints and adapters hold full tensors, so they
load into any number of ranks, with DDP or FSDP2: `full_trainable_state` / `full_optimizer_state`
gather them (collectives), `load_full_state_hook` and `ShardingOptimizer` cut full tensors back to
this rank's chunk when loading (no communication).
"""

from __future__ import annotations

import enum
import inspect

import torch
import torch.distributed as dist
from torch import nn


class DataParallel(str, enum.Enum):
    """How the non-expert part of an expert-parallel run is replicated over the ranks."""

    DDP = "ddp"  # replicated, gradients all-reduced (DistributedDataParallel)
    FSDP2 = "fsdp2"  # sharded per decoder layer (fully_shard), gradients reduce-scattered


DEFAULT = DataParallel.DDP


def unsupported_reason() -> str | None:
    """None where this torch can run the FSDP2 wrapping below; else why not (for a config error
    before anything is loaded)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2 needs torch >= 2.6)"
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        return (
            f"torch {torch.__version__}'s fully_shard has no ignored_params (needed to keep the routed experts "
            "out of FSDP2: torch >= 2.7)"
        )
    return None


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter inside a patched routed-experts module or a PEFT ParamWrapper around one
    (engine-held placeholders, expert LoRA): what FSDP2 must leave alone."""
    from moetune.hf import patching, peft_lora

    out: set[nn.Parameter] = set()
    for m in model.modules():
        if peft_lora.is_param_wrapper(m) or patching.experts_state(m) is not None:
            out.update(m.parameters())
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (any PEFT wrapper): the modules of the classes
    its `_no_split_modules` names (transformers' unit for device maps and FSDP wrapping)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"moetune: data_parallel=fsdp2 found no decoder layer in {type(base).__name__} "
            f"(its _no_split_modules: {sorted(names) or 'none'})"
        )
    return layers


def shard(model: nn.Module, *, group=None, device: torch.device | str = "cpu") -> nn.Module:
    """fully_shard each decoder layer, then the root (in place; returns `model`), the routed
    experts ignored (see the module doc). group: the ranks to shard over (None: the default group);
    device: where the shards live ("cuda": this rank's current CUDA device). The model may still be
    in host RAM: fully_shard moves each unit's parameters to the device and keeps this rank's shard,
    one unit at a time; the ignored parameters (expert LoRA) are moved after (engine-held
    placeholders never move). Call once its LoRA exists, before the optimizer is built."""
    why = unsupported_reason()
    if why is not None:
        raise RuntimeError(f"moetune: data_parallel=fsdp2: {why}")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = DeviceMesh.from_group(dist.group.WORLD if group is None else group, device.type)
    ignored = expert_params(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    from moetune.hf._placeholder import EngineHeldTensor

    with torch.no_grad():
        for p in ignored:
            if not isinstance(p, EngineHeldTensor) and p.device != device:
                p.data = p.data.to(device)
    if hasattr(model, "generate"):
        # PEFT's generate calls the inner model directly, past the root's forward hooks: without this
        # the root unit (embeddings, final norm, LM head) would stay sharded in generation
        register_fsdp_forward_method(model, "generate")
    model.register_load_state_dict_pre_hook(load_full_state_hook)
    return model


def optimizer_options(params) -> dict:
    """Keyword arguments for a torch optimizer over `params` (an FSDP2 model's trainable parameters):
    {"foreach": False} where they mix FSDP2's DTensors with plain tensors (the ignored expert LoRA),
    else {}. torch's multi-tensor (foreach) kernels refuse such a mix in one parameter group ("got
    mixed torch.Tensor and DTensor"), and torch picks them by default where every parameter is on
    CUDA; two parameter groups instead would change the optimizer state's layout that checkpoints
    share with DDP and one-process runs."""
    params = list(params)
    mixed = any(_is_dtensor(p) for p in params) and not all(_is_dtensor(p) for p in params)
    return {"foreach": False} if mixed else {}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_chunk(full: torch.Tensor, like) -> torch.Tensor:
    """The DTensor `like`'s layout (FSDP2: Shard(0) on a 1-D mesh, torch.chunk's split) of the full
    tensor `full`, as a DTensor on like's mesh and device (this rank's chunk, no communication)."""
    from torch.distributed.tensor import DTensor, Shard

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"moetune: full tensor of shape {tuple(full.shape)} for a parameter of {tuple(like.shape)}")
    (place,) = like.placements
    if not isinstance(place, Shard):
        raise ValueError(f"moetune: expected a Shard placement of an FSDP2 parameter, got {like.placements}")
    mesh = like.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=place.dim)
    rank = mesh.get_local_rank()
    local = chunks[rank] if rank < len(chunks) else full.narrow(place.dim, 0, 0)
    mine = like.to_local()
    if local.shape != mine.shape:  # never seen: would mean FSDP2 splits other than torch.chunk
        raise RuntimeError(f"moetune: chunk {tuple(local.shape)} != this rank's FSDP2 shard {tuple(mine.shape)}")
    local = local.to(device=mine.device, dtype=mine.dtype).contiguous()
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def load_full_state_hook(module, state_dict, prefix, *_args) -> None:
    """load_state_dict pre-hook of the root (moetune.train.checkpoint and PEFT load full tensors):
    a full tensor for a sharded parameter becomes this rank's chunk of it."""
    params = dict(module.named_parameters())
    for key in list(state_dict):
        p = params.get(key[len(prefix) :]) if key.startswith(prefix) else None
        v = state_dict[key]
        if p is not None and _is_dtensor(p) and isinstance(v, torch.Tensor) and not _is_dtensor(v):
            state_dict[key] = local_chunk(v, p)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


@torch.no_grad()
def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} of every trainable parameter (names as in model.state_dict()): FSDP2's
    shards all-gathered (new tensors), other parameters as they are (their own storage). A collective: every rank calls it, in the
    same state (the same parameters require grad)."""
    return {n: _full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every DTensor (FSDP2's sharded exp_avg, exp_avg_sq) gathered into
    a full tensor: the format of a DDP or one-process run's optimizer.pt. A collective."""
    sd = optimizer.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        state[i] = {k: (_full(v) if isinstance(v, torch.Tensor) else v) for k, v in sd["state"][i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


class ShardingOptimizer:
    """What moetune.train.checkpoint.load is given for the optimizer of an FSDP2 run: load_state_dict
    of a full state (from any run) cuts every per-entry tensor of a sharded parameter to this rank's
    chunk, then loads it into `optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def load_state_dict(self, sd: dict) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = {}
        for i, st in sd["state"].items():
            p = params[i] if isinstance(i, int) and 0 <= i < len(params) else None
            if p is not None and _is_dtensor(p):
                st = {
                    k: (local_chunk(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                    for k, v in st.items()
                }
            state[i] = st
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


class FullStateSaver:
    """What moetune.train.checkpoint.save is given on rank 0 of an FSDP2 run: the model's and the
    optimizer's full state, gathered by every rank beforehand (`full_trainable_state`,
    `full_optimizer_state`): save_pretrained writes the standard adapter from it."""

    def __init__(self, model, model_state: dict, optimizer_state: dict | None = None):
        self.model, self.model_state, self.optimizer_state = model, model_state, optimizer_state

    def save_pretrained(self, path: str, **kw) -> None:
        self.model.save_pretrained(path, state_dict=self.model_state, **kw)

    def state_dict(self) -> dict:
        return self.optimizer_state
