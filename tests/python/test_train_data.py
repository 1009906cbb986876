"""moetune train's data path: every record format, the loss mask (exact token
counts, two independent methods agreeing), truncation, packing without
cross-sample leakage, and the resumable stream."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("datasets")

from moetune.train import data  # noqa: E402
from moetune.train.config import make_config  # noqa: E402
from moetune.train.demo_model import build_tokenizer  # noqa: E402

IGNORE = data.IGNORE


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def trained(tok, ids, labels):
    assert len(ids) == len(labels)
    for i, l in zip(ids, labels):
        assert l == IGNORE or l == i, "a label differs from its input token"
    return [l for l in labels if l != IGNORE]


def words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


CHAT = [
    {"role": "user", "content": "What does a cow say?"},
    {"role": "assistant", "content": "A cow says moo."},
    {"role": "user", "content": "Opposite of hot?"},
    {"role": "assistant", "content": "The opposite of hot is cold."},
]


def test_chat_mask_is_exactly_the_assistant_turns(tok):
    ids, labels = data.encode_chat(tok, CHAT, "assistant")
    end = tok.convert_tokens_to_ids("<|end|>")
    expect = words(tok, "A cow says moo.") + [end] + words(tok, "The opposite of hot is cold.") + [end]
    assert trained(tok, ids, labels) == expect
    assert (
        len(ids) - len(expect) == 4 + len(words(tok, "What does a cow say?")) + len(words(tok, "Opposite of hot?")) + 2
    )
    # The template's own {% generation %} mask (a different method) agrees token by token.
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert [l != IGNORE for l in labels] == [bool(m) for m in out["assistant_masks"]]
    ids_all, labels_all = data.encode_chat(tok, CHAT, "all")
    assert ids_all == ids and labels_all == ids


def test_chat_mask_with_a_bpe_chatml_tokenizer():
    """Byte-level BPE (merges can cross the turn boundary text) + a ChatML template
    without generation markers: the character-span method alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CHAT] * 20 + ["user\nassistant\nsystem\n"] * 20
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids, labels = data.encode_chat(t, CHAT, "assistant")
    kept = trained(t, ids, labels)
    assert t.decode(kept) == "A cow says moo.<|im_end|>\nThe opposite of hot is cold.<|im_end|>\n"


def test_formats_auto_detected_and_masked(tmp_path, tok):
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.0, "max_length": 64})
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[:2]}] * 3)
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "Opposite of", "input": "hot", "output": "cold"}] * 3
    )
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "A cow says moo."}] * 3)
    end = tok.convert_tokens_to_ids("<|end|>")
    for path, fmt, expect in (
        (chat, "chat", words(tok, "A cow says moo.") + [end]),
        (alpaca, "alpaca", words(tok, "cold") + [end]),
        (text, "text", words(tok, "A cow says moo.") + [end]),
    ):
        cfg.data = path
        train, ev, stats, got = data.prepare(cfg, tok, path)
        assert got == fmt and ev is None and len(train["input_ids"]) == 3
        ids, labels = train["input_ids"][0], train["labels"][0]
        assert trained(tok, ids, labels) == expect, fmt
    # alpaca went through the chat template: user turn = instruction, blank line, input
    msgs = [{"role": "user", "content": "Opposite of\n\nhot"}, {"role": "assistant", "content": "cold"}]
    assert data.encode_alpaca(
        tok, {"instruction": "Opposite of", "input": "hot", "output": "cold"}, "assistant"
    ) == data.encode_chat(tok, msgs, "assistant")


def test_alpaca_without_chat_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    ids, labels = data.encode_alpaca(
        t, {"instruction": "Opposite of hot?", "output": "The opposite of hot is cold."}, "assistant"
    )
    expect = words(t, "The opposite of hot is cold.") + [t.eos_token_id]
    assert trained(t, ids, labels) == expect
    assert ids[-len(expect) :] == expect
    assert len(ids) == len(
        t(data.ALPACA_PROMPT.format(instruction="Opposite of hot?", input_block=""))["input_ids"]
    ) + len(expect)


def test_format_errors_name_the_problem(tmp_path, tok):
    from moetune.train import formats

    mp = formats.Mapping.parse([], [])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: cannot tell the format.*question"):
        formats.load(bad, data_format="auto", mapping=mp, has_template=True)
    with pytest.raises(data.DataError, match=r"f.jsonl:3: data_format=chat needs column\(s\) \['messages'\]"):
        formats.detect({"text": "a"}, "chat", mp, "f.jsonl:3")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"messages": [{"role": "user"}]}])
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "data": broken, "model": None, "eval_fraction": 0.0})
    with pytest.raises(data.DataError, match=r"broken.jsonl:1: `messages`\[0\] must be an object with `role`"):
        data.prepare(cfg, tok, broken)


def test_truncation_and_dropping(tmp_path, tok):
    recs = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    n_short = len(data.encode_chat(tok, CHAT[:2], "assistant")[0])
    n_long = len(data.encode_chat(tok, CHAT, "assistant")[0])
    assert n_short < n_long
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.0, "max_length": n_short})
    train, _, stats, _ = data.prepare(cfg, tok, path)
    assert stats["train"]["truncated"] == 1 and [len(x) for x in train["input_ids"]] == [n_short, n_short]
    cfg.truncation = False
    train, _, stats, _ = data.prepare(cfg, tok, path)
    assert stats["train"]["dropped_long"] == 1 and len(train["input_ids"]) == 1
    # Truncated inside the prompt: no loss token left -> dropped, counted.
    cfg.truncation, cfg.max_length = True, 3
    with pytest.raises(data.DataError, match="no usable samples"):
        data.prepare(cfg, tok, path)


def test_eval_split_is_seeded_and_disjoint(tmp_path, tok):
    recs = [{"text": f"say {w}"} for w in ("one two three four five six seven eight nine ten".split())]
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.2, "seed": 3})
    a = data.prepare(cfg, tok, path)
    b = data.prepare(cfg, tok, path)
    assert a[0] == b[0] and a[1] == b[1]
    assert len(a[1]["input_ids"]) == 2 and len(a[0]["input_ids"]) == 8
    tr = {tuple(x) for x in a[0]["input_ids"]}
    assert not tr & {tuple(x) for x in a[1]["input_ids"]}


def test_packing_equals_separate_samples(tok):
    """A packed row (position ids restart, no attention mask) gives every token the
    logits it has alone, and the loss sums equal: no attention or loss across samples."""
    import moetune.hf
    from moetune.train.demo_model import build_model

    model = build_model(len(tok))
    moetune.hf.patch(model, num_threads=1)
    model.eval()
    samples = [data.encode_chat(tok, m, "all") for m in ([CHAT[0], CHAT[1]], [CHAT[2], CHAT[3]], CHAT)]
    packed = data.collate([samples], tok.pad_token_id, packing=True)
    assert "attention_mask" not in packed
    with torch.no_grad():
        out = model(**packed, use_cache=False)
        start, total_sum, total_n = 0, 0.0, 0
        for ids, labels in samples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            seg = out.logits[0, start : start + len(ids)]
            assert (seg - alone).abs().max() <= 1e-4 * alone.abs().max(), "packed logits differ from the sample alone"
            b = data.collate([[(ids, labels)]], tok.pad_token_id, packing=False)
            n = data.target_count(b)
            total_sum += model(**b, use_cache=False).loss.item() * n
            total_n += n
            start += len(ids)
        n_packed = data.target_count(packed)
        assert n_packed == total_n  # the first token of each later sample is not a target
        packed_sum = model(**packed, num_items_in_batch=n_packed, use_cache=False).loss.item() * n_packed
    assert abs(packed_sum - total_sum) <= 1e-4 * total_sum


def test_padding_masks_and_counts(tok):
    s1 = data.encode_chat(tok, CHAT[:2], "assistant")
    s2 = data.encode_chat(tok, CHAT, "assistant")
    b = data.collate([[s1], [s2]], tok.pad_token_id, packing=False)
    assert b["input_ids"].shape == (2, len(s2[0]))
    assert int(b["attention_mask"][0].sum()) == len(s1[0]) and int(b["attention_mask"][1].sum()) == len(s2[0])
    assert (b["labels"][0, len(s1[0]) :] == IGNORE).all()
    assert data.target_count(b) == sum(l != IGNORE for l in s1[1][1:]) + sum(l != IGNORE for l in s2[1][1:])


def test_stream_resumes_at_the_same_batch(tok):
    samples = {
        "input_ids": [[5 + i] * (2 + i % 3) for i in range(10)],
        "labels": [[5 + i] * (2 + i % 3) for i in range(10)],
    }
    kw = dict(micro_batch_size=3, packing=False, max_length=8, shuffle=True, seed=1, pad_id=0)
    a = data.Stream(samples, **kw)
    seq = [a.next_batch()["input_ids"] for _ in range(7)]  # crosses two epoch boundaries
    b = data.Stream(samples, **kw)
    for _ in range(3):
        b.next_batch()
    c = data.Stream(samples, **kw)
    c.load_state(b.state())
    for x in seq[3:]:
        assert torch.equal(c.next_batch()["input_ids"], x)
    # Each epoch is a permutation of all samples (and epochs differ in order).
    firsts = [row[0] for row in a.plan(0)], [row[0] for row in a.plan(1)]
    assert sorted(firsts[0]) == list(range(10)) and firsts[0] != firsts[1]
    p = data.Stream(samples, **{**kw, "packing": True})
    rows = p.plan(0)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(len(samples["input_ids"][i]) for i in r) <= 8 for r in rows) and len(rows) < 10
