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
"""

from moetune.hf._placeholder import EngineHeldTensor
from moetune.hf.families import SUPPORTED_FAMILIES
from moetune.hf.patching import IMPLEMENTATION, PatchHandle, moetune_experts_forward, patch, register

__all__ = ["patch", "PatchHandle", "register", "SUPPORTED_FAMILIES", "IMPLEMENTATION", "EngineHeldTensor",
           "moetune_experts_forward"]
