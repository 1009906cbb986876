"""moetune for Hugging Face transformers (+ PEFT) MoE models.

    import moetune.hf, peft
    handle = moetune.hf.patch(model, num_threads=16)      # experts -> CPU engine
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    ... train ...; model.save_pretrained(dir)            # a standard PEFT adapter
    handle.undo()                                        # original weights back

patch() may also come after get_peft_model. See moetune.hf.patching; the
supported families and their layouts are moetune.hf.families.

Where the experts compute (CPU engine, GPU, both: moetune.PlacementOptions,
`patch(model, placement=...)`) is the model's `handle.placement`
(moetune.hf.placement); under HF Trainer / TRL add
`moetune.hf.PlacementCallback(handle)` to the trainer's callbacks.
"""

from moetune.hf._placeholder import EngineHeldTensor
from moetune.hf.families import SUPPORTED_FAMILIES
from moetune.hf.patching import IMPLEMENTATION, PatchHandle, moetune_experts_forward, patch, register
from moetune.hf.placement import ModelPlacement

__all__ = [
    "patch",
    "PatchHandle",
    "register",
    "SUPPORTED_FAMILIES",
    "IMPLEMENTATION",
    "EngineHeldTensor",
    "ModelPlacement",
    "PlacementCallback",
    "moetune_experts_forward",
]


def __getattr__(name):
    if name == "PlacementCallback":  # subclasses transformers' TrainerCallback: imported on first use
        from moetune.hf.callback import PlacementCallback

        return PlacementCallback
    raise AttributeError(f"module 'moetune.hf' has no attribute {name!r}")
