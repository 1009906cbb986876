"""The embedded demo (`moetune demo`, the README's first command).

`moetune train` with no model: a tiny Qwen3-MoE (2 layers, 8 experts, top-2,
seeded random weights) and a word-level tokenizer, both made locally
(moetune.train.demo_model), LoRA-trained on the dataset shipped in the
package (train/assets/demo.jsonl: short look-up questions, written by
scripts/gen_demo_data.py). The experts' forward and backward run in the CPU
engine. It prints the loss falling and the model's answers to a few questions
before and after training. CPU only, about a minute on 2 cores.
"""

from __future__ import annotations

from typing import Any

# The demo's settings on top of TrainConfig's defaults (flags still override).
DEMO_DEFAULTS: dict[str, Any] = dict(
    dtype="float32",
    device="cpu",
    lora_rank=16,
    lora_alpha=32.0,
    lr=3e-3,
    warmup_steps=10,
    max_steps=200,
    micro_batch_size=16,
    max_length=64,
    eval_every=25,
    save_every=50,
    max_grad_norm=1.0,
    output_dir="runs/demo",
    max_new_tokens=12,
    sample_records=0,  # the demo prints its own before / after generations
    sample_prompts=[
        "What does a cow say?",
        "What is the opposite of hot?",
        "What colour is the sky?",
        "What number comes after four?",
    ],
)


def run_demo(overrides: dict[str, Any] | None = None, *, say=print) -> dict[str, Any]:
    from moetune.parallel.launcher import launched
    from moetune.train.config import make_config
    from moetune.train.loop import train

    launch = launched()
    if launch is not None and not launch.is_main:  # several processes (torchrun): rank 0 speaks
        say = _quiet

    # The demo's own folder is a throwaway: a second `moetune demo` replaces it (unless it resumes
    # it). An output_dir the user chose gets the usual run-folder policy.
    ov = overrides or {}
    base = {**DEMO_DEFAULTS, "overwrite": not ov.get("resume") and "output_dir" not in ov}
    cfg = make_config(None, overrides, base=base)
    if not cfg.is_demo:
        raise ValueError("moetune demo trains the embedded model; use `moetune train --model ...` for a model")
    say("moetune demo: LoRA on a tiny Qwen3-MoE (experts in the CPU engine), embedded data, CPU only")
    summary = train(cfg, say=say)
    if summary["samples"]:
        say("\ngenerations (greedy) before -> after training:")
        for s in summary["samples"]:
            say(f"  Q: {s['prompt']}\n     before: {s['before']!r}\n     after:  {s['after']!r}")
    say(
        f"\ntrain loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; run folder "
        f"{cfg.output_dir} (adapter/, metrics.jsonl, loss.png, tensorboard/)"
    )
    return summary


def _quiet(*_args, **_kw) -> None:
    """`say` of the ranks other than 0."""
