"""moetune: LoRA fine-tuning of Mixture-of-Experts models with the routed
experts' forward and backward on the CPU.

Layers (one direction): C++ kernels -> C++ engine -> nanobind bindings
(`moetune._moetune_ext`) -> this package (torch autograd op, CLI).
"""

from moetune.engine import Context, LoraWeights, MoEExperts, PendingMoE, moe_experts, moe_experts_async

__all__ = ["Context", "LoraWeights", "MoEExperts", "PendingMoE", "moe_experts", "moe_experts_async"]
__version__ = "0.1.0"
