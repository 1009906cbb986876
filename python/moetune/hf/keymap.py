"""Checkpoint key -> model key, and which keys are routed-expert weights.

Published MoE checkpoints store one tensor per expert and projection
(``model.layers.L.mlp.experts.e.gate_proj.weight``; Mixtral: ``w1/w3/w2``
under ``block_sparse_moe``); transformers 5 models hold fused
``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I], and
transformers converts at load time with per-family rules
(`transformers.conversion_mapping`). We read the same rules: its renamings
for every key, and the per-expert projection names from the source patterns
of the converters that build ``gate_up_proj`` (gate, then up) and
``down_proj``. Where those rules cannot be read (another transformers
version's internals), `fallback_rules` gives the same facts from the family
table (`moetune.hf.families`); a test checks both agree on the installed
transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from moetune.hf.families import PROJ, STANDARD_KEY_NAMES, by_model_type

STANDARD = dict(zip(PROJ, STANDARD_KEY_NAMES))
_EXPERT_SRC = re.compile(r"experts\.\*\.(\w+)\.weight$")


@dataclass
class KeyMap:
    proj_names: dict[str, str]  # "gate" -> checkpoint name of that projection
    renames: list[Callable[[str], str]] = field(default_factory=list)
    source: str = "fallback"  # "transformers" when read from its conversion mapping

    def rename(self, key: str) -> str:
        for f in self.renames:
            key = f(key)
        return key

    def per_expert_regex(self) -> re.Pattern:
        names = "|".join(re.escape(n) for n in self.proj_names.values())
        # kind: weight (or a published quantized tensor: hf/published.ALL_KINDS)
        kinds = "weight(?:_scale_inv|_packed|_scale|_shape)?"
        return re.compile(rf"^(?P<qual>.+\.experts)\.(?P<e>\d+)\.(?P<proj>{names})\.(?P<kind>{kinds})$")

    def proj_of(self, name: str) -> str:
        return next(p for p, n in self.proj_names.items() if n == name)


def _transformers_rules(model) -> KeyMap | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    except Exception:  # another transformers version: use FALLBACK
        return None
    names: dict[str, str] = {}
    renames: list[Callable[[str], str]] = []
    for t in transforms or []:
        srcs, tgts = list(getattr(t, "source_patterns", [])), list(getattr(t, "target_patterns", []))
        if hasattr(t, "operations") and type(t).__name__ == "WeightConverter":
            if len(tgts) != 1:
                continue
            found = [m.group(1) for m in map(_EXPERT_SRC.search, srcs) if m]
            if tgts[0].endswith("experts.gate_up_proj") and len(found) == 2:
                names["gate"], names["up"] = found
            elif tgts[0].endswith("experts.down_proj") and len(found) == 1:
                names["down"] = found[0]
        elif type(t).__name__ == "WeightRenaming" and hasattr(t, "rename_source_key"):
            renames.append(lambda k, t=t: t.rename_source_key(k)[0])
    if set(names) != set(PROJ):
        return None
    return KeyMap(names, renames, "transformers")


def fallback_rules(model_type: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(per-expert projection names, [(checkpoint substring, model substring)])
    of a model_type as the family table has them (the standard names for a
    model_type that is no family's)."""
    family = by_model_type(model_type)
    if family is None:
        return dict(STANDARD), []
    return family.proj_names, list(family.key_renames)


def key_map(model) -> KeyMap:
    km = _transformers_rules(model)
    if km is not None:
        return km
    names, pairs = fallback_rules(model.config.model_type)
    renames = [lambda k, a=a, b=b: k.replace(a, b) for a, b in pairs]
    return KeyMap(dict(names), renames, "fallback")
