"""Model side of `moetune train`: loading (ONE function, `load_base`), the LoRA
setup (which modules, seeded init) and greedy sample generation."""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import nn

from moetune.options import ExpertsOptions
from moetune.placement.options import PlacementOptions
from moetune.train.config import TrainConfig


def resolve_devices(cfg: TrainConfig) -> list[torch.device]:
    """The devices of the non-expert part, in layer order (inputs go to the first)."""
    if cfg.device == "auto":
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    devs = [torch.device(d) for d in cfg.device.split(",")]
    if devs[0].type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={cfg.device!r} but torch sees no CUDA device")
        missing = [str(d) for d in devs if d.index is not None and d.index >= torch.cuda.device_count()]
        if missing:
            raise RuntimeError(
                f"device={cfg.device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                f"not {', '.join(missing)}"
            )
    return devs


def resolve_device(cfg: TrainConfig) -> torch.device:
    return resolve_devices(cfg)[0]


def layer_device_map(num_layers: int, devices: list[torch.device]) -> dict:
    """load_model device map: decoder layers split evenly over `devices` in order
    (layer i on devices[i * n // num_layers]); embeddings and everything else on the
    first device, the final norm and LM head on the last (next to the last layer)."""
    n = len(devices)
    out = {"": str(devices[0])}
    for i in range(num_layers):
        out[f"model.layers.{i}"] = str(devices[i * n // num_layers])
    out["model.norm"] = out["lm_head"] = str(devices[-1])
    return out


def load_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (loaded before the model so data errors come first)."""
    from moetune.train import demo_model

    if cfg.is_demo:
        tok = demo_model.build_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {cfg.model} has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token  # padding carries no loss and no attention, so any id will do
    return tok


def experts_options(cfg: TrainConfig) -> ExpertsOptions:
    """The run's ONE moetune.ExpertsOptions (every MoE layer; the activation is the model's)."""
    return ExpertsOptions(
        activations=cfg.expert_activations,
        weight_format=cfg.expert_format,
        group_size=cfg.int4_group_size if cfg.expert_format == "int4" else None,
    )


def placement_options(cfg: TrainConfig) -> PlacementOptions:
    """The run's moetune.PlacementOptions. The calibration of the placement cost model is cached
    next to the packed experts when expert_cache_dir is set."""
    cal = None if cfg.expert_cache_dir is None else os.path.join(cfg.expert_cache_dir, "placement-calibration")
    return PlacementOptions(
        mode=cfg.expert_placement,
        gpu_budget_gib=cfg.expert_gpu_budget_gib,
        max_tokens=cfg.micro_batch_size * cfg.max_length,
        trace=cfg.placement_trace,
        calibration_cache_dir=cal,
    )


def engine_context(cfg: TrainConfig):
    """The CPU engine's Context: engine_threads threads, split per engine_numa."""
    import moetune
    from moetune.numa import parse_numa

    return moetune.Context(cfg.engine_threads, numa=parse_numa(cfg.engine_numa))


def load_base(cfg: TrainConfig, device: torch.device, vocab_size: int, *, expert_parallel=None, ctx=None):
    """(model with its experts on the engine, patch handle): the one place that
    loads a model. A model folder streams through moetune.load_model (experts
    straight into the engine, the rest to `device`); the demo model is built in
    memory and patched. expert_parallel / ctx: this rank's moetune.parallel.ExpertParallel
    and pinned engine Context under torchrun (moetune.train.distributed)."""
    import moetune
    import moetune.hf
    from moetune.train import demo_model

    dtype = getattr(torch, cfg.dtype)
    options, placement = experts_options(cfg), placement_options(cfg)
    ctx = engine_context(cfg) if ctx is None else ctx
    if not cfg.is_demo:
        devices = resolve_devices(cfg)
        if len(devices) > 1:
            import json

            with open(os.path.join(cfg.model, "config.json")) as f:
                layers = json.load(f)["num_hidden_layers"]
            device = layer_device_map(layers, devices)
        model = moetune.load_model(
            cfg.model,
            device=device,
            dtype=dtype,
            ctx=ctx,
            cache_dir=cfg.expert_cache_dir,
            options=options,
            placement=placement,
            expert_parallel=expert_parallel,
        )
        return model, model.moetune_handle
    model = demo_model.build_model(vocab_size, seed=0).to(dtype)
    handle = moetune.hf.patch(
        model,
        ctx=ctx,
        keep_original=False,
        options=options,
        placement=placement,
        expert_parallel=expert_parallel,
    )
    model.to(device)
    return model, handle


def _pattern(names: list[str]) -> list[str]:
    """Module names with layer indices generalised, deduplicated, as regexes."""
    out = []
    for n in names:
        p = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n))
        if p not in out:
            out.append(p)
    return out


def lora_targets(model: nn.Module, cfg: TrainConfig, expert_modules: list[str]) -> tuple[str | None, list[str]]:
    """(target_modules regex or None, target_parameters) for PEFT.

    attention: every nn.Linear inside a module named *self_attn / *attention;
    dense MLP: every nn.Linear inside an `mlp` (dense layers, shared experts)
    except routers / gates (names `gate`, `router`, `*_gate`, `*_router`);
    experts: gate_up_proj / down_proj of every engine-held experts module.
    """
    from moetune.hf.families import LORA_PARAMS

    attn, mlp = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        leaf = parts[-1]
        if any(p in ("self_attn", "attention", "attn") for p in parts[:-1]):
            attn.append(name)
        elif (
            "mlp" in parts[:-1]
            and leaf not in ("gate", "router")
            and not leaf.endswith(("_gate", "_router"))
            and "experts" not in parts
        ):
            mlp.append(name)
    names = (attn if cfg.lora_attention else []) + (mlp if cfg.lora_mlp else [])
    regex = "|".join(f"(?:{p})" for p in _pattern(names)) or None
    params = []
    if cfg.lora_experts:
        for q in expert_modules:
            suffix = ".".join(q.split(".")[-2:])
            for pname in LORA_PARAMS:
                if f"{suffix}.{pname}" not in params:
                    params.append(f"{suffix}.{pname}")
    return regex, params


def apply_lora(model: nn.Module, cfg: TrainConfig, handle):
    import peft

    regex, params = lora_targets(model, cfg, handle.module_names)
    if regex is None and not params:
        raise ValueError(
            "no LoRA targets found in this model for the selected lora_attention / lora_mlp / lora_experts"
        )
    # PEFT refuses lora_dropout together with target_parameters (expert LoRA has no
    # dropout: the engine computes B(A x) fused). So the adapter is created without
    # dropout and nn.Dropout is put on the ordinary (attention / MLP) LoRA layers
    # afterwards; the saved adapter_config.json says lora_dropout 0, which is what
    # PEFT needs to load it (dropout plays no part at inference).
    lcfg = peft.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=regex if regex is not None else [],
        target_parameters=params or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # PEFT's LoRA init (A random, B zero) draws from the global generator
    with warnings.catch_warnings():  # transformers 5.2x deprecation noise from inside PEFT
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        pm = peft.get_peft_model(model, lcfg)
    if cfg.lora_dropout > 0:
        from peft.tuners.lora import LoraLayer

        from moetune.hf import peft_lora

        for m in pm.modules():
            if isinstance(m, LoraLayer) and not peft_lora.is_param_wrapper(m):
                for k in list(m.lora_dropout.keys()):
                    m.lora_dropout[k] = nn.Dropout(p=cfg.lora_dropout)
    return pm


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy answers to user prompts (chat template if the tokenizer has one)."""
    was_training = model.training
    model.eval()
    outs = []
    try:
        for p in prompts:
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            else:
                ids = tok(p)["input_ids"]
            x = torch.tensor([ids], device=device)
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            outs.append(tok.decode(y[0, x.shape[1] :], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outs
