"""What eval and chat share: the model options, the run folder's settings, loading.

An adapter written by `moetune train` sits in `<run>/adapter` next to the run's `config.yaml`;
its model, dtype and expert format are the defaults here, so `moetune chat --adapter
runs/x/adapter` needs nothing else. Flags given override them; without either, TrainConfig's
defaults apply (the one source of every default). No model anywhere: the embedded demo model
(as `moetune demo` trained it).
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any


class UsageError(ValueError):
    """A mistake the user fixes (printed as one line by moetune.commands.run)."""


# The TrainConfig fields that decide the model a command loads, and their flags.
MODEL_FIELDS = ("model", "dtype", "device", "engine_threads", "expert_format", "int4_group_size")


def add_model_args(p: argparse.ArgumentParser, *, adapter_required: bool = False) -> None:
    from moetune.train.config import TrainConfig, describe_default, flag_name

    fields = TrainConfig.fields()
    p.add_argument(
        "--adapter",
        required=adapter_required,
        metavar="DIR",
        help="PEFT adapter folder (moetune train writes RUN/adapter; its RUN/config.yaml supplies the "
        "defaults of the options below)",
    )
    for name in MODEL_FIELDS:
        f = fields[name]
        kw: dict[str, Any] = dict(
            dest=name,
            default=None,
            help=f"{f.metadata['help']} (default: the adapter's run, else {describe_default(f)})",
        )
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
            if isinstance(f.metadata["choices"][0], int):
                kw["type"] = int
        elif name == "engine_threads":
            kw["type"] = int
        p.add_argument(flag_name(name), **kw)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no loading progress bar")


def run_config(adapter: str | None) -> dict[str, Any]:
    """The settings of the `moetune train` run that wrote `adapter` ({} if not from one)."""
    if adapter is None:
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(adapter)), "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    return values if isinstance(values, dict) else {}


def model_config(args):
    """The TrainConfig of the model to load: flags > the adapter's run > defaults. The model
    (folder or Hub id) and the device are checked here (one-line errors)."""
    from moetune.hf import hub, preflight
    from moetune.train.config import TrainConfig

    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"adapter: {args.adapter} has no adapter_config.json (not a PEFT adapter folder)")
    run = run_config(args.adapter)
    values = {k: run[k] for k in MODEL_FIELDS if run.get(k) is not None and k != "device"}
    values.update({k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k, None) is not None})
    cfg = TrainConfig(**values)
    try:
        if cfg.model is not None:
            cfg.model = hub.resolve_model(cfg.model)
            preflight.check_model_folder(cfg.model)
        preflight.check_device(cfg.device)
    except (hub.HubError, preflight.PreflightError) as e:
        raise UsageError(str(e)) from None
    return cfg


def load(args):
    """(model ready for inference: base + adapter if any, tokenizer, input device, TrainConfig)."""
    from moetune.train.model import load_base, load_tokenizer, resolve_device

    cfg = model_config(args)
    if cfg.engine_threads is not None and cfg.engine_threads < 1:
        raise UsageError(f"engine_threads must be >= 1, got {cfg.engine_threads}")
    tok = load_tokenizer(cfg)
    device = resolve_device(cfg)
    model, handle = load_base(cfg, device, len(tok))
    if args.adapter is not None:
        import peft

        with warnings.catch_warnings():  # transformers 5.2x deprecation noise from inside PEFT
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = peft.PeftModel.from_pretrained(model, args.adapter, is_trainable=False)
    # Experts compute where the placement says (the CPU engine without CUDA); the expert LoRA
    # goes along as in training.
    if handle.placement is not None and handle.placement.start(device) != "cpu":
        handle.placement.adopt_lora(model)
    model.eval()  # callers run it under torch.no_grad (no global autograd switch: callable in-process)
    return model, tok, device, cfg
