"""Assistant-only loss on chat records, for any chat template.

The trained sequence is the conversation rendered by the template as it is
(`render(messages)`, the text the model sees at inference for that history).
Each assistant turn i is located in that text by two renders that must agree
with it exactly, so a template that renders a turn differently depending on
what follows (Qwen3 strips the empty <think> block and the reasoning of turns
before the last user query, gpt-oss ends the last turn with <|return|> and the
earlier ones with <|end|>, DeepSeek-V3's generation prompt opens a <think>
the history does not show) is still handled:

* start: the longest common prefix of the text and
  render(messages[:i], add_generation_prompt=True), which must cover
  render(messages[:i]) (the earlier turns render identically) — so the turn
  header the generation prompt writes is not trained, and whatever the model
  itself emits after it (an empty think block, a channel tag) is;
* end of the content: the same conversation with a sentinel appended to turn
  i's content must render to the same text with the sentinel inserted at one
  place (the content's end);
* end of turn: the special token the template writes right after the content
  (<|im_end|>, <|eot_id|>, <|end|>/<|return|>, <｜end▁of▁sentence｜>, GLM's
  next-turn <|user|>) is trained, with the whitespace after it up to the next
  special token (ChatML's newline); when the last turn has none (GLM), the
  tokenizer's EOS is appended and trained so the model learns to stop.

Tokens are labelled by their character offsets, so BPE merges at a boundary
cannot shift the mask. A record this method cannot decide falls back to the
template's own `{% generation %}` markers (`return_assistant_tokens_mask`), then
to TRL's training variant of a known original template (TRL ships both; its
variant renders every turn the same way), else a clear error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from moetune.train.formats import DataError

IGNORE = -100
_SENTINEL = "\u2063moetune-turn-end\u2063"


class ChatMaskError(DataError):
    """A chat record whose assistant turns cannot be located."""


# ----------------------------------------------------------------- templates
def trl_templates_dir() -> str | None:
    """TRL's folder of chat templates (originals and training variants), if TRL is installed."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "chat_templates")
    return d if os.path.isdir(d) else None


def known_template_names() -> list[str]:
    d = trl_templates_dir()
    if d is None:
        return []
    return sorted(n[: -len(".jinja")] for n in os.listdir(d) if n.endswith(".jinja"))


def resolve_chat_template(spec: str) -> str:
    """`--chat-template`: a file holding a Jinja template, or a known template name."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as fh:
            text = fh.read()
        if "{%" not in text and "{{" not in text:
            raise ChatMaskError(f"chat_template: {spec!r} does not look like a Jinja chat template")
        return text
    names = known_template_names()
    if spec in names:
        with open(os.path.join(trl_templates_dir(), spec + ".jinja"), encoding="utf-8") as fh:
            return fh.read()
    if not names:
        raise ChatMaskError(
            f"chat_template: {spec!r} is not a file, and the named templates need TRL (pip install trl)"
        )
    raise ChatMaskError(f"chat_template: {spec!r} is not a file nor a known name; known names: {', '.join(names)}")


def training_variant(template: str) -> str | None:
    """TRL's training variant ({% generation %} markers, prefix-preserving) of a known original template."""
    d = trl_templates_dir()
    if d is None:
        return None
    for n in os.listdir(d):
        if not n.endswith("_training.jinja"):
            continue
        orig = os.path.join(d, n[: -len("_training.jinja")] + ".jinja")
        if os.path.isfile(orig):
            with open(orig, encoding="utf-8") as fh:
                if fh.read() == template:
                    with open(os.path.join(d, n), encoding="utf-8") as g:
                        return g.read()
    return None


def has_generation_markers(template: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


# ----------------------------------------------------------------- the mask
@dataclasses.dataclass
class Masked:
    input_ids: list[int]
    labels: list[int]
    method: str  # "render", "markers" or "trl-training-template"


class ChatMasker:
    """Per tokenizer (and template): encodes chat records into (input_ids, labels)."""

    def __init__(self, tok, template: str | None = None):
        self.tok = tok
        self.template = template if template is not None else getattr(tok, "chat_template", None)
        if isinstance(self.template, dict):
            self.template = self.template.get("default")
        if self.template is None:
            raise ChatMaskError("chat records need a tokenizer with a chat template (this tokenizer has none)")
        self.special = set(tok.all_special_tokens) | set(tok.get_added_vocab())
        self._training = None  # TRL's variant, looked up on first need
        self._training_looked = False

    def _render(self, messages, template=None, **kw) -> str:
        return self.tok.apply_chat_template(
            list(messages), tokenize=False, chat_template=template or self.template, **kw
        )

    def encode(self, messages: list[dict], loss_on: str = "assistant", train_from: int = 0) -> Masked:
        """loss_on=assistant: the assistant turns at index >= train_from carry loss; all: every token."""
        full = self._render(messages)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return Masked(ids, list(ids), "all")
        spans = self._spans(messages, full, train_from)
        if spans is not None:
            spans, append_eos = spans
            labels = [
                t if any(s < e_ and e > s_ for s_, e_ in spans) else IGNORE
                for t, (s, e) in zip(ids, enc["offset_mapping"])
            ]
            if append_eos:
                ids.append(self.tok.eos_token_id)
                labels.append(self.tok.eos_token_id)
            return Masked(ids, labels, "render")
        if has_generation_markers(self.template):
            return self._markers(messages, self.template, "markers", train_from)
        if not self._training_looked:
            self._training, self._training_looked = training_variant(self.template), True
        if self._training is not None:
            return self._markers(messages, self._training, "trl-training-template", train_from)
        raise ChatMaskError(
            "cannot find the assistant turns: the chat template renders them differently depending on "
            "what follows, has no {% generation %} markers and is not a template TRL has a training "
            "variant of; use --chat-template (a file with {% generation %} markers, or a known name) or loss_on=all"
        )

    def _markers(self, messages, template: str, method: str, train_from: int) -> Masked:
        out = self.tok.apply_chat_template(
            list(messages),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=template,
        )
        ids, mask = list(out["input_ids"]), out["assistant_masks"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if turns and not any(mask):
            raise ChatMaskError("the chat template's {% generation %} markers mark no assistant token")
        keep = list(mask)
        if train_from > 0:
            # One marked run per assistant turn, in order: drop the runs of the turns before train_from.
            runs = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
            if len(runs) != len(turns):
                raise ChatMaskError(
                    f"the {{% generation %}} markers mark {len(runs)} spans for {len(turns)} assistant turns; "
                    "cannot leave the prompt's assistant turns untrained"
                )
            for start, turn in zip(runs, turns):
                if turn < train_from:
                    j = start
                    while j < len(keep) and mask[j]:
                        keep[j] = 0
                        j += 1
        return Masked(ids, [t if k else IGNORE for t, k in zip(ids, keep)], method)

    # ---- the render method
    def _content_end(self, messages, i: int, full: str) -> int | None:
        """Where assistant turn i's content ends in `full`: the conversation rendered with a sentinel
        after that content must equal `full` with the sentinel inserted once. Templates that trim the
        content (Llama, GLM) are tried again with the content's trailing whitespace removed."""
        content = messages[i].get("content") or ""
        for c in (content, content.rstrip()) if content != content.rstrip() else (content,):
            marked = [dict(x) for x in messages]
            marked[i]["content"] = c + _SENTINEL
            try:
                with_s = self._render(marked)
            except Exception:
                return None
            at = with_s.find(_SENTINEL)
            if at >= 0 and with_s.count(_SENTINEL) == 1 and with_s[:at] + with_s[at + len(_SENTINEL) :] == full:
                return at
        return None

    def _special_at(self, text: str, pos: int) -> int:
        """Length of the special token starting at text[pos] (0: none)."""
        best = 0
        for s in self.special:
            if len(s) > best and text.startswith(s, pos):
                best = len(s)
        return best

    def _spans(self, messages, full: str, train_from: int = 0):
        """([(start, end) character spans of the assistant turns], append EOS) or None."""
        spans, append_eos = [], False
        n = len(messages)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self._render(messages[:i]) if i else ""
                gen = self._render(messages[:i], add_generation_prompt=True)
            except Exception:
                return None
            if not full.startswith(before):
                return None
            start = _common_prefix(full, gen)
            if start < len(before):
                return None
            at = self._content_end(messages, i, full)
            if at is None or at < start:
                return None
            end = at
            k = self._special_at(full, end)
            if k:
                end += k
                ws = end
                while ws < len(full) and full[ws].isspace():
                    ws += 1
                if ws == len(full) or self._special_at(full, ws):
                    end = ws  # the template's newline after the end-of-turn token
            elif end == len(full) and i == n - 1 and self.tok.eos_token_id is not None:
                append_eos = True  # no end-of-turn token after the last turn (GLM): EOS, trained
            else:
                return None  # content not followed by a special token: the turn's end is unknown
            if end <= start or (spans and start < spans[-1][1]):
                return None
            if i >= train_from:
                spans.append((start, end))
        return spans, append_eos


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
