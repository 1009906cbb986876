"""`moetune` command line: train, demo, info; eval, export, chat, env (moetune.commands)."""

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
    from moetune.commands.flags import add_alias_flags, underscore_spelling
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
        flags = [flag_name(name), *underscore_spelling(flag_name(name))]
        if t == "bool":
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif t == "int":
            g.add_argument(*flags, type=_optional(int) if optional else int, metavar="N", **kw)
        elif t == "float":
            g.add_argument(*flags, type=_optional(float) if optional else float, metavar="X", **kw)
        elif t == "list[float]":
            g.add_argument(*flags, type=float, nargs=2, metavar="X", **kw)
        elif t == "list[str]":
            g.add_argument(*flags, nargs="*", metavar="TEXT", **kw)
        else:
            choices = meta.get("choices")
            g.add_argument(
                *flags,
                type=_optional(str) if optional else str,
                choices=choices,
                metavar="|".join(choices) if choices else "VALUE",
                **kw,
            )
    add_alias_flags(p)


def config_from_args(args, base=None, notes=None):
    from moetune.commands.flags import flag_values
    from moetune.train.config import load_yaml, make_config

    file_values = load_yaml(args.config, notes) if getattr(args, "config", None) else None
    return make_config(file_values, flag_values(args), base=base)


def main(argv=None) -> int:
    from moetune import commands
    from moetune.commands.flags import Parser
    from moetune.demo import DEMO_DEFAULTS

    parser = Parser(prog="moetune", description="LoRA fine-tuning of MoE models with CPU experts")
    parser.add_argument("--version", action="version", version=commands.version_line())
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
    i.add_argument("--numa", help="engine NUMA partitions: off, auto or a number of virtual nodes (moetune.numa)")
    commands.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in commands.NAMES:
        return commands.run(args)

    from moetune.parallel.failure import RankLostError
    from moetune.train.config import ConfigError
    from moetune.train.data import DataError

    try:
        if args.command == "demo" or (args.command == "train" and _is_demo(args)):
            from moetune.commands.flags import flag_values
            from moetune.demo import run_demo

            cfg_args = flag_values(args)
            if args.config:
                from moetune.train.config import load_yaml

                notes = []
                cfg_args = {**load_yaml(args.config, notes), **cfg_args}
                _say_notes(notes)
            from moetune.hf.preflight import PreflightError, check_device

            try:
                check_device(str(cfg_args.get("device", DEMO_DEFAULTS.get("device", "auto"))))
            except PreflightError as e:
                raise ConfigError(str(e)) from None
            run_demo(cfg_args)
            return 0
        if args.command == "train":
            from moetune.train.loop import train

            notes = []
            cfg = config_from_args(args, notes=notes)
            _say_notes(notes)
            from moetune.hf.preflight import PreflightError, check_train

            try:
                check_train(cfg)
            except PreflightError as e:
                raise ConfigError(str(e)) from None
            train(cfg)
            return 0
    except (ConfigError, DataError) as e:
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RankLostError as e:  # several processes (torchrun): another rank died or hung
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 1
    if args.command == "info":
        from moetune.engine import Context
        from moetune.isa import isas
        from moetune.numa import parse_numa

        try:
            ctx = Context(args.threads) if args.numa is None else Context(args.threads, numa=parse_numa(args.numa))
        except ValueError as e:
            print(f"moetune info: error: {e}", file=sys.stderr)
            return 2
        print(ctx.info())
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


def _say_notes(notes) -> None:
    for n in notes:
        print(f"moetune: config: {n}", file=sys.stderr)


def _is_demo(args) -> bool:
    if getattr(args, "model", None) is not None:
        return False
    if args.config:
        from moetune.train.config import load_yaml

        return load_yaml(args.config).get("model") is None
    return True


if __name__ == "__main__":
    sys.exit(main())
