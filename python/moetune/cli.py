"""`moetune` command line: train, demo, info."""

from __future__ import annotations

import argparse
import sys


def _optional(conv):
    def f(s: str):
        return None if s.lower() in ("none", "null", "unset") else conv(s)

    f.__name__ = getattr(conv, "__name__", "value")
    return f


def add_config_flags(p: argparse.ArgumentParser, defaults_note=None) -> None:
    """One flag per TrainConfig field (grouped by section), default=SUPPRESS so
    only flags actually given override the config file."""
    from moetune.train.config import SECTIONS, TrainConfig, describe_default, field_type, flag_name

    groups = {s: p.add_argument_group(f"{s} options") for s in SECTIONS}
    for name, f in TrainConfig.fields().items():
        meta = f.metadata
        t, optional = field_type(f)
        default = describe_default(f)
        if defaults_note and name in defaults_note:
            default += f"; demo: {defaults_note[name]!r}"
        help_ = f"{meta['help']} (default: {default})"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=help_, **meta.get("flag", {}))
        g = groups[meta["section"]]
        if t == "bool":
            g.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, **kw)
        elif t == "int":
            g.add_argument(flag_name(name), type=_optional(int) if optional else int, metavar="N", **kw)
        elif t == "float":
            g.add_argument(flag_name(name), type=_optional(float) if optional else float, metavar="X", **kw)
        elif t == "list[float]":
            g.add_argument(flag_name(name), type=float, nargs=2, metavar="X", **kw)
        elif t == "list[str]":
            g.add_argument(flag_name(name), nargs="*", metavar="TEXT", **kw)
        else:
            choices = meta.get("choices")
            g.add_argument(
                flag_name(name),
                type=_optional(str) if optional else str,
                choices=choices,
                metavar="|".join(choices) if choices else "VALUE",
                **kw,
            )


def config_from_args(args, base=None):
    from moetune.train.config import TrainConfig, load_yaml, make_config

    file_values = load_yaml(args.config) if getattr(args, "config", None) else None
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.fields()}
    return make_config(file_values, overrides, base=base)


def main(argv=None) -> int:
    from moetune.demo import DEMO_DEFAULTS

    parser = argparse.ArgumentParser(prog="moetune", description="LoRA fine-tuning of MoE models with CPU experts")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="LoRA-train a MoE model (experts on the CPU engine and the GPU) on a dataset",
        description="LoRA-train a local HF MoE checkpoint on a local dataset; the routed experts run "
        "in the moetune CPU engine and, with CUDA, on the GPU too (--expert-placement). "
        "Settings come from --config FILE (YAML, flat "
        "key: value, keys = the option names with _ instead of -) and flags, flags "
        "winning. Without --model: the embedded demo (as `moetune demo`).",
    )
    t.add_argument("--config", metavar="FILE.yaml", help="YAML config file (flags override it)")
    add_config_flags(t, defaults_note=DEMO_DEFAULTS)
    d = sub.add_parser(
        "demo",
        help="the embedded demo: LoRA-train a tiny MoE on CPU (= train without --model)",
        description="Train LoRA on a tiny Qwen3-MoE made locally, on the dataset shipped in the "
        "package, CPU only; prints generations before and after.",
    )
    d.add_argument("--config", metavar="FILE.yaml", help="YAML config file (flags override it)")
    add_config_flags(d, defaults_note=DEMO_DEFAULTS)
    i = sub.add_parser(
        "info", help="print the CPU features, the kernel the engine would use, every ISA and the weight formats"
    )
    i.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from moetune.train.config import ConfigError
    from moetune.train.data import DataError

    try:
        if args.command == "demo" or (args.command == "train" and _is_demo(args)):
            from moetune.demo import run_demo

            cfg_args = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
            if args.config:
                from moetune.train.config import load_yaml

                cfg_args = {**load_yaml(args.config), **cfg_args}
            run_demo(cfg_args)
            return 0
        if args.command == "train":
            from moetune.train.loop import train

            train(config_from_args(args))
            return 0
    except (ConfigError, DataError) as e:
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command == "info":
        from moetune.engine import Context
        from moetune.isa import isas

        print(Context(args.threads).info())
        print("ISAs (slowest first; auto = the last that runs here):")
        for isa in isas():
            k = isa.kernels
            status = "runs here" if isa.runnable else "not here: lacks " + " ".join(isa.missing_features)
            print(
                f"  {isa.name:12} gemm={k['gemm']} transpose={k['transpose']} eltwise={k['eltwise']} "
                f"dequant={k['dequant']}  {status}"
            )
        from moetune.weight_formats import describe

        print("\n".join(describe()))
        return 0
    return 2


def _is_demo(args) -> bool:
    if getattr(args, "model", None) is not None:
        return False
    if args.config:
        from moetune.train.config import load_yaml

        return load_yaml(args.config).get("model") is None
    return True


if __name__ == "__main__":
    sys.exit(main())
