"""Command-line spellings of other tools' options, and "did you mean" for mistyped flags.

Every alias in `moetune.train.aliases.ALIASES` is also a flag, in both spellings users type
(`--learning-rate` and HF's `--learning_rate`); canonical options get the underscore spelling too
(`--max_steps`). Alias flags land under their alias name and are translated with the YAML keys by
the same table (`flag_values`), so a flag and a file key mean the same thing.
"""

from __future__ import annotations

import argparse
import difflib
import re

from moetune.train import aliases


class Parser(argparse.ArgumentParser):
    """argparse, with the closest known flag suggested for an unrecognized one."""

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            known = sorted(_option_strings(self))
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("--"):
                    close = difflib.get_close_matches(arg.split("=")[0], known, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for a in parser._actions:
        out.update(s for s in a.option_strings if s.startswith("--"))
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                out |= _option_strings(p)
    return out


def underscore_spelling(flag: str) -> list[str]:
    """["--max_steps"] for "--max-steps" (HF-style), [] when there is no dash to swap."""
    alt = "--" + flag[2:].replace("-", "_")
    return [alt] if alt != flag else []


def add_alias_flags(p: argparse.ArgumentParser) -> None:
    """One flag per alias (both spellings), in its own help group, default SUPPRESS."""
    g = p.add_argument_group("other tools' names (LLaMA-Factory, TRL / HF, axolotl, Unsloth), same as the option shown")
    for key, a in aliases.ALIASES.items():
        dash = "--" + key.replace("_", "-")
        spellings = [dash, *underscore_spelling(dash)]
        g.add_argument(
            *spellings,
            dest=key,
            nargs="?",
            const="true",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"= {a.target}",
        )


def flag_values(args: argparse.Namespace) -> dict:
    """The option values given as flags (canonical or alias), under TrainConfig names."""
    from moetune.train.config import TrainConfig, translate_aliases

    fields = TrainConfig.fields()
    given = {k: v for k, v in vars(args).items() if k in fields or k in aliases.ALIASES}
    return translate_aliases(given, "arguments")
