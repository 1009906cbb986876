#!/usr/bin/env python3
"""LoRA on a MoE model with TRL's `SFTTrainer`; the routed experts' forward and
backward run in the moetune CPU engine and, on a CUDA machine, the GPU too
(moetune.hf.PlacementCallback closes each step of the placement). TRL does the chat templating and the
assistant-only loss itself (the template needs `{% generation %}` marks).

    accelerate launch --num_processes 1 examples/train_with_trl.py --model /path/to/qwen3-moe --data chat.jsonl

Without --model / --data it uses the embedded demo model (written to
OUTPUT_DIR/base) and the demo dataset shipped with moetune.
"""

import argparse
import os

import accelerate
import datasets
import peft
import torch
import transformers
import trl

import moetune
import moetune.hf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF MoE checkpoint folder or Hub id (default: the embedded demo model)")
    ap.add_argument(
        "--data", default=moetune.demo_data_path(), help="JSONL with chat `messages` (default: the demo data)"
    )
    ap.add_argument("--output-dir", default="runs/trl")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()

    path = a.model or moetune.save_demo_base(os.path.join(a.output_dir, "base"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # The device accelerate picked (`accelerate launch --cpu` means CPU even where a GPU exists).
    device = accelerate.PartialState().device
    on_gpu = device.type == "cuda"
    # Streams the checkpoint: experts straight into the engine, the rest to the device (placement
    # "auto": the CPU engine, plus the GPU where the model runs on CUDA).
    model = moetune.load_model(path, device=str(device), dtype=torch.bfloat16 if on_gpu else torch.float32)
    handle = model.moetune_handle
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            task_type="CAUSAL_LM",
        ),
    )

    ds = datasets.load_dataset("json", data_files=a.data, split="train").select_columns(["messages"])
    cfg = trl.SFTConfig(
        output_dir=a.output_dir,
        per_device_train_batch_size=16,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_steps=a.max_steps,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        assistant_only_loss=True,
        max_length=256,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
    )
    trl.SFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[moetune.hf.PlacementCallback(handle)]
    ).train()
    model.save_pretrained(os.path.join(a.output_dir, "adapter"))
    print(f"adapter written to {os.path.join(a.output_dir, 'adapter')}")


if __name__ == "__main__":
    main()
