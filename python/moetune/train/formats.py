"""Training data as users have it: where records come from and what shape they
have, turned into one canonical record per sample that names its file and line.

Sources (`data` / `eval_data`): a comma-separated list of entries, each
  * a file: .jsonl (one JSON object per line), .json (an array of objects, or an
    object whose one list-valued key holds them), .parquet;
  * a folder: every .jsonl / .json / .parquet file in it (shards, sorted by
    name), or a folder written by `datasets.save_to_disk`;
  * a Hub dataset name (`org/name`, split `train`), through `datasets`, where
    the machine can reach it;
each optionally followed by `:W`, a mixing weight: the source's training
samples are repeated floor(W) times plus a seeded random fraction W - floor(W)
of them (1: as is; 0.5: a random half; 3: three times).

Record formats (auto-detected per source from the first record's keys, or
`data_format`):
  chat               `messages`: [{role, content}], content a string or a list
                     of text parts ({"type": "text", "text": ...} or strings)
  sharegpt           `conversations`: [{from, value}] with human / gpt / system
                     / tool roles (and an optional `system` column)
  prompt_completion  TRL's: `prompt` + `completion`, both strings (plain text,
                     loss on the completion) or both message lists (chat, loss on
                     the completion's assistant turns)
  alpaca             `instruction`, optional `input`, `output` (or `response`),
                     optional `system` and `history` ([[user, assistant], ...])
  text               `text`: every token trained
`data_columns` renames columns (`messages=dialog`, `content=text`, ...) and
`data_roles` maps role names (`bot=assistant`).

Canonical records (JSON-serialisable dicts):
  {"messages": [...], "train_from": k}  chat; assistant turns at index >= k carry loss
  {"prompt": str, "completion": str}     plain text, loss on the completion
  {"text": str}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re

FORMATS = ("chat", "sharegpt", "prompt_completion", "alpaca", "text")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "ipython": "tool",
}
COLUMN_NAMES = (
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "text",
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """A record or file that cannot be turned into training samples (the text names file and line)."""


FormatError = DataError


@dataclasses.dataclass
class Source:
    spec: str
    weight: float = 1.0


@dataclasses.dataclass
class Record:
    rec: dict  # canonical
    where: str  # "file:line" / "file row N"
    source: int  # index into the sources


# ----------------------------------------------------------------- sources
def _spec_parts(spec: str) -> list[tuple[str, str | None]]:
    """The non-empty comma-separated sources of `spec` as (path or name, the `:W` weight text or
    None); a suffix after the last colon that is not a number belongs to the name."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                float(tail)
            except ValueError:
                pass
            else:
                out.append((head, tail))
                continue
        out.append((part, None))
    return out


def parse_spec(spec: str) -> list[Source]:
    """`a.jsonl, shards/:0.5, org/name:2` -> sources with weights."""
    out = []
    for part, tail in _spec_parts(spec):
        weight = 1.0 if tail is None else float(tail)
        if not math.isfinite(weight) or weight <= 0:
            raise FormatError(f"{spec!r}: the weight of {part!r} must be a positive number, got {weight}")
        out.append(Source(part, weight))
    if not out:
        raise FormatError(f"no data source in {spec!r}")
    return out


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def absolute_spec(spec: str) -> str:
    """`spec` with each source that is an existing local path made absolute (Hub names, paths
    that do not exist and the `:W` weights are kept as written)."""
    parts = []
    for path, tail in _spec_parts(spec):
        if not os.path.isabs(path) and os.path.exists(path):
            path = os.path.abspath(path)
        parts.append(path if tail is None else f"{path}:{tail}")
    return ",".join(parts)


def check_spec(spec: str) -> str | None:
    """A reason the spec cannot be read (checked before any model loads), or None."""
    try:
        sources = parse_spec(spec)
    except FormatError as e:
        return str(e)
    for s in sources:
        p = s.spec
        if os.path.isfile(p):
            if not p.endswith(FILE_EXTENSIONS):
                return f"{p!r} must end in .jsonl, .json or .parquet"
        elif os.path.isdir(p):
            if not is_saved_dataset(p) and not _folder_files(p):
                return f"folder {p!r} holds no {', '.join(FILE_EXTENSIONS)} file and no saved dataset"
        elif p.endswith(FILE_EXTENSIONS) or os.path.isabs(p) or p.startswith("."):
            return f"file {p!r} does not exist"
        elif not _HUB_NAME.match(p):
            return f"{p!r} does not exist (nor is it a Hub dataset name org/name)"
    return None


def _folder_files(path: str) -> list[str]:
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.join(root, f) for f in files if f.endswith(FILE_EXTENSIONS) and not f.startswith(".")]
    return sorted(out)


def read_rows(spec: str) -> list[tuple[object, str]]:
    """(raw row, where) of every row of a source entry."""
    if os.path.isfile(spec):
        return _read_file(spec)
    if os.path.isdir(spec):
        if is_saved_dataset(spec):
            import datasets

            try:
                ds = datasets.load_from_disk(spec)
            except Exception as e:
                raise FormatError(f"{spec}: cannot load the saved dataset: {type(e).__name__}: {e}") from None
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise FormatError(f"{spec}: a saved DatasetDict without a `train` split ({list(ds)})")
                ds = ds["train"]
            return [(r, f"{spec} row {i}") for i, r in enumerate(ds)]
        rows = []
        for f in _folder_files(spec):
            rows += _read_file(f)
        return rows
    import datasets

    try:
        ds = datasets.load_dataset(spec, split="train")
    except Exception as e:
        raise FormatError(f"{spec}: not a local file or folder, and not loadable from the Hub: {e}") from None
    return [(r, f"{spec} row {i}") for i, r in enumerate(ds)]


def _read_file(path: str) -> list[tuple[object, str]]:
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return [(r, f"{path} row {i}") for i, r in enumerate(pq.read_table(path).to_pylist())]
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e})") from None
    except Exception as e:
        raise FormatError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    if not text.strip():
        raise FormatError(f"{path}: the file is empty")
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        return rows
    return _read_json_array(path, text)


def _read_json_array(path: str, text: str) -> list[tuple[object, str]]:
    """A .json file: an array of records (or an object with one list of records),
    each named by the line its object starts on."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if text[i] == "{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            return [(obj, f"{path}:{text.count(chr(10), 0, i) + 1}")]
        key = lists[0]
        m = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
        if m is None:
            return [(r, f"{path} ({key}[{j}])") for j, r in enumerate(obj[key])]
        i = m.end() - 1
    if text[i] != "[":
        raise FormatError(f"{path}: a .json file must hold an array of records (or .jsonl: one per line)")
    out = []
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out.append((rec, f"{path}:{line}"))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise FormatError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or ']' between records")
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


# ----------------------------------------------------------------- formats
@dataclasses.dataclass
class Mapping:
    """`data_columns` / `data_roles`: canonical name -> name in the data."""

    columns: dict[str, str]
    roles: dict[str, str]

    @classmethod
    def parse(cls, columns: list[str], roles: list[str]) -> Mapping:
        def pairs(items, what, valid=None):
            out = {}
            for it in items:
                k, sep, v = it.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise FormatError(f"{what}: {it!r} must be name=value")
                k, v = k.strip(), v.strip()
                if valid is not None and k not in valid:
                    raise FormatError(f"{what}: {k!r} is not one of {', '.join(valid)}")
                out[k] = v
            return out

        cols = pairs(columns, "data_columns", COLUMN_NAMES)
        rmap = {**ROLES}
        for k, v in pairs(roles, "data_roles").items():
            if v not in ("user", "assistant", "system", "tool"):
                raise FormatError(f"data_roles: {k}={v}: the target must be user, assistant, system or tool")
            rmap[k] = v
        return cls(cols, rmap)

    def col(self, name: str) -> str:
        return self.columns.get(name, name)


def detect(row, requested: str, mp: Mapping, where: str) -> str:
    if not isinstance(row, dict):
        raise FormatError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    need = {
        "chat": ("messages",),
        "sharegpt": ("conversations",),
        "prompt_completion": ("prompt", "completion"),
        "alpaca": ("instruction",),
        "text": ("text",),
    }
    if requested != "auto":
        missing = [mp.col(c) for c in need[requested] if mp.col(c) not in row]
        if missing:
            raise FormatError(f"{where}: data_format={requested} needs column(s) {missing}; the record has {list(row)}")
        return requested
    for fmt in FORMATS:
        if all(mp.col(c) in row for c in need[fmt]):
            return fmt
    raise FormatError(
        f"{where}: cannot tell the format from the columns {list(row)}; expected `messages` (chat), "
        "`conversations` (sharegpt), `prompt` + `completion`, `instruction` + `output` (alpaca) or `text` "
        "(or map yours with data_columns, e.g. messages=dialog)"
    )


def _text(content, what: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise FormatError(f"{what}: only text parts are supported, got a {kind!r} part")
        return "".join(parts)
    raise FormatError(f"{what}: content must be a string or a list of text parts, got {type(content).__name__}")


def _messages(items, mp: Mapping, role_key: str, content_key: str, what: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise FormatError(f"{what} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or role_key not in m or (content_key not in m and "tool_calls" not in m):
            raise FormatError(f"{what}[{j}] must be an object with `{role_key}` and `{content_key}`")
        role = mp.roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise FormatError(
                f"{what}[{j}]: unknown role {m[role_key]!r} (known: {', '.join(sorted(mp.roles))}; map it with "
                "data_roles, e.g. bot=assistant)"
            )
        msg = {k: v for k, v in m.items() if k not in (role_key, content_key)}
        msg["role"], msg["content"] = role, _text(m.get(content_key), f"{what}[{j}]")
        out.append(msg)
    return out


def canonical(row: dict, fmt: str, mp: Mapping, has_template: bool) -> dict:
    """The canonical record of one raw row (FormatError names what is wrong, not where)."""
    c = mp.col
    if fmt == "chat":
        return {"messages": _messages(row[c("messages")], mp, c("role"), c("content"), "`messages`"), "train_from": 0}
    if fmt == "sharegpt":
        msgs = _messages(row[c("conversations")], mp, c("from"), c("value"), "`conversations`")
        sys_ = row.get(c("system"))
        if isinstance(sys_, str) and sys_ and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": sys_})
        return {"messages": msgs, "train_from": 0}
    if fmt == "prompt_completion":
        p, q = row[c("prompt")], row[c("completion")]
        if isinstance(p, str) and isinstance(q, str):
            return {"prompt": p, "completion": q}
        if isinstance(p, list) and isinstance(q, list):
            pm = _messages(p, mp, c("role"), c("content"), "`prompt`")
            return {"messages": pm + _messages(q, mp, c("role"), c("content"), "`completion`"), "train_from": len(pm)}
        raise FormatError("`prompt` and `completion` must both be strings or both be lists of messages")
    if fmt == "alpaca":
        instr, inp = row.get(c("instruction")), row.get(c("input")) or ""
        out = row.get(c("output"), row.get("response"))
        if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp, str):
            raise FormatError("alpaca records need string `instruction` and `output` (and optional `input`)")
        if not has_template:
            if row.get(c("history")):
                raise FormatError("alpaca `history` needs a chat template (the tokenizer has none; see chat_template)")
            return _alpaca_plain(instr, inp, out)
        msgs = []
        sys_ = row.get(c("system"))
        if isinstance(sys_, str) and sys_:
            msgs.append({"role": "system", "content": sys_})
        for h in row.get(c("history")) or []:
            if not (isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise FormatError("alpaca `history` must be a list of [user, assistant] string pairs")
            msgs += [{"role": "user", "content": h[0]}, {"role": "assistant", "content": h[1]}]
        user = instr + (f"\n\n{inp}" if inp else "")
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        return {"messages": msgs, "train_from": 0}
    text = row.get(c("text"))
    if not isinstance(text, str):
        raise FormatError("text records need a string `text`")
    return {"text": text}


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def _alpaca_plain(instr: str, inp: str, out: str) -> dict:
    """Alpaca without a chat template: the classic prompt, loss on the response."""
    prompt = ALPACA_PROMPT.format(instruction=instr, input_block=f"### Input:\n{inp}\n\n" if inp else "")
    return {"prompt": prompt, "completion": out}


# ----------------------------------------------------------------- loading
def load(
    spec: str, *, data_format: str, mapping: Mapping, has_template: bool
) -> tuple[list[Record], list[Source], str]:
    """(canonical records, sources, format description) of a data spec. Errors: every bad
    row is named (file and line), up to 10, in one FormatError."""
    sources = parse_spec(spec)
    records: list[Record] = []
    problems: list[str] = []
    formats = []
    for si, src in enumerate(sources):
        rows = read_rows(src.spec)
        if not rows:
            raise FormatError(f"{src.spec}: no records")
        fmt = detect(rows[0][0], data_format, mapping, rows[0][1])
        formats.append(fmt)
        for row, where in rows:
            try:
                if not isinstance(row, dict):
                    raise FormatError(f"a record must be a JSON object, got {type(row).__name__}")
                records.append(Record(canonical(row, fmt, mapping, has_template), where, si))
            except FormatError as e:
                problems.append(f"{where}: {e}")
            except KeyError as e:
                problems.append(f"{where}: missing column {e} (this source's format is {fmt})")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise FormatError(f"{len(problems)} malformed record(s):\n  " + "\n  ".join(problems[:10]) + more)
    kinds = sorted(set(formats))
    return records, sources, kinds[0] if len(kinds) == 1 else "+".join(kinds)


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded held-out fraction (at least one record when fraction > 0 and there are >= 2)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, math.ceil(fraction * len(records))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def apply_weights(records: list[Record], sources: list[Source], seed: int) -> list[Record]:
    """Each source's records repeated floor(w) times plus a seeded random fraction w - floor(w)."""
    if all(s.weight == 1.0 for s in sources):
        return records
    out = []
    for si, s in enumerate(sources):
        mine = [r for r in records if r.source == si]
        whole, frac = int(s.weight), s.weight - int(s.weight)
        out += mine * whole
        if frac > 0 and mine:
            rng = random.Random(seed * 7919 + si)
            out += [mine[i] for i in sorted(rng.sample(range(len(mine)), round(frac * len(mine))))]
    return out
