#!/usr/bin/env python3
"""LoRA on a MoE model with the plain Hugging Face `Trainer`; the routed experts'
forward and backward run in the moetune CPU engine and, on a CUDA machine, are
split per step between it and the GPU (moetune.PlacementOptions, default "auto").

    python examples/train_with_hf_trainer.py --model /path/to/qwen3-moe --data chat.jsonl
    accelerate launch --num_processes 1 examples/train_with_hf_trainer.py ...

Without --model / --data it uses the embedded demo model (written to
OUTPUT_DIR/base) and the demo dataset shipped with moetune, so it runs anywhere.
The same recipe works with any HF training loop: patch, get_peft_model, train.
"""

import argparse
import os

import datasets
import peft
import torch
import transformers

import moetune
import moetune.hf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF MoE checkpoint folder or Hub id (default: the embedded demo model)")
    ap.add_argument(
        "--data", default=moetune.demo_data_path(), help="JSONL with chat `messages` (default: the demo data)"
    )
    ap.add_argument("--output-dir", default="runs/hf-trainer")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()

    path = a.model or moetune.save_demo_base(os.path.join(a.output_dir, "base"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cuda = torch.cuda.is_available()
    # Streams the checkpoint: the experts straight into the engine (never a full copy of the
    # model in host RAM), the rest to the device; with CUDA the experts compute on the GPU too.
    model = moetune.load_model(
        path,
        device="cuda" if cuda else "cpu",
        dtype=torch.bfloat16 if cuda else torch.float32,
        placement=moetune.PlacementOptions(mode="auto"),
    )
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

    # Loss on the assistant turns only (moetune.encode_chat: any chat template).
    ds = datasets.load_dataset("json", data_files=a.data, split="train")
    ds = ds.map(
        lambda r: dict(zip(("input_ids", "labels"), moetune.encode_chat(tok, r["messages"], "assistant"))),
        remove_columns=ds.column_names,
    )

    args = transformers.TrainingArguments(
        output_dir=a.output_dir,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_steps=a.max_steps,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    # The placement's step boundary (residency, metrics) and its expert LoRA on the GPU.
    placement = moetune.hf.PlacementCallback(handle)
    collate = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)  # pads ids and labels
    transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[placement]).train()
    model.save_pretrained(os.path.join(a.output_dir, "adapter"))  # a standard PEFT adapter
    print(f"adapter written to {os.path.join(a.output_dir, 'adapter')}")


if __name__ == "__main__":
    main()
