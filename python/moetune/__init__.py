"""moetune: LoRA fine-tuning of Mixture-of-Experts models with the routed
experts' forward and backward on the CPU.

Layers (one direction): C++ kernels -> C++ engine -> nanobind bindings
(`moetune._moetune_ext`) -> this package (torch autograd op, CLI).
"""

from moetune.engine import Context, LoraWeights, MoEExperts, PackedBuffer, PendingMoE, moe_experts, moe_experts_async
from moetune.isa import IsaInfo, cpu_features, isas
from moetune.options import ExpertsOptions
from moetune.placement.options import PlacementOptions
from moetune.weight_formats import weight_formats

__all__ = [
    "Context",
    "ExpertsOptions",
    "IsaInfo",
    "LoraWeights",
    "MoEExperts",
    "PackedBuffer",
    "PendingMoE",
    "PlacementOptions",
    "cpu_features",
    "isas",
    "moe_experts",
    "moe_experts_async",
    "weight_formats",
]
__version__ = "0.1.0"

# Hugging Face entry points, imported on first use (transformers is heavy). encode_chat: a chat
# record -> (input_ids, labels) with loss on the assistant turns, for any chat template (what
# `moetune train` uses); save_demo_base / demo_data_path: the embedded demo checkpoint and dataset.
_HF = {
    "load_model": "moetune.hf.loader",
    "merge_and_save": "moetune.hf.merge",
    "export_per_expert_adapter": "moetune.hf.merge",
    "encode_chat": "moetune.train.data",
    "save_demo_base": "moetune.train.demo_model",
    "demo_data_path": "moetune.train.demo_model",
}


def __getattr__(name):
    if name in _HF:
        import importlib

        return getattr(importlib.import_module(_HF[name]), name)
    raise AttributeError(f"module 'moetune' has no attribute {name!r}")
