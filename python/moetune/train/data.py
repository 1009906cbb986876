"""Training data: the sources and record formats of moetune.train.formats
(canonical records naming their file and line), tokenised into (input_ids,
labels) with the loss only where it belongs (chat turns: moetune.train.
chat_masking; tokenising in parallel and cached: moetune.train.tokenize_cache),
then batched.

* chat records: rendered with the tokenizer's chat template (or chat_template),
  loss on the assistant turns including their end-of-turn token.
* prompt / completion (plain text; alpaca without a chat template as the
  classic "### Instruction / ### Input / ### Response" prompt): the prompt with
  the tokenizer's special tokens, the completion + EOS trained.
* text: every token trained (+ EOS).

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

import json
import random
from collections.abc import Iterator, Sequence

import torch

from moetune.train import formats, samples, tokenize_cache
from moetune.train.chat_masking import ChatMasker
from moetune.train.formats import ALPACA_PROMPT, DataError  # noqa: F401  (re-exported)
from moetune.train.progress import interactive
from moetune.train.tokenize_cache import EncodeStats

IGNORE = -100


# ----------------------------------------------------------------- tokenising
def encode_chat(tok, messages, loss_on: str, train_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation (see moetune.train.chat_masking)."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError("`messages` must be a list of {role, content} objects")
    m = ChatMasker(tok).encode(messages, loss_on, train_from)
    return m.input_ids, m.labels


def encode_completion(tok, prompt: str, completion: str, loss_on: str) -> tuple[list[int], list[int]]:
    """Plain text: the prompt (with the tokenizer's special tokens), then the completion + EOS, which carries loss."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(completion, add_special_tokens=False)["input_ids"] + (
        [tok.eos_token_id] if tok.eos_token_id is not None else []
    )
    ids = list(p) + list(r)
    labels = (list(p) if loss_on == "all" else [IGNORE] * len(p)) + list(r)
    return ids, labels


def encode_alpaca(tok, rec, loss_on: str) -> tuple[list[int], list[int]]:
    """An alpaca record: through the chat template when the tokenizer has one, else the classic prompt."""
    has_template = getattr(tok, "chat_template", None) is not None
    c = formats.canonical(rec, "alpaca", formats.Mapping.parse([], []), has_template)
    return Encoder(tok, max_length=1 << 62, truncation=False, loss_on=loss_on).encode(c)


def encode_text(tok, rec) -> tuple[list[int], list[int]]:
    text = rec.get("text")
    if not isinstance(text, str):
        raise DataError("text records need a string `text`")
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids, list(ids)


class Encoder:
    """Canonical records (moetune.train.formats) -> (input_ids, labels), and the
    batched map function the tokenisation workers run (picklable)."""

    def __init__(self, tok, *, max_length: int, truncation: bool, loss_on: str):
        self.tok, self.max_length, self.truncation, self.loss_on = tok, max_length, truncation, loss_on
        self._masker = None

    def encode(self, rec: dict) -> tuple[list[int], list[int]]:
        if "messages" in rec:
            if self._masker is None:
                self._masker = ChatMasker(self.tok)
            m = self._masker.encode(rec["messages"], self.loss_on, rec.get("train_from", 0))
            return m.input_ids, m.labels
        if "prompt" in rec:
            return encode_completion(self.tok, rec["prompt"], rec["completion"], self.loss_on)
        return encode_text(self.tok, rec)

    def one(self, rec: dict) -> tuple[list[int], list[int], int]:
        ids, labels = self.encode(rec)
        status = tokenize_cache.OK
        if len(ids) > self.max_length:
            if not self.truncation:
                return ids[:0], labels[:0], tokenize_cache.TOO_LONG
            ids, labels, status = ids[: self.max_length], labels[: self.max_length], tokenize_cache.TRUNCATED
        if all(l == IGNORE for l in labels[1:]):
            status = tokenize_cache.NO_LOSS
        return ids, labels, status

    def map_batch(self, batch):
        out = {"input_ids": [], "labels": [], "status": [], "error": []}
        for rec, where in zip(batch["rec"], batch["where"]):
            try:
                ids, labels, st = self.one(json.loads(rec))
                err = ""
            except Exception as e:  # a template error is as much the record's problem as a DataError
                ids, labels, st = [], [], tokenize_cache.ERROR
                err = f"{where}: {e}" if isinstance(e, DataError) else f"{where}: {type(e).__name__}: {e}"
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(st)
            out["error"].append(err)
        return out


def encode_records(records: list[formats.Record], tok, cfg, *, what: str):
    """Tokenise (cached, parallel) -> ({input_ids, labels} of the usable samples, EncodeStats, cache outcome)."""
    enc = Encoder(tok, max_length=cfg.max_length, truncation=cfg.truncation, loss_on=cfg.loss_on)
    options = {"max_length": cfg.max_length, "truncation": cfg.truncation, "loss_on": cfg.loss_on}
    cache_dir = data_cache_dir(cfg)
    out, outcome = tokenize_cache.encode_records(
        [json.dumps(r.rec, sort_keys=True) for r in records],
        [r.where for r in records],
        enc,
        options=options,
        cache_dir=cache_dir,
        num_proc=cfg.num_proc,
        progress=interactive(cfg.progress),
        desc=f"tokenizing {what}",
    )
    status = out["status"]
    errors = [e for e in out["error"] if e]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} record(s) cannot be encoded:\n  " + "\n  ".join(errors[:10]) + more)
    stats = EncodeStats(
        records=len(status),
        truncated=status.count(tokenize_cache.TRUNCATED),
        dropped_long=status.count(tokenize_cache.TOO_LONG),
        dropped_empty=status.count(tokenize_cache.NO_LOSS),
    )
    keep = [i for i, s in enumerate(status) if s in (tokenize_cache.OK, tokenize_cache.TRUNCATED)]
    if not keep:
        raise DataError(
            f"{what}: no usable samples ({stats.records} records: {stats.dropped_long} longer than max_length "
            f"with truncation off, {stats.dropped_empty} with no token that carries loss)"
        )
    ids, labels = out["input_ids"], out["labels"]
    return {"input_ids": [ids[i] for i in keep], "labels": [labels[i] for i in keep]}, stats, outcome


def data_cache_dir(cfg) -> str | None:
    """Where tokenised data is cached: data_cache_dir, else <output_dir>/data-cache; None when data_cache is off."""
    import os

    if not getattr(cfg, "data_cache", True):
        return None
    return getattr(cfg, "data_cache_dir", None) or os.path.join(cfg.output_dir, "data-cache")


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
    import dataclasses

    mapping = formats.Mapping.parse(list(getattr(cfg, "data_columns", [])), list(getattr(cfg, "data_roles", [])))
    has_template = getattr(tok, "chat_template", None) is not None
    kw = dict(data_format=cfg.data_format, mapping=mapping, has_template=has_template)
    records, sources, fmt = formats.load(data_path, **kw)
    if cfg.eval_data is not None:
        ev = formats.load(cfg.eval_data, **kw)[0]
    else:
        records, ev = formats.split_eval(records, cfg.eval_fraction, cfg.seed)
    records = formats.apply_weights(records, sources, cfg.seed)
    train, st, outcome = encode_records(records, tok, cfg, what=data_path)
    stats = {"format": fmt, "train": dataclasses.asdict(st), "cache": outcome}
    stats["sample_records"] = samples.pick(ev or records, getattr(cfg, "sample_records", 0))
    evs = None
    if ev:
        evs, est, _ = encode_records(ev, tok, cfg, what=cfg.eval_data or f"{data_path} (eval split)")
        stats["eval"] = dataclasses.asdict(est)
    return train, evs, stats, fmt
