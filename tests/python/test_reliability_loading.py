"""Issue 13, loading: damaged checkpoints name the file (and key), model.safetensors + index
follow transformers' precedence, a non-finite weight at quantization names layer and expert; the
expert cache: malformed manifests are rebuilt, a reader racing a writer always gets a complete
entry; property-based fuzzing (hypothesis) of the safetensors-header, manifest and YAML parsers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from ckpt_util import state_dict_of, to_layout, write_checkpoint  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_hf_exactness import build, ctx  # noqa: E402

import moetune  # noqa: E402
from moetune import cache  # noqa: E402
from moetune.hf.checkpoint import Checkpoint  # noqa: E402

PY = os.path.dirname(os.path.dirname(moetune.__file__))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def qwen():
    ref = build("qwen3_moe")
    return ref, to_layout(state_dict_of(ref), "per_expert", "qwen3_moe")


def _ckpt(tmp_path, qwen, shards=1):
    ref, sd = qwen
    return write_checkpoint(tmp_path / "c", sd, ref.config, shards=shards)


# ---- damaged checkpoints name the culprit ----


def _shard(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")[-1]


DAMAGE = {
    "empty": (lambda b: b"", "too short for a safetensors header"),
    "truncated data": (lambda b: b[: len(b) - 100], "outside the file's"),
    "truncated header": (lambda b: b[:20], "exceeds the file"),
    "garbled header": (lambda b: b[:8] + b"#" * (len(b) - 8), "garbled header"),
}


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_shard_names_the_file(case, shards, qwen, tmp_path):
    folder = _ckpt(tmp_path, qwen, shards)
    f = _shard(folder)
    damage, msg = DAMAGE[case]
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=f"{f.name}: .*{msg}"):
        moetune.load_model(folder, ctx=ctx(), progress=False)


INDEX = {
    "not json": ("{weight_map", "not a readable JSON index"),
    "a list": ("[1, 2]", 'no "weight_map" object'),
    "no weight_map": ('{"metadata": {}}', 'no "weight_map" object'),
    "path in a file name": (None, "is not a shard file name"),
    "key in the wrong shard": (None, "maps .* but that shard does not hold it"),
    "missing shard": (None, "is missing"),
}


@pytest.mark.parametrize("case", list(INDEX))
def test_bad_index_names_the_file_and_key(case, qwen, tmp_path):
    folder = _ckpt(tmp_path, qwen, shards=2)
    index = folder / "model.safetensors.index.json"
    text, msg = INDEX[case]
    if text is None:
        wm = json.loads(index.read_text())["weight_map"]
        k0 = sorted(wm)[0]
        if case == "path in a file name":
            wm[k0] = "../" + wm[k0]
        elif case == "key in the wrong shard":
            other = sorted(set(wm.values()) - {wm[k0]})[0]
            wm[k0] = other
        else:
            wm[k0] = "model-00009-of-00009.safetensors"
        text = json.dumps({"weight_map": wm})
    index.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        moetune.load_model(folder, ctx=ctx(), progress=False)


def test_single_file_wins_over_an_index_as_in_transformers(qwen, tmp_path):
    ref, sd = qwen
    folder = write_checkpoint(tmp_path / "c", sd, ref.config, shards=2)
    # A model.safetensors with different expert weights next to the index: transformers reads it.
    other = {k: (v * 2 if ".experts." in k else v) for k, v in sd.items()}
    save_file(other, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert Checkpoint(folder).sharded is False
    ids = torch.tensor([[1, 5, 9, 3]])

    def logits(f):
        with torch.no_grad():
            return moetune.load_model(f, ctx=ctx(), progress=False, dtype=torch.float32)(ids).logits

    got = logits(folder)
    # Bit-identical to a folder holding only that file; different from the index's weights.
    torch.testing.assert_close(got, logits(write_checkpoint(tmp_path / "one", other, ref.config)), rtol=0, atol=0)
    assert not torch.equal(got, logits(write_checkpoint(tmp_path / "idx", sd, ref.config, shards=2)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_non_finite_weight_at_quantization_names_layer_and_expert(fmt, qwen, tmp_path):
    ref, sd = qwen
    sd = dict(sd)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    sd[key] = sd[key].clone()
    sd[key][2, 5] = float("nan")
    folder = write_checkpoint(tmp_path / "c", sd, ref.config)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.experts, expert 3: .*up_proj.*non-finite"):
        moetune.load_model(folder, ctx=ctx(), progress=False, weight_format=fmt)


# ---- fuzz: safetensors headers ----


def _valid_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(p))
    return p


def _check_folder(folder):
    """Index and read every tensor: success or a ValueError / FileNotFoundError naming a file."""
    try:
        ck = Checkpoint(folder)
    except (ValueError, FileNotFoundError) as e:
        assert "moetune:" in str(e)
        return
    with ck.reader() as r:
        for k in ck.keys():
            try:
                r.get(k)
            except ValueError as e:
                assert ck.entries[k].file in str(e)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("st")
    (folder / "config.json").write_text("{}")
    p = _valid_file(folder)
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    how = data.draw(st.sampled_from(["bytes", "header", "length", "truncate"]))
    if how == "bytes":  # random bytes anywhere
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif how == "header":  # a structurally different header of the same file
        key = data.draw(st.sampled_from(["a", "b", "__metadata__"]))
        header[key] = data.draw(
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
                lambda c: (
                    st.lists(c, max_size=3)
                    | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), c, max_size=3)
                ),
                max_leaves=6,
            )
        )
        text = json.dumps(header).encode()
        raw = bytearray(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    elif how == "length":
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    else:
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p.write_bytes(bytes(raw))
    _check_folder(folder)


# ---- the expert cache ----


def _experts(seed=0, E=3, H=32, I=16):
    g = torch.Generator().manual_seed(seed)
    return moetune.MoEExperts(ctx(), *(torch.randn(s, generator=g) for s in ((E, I, H), (E, I, H), (E, H, I))))


SHAPE = dict(num_experts=3, hidden_size=32, intermediate_size=16)


def _bytes(ex):
    return [bytes(memoryview(b.array)) for b in ex.packed_buffers()]


MALFORMED = {
    "a list": lambda m: [m],
    "negative offset": lambda m: {**m, "buffers": [{**m["buffers"][0], "offset": -4096}] + m["buffers"][1:]},
    "missing checksum": lambda m: {
        **m,
        "buffers": [{k: v for k, v in b.items() if k != "crc32"} for b in m["buffers"]],
    },
    "buffers not a list": lambda m: {**m, "buffers": {"x": 1}},
    "data file with a path": lambda m: {**m, "data_file": "../" + m["data_file"]},
    "offset past the data": lambda m: {**m, "buffers": [{**m["buffers"][0], "offset": m["data_bytes"]}]},
    "string sizes": lambda m: {**m, "data_bytes": str(m["data_bytes"])},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_rebuilt(case, tmp_path):
    ex = _experts()
    mpath = cache.save(ex, tmp_path, "k", "src")
    mpath.write_text(json.dumps(MALFORMED[case](json.loads(mpath.read_text()))))
    got, reason = cache.load(ctx(), tmp_path, "k", "src", **SHAPE)
    assert got is None and "manifest" in reason, reason
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rebuilt, reason = cache.load_or_build(ctx(), tmp_path, "k", "src", lambda: _experts(), **SHAPE)
    assert "manifest" in reason and any("rebuilding" in str(x.message) for x in w)
    assert _bytes(rebuilt) == _bytes(ex)
    hit, reason = cache.load(ctx(), tmp_path, "k", "src", **SHAPE)
    assert reason == "hit" and _bytes(hit) == _bytes(ex)


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=10,
    )


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    mpath = cache.save(_experts(), d, "k", "src")
    m = json.loads(mpath.read_text())
    how = data.draw(st.sampled_from(["value", "field", "buffer field", "text"]))
    if how == "value":
        m = data.draw(_json_values())
    elif how == "field":
        m[data.draw(st.sampled_from(sorted(m)))] = data.draw(_json_values())
    elif how == "buffer field":
        b = m["buffers"][data.draw(st.integers(0, len(m["buffers"]) - 1))]
        b[data.draw(st.sampled_from(["name", "offset", "nbytes", "crc32"]))] = data.draw(_json_values())
    if how == "text":
        mpath.write_bytes(data.draw(st.binary(max_size=200)))
    else:
        mpath.write_text(json.dumps(m))
    ex, reason = cache.load(ctx(), d, "k", "src", **SHAPE)  # never raises
    assert (ex is None) != (reason == "hit")


_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import torch, moetune
    from moetune import cache
    ctx = moetune.Context(1)
    def experts(seed):
        g = torch.Generator().manual_seed(seed)
        return moetune.MoEExperts(ctx, *(torch.randn(s, generator=g) for s in ((3, 16, 32), (3, 16, 32), (3, 32, 16))))
    a, b = experts(0), experts(1)
    end = time.time() + float(sys.argv[3])
    i = 0
    while time.time() < end:
        cache.save(a if i % 2 else b, sys.argv[2], "k", "src")
        i += 1
    print(i)
""")


def test_reader_racing_a_writer_gets_a_complete_entry(tmp_path):
    a, b = _experts(0), _experts(1)
    want = [_bytes(a), _bytes(b)]
    cache.save(a, tmp_path, "k", "src")
    w = subprocess.Popen([sys.executable, "-c", _WRITER, PY, str(tmp_path), "8"], stdout=subprocess.PIPE, text=True)
    reads = 0
    try:
        while w.poll() is None:
            ex, reason = cache.load(ctx(), tmp_path, "k", "src", **SHAPE)
            assert reason == "hit", reason
            assert _bytes(ex) in want
            reads += 1
    finally:
        out, _ = w.communicate(timeout=60)
    assert w.returncode == 0 and int(out) > 5 and reads > 5, (out, reads)


# ---- fuzz: the YAML config ----


@FUZZ
@given(data=st.data())
def test_fuzz_yaml_config(data, tmp_path_factory):
    from moetune.train.config import ConfigError, TrainConfig, load_yaml, make_config

    d = tmp_path_factory.mktemp("yaml")
    p = d / "run.yaml"
    names = sorted(TrainConfig.fields())
    if data.draw(st.booleans()):
        p.write_bytes(data.draw(st.binary(max_size=120)))
    else:
        import yaml

        values = data.draw(
            st.dictionaries(
                st.sampled_from(names + ["nope"]),
                st.none()
                | st.booleans()
                | st.integers(-5, 10**6)
                | st.floats(allow_nan=True)
                | st.text(max_size=6)
                | st.lists(st.floats(allow_nan=True) | st.text(max_size=3), max_size=3),
                max_size=6,
            )
        )
        values.pop("output_dir", None)  # keep runs inside the test folder
        values.pop("placement_trace", None)
        p.write_text(yaml.safe_dump(values))
    try:
        cfg = make_config(load_yaml(str(p)), {"output_dir": str(d / "out")})
    except ConfigError:
        return
    # Accepted: every numeric value is finite and in range (validate() checked the table).
    from moetune.train.config import RANGES

    for name, r in RANGES.items():
        v = getattr(cfg, name)
        assert v is None or all(r.contains(x) for x in (v if isinstance(v, list) else [v])), (name, v)
