"""Other fine-tuning tools' option names, accepted by `moetune train` (YAML keys and flags).

Users arrive with LLaMA-Factory, TRL / HF `TrainingArguments`, axolotl or Unsloth configs. The
one table of their spellings is `ALIASES` below: each entry turns a foreign key and its value
into moetune `TrainConfig` fields (a rename, or a value translation where the meaning differs:
`lr_scheduler_type`, `bf16`, `lora_target`). `IGNORED` lists keys that only tune machinery moetune
does not have (workers, DDP timeouts, report backends); they are accepted and reported, never
silently dropped. `REFUSED` keys change what is trained in a way moetune cannot honour; they fail
with the reason (a different training stage, fp16, whole-model quantization...).

`translate(values, where)` is the hook `moetune.train.config` calls on every YAML mapping and on
the flags: aliases become canonical keys (a key given both ways is an error naming both), and the
notes about ignored keys come back for the CLI to print. The canonical names and their defaults
live in `TrainConfig` only; this file only names them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Module names other tools list as LoRA targets -> the moetune switch covering them. moetune
# targets whole groups (every attention projection, every dense-MLP projection, every routed
# expert), so a list naming part of a group is refused rather than widened silently.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_MLP = ("w1", "w2", "w3")


class AliasError(ValueError):
    """A foreign option moetune cannot honour, or given twice (raised as a ConfigError)."""


@dataclass(frozen=True)
class Alias:
    target: str  # the TrainConfig field it sets (documentation, --help, the did-you-mean list)
    tools: str  # where the spelling comes from
    convert: Callable[[Any], dict[str, Any]] | None = None  # value -> {field: value}; None: rename


def _schedule(v) -> dict[str, Any]:
    table = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    if not isinstance(v, str) or v not in table:
        raise AliasError(
            f"lr_scheduler_type {v!r}: moetune schedules are {', '.join(sorted(table))} (warmup is always linear)"
        )
    return {"schedule": table[v]}


def _truthy(key: str, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return v.lower() in ("true", "yes", "1", "on")
    raise AliasError(f"{key} must be true or false, got {v!r}")


def _bf16(v) -> dict[str, Any]:
    return {"dtype": "bfloat16" if _truthy("bf16", v) else "float32"}


def _fp16(v) -> dict[str, Any]:
    if _truthy("fp16", v):
        raise AliasError("fp16: moetune trains in bf16 (the engine's experts are bf16) or float32; use bf16: true")
    return {}


def _lora_target(v) -> dict[str, Any]:
    """LLaMA-Factory `lora_target` / axolotl and TRL target-module lists -> the three switches."""
    names = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)
    if names in (["all"], ["all-linear"]):
        return {"lora_attention": True, "lora_mlp": True, "lora_experts": True}
    unknown = [n for n in names if n not in _ATTENTION + _MLP + _MIXTRAL_MLP]
    if unknown:
        raise AliasError(
            f"lora_target: {', '.join(unknown)} not known; moetune targets groups: all, or the attention "
            f"projections ({', '.join(_ATTENTION)}) and / or the MLP projections ({', '.join(_MLP)}); "
            "or set lora_attention / lora_mlp / lora_experts"
        )
    attn = [n for n in names if n in _ATTENTION]
    mlp = [n for n in names if n not in _ATTENTION]
    for part, group, what in ((attn, _ATTENTION, "attention"), (mlp, None, "MLP")):
        full = group if group is not None else (_MIXTRAL_MLP if set(part) <= set(_MIXTRAL_MLP) else _MLP)
        if part and set(part) != set(full):
            raise AliasError(
                f"lora_target: {', '.join(part)} is part of the {what} projections; moetune puts LoRA on all of "
                f"them ({', '.join(full)}) or none: list them all, or use all / lora_{what.lower()}"
            )
    return {"lora_attention": bool(attn), "lora_mlp": bool(mlp), "lora_experts": bool(mlp)}


def _lora_target_linear(v) -> dict[str, Any]:
    if not _truthy("lora_target_linear", v):
        return {}
    return {"lora_attention": True, "lora_mlp": True, "lora_experts": True}


def _stage(v) -> dict[str, Any]:
    if v != "sft":
        raise AliasError(f"stage {v!r}: moetune does supervised fine-tuning (sft) only")
    return {}


def _finetuning_type(v) -> dict[str, Any]:
    if v != "lora":
        raise AliasError(f"finetuning_type {v!r}: moetune trains LoRA adapters only (lora)")
    return {}


def _resume_from_checkpoint(v) -> dict[str, Any]:
    if v in (None, False, "null", "none", "None"):
        return {}
    if v is True or v in ("true", "True"):
        return {"resume": "latest"}
    if isinstance(v, str):  # a checkpoint or run folder, as moetune's --resume PATH
        return {"resume": v}
    raise AliasError(f"resume_from_checkpoint {v!r}: give true (the latest checkpoint) or a checkpoint path")


def _val_size(v) -> dict[str, Any]:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        raise AliasError(f"val_size {v}: give a fraction in [0, 1) (moetune's eval_fraction), not a record count")
    return {"eval_fraction": v}


def _plain(target: str, tools: str) -> Alias:
    return Alias(target, tools)


LF, HF, AX, US = "LLaMA-Factory", "TRL / HF TrainingArguments", "axolotl", "Unsloth"
ALIASES: dict[str, Alias] = {
    # model
    "model_name_or_path": _plain("model", f"{LF}, {HF}"),
    "base_model": _plain("model", AX),
    "model_name": _plain("model", US),
    "bf16": Alias("dtype", f"{LF}, {HF}, {AX}", _bf16),
    "fp16": Alias("dtype", f"{LF}, {HF}, {AX}", _fp16),
    # data
    "dataset": _plain("data", f"{LF} (a local file here, not a dataset_info.json name)"),
    "train_file": _plain("data", HF),
    "eval_dataset": _plain("eval_data", LF),
    "val_size": Alias("eval_fraction", LF, _val_size),
    "cutoff_len": _plain("max_length", LF),
    "max_seq_length": _plain("max_length", f"{HF} (before 0.20), {US}"),
    "sequence_len": _plain("max_length", AX),
    "sample_packing": _plain("packing", AX),
    # LoRA
    "lora_r": _plain("lora_rank", f"{AX}, {HF}"),
    "r": _plain("lora_rank", US),
    "lora_target": Alias("lora_attention, lora_mlp, lora_experts", LF, _lora_target),
    "lora_target_modules": Alias("lora_attention, lora_mlp, lora_experts", f"{AX}, {HF}", _lora_target),
    "target_modules": Alias("lora_attention, lora_mlp, lora_experts", f"PEFT, {US}", _lora_target),
    "lora_target_linear": Alias("lora_attention, lora_mlp, lora_experts", AX, _lora_target_linear),
    "random_state": _plain("seed", US),
    # optimization
    "learning_rate": _plain("lr", f"{LF}, {HF}, {AX}, {US}"),
    "num_train_epochs": _plain("epochs", f"{LF}, {HF}, {US}"),
    "num_epochs": _plain("epochs", AX),
    "per_device_train_batch_size": _plain("micro_batch_size", f"{LF}, {HF}, {US}"),
    "gradient_accumulation_steps": _plain("grad_accum", f"{LF}, {HF}, {AX}, {US}"),
    "lr_scheduler_type": Alias("schedule", f"{LF}, {HF}, {US}", _schedule),
    "lr_scheduler": Alias("schedule", AX, _schedule),
    "adam_epsilon": _plain("adam_eps", HF),
    "max_grad_norm": _plain("max_grad_norm", HF),
    # run
    "save_steps": _plain("save_every", f"{LF}, {HF}, {US}"),
    "save_total_limit": _plain("keep_checkpoints", f"{LF}, {HF}, {AX}"),
    "logging_steps": _plain("log_every", f"{LF}, {HF}, {AX}, {US}"),
    "eval_steps": _plain("eval_every", f"{LF}, {HF}, {AX}"),
    "plot_loss": _plain("plot", LF),
    "resume_from_checkpoint": Alias("resume", f"{LF}, {HF}, {AX}", _resume_from_checkpoint),
    "overwrite_output_dir": _plain("overwrite", HF),
    "preprocessing_num_workers": _plain("num_proc", LF),
    "dataset_num_proc": _plain("num_proc", HF),
    "stage": Alias("(sft only)", LF, _stage),
    "finetuning_type": Alias("(lora only)", LF, _finetuning_type),
}
# Identity entries (a foreign tool's name that is also moetune's) only document the tool.
ALIASES = {k: a for k, a in ALIASES.items() if k != a.target}

# Accepted and reported, with why they do not apply.
IGNORED: dict[str, str] = {
    "do_train": "moetune train always trains",
    "template": "the tokenizer's own chat template formats chat records (chat_template overrides it)",
    "trust_remote_code": "moetune builds transformers' own model classes only",
    "max_samples": "every record of the data file is used (trim the file to train on fewer)",
    "overwrite_cache": "the tokenized-data cache is keyed by the records, tokenizer, template and options "
    "(any change tokenizes again; data_cache: false turns it off)",
    "dataloader_num_workers": "batches come from tokenized data in memory",
    "ddp_timeout": "no distributed process group",
    "save_only_model": "checkpoints hold the adapter and optimizer state (the base is never saved)",
    "per_device_eval_batch_size": "eval batches use micro_batch_size",
    "eval_strategy": "eval runs every eval_every steps",
    "evaluation_strategy": "eval runs every eval_every steps",
    "save_strategy": "checkpoints every save_every steps",
    "logging_dir": "TensorBoard events go to output_dir/tensorboard",
    "flash_attn": "attention is the model's own (sdpa)",
    "attn_implementation": "attention is the model's own (sdpa)",
    "dataset_dir": "data is a file path",
}

# Keys whose meaning moetune cannot honour: a clear error, not a silently different run.
REFUSED: dict[str, str] = {
    "deepspeed": "moetune runs one process (experts on the CPU engine, the rest on its GPUs); no DeepSpeed",
    "fsdp": "moetune runs one process; no FSDP",
    "quantization_bit": "whole-model bitsandbytes quantization is not used; quantize the routed experts with "
    "expert_format: int8 or int4",
    "load_in_4bit": "whole-model bitsandbytes quantization is not used; use expert_format: int4",
    "load_in_8bit": "whole-model bitsandbytes quantization is not used; use expert_format: int8",
    "use_dora": "DoRA is not supported (plain LoRA)",
    "use_rslora": "rsLoRA scaling is not supported (scaling = lora_alpha / lora_rank)",
    "adam_beta1": "give both as betas: [beta1, beta2]",
    "adam_beta2": "give both as betas: [beta1, beta2]",
}


def suggest(key: str, canonical: list[str]) -> str | None:
    """The closest valid name to a misspelt key, canonical or alias (case-insensitive)."""
    pool = {n.lower(): n for n in [*canonical, *ALIASES]}
    close = difflib.get_close_matches(key.lower().replace("-", "_"), list(pool), n=1, cutoff=0.75)
    return pool[close[0]] if close else None


def translate(values: dict[str, Any], where: str, canonical) -> tuple[dict[str, Any], list[str]]:
    """(values with aliases replaced by canonical fields, notes on ignored keys).

    Keys in `canonical` (TrainConfig's fields) pass through; unknown keys are left for the caller's
    unknown-key error. An alias setting a field that is also given directly, or by another alias,
    in the same source is an AliasError naming both."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notes: list[str] = []
    for key, v in values.items():
        if key in canonical:
            updates = {key: v}
        elif key in ALIASES:
            a = ALIASES[key]
            updates = {a.target: v} if a.convert is None else a.convert(v)
        elif key in REFUSED:
            if v in (None, False):
                continue
            raise AliasError(f"{key} (in {where}): {REFUSED[key]}")
        elif key in IGNORED:
            notes.append(f"{key} ignored: {IGNORED[key]}")
            continue
        else:
            updates = {key: v}
        for f, fv in updates.items():
            if f in out and origin[f] != key:
                raise AliasError(f"{f} is given twice in {where}: as {origin[f]!r} and as {key!r}")
            out[f], origin[f] = fv, key
    return out, notes
