"""moetune.load_model: a local HF checkpoint -> a transformers model whose
routed experts live only in the moetune engine.

1. The model is built from config.json on the meta device (accelerate's
   init_empty_weights; non-persistent buffers such as rotary tables are real).
2. Every checkpoint key is mapped to a model key (transformers' own renamings
   and per-family expert key names, `keymap`) and checked: missing,
   unexpected and mis-shaped tensors are reported by name before any weight
   is read, and the host RAM needed is compared with what is available.
3. Non-expert tensors stream to their device (cast to `dtype`); then the
   experts, layer by layer and expert by expert (safetensors slices), into the
   engine's packed layout with `MoEExperts.load_expert`. Expert weights never
   reach a GPU and exist unpacked for at most one layer at a time.
4. The engines are attached with the same code as `moetune.hf.patch`.

With `cache_dir`, step 3 first looks each layer's packed experts up in the
disk cache (`moetune.cache`, keyed and identified as `hf/expert_cache.py`
says): a valid entry is read straight into the engine (no expert tensor is
read from the checkpoint); a missing one is built as above and written; a
stale, mismatched or corrupted one is reported (CacheRebuildWarning, one line
with the reason) and rebuilt, never used.

Block-FP8 checkpoints (DeepSeek-V3 as published) are dequantized to bf16 while
streaming (`fp8`).
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from moetune import cache as cache_mod
from moetune.engine import Context, MoEExperts
from moetune.hf import expert_cache
from moetune.hf import fp8 as fp8_mod
from moetune.hf import patching
from moetune.hf.checkpoint import Checkpoint
from moetune.hf.keymap import PROJ, key_map

DeviceLike = Union[str, int, torch.device, Dict[str, Union[str, int, torch.device]]]
_FLOAT_SRC = (torch.float32, torch.bfloat16, torch.float16)


def _list(keys, n=8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@dataclass
class _ExpertsPlan:
    qual: str
    parent: torch.nn.Module
    attr: str
    module: torch.nn.Module
    family: str
    E: int
    H: int
    I: int
    layout: patching.ExpertsLayout = patching.ExpertsLayout()
    fused: Dict[str, str] = field(default_factory=dict)        # module parameter name -> checkpoint key
    per_expert: Dict[Tuple[int, str], str] = field(default_factory=dict)  # (e, proj) -> key
    scales: Dict[str, str] = field(default_factory=dict)       # weight key -> scale key (FP8)
    src_bytes: int = 0


@dataclass
class _Plan:
    tensors: Dict[str, str] = field(default_factory=dict)       # model key -> checkpoint key (non-expert)
    scales: Dict[str, str] = field(default_factory=dict)        # checkpoint weight key -> scale key
    experts: List[_ExpertsPlan] = field(default_factory=list)
    nonexpert_bytes: Dict[str, int] = field(default_factory=dict)  # device -> bytes (target dtype)


def _device_of(device: DeviceLike, key: str) -> torch.device:
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


def _skeleton(config, dtype: torch.dtype):
    import transformers
    from accelerate import init_empty_weights

    try:
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"moetune: model_type {config.model_type!r} has no causal-LM class in transformers "
                         f"{transformers.__version__}; supported MoE families: {patching._supported_text()}") from None
    with init_empty_weights(include_buffers=False):
        try:
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # transformers that still call it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    return model


def _fp32_strict(model) -> List[str]:
    pats = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(pats)


def _target_dtype(key: str, meta: torch.Tensor, dtype: torch.dtype, fp32_pats) -> torch.dtype:
    """dtype for parameters; buffers keep the dtype the model gave them
    (routing biases, rotary tables); the model's strict fp32 modules stay fp32."""
    if not meta.is_floating_point():
        return meta.dtype
    if any(re.search(rf"(^|\.){re.escape(p)}($|\.)", key) for p in fp32_pats):
        return torch.float32
    return dtype if isinstance(meta, torch.nn.Parameter) else meta.dtype


def _plan(model, found, ckpt: Checkpoint, km, block, device) -> _Plan:
    plan = _Plan()
    expected = dict(model.state_dict(keep_vars=True))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    quals = {}
    for qual, parent, attr, m, family in found:
        layout = patching._layout(family)
        if layout.transposed:
            E, H, I2 = m.gate_up_proj.shape
        else:
            E, I2, H = m.gate_up_proj.shape
        ep = _ExpertsPlan(qual, parent, attr, m, family, E, H, I2 // 2, layout)
        quals[qual] = ep
        plan.experts.append(ep)
        for p in layout.param_names:
            expected.pop(f"{qual}.{p}", None)
    per_expert_re = km.per_expert_regex()
    renamed: Dict[str, str] = {}  # model-side key -> checkpoint key
    unexpected, bad = [], []
    for ck in ckpt.keys():
        k = km.rename(ck)
        m = per_expert_re.match(k)
        if m and m.group("qual") in quals:
            ep = quals[m.group("qual")]
            e = int(m.group("e"))
            if e >= ep.E:
                bad.append(f"{ck}: expert id {e} outside [0, {ep.E}) of {ep.qual}")
                continue
            wkey = ck if m.group("kind") == "weight" else ck[: -len(fp8_mod.SCALE_SUFFIX)]
            if m.group("kind") == "weight":
                ep.per_expert[(e, km.proj_of(m.group("proj")))] = ck
            else:
                ep.scales[wkey] = ck
            continue
        head, _, tail = k.rpartition(".")
        if head in quals and tail in quals[head].layout.param_names:
            quals[head].fused[tail] = ck
            continue
        if k.endswith(fp8_mod.SCALE_SUFFIX) and k[: -len(fp8_mod.SCALE_SUFFIX)] in expected:
            plan.scales[ck[: -len(fp8_mod.SCALE_SUFFIX)]] = ck
            continue
        if k in expected:
            renamed[k] = ck
        else:
            unexpected.append(ck)

    # Tied weights: the checkpoint holds one of each tied pair.
    for target, source in tied.items():
        if target in renamed and source in renamed:
            raise ValueError(f"moetune: the checkpoint holds both {renamed[target]} and {renamed[source]}, which the "
                             f"config ties (tie_word_embeddings); set tie_word_embeddings=False in config.json if they "
                             "differ, or drop one of them")
        if target in renamed:  # only the target was saved: it feeds the source
            renamed[source] = renamed.pop(target)
        expected.pop(target, None)

    # Missing / unexpected (with the model's own ignore rules).
    ign_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    ign_unexp = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ign_unexp.append(re.compile(r"rotary_emb\.inv_freq$"))
    missing = [k for k in expected if k not in renamed and not any(p.search(k) for p in ign_missing)]
    unexpected = [k for k in unexpected if not any(p.search(km.rename(k)) for p in ign_unexp)]
    for ep in plan.experts:
        have_per = bool(ep.per_expert)
        if ep.fused and have_per:
            bad.append(f"{ep.qual}: the checkpoint holds both fused and per-expert keys")
            continue
        if have_per and ep.layout != patching.ExpertsLayout():
            bad.append(f"{ep.qual}: per-expert keys are not supported for {ep.family} (fused keys only)")
            continue
        if ep.fused:
            lost = [f"{ep.qual}.{p}" for p in ep.layout.param_names if p not in ep.fused]
            if lost:
                missing += lost
                continue
            E, H, I = ep.E, ep.H, ep.I
            shapes = {"gate_up_proj": (E, H, 2 * I) if ep.layout.transposed else (E, 2 * I, H),
                      "down_proj": (E, I, H) if ep.layout.transposed else (E, H, I),
                      "gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, H)}
            want = {k: shapes[p] for p, k in ep.fused.items()}
        else:
            names = km.proj_names
            lost = [f"{ep.qual}.{e}.{names[p]}.weight" for e in range(ep.E) for p in PROJ
                    if (e, p) not in ep.per_expert]
            if lost and not have_per:
                missing.append(f"{ep.qual}.{{0..{ep.E - 1}}}.{{{','.join(names.values())}}}.weight (all experts)")
                continue
            missing += lost
            want = {k: ((ep.I, ep.H) if p != "down" else (ep.H, ep.I)) for (e, p), k in ep.per_expert.items()}
        for k, shape in want.items():
            ent = ckpt.entries[k]
            if ent.shape != shape:
                bad.append(f"{k} has shape {list(ent.shape)}, expected {list(shape)} (E={ep.E}, H={ep.H}, I={ep.I})")
            elif ent.dtype not in _FLOAT_SRC and not (ent.dtype == fp8_mod.E4M3 and k in ep.scales):
                why = " without a weight_scale_inv" if ent.dtype == fp8_mod.E4M3 else ""
                bad.append(f"{k} has dtype {ent.dtype}{why}; expert weights must be float32/bfloat16/float16 or "
                           "block-FP8 e4m3 with scales")
            elif ent.dtype == fp8_mod.E4M3:
                if ep.fused:
                    bad.append(f"{k}: FP8 fused expert tensors are not supported (per-expert keys only)")
                elif block is None:
                    bad.append(f"{k} is FP8 but config.json declares no quantization_config (block size unknown)")
            ep.src_bytes += ent.nbytes
    for mk, ck in renamed.items():
        meta = expected.get(mk)
        if meta is None:
            continue
        ent = ckpt.entries[ck]
        if tuple(ent.shape) != tuple(meta.shape):
            bad.append(f"{ck} has shape {list(ent.shape)}, the model's {mk} has {list(meta.shape)}")
        elif ent.dtype == fp8_mod.E4M3 and (ck not in plan.scales or block is None):
            bad.append(f"{ck} is FP8 without a weight_scale_inv / block size")
        dev = str(_device_of(device, mk))
        plan.nonexpert_bytes[dev] = plan.nonexpert_bytes.get(dev, 0) + meta.numel() * meta.element_size()
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if bad:
        problems.append("; ".join(bad[:8]) + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
    if problems:
        raise ValueError(f"moetune: checkpoint {ckpt.path} does not match the model built from its config.json "
                         f"({type(model).__name__}): " + "; ".join(problems))
    plan.tensors = renamed
    return plan


def packed_bytes_estimate(E: int, H: int, I: int, engine_kwargs) -> int:
    """Bytes the engine packs one layer's expert weights into, for the options
    in engine_kwargs (weight format, group size, backward_weights, ...):
    computed by the engine itself (MoEExperts.host_bytes), exact for every
    format. Biases (gpt-oss; small) are not counted."""
    return MoEExperts.host_bytes(E, H, I, **engine_kwargs)


def available_host_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo (bytes), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(plan: _Plan, engine_kwargs, path) -> None:
    packed = sum(packed_bytes_estimate(ep.E, ep.H, ep.I, engine_kwargs) for ep in plan.experts)
    layer = max((ep.src_bytes for ep in plan.experts), default=0)
    cpu = plan.nonexpert_bytes.get("cpu", 0)
    need = packed + layer + cpu
    avail = available_host_memory()
    gib = 2.0 ** 30
    if avail is not None and need > avail:
        raise MemoryError(
            f"moetune: loading {path} needs about {need / gib:.2f} GiB of host RAM (packed experts "
            f"{packed / gib:.2f} GiB + one layer's unpacked experts {layer / gib:.2f} GiB + non-expert parts on the "
            f"CPU {cpu / gib:.2f} GiB) but only {avail / gib:.2f} GiB are available; nothing was loaded")


def _read_expert(reader, ep: _ExpertsPlan, e: int, block):
    if ep.fused:
        gu, down = reader.get_row(ep.fused["gate_up_proj"], e), reader.get_row(ep.fused["down_proj"], e)
        if ep.layout.transposed:  # the engine takes the [out, in] (nn.Linear) orientation
            gu, down = gu.t(), down.t()
        gate, up = patching._split_gate_up(gu, ep.layout, 0)
        return gate, up, down
    out = []
    for p in PROJ:
        k = ep.per_expert[(e, p)]
        t = reader.get(k)
        if t.dtype == fp8_mod.E4M3:
            t = fp8_mod.dequantize(t, reader.get(ep.scales[k]), block, k)
        out.append(t)
    return tuple(out)


class CacheRebuildWarning(UserWarning):
    """A cache entry was not used (stale, mismatched, corrupted) and is rebuilt,
    or a rebuilt entry could not be written."""


def _weight_keys(ep: _ExpertsPlan):
    """Checkpoint keys of a layer's expert weights (and FP8 scales), biases excluded."""
    keys = [k for p, k in ep.fused.items() if not p.endswith("_bias")]
    return keys + list(ep.per_expert.values()) + list(ep.scales.values())


def _bias_bytes(ckpt: Checkpoint, ep: _ExpertsPlan) -> int:
    return sum(ckpt.entries[k].nbytes for p, k in ep.fused.items() if p.endswith("_bias"))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="moetune load", disable=not enabled,
                smoothing=0.1)


def load_model(path, *, device: DeviceLike = "cpu", dtype: torch.dtype = torch.bfloat16,
               num_threads: Optional[int] = None, ctx: Optional[Context] = None, adapter=None,
               adapter_trainable: bool = True, progress: bool = True, check_memory: bool = True,
               cache_dir=None, **engine_kwargs):
    """Load a local HF checkpoint with its routed experts in the moetune engine.

    path: a folder with config.json and model.safetensors (or a sharded
      model.safetensors.index.json). Per-expert keys (as published) and fused
      gate_up_proj/down_proj keys are both read; block-FP8 (DeepSeek-V3) is
      dequantized on the fly.
    device: where everything but the routed experts goes: "cpu", "cuda",
      "cuda:N", an int, or a device map {module prefix: device} ("" = rest).
    dtype: dtype of the non-expert weights (experts are packed as bf16 or
      as engine_kwargs' weight format says).
    num_threads / ctx: the engine Context (made with num_threads if not given).
    adapter: a PEFT adapter folder to load on top (e.g. to resume training);
      trainable unless adapter_trainable=False. Returns the PeftModel then.
    cache_dir: a folder for the packed experts (per checkpoint, layer and
      packed format): read from it when valid, else built from the checkpoint
      and written (stale / mismatched / corrupted entries are rebuilt with a
      CacheRebuildWarning). `model.moetune_cache` lists each layer's outcome.
    engine_kwargs: passed to moetune.MoEExperts (backward_weights,
      activations, ...).

    Returns the transformers model (eval mode, like from_pretrained) with
    `model.moetune_handle` (a moetune.hf.PatchHandle) attached.
    """
    import transformers

    path = Path(path)
    if isinstance(device, dict):
        kinds = {_device_of(device, k).type for k in device} if device else set()
        if not device or ("cpu" in kinds and len(kinds) > 1) or "meta" in kinds:
            raise ValueError(f"moetune: device_map {device} must map module prefixes to GPUs (or all to the CPU); "
                             "CPU offload of non-expert parts is not supported (the experts are on the CPU already)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"moetune: {path} has no config.json (a local Hugging Face checkpoint folder is needed)")
    config = transformers.AutoConfig.from_pretrained(str(path))
    block = fp8_mod.block_size(config)
    if block is not None:
        # Weights come out dequantized: the model built here is not an FP8 model.
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    model = _skeleton(config, dtype)
    found = patching.find_experts(model)
    for qual, _, _, m, family in found:
        patching._check_module(qual, m, patching._layout(family), loaded=False)
    ckpt = Checkpoint(path)
    km = key_map(model)
    plan = _plan(model, found, ckpt, km, block, device)
    if check_memory:
        _check_memory(plan, engine_kwargs, path)
    if ctx is None:
        ctx = Context(num_threads=num_threads)

    from accelerate.utils import set_module_tensor_to_device

    meta_sd = model.state_dict(keep_vars=True)
    fp32_pats = _fp32_strict(model)
    total = sum(ckpt.entries[k].nbytes for k in plan.tensors.values())
    total += sum(ckpt.entries[k].nbytes for k in plan.scales.values())
    total += sum(ep.src_bytes for ep in plan.experts)
    bar = _progress(total, progress)
    try:
        # Non-expert tensors, shard by shard (one mapping open at a time).
        by_file: Dict[str, List[str]] = {}
        for mk, ck in plan.tensors.items():
            by_file.setdefault(ckpt.entries[ck].file, []).append(mk)
        for fname in sorted(by_file):
            with ckpt.reader() as r:
                for mk in by_file[fname]:
                    ck = plan.tensors[mk]
                    t = r.get(ck)
                    if t.dtype == fp8_mod.E4M3:
                        sk = plan.scales[ck]
                        t = fp8_mod.dequantize(t, r.get(sk), block, ck)
                        bar.update(ckpt.entries[sk].nbytes)
                    meta = meta_sd[mk]
                    want = _target_dtype(mk, meta, dtype, fp32_pats)
                    set_module_tensor_to_device(model, mk, _device_of(device, mk), value=t.to(want), dtype=want)
                    bar.update(ckpt.entries[ck].nbytes)
                    del t
        # Experts, layer by layer; experts of one layer in parallel (packing releases the GIL).
        engines, cache_report = [], {}
        cache_root = None if cache_dir is None else expert_cache.folder(cache_dir, path)

        def cache_read(n):  # bytes read from the cache count as they come
            bar.total += n
            bar.update(n)
        workers = max(1, min(ctx.num_threads, 8))
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            for ep in plan.experts:
                kw = dict(engine_kwargs)
                if ep.layout.activation != "swiglu":
                    kw.update(activation=ep.layout.activation, alpha=float(ep.module.alpha),
                              limit=float(ep.module.limit))
                engine = None
                if cache_root is not None:
                    key = expert_cache.entry_key(ep.qual, kw)
                    source = expert_cache.layer_source(ckpt, _weight_keys(ep), ep.family, block)
                    engine, why = cache_mod.load(ctx, cache_root, key, source, num_experts=ep.E, hidden_size=ep.H,
                                                 intermediate_size=ep.I, progress=cache_read, **kw)
                    cache_report[ep.qual] = why
                    if engine is not None:  # the expert weights are not read from the checkpoint, the biases are
                        bar.total -= ep.src_bytes - _bias_bytes(ckpt, ep)
                        bar.refresh()
                    elif not why.startswith("miss"):
                        warnings.warn(f"moetune: expert cache entry {key!r} in {cache_root} not used, rebuilding: "
                                      f"{why}", CacheRebuildWarning, stacklevel=2)
                hit = engine is not None
                if not hit:
                    engine = MoEExperts.empty(ctx, ep.E, ep.H, ep.I, **kw)
                with ckpt.reader() as r:
                    if ep.layout.bias:  # [E, 2I] and [E, H]: small, read whole (never cached)
                        gate_b, up_b = patching._split_gate_up(r.get(ep.fused["gate_up_proj_bias"]), ep.layout, 1)
                        engine.load_biases(gate_b, up_b, r.get(ep.fused["down_proj_bias"]))
                    if hit:
                        bar.update(_bias_bytes(ckpt, ep))
                        engines.append(engine)
                        continue

                    def one(e, ep=ep, r=r, engine=engine):
                        g, u, d = _read_expert(r, ep, e, block)
                        engine.load_expert(e, g, u, d)
                    per = ep.src_bytes // ep.E
                    for fut in cf.as_completed([pool.submit(one, e) for e in range(ep.E)]):
                        fut.result()
                        bar.update(per)  # per expert: a live bytes/s
                    bar.update(ep.src_bytes - per * ep.E)
                if cache_root is not None:
                    try:
                        cache_mod.save(engine, cache_root, key, source)
                    except OSError as e:  # the model is loaded all the same
                        cache_report[ep.qual] = f"{why}; not written: {e}"
                        warnings.warn(f"moetune: could not write expert cache entry {key!r} in {cache_root}: {e}",
                                      CacheRebuildWarning, stacklevel=2)
                engines.append(engine)
    finally:
        bar.close()
    # Buffers the checkpoint does not hold (rotary tables) were built on the CPU.
    persistent = set(meta_sd)
    for name, b in list(model.named_buffers()):
        if name not in persistent and b.device.type != "meta":
            dev = _device_of(device, name)
            if b.device != dev:
                set_module_tensor_to_device(model, name, dev, value=b)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta" and not any(n == f"{ep.qual}.{q}" for ep in plan.experts
                                                   for q in ep.layout.param_names)]
    if left:
        raise ValueError(f"moetune: tensors not filled by the checkpoint: {_list(left)}")

    handle = patching.PatchHandle(ctx, keep_original=False)
    for ep, engine in zip(plan.experts, engines):
        patching.attach(handle, ep.qual, ep.parent, ep.attr, ep.module, ep.family, engine)
    patching.select_implementation(handle, [ep.module for ep in plan.experts])
    model.moetune_handle = handle
    model.moetune_source = str(path)
    if cache_dir is not None:
        model.moetune_cache = cache_report
    model.eval()
    if isinstance(device, dict) and len({str(_device_of(device, k)) for k in plan.tensors}) > 1:
        # Several GPUs: accelerate's hooks move activations between them (what
        # from_pretrained(device_map=...) does); every tensor is in place already.
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={k: _device_of(device, k) for k in device})
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=adapter_trainable)
    return model
