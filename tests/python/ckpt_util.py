"""Writing tiny checkpoints in the key layouts real MoE checkpoints use, for
the loader / merge tests and the load benchmark. Written by hand from the
published naming (not from moetune's key map), so the tests check the map.

Layouts:
* "per_expert": ``model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight``
  (Qwen/DeepSeek/GLM/OLMoE as published); Mixtral:
  ``model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight`` and
  ``block_sparse_moe.gate``.
* "fused": the transformers-5 module keys (``experts.gate_up_proj`` [E, 2I, H],
  ``experts.down_proj`` [E, H, I]).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
STD_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FUSED = re.compile(r"^(?P<qual>.+\.experts)\.(?P<p>gate_up_proj|down_proj)$")


def state_dict_of(model) -> dict[str, torch.Tensor]:
    """The model's tensors under its own (fused) keys, tied aliases dropped."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for target in getattr(model, "all_tied_weights_keys", None) or {}:
        sd.pop(target, None)
    return sd


def to_layout(sd: dict[str, torch.Tensor], layout: str, model_type: str) -> dict[str, torch.Tensor]:
    if layout == "fused":
        return dict(sd)
    assert layout == "per_expert", layout
    mixtral = model_type == "mixtral"
    names = MIXTRAL_NAMES if mixtral else STD_NAMES
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m is None:
            out[k.replace(".mlp.", ".block_sparse_moe.") if mixtral else k] = v
            continue
        qual = m.group("qual").replace(".mlp.", ".block_sparse_moe.") if mixtral else m.group("qual")
        if m.group("p") == "gate_up_proj":
            I = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{qual}.{e}.{names['gate']}.weight"] = v[e, :I].clone()
                out[f"{qual}.{e}.{names['up']}.weight"] = v[e, I:].clone()
        else:
            for e in range(v.shape[0]):
                out[f"{qual}.{e}.{names['down']}.weight"] = v[e].clone()
    return out


def write_checkpoint(folder, tensors: dict[str, torch.Tensor], config, *, shards: int = 1, config_extra=None):
    """config.json + model.safetensors, or `shards` files + index json."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    d = config.to_dict()
    d.update(config_extra or {})
    (folder / "config.json").write_text(json.dumps(d, indent=1))
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    per = -(-len(keys) // shards)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per : (i + 1) * per]
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return folder


def rewrite(folder, edit):
    """Apply edit(dict of tensors) -> dict to a one-file checkpoint in place."""
    from safetensors.torch import load_file

    f = os.path.join(folder, "model.safetensors")
    t = edit(load_file(f))
    save_file(t, f, metadata={"format": "pt"})


def host_need_besides_packed(folder, model) -> int:
    """What moetune.load_model needs in host RAM besides the packed experts, counted the obvious
    way: the largest layer's expert tensors as the checkpoint stores them (one layer is read
    unpacked at a time) plus `model`'s non-expert tensors (as loaded, all on the CPU)."""
    from safetensors import safe_open

    per_layer: dict[str, int] = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():
                if ".mlp.experts." in k:
                    t = r.get_slice(k)
                    n = torch.empty(0, dtype=_DTYPES[t.get_dtype()]).element_size()
                    for d in t.get_shape():
                        n *= d
                    layer = k.split(".mlp.experts.")[0]
                    per_layer[layer] = per_layer.get(layer, 0) + n
    nonexpert = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".mlp.experts." not in k)
    return max(per_layer.values()) + nonexpert


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
