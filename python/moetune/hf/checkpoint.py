"""A local Hugging Face safetensors checkpoint, read tensor by tensor.

`Checkpoint(path)` indexes a folder (``model.safetensors.index.json`` +
shards, or one ``model.safetensors``): key -> (file, shape, dtype), read from
the safetensors headers only. `Checkpoint.reader()` opens files on demand and
closes them when the `with` block ends: safetensors memory-maps its files, and
pages read through a mapping count in the process's resident set until the
mapping goes away, so a streaming loader opens a reader per layer to keep at
most one layer's file pages resident.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors dtype names -> torch dtypes (what a transformers checkpoint may hold).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES["F8_E4M3"] = torch.float8_e4m3fn
if hasattr(torch, "float8_e5m2"):
    _DTYPES["F8_E5M2"] = torch.float8_e5m2


@dataclass(frozen=True)
class Entry:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


class Checkpoint:
    """Index of the tensors of a local safetensors checkpoint folder."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"moetune: {self.path} has neither model.safetensors nor model.safetensors.index.json "
                "(only safetensors checkpoints are supported)"
            )
        self.sharded = weight_map is not None
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise FileNotFoundError(f"moetune: shard {fname} listed in {index} is missing")
            with safe_open(str(fpath), framework="pt") as f:
                self.metadata[fname] = f.metadata() or {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    dt = sl.get_dtype()
                    if dt not in _DTYPES:
                        raise ValueError(
                            f"moetune: {fname}: tensor {key} has dtype {dt}, which this loader does not read"
                        )
                    self.entries[key] = Entry(fname, tuple(sl.get_shape()), _DTYPES[dt])
        if weight_map is not None:
            for key, fname in weight_map.items():
                e = self.entries.get(key)
                if e is None or e.file != fname:
                    raise ValueError(f"moetune: {index.name} maps {key} to {fname}, but that shard does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def reader(self) -> Reader:
        return Reader(self)


class Reader:
    """Reads tensors (or one row-block of a stacked tensor) from open files;
    closes (unmaps) every file it opened when its `with` block ends."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()  # loader threads share one reader

    def _file(self, key: str):
        e = self.ckpt.entries[key]
        with self._lock:
            f = self._files.get(e.file)
            if f is None:
                f = safe_open(os.fspath(self.ckpt.path / e.file), framework="pt")
                f.__enter__()
                self._files[e.file] = f
        return f

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def get_row(self, key: str, i: int) -> torch.Tensor:
        """t[i] of a stacked tensor t, without reading the rest."""
        return self._file(key).get_slice(key)[i]

    def close(self) -> None:
        with self._lock:
            files, self._files = self._files, {}
        for f in files.values():
            f.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
