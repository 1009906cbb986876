"""moetune.load_model(cache_dir=...): packed experts cached per layer and format.

A first load builds every layer from the checkpoint and writes its entry; a
second load reads every layer from the cache - no expert weight is read from
the checkpoint (a spy on the checkpoint reader, and a checkpoint whose expert
bytes were zeroed behind the cache's back still gives the original logits) -
and the logits are bit-identical to a load without a cache. A touched or
rewritten shard, another weight format, a swapped / truncated / corrupted
entry and an unwritable cache folder are each reported and rebuilt (or
written beside), never used.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tqdm.auto import tqdm

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from ckpt_util import rewrite, state_dict_of, to_layout, write_checkpoint  # noqa: E402
from test_hf_exactness import batch, build, ctx  # noqa: E402

import moetune  # noqa: E402
from moetune.hf import checkpoint as ckpt_mod  # noqa: E402
from moetune.hf import expert_cache, loader  # noqa: E402
from moetune.hf.loader import CacheRebuildWarning  # noqa: E402

LAYERS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def make_ckpt(tmp_path, family, layout="per_expert", shards=2):
    if family == "gpt_oss":
        from test_hf_gptoss import build as build_gptoss

        ref = build_gptoss()
    else:
        ref = build(family)
    return write_checkpoint(
        tmp_path / "ckpt", to_layout(state_dict_of(ref), layout, ref.config.model_type), ref.config, shards=shards
    )


def load(folder, cache=None, **kw):
    return moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False, cache_dir=cache, **kw)


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch()).logits


def is_expert_weight(key):
    return ".experts." in key and not key.endswith("_bias")


class ReadSpy:
    """Records every checkpoint key read through the loader's reader."""

    def __init__(self, monkeypatch):
        self.keys = []
        get, get_row = ckpt_mod.Reader.get, ckpt_mod.Reader.get_row
        monkeypatch.setattr(ckpt_mod.Reader, "get", lambda r, k: self.keys.append(k) or get(r, k))
        monkeypatch.setattr(ckpt_mod.Reader, "get_row", lambda r, k, i: self.keys.append(k) or get_row(r, k, i))


def zero_expert_bytes_keep_stat(folder):
    """Overwrites every expert weight's bytes with zeros in place, keeping each
    shard's size and mtime (what the cache's source identity looks at)."""
    for f in Path(folder).glob("*.safetensors"):
        st = f.stat()
        with open(f, "r+b") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            for key, info in header.items():
                if key != "__metadata__" and is_expert_weight(key):
                    b, e = info["data_offsets"]
                    fh.seek(8 + n + b)
                    fh.write(b"\0" * (e - b))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def entries(cache):
    return sorted(p.name for p in Path(cache).rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "family,layout,opts",
    [
        ("qwen3_moe", "per_expert", dict(weight_format="int4", group_size=32)),
        ("mixtral", "per_expert", dict(weight_format="int8")),
        ("gpt_oss", "fused", dict(weight_format="bf16")),
    ],
    ids=["qwen3-int4", "mixtral-int8", "gptoss-bf16"],
)
def test_second_load_reads_only_the_cache(tmp_path, monkeypatch, family, layout, opts):
    folder = make_ckpt(tmp_path, family, layout)
    cache = tmp_path / "cache"
    want = logits(load(folder, **opts))

    first = load(folder, cache, **opts)
    assert first.moetune_cache == {q: "miss: no cache entry" for q in LAYERS}
    assert torch.equal(logits(first), want)
    written = entries(cache)
    assert len(written) == 4 and sum(n.endswith(".json") for n in written) == 2, written

    spy = ReadSpy(monkeypatch)
    bars = []
    monkeypatch.setattr(
        loader, "progress_bar", lambda total, enabled: bars.append(tqdm(total=total, file=io.StringIO())) or bars[-1]
    )
    second = load(folder, cache, **opts)
    assert second.moetune_cache == {q: "hit" for q in LAYERS}
    assert spy.keys and not [k for k in spy.keys if is_expert_weight(k)], "a cache hit read expert weights"
    if family == "gpt_oss":  # biases are not cached: they still come from the checkpoint
        assert any(k.endswith("down_proj_bias") for k in spy.keys)
    assert torch.equal(logits(second), want), "cached experts differ from a load without cache"
    assert entries(cache) == written, "a hit must not rewrite the cache"
    # The progress bar counted the bytes read from the cache instead of the expert tensors.
    ck = ckpt_mod.Checkpoint(folder)
    nonexpert = sum(e.nbytes for k, e in ck.entries.items() if not is_expert_weight(k))
    cached = sum(b["nbytes"] for m in Path(cache).rglob("*.json") for b in json.loads(m.read_text())["buffers"])
    assert bars[-1].n == bars[-1].total == nonexpert + cached

    # Proof that nothing of the experts comes from the checkpoint: zero their bytes
    # behind the cache's back (same size and mtime, the limit of the identity check).
    zero_expert_bytes_keep_stat(folder)
    assert torch.equal(logits(load(folder, cache, **opts)), want)
    assert not torch.equal(logits(load(folder, **opts)), want), "the zeroed experts were not zeroed"


def test_touched_or_changed_checkpoint_is_rebuilt(tmp_path):
    opts = dict(weight_format="int8")
    folder = make_ckpt(tmp_path, "qwen3_moe", shards=3)
    cache = tmp_path / "cache"
    load(folder, cache, **opts)
    ck = ckpt_mod.Checkpoint(folder)
    shard_of = {q: {e.file for k, e in ck.entries.items() if k.startswith(q + ".")} for q in LAYERS}
    touched = sorted(shard_of[LAYERS[1]])[0]
    st = (folder / touched).stat()
    os.utime(folder / touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    stale = [q for q in LAYERS if touched in shard_of[q]]
    with pytest.warns(
        CacheRebuildWarning,
        match=r"not used, rebuilding: stale source: files\[\d\]\.mtime_ns: "
        r"cache has \d+, wanted \d+$",
    ) as rec:
        m = load(folder, cache, **opts)
    assert len(rec) == len(stale) and all("\n" not in str(w.message) for w in rec)
    assert {q for q, why in m.moetune_cache.items() if why != "hit"} == set(stale)
    assert load(folder, cache, **opts).moetune_cache == {q: "hit" for q in LAYERS}

    # New weights in a one-file checkpoint: stale, rebuilt from the new bytes.
    one = make_ckpt(tmp_path / "one", "qwen3_moe", shards=1)
    old = logits(load(one, cache, **opts))
    key = "model.layers.0.mlp.experts.3.up_proj.weight"
    rewrite(one, lambda t: {**t, key: t[key] * 2})
    with pytest.warns(CacheRebuildWarning, match="stale source: files"):
        new = load(one, cache, **opts)
    assert not torch.equal(logits(new), old)
    assert torch.equal(logits(new), logits(load(one, **opts)))
    assert len(list(Path(expert_cache.folder(cache, one)).glob("*.bin"))) == 2, "replaced data files must go"


def test_other_format_is_another_entry_and_a_swapped_entry_is_refused(tmp_path):
    folder = make_ckpt(tmp_path, "qwen3_moe")
    cache = tmp_path / "cache"
    formats = [
        dict(weight_format="int4", group_size=32),
        dict(weight_format="int4", group_size=64),
        dict(weight_format="int8"),
        dict(weight_format="int8", backward_weights="transposed_copy"),
        dict(weight_format="bf16"),
    ]
    want = [logits(load(folder, **f)) for f in formats]
    for f in formats:  # each format its own entries: all misses
        assert set(load(folder, cache, **f).moetune_cache.values()) == {"miss: no cache entry"}, f
    for f, w in zip(formats, want):
        m = load(folder, cache, **f)
        assert set(m.moetune_cache.values()) == {"hit"}, f
        assert torch.equal(logits(m), w), f
    assert not torch.equal(want[0], want[2])
    # An int4 entry put in the int8 entry's place is detected and rebuilt, never used.
    root = expert_cache.folder(cache, folder)
    q = LAYERS[0]
    int4 = root / f"{cache_entry(q, formats[0])}.json"
    int8 = root / f"{cache_entry(q, formats[2])}.json"
    shutil.copy(int4, int8)
    with pytest.warns(CacheRebuildWarning, match="mismatched key"):
        m = load(folder, cache, **formats[2])
    assert torch.equal(logits(m), want[2])
    # The same with the key rewritten too: the format itself is compared.
    man = json.loads(int4.read_text())
    man["key"] = json.loads(int8.read_text())["key"]
    int8.write_text(json.dumps(man))
    with pytest.warns(CacheRebuildWarning, match="mismatched weight_format: cache has 'int4', wanted 'int8'"):
        m = load(folder, cache, **formats[2])
    assert torch.equal(logits(m), want[2])


def cache_entry(qual, opts):
    from moetune.cache import entry_name

    return entry_name(expert_cache.entry_key(qual, moetune.ExpertsOptions(**opts)))


def test_truncated_or_corrupted_entry_is_rebuilt(tmp_path):
    opts = dict(weight_format="int4", group_size=32)
    folder = make_ckpt(tmp_path, "qwen3_moe")
    cache = tmp_path / "cache"
    want = logits(load(folder, cache, **opts))
    root = expert_cache.folder(cache, folder)
    data = sorted(root.glob(f"{cache_entry(LAYERS[1], opts)}.*.bin"))[0]
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.warns(CacheRebuildWarning, match=r"model\.layers\.1\.mlp\.experts.*truncated data file") as rec:
        m = load(folder, cache, **opts)
    assert len(rec) == 1 and m.moetune_cache[LAYERS[0]] == "hit"
    assert torch.equal(logits(m), want)
    data = sorted(root.glob(f"{cache_entry(LAYERS[0], opts)}.*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.warns(CacheRebuildWarning, match="corrupted data file .* checksum of buffer"):
        m = load(folder, cache, **opts)
    assert torch.equal(logits(m), want)
    assert load(folder, cache, **opts).moetune_cache == {q: "hit" for q in LAYERS}


def test_unwritable_cache_still_loads_and_memory_check_holds(tmp_path, monkeypatch):
    folder = make_ckpt(tmp_path, "qwen3_moe")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.warns(CacheRebuildWarning) as rec:
        m = load(folder, blocker, weight_format="int8")
    said = [str(w.message) for w in rec]
    assert sum("unreadable manifest" in w for w in said) == 2 and sum("could not write" in w for w in said) == 2, said
    # Both warnings point at load_model's caller (here: load() above), not into moetune.
    assert {w.filename for w in rec} == {__file__}, [(w.filename, w.lineno) for w in rec]
    assert all("not written" in why for why in m.moetune_cache.values())
    assert torch.equal(logits(m), logits(load(folder, weight_format="int8")))
    load(folder, tmp_path / "cache")
    monkeypatch.setattr(loader, "available_host_memory", lambda: 100_000)
    with pytest.raises(MemoryError, match="needs about"):
        load(folder, tmp_path / "cache")


def test_fp8_checkpoint_hit(tmp_path, monkeypatch):
    """DeepSeek-V3 block-FP8 experts: the entry holds the converted int8 experts; a hit
    reads neither the FP8 weights nor their scales, and its identity records the block."""
    from test_load_model import BLOCK, _fp8_pair

    _, _, a, _, _ = _fp8_pair(tmp_path)
    cache = tmp_path / "cache"
    want = logits(load(a, weight_format="int8"))
    first = load(a, cache, weight_format="int8")
    assert first.moetune_cache and set(first.moetune_cache.values()) == {"miss: no cache entry"}
    spy = ReadSpy(monkeypatch)
    second = load(a, cache, weight_format="int8")
    assert set(second.moetune_cache.values()) == {"hit"}
    assert not [k for k in spy.keys if ".experts." in k], "a cache hit read FP8 expert weights or scales"
    assert torch.equal(logits(second), want)
    sources = [json.loads(m.read_text())["source"] for m in Path(cache).rglob("*.json")]
    assert sources and all(s["fp8_block"] == list(BLOCK) for s in sources)
