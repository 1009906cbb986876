"""load_model's use of the packed-experts disk cache (`moetune.cache`): where a
checkpoint's entries live, what one MoE layer's entry is called, and the
identity of the checkpoint data it was built from.

Layout: `cache_dir/<checkpoint folder name>-<hash of its resolved path>/`
holds one entry per (MoE layer, packed format): the key names the layer and
the options that shape the packed bytes (`moetune.cache.PACKED_OPTIONS`:
weight_format, int4 group size, backward_weights), so int4 / int8 / bf16 entries of one checkpoint live side
by side and switching formats never overwrites another format's entry.

Source identity of a layer (checked on every load; any difference = stale,
rebuilt): the checkpoint folder's resolved path; for each safetensors file
holding the layer's expert weights (and FP8 scales) its name, size and mtime
(ns); a SHA-1 of the sorted (key, shape, dtype) list of those tensors; the
family, the FP8 block size and LOADER_VERSION. This costs a stat per shard
and no reading of tensor data, so a warm load reads only the cache.

Limits of that choice: a shard rewritten in place with exactly the same size
and the same mtime (e.g. its old mtime restored on purpose with `touch -d` /
`cp -p` / `rsync -t` over different bytes of the same length) is not noticed;
moving or copying the checkpoint to another path does count as a change (safe:
a rebuild). The expert biases (gpt-oss) are not cached: they are read from the
checkpoint on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from moetune.hf import fp8 as fp8_mod
from moetune.hf.checkpoint import Checkpoint
from moetune.options import ExpertsOptions

# Bump when the loader's mapping of checkpoint tensors onto engine experts
# changes (key renames, gate/up split, dequantization): older entries then go stale.
LOADER_VERSION = 1


def folder(cache_dir: os.PathLike, checkpoint: os.PathLike) -> Path:
    """The checkpoint's own folder inside cache_dir (readable name + path hash)."""
    resolved = str(Path(checkpoint).resolve())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(resolved).name)[:60] or "checkpoint"
    return Path(cache_dir) / f"{name}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


def entry_key(qual: str, options: ExpertsOptions) -> str:
    """Cache key of one MoE layer in one packed format (the options' packed fields:
    weight_format, group_size where it applies, backward_weights)."""
    fmt = options.weight_format
    tag = f"{fmt}-g{options.group_size}" if options.group_size else fmt
    return f"{qual}.{tag}.{options.backward_weights}"


def layer_source(ckpt: Checkpoint, keys, family: str, block) -> dict:
    """Source identity of one layer's expert weights: `keys` are the checkpoint
    keys the loader reads them from (weights and FP8 scales, not biases)."""
    keys = sorted(keys)
    tensors = [[k, list(ckpt.entries[k].shape), str(ckpt.entries[k].dtype).replace("torch.", "")] for k in keys]
    files = []
    for fname in sorted({ckpt.entries[k].file for k in keys}):
        st = (ckpt.path / fname).stat()
        files.append({"name": fname, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    fp8 = any(ckpt.entries[k].dtype == fp8_mod.E4M3 for k in keys)
    return {
        "loader_version": LOADER_VERSION,
        "checkpoint": str(ckpt.path.resolve()),
        "family": family,
        "fp8_block": list(block) if (fp8 and block is not None) else None,
        "files": files,
        "num_tensors": len(tensors),
        "tensors_sha1": hashlib.sha1(json.dumps(tensors).encode()).hexdigest(),
    }
