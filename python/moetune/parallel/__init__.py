"""Expert parallelism over ranks (one process per GPU or per CPU share; torchrun / accelerate).

Each MoE layer's experts are split over the ranks of a process group: each rank's engine
holds only its own experts (`ownership`, `plan.ExpertParallel`; moved between ranks as the
routing drifts: `rebalance`), tokens travel to the owning
rank and back (`exchange`, `layer`), the expert LoRA is trained on its owner and not
all-reduced (`grads`), every rank's expert LoRA is gathered into one PEFT adapter (`adapter`),
each rank's engine is pinned to its own CPUs (`cpus`), and the non-expert part may be sharded
by FSDP2 instead of replicated by DDP (`fsdp`). The process group comes from the
launcher (`launcher`). See docs/ARCHITECTURE.md, "Expert parallelism".
"""

from moetune.parallel.ownership import LayerOwnership, by_index, by_load, load_per_rank
from moetune.parallel.plan import ExpertParallel

__all__ = ["ExpertParallel", "LayerOwnership", "by_index", "by_load", "load_per_rank"]
