"""The embedded demo's model and tokenizer, made locally (no download).

* Tokenizer: a word-level vocabulary of the embedded dataset (HF `tokenizers`:
  Metaspace + punctuation split, so decoding restores the spaces), special
  tokens for the chat roles, wrapped as a `PreTrainedTokenizerFast` with a
  chat template. Deterministic: the vocabulary is the sorted word set.
* Model: a tiny Qwen3-MoE (`transformers.Qwen3MoeConfig`) with seeded random
  weights: a few layers, 8 experts, top-2.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import torch

# `{% generation %}` marks the assistant turns for transformers'
# return_assistant_tokens_mask (what TRL's assistant_only_loss uses).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}"
    "<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def demo_data_path() -> str:
    """The dataset shipped in the package (written by scripts/gen_demo_data.py)."""
    return str(resources.files("moetune.train").joinpath("assets").joinpath("demo.jsonl"))


def _texts(path: str) -> list[str]:
    out = []
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            out += [m["content"] for m in rec["messages"]]
    return out


def build_tokenizer(data_path: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    words = set()
    for t in _texts(data_path or demo_data_path()):
        for w, _ in pre.pre_tokenize_str(t):
            words.add(w)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 96, experts: int = 8):
    """A tiny Qwen3-MoE in fp32 with seeded random weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        initializer_range=hidden**-0.5,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).float()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def save_demo_base(path: str, seed: int = 0) -> str:
    """Write the demo model + tokenizer as a HF folder (for examples/tests that load by path)."""
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
