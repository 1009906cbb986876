"""`moetune eval`: loss and perplexity of a model (+ adapter) on a dataset.

Every record of the file is encoded exactly as `moetune train` encodes training data (same
formats, chat template, loss tokens, truncation) and scored with the training loop's eval: the
token-weighted mean cross-entropy over the loss tokens; perplexity = exp(loss).
"""

from __future__ import annotations

import json
import math

from moetune.commands.common import UsageError, add_model_args, load


def add_parser(sub) -> None:
    from moetune.train.config import TrainConfig, describe_default

    f = TrainConfig.fields()
    p = sub.add_parser(
        "eval",
        help="loss / perplexity of a model (+ adapter) on a dataset",
        description="Token-weighted mean cross-entropy and perplexity over every record of a data file, "
        "encoded as moetune train encodes it (loss tokens: --loss-on).",
    )
    p.add_argument("--data", required=True, metavar="FILE", help=f["data"].metadata["help"].split(". Unset")[0])
    add_model_args(p)
    for name, kw in (
        ("data_format", dict(choices=f["data_format"].metadata["choices"])),
        ("loss_on", dict(choices=f["loss_on"].metadata["choices"])),
        ("max_length", dict(type=int)),
        ("micro_batch_size", dict(type=int)),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=getattr(TrainConfig(), name),
            help=f"{f[name].metadata['help']} (default: {describe_default(f[name])})",
            **kw,
        )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:

    from moetune.train import data, formats
    from moetune.train.config import TrainConfig
    from moetune.train.loop import evaluate

    why = formats.check_spec(args.data)
    if why is not None:
        raise UsageError(f"data: {why}")
    if args.max_length < 1 or args.micro_batch_size < 1:
        raise UsageError("max_length and micro_batch_size must be >= 1")
    model, tok, device, cfg = load(args)
    # The training data path: the same readers, formats, chat templates and loss masks (no cache).
    ecfg = TrainConfig(
        max_length=args.max_length,
        truncation=True,
        loss_on=args.loss_on,
        data_cache=False,
        progress=False,
        micro_batch_size=args.micro_batch_size,
    )
    try:
        records, _sources, fmt = formats.load(
            args.data,
            data_format=args.data_format,
            mapping=formats.Mapping.parse([], []),
            has_template=getattr(tok, "chat_template", None) is not None,
        )
        samples, stats, _ = data.encode_records(records, tok, ecfg, what=args.data)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    samples = {"input_ids": samples["input_ids"], "labels": samples["labels"]}
    if not samples["input_ids"]:
        raise UsageError(f"data: {args.data} has no usable records")
    tokens = sum(sum(1 for t in lab[1:] if t != data.IGNORE) for lab in samples["labels"])
    loss = evaluate(model, samples, ecfg, tok.pad_token_id, device)
    out = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "records": len(samples["input_ids"]),
        "loss_tokens": tokens,
        "truncated": stats.truncated,
        "model": cfg.model or "embedded demo",
        "adapter": args.adapter,
        "data": args.data,
        "format": fmt,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.data} ({fmt}, {out['records']} records, {tokens} loss tokens): loss {loss:.4f}, "
            f"perplexity {out['perplexity']:.3f}  [{out['model']}" + (f" + {args.adapter}]" if args.adapter else "]")
        )
    return 0
