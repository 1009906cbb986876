"""Data as users have it: every record format and its variants give the same samples as
the equivalent chat record; sources (files, shards, a saved dataset, parquet, .json
arrays) and their mixing weights; column / role mapping; parallel tokenization equal
to serial; the tokenization cache (hit, not recomputed, invalidated by what matters);
one clear line per problem, naming the file and line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("datasets")

from moetune.train import data, formats, tokenize_cache  # noqa: E402
from moetune.train.config import ConfigError, make_config  # noqa: E402
from moetune.train.demo_model import build_tokenizer  # noqa: E402

CHAT = [
    {"role": "user", "content": "What does a cow say?"},
    {"role": "assistant", "content": "A cow says moo."},
    {"role": "user", "content": "Opposite of hot?"},
    {"role": "assistant", "content": "The opposite of hot is cold."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def cfg_for(tmp_path, **kw):
    return make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.0, "max_length": 128, **kw})


def samples(tmp_path, tok, recs, name="d.jsonl", **kw):
    p = jsonl(tmp_path / name, recs)
    train, _, stats, fmt = data.prepare(cfg_for(tmp_path, **kw), tok, p)
    return list(zip(train["input_ids"], train["labels"])), fmt


def test_every_format_equals_its_chat_record(tmp_path, tok):
    ref, fmt = samples(tmp_path, tok, [{"messages": CHAT}], "ref.jsonl")
    assert fmt == "chat"
    parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"][:5]}, m["content"][5:]]} for m in CHAT
    ]
    assert samples(tmp_path, tok, [{"messages": parts}], "parts.jsonl")[0] == ref
    sg = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT]
    got, fmt = samples(tmp_path, tok, [{"conversations": sg}], "sg.jsonl")
    assert fmt == "sharegpt" and got == ref
    # ShareGPT's `system` column becomes the first turn
    sys_ref, _ = samples(tmp_path, tok, [{"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}], "s.jsonl")
    assert samples(tmp_path, tok, [{"conversations": sg, "system": "Be brief."}], "sgs.jsonl")[0] == sys_ref
    # alpaca with system + history == the chat record
    alp = {
        "instruction": "Opposite of hot?",
        "output": "The opposite of hot is cold.",
        "history": [CHAT[0]["content"], CHAT[1]["content"]],
    }
    alp["history"] = [alp["history"]]
    assert samples(tmp_path, tok, [alp], "alp.jsonl")[0] == ref
    # `response` instead of `output`
    r1 = samples(tmp_path, tok, [{"instruction": "a b", "output": "cold"}], "a1.jsonl")[0]
    assert samples(tmp_path, tok, [{"instruction": "a b", "response": "cold"}], "a2.jsonl")[0] == r1


def test_prompt_completion(tmp_path, tok):
    # conversational: the completion's assistant turns carry loss, the prompt's do not
    got, fmt = samples(tmp_path, tok, [{"prompt": CHAT[:3], "completion": CHAT[3:]}], "pc.jsonl")
    assert fmt == "prompt_completion"
    ids, labels = data.encode_chat(tok, CHAT, "assistant", train_from=3)
    assert got == [(ids, labels)]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert [t for t in labels if t != data.IGNORE] == tok("The opposite of hot is cold.", add_special_tokens=False)[
        "input_ids"
    ] + [end]
    # plain strings: the completion + EOS trained, the prompt not
    ((ids, labels),) = samples(tmp_path, tok, [{"prompt": "cow says", "completion": "moo"}], "pcs.jsonl")[0]
    moo = tok("moo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for t in labels if t != data.IGNORE] == moo and ids[-len(moo) :] == moo
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: `prompt` and `completion` must both be strings or both"):
        samples(tmp_path, tok, [{"prompt": "x", "completion": CHAT[3:]}], "bad.jsonl")


def test_column_and_role_mapping(tmp_path, tok):
    ref, _ = samples(tmp_path, tok, [{"messages": CHAT}], "ref.jsonl")
    mine = [
        {"dialog": [{"speaker": {"user": "me", "assistant": "bot"}[m["role"]], "said": m["content"]} for m in CHAT]}
    ]
    got, _ = samples(
        tmp_path,
        tok,
        mine,
        "m.jsonl",
        data_columns=["messages=dialog", "role=speaker", "content=said"],
        data_roles=["me=user", "bot=assistant"],
    )
    assert got == ref
    with pytest.raises(data.DataError, match=r"m2.jsonl:1: `messages`\[0\]: unknown role 'me'.*data_roles"):
        samples(tmp_path, tok, mine, "m2.jsonl", data_columns=["messages=dialog", "role=speaker", "content=said"])
    with pytest.raises(data.DataError, match="data_columns: 'dialogue' is not one of"):
        samples(tmp_path, tok, mine, "m3.jsonl", data_columns=["dialogue=dialog"])


def test_sources_shards_saved_dataset_parquet_json_and_weights(tmp_path, tok):
    import datasets

    a = [{"text": f"say {w}"} for w in "one two three four".split()]
    b = [{"messages": CHAT[:2]}] * 2
    jsonl(tmp_path / "a.jsonl", a)
    shards = tmp_path / "shards"
    shards.mkdir()
    jsonl(shards / "part-0.jsonl", b[:1])
    jsonl(shards / "part-1.jsonl", b[1:])
    datasets.Dataset.from_list(a).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(a).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(a, indent=2))
    cfg = cfg_for(tmp_path)
    one = data.prepare(cfg, tok, str(tmp_path / "a.jsonl"))[0]
    for other in ("saved", "a.parquet", "a.json"):
        assert data.prepare(cfg, tok, str(tmp_path / other))[0] == one, other
    train, _, stats, fmt = data.prepare(cfg, tok, f"{tmp_path / 'a.jsonl'}:0.5,{shards}:3")
    assert fmt == "chat+text" and stats["train"]["records"] == 2 + 6
    assert sum(1 for x in train["input_ids"] if x in one["input_ids"]) == 2  # a seeded half of a
    # .json errors name the line of the object
    (tmp_path / "bad.json").write_text('[\n  {"text": "ok"},\n  {"text": 3}\n]\n')
    with pytest.raises(data.DataError, match=r"bad.json:3: text records need a string `text`"):
        data.prepare(cfg, tok, str(tmp_path / "bad.json"))


def test_parallel_equals_serial_and_the_cache(tmp_path, tok, monkeypatch):
    recs = [{"messages": CHAT[: 2 * (1 + i % 2)]} for i in range(40)]
    p = jsonl(tmp_path / "d.jsonl", recs)
    serial = data.prepare(cfg_for(tmp_path, num_proc=1, data_cache=False), tok, p)
    par = data.prepare(cfg_for(tmp_path, num_proc=2, data_cache=False), tok, p)
    assert serial[0] == par[0] and par[2]["cache"] == "off"
    cfg = cfg_for(tmp_path, eval_fraction=0.1)
    first = data.prepare(cfg, tok, p)
    assert first[2]["cache"] == "miss"

    def boom(self, batch):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(data.Encoder, "map_batch", boom)
        again = data.prepare(cfg, tok, p)
    assert again[2]["cache"] == "hit" and again[0] == first[0] and again[1] == first[1]
    # What the samples depend on invalidates it: options, the records, the tokenizer's template.
    cfg.max_length = 100
    assert data.prepare(cfg, tok, p)[2]["cache"] == "miss"
    jsonl(tmp_path / "d.jsonl", recs[:-1])
    assert data.prepare(cfg, tok, p)[2]["cache"] == "miss"
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = tok.chat_template.replace("<|end|>{% endgeneration %}", "<|end|><|end|>{% endgeneration %}")
    assert data.prepare(cfg, t2, p)[2]["cache"] == "miss"
    # a half-written entry (no `done` marker) is never read
    key_dirs = [d for d in (tmp_path / "o" / "data-cache").iterdir()]
    assert key_dirs and all((d / "done").is_file() for d in key_dirs)
    assert tokenize_cache.default_num_proc(10) == 1


def test_cache_entry_published_by_another_rank_at_the_same_time(tmp_path, tok, monkeypatch):
    """The ranks of a torchrun launch tokenize the same data at once and publish the same entry. The
    interleaving where another rank's entry lands right before our rename (a launch test once failed
    at start-up on it: ENOTEMPTY) keeps the other rank's entry untouched (a third rank may be reading
    it) and drops ours; the samples are the same and the next run hits."""
    import os
    import shutil

    p = jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[:2]} for _ in range(8)])
    cfg = cfg_for(tmp_path)
    real, theirs = os.rename, {}

    def racing(src, dst):
        if os.path.basename(src).startswith(os.path.basename(dst) + ".tmp-") and not os.path.exists(dst):
            shutil.copytree(src, dst)  # the other rank's entry: same key, same content
            theirs[dst] = os.stat(os.path.join(dst, "done")).st_ino
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(tokenize_cache.os, "rename", racing)
        first = data.prepare(cfg, tok, p)
    assert first[2]["cache"] == "miss" and theirs
    for entry, ino in theirs.items():
        assert os.stat(os.path.join(entry, "done")).st_ino == ino  # kept as the other rank wrote it
    assert sorted(os.listdir(tmp_path / "o" / "data-cache")) == sorted(map(os.path.basename, theirs))  # no tmp left
    again = data.prepare(cfg, tok, p)
    assert again[2]["cache"] == "hit" and again[0] == first[0]


def test_cache_publish_keeps_a_complete_entry_and_replaces_a_damaged_one(tmp_path):
    import os

    def folder(name, done: bool, content: str):
        d = tmp_path / name
        d.mkdir()
        (d / "data").write_text(content)
        if done:
            (d / "done").write_text("{}\n")
        return str(d)

    entry = folder("key", True, "theirs")
    ino = os.stat(os.path.join(entry, "data")).st_ino
    tokenize_cache.publish(folder("key.tmp-1", True, "ours"), entry)  # another rank's complete entry: kept
    assert os.stat(os.path.join(entry, "data")).st_ino == ino and not os.path.exists(tmp_path / "key.tmp-1")
    damaged = folder("key2", False, "half")
    tokenize_cache.publish(folder("key2.tmp-1", True, "ours"), damaged)  # no `done`: replaced
    assert (tmp_path / "key2" / "data").read_text() == "ours" and (tmp_path / "key2" / "done").is_file()
    tokenize_cache.publish(folder("key3.tmp-1", True, "ours"), str(tmp_path / "key3"))  # nothing there yet
    assert (tmp_path / "key3" / "done").is_file() and not os.path.exists(tmp_path / "key3.tmp-1")
    with pytest.raises(FileNotFoundError):  # any other failure is an error
        tokenize_cache.publish(str(tmp_path / "missing.tmp-1"), str(tmp_path / "missing"))


def test_problems_are_one_clear_line_each(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match=r"empty.jsonl: the file is empty"):
        data.prepare(cfg, tok, str(tmp_path / "empty.jsonl"))
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(data.DataError, match=r"j.jsonl:3: not valid JSON"):
        data.prepare(cfg, tok, str(tmp_path / "j.jsonl"))
    rows = [{"text": "ok"}, {"text": 1}, [1, 2], {"text": None}]
    with pytest.raises(data.DataError) as e:
        data.prepare(cfg, tok, jsonl(tmp_path / "m.jsonl", rows))
    msg = str(e.value)
    assert msg.startswith("3 malformed record(s):")
    assert [line.split(": ", 1)[0].rsplit("/", 1)[-1] for line in msg.splitlines()[1:]] == [
        "m.jsonl:2",
        "m.jsonl:3",
        "m.jsonl:4",
    ]
    # nothing to train on (only user turns)
    with pytest.raises(
        data.DataError, match=r"no usable samples \(2 records: 0 longer than max_length .* 2 with no token"
    ):
        data.prepare(cfg, tok, jsonl(tmp_path / "u.jsonl", [{"messages": CHAT[:1]}] * 2))
    # Source problems are config errors, before anything loads.
    for spec, why in (
        (str(tmp_path / "nope.jsonl"), "does not exist"),
        (str(tmp_path), "holds no .jsonl"),
        (f"{tmp_path / 'j.jsonl'}:-1", "must be a positive number"),
        (str(tmp_path / "x.txt"), "must end in"),
    ):
        (tmp_path / "x.txt").write_text("x")
        if spec == str(tmp_path):
            spec = str(tmp_path / "emptydir")
            (tmp_path / "emptydir").mkdir(exist_ok=True)
        with pytest.raises(ConfigError, match=why):
            make_config(None, {"output_dir": str(tmp_path / "o"), "data": spec})


def test_hub_name_unreachable_is_one_line(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError, match=r"nobody-xyz/nothing: not a local file or folder, and not loadable"):
        formats.read_rows("nobody-xyz/nothing")


def test_cli_data_error_is_one_line_no_traceback(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetune.cli",
            "train",
            "--data",
            str(tmp_path / "empty.jsonl"),
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("empty.jsonl: the file is empty")


def test_config_file_sources_are_made_absolute_one_by_one(tmp_path, monkeypatch):
    """A YAML `data` of several sources: each existing local path becomes absolute (against the
    working directory), Hub names, missing paths and the `:W` weights stay as written."""
    from moetune.train.config import load_yaml
    from moetune.train.formats import absolute_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "shards").mkdir()
    spec = "a.jsonl, shards:0.5,org/name:2,missing.jsonl"
    want = f"{tmp_path / 'a.jsonl'},{tmp_path / 'shards'}:0.5,org/name:2,missing.jsonl"
    assert absolute_spec(spec) == want
    (tmp_path / "c.yaml").write_text(f"data: '{spec}'\neval_data: a.jsonl\n")
    raw = load_yaml(str(tmp_path / "c.yaml"))
    assert raw["data"] == want and raw["eval_data"] == str(tmp_path / "a.jsonl")
