"""A local Hugging Face safetensors checkpoint, read tensor by tensor.

`Checkpoint(path)` indexes a folder (one ``model.safetensors``, or
``model.safetensors.index.json`` + shards; a folder holding both is read from
``model.safetensors``, as transformers' from_pretrained does): key -> (file,
shape, dtype), read from the safetensors headers only. A damaged file (empty,
truncated, garbled header, malformed or incomplete index) is a ValueError
naming the file (and the key, where one is at fault). `Checkpoint.reader()` opens files on demand and
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
        if (self.path / "model.safetensors").is_file():  # transformers' precedence: before the index
            weight_map, files = None, ["model.safetensors"]
        elif index.is_file():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
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
            for key, entry in read_header(fpath).items():
                if key == "__metadata__":
                    self.metadata[fname] = entry
                    continue
                dt = entry["dtype"]
                if dt not in _DTYPES:
                    raise ValueError(f"moetune: {fname}: tensor {key} has dtype {dt}, which this loader does not read")
                self.entries[key] = Entry(fname, tuple(entry["shape"]), _DTYPES[dt])
            self.metadata.setdefault(fname, {})
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


def read_index(index: Path) -> dict[str, str]:
    """The weight_map (key -> shard file name) of a model.safetensors.index.json, checked."""
    try:
        raw = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"moetune: {index}: not a readable JSON index ({e})") from None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f'moetune: {index}: no "weight_map" object mapping tensor names to shard files')
    for key, fname in wm.items():
        if not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in Path(fname).parts:
            raise ValueError(f"moetune: {index}: weight_map[{key!r}] = {fname!r} is not a shard file name")
    return wm


def read_header(fpath: Path) -> dict:
    """The safetensors header of fpath ({key: {dtype, shape, data_offsets}}, plus
    "__metadata__"), checked against the file: 8-byte length, JSON, every tensor's offsets
    inside the data and consistent with its shape and dtype. ValueError names the file (and key)."""
    name = fpath.name
    try:
        size = fpath.stat().st_size
        with open(fpath, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes: too short for a safetensors header (empty or truncated file)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
            text = f.read(n)
        try:
            header = json.loads(text)
        except ValueError as e:
            raise ValueError(f"garbled header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError("garbled header (not a JSON object)")
    except OSError as e:
        raise ValueError(f"moetune: {name}: cannot read ({e})") from None
    except ValueError as e:
        raise ValueError(f"moetune: {name}: {e}") from None
    data_len = size - 8 - n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"moetune: {name}: __metadata__ must map strings to strings")
    for key, e in header.items():
        if key == "__metadata__":
            continue
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("dtype"), str)
            and isinstance(e.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
            and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"])
        )
        if not ok:
            raise ValueError(f"moetune: {name}: tensor {key}: malformed header entry {e!r}")
        begin, end = e["data_offsets"]
        if not 0 <= begin <= end <= data_len:
            raise ValueError(
                f"moetune: {name}: tensor {key}: data [{begin}, {end}) outside the file's {data_len} data bytes "
                "(truncated file?)"
            )
        if e["dtype"] in _DTYPES:
            numel = 1
            for d in e["shape"]:
                numel *= d
            if numel * torch.empty(0, dtype=_DTYPES[e["dtype"]]).element_size() != end - begin:
                raise ValueError(
                    f"moetune: {name}: tensor {key}: {end - begin} bytes do not hold shape {e['shape']} of {e['dtype']}"
                )
    return {k: v for k, v in header.items() if k != "__metadata__"} | {"__metadata__": meta}


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
        try:
            return self._file(key).get_tensor(key)
        except Exception as e:  # the file changed since it was indexed, or unreadable pages
            raise ValueError(f"moetune: {self.ckpt.entries[key].file}: cannot read tensor {key}: {e}") from e

    def get_row(self, key: str, i: int) -> torch.Tensor:
        """t[i] of a stacked tensor t, without reading the rest."""
        try:
            return self._file(key).get_slice(key)[i]
        except Exception as e:
            raise ValueError(f"moetune: {self.ckpt.entries[key].file}: cannot read row {i} of {key}: {e}") from e

    def close(self) -> None:
        with self._lock:
            files, self._files = self._files, {}
        for f in files.values():
            f.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
