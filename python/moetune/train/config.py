"""The typed configuration of `moetune train`: one dataclass, every field
documented with its default (`moetune train --help` is generated from it).

Sources, lowest to highest precedence: the defaults below, a YAML file
(`--config run.yaml`, flat `key: value` mapping), command-line flags
(`--lora-rank 16` sets `lora_rank`). Unknown keys are errors that name the key
and list the valid ones; paths are checked here, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from moetune.numa import NUMA_DEFAULT, parse_numa
from moetune.options import ExpertsOptions
from moetune.parallel import fsdp
from moetune.parallel.rebalance_options import RebalanceOptions
from moetune.placement.options import MODES as PLACEMENT_MODES
from moetune.placement.options import PlacementOptions
from moetune.train import aliases, formats
from moetune.train.ranges import Range, check_ranges
from moetune.weight_formats import weight_formats


class ConfigError(ValueError):
    """A bad configuration value, key or path (raised before any model loading)."""


def _f(default, help: str, section: str, choices=None, flag=None, **kw):
    meta = {"help": help, "section": section}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flag is not None:
        meta["flag"] = dict(flag)  # extra argparse keywords of the field's flag
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


SECTIONS = ("model", "data", "lora", "optimization", "run")
# Defaults of the fields that map onto typed options come from those options (one source).
_EXPERTS = ExpertsOptions()
_INT4 = ExpertsOptions(weight_format="int4")
_PLACEMENT = PlacementOptions()
_REBALANCE = RebalanceOptions()


@dataclass
class TrainConfig:
    # ---- model
    model: str | None = _f(
        None,
        "local HF checkpoint folder (config.json + safetensors + tokenizer) or Hub id (org/name, "
        "from the local Hub cache or downloaded). "
        "Unset: the embedded demo model, tokenizer and dataset",
        "model",
    )
    dtype: str = _f(
        "bfloat16",
        "dtype of the non-expert weights (the experts are bf16 in the engine)",
        "model",
        choices=("bfloat16", "float32"),
    )
    device: str = _f(
        "auto",
        "device of the non-expert part: auto (cuda if available, else cpu), cpu, cuda, "
        "cuda:N, or several GPUs as cuda:0,cuda:1,... (the decoder layers are split evenly "
        "over them in order; needs a model folder)",
        "model",
    )
    engine_threads: int | None = _f(
        None,
        "CPU engine threads (unset: every core this process may use; "
        "with a GPU, leave a few cores to torch: see torch_threads)",
        "model",
    )
    torch_threads: int | None = _f(None, "torch CPU threads (unset: torch's default)", "model")
    engine_numa: str = _f(
        NUMA_DEFAULT,
        "CPU engine NUMA partitions: off, auto (one per NUMA node on a multi-socket host) or N "
        "virtual nodes (moetune.numa; results are bit-identical)",
        "model",
    )
    expert_parallel: str = _f(
        "auto",
        "under torchrun / accelerate launch with several processes: auto splits each MoE layer's "
        "experts over the ranks (expert parallelism; DDP for the rest); off refuses several processes",
        "model",
        choices=("auto", "off"),
    )
    data_parallel: str = _f(
        fsdp.DEFAULT.value,
        "under expert parallelism, the non-expert part (attention, shared experts, embeddings; their LoRA): "
        "ddp replicates it on every rank, fsdp2 shards it over the ranks per decoder layer (FSDP2, for a "
        "non-expert part that does not fit one GPU); the routed experts stay expert-parallel either way",
        "model",
        choices=tuple(m.value for m in fsdp.DataParallel),
    )
    ep_routing_profile: int = _f(
        0,
        "under expert parallelism: micro-batches per rank whose routing (counted on every rank, summed) "
        "assigns each MoE layer's experts to the ranks balanced by load, before training (the model is "
        "loaded twice); 0: by expert index",
        "model",
    )
    ep_rebalance_every: int = _f(
        _REBALANCE.every,
        "under expert parallelism: every N optimizer steps, move experts between ranks so that each MoE "
        "layer's experts are balanced by the routing of the last N steps (packed weights, LoRA rows and "
        "optimizer state travel; results unchanged); 0: never",
        "model",
    )
    ep_rebalance_min_gain: float = _f(
        _REBALANCE.min_gain,
        "a layer's experts move only if its busiest rank's token slots drop by more than this fraction",
        "model",
    )
    dist_timeout_s: float = _f(
        600.0,
        "seconds a rank waits for the others in a collective before failing (a dead rank stops the run)",
        "model",
    )
    expert_activations: str = _f(
        _EXPERTS.activations,
        "engine activations for backward: save (faster) or recompute (less host RAM)",
        "model",
        choices=("save", "recompute"),
    )
    expert_format: str = _f(
        _EXPERTS.weight_format,
        "frozen expert weights in the engine: bf16, int8 (per output "
        "channel) or int4 (grouped; see int4_group_size), quantized "
        "while loading, or fp8_block / mxfp4; a quantized checkpoint "
        "keeps its own format unless another than bf16 is named",
        "model",
        choices=tuple(weight_formats()),
    )
    int4_group_size: int = _f(
        _INT4.group_size, "int4 quantization group along the input dim (32, 64 or 128)", "model", choices=(32, 64, 128)
    )
    expert_cache_dir: str | None = _f(
        None,
        "folder caching the packed (quantized) experts per checkpoint, "
        "layer and format: later runs read them instead of re-quantizing; "
        "a stale or mismatched entry is rebuilt. Unset: no cache (needs a "
        "model folder)",
        "model",
    )
    expert_placement: str = _f(
        _PLACEMENT.mode,
        "where the routed experts compute, decided per step from the "
        "routing: auto (split between the CPU engine and the GPU, "
        "resident or streamed experts, when the model runs on CUDA; "
        "else the CPU engine), cpu (the CPU engine only) or gpu (every "
        "expert on the GPU)",
        "model",
        choices=PLACEMENT_MODES,
    )
    expert_gpu_budget_gib: float | None = _f(
        _PLACEMENT.gpu_budget_gib,
        "GPU memory for resident experts "
        "(GiB, all layers); unset: measured after the first steps (what "
        "is free after the model and its activations, with a margin)",
        "model",
    )
    # ---- data
    data: str | None = _f(
        None,
        "training data: comma-separated sources, each a .jsonl / .json / .parquet "
        "file, a folder of them (shards) or of a datasets.save_to_disk dataset, or a "
        "Hub dataset name (org/name), optionally with a mixing weight `:W` (the "
        "source's samples repeated W times; fractions sample; e.g. a.jsonl,b/:0.5). "
        "Unset: the embedded demo dataset (only with the demo model, whose "
        "word-level vocabulary is that dataset's)",
        "data",
    )
    data_format: str = _f(
        "auto",
        "record format: chat (`messages` list of {role, content}, content a string "
        "or a list of text parts), sharegpt (`conversations` of {from, value}), "
        "prompt_completion (TRL's `prompt` + `completion`: strings or message "
        "lists), alpaca (instruction / input / output or response, optional "
        "system / history), text (`text`), or auto (per source, from the columns)",
        "data",
        choices=("auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"),
    )
    data_columns: list[str] = _f(
        [],
        "column renames, canonical=yours (e.g. messages=dialog content=text); canonical names: "
        "messages conversations role content from value prompt completion instruction input output "
        "system history text",
        "data",
    )
    data_roles: list[str] = _f(
        [], "role renames on top of the usual ones (human/gpt/...), yours=canonical (e.g. bot=assistant)", "data"
    )
    chat_template: str | None = _f(
        None,
        "chat template overriding the tokenizer's: a Jinja file or a known name (the templates TRL ships: "
        "qwen3, deepseekv3, gptoss, glm4moe, llama3, qwen2_5, ...); saved with the adapter's tokenizer",
        "data",
    )
    num_proc: int | None = _f(
        None, "tokenizer worker processes (unset: 1 under 2000 records, else the usable cores, at most 8)", "data"
    )
    data_cache: bool = _f(
        True,
        "cache the tokenized data (keyed by the records, tokenizer, template and options): later runs and "
        "--resume read it instead of tokenizing again",
        "data",
    )
    data_cache_dir: str | None = _f(None, "folder of the tokenized-data cache (unset: output_dir/data-cache)", "data")
    eval_data: str | None = _f(
        None, "held-out eval data (sources as for data); unset: split eval_fraction off the training data", "data"
    )
    eval_fraction: float = _f(
        0.05, "fraction of the training records held out for eval when eval_data is unset (0: no eval)", "data"
    )
    max_length: int = _f(1024, "maximum tokens per sample (and per packed row)", "data")
    truncation: bool = _f(True, "truncate samples longer than max_length (false: drop them)", "data")
    loss_on: str = _f(
        "assistant",
        "tokens that carry loss: assistant (assistant turns / alpaca response; plain text is always all tokens) or all",
        "data",
        choices=("assistant", "all"),
    )
    packing: bool = _f(
        False,
        "pack several short samples into one row; position ids restart per sample "
        "and attention is block-diagonal (no cross-sample attention)",
        "data",
    )
    shuffle: bool = _f(True, "shuffle the training samples every epoch (seeded)", "data")
    # ---- LoRA
    lora_rank: int = _f(8, "LoRA rank r", "lora")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)", "lora")
    lora_dropout: float = _f(
        0.0, "LoRA dropout on attention / dense-MLP LoRA (expert LoRA runs in the engine without dropout)", "lora"
    )
    lora_attention: bool = _f(True, "LoRA on the attention projections", "lora")
    lora_mlp: bool = _f(True, "LoRA on dense MLP projections (dense layers and shared experts)", "lora")
    lora_experts: bool = _f(True, "LoRA on the routed experts (run inside the CPU engine)", "lora")
    seed: int = _f(0, "seed of the LoRA init, data order, eval split and dropout", "lora")
    # ---- optimization
    lr: float = _f(2e-4, "AdamW peak learning rate", "optimization")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas (two floats)", "optimization")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimization")
    adam_eps: float = _f(1e-8, "AdamW epsilon", "optimization")
    schedule: str = _f(
        "cosine", "learning-rate schedule after warmup", "optimization", choices=("cosine", "linear", "constant")
    )
    warmup_steps: int = _f(0, "linear warmup steps", "optimization")
    warmup_ratio: float = _f(
        0.0,
        "warmup as a fraction of the total optimizer steps (rounded up), used when warmup_steps is 0",
        "optimization",
    )
    max_steps: int | None = _f(None, "optimizer steps (unset: `epochs` passes over the data)", "optimization")
    epochs: float = _f(1.0, "passes over the training data when max_steps is unset", "optimization")
    micro_batch_size: int = _f(4, "samples (or packed rows) per forward/backward", "optimization")
    grad_accum: int = _f(1, "micro-batches per optimizer step", "optimization")
    max_grad_norm: float | None = _f(1.0, "gradient clipping (global L2 norm); unset: no clipping", "optimization")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (non-reentrant)", "optimization")
    # ---- run
    output_dir: str = _f(
        "runs/moetune-train",
        "run folder: adapter/, checkpoints/, metrics.jsonl, tensorboard/, plot, summary; one that holds "
        "a previous run is refused without --resume or --overwrite",
        "run",
    )
    save_every: int = _f(100, "checkpoint every N optimizer steps (0: only at the end / on Ctrl-C)", "run")
    keep_checkpoints: int = _f(2, "checkpoints kept (oldest removed)", "run")
    eval_every: int = _f(50, "eval loss every N steps (0: only at the end)", "run")
    log_every: int = _f(1, "metrics line every N steps", "run")
    resume: str | None = _f(
        None,
        "continue a run (same trajectory as an uninterrupted one): --resume alone: from output_dir's "
        "latest checkpoint; --resume PATH: from that checkpoint folder (checkpoints/step-N) or run "
        "folder (an older checkpoint of output_dir moves the later ones aside; another run's continues "
        "into an empty output_dir)",
        "run",
        flag={"nargs": "?", "const": "latest"},
    )
    overwrite: bool = _f(
        False,
        "start afresh in an output_dir that holds a previous run, removing its files (the tokenized-data "
        "cache is kept); without it (or --resume) such an output_dir is refused",
        "run",
    )
    init_adapter: str | None = _f(
        None, "start from this PEFT adapter folder's weights (e.g. a run's adapter/) instead of a fresh LoRA", "run"
    )
    stop_after_steps: int | None = _f(
        None, "stop (with a checkpoint) after this many steps in this invocation; resume later with --resume", "run"
    )
    merge_export: str | None = _f(None, "after training, write the merged full model (base + LoRA) here", "run")
    sample_prompts: list[str] = _f([], "user prompts to generate from before and after training", "run")
    max_new_tokens: int = _f(24, "tokens generated per sample prompt (greedy)", "run")
    progress: bool = _f(
        True,
        "progress bar (loss, lr, tokens/s, ETA) on stderr when it is a terminal; otherwise, or with "
        "--no-progress, an interval-averaged line every print_every steps",
        "run",
    )
    print_every: int = _f(10, "steps per progress line when there is no progress bar", "run")
    tensorboard: bool = _f(
        True, "TensorBoard event files in output_dir/tensorboard (false: drop tensorboard from report_to)", "run"
    )
    report_to: list[str] = _f(
        ["tensorboard"],
        "experiment trackers, through accelerate's: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
        "dvclive, swanlab, trackio (each needs its package; configure them as usual, e.g. WANDB_MODE=offline), "
        "all (every installed one) or none; local files go to output_dir/tensorboard and output_dir/trackers",
        "run",
    )
    sample_records: int = _f(
        2, "at the end, answers generated for this many eval (else train) records, next to the data's", "run"
    )
    plot: bool = _f(True, "PNG plot of the losses and throughput at the end", "run")
    placement_trace: str | None = _f(
        _PLACEMENT.trace,
        "write a Perfetto / chrome://tracing JSON trace of the "
        "run's last steps here (CPU engine jobs, GPU compute and "
        "copy streams on one timeline)",
        "run",
    )

    # ------------------------------------------------------------------ helpers
    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @property
    def is_demo(self) -> bool:
        return self.model is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Types, ranges and paths; raises ConfigError naming the field."""
        from moetune.train.run_dir import normalize_resume

        self.resume = normalize_resume(self.resume)
        if type(self.engine_numa) is int:  # a number of virtual nodes, unquoted in YAML
            self.engine_numa = str(self.engine_numa)
        for name, f in self.fields().items():
            setattr(self, name, _coerce(name, f, getattr(self, name)))
        if len(self.betas) != 2 or not all(RANGES["betas"].contains(b) for b in self.betas):
            raise ConfigError(f"betas must be two floats {RANGES['betas']}, got {self.betas}")
        check_ranges(self.to_dict(), RANGES, ConfigError)
        try:
            self.engine_numa = str(parse_numa(self.engine_numa))
        except ValueError as e:
            raise ConfigError(f"engine_numa: {e}") from None
        if not (self.lora_attention or self.lora_mlp or self.lora_experts):
            raise ConfigError("nothing to train: lora_attention, lora_mlp and lora_experts are all false")
        devs = self.device.split(",")
        if len(devs) == 1 and self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or cuda:0,cuda:1,..., got {self.device!r}")
        if len(devs) > 1:
            if not all(re.fullmatch(r"cuda:\d+", d) for d in devs) or len(set(devs)) != len(devs):
                raise ConfigError(f"device: a list of GPUs must be distinct cuda:N entries, got {self.device!r}")
            if self.is_demo:
                raise ConfigError("device: several GPUs need a model folder (model=...); the demo model is tiny")
        if self.data_parallel == fsdp.DataParallel.FSDP2.value:
            why = fsdp.unsupported_reason()
            if why is not None:
                raise ConfigError(f"data_parallel=fsdp2: {why}")
        self._check_paths()
        return self

    def _check_paths(self) -> None:
        if self.model is not None and not os.path.isdir(self.model):
            self.model = _resolve_hub_id(self.model)
        if self.model is not None:
            if not os.path.isdir(self.model):
                raise ConfigError(
                    f"model: {self.model!r} is not a folder (expected a local HF checkpoint folder with config.json)"
                )
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise ConfigError(f"model: {self.model!r} has no config.json (not a HF checkpoint folder)")
            if self.data is None:
                raise ConfigError(
                    "data: a training file is required with a model (the embedded dataset only "
                    "fits the embedded demo model)"
                )
        if self.expert_cache_dir is not None:
            if self.is_demo:
                raise ConfigError(
                    "expert_cache_dir needs a model folder (model=...): the embedded demo model is "
                    "built in memory, not loaded from a checkpoint"
                )
            if os.path.exists(self.expert_cache_dir) and not os.path.isdir(self.expert_cache_dir):
                raise ConfigError(f"expert_cache_dir: {self.expert_cache_dir!r} exists and is not a folder")
        for name in ("data", "eval_data"):
            p = getattr(self, name)
            if p is None:
                continue
            from moetune.train.formats import check_spec

            why = check_spec(p)
            if why is not None:
                raise ConfigError(f"{name}: {why}")
        if self.init_adapter is not None:
            from moetune.train.run_dir import check_init_adapter

            why = check_init_adapter(self.init_adapter)
            if why is not None:
                raise ConfigError(f"init_adapter: {why}")
        from moetune.train.trackers import check_report_to

        why = check_report_to(self.report_to)
        if why is not None:
            raise ConfigError(f"report_to: {why}")
        if self.chat_template is not None:
            from moetune.train.chat_masking import resolve_chat_template

            try:
                resolve_chat_template(self.chat_template)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        out = os.path.abspath(self.output_dir)
        parent = out
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ConfigError(f"output_dir: cannot create {self.output_dir!r} ({parent!r} is not a writable folder)")
        if self.placement_trace is not None:
            d = os.path.dirname(os.path.abspath(self.placement_trace))
            while not os.path.exists(d):
                d = os.path.dirname(d)
            if os.path.isdir(self.placement_trace) or not os.access(d, os.W_OK):
                raise ConfigError(f"placement_trace: cannot write {self.placement_trace!r} (a folder, or not writable)")
        if self.merge_export is not None and os.path.abspath(self.merge_export) == out:
            raise ConfigError("merge_export must differ from output_dir")
        if self.merge_export is not None and self.is_demo:
            raise ConfigError(
                "merge_export needs a model folder (model=...): the embedded demo model has no checkpoint to merge into"
            )
        if self.merge_export is not None and os.path.exists(self.merge_export):
            raise ConfigError(
                f"merge_export: {self.merge_export!r} exists already (the merged model goes to a new folder)"
            )


def _resolve_hub_id(model: str) -> str:
    """A Hub id (org/name) -> its local snapshot folder (moetune.hf.hub); anything else unchanged."""
    from moetune.hf import hub

    if not hub.is_hub_id(model):
        return model
    try:
        return hub.resolve_model(model)
    except hub.HubError as e:
        raise ConfigError(f"model: {e}") from None


# The valid range of every numeric option (the one table: validate() checks it before anything
# is loaded; tests/python/test_train_ranges.py checks that every int / float option has an entry
# or a list of choices). Unset (None) stays allowed for the optional ones.
RANGES: dict[str, Range] = {
    "engine_threads": Range(1),
    "torch_threads": Range(1),
    "dist_timeout_s": Range(1),
    "ep_routing_profile": Range(0),
    "ep_rebalance_every": Range(0),
    "ep_rebalance_min_gain": Range(0, 1, hi_open=True),
    "expert_gpu_budget_gib": Range(0),
    "eval_fraction": Range(0, 1, hi_open=True),
    "max_length": Range(1),
    "lora_rank": Range(1),
    "lora_alpha": Range(0, lo_open=True),  # 0: scaling 0, the adapter never changes the model
    "lora_dropout": Range(0, 1, hi_open=True),
    "seed": Range(0),
    "lr": Range(0, lo_open=True),
    "betas": Range(0, 1, hi_open=True),
    "weight_decay": Range(0),
    "adam_eps": Range(0, lo_open=True),
    "warmup_steps": Range(0),
    "max_steps": Range(1),
    "epochs": Range(0, lo_open=True),
    "micro_batch_size": Range(1),
    "grad_accum": Range(1),
    "max_grad_norm": Range(0, lo_open=True),  # < 0 ascends, 0 zeroes every step; unset: no clipping
    "save_every": Range(0),
    "keep_checkpoints": Range(1),
    "eval_every": Range(0),
    "log_every": Range(1),  # the step counter is taken modulo it
    "stop_after_steps": Range(1),
    "max_new_tokens": Range(1),
    "warmup_ratio": Range(0, 1, hi_open=True),
    "num_proc": Range(1),
    "print_every": Range(1),
    "sample_records": Range(0),
}


def field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type, optional) of a TrainConfig field from its annotation (a string under
    `from __future__ import annotations`): base is one of bool, int, float, str, list[float],
    list[str]; `Optional[X]`, `X | None` and `typing.List[...]` spellings all map onto these."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    optional = False
    if t.startswith("Optional[") and t.endswith("]"):
        t, optional = t[len("Optional[") : -1], True
    parts = t.split("|")
    if "None" in parts:
        parts.remove("None")
        t, optional = "|".join(parts), True
    if t.startswith("List["):
        t = "list[" + t[len("List[") :]
    return t, optional


def _coerce(name: str, f: dataclasses.Field, v):
    """Check/convert one value to the field's type (YAML gives ints for floats etc.)."""
    base, optional = field_type(f)
    if v is None:
        if optional:
            return None
        raise ConfigError(f"{name} may not be empty")
    try:
        if base == "bool":
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                return v.lower() in ("true", "yes", "1", "on")
            if not isinstance(v, bool):
                raise TypeError
            return v
        if base == "int":
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise TypeError
            return int(v)
        if base == "float":
            if isinstance(v, bool):
                raise TypeError
            return float(v)
        if base == "str":
            if not isinstance(v, str):
                raise TypeError
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {v!r}")
            return v
        if base == "list[float]":
            if isinstance(v, str):
                v = [x for x in v.replace(",", " ").split()]
            return [float(x) for x in v]
        if base == "list[str]":
            if isinstance(v, str):
                return [v]
            if not all(isinstance(x, str) for x in v):
                raise TypeError
            return list(v)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name} must be {base}, got {v!r} ({type(v).__name__})") from None
    raise AssertionError(f"unhandled field type {f.type} for {name}")


def unknown_key_error(key: str, where: str) -> ConfigError:
    valid = list(TrainConfig.fields())
    close = aliases.suggest(key, valid)
    hint = f" (did you mean {close!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}")


def load_yaml(path: str, notes: list[str] | None = None) -> dict[str, Any]:
    """The config file's values under TrainConfig names (other tools' names translated by
    moetune.train.aliases; what they ignore is appended to `notes`)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of key: value, got {type(raw).__name__}")
    valid = TrainConfig.fields()
    raw = translate_aliases(raw, path, notes)
    for k in raw:
        if k not in valid:
            raise unknown_key_error(str(k), path)
    # Relative paths in a config file are relative to the working directory, as in the other
    # fine-tuning tools and on the command line (made absolute here, so the run's saved config
    # names the same files from anywhere); a model that is no local path stays as written (a Hub id).
    for k in (
        "model",
        "output_dir",
        "merge_export",
        "expert_cache_dir",
        "placement_trace",
        "init_adapter",
        "data_cache_dir",
    ):
        v = raw.get(k)
        if isinstance(v, str) and not os.path.isabs(v) and (k != "model" or os.path.exists(v)):
            raw[k] = os.path.abspath(v)
    for k in ("data", "eval_data"):  # comma-separated sources with weights, Hub names among them
        if isinstance(raw.get(k), str):
            raw[k] = formats.absolute_spec(raw[k])
    return raw


def translate_aliases(values: dict[str, Any], where: str, notes: list[str] | None = None) -> dict[str, Any]:
    """Other tools' option names -> TrainConfig's (the alias hook; see moetune.train.aliases)."""
    try:
        out, ignored = aliases.translate(values, where, TrainConfig.fields())
    except aliases.AliasError as e:
        raise ConfigError(str(e)) from None
    if notes is not None:
        notes.extend(ignored)
    return out


def make_config(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """base (e.g. demo defaults) < file < overrides (flags); validated."""
    values: dict[str, Any] = {}
    for src, where in ((base, "defaults"), (file_values, "config file"), (overrides, "arguments")):
        for k, v in translate_aliases(src or {}, where).items():
            if k not in TrainConfig.fields():
                raise unknown_key_error(k, where)
            values[k] = v
    return TrainConfig(**values).validate()


# Fields a resumed run must share with the run that wrote the checkpoint (they
# decide the model, the adapter's shapes or the data stream).
RESUME_FIXED = (
    "model",
    "dtype",
    "data",
    "data_format",
    "eval_data",
    "eval_fraction",
    "max_length",
    "truncation",
    "loss_on",
    "packing",
    "shuffle",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_attention",
    "lora_mlp",
    "lora_experts",
    "seed",
    "micro_batch_size",
    "grad_accum",
    "expert_format",
    "int4_group_size",
    "data_columns",
    "data_roles",
    "chat_template",
    # The optimizer and the learning-rate schedule: a checkpoint restores AdamW's param groups
    # (lr, betas, eps, weight decay) and the scheduler (its base lr and the step count it
    # plans for), so a changed value would be silently overridden, or (steps, schedule,
    # warmup) make the rate jump. Resume refuses a change; to train on with other settings,
    # start a new run from the saved adapter.
    "lr",
    "betas",
    "weight_decay",
    "adam_eps",
    "schedule",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "epochs",
)


def save_run_config(cfg: TrainConfig, path: str) -> None:
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def check_resume_compatible(cfg: TrainConfig, path: str) -> None:
    """Raise ConfigError if cfg changes a RESUME_FIXED field of the run saved at path."""
    import yaml

    if not os.path.isfile(path):
        return
    with open(path) as fh:
        old = yaml.safe_load(fh) or {}
    changed = [
        f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED if k in old and old[k] != getattr(cfg, k)
    ]
    if changed:
        raise ConfigError(
            f"resume: these settings differ from the run being resumed ({path}): {'; '.join(changed)} "
            "(a resumed run keeps the model, data, adapter, optimizer and schedule settings it was "
            "started with; stop_after_steps and the run options may change)"
        )


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    else:
        d = f.default_factory()
    return "unset" if d is None else repr(d)


def tuple_betas(cfg: TrainConfig) -> tuple[float, float]:
    return (float(cfg.betas[0]), float(cfg.betas[1]))
