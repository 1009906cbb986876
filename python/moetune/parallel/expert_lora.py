"""The expert LoRA tensors of an expert-parallel model, and which of their entries each rank owns.

Every rank keeps PEFT's FULL expert LoRA tensors (a standard PEFT model: the adapter saves and
loads as usual, with any number of ranks), but only the rows of its own experts are used and
trained there: its engine reads them (index_select, moetune.parallel.layer), so the gradient
of every other row is zero on this rank. The owner's rows are the true values; the others are
stale until `sync` (moetune.parallel.adapter) copies every expert's rows from its owner.

PEFT's layout of a 3-D expert parameter (moetune.hf.peft_lora): lora_A.weight [E * r, in],
rows e*r .. e*r+r-1 of expert e; lora_B.weight [out, r * E], column j*E + e rank j of expert e.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moetune.hf import patching, peft_lora


@dataclasses.dataclass
class ExpertLoraTensor:
    """One PEFT expert LoRA parameter (`name` as in model.named_parameters()), its factor
    ("A" | "B"), the experts' count E and the layer's EPLayer (ownership, rank)."""

    name: str
    param: nn.Parameter
    factor: str
    num_experts: int
    layer: object

    def expert_mask(self, experts) -> torch.Tensor:
        """bool, the parameter's shape: True on the entries of the given expert ids."""
        p, E = self.param, self.num_experts
        m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        ids = torch.as_tensor(list(experts), dtype=torch.int64, device=p.device)
        if self.factor == "A":
            m.view(E, -1, p.shape[1])[ids] = True
        else:
            m.view(p.shape[0], -1, E)[:, :, ids] = True
        return m

    def owned_mask(self) -> torch.Tensor:
        """True on the entries of this rank's experts."""
        return self.expert_mask(self.layer.owned.tolist())


def expert_lora_tensors(model: nn.Module) -> list[ExpertLoraTensor]:
    """Every PEFT LoRA parameter on expert-parallel experts of `model` (any wrapper: PEFT model,
    DDP module), in named_parameters() order."""
    owner_of = {}  # id(parameter) -> (factor, E, EPLayer)
    for m in model.modules():
        if not peft_lora.is_param_wrapper(m):
            continue
        base = m
        while peft_lora.is_param_wrapper(base):
            base = base.base_layer
        st = patching.experts_state(base)
        if st is None or st.ep is None:
            continue
        for a in m.lora_A:
            owner_of[id(m.lora_A[a].weight)] = ("A", m.num_experts, st.ep)
            owner_of[id(m.lora_B[a].weight)] = ("B", m.num_experts, st.ep)
    return [ExpertLoraTensor(n, p, *owner_of[id(p)]) for n, p in model.named_parameters() if id(p) in owner_of]
