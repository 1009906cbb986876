"""moetune.cache: packed (quantized) experts saved to disk and reloaded.

Hit: the reloaded engine holds the same bytes and computes bit-identical
results. Stale source, mismatched format / group size / options / layout
version, corrupted and truncated data, an unreadable manifest: each is
detected (with its reason), never used, and load_or_build rebuilds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from op_cases import ALL, F32, I64, Case, assert_results_equal, get_ctx, make_inputs, run_engine

import moetune
import moetune.cache as cache

CASE = Case("cache", 9, 40, 24, 4, 2, 4, ALL, F32, I64, F32)
SHAPE = dict(num_experts=4, hidden_size=40, intermediate_size=24)


@pytest.fixture()
def inp():
    return make_inputs(CASE, 3)


def build_fn(inp, calls, **opts):
    def build():
        calls.append(opts)
        return moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **opts)

    return build


def packed(ex):
    return {b.name: bytes(memoryview(b.array)) for b in ex.packed_buffers()}


@pytest.mark.parametrize(
    "opts",
    [
        dict(weight_format="int4", group_size=32),
        dict(weight_format="int8", backward_weights="transposed_copy"),
        dict(weight_format="bf16"),
    ],
    ids=["int4g32", "int8_tcopy", "bf16"],
)
def test_hit_is_bit_identical_and_skips_build(tmp_path, inp, opts):
    src = cache.tensor_fingerprint(inp.gate, inp.up, inp.down)
    calls = []
    ex1, why1 = cache.load_or_build(
        get_ctx(), tmp_path, "layers.0.experts", src, build_fn(inp, calls, **opts), **SHAPE, **opts
    )
    assert why1.startswith("miss") and len(calls) == 1
    ex2, why2 = cache.load_or_build(
        get_ctx(), tmp_path, "layers.0.experts", src, build_fn(inp, calls, **opts), **SHAPE, **opts
    )
    assert why2 == "hit" and len(calls) == 1, "a valid cache entry must not rebuild"
    assert packed(ex2) == packed(ex1) and ex2.packed_bytes == ex1.packed_bytes
    assert ex2.options == ex1.options
    assert_results_equal(run_engine(ex2, inp), run_engine(ex1, inp), "cached vs built")
    # Only the manifest and one data file; no temporaries left behind.
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".json"]


def test_stale_source_is_rebuilt(tmp_path, inp):
    opts = dict(weight_format="int8")
    calls = []
    src = cache.tensor_fingerprint(inp.gate, inp.up, inp.down)
    cache.load_or_build(get_ctx(), tmp_path, "k", src, build_fn(inp, calls, **opts), **SHAPE, **opts)
    changed = inp.gate.clone()
    changed[0, 0, 0] += 1.0
    src2 = cache.tensor_fingerprint(changed, inp.up, inp.down)
    assert src2 != src
    ex, why = cache.load(get_ctx(), tmp_path, "k", src2, **SHAPE, **opts)
    assert ex is None and why.startswith("stale source")
    with pytest.warns(UserWarning, match="rebuilding 'k': stale source"):
        _, why = cache.load_or_build(get_ctx(), tmp_path, "k", src2, build_fn(inp, calls, **opts), **SHAPE, **opts)
    assert len(calls) == 2 and why.startswith("stale source")
    assert cache.load(get_ctx(), tmp_path, "k", src2, **SHAPE, **opts)[1] == "hit"
    assert len(list(tmp_path.glob("*.bin"))) == 1, "the replaced data file must be removed"


def test_file_identity_changes_with_the_file(tmp_path):
    f = tmp_path / "model-00001.safetensors"
    f.write_bytes(b"x" * 10)
    a = cache.file_identity([f])
    f.write_bytes(b"y" * 11)
    assert cache.file_identity([f]) != a


@pytest.mark.parametrize(
    "asked,field",
    [
        (dict(weight_format="int4", group_size=64), "weight_format"),
        (dict(weight_format="int8", backward_weights="transposed_copy"), "backward_weights"),
        (dict(weight_format="bf16"), "weight_format"),
    ],
)
def test_mismatched_options_are_not_used(tmp_path, inp, asked, field):
    opts = dict(weight_format="int8")
    cache.save(moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **opts), tmp_path, "k", "src")
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **asked)
    assert ex is None and why.startswith(f"mismatched {field}"), why


def test_mismatched_group_size_and_shape_and_layout_version(tmp_path, inp):
    opts = dict(weight_format="int4", group_size=32)
    mpath = cache.save(moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **opts), tmp_path, "k", "src")
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, weight_format="int4", group_size=128)
    assert ex is None and why.startswith("mismatched group_size"), why
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **{**SHAPE, "hidden_size": 48}, **opts)
    assert ex is None and why.startswith("mismatched shape"), why
    m = json.loads(mpath.read_text())
    m["layout_version"] -= 1
    mpath.write_text(json.dumps(m))
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **opts)
    assert ex is None and why.startswith("mismatched layout_version"), why


def _data_file(tmp_path) -> Path:
    (f,) = tmp_path.glob("*.bin")
    return f


def test_corrupted_truncated_and_unreadable_entries_are_rebuilt(tmp_path, inp):
    opts = dict(weight_format="int4", group_size=64)
    calls = []
    b = build_fn(inp, calls, **opts)
    ex0, _ = cache.load_or_build(get_ctx(), tmp_path, "k", "src", b, **SHAPE, **opts)
    good = packed(ex0)
    # One flipped byte inside a buffer.
    f = _data_file(tmp_path)
    raw = bytearray(f.read_bytes())
    m = json.loads(next(tmp_path.glob("*.json")).read_text())
    raw[m["buffers"][1]["offset"] + 3] ^= 0x10
    f.write_bytes(bytes(raw))
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **opts)
    assert ex is None and why.startswith("corrupted data file") and m["buffers"][1]["name"] in why, why
    with pytest.warns(UserWarning, match="corrupted"):
        ex, _ = cache.load_or_build(get_ctx(), tmp_path, "k", "src", b, **SHAPE, **opts)
    assert len(calls) == 2 and packed(ex) == good
    # Truncated.
    f = _data_file(tmp_path)
    f.write_bytes(f.read_bytes()[:-100])
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **opts)
    assert ex is None and why.startswith("truncated data file"), why
    with pytest.warns(UserWarning, match="truncated"):
        cache.load_or_build(get_ctx(), tmp_path, "k", "src", b, **SHAPE, **opts)
    assert len(calls) == 3
    # Half-written manifest (e.g. by a foreign tool; ours are atomic).
    mp = next(tmp_path.glob("*.json"))
    mp.write_text(mp.read_text()[:40])
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **opts)
    assert ex is None and why.startswith("unreadable manifest"), why
    with pytest.warns(UserWarning, match="unreadable manifest"):
        cache.load_or_build(get_ctx(), tmp_path, "k", "src", b, **SHAPE, **opts)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.bin"))) == 1
    # Data file deleted.
    _data_file(tmp_path).unlink()
    ex, why = cache.load(get_ctx(), tmp_path, "k", "src", **SHAPE, **opts)
    assert ex is None and why.startswith("missing data file"), why


def test_failed_write_leaves_the_old_entry(tmp_path, inp, monkeypatch):
    opts = dict(weight_format="int8")
    ex = moetune.MoEExperts(get_ctx(), inp.gate, inp.up, inp.down, **opts)
    cache.save(ex, tmp_path, "k", "v1")
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(ex, tmp_path, "k", "v2")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "temporaries left or old entry touched"
    assert cache.load(get_ctx(), tmp_path, "k", "v1", **SHAPE, **opts)[1] == "hit"


def test_build_with_other_options_is_refused(tmp_path, inp):
    with pytest.raises(ValueError, match="build\\(\\) for 'k' returned experts with"):
        cache.load_or_build(
            get_ctx(), tmp_path, "k", "src", build_fn(inp, [], weight_format="int8"), **SHAPE, weight_format="int4"
        )


def test_hit_with_gpt_oss_options_and_biases(tmp_path, inp):
    E, I, H = 4, 24, 40
    g = torch.Generator().manual_seed(4)
    biases = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g))
    opts = dict(weight_format="int4", group_size=32)
    act = dict(activation="gpt_oss", alpha=1.5, limit=5.0)

    def build():
        return moetune.MoEExperts(
            get_ctx(),
            inp.gate,
            inp.up,
            inp.down,
            gate_bias=biases[0],
            up_bias=biases[1],
            down_bias=biases[2],
            **opts,
            **act,
        )

    built, _ = cache.load_or_build(get_ctx(), tmp_path, "k", "src", build, **SHAPE, **opts, biases=biases, **act)
    hit, why = cache.load_or_build(get_ctx(), tmp_path, "k", "src", build, **SHAPE, **opts, biases=biases, **act)
    assert why == "hit" and hit.has_biases == (True, True, True) and hit.activation == "gpt_oss"
    assert_results_equal(run_engine(hit, inp), run_engine(built, inp), "cached gpt-oss experts vs built")
