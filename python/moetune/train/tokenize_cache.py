"""Tokenising the canonical records: in parallel (`num_proc` worker processes
through `datasets.map`), with a progress bar, and cached between runs.

The cache entry of a set of records is keyed by a hash of everything the
result depends on: the records themselves (after mixing and the eval split, as
JSON), the tokenizer (its vocabulary and merges, special tokens and chat
template), the encoding options (max_length, truncation, loss_on) and
ENCODING_VERSION (bumped whenever the encoding logic changes). A second run
on the same data — `--resume` among them — reads the entry instead of
tokenising again. An entry is a folder written by `datasets.save_to_disk`
plus stats.json, first written under a temporary name and renamed into place,
so a killed run never leaves a half entry that a later run would read.

Per-record failures do not raise inside the workers: each row carries a status
(0 ok, 1 truncated, 2 too long and dropped, 3 no token carries loss, 4 error)
and an error text naming its file and line; the caller reports them.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil

ENCODING_VERSION = 1
OK, TRUNCATED, TOO_LONG, NO_LOSS, ERROR = range(5)


@dataclasses.dataclass
class EncodeStats:
    records: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    h.update(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(getattr(tok, "chat_template", None), sort_keys=True).encode())
    return h.hexdigest()


def cache_key(rows: list[str], tok, options: dict) -> str:
    h = hashlib.sha256()
    h.update(f"moetune-encoding-{ENCODING_VERSION}\n".encode())
    h.update(tokenizer_fingerprint(tok).encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    for r in rows:
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def default_num_proc(n_records: int) -> int:
    """Worker processes when num_proc is unset: one for small sets (starting workers costs
    more than it saves), else the usable cores, at most 8."""
    if n_records < 2000:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


def encode_records(
    recs: list[str],
    wheres: list[str],
    encoder,
    *,
    options: dict,
    cache_dir: str | None,
    num_proc: int | None,
    progress: bool,
    desc: str,
):
    """(datasets.Dataset of input_ids / labels / status / error, cache outcome: hit, miss or off)."""
    import datasets

    key = cache_key([w + "\t" + r for w, r in zip(wheres, recs)], encoder.tok, options) if cache_dir else None
    entry = os.path.join(cache_dir, key) if cache_dir else None
    if entry is not None and os.path.isfile(os.path.join(entry, "done")):
        try:
            return datasets.load_from_disk(entry, keep_in_memory=True), "hit"
        except Exception:
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuilt below
    ds = datasets.Dataset.from_dict({"rec": recs, "where": wheres})
    nproc = num_proc if num_proc is not None else default_num_proc(len(recs))
    if progress:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        out = ds.map(
            encoder.map_batch,
            batched=True,
            batch_size=64,
            remove_columns=["rec"],
            num_proc=nproc if nproc > 1 and len(recs) > 1 else None,
            keep_in_memory=True,
            load_from_cache_file=False,
            desc=desc,
        )
    finally:
        datasets.disable_progress_bars()
    if entry is None:
        return out, "off"
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{entry}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.save_to_disk(tmp)
    with open(os.path.join(tmp, "done"), "w") as fh:
        fh.write(json.dumps(options) + "\n")
    publish(tmp, entry)
    return out, "miss"


def publish(tmp: str, entry: str) -> None:
    """Moves the finished folder `tmp` to `entry` (one rename). The ranks of a torchrun launch all
    tokenize the same data at the same time and race to publish the same key: the first wins, and an
    entry another process published complete (its "done" written) is the same content, so it is
    kept as it is and ours dropped; it is never deleted, since a third rank may be reading it after
    its cache hit. Only a leftover without "done" (not written by this code: a damaged folder) is
    replaced."""
    for attempt in range(2):
        try:
            os.rename(tmp, entry)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(entry):
                raise
        if os.path.isfile(os.path.join(entry, "done")):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if attempt:
            raise OSError(
                errno.ENOTEMPTY, f"moetune: tokenization cache entry {entry}: a folder without 'done' stays in the way"
            )
        shutil.rmtree(entry, ignore_errors=True)  # damaged: replaced by ours
