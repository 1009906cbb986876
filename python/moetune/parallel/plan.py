"""`ExpertParallel`: one run's expert-parallel setup, given to moetune.hf.patch /
moetune.load_model (`expert_parallel=`): the process group the experts are split over,
this process's rank in it, where exchanged tensors live, and each MoE layer's ownership.

Layers are numbered by their position among the model's MoE layers (the order of
moetune.hf.patching.find_experts, which load_model's plan follows too). Ownership is by
index unless a routing profile (`routing_counts`: layer -> per-expert token counts, the
same on every rank) is given, then balanced by load (moetune.parallel.ownership). Ranks are
global ranks of the group: nothing here assumes one host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from moetune.parallel import failure
from moetune.parallel import ownership as own_mod


@dataclasses.dataclass
class ExpertParallel:
    """group: a torch.distributed ProcessGroup spanning every rank (None: the default group);
    rank / world_size: this process's rank and the group's size; device: where the exchanged
    tensors live (CUDA for NCCL, the CPU for gloo); routing_counts: see the module doc;
    timeout_s: the group's collective timeout, for the error a lost rank gives (None: unknown)."""

    group: object
    rank: int
    world_size: int
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    routing_counts: Mapping[int, Sequence[float]] | None = None
    timeout_s: float | None = None

    @classmethod
    def from_group(cls, group=None, *, routing_counts=None, timeout_s: float | None = None) -> ExpertParallel:
        """From an initialized process group (default: the default one): NCCL exchanges CUDA
        tensors on the current CUDA device, any other backend CPU tensors. timeout_s: the
        group's timeout (as created), named in the error a lost rank gives."""
        if not dist.is_initialized():
            raise RuntimeError(
                "moetune: expert parallelism needs an initialized torch.distributed process group "
                "(launch with torchrun / accelerate launch, or call moetune.parallel.init_from_launcher())"
            )
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device, routing_counts, timeout_s)

    def guard(self, what: str):
        """Context manager: a failed collective inside becomes moetune.parallel.failure.RankLostError."""
        return failure.collective(self.rank, self.world_size, what, self.timeout_s)

    def ownership(self, layer: int, num_experts: int) -> own_mod.LayerOwnership:
        """The ownership of MoE layer `layer` (its position among the MoE layers) of E experts."""
        if num_experts < self.world_size:
            raise ValueError(
                f"moetune: MoE layer {layer} has {num_experts} experts for {self.world_size} ranks: every rank must own one"
            )
        counts = None if self.routing_counts is None else self.routing_counts.get(layer)
        if counts is None:
            return own_mod.by_index(num_experts, self.world_size)
        if len(counts) != num_experts:
            raise ValueError(
                f"moetune: routing_counts of MoE layer {layer} has {len(counts)} entries, the layer {num_experts} experts"
            )
        return own_mod.by_load(counts, self.world_size)
