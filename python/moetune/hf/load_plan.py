"""load_model's key plan: which checkpoint tensor feeds which model tensor,
checked before any weight is read.

Every checkpoint key is mapped to a model key (transformers' renamings and the
per-family expert key names, `keymap`) and sorted into: a non-expert tensor,
a fused experts parameter, one expert's projection (per-expert keys, as
published), or an FP8 scale. Then missing, unexpected, mis-shaped and
unreadable tensors are all reported by name in one ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

import torch

from moetune.hf import fp8 as fp8_mod
from moetune.hf import published
from moetune.hf.checkpoint import Checkpoint
from moetune.hf.families import PROJ, per_expert_shapes
from moetune.hf.keymap import KeyMap
from moetune.hf.patching import FoundExperts

DeviceLike = Union[str, int, torch.device, dict[str, Union[str, int, torch.device]]]  # noqa: UP007 (a runtime alias)
_FLOAT_SRC = (torch.float32, torch.bfloat16, torch.float16)


def name_list(keys, n=8) -> str:
    """The first n of `keys`, sorted, for an error message."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def device_of(device: DeviceLike, key: str) -> torch.device:
    """Where model tensor `key` goes: `device`, or the longest matching prefix of a device map."""
    if not isinstance(device, dict):
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    best, dev = -1, None
    for prefix, d in device.items():
        if prefix == "" or key == prefix or key.startswith(prefix + "."):
            if len(prefix) > best:
                best, dev = len(prefix), d
    if dev is None:
        raise ValueError(f"moetune: device_map places no module prefix over {key} (add a '' entry for the rest)")
    return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)


@dataclass
class ExpertsPlan:
    """Where one experts module's weights are in the checkpoint."""

    found: FoundExperts
    E: int
    H: int
    I: int
    fused: dict[str, str] = field(default_factory=dict)  # module parameter name -> checkpoint key
    per_expert: dict[tuple[int, str], str] = field(default_factory=dict)  # (e, proj) -> key
    scales: dict[str, str] = field(default_factory=dict)  # weight key -> scale key (FP8, compressed-tensors)
    shapes: list[str] = field(default_factory=list)  # compressed-tensors weight_shape keys (not read)
    src_bytes: int = 0

    qual = property(lambda self: self.found.qual)
    module = property(lambda self: self.found.module)
    family = property(lambda self: self.found.family)  # Family

    def weight_keys(self) -> list[str]:
        """Checkpoint keys of the expert weights (and FP8 scales), biases excluded."""
        keys = [k for p, k in self.fused.items() if not p.endswith("_bias")]
        return keys + list(self.per_expert.values()) + list(self.scales.values())


@dataclass
class LoadPlan:
    tensors: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (non-expert)
    scales: dict[str, str] = field(default_factory=dict)  # checkpoint weight key -> scale key
    experts: list[ExpertsPlan] = field(default_factory=list)
    nonexpert_bytes: dict[str, int] = field(default_factory=dict)  # device -> bytes (target dtype)


def plan_keys(
    model,
    found: list[FoundExperts],
    ckpt: Checkpoint,
    km: KeyMap,
    block,
    device: DeviceLike,
    *,
    quant=None,
    keep: bool = False,
) -> LoadPlan:
    """The plan for loading `ckpt` into `model` (a meta-device skeleton whose
    experts modules are `found`); a ValueError naming every problem otherwise.
    block: the FP8 block size from config.json (None: not an FP8 checkpoint);
    quant: config.json's published.Quantization (None: unquantized); keep: the experts
    stay in it (published.keeps)."""
    planner = _Planner(model, ckpt, km, block, device)
    planner.quant, planner.keep = quant, keep
    return planner.run(found)


class _Planner:
    """One plan_keys call: its steps share the keys sorted so far and the problems found."""

    def __init__(self, model, ckpt: Checkpoint, km: KeyMap, block, device: DeviceLike):
        self.model, self.ckpt, self.km, self.block, self.device = model, ckpt, km, block, device
        self.quant, self.keep = None, False  # config.json's published.Quantization, kept or not (plan_keys)
        self.plan = LoadPlan()
        self.expected = dict(model.state_dict(keep_vars=True))  # model key -> meta tensor (non-expert once planned)
        self.renamed: dict[str, str] = {}  # model-side key -> checkpoint key
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.bad: list[str] = []

    def run(self, found: list[FoundExperts]) -> LoadPlan:
        quals = self._experts(found)
        self._sort_keys(quals)
        self._tie()
        self._missing_and_unexpected()
        for ep in self.plan.experts:
            self._check_experts(ep)
        self._check_nonexpert()
        self._raise_problems()
        self.plan.tensors = self.renamed
        return self.plan

    def _experts(self, found: list[FoundExperts]) -> dict[str, ExpertsPlan]:
        """One ExpertsPlan per experts module; their parameters leave the expected non-expert keys."""
        quals = {}
        for f in found:
            ep = ExpertsPlan(f, *f.family.dims(f.module.gate_up_proj.shape))
            quals[f.qual] = ep
            self.plan.experts.append(ep)
            for p in f.family.param_names:
                self.expected.pop(f"{f.qual}.{p}", None)
        return quals

    def _sort_keys(self, quals: dict[str, ExpertsPlan]) -> None:
        """Each checkpoint key: one expert's projection or its FP8 scale, a fused experts
        parameter, a non-expert FP8 scale, a non-expert tensor, or unexpected."""
        per_expert_re = self.km.per_expert_regex()
        for ck in self.ckpt.keys():
            k = self.km.rename(ck)
            m = per_expert_re.match(k)
            if m and m.group("qual") in quals:
                ep = quals[m.group("qual")]
                e = int(m.group("e"))
                if e >= ep.E:
                    self.bad.append(f"{ck}: expert id {e} outside [0, {ep.E}) of {ep.qual}")
                    continue
                kind = m.group("kind")
                if kind in published.WEIGHT_KINDS:
                    ep.per_expert[(e, self.km.proj_of(m.group("proj")))] = ck
                elif kind == published.SHAPE_KIND:
                    ep.shapes.append(ck)
                else:  # a scale: keyed by its weight's key
                    ep.scales[ck[: -len(kind)] + published.SCALE_KINDS[kind]] = ck
                continue
            head, _, tail = k.rpartition(".")
            if head in quals and (tail in quals[head].family.param_names or tail in published.FUSED_MXFP4):
                quals[head].fused[tail] = ck
                continue
            if k.endswith(fp8_mod.SCALE_SUFFIX) and k[: -len(fp8_mod.SCALE_SUFFIX)] in self.expected:
                self.plan.scales[ck[: -len(fp8_mod.SCALE_SUFFIX)]] = ck
                continue
            if k in self.expected:
                self.renamed[k] = ck
            else:
                self.unexpected.append(ck)

    def _tie(self) -> None:
        """Tied weights: the checkpoint holds one of each tied pair."""
        renamed = self.renamed
        for target, source in dict(getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            if target in renamed and source in renamed:
                raise ValueError(
                    f"moetune: the checkpoint holds both {renamed[target]} and {renamed[source]}, which "
                    f"the config ties (tie_word_embeddings); set tie_word_embeddings=False in config.json "
                    "if they differ, or drop one of them"
                )
            if target in renamed:  # only the target was saved: it feeds the source
                renamed[source] = renamed.pop(target)
            self.expected.pop(target, None)

    def _missing_and_unexpected(self) -> None:
        """With the model's own ignore rules."""
        model = self.model
        ign_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
        ign_unexp = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        ign_unexp.append(re.compile(r"rotary_emb\.inv_freq$"))
        self.missing = [k for k in self.expected if k not in self.renamed and not any(p.search(k) for p in ign_missing)]
        self.unexpected = [k for k in self.unexpected if not any(p.search(self.km.rename(k)) for p in ign_unexp)]

    def _check_experts(self, ep: ExpertsPlan) -> None:
        if published.published_fused(ep) or any(k.endswith(".weight_packed") for k in ep.per_expert.values()):
            self.bad += published.layer_problems(ep, self.ckpt, self.quant)
            if not published.published_fused(ep):  # per expert: every projection of every expert present
                names = self.km.proj_names
                self.missing += [
                    f"{ep.qual}.{e}.{names[p]}.weight_packed"
                    for e in range(ep.E)
                    for p in PROJ
                    if (e, p) not in ep.per_expert
                ]
            return
        self.bad += published.layer_problems(ep, self.ckpt, self.quant, self.keep)
        want = self._expert_shapes(ep)
        if want is None:
            return
        for k, shape in want.items():
            ent = self.ckpt.entries[k]
            if ent.shape != shape:
                self.bad.append(
                    f"{k} has shape {list(ent.shape)}, expected {list(shape)} (E={ep.E}, H={ep.H}, I={ep.I})"
                )
            elif ent.dtype not in _FLOAT_SRC and not (ent.dtype == fp8_mod.E4M3 and k in ep.scales):
                why = " without a weight_scale_inv" if ent.dtype == fp8_mod.E4M3 else ""
                self.bad.append(
                    f"{k} has dtype {ent.dtype}{why}; expert weights must be float32/bfloat16/float16 "
                    "or block-FP8 e4m3 with scales"
                )
            elif ent.dtype == fp8_mod.E4M3:
                if ep.fused:
                    self.bad.append(f"{k}: FP8 fused expert tensors are not supported (per-expert keys only)")
                elif self.block is None:
                    self.bad.append(f"{k} is FP8 but config.json declares no quantization_config (block size unknown)")
                elif problem := published.fp8_scale_problem(self.ckpt, k, ep.scales[k], self.block):
                    self.bad.append(problem)
            ep.src_bytes += ent.nbytes

    def _expert_shapes(self, ep: ExpertsPlan) -> dict[str, tuple[int, ...]] | None:
        """{checkpoint key: expected shape} of a layer's expert tensors; None (the
        problem recorded) where its keys are incomplete or mixed."""
        have_per = bool(ep.per_expert)
        if ep.fused and have_per:
            self.bad.append(f"{ep.qual}: the checkpoint holds both fused and per-expert keys")
            return None
        if have_per and not ep.family.per_expert_keys:
            self.bad.append(f"{ep.qual}: per-expert keys are not supported for {ep.family.name} (fused keys only)")
            return None
        if ep.fused:
            lost = [f"{ep.qual}.{p}" for p in ep.family.param_names if p not in ep.fused]
            if lost:
                self.missing += lost
                return None
            shapes = ep.family.param_shapes(ep.E, ep.H, ep.I)
            return {k: shapes[p] for p, k in ep.fused.items()}
        names = self.km.proj_names
        lost = [f"{ep.qual}.{e}.{names[p]}.weight" for e in range(ep.E) for p in PROJ if (e, p) not in ep.per_expert]
        if lost and not have_per:
            self.missing.append(f"{ep.qual}.{{0..{ep.E - 1}}}.{{{','.join(names.values())}}}.weight (all experts)")
            return None
        self.missing += lost
        shapes = per_expert_shapes(ep.H, ep.I)
        return {k: shapes[p] for (e, p), k in ep.per_expert.items()}

    def _check_nonexpert(self) -> None:
        """Shapes and FP8 scales of the non-expert tensors; their bytes per device."""
        for mk, ck in self.renamed.items():
            meta = self.expected.get(mk)
            if meta is None:
                continue
            ent = self.ckpt.entries[ck]
            if tuple(ent.shape) != tuple(meta.shape):
                self.bad.append(f"{ck} has shape {list(ent.shape)}, the model's {mk} has {list(meta.shape)}")
            elif ent.dtype == fp8_mod.E4M3 and (ck not in self.plan.scales or self.block is None):
                self.bad.append(f"{ck} is FP8 without a weight_scale_inv / block size")
            dev = str(device_of(self.device, mk))
            self.plan.nonexpert_bytes[dev] = self.plan.nonexpert_bytes.get(dev, 0) + meta.numel() * meta.element_size()

    def _raise_problems(self) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing keys: {name_list(self.missing)}")
        if self.unexpected:
            problems.append(f"unexpected keys: {name_list(self.unexpected)}")
        bad = self.bad
        if bad:
            problems.append("; ".join(bad[:8]) + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
        if problems:
            raise ValueError(
                f"moetune: checkpoint {self.ckpt.path} does not match the model built from its "
                f"config.json ({type(self.model).__name__}): " + "; ".join(problems)
            )
