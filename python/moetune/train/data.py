"""Training data: local JSONL / JSON / Parquet via HF `datasets`, tokenised
into (input_ids, labels) with the loss only where it belongs, then batched.

Formats (auto-detected from the columns unless data_format says otherwise):
* chat: `messages` = [{role, content}, ...], rendered with the tokenizer's own
  chat template. Assistant spans are found by rendering: for assistant
  message i the characters between render(messages[:i], add_generation_prompt)
  and render(messages[:i+1]) are the turn (its end-of-turn marker included);
  tokens are labelled by their character offsets, so BPE merges across a
  boundary cannot shift the mask. Templates that re-render earlier turns
  differently (the rendered prefix is not a prefix of the whole) fall back to
  the template's own `{% generation %}` mask (return_assistant_tokens_mask);
  if it has none, a clear error.
* alpaca: instruction / input / output. With a chat template: one user turn
  (instruction, blank line, input) and one assistant turn (output), as above;
  without: the classic "### Instruction / ### Input / ### Response" prompt and
  the response + EOS is the trained part.
* text: `text`, every token trained (+ EOS).

Labels use -100 for no-loss tokens; the model shifts them (label j is
predicted at position j-1). Packing puts several samples in one row with
position ids restarting at 0 per sample and no attention mask: transformers
then builds a block-diagonal causal mask from the position ids
(masking_utils.find_packed_sequence_indices), so no token attends across
samples; the first token of each packed sample gets label -100 so nothing is
predicted across a boundary either. Packed training therefore computes
exactly what unpacked training computes for the same samples.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence

import torch

IGNORE = -100
FORMAT_COLUMNS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "text": ("text",)}


class DataError(ValueError):
    """A record or file that cannot be turned into training samples."""


# ----------------------------------------------------------------- loading
def load_records(path: str):
    """A `datasets.Dataset` of the file's records."""
    import datasets

    datasets.disable_progress_bars()  # tiny local files: the bars would only clutter the run's output
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        return datasets.load_dataset(kind, data_files=path, split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {path!r} as {kind}: {type(e).__name__}: {e}") from None


def detect_format(columns: Sequence[str], requested: str, path: str) -> str:
    if requested != "auto":
        missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if missing:
            raise DataError(f"{path}: data_format={requested} needs column(s) {missing}; the file has {list(columns)}")
        return requested
    for fmt, cols in FORMAT_COLUMNS.items():
        if all(c in columns for c in cols):
            return fmt
    raise DataError(
        f"{path}: cannot tell the format from the columns {list(columns)}; expected "
        "`messages` (chat), `instruction` + `output` (alpaca) or `text`"
    )


# ----------------------------------------------------------------- tokenising
def _render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, **kw)


def _assistant_char_spans(tok, messages) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in render(messages), or None when
    the template does not render consistently prefix by prefix."""
    full = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
            upto = _render(tok, messages[: i + 1])
        except Exception:
            return None
        if not (full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix)):
            return None
        spans.append((len(prefix), len(upto)))
    return spans


def encode_chat(tok, messages, loss_on: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError("`messages` must be a list of {role, content} objects")
    if getattr(tok, "chat_template", None) is None:
        raise DataError("chat records need a tokenizer with a chat template (this tokenizer has none)")
    full = _render(tok, messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if loss_on == "all":
        return ids, list(ids)
    spans = _assistant_char_spans(tok, messages)
    if spans is not None:
        labels = [
            t if any(s < e_ and e > s_ for s_, e_ in spans) else IGNORE for t, (s, e) in zip(ids, enc["offset_mapping"])
        ]
        return ids, labels
    out = tok.apply_chat_template(list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = out.get("assistant_masks")
    if mask is None or (not any(mask) and any(m["role"] == "assistant" for m in messages)):
        raise DataError(
            "cannot find the assistant turns: the chat template re-renders earlier turns "
            "differently and has no {% generation %} markers; use loss_on=all or another template"
        )
    ids = list(out["input_ids"])
    return ids, [t if k else IGNORE for t, k in zip(ids, mask)]


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def encode_alpaca(tok, rec, loss_on: str) -> tuple[list[int], list[int]]:
    instr, inp, outp = rec.get("instruction"), rec.get("input") or "", rec.get("output")
    if not isinstance(instr, str) or not isinstance(outp, str) or not isinstance(inp, str):
        raise DataError("alpaca records need string `instruction` and `output` (and optional `input`)")
    if getattr(tok, "chat_template", None) is not None:
        user = instr + (f"\n\n{inp}" if inp else "")
        return encode_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": outp}], loss_on)
    prompt = ALPACA_PROMPT.format(instruction=instr, input_block=f"### Input:\n{inp}\n\n" if inp else "")
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(outp, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    ids = list(p) + list(r)
    labels = (list(p) if loss_on == "all" else [IGNORE] * len(p)) + list(r)
    return ids, labels


def encode_text(tok, rec) -> tuple[list[int], list[int]]:
    text = rec.get("text")
    if not isinstance(text, str):
        raise DataError("text records need a string `text`")
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids, list(ids)


@dataclasses.dataclass
class EncodeStats:
    records: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0


def encode_dataset(ds, tok, fmt: str, *, max_length: int, truncation: bool, loss_on: str, where: str):
    """Tokenise a datasets.Dataset -> (Dataset[input_ids, labels], EncodeStats)."""

    def one(rec, idx):
        try:
            if fmt == "chat":
                ids, labels = encode_chat(tok, rec["messages"], loss_on)
            elif fmt == "alpaca":
                ids, labels = encode_alpaca(tok, rec, loss_on)
            else:
                ids, labels = encode_text(tok, rec)
        except DataError as e:
            raise DataError(f"{where}: record {idx}: {e}") from None
        status = 0
        if len(ids) > max_length:
            if truncation:
                ids, labels, status = ids[:max_length], labels[:max_length], 1
            else:
                status = 2
        if status != 2 and all(l == IGNORE for l in labels[1:]):
            status = 3
        return {"input_ids": ids, "labels": labels, "_status": status}

    out = ds.map(
        one,
        with_indices=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc=None,
    )
    status = out["_status"]
    stats = EncodeStats(
        records=len(status), truncated=status.count(1), dropped_long=status.count(2), dropped_empty=status.count(3)
    )
    out = out.filter(
        lambda s: s in (0, 1), input_columns="_status", keep_in_memory=True, load_from_cache_file=False
    ).remove_columns("_status")
    if len(out) == 0:
        raise DataError(f"{where}: no usable samples ({stats})")
    return out, stats


# ----------------------------------------------------------------- batching
Sample = tuple[list[int], list[int]]


def plan_rows(lengths: Sequence[int], order: Sequence[int], packing: bool, max_length: int) -> list[list[int]]:
    """Rows of sample indices, in `order`; packing fills rows greedily (next-fit)."""
    if not packing:
        return [[i] for i in order]
    rows, cur, used = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and used + n > max_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def collate(rows: list[list[Sample]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch. Unpacked: attention_mask marks real tokens.
    Packed: position_ids restart per sample (padding is its own segment) and no
    attention_mask, so transformers masks block-diagonally."""
    flat = []
    for row in rows:
        ids, labels, pos = [], [], []
        for k, (i, l) in enumerate(row):
            ids += i
            labels += ([IGNORE] + list(l[1:])) if (packing and k > 0) else list(l)
            pos += list(range(len(i)))
        flat.append((ids, labels, pos))
    T = max(len(f[0]) for f in flat)
    B = len(flat)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab, pos) in enumerate(flat):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(lab)
        attn[b, :n] = 1
        position_ids[b, :n] = torch.tensor(pos)
        position_ids[b, n:] = torch.arange(T - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packing:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attn
    return batch


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss (labels after the model's shift)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Stream:
    """An endless, seeded, resumable stream of micro-batches over epochs.

    Position = (epoch, row index in that epoch's plan); the plan of epoch e is
    a pure function of (seed, e), so a checkpoint stores only the position.
    """

    def __init__(
        self, samples, *, micro_batch_size: int, packing: bool, max_length: int, shuffle: bool, seed: int, pad_id: int
    ):
        self.ids: list[list[int]] = samples["input_ids"]
        self.labels: list[list[int]] = samples["labels"]
        self.lengths = [len(x) for x in self.ids]
        self.mbs, self.packing, self.max_length = micro_batch_size, packing, max_length
        self.shuffle, self.seed, self.pad_id = shuffle, seed, pad_id
        self.epoch, self.index = 0, 0
        self.last_tokens = 0  # real (non-padding) tokens of the last batch
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch != self._plan_epoch:
            order = list(range(len(self.ids)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._plan, self._plan_epoch = plan_rows(self.lengths, order, self.packing, self.max_length), epoch
        return self._plan

    def rows_per_epoch(self) -> int:
        return len(self.plan(0))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, st: dict[str, int]) -> None:
        self.epoch, self.index = int(st["epoch"]), int(st["index"])

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.mbs:
            plan = self.plan(self.epoch)
            if self.index >= len(plan):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            rows.append([(self.ids[i], self.labels[i]) for i in plan[self.index]])
            self.index += 1
        self.last_tokens = sum(len(i) for row in rows for i, _ in row)
        return collate(rows, self.pad_id, self.packing)


def eval_batches(samples, micro_batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The eval set in file order, unpacked."""
    n = len(samples["input_ids"])
    for s in range(0, n, micro_batch_size):
        rows = [[(samples["input_ids"][i], samples["labels"][i])] for i in range(s, min(n, s + micro_batch_size))]
        yield collate(rows, pad_id, packing=False)


def prepare(cfg, tok, data_path: str):
    """(train samples, eval samples or None, stats dict, format) from the config.
    Samples are plain dicts of lists (materialised once: they are small next to a model)."""
    ds = load_records(data_path)
    fmt = detect_format(ds.column_names, cfg.data_format, data_path)
    if cfg.eval_data is not None:
        ev = load_records(cfg.eval_data)
        ev_fmt = detect_format(ev.column_names, cfg.data_format if cfg.data_format != "auto" else fmt, cfg.eval_data)
        if ev_fmt != fmt:
            raise DataError(f"eval_data is {ev_fmt} but data is {fmt}")
    elif cfg.eval_fraction > 0 and len(ds) >= 2:
        split = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        ds, ev = split["train"], split["test"]
    else:
        ev = None
    kw = dict(max_length=cfg.max_length, truncation=cfg.truncation, loss_on=cfg.loss_on)
    train, st = encode_dataset(ds, tok, fmt, where=data_path, **kw)
    stats = {"format": fmt, "train": dataclasses.asdict(st)}
    evs = None
    if ev is not None:
        evd, est = encode_dataset(ev, tok, fmt, where=cfg.eval_data or f"{data_path} (eval split)", **kw)
        evs = {"input_ids": evd["input_ids"], "labels": evd["labels"]}
        stats["eval"] = dataclasses.asdict(est)
    return {"input_ids": train["input_ids"], "labels": train["labels"]}, evs, stats, fmt
