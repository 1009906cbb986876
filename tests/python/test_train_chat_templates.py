"""Assistant-only loss with the ORIGINAL chat templates of every supported family
(the copies TRL ships in its package), on 1-turn, multi-turn and system +
multi-turn records: exactly which tokens carry loss. The tokenizers are byte-level
(one token per byte) plus each family's special tokens, built locally, so a
trained run of tokens decodes to exactly the text the loss covers."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("datasets")

from moetune.train import chat_masking, data  # noqa: E402
from moetune.train.chat_masking import ChatMasker  # noqa: E402

TRL_DIR = chat_masking.trl_templates_dir()
needs_trl = pytest.mark.skipif(TRL_DIR is None, reason="TRL (which ships the original templates) is not installed")

FAMILIES = {
    # family: (TRL template name, special tokens, eos, bos)
    "qwen3": ("qwen3", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], "<|im_end|>", None),
    "deepseek_v3": (
        "deepseekv3",
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
    ),
    "gpt_oss": (
        "gptoss",
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|constrain|>", "<|call|>"],
        "<|return|>",
        None,
    ),
    "glm4_moe": (
        "glm4moe",
        ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"],
        "<|endoftext|>",
        None,
    ),
    "llama3": (
        "llama3",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
    "qwen2_moe": ("qwen2_5", ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
}

# Mixtral's [INST] format, written here from its published description (TRL ships no copy):
# BOS, system text folded into the first user turn, every answer closed by EOS.
MIXTRAL = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.sys = m['content'] + '\n\n' %}{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}"
    "{% set ns.sys = '' %}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)

ONE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
MULTI = ONE + [{"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "It is 4."}]
SYSTEM = [{"role": "system", "content": "Be brief."}] + MULTI

# What carries loss, per family and record (in order). Everything the model emits after the
# generation prompt: the answer, what the template puts around it that the model writes
# (Qwen3's empty think block in the last turn, gpt-oss's channel), the end-of-turn token.
EXPECT = {
    "qwen3": {
        "one": ["<think>\n\n</think>\n\nHello!<|im_end|>\n"],
        # earlier turns: the template strips their think block; the last keeps it
        "multi": ["Hello!<|im_end|>\n", "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"],
    },
    "deepseek_v3": {
        "one": ["Hello!<｜end▁of▁sentence｜>"],
        "multi": ["Hello!<｜end▁of▁sentence｜>", "It is 4.<｜end▁of▁sentence｜>"],
    },
    "gpt_oss": {
        "one": ["<|channel|>final<|message|>Hello!<|return|>"],
        "multi": ["<|channel|>final<|message|>Hello!<|end|>", "<|channel|>final<|message|>It is 4.<|return|>"],
    },
    "glm4_moe": {
        # the end of a turn is the next turn's <|user|> (a stop token); after the last turn, EOS appended
        "one": ["\n<think></think>\nHello!<|endoftext|>"],
        "multi": ["\n<think></think>\nHello!<|user|>", "\n<think></think>\nIt is 4.<|endoftext|>"],
    },
    "llama3": {"one": ["Hello!<|eot_id|>"], "multi": ["Hello!<|eot_id|>", "It is 4.<|eot_id|>"]},
    "qwen2_moe": {"one": ["Hello!<|im_end|>\n"], "multi": ["Hello!<|im_end|>\n", "It is 4.<|im_end|>\n"]},
    "mixtral": {"one": ["Hello!</s>"], "multi": ["Hello!</s>", "It is 4.</s>"]},
}
# The text right before each trained run: the generation prompt (never trained).
PROMPT_END = {
    "qwen3": "<|im_start|>assistant\n",
    "deepseek_v3": "<｜Assistant｜>",
    "gpt_oss": "<|start|>assistant",
    "glm4_moe": "<|assistant|>",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2_moe": "<|im_start|>assistant\n",
    "mixtral": " [/INST]",
}


def byte_tokenizer(template: str, specials, eos: str, bos: str | None):
    """One token per byte (byte-level alphabet, no merges) + the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos, bos_token=bos, pad_token=eos)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos, bos)]})
    fast.chat_template = template
    return fast


def family_tokenizer(family: str):
    if family == "mixtral":
        return byte_tokenizer(MIXTRAL, [], "</s>", "<s>")
    name, specials, eos, bos = FAMILIES[family]
    with open(os.path.join(TRL_DIR, name + ".jinja"), encoding="utf-8") as fh:
        return byte_tokenizer(fh.read(), specials, eos, bos)


def runs(tok, ids, labels):
    """[(trained?, text)] of the maximal runs of trained / untrained tokens."""
    assert len(ids) == len(labels)
    out = []
    for i, l in zip(ids, labels):
        assert l in (data.IGNORE, i), "a label differs from its input token"
        on = l != data.IGNORE
        if out and out[-1][0] == on:
            out[-1][1].append(i)
        else:
            out.append((on, [i]))
    return [(on, tok.decode(x)) for on, x in out]


@needs_trl
@pytest.mark.parametrize("family", [*FAMILIES, "mixtral"])
@pytest.mark.parametrize("record", ["one", "multi", "system"])
def test_original_template_loss_mask(family, record):
    tok = family_tokenizer(family)
    msgs = {"one": ONE, "multi": MULTI, "system": SYSTEM}[record]
    m = ChatMasker(tok).encode(msgs)
    assert m.method == "render"
    parts = runs(tok, m.input_ids, m.labels)
    trained = [t for on, t in parts if on]
    assert trained == EXPECT[family]["one" if record == "one" else "multi"]
    # Exactly these tokens: the untrained runs are the prompt parts, each ending with the generation prompt.
    untrained = [t for on, t in parts if not on]
    assert len(untrained) == len(trained) and all(u.endswith(PROMPT_END[family]) for u in untrained)
    assert not parts[0][0], "the conversation starts untrained"
    full = tok.apply_chat_template(msgs, tokenize=False)
    eos_added = family == "glm4_moe"
    assert m.input_ids == tok(full, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos_added else [])
    if record == "system":
        assert "Be brief." in untrained[0]
    # loss_on=all: the same tokens, every one trained
    a = ChatMasker(tok).encode(msgs, "all")
    assert a.labels == a.input_ids == tok(full, add_special_tokens=False)["input_ids"]


@needs_trl
def test_qwen3_reasoning_of_earlier_turns_is_stripped_and_the_last_trained():
    tok = family_tokenizer("qwen3")
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nsecond thoughts\n</think>\n\nA2"},
    ]
    m = ChatMasker(tok).encode(msgs)
    trained = [t for on, t in runs(tok, m.input_ids, m.labels) if on]
    assert trained == ["A1<|im_end|>\n", "<think>\nsecond thoughts\n</think>\n\nA2<|im_end|>\n"]
    assert "first thoughts" not in tok.decode(m.input_ids)


@needs_trl
@pytest.mark.parametrize("family", ["llama3", "glm4_moe", "qwen2_moe"])
def test_trailing_whitespace_of_an_answer(family):
    """Llama and GLM trim the answer, ChatML keeps it: either way the turn is located by rendering."""
    tok = family_tokenizer(family)
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! \n"}]
    m = ChatMasker(tok).encode(msgs)
    assert m.method == "render"
    want = {"llama3": "Hello!<|eot_id|>", "glm4_moe": "\n<think></think>\nHello!<|endoftext|>"}
    got = [t for on, t in runs(tok, m.input_ids, m.labels) if on]
    assert got == [want.get(family, "Hello! \n<|im_end|>\n")]


@needs_trl
def test_fallback_to_trl_training_template_and_the_error_without_one():
    """GLM moves a reasoning-only answer into its think block and writes no answer line, so the
    answer's end cannot be located by rendering: TRL's training variant of the GLM template decides
    (the end-of-turn <|user|> trained)."""
    tok = family_tokenizer("glm4_moe")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>plan</think>"}]
    m = ChatMasker(tok).encode(msgs)
    assert m.method == "trl-training-template"
    assert [t for on, t in runs(tok, m.input_ids, m.labels) if on] == ["\n<think>plan</think><|user|>"]
    # The same template text, unknown to TRL (one byte changed) and without markers: a clear error.
    tok.chat_template = tok.chat_template + " "
    with pytest.raises(data.DataError, match="cannot find the assistant turns.*--chat-template"):
        ChatMasker(tok).encode(msgs)


def test_generation_markers_are_the_fallback_before_trl():
    """A template that closes an answer with plain text (no special token: the render method cannot
    tell where the turn ends) and marks it with {% generation %}: the markers decide."""
    tpl = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} END"
        "{% endgeneration %}{% else %}<|u|>{{ m['content'] }}<|a|>{% endif %}{% endfor %}"
    )
    tok = byte_tokenizer(tpl, ["<|u|>", "<|a|>"], "<|u|>", None)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "x"}]
    m = ChatMasker(tok).encode(msgs)
    assert m.method == "markers"
    assert [t for on, t in runs(tok, m.input_ids, m.labels) if on] == ["Yo END"]


@needs_trl
def test_prompt_completion_trains_only_the_completion_turns():
    tok = family_tokenizer("llama3")
    m = ChatMasker(tok).encode(MULTI, train_from=2)
    assert [t for on, t in runs(tok, m.input_ids, m.labels) if on] == ["It is 4.<|eot_id|>"]


@needs_trl
def test_chat_template_option_file_or_name(tmp_path):
    with open(os.path.join(TRL_DIR, "qwen3.jinja"), encoding="utf-8") as fh:
        qwen3 = fh.read()
    assert chat_masking.resolve_chat_template("qwen3") == qwen3
    f = tmp_path / "t.jinja"
    f.write_text(MIXTRAL)
    assert chat_masking.resolve_chat_template(str(f)) == MIXTRAL
    with pytest.raises(data.DataError, match="not a file nor a known name; known names: .*qwen3"):
        chat_masking.resolve_chat_template("qwen33")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(data.DataError, match="does not look like a Jinja chat template"):
        chat_masking.resolve_chat_template(str(tmp_path / "plain.txt"))
    # In the config: checked before anything loads; a bad name is a ConfigError naming it.
    from moetune.train.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="qwen33"):
        make_config(None, {"output_dir": str(tmp_path / "o"), "chat_template": "qwen33"})


@needs_trl
def test_prepare_with_a_family_template_names_the_real_line(tmp_path):
    """Through data.prepare (shuffled eval split, parallel workers): a bad record is named by its file's
    line, not by its index in the shuffled split."""
    from moetune.train.config import make_config

    tok = family_tokenizer("qwen3")
    lines = (
        [json.dumps({"messages": MULTI})] * 6 + [""] + [json.dumps({"messages": [{"role": "robot", "content": "x"}]})]
    )
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.3, "seed": 5, "num_proc": 2})
    with pytest.raises(data.DataError, match=r"d.jsonl:8: `messages`\[0\]: unknown role 'robot'"):
        data.prepare(cfg, tok, str(p))
    p.write_text("\n".join(lines[:6]) + "\n")
    train, ev, stats, fmt = data.prepare(cfg, tok, str(p))
    assert fmt == "chat" and len(train["input_ids"]) == 4 and len(ev["input_ids"]) == 2
    m = ChatMasker(tok).encode(MULTI)
    assert train["input_ids"][0] == m.input_ids and train["labels"][0] == m.labels


def test_a_template_error_names_the_file_line_after_the_shuffled_split(tmp_path):
    """The template itself rejects a record (raise_exception) while tokenising, after the eval split
    shuffled the records: the error names the file's line."""
    from moetune.train.config import make_config

    tpl = (
        "{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + MIXTRAL
    )
    tok = byte_tokenizer(tpl, [], "</s>", "<s>")
    recs = [{"messages": ONE}] * 5 + [{"messages": [ONE[0], *ONE]}] + [{"messages": ONE}] * 3
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = make_config(None, {"output_dir": str(tmp_path / "o"), "eval_fraction": 0.3, "seed": 1})
    with pytest.raises(
        data.DataError, match=r"1 record\(s\) cannot be encoded:\n  .*d.jsonl:6: .*roles must alternate"
    ):
        data.prepare(cfg, tok, str(p))
