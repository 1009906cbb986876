"""moetune.load_model: a local HF checkpoint -> a transformers model whose
routed experts live only in the moetune engine.

1. The model is built from config.json on the meta device (accelerate's
   init_empty_weights; non-persistent buffers such as rotary tables are real).
2. Every checkpoint key is mapped to a model key (transformers' own renamings
   and per-family expert key names, `keymap`) and checked (`load_plan`):
   missing, unexpected and mis-shaped tensors are reported by name before any
   weight is read, and the host RAM needed is compared with what is available.
3. Non-expert tensors stream to their device (cast to `dtype`); then the
   experts, layer by layer and expert by expert (safetensors slices), into the
   engine's packed layout with `MoEExperts.load_expert` (each family's storage
   mapped onto the engine's orientation by `families`). Expert weights never
   reach a GPU and exist unpacked for at most one layer at a time.
4. The engines are attached with the same code as `moetune.hf.patch`.

With `cache_dir`, step 3 first looks each layer's packed experts up in the
disk cache (`moetune.cache`, keyed and identified as `hf/expert_cache.py`
says): a valid entry is read straight into the engine (no expert tensor is
read from the checkpoint); a missing one is built as above and written; a
stale, mismatched or corrupted one is reported (CacheRebuildWarning, one line
with the reason) and rebuilt, never used.

Quantized checkpoints (block FP8, MXFP4, compressed-tensors INT4: `published`) keep their
experts as published with weight_format="auto" (the default): codes and scales go into the
engine unchanged (host RAM = the checkpoint's expert bytes); an explicit weight_format converts
(logged). Non-expert block-FP8 tensors are dequantized to `dtype` while streaming (`fp8`).
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import warnings
from pathlib import Path

import torch

from moetune import cache as cache_mod
from moetune.engine import Context, MoEExperts
from moetune.hf import expert_cache, families, hub, patching, published
from moetune.hf import fp8 as fp8_mod
from moetune.hf.checkpoint import Checkpoint
from moetune.hf.families import PROJ
from moetune.hf.keymap import key_map
from moetune.hf.load_plan import DeviceLike, ExpertsPlan, LoadPlan, device_of, name_list, plan_keys
from moetune.options import ExpertsOptions
from moetune.placement.options import PlacementOptions


def load_model(
    path,
    *,
    device: DeviceLike = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    num_threads: int | None = None,
    ctx: Context | None = None,
    adapter=None,
    adapter_trainable: bool = True,
    progress: bool = True,
    check_memory: bool = True,
    cache_dir=None,
    options: ExpertsOptions | None = None,
    placement=None,
    weight_format: str = published.AUTO,
    expert_parallel=None,
    **option_kwargs,
):
    """Load a local HF checkpoint with its routed experts in the moetune engine.

    path: a Hub id ("org/name", through huggingface_hub: its local cache, else a download of
      the config, tokenizer and safetensors files; HF_HUB_OFFLINE respected) or a folder
      with config.json and model.safetensors (or a sharded
      model.safetensors.index.json). Per-expert keys (as published) and fused
      gate_up_proj/down_proj keys are both read; quantized checkpoints as
      published (block FP8 as DeepSeek-V3, MXFP4 as gpt-oss, compressed-tensors
      pack-quantized INT4 as Kimi-K2; see moetune.hf.published).
    weight_format: the experts' format in the engine. "auto" (default): as the
      checkpoint publishes them (fp8_block, mxfp4, int4 with its group; bf16 or
      the options' format for an unquantized one), bit for bit, unless the
      options name a format other than bf16; another format ("bf16", "int8",
      "int4", ...) converts, and logs that it does.
    device: where everything but the routed experts goes: "cpu", "cuda",
      "cuda:N", an int, or a device map {module prefix: device} ("" = rest).
    dtype: dtype of the non-expert weights (experts are packed as bf16 or
      as the options' weight format says).
    num_threads / ctx: the engine Context (made with num_threads if not given).
    adapter: a PEFT adapter folder to load on top (e.g. to resume training);
      trainable unless adapter_trainable=False. Returns the PeftModel then.
    cache_dir: a folder for the packed experts (per checkpoint, layer and
      packed format): read from it when valid, else built from the checkpoint
      and written (stale / mismatched / corrupted entries are rebuilt with a
      CacheRebuildWarning). `model.moetune_cache` lists each layer's outcome.
    options / option_kwargs: the experts' moetune.ExpertsOptions (an object, a
      dict, and / or its fields as keywords: weight_format="int4",
      backward_weights=..., as moetune.MoEExperts takes them; the activation
      is the model's own). The host-RAM check counts exactly what the engine
      allocates for them.
    placement: where the experts compute (moetune.PlacementOptions, a mode
      string "auto" | "cpu" | "gpu", or None = "auto"), see moetune.hf.patch:
      `model.moetune_handle.placement.adopt_lora(peft_model)` after adding
      LoRA (get_peft_model, or `adapter`), `.end_step()` per optimizer step.

    expert_parallel: a moetune.parallel.ExpertParallel: only this rank's experts of each layer
      are read and packed (host RAM = its share), and calls exchange tokens with the other
      ranks (moetune.parallel.layer). Not combined with cache_dir (the cache holds whole layers).

    Returns the transformers model (eval mode, like from_pretrained) with
    `model.moetune_handle` (a moetune.hf.PatchHandle) attached.
    """
    path = Path(hub.resolve_model(path) if isinstance(path, str) and hub.is_hub_id(path) else path)
    explicit = {} if weight_format == published.AUTO else {"weight_format": weight_format}
    options = ExpertsOptions.resolve(options, **option_kwargs, **explicit)
    placement = PlacementOptions.resolve(placement)
    _check_device_map(device)
    if expert_parallel is not None and cache_dir is not None:
        raise ValueError("moetune: load_model(expert_parallel=...) with cache_dir is not supported (whole-layer cache)")
    config, quant = _read_config(path)
    block = quant.block if quant is not None else None
    options = published.choose_options(quant, options, weight_format, path)
    model = skeleton(config, dtype)
    found = patching.find_experts(model)
    for f in found:
        patching.check_module(f.qual, f.module, f.family, loaded=False)
    ckpt = Checkpoint(path)
    plan = plan_keys(
        model, found, ckpt, key_map(model), block, device, quant=quant, keep=published.keeps(quant, options)
    )
    owned = _owned_experts(plan, expert_parallel)
    if check_memory:
        _check_memory(plan, options, path, owned)
    if ctx is None:
        ctx = Context(num_threads=num_threads)

    meta_sd = model.state_dict(keep_vars=True)
    bar = progress_bar(_source_bytes(ckpt, plan), progress)
    cache = None if cache_dir is None else _LayerCache(expert_cache.folder(cache_dir, path), bar)
    try:
        _stream_nonexpert(model, meta_sd, ckpt, plan, device, dtype, block, bar)
        engines = _load_experts(ctx, ckpt, plan, block, options, cache, bar, quant=quant, owned=owned)
    finally:
        bar.close()
    _finish_tensors(model, set(meta_sd), plan, device)

    _attach_engines(model, ctx, plan, engines, placement, expert_parallel)
    model.moetune_source = str(path)
    if cache is not None:
        model.moetune_cache = cache.report
    model.eval()
    model = _dispatch(model, device, plan)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=adapter_trainable)
    return model


# ---- config and skeleton ----


def _check_device_map(device: DeviceLike) -> None:
    if isinstance(device, dict):
        kinds = {device_of(device, k).type for k in device} if device else set()
        if not device or ("cpu" in kinds and len(kinds) > 1) or "meta" in kinds:
            raise ValueError(
                f"moetune: device_map {device} must map module prefixes to GPUs (or all to the CPU); "
                "CPU offload of non-expert parts is not supported (the experts are on the CPU already)"
            )


def _read_config(path: Path):
    """(config, its published.Quantization or None) of a checkpoint folder."""
    import transformers

    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"moetune: {path} has no config.json (a local Hugging Face checkpoint folder is needed)"
        )
    config = transformers.AutoConfig.from_pretrained(str(path))
    quant = published.read(config)
    if quant is not None:
        # The model built here is a plain one: the engine holds the quantized experts.
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    return config, quant


def skeleton(config, dtype: torch.dtype):
    """The causal-LM model of `config` on the meta device (no weight allocated)."""
    import transformers
    from accelerate import init_empty_weights

    try:
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"moetune: model_type {config.model_type!r} has no causal-LM class in transformers "
            f"{transformers.__version__}; supported MoE families: {families.supported_text()}"
        ) from None
    with init_empty_weights(include_buffers=False):
        try:
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # transformers that still call it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    return model


# ---- host memory ----


def packed_bytes_estimate(E: int, H: int, I: int, options: ExpertsOptions, *, biases: bool = False) -> int:
    """Host bytes the engine allocates for one layer's experts with `options`
    (weight format, group size, backward_weights, ...), plus its fp32 biases if
    `biases`: computed by the engine itself (ExpertsOptions.host_bytes), exact
    for every format."""
    return options.host_bytes(E, H, I, biases=biases)


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: int) -> str:
    """Bytes as GiB, or MiB below 1 GiB (small models still show their sizes)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _owned_experts(plan: LoadPlan, expert_parallel) -> list[tuple[int, ...]]:
    """The expert ids this process loads, per MoE layer (all of them without expert parallelism)."""
    if expert_parallel is None:
        return [tuple(range(ep.E)) for ep in plan.experts]
    return [expert_parallel.ownership(i, ep.E).owned(expert_parallel.rank) for i, ep in enumerate(plan.experts)]


def _check_memory(plan: LoadPlan, options: ExpertsOptions, path, owned) -> None:
    packed = sum(
        packed_bytes_estimate(len(mine), ep.H, ep.I, options, biases=ep.family.bias)
        for ep, mine in zip(plan.experts, owned)
    )
    layer = max((ep.src_bytes for ep in plan.experts), default=0)
    cpu = plan.nonexpert_bytes.get("cpu", 0)
    need = packed + layer + cpu
    avail = available_host_memory()
    if avail is not None and need > avail:
        raise MemoryError(
            f"moetune: loading {path} needs about {_size(need)} of host RAM (packed experts "
            f"{_size(packed)} as {options.weight_format} + one layer's unpacked experts {_size(layer)} + non-expert "
            f"parts on the CPU {_size(cpu)}) but only {_size(avail)} are available; nothing was loaded"
        )


# ---- streaming ----


def progress_bar(total: int, enabled: bool):
    """load_model's bytes bar (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="moetune load",
        disable=not enabled,
        smoothing=0.1,
    )


def _source_bytes(ckpt: Checkpoint, plan: LoadPlan) -> int:
    total = sum(ckpt.entries[k].nbytes for k in plan.tensors.values())
    total += sum(ckpt.entries[k].nbytes for k in plan.scales.values())
    return total + sum(ep.src_bytes for ep in plan.experts)


def _fp32_strict(model) -> list[str]:
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


def _stream_nonexpert(
    model, meta_sd, ckpt: Checkpoint, plan: LoadPlan, device: DeviceLike, dtype: torch.dtype, block, bar
) -> None:
    """Non-expert tensors to their devices, shard by shard (one mapping open at a time)."""
    from accelerate.utils import set_module_tensor_to_device

    fp32_pats = _fp32_strict(model)
    by_file: dict[str, list[str]] = {}
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
                want = _target_dtype(mk, meta_sd[mk], dtype, fp32_pats)
                set_module_tensor_to_device(model, mk, device_of(device, mk), value=t.to(want), dtype=want)
                bar.update(ckpt.entries[ck].nbytes)
                del t


class CacheRebuildWarning(UserWarning):
    """A cache entry was not used (stale, mismatched, corrupted) and is rebuilt,
    or a rebuilt entry could not be written."""


# Warnings point at load_model's caller: warn <- _LayerCache.lookup/store <- _load_layer <- _load_experts <- load_model.
_WARN_STACKLEVEL = 5


class _LayerCache:
    """load_model's use of the packed-experts disk cache: a lookup before a
    layer's experts are read, a store after they were built; each layer's
    outcome in `report`."""

    def __init__(self, root: Path, bar):
        self.root, self.bar = root, bar
        self.report: dict[str, str] = {}
        self._entry = {}  # qual -> (key, source) of its lookup

    def _read(self, n: int) -> None:  # bytes read from the cache count as they come
        self.bar.total += n
        self.bar.update(n)

    def lookup(
        self, ctx: Context, ckpt: Checkpoint, ep: ExpertsPlan, block, options: ExpertsOptions
    ) -> MoEExperts | None:
        """The layer's engine read from its cache entry, or None (a miss; a stale,
        mismatched or corrupted entry is reported with a CacheRebuildWarning)."""
        key = expert_cache.entry_key(ep.qual, options)
        source = expert_cache.layer_source(ckpt, ep.weight_keys(), ep.family.name, block)
        self._entry[ep.qual] = key, source
        engine, why = cache_mod.load(
            ctx,
            self.root,
            key,
            source,
            num_experts=ep.E,
            hidden_size=ep.H,
            intermediate_size=ep.I,
            options=options,
            progress=self._read,
        )
        self.report[ep.qual] = why
        if engine is not None:  # the expert weights are not read from the checkpoint, the biases are
            self.bar.total -= ep.src_bytes - _bias_bytes(ckpt, ep)
            self.bar.refresh()
        elif not why.startswith("miss"):
            warnings.warn(
                f"moetune: expert cache entry {key!r} in {self.root} not used, rebuilding: {why}",
                CacheRebuildWarning,
                stacklevel=_WARN_STACKLEVEL,
            )
        return engine

    def store(self, engine: MoEExperts, ep: ExpertsPlan) -> None:
        """Writes the layer's entry (after a lookup that missed); a failed write is
        reported, the model is loaded all the same."""
        key, source = self._entry[ep.qual]
        try:
            cache_mod.save(engine, self.root, key, source)
        except OSError as e:
            self.report[ep.qual] = f"{self.report[ep.qual]}; not written: {e}"
            warnings.warn(
                f"moetune: could not write expert cache entry {key!r} in {self.root}: {e}",
                CacheRebuildWarning,
                stacklevel=_WARN_STACKLEVEL,
            )


def _bias_bytes(ckpt: Checkpoint, ep: ExpertsPlan) -> int:
    return sum(ckpt.entries[k].nbytes for p, k in ep.fused.items() if p.endswith("_bias"))


def _load_experts(
    ctx: Context,
    ckpt: Checkpoint,
    plan: LoadPlan,
    block,
    options: ExpertsOptions,
    cache: _LayerCache | None,
    bar,
    *,
    quant: published.Quantization | None = None,
    owned: list[tuple[int, ...]],
) -> list[MoEExperts]:
    """One engine per MoE layer, layer by layer; the experts of one layer are read
    and packed in parallel (packing releases the GIL). owned: the experts to load per layer."""
    workers = max(1, min(ctx.num_threads, 8))
    engines = []
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        for ep, mine in zip(plan.experts, owned):  # a loop, not a comprehension: _WARN_STACKLEVEL counts the frames
            engines.append(_load_layer(ctx, ckpt, ep, block, options, cache, bar, pool, quant, mine))
    return engines


def _load_layer(
    ctx: Context,
    ckpt: Checkpoint,
    ep: ExpertsPlan,
    block,
    options: ExpertsOptions,
    cache: _LayerCache | None,
    bar,
    pool,
    quant: published.Quantization | None = None,
    owned: tuple[int, ...] | None = None,
) -> MoEExperts:
    """owned: the global ids of the experts to load (engine slot i = owned[i]); None: all."""
    owned = tuple(range(ep.E)) if owned is None else tuple(owned)
    layer_options = ep.family.engine_options(options, ep.module)
    engine = None if cache is None else cache.lookup(ctx, ckpt, ep, block, layer_options)
    hit = engine is not None
    if not hit:
        engine = MoEExperts.empty(ctx, len(owned), ep.H, ep.I, layer_options)
    rows = torch.tensor(owned, dtype=torch.int64)
    with ckpt.reader() as r:
        if ep.family.bias:  # [E, 2I] and [E, H]: small, read whole (never cached)
            gate_up_bias, down_bias = (r.get(ep.fused[b]).index_select(0, rows) for b in families.BIAS_PARAMS)
            engine.load_biases(*ep.family.engine_biases(gate_up_bias, down_bias))
        if hit:
            bar.update(_bias_bytes(ckpt, ep))
            return engine

        keep = published.keeps(quant, layer_options)

        def one(i):
            e = owned[i]
            if keep:
                try:
                    engine.load_expert_published(i, *published.read_published(r, ep, e, quant))
                except ValueError as err:  # a bad published code / scale: name the layer too
                    raise ValueError(f"moetune: layer {ep.qual}, expert {e}: {err}") from None
                return
            g, u, d = _read_expert(r, ep, e, block, quant)
            try:
                engine.load_expert(i, g, u, d)
            except ValueError as err:  # e.g. a non-finite weight at quantization: name the layer too
                raise ValueError(f"moetune: layer {ep.qual}, expert {e}: {err}") from None

        per = ep.src_bytes // ep.E
        futs = [pool.submit(one, i) for i in range(len(owned))]
        try:
            for fut in cf.as_completed(futs):
                fut.result()
                bar.update(per)  # per expert: a live bytes/s
        except BaseException:  # the reader closes its files below: no expert may still read them
            for fut in futs:
                fut.cancel()
            cf.wait(futs)
            raise
        bar.update(ep.src_bytes - per * len(owned))
    if cache is not None:
        cache.store(engine, ep)
    return engine


def _read_expert(reader, ep: ExpertsPlan, e: int, block, quant=None):
    """Expert e's (gate [I, H], up [I, H], down [H, I]) in the engine's [out, in] orientation."""
    if quant is not None and quant.method != "fp8":
        return published.read_dequantized(reader, ep, e, quant)
    if ep.fused:
        return ep.family.to_engine(
            reader.get_row(ep.fused[families.GATE_UP], e), reader.get_row(ep.fused[families.DOWN], e)
        )
    out = []
    for p in PROJ:
        k = ep.per_expert[(e, p)]
        t = reader.get(k)
        if t.dtype == fp8_mod.E4M3:
            t = fp8_mod.dequantize(t, reader.get(ep.scales[k]), block, k)
        out.append(t)
    return tuple(out)


# ---- finishing ----


def _finish_tensors(model, persistent: set[str], plan: LoadPlan, device: DeviceLike) -> None:
    """Buffers the checkpoint does not hold (rotary tables, built on the CPU) moved
    to their device, tied weights tied; nothing but the experts may be left on meta."""
    from accelerate.utils import set_module_tensor_to_device

    for name, b in list(model.named_buffers()):
        if name not in persistent and b.device.type != "meta":
            dev = device_of(device, name)
            if b.device != dev:
                set_module_tensor_to_device(model, name, dev, value=b)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [
        n
        for n, p in list(model.named_parameters()) + list(model.named_buffers())
        if p.device.type == "meta"
        and not any(n == f"{ep.qual}.{q}" for ep in plan.experts for q in ep.family.param_names)
    ]
    if left:
        raise ValueError(f"moetune: tensors not filled by the checkpoint: {name_list(left)}")


def _attach_engines(
    model, ctx: Context, plan: LoadPlan, engines: list[MoEExperts], placement, expert_parallel=None
) -> None:
    """The engines attached with the same code as moetune.hf.patch (model.moetune_handle),
    then the model's placement runtime."""
    handle = patching.PatchHandle(ctx, keep_original=False)
    for i, (ep, engine) in enumerate(zip(plan.experts, engines)):
        patching.attach(handle, ep.found, engine)
        if expert_parallel is not None:
            patching.attach_expert_parallel(ep.module, expert_parallel, expert_parallel.ownership(i, ep.E))
    patching.select_implementation(handle, [ep.module for ep in plan.experts])
    patching.attach_placement(handle, placement, model)
    model.moetune_handle = handle


def _dispatch(model, device: DeviceLike, plan: LoadPlan):
    """Several GPUs: accelerate's hooks move activations between them (what
    from_pretrained(device_map=...) does); every tensor is in place already."""
    if isinstance(device, dict) and len({str(device_of(device, k)) for k in plan.tensors}) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={k: device_of(device, k) for k in device})
    return model
