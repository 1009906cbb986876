"""Checks a command runs before loading anything, each failing with one line that says what to do.

A model folder must be a Hugging Face checkpoint of a MoE family moetune supports (a dense model
has no routed experts to put on the engine: PEFT trains it directly), with safetensors weights
(PyTorch `.bin` checkpoints are pickles the streaming loader does not read); a CUDA device must
exist. The loader itself checks the same things more deeply (tensors, shapes, host RAM) once it
runs; these checks only move the common mistakes before the slow part, with a plain message.
"""

from __future__ import annotations

import json
import os


class PreflightError(ValueError):
    """A model folder or device a command cannot use (the message is the whole story)."""


def check_model_folder(path: str) -> str:
    """The folder's family name; PreflightError for a non-checkpoint, dense / unsupported or
    .bin-only folder."""
    from moetune.hf import families

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise PreflightError(f"model: {path} has no config.json (not a Hugging Face checkpoint folder)")
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    fam = families.by_model_type(model_type)
    if fam is None:
        raise PreflightError(
            f"model: {path} is a {model_type!r} model, not one of the MoE families moetune runs "
            f"({', '.join(f.name for f in families.FAMILIES)}); a dense model has no routed experts for the "
            "engine: train it with transformers + PEFT directly"
        )
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names) and "model.safetensors.index.json" not in names:
        bins = [n for n in names if n.endswith(".bin") or n == "pytorch_model.bin.index.json"]
        what = "only PyTorch .bin weights" if bins else "no weights"
        raise PreflightError(
            f"model: {path} has {what}; moetune streams safetensors checkpoints: convert it once with "
            "transformers (AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)) or use the "
            "repo's safetensors revision"
        )
    return fam.name


def check_device(device: str) -> None:
    """PreflightError when `device` names CUDA and torch sees no (or not that) GPU."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PreflightError(
            f"device {device}: torch sees no CUDA GPU (torch {torch.__version__}, {build}); use --device cpu (or auto)"
        )
    n = torch.cuda.device_count()
    for d in device.split(","):
        if ":" in d and int(d.split(":")[1]) >= n:
            raise PreflightError(f"device {device}: torch sees {n} CUDA device(s), not {d}")


def check_train(cfg) -> None:
    """What `moetune train` checks before loading: the device, and the model folder if any."""
    check_device(cfg.device)
    if cfg.model is not None:
        check_model_folder(cfg.model)
