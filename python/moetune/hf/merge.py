"""LoRA out of a moetune model: merged into a full checkpoint, or per expert.

* `merge_and_save(model_or_paths, out_dir)`: W + s B A for every LoRA target
  (experts' fused gate_up/down LoRA read through the same views the engine
  uses, `moetune.hf.peft_lora.lora_factors`; ordinary PEFT LoRA modules through
  PEFT's own `get_delta_weight`), written as a full HF checkpoint in the
  source checkpoint's key layout and sharding. It streams: one source shard
  at a time is read, merged and written, so the whole model is never in RAM;
  the folder appears atomically (written under a temporary name, renamed
  when complete).
* `export_per_expert_adapter(model, out_dir)`: a PEFT-format adapter with one
  LoRA per expert module, ``...mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight``
  (the per-expert layout servers such as vLLM read for MoE LoRA).
  `per_expert_adapter_deltas(folder)` reads one back as per-expert deltas.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moetune.hf import families, peft_lora, published
from moetune.hf.checkpoint import Checkpoint
from moetune.hf.families import Family
from moetune.hf.keymap import key_map

_PREFIX = "base_model.model."


def model_name(peft_name: str) -> str:
    """PEFT module path -> the transformers model's module path."""
    name = peft_name[len(_PREFIX) :] if peft_name.startswith(_PREFIX) else peft_name
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", name).lstrip(".")


class _Terms:
    """The active adapter's LoRA of a PEFT model, by model key."""

    def __init__(self, peft_model):
        from peft.tuners.lora import LoraLayer

        self.base = peft_model.get_base_model()
        cfg = peft_model.peft_config[peft_model.active_adapter]
        if getattr(cfg, "modules_to_save", None):
            raise NotImplementedError(
                f"moetune: adapters with modules_to_save ({cfg.modules_to_save}) are not supported"
            )
        self.config = cfg
        self.experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.families: dict[str, Family] = {}
        classes = families.supported_classes()
        self.linear: dict[str, tuple[torch.nn.Module, str]] = {}
        for name, m in peft_model.named_modules():
            if peft_lora.is_param_wrapper(m):
                base = m
                while peft_lora.is_param_wrapper(base):
                    base = base.base_layer
                if type(base) not in classes:
                    raise NotImplementedError(
                        f"moetune: {name}: LoRA on experts of unsupported class {type(base).__name__}"
                    )
                family = classes[type(base)]
                f = peft_lora.lora_factors(m, transposed=family.transposed)
                if f is not None:
                    A, B, s = f
                    self.families[model_name(name)] = family
                    self.experts.setdefault(model_name(name), {})[m.parameter_name] = (
                        A.detach().float().cpu(),
                        B.detach().float().cpu(),
                        s,
                    )
            elif isinstance(m, LoraLayer):
                if m.merged:
                    raise NotImplementedError(f"moetune: {name} is merged already; unmerge it first")
                active = [a for a in m.active_adapters if a in m.lora_A]
                if not active or m.disable_adapters:
                    continue
                if len(active) > 1:
                    raise NotImplementedError(f"moetune: {name}: several active adapters")
                a = active[0]
                if getattr(m, "use_dora", {}).get(a, False):
                    raise NotImplementedError(f"moetune: {name}: DoRA adapters are not supported")
                self.linear[model_name(name) + ".weight"] = (m, a)

    def expert_delta(self, qual: str, proj: str, e: int | None) -> torch.Tensor | None:
        """s B A of one projection ("gate", "up", "down") of expert e (all experts if e is None), fp32."""
        t = self.experts.get(qual, {})
        pname = families.PARAM_OF[proj]
        if pname not in t:
            return None
        A, B, s = t[pname]
        if proj != "down":
            gate, up = self.families[qual].split_gate_up(B, 1)
            B = gate if proj == "gate" else up
        if e is None:
            return s * torch.bmm(B, A)
        return s * (B[e] @ A[e])

    def fused_delta(self, qual: str, pname: str) -> torch.Tensor | None:
        """s B A of a fused parameter, in its stored layout ([E, in, out] when transposed)."""
        t = self.experts.get(qual, {})
        if pname not in t:
            return None
        A, B, s = t[pname]
        return self.families[qual].storage_view(s * torch.bmm(B, A))

    def linear_delta(self, key: str) -> torch.Tensor | None:
        if key not in self.linear:
            return None
        m, a = self.linear[key]
        with torch.no_grad():
            return m.get_delta_weight(a).detach().float().cpu()


def _adapter_on_skeleton(base, adapter):
    """A PEFT model on a weightless (meta) skeleton of `base` with `adapter`'s
    LoRA weights loaded on the CPU: all merge needs, without any base weight."""
    import peft
    import transformers
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import load_file

    from moetune.hf.loader import skeleton

    config = transformers.AutoConfig.from_pretrained(str(base))
    if published.read(config) is not None:
        del config.quantization_config
    model = skeleton(config, torch.float32)
    pm = peft.get_peft_model(model, peft.PeftConfig.from_pretrained(str(adapter)))
    for n, p in list(pm.named_parameters()):
        if "lora_" in n:
            set_module_tensor_to_device(pm, n, "cpu", value=torch.full(p.shape, float("nan"), dtype=torch.float32))
    f = Path(adapter) / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"moetune: {adapter} has no adapter_model.safetensors")
    res = peft.set_peft_model_state_dict(pm, load_file(str(f)))
    if res.unexpected_keys:
        raise ValueError(f"moetune: adapter {adapter} has keys the model does not: {sorted(res.unexpected_keys)[:8]}")
    lost = [n for n, p in pm.named_parameters() if "lora_" in n and torch.isnan(p).any()]
    if lost:
        raise ValueError(f"moetune: adapter {adapter} lacks LoRA weights for {sorted(lost)[:8]}")
    return pm


class QuantizedMergeWarning(UserWarning):
    """The adapter was trained on int8 / int4 experts and is being merged into bf16 weights."""


def warn_if_quantized(weight_format: str | None, group_size: int | None = None) -> str | None:
    """Warn (QuantizedMergeWarning) and return the message when the expert LoRA was trained
    against quantized experts: the adapter learned corrections on top of the rounded weights,
    and the merged checkpoint carries the unrounded ones, so it is not the model that trained."""
    if weight_format in (None, "bf16"):
        return None
    import warnings

    fmt = weight_format + (f" (group {group_size})" if weight_format == "int4" and group_size else "")
    msg = (
        f"moetune: this adapter was trained on {fmt} experts; merging it into the checkpoint's bf16 "
        "weights gives a model that differs from the one trained (the LoRA compensated the quantization "
        "error of the experts it saw). Check the merged model with `moetune eval`, or serve the adapter on "
        f"the same {weight_format} experts."
    )
    warnings.warn(msg, QuantizedMergeWarning, stacklevel=3)
    return msg


def _trained_weight_format(peft_model) -> tuple[str | None, int | None]:
    """The expert weight format of a moetune-patched PEFT model (None if not patched)."""
    from moetune.hf.patching import experts_state

    for m in peft_model.get_base_model().modules():
        st = experts_state(m)
        if st is not None and st.engine is not None:
            return st.engine.weight_format, getattr(st.engine, "group_size", None)
    return None, None


def _tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.moetune-tmp-{os.getpid()}"


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.moetune-old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def merge_and_save(
    model_or_paths,
    out_dir,
    *,
    source=None,
    overwrite: bool = False,
    progress: bool = True,
    merged_format: str = "bf16",
) -> Path:
    """Merge the LoRA into the base weights and write a full HF checkpoint.

    model_or_paths: a PEFT model built on moetune (load_model(..., adapter=)
      or get_peft_model on a load_model/patch model), or a pair (base
      checkpoint folder, adapter folder) — then no base weight is loaded at
      all, only the adapter.
    out_dir: the new folder (refused if it exists, unless overwrite=True).
    source: the base checkpoint folder the model was loaded from (default:
      what load_model recorded).
    The output has the source's key layout (per-expert or fused), shard
    files, index and non-weight files (config, tokenizer...). Weights keep the
    source dtype. Quantized sources (block FP8, MXFP4, compressed-tensors
    INT4: moetune.hf.published) are written merged in bf16: each published
    weight dequantized exactly, the LoRA delta added, under the unquantized
    model's keys (`weight`, gpt-oss `gate_up_proj`), scales dropped and
    config.json without its quantization_config (merged_format="bf16", the
    default). merged_format="published" writes the merged weights back in the
    source's published format instead (same keys, scales and config as the
    source; a second quantization on top of the published one:
    moetune.hf.published.requantized says how).
    """
    if merged_format not in ("bf16", "published"):
        raise ValueError(f"moetune: merged_format must be 'bf16' or 'published', got {merged_format!r}")
    peft_model, source = _model_and_source(model_or_paths, source)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"moetune: {out} exists (pass overwrite=True to replace it)")
    if not isinstance(model_or_paths, (tuple, list)):
        warn_if_quantized(*_trained_weight_format(peft_model))
    terms = _Terms(peft_model)
    merger = _Merger(terms)
    ckpt = Checkpoint(source)
    config = json.loads((source / "config.json").read_text())
    quant = None
    if config.get("quantization_config"):
        import transformers

        quant = published.read(transformers.AutoConfig.from_pretrained(str(source)))
    tmp = _tmp_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _copy_other_files(source, tmp, config, quant if merged_format == "bf16" else None)
        family = families.by_model_type(config.get("model_type", ""))
        requant = quant is not None and merged_format == "published"
        weight_map, total_bytes = _merge_shards(ckpt, merger, quant, tmp, progress, family, requant)
        merger.check_all_used(source)
        if ckpt.sharded:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
            )
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_and_source(model_or_paths, source):
    """(PEFT model, base checkpoint folder) of merge_and_save's arguments."""
    if isinstance(model_or_paths, (tuple, list)):
        base, adapter = model_or_paths
        return _adapter_on_skeleton(base, adapter), Path(base)
    peft_model = model_or_paths
    if not hasattr(peft_model, "peft_config"):
        raise TypeError("moetune: merge_and_save needs a PEFT model (or a (base, adapter) pair of folders)")
    if source is None:
        source = getattr(peft_model.get_base_model(), "moetune_source", None)
    if source is None:
        raise ValueError("moetune: pass source= (the base checkpoint folder): this model was not made by load_model")
    return peft_model, Path(source)


def _copy_other_files(source: Path, tmp: Path, config: dict, block) -> None:
    """Everything but the weights (config, tokenizer...); a quantized source's config
    loses its quantization_config (the weights are written dequantized). block: the
    source's quantization (None: unquantized)."""
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    if block is not None:
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _merge_shards(
    ckpt: Checkpoint, merger: _Merger, quant, tmp: Path, progress: bool, family=None, requant: bool = False
):
    """Each source shard read, merged and written under its own name in tmp, one
    at a time: (weight map, total bytes written)."""
    from tqdm.auto import tqdm

    files: dict[str, list] = {}
    for k, e in ckpt.entries.items():
        files.setdefault(e.file, []).append(k)
    weight_map = {}
    total_bytes = 0
    bar = tqdm(
        total=sum(e.nbytes for e in ckpt.entries.values()),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="moetune merge",
        disable=not progress,
    )
    with bar:
        for fname in sorted(files):
            out_t = {}
            with ckpt.reader() as r:
                for ck in sorted(files[fname]):
                    bar.update(ckpt.entries[ck].nbytes)
                    was_quantized = False
                    if quant is None:
                        key, t = ck, r.get(ck)
                    else:  # published weights dequantized, their scales folded in (skipped here)
                        got = published.merged_source_tensor(r, ckpt, ck, quant, family)
                        if got is None:
                            continue
                        key, t, was_quantized = got
                    merged = {key: merger.merged(key, t)}
                    if requant and was_quantized:
                        merged = published.requantized(quant, key, merged[key], family)
                    for k, v in merged.items():
                        out_t[k] = v.contiguous()
                        weight_map[k] = fname
            total_bytes += sum(t.numel() * t.element_size() for t in out_t.values())
            save_file(out_t, str(tmp / fname), metadata={"format": "pt"})
            del out_t
    return weight_map, total_bytes


class _Merger:
    """W + s B A of one checkpoint tensor at a time; remembers which LoRA targets it met."""

    def __init__(self, terms: _Terms):
        self.terms = terms
        self.km = key_map(terms.base)
        self.per_expert_re = self.km.per_expert_regex()
        self.quals = set(terms.experts)
        self.used = set()

    def _delta(self, k: str):
        """(s B A or None, the LoRA target it belongs to) of model key k."""
        terms = self.terms
        m = self.per_expert_re.match(k)
        if m and m.group("qual") in self.quals and m.group("kind") == "weight":
            proj = self.km.proj_of(m.group("proj"))
            return (
                terms.expert_delta(m.group("qual"), proj, int(m.group("e"))),
                (m.group("qual"), families.PARAM_OF[proj]),
            )
        head, _, tail = k.rpartition(".")
        if head in self.quals and tail in families.LORA_PARAMS:
            return terms.fused_delta(head, tail), (head, tail)
        return terms.linear_delta(k), k

    def merged(self, ck: str, t: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor ck (value t) with its LoRA delta added, in t's dtype."""
        delta, tag = self._delta(self.km.rename(ck))
        if delta is None:
            return t
        if tuple(delta.shape) != tuple(t.shape):
            raise ValueError(
                f"moetune: LoRA delta for {ck} has shape {list(delta.shape)}, the checkpoint tensor {list(t.shape)}"
            )
        self.used.add(tag)
        return (t.float() + delta).to(t.dtype)

    def check_all_used(self, source) -> None:
        terms = self.terms
        wanted = {(q, p) for q, d in terms.experts.items() for p in d} | set(terms.linear)
        if wanted - self.used:
            raise ValueError(f"moetune: LoRA targets not found in {source}: {sorted(map(str, wanted - self.used))[:8]}")


def export_per_expert_adapter(model, out_dir, *, overwrite: bool = False) -> Path:
    """Write the active adapter with one LoRA per expert and projection.

    Keys: ``base_model.model.<experts>.{e}.{gate,up,down}_proj.lora_A.weight``
    [r, in] and ``lora_B.weight`` [out, r] (the family's per-expert
    projection names, e.g. Mixtral's w1/w3/w2), plus the adapter's ordinary
    LoRA modules unchanged; adapter_config.json targets those module names.
    PEFT's fused gate_up LoRA gives gate and up the same A (rows of B split).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"moetune: {out} exists (pass overwrite=True to replace it)")
    terms = _Terms(model)
    names = key_map(terms.base).proj_names
    tensors, scalings = _per_expert_tensors(terms, names)
    cfg = _per_expert_config(terms, names, scalings)
    tmp = _tmp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(
            json.dumps(cfg, indent=2, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
        )
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _per_expert_tensors(terms: _Terms, names: dict[str, str]):
    """({adapter key: tensor}, the set of LoRA scalings met): each expert's gate / up /
    down LoRA under its per-expert module name, the ordinary LoRA modules as they are."""
    tensors = {}
    scalings = set()
    for qual, d in terms.experts.items():
        for pname, (A, B, s) in d.items():
            scalings.add(s)
            E = A.shape[0]
            parts = (
                [("down", B)]
                if pname == families.DOWN
                else list(zip(("gate", "up"), terms.families[qual].split_gate_up(B, 1)))
            )
            for proj, Bp in parts:
                for e in range(E):
                    key = f"{_PREFIX}{qual}.{e}.{names[proj]}"
                    tensors[f"{key}.lora_A.weight"] = A[e].clone()
                    tensors[f"{key}.lora_B.weight"] = Bp[e].clone()
    for key, (m, a) in terms.linear.items():
        base = _PREFIX + key[: -len(".weight")]
        tensors[f"{base}.lora_A.weight"] = m.lora_A[a].weight.detach().float().cpu().contiguous()
        tensors[f"{base}.lora_B.weight"] = m.lora_B[a].weight.detach().float().cpu().contiguous()
        scalings.add(float(m.scaling[a]))
    return tensors, scalings


def _per_expert_config(terms: _Terms, names: dict[str, str], scalings) -> dict:
    """The adapter's config targeting the per-expert module names (JSON-ready)."""
    cfg = terms.config.to_dict()
    if len(scalings) > 1:
        raise NotImplementedError(f"moetune: several LoRA scalings {sorted(scalings)}; a per-expert adapter has one")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        # A regex (what `moetune train` writes) cannot be extended with the per-expert names:
        # the modules it matched are listed instead, by full name (PEFT matches a listed name
        # exactly or as a dotted suffix, so each names one module).
        targets = [key[: -len(".weight")] for key in terms.linear]
    cfg["target_modules"] = sorted(set(targets) | set(names.values()))
    cfg["target_parameters"] = None
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise NotImplementedError(f"moetune: {k} is not supported by the per-expert export")
    cfg["peft_type"] = str(getattr(cfg["peft_type"], "value", cfg["peft_type"]))
    if cfg.get("task_type") is not None:
        cfg["task_type"] = str(getattr(cfg["task_type"], "value", cfg["task_type"]))
    return cfg


def per_expert_adapter_deltas(folder) -> dict[str, torch.Tensor]:
    """{module key: s B A} of every LoRA module in a (per-expert) PEFT adapter
    folder, with s = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            base = k[: -len(".lora_A.weight")]
            out[base[len(_PREFIX) :] if base.startswith(_PREFIX) else base] = s * (t[base + ".lora_B.weight"] @ t[k])
    return out
