"""Disk cache of one layer's packed (e.g. quantized) experts.

Quantizing and packing a large MoE at every start costs minutes; the packed
bytes depend only on the source weights, the engine options that shape them
and the packed layout version. So a layer's packed buffers can be saved once
next to a manifest and read straight back into a fresh engine object.

Files, per cache key in `directory`:
  <name>.json               the manifest (JSON): cache format, packed layout
                            version, source identity, shapes, weight_format,
                            group_size, backward_weights, byte order, and per
                            buffer its name, offset, size and CRC-32
  <name>.<token>.bin        the buffers, each at a 4096-byte aligned offset

Validity: a cache entry is used only if every manifest field equals what is
asked for (source identity included) and the data file has the recorded size
and checksums; anything else is reported as the reason and, in
load_or_build, the entry is rebuilt and overwritten - never used.

Writes are atomic: the data goes to a temporary file, is fsynced and renamed
to a fresh unique name; then the manifest is written the same way (its rename
is the commit point); the previous data file is deleted afterwards. A crash
leaves either the old entry or the new one, never a mix (a later save removes
a crashed writer's leftovers). Writers in `directory` take turns on an
exclusive flock of the directory (several processes loading one model, e.g.
the ranks of `accelerate launch`); readers take no lock: a reader opens the
data file its manifest names and reads through that open file, so a writer
replacing the entry meanwhile cannot change what it reads; if the file was
already replaced, the reader reads the new manifest and tries again. So a
reader sees either the old complete entry or the new one.

A manifest that is not the expected structure (not an object, buffers not a
list of {name, offset, nbytes, crc32} with offsets inside the data, a data
file name with a path in it, ...) is damaged: the reason is reported and
load_or_build rebuilds the entry, never a crash.

What is cached: the packed weight buffers, which depend on the options in
PACKED_OPTIONS (weight_format, group_size, backward_weights; the manifest
records them). Not cached: options that do not shape them (activations,
activation / alpha / limit: they only configure the engine object built on a
hit) and the optional expert biases (small, unquantized: pass them as
`biases=(gate, up, down)` to load / load_or_build).

Options are a moetune.ExpertsOptions (`options=`) and / or its fields as
keywords (`weight_format="int4"`), exactly as MoEExperts takes them.

Source identity: any JSON-serialisable value that changes when the weights
do, e.g. `file_identity(paths)` (path, size, mtime of checkpoint shards: cheap)
or `tensor_fingerprint(gate, up, down)` (a hash of the bytes: exact, costs a
pass over the weights).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from moetune import _moetune_ext as _ext
from moetune.engine import Context, MoEExperts
from moetune.options import ExpertsOptions

CACHE_FORMAT = 1
#: The ExpertsOptions fields that shape the packed bytes (recorded in the manifest, part of
#: load_model's cache keys); the other options only configure the engine object.
PACKED_OPTIONS = ("weight_format", "group_size", "backward_weights")
_ALIGN = 4096
_CHUNK = 64 << 20  # CRC / IO granularity


def file_identity(paths: Iterable[os.PathLike]) -> dict:
    """Identity of checkpoint files: resolved path, size and mtime of each."""
    out = []
    for p in sorted(Path(p).resolve() for p in paths):
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": out}


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A BLAKE2b hash of the tensors' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def entry_name(key: str) -> str:
    """The file name stem of cache key `key` in its directory (readable part + hash)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _crc(view: memoryview) -> int:
    c = 0
    for i in range(0, len(view), _CHUNK):
        c = zlib.crc32(view[i : i + _CHUNK], c)
    return c


def _expected(key, source, num_experts, hidden_size, intermediate_size, options: ExpertsOptions) -> dict:
    return {
        "cache_format": CACHE_FORMAT,
        "layout_version": int(_ext.PACKED_LAYOUT_VERSION),
        "byteorder": sys.byteorder,
        "key": key,
        "source": source,
        "shape": {
            "num_experts": int(num_experts),
            "hidden_size": int(hidden_size),
            "intermediate_size": int(intermediate_size),
        },
        **{name: getattr(options, name) for name in PACKED_OPTIONS},
    }


def _difference(have, want, path: str = "") -> str:
    """The first place where two JSON values differ, as one short line."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in list(want) + [k for k in have if k not in want]:
            if have.get(k, _ABSENT) != want.get(k, _ABSENT):
                return _difference(have.get(k, _ABSENT), want.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (a, b) in enumerate(zip(have, want)):
            if a != b:
                return _difference(a, b, f"{path}[{i}]")

    def short(v):
        r = "absent" if v is _ABSENT else repr(v)
        return r if len(r) <= 120 else r[:117] + "..."

    return f"{path + ': ' if path else ''}cache has {short(have)}, wanted {short(want)}"


_ABSENT = object()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(experts: MoEExperts, directory: os.PathLike, key: str, source) -> Path:
    """Writes experts' packed buffers under `key`; returns the manifest path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = entry_name(key)
    manifest = _expected(
        key,
        json.loads(json.dumps(source)),
        experts.num_experts,
        experts.hidden_size,
        experts.intermediate_size,
        experts.options,
    )
    lock = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        return _save_locked(experts, d, name, manifest)
    finally:
        os.close(lock)


def _save_locked(experts: MoEExperts, d: Path, name: str, manifest: dict) -> Path:
    token = secrets.token_hex(6)
    data_name = f"{name}.{token}.bin"
    buffers, offset = [], 0
    tmp = d / f".{data_name}.tmp"
    try:
        with open(tmp, "wb") as f:
            for b in experts.packed_buffers():
                view = memoryview(b.array)
                pad = (-offset) % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(view)
                buffers.append({"name": b.name, "offset": offset, "nbytes": len(view), "crc32": _crc(view)})
                offset += len(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / data_name)
        manifest.update(data_file=data_name, data_bytes=offset, buffers=buffers)
        mpath = d / f"{name}.json"
        mtmp = d / f".{name}.{token}.json.tmp"
        with open(mtmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, mpath)  # the commit point
        _fsync_dir(d)
    except BaseException:
        for p in (tmp, d / f".{name}.{token}.json.tmp"):
            p.unlink(missing_ok=True)
        raise
    # The replaced data file, and leftovers of crashed writes of this key
    # (no other writer runs: the directory lock is held).
    for p in list(d.glob(f"{name}.*.bin")) + list(d.glob(f".{name}.*.tmp")):
        if p.name != data_name:
            p.unlink(missing_ok=True)
    return mpath


def _read_manifest(path: Path):
    """The manifest dict; None if absent; else the reason it is unusable (a str)."""
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        return f"unreadable manifest {path.name}: {e}"
    problem = _manifest_problem(m)
    return f"malformed manifest {path.name}: {problem}" if problem else m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _manifest_problem(m) -> str | None:
    """What is wrong with the structure of a parsed manifest (None: well-formed)."""
    if not isinstance(m, dict):
        return f"not a JSON object ({type(m).__name__})"
    df = m.get("data_file")
    if not isinstance(df, str) or not df or Path(df).name != df or df in (".", ".."):
        return f"data_file {df!r} is not a file name"
    size = m.get("data_bytes")
    if not _is_int(size) or size < 0:
        return f"data_bytes {size!r} is not a size"
    bufs = m.get("buffers")
    if not isinstance(bufs, list):
        return "buffers is not a list"
    for i, b in enumerate(bufs):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            return f"buffers[{i}] is not an object with a name"
        for k in ("offset", "nbytes", "crc32"):
            if not _is_int(b.get(k)) or b[k] < 0:
                return f"buffers[{i}].{k} = {b.get(k)!r} (a non-negative integer expected)"
        if b["offset"] + b["nbytes"] > size:
            return f"buffers[{i}] [{b['offset']}, +{b['nbytes']}) lies outside data_bytes {size}"
        if b["crc32"] >= 1 << 32:
            return f"buffers[{i}].crc32 = {b['crc32']} is not a CRC-32"
    return None


def load(
    ctx: Context,
    directory: os.PathLike,
    key: str,
    source,
    *,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    options: ExpertsOptions | None = None,
    biases=None,
    progress: Callable[[int], None] | None = None,
    **option_kwargs,
) -> tuple[MoEExperts | None, str]:
    """(experts, "hit") from a valid cache entry, else (None, the reason it was not used).

    options / option_kwargs: the experts' moetune.ExpertsOptions, as MoEExperts takes them.
    biases: optional (gate_bias, up_bias, down_bias) loaded into the experts on a hit.
    progress: called with the number of bytes after each chunk read from the data file.
    """
    options = ExpertsOptions.resolve(options, **option_kwargs)
    d = Path(directory)
    name = entry_name(key)
    want = _expected(key, json.loads(json.dumps(source)), num_experts, hidden_size, intermediate_size, options)
    for _attempt in range(_REPLACED_RETRIES):
        m = _read_manifest(d / f"{name}.json")
        if m is None:
            return None, "miss: no cache entry"
        if isinstance(m, str):
            return None, m
        for field, value in want.items():
            if m.get(field) != value:
                what = "stale source" if field == "source" else f"mismatched {field}"
                return None, f"{what}: {_difference(m.get(field, _ABSENT), value)}"
        data = d / m["data_file"]
        try:
            f = open(data, "rb", buffering=0)
        except FileNotFoundError:
            continue  # replaced by a writer since the manifest was read: read the new one
        except OSError as e:
            return None, f"unreadable data file {data.name}: {e}"
        with f:
            return _read_entry(f, m, data, ctx, num_experts, hidden_size, intermediate_size, options, biases, progress)
    return None, f"missing data file {data.name} (the entry kept being replaced while reading)"


_REPLACED_RETRIES = 20


def _read_entry(f, m, data, ctx, num_experts, hidden_size, intermediate_size, options, biases, progress):
    """The experts from the open data file f of manifest m (checked), or (None, reason)."""
    size = os.fstat(f.fileno()).st_size
    if size != m["data_bytes"]:
        return None, f"truncated data file {data.name}: {size} bytes, manifest says {m['data_bytes']}"
    ex = MoEExperts.empty(ctx, num_experts, hidden_size, intermediate_size, options)
    bufs = ex.packed_buffers()
    layout = [(b["name"], b["nbytes"]) for b in m["buffers"]]
    if layout != [(b.name, len(memoryview(b.array))) for b in bufs]:
        return None, f"mismatched buffer layout: cache has {layout}"
    for buf, b in zip(bufs, m["buffers"]):
        view = memoryview(buf.array).cast("B")  # the engine's own memory, filled in place
        f.seek(b["offset"])
        got = 0
        while got < len(view):
            n = f.readinto(view[got : got + _CHUNK])
            if not n:
                return None, f"truncated data file {data.name} in buffer {buf.name}"
            got += n
            if progress is not None:
                progress(n)
        if _crc(view) != b["crc32"]:
            return None, f"corrupted data file {data.name}: checksum of buffer {buf.name} differs"
    ex._ex.mark_loaded()  # every packed byte came from the verified entry
    if biases is not None:
        ex.load_biases(*biases)
    return ex, "hit"


def load_or_build(
    ctx: Context,
    directory: os.PathLike,
    key: str,
    source,
    build: Callable[[], MoEExperts],
    *,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    options: ExpertsOptions | None = None,
    biases=None,
    **option_kwargs,
) -> tuple[MoEExperts, str]:
    """The cached experts if valid, else build() (from the source weights) saved to the cache.

    Returns (experts, reason): "hit", or why the cache was rebuilt. build() must
    return MoEExperts with the same shapes and packed options (checked).
    """
    options = ExpertsOptions.resolve(options, **option_kwargs)
    ex, reason = load(
        ctx,
        directory,
        key,
        source,
        num_experts=num_experts,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        options=options,
        biases=biases,
    )
    if ex is not None:
        return ex, reason
    if not reason.startswith("miss"):
        warnings.warn(f"moetune.cache: rebuilding {key!r}: {reason}", stacklevel=2)
    ex = build()
    names = ("num_experts", "hidden_size", "intermediate_size") + PACKED_OPTIONS
    got = (ex.num_experts, ex.hidden_size, ex.intermediate_size) + tuple(getattr(ex.options, n) for n in PACKED_OPTIONS)
    want = (num_experts, hidden_size, intermediate_size) + tuple(getattr(options, n) for n in PACKED_OPTIONS)
    if got != want:
        raise ValueError(
            f"moetune.cache: build() for {key!r} returned experts with ({', '.join(names)}) = {got}, expected {want}"
        )
    save(ex, directory, key, source)
    return ex, reason
