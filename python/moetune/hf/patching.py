"""Run the routed experts of Hugging Face transformers MoE models on the moetune engine.

Plugs into transformers' own experts-implementation registry
(`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`): experts classes
decorated with `@use_experts_implementation` dispatch their forward to the
function registered under `config._experts_implementation`. `patch()`
registers "moetune", packs each experts module's weights into the engine,
replaces the module's `gate_up_proj` / `down_proj` by shape-only placeholders
(`EngineHeldTensor`) and selects "moetune" on the experts' config. The router,
attention, norms, shared experts etc. stay the model's own torch code.

Which classes are supported, and how each stores its weights, is
`moetune.hf.families`. LoRA on the experts is PEFT's
(`LoraConfig(target_parameters=[...])`), see `moetune.hf.peft_lora`; patch()
works before or after `peft.get_peft_model`.

Where the experts compute is the model's placement (moetune.PlacementOptions, "auto" by default):
patch() attaches one `moetune.hf.placement.ModelPlacement` per model (`handle.placement`), and
the "moetune" experts function hands every call to it once it has started on a device where
experts may run on the GPU; otherwise (mode "cpu", or "auto" without CUDA) calls go to
moetune.moe_experts exactly as without placement.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import NamedTuple

import torch
from torch import nn

from moetune.engine import Context, LoraWeights, MoEExperts, moe_experts
from moetune.hf import families, peft_lora
from moetune.hf._placeholder import EngineHeldTensor, held_parameter
from moetune.hf.families import Family
from moetune.hf.placement import ModelPlacement
from moetune.options import ExpertsOptions
from moetune.placement.options import PlacementOptions

IMPLEMENTATION = "moetune"
# Derived from moetune.hf.families (the one table of families): name -> (module, experts class).
SUPPORTED_FAMILIES = families.SUPPORTED_FAMILIES


class FoundExperts(NamedTuple):
    """One routed-experts module of a model, as find_experts reports it."""

    qual: str  # qualified module name
    parent: nn.Module
    attr: str  # parent.<attr> is the experts module (or PEFT's wrapper around it)
    module: nn.Module
    family: Family


@dataclasses.dataclass
class ExpertsState:
    """Per patched experts module (stored on it, see `experts_state`)."""

    name: str
    family: Family
    engine: MoEExperts | None
    parent: weakref.ref[nn.Module]
    attr: str
    originals: dict[str, nn.Parameter] | None
    switched: list[nn.Module] = dataclasses.field(default_factory=list)
    placement: object | None = None  # the model's moetune.hf.placement.ModelPlacement
    layer_key: int | None = None  # this layer's key in it
    ep: object | None = None  # moetune.parallel.EPLayer when the experts are split over ranks

    def chain(self, module: nn.Module):
        parent = self.parent()
        top = getattr(parent, self.attr) if parent is not None else module
        return peft_lora.wrapper_chain(top, module)

    def adopt(self, module: nn.Module):
        chain = self.chain(module)
        if chain:
            self.switched += peft_lora.adopt(chain)
        return chain


_STATE_ATTR = "_moetune_state"


def experts_state(module: nn.Module) -> ExpertsState | None:
    """The state patch() / load_model() keep on a patched experts module (None if not patched)."""
    return getattr(module, _STATE_ATTR, None)


def _lora_for(module: nn.Module, st: ExpertsState) -> LoraWeights:
    chain = st.chain(module)
    if any(type(w) is not peft_lora.EngineParamWrapper for w in chain):
        # Only reachable when the experts module is called directly rather than
        # through its parent (whose pre-hook switches the wrappers).
        st.switched += peft_lora.adopt(chain)
    lora = LoraWeights()
    scalings = {}
    for w in chain:
        f = peft_lora.lora_factors(w, transposed=st.family.transposed)
        if f is None:
            continue
        A, B, s = f
        scalings[w.parameter_name] = s
        if w.parameter_name == families.GATE_UP:
            # One PEFT LoRA on the fused gate/up weight = gate and up LoRAs
            # sharing A (the engine computes A x once per projection); B's
            # output rows split like the weight's 2I axis.
            lora.gate, lora.up = ((A, b) for b in st.family.split_gate_up(B, 1))
        else:
            lora.down = (A, B)
    if len(set(scalings.values())) > 1:
        raise NotImplementedError(
            f"moetune: {st.name}: different LoRA scalings on gate_up_proj and down_proj ({scalings}) are not "
            "supported (the engine takes one scaling per call)"
        )
    if scalings:
        lora.scaling = next(iter(scalings.values()))
    return lora


def moetune_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "moetune" entry of transformers' ALL_EXPERTS_FUNCTIONS."""
    st = experts_state(self)
    if st is None or st.engine is None:
        raise RuntimeError(
            f"moetune: {type(self).__name__} dispatches to experts implementation 'moetune' but was not patched "
            "by moetune.hf.patch (or was undone); patch the model containing it"
        )
    lora = _lora_for(self, st)
    if st.ep is not None:  # expert parallelism: tokens to the owning ranks and back (moetune.parallel.layer)
        return st.ep.forward(hidden_states, top_k_index, top_k_weights, lora, functools.partial(_local_experts, st))
    return _local_experts(st, hidden_states, top_k_index, top_k_weights, lora)


def _local_experts(st: ExpertsState, hidden_states, top_k_index, top_k_weights, lora) -> torch.Tensor:
    """This process's experts of the layer: the model's placement where it runs on a GPU, else the engine."""
    placement = st.placement
    if placement is not None and placement.start(hidden_states.device) != "cpu":
        return placement.forward(st.layer_key, hidden_states, top_k_index, top_k_weights, lora)
    return moe_experts(st.engine, hidden_states, top_k_index, top_k_weights, lora)


def register() -> None:
    """Register the "moetune" experts implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not moetune_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moetune_experts_forward)


def _adopt_hook(st_ref, module_ref, parent, args):
    st, module = st_ref(), module_ref()
    if st is not None and module is not None and st.engine is not None:
        st.adopt(module)


# Decorator attributes the engine needs whatever the family: no post-expert norm, not split by expert parallelism.
_ENGINE_FLAGS = {"has_post_expert_norm": False, "_is_expert_parallel": False}


def check_module(name: str, m: nn.Module, family: Family, *, loaded: bool = True) -> None:
    """Refuses experts modules the engine cannot run. loaded=False: the weights
    are still to come (load_model's meta-device skeleton); only shapes count."""
    problems = _flag_problems(m, family) + family.activation_problems(m) + _param_problems(m, family, loaded)
    if not problems:
        problems = _shape_problems(m, family)
    if hasattr(m, "parametrizations"):
        problems.append("parameters are parametrized (a PEFT forward in progress?)")
    if problems:
        raise ValueError(f"moetune: cannot patch experts module {name}: " + "; ".join(problems))


def _flag_problems(m: nn.Module, family: Family) -> list[str]:
    """The module's @use_experts_implementation attributes against the family's layout."""
    return [
        f"{attr}={getattr(m, attr)!r}"
        for attr, want in {**family.decorator_flags, **_ENGINE_FLAGS}.items()
        if getattr(m, attr, want) != want
    ]


def _param_problems(m: nn.Module, family: Family, loaded: bool) -> list[str]:
    problems = []
    for pname in family.param_names:
        p = getattr(m, pname, None)
        if isinstance(p, EngineHeldTensor):
            problems.append(f"{pname} is already held by a moetune engine (patched twice?)")
        elif not isinstance(p, torch.Tensor) or p.dim() != (2 if pname.endswith("_bias") else 3):
            problems.append(f"{pname} is not a {2 if pname.endswith('_bias') else 3}-D tensor")
        elif loaded and p.device.type == "meta":
            problems.append(f"{pname} is on the meta device (load the weights first)")
    return problems


def _shape_problems(m: nn.Module, family: Family) -> list[str]:
    """The parameters' shapes against the family's (E, H, I) layout, E, H, I read off gate_up_proj."""
    want = family.param_shapes(*family.dims(m.gate_up_proj.shape))
    have = {pname: tuple(getattr(m, pname).shape) for pname in family.param_names}
    if have[families.GATE_UP] != want[families.GATE_UP] or have[families.DOWN] != want[families.DOWN]:
        return [
            f"shapes gate_up_proj {list(m.gate_up_proj.shape)} / down_proj {list(m.down_proj.shape)} are not "
            f"{family.shapes_text}"
        ]
    if family.bias and any(have[b] != want[b] for b in families.BIAS_PARAMS):
        return [
            f"shapes gate_up_proj_bias {list(m.gate_up_proj_bias.shape)} / down_proj_bias "
            f"{list(m.down_proj_bias.shape)} are not [E, 2I] / [E, H]"
        ]
    return []


class PatchHandle:
    """What patch() did; `undo()` restores the model. `placement`: the model's
    moetune.hf.placement.ModelPlacement (end_step() once per optimizer step, adopt_lora(model)
    after get_peft_model; see moetune.hf.placement)."""

    def __init__(self, ctx: Context, keep_original: bool):
        self.ctx = ctx
        self.keep_original = keep_original
        self._modules: list[nn.Module] = []
        self._hooks = []
        self._configs = []  # (config, previous _experts_implementation)
        self.placement = None
        self.undone = False

    @property
    def module_names(self) -> list[str]:
        return [experts_state(m).name for m in self._modules]

    @property
    def families(self) -> list[str]:
        return sorted({experts_state(m).family.name for m in self._modules})

    @property
    def packed_bytes(self) -> int:
        """Host bytes held by the engine for all patched experts."""
        return sum(experts_state(m).engine.packed_bytes for m in self._modules)

    @property
    def original_bytes(self) -> int:
        """Host bytes held to make undo() possible (0 with keep_original=False)."""
        return sum(
            p.numel() * p.element_size() for m in self._modules for p in (experts_state(m).originals or {}).values()
        )

    def __repr__(self) -> str:
        state = "undone" if self.undone else f"{len(self._modules)} experts modules ({', '.join(self.families)})"
        return f"moetune.hf.PatchHandle({state})"

    def undo(self) -> None:
        """Restore the original expert weights (the same Parameter objects), the
        model's experts implementation and PEFT's own wrapper class."""
        if self.undone:
            return
        if not self.keep_original:
            raise RuntimeError(
                "moetune: patch(..., keep_original=False) dropped the original expert weights; "
                "undo() is impossible (reload the model instead)"
            )
        for h in self._hooks:
            h.remove()
        self.placement = None
        for m in self._modules:
            st = experts_state(m)
            st.placement = None
            peft_lora.release(st.switched)
            for pname, p in st.originals.items():
                setattr(m, pname, p)
            st.engine = None
            st.originals = None
            delattr(m, _STATE_ATTR)
        for cfg, prev in self._configs:
            cfg._experts_implementation = prev
        self._modules, self._hooks, self._configs = [], [], []
        self.undone = True


def _find_experts(model: nn.Module):
    supported = families.supported_classes()
    found, unsupported, seen = [], [], set()
    for pname, parent in model.named_modules():
        if peft_lora.is_param_wrapper(parent):
            continue  # the edge wrapper -> base_layer is inside a chain already walked
        for attr, child in parent.named_children():
            base = child
            while peft_lora.is_param_wrapper(base):
                base = base.base_layer
            if id(base) in seen:
                continue
            qual = f"{pname}.{attr}" if pname else attr
            if type(base) in supported:
                seen.add(id(base))
                found.append(FoundExperts(qual, parent, attr, base, supported[type(base)]))
            elif hasattr(base, "has_gate") and hasattr(base, "is_transposed") and hasattr(base, "config"):
                seen.add(id(base))
                unsupported.append(f"{qual} ({type(base).__name__})")
    return found, unsupported


def find_experts(model: nn.Module) -> list[FoundExperts]:
    """Every routed-experts module of `model` (qualified name, parent, attribute,
    experts module, family); a clear error if there is none or if any is of a
    class the engine does not support (never a silent partial patch)."""
    found, unsupported = _find_experts(model)
    if not found:
        msg = (
            f"moetune: no supported MoE experts module found in {type(model).__name__}. "
            f"Supported families: {families.supported_text()}."
        )
        if unsupported:
            msg += f" Found experts modules of unsupported classes: {', '.join(unsupported)}."
        raise ValueError(msg)
    if unsupported:
        raise ValueError(
            f"moetune: model has experts modules of unsupported classes ({', '.join(unsupported)}); "
            f"supported families: {families.supported_text()}"
        )
    return found


def attach(
    handle: PatchHandle, found: FoundExperts, engine: MoEExperts, originals: dict[str, nn.Parameter] | None = None
) -> None:
    """Hands the experts module `found` to `engine` (already loaded): the one way
    both patch() and load_model() attach an engine. Its expert parameters become
    shape-only placeholders; PEFT wrappers around it are adopted now and at
    every call of its parent."""
    m = found.module
    st = ExpertsState(found.qual, found.family, engine, weakref.ref(found.parent), found.attr, originals)
    setattr(m, _STATE_ATTR, st)
    handle._modules.append(m)
    for pname in found.family.param_names:
        setattr(m, pname, held_parameter(getattr(m, pname)))
    st.adopt(m)  # patch after get_peft_model
    handle._hooks.append(
        found.parent.register_forward_pre_hook(functools.partial(_adopt_hook, weakref.ref(st), weakref.ref(m)))
    )


def select_implementation(handle: PatchHandle, modules) -> None:
    """Switch the experts' configs to the "moetune" implementation (undo restores)."""
    register()
    seen = set()
    for m in modules:
        cfg = m.config
        if id(cfg) not in seen:
            seen.add(id(cfg))
            handle._configs.append((cfg, cfg._experts_implementation))
            cfg._experts_implementation = IMPLEMENTATION


def attach_placement(handle: PatchHandle, placement, model: nn.Module | None = None) -> None:
    """The model's placement runtime (one per model) for the modules attached to `handle`:
    `handle.placement`, and each module's state points to it (its layer key = its index)."""
    options = PlacementOptions.resolve(placement)
    layers = [(m, experts_state(m)) for m in handle._modules]
    handle.placement = ModelPlacement(options, layers, model=model, ctx=handle.ctx, lora_of=_lora_for)
    for i, (_, st) in enumerate(layers):
        st.placement, st.layer_key = handle.placement, i


def patch(
    model: nn.Module,
    ctx: Context | None = None,
    num_threads: int | None = None,
    *,
    keep_original: bool = True,
    options: ExpertsOptions | None = None,
    placement=None,
    expert_parallel=None,
    **option_kwargs,
) -> PatchHandle:
    """Run every routed-experts module of `model` on the moetune engine.

    model: a transformers model (or a PEFT model wrapping one), weights loaded.
    ctx: an engine Context to share; else one is made with `num_threads`.
    keep_original: keep the original expert Parameters (moved to CPU, not
      registered in the model) so that `handle.undo()` can restore them. Costs
      one extra copy of all expert weights in host RAM on top of the engine's
      packed copy; pass False to free them (undo() then raises).
    options / option_kwargs: the experts' moetune.ExpertsOptions (an object, a
      dict, and / or its fields as keywords: backward_weights, activations,
      weight_format, group_size, row_group), as moetune.MoEExperts takes them;
      weight_format "int8" / "int4" quantizes the frozen experts at patch time.
      The activation (and its constants) is the model's own.
    placement: where the experts compute: a moetune.PlacementOptions, a mode
      string ("auto" | "cpu" | "gpu") or None (= "auto": split between the CPU
      engine and the GPU when the model runs on CUDA, else the CPU engine
      only). See moetune.hf.placement: `handle.placement.adopt_lora(peft_model)`
      after get_peft_model, `handle.placement.end_step()` once per optimizer
      step (moetune.hf.PlacementCallback does both for HF Trainer).

    After patching, each experts module's gate_up_proj / down_proj are
    shape-only placeholders (EngineHeldTensor, one element of storage, never
    moved by model.to(...)). LoRA is PEFT's: call peft.get_peft_model(...,
    LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"], lora_dropout=0.0)) before or after patch().
    To build a model with its experts streamed straight into the engine, see
    moetune.load_model.
    expert_parallel: a moetune.parallel.ExpertParallel: each layer's engine packs only this
      rank's experts (moetune.parallel.ownership) and calls exchange tokens with the other
      ranks (moetune.parallel.layer); None (default): every expert here.
    """
    options = ExpertsOptions.resolve(options, **option_kwargs)
    placement = PlacementOptions.resolve(placement)
    found = find_experts(model)
    for f in found:
        check_module(f.qual, f.module, f.family)
    if ctx is None:
        ctx = Context(num_threads=num_threads)

    handle = PatchHandle(ctx, keep_original)
    try:
        for i, f in enumerate(found):
            params = {pname: getattr(f.module, pname) for pname in f.family.param_names}
            own = None if expert_parallel is None else expert_parallel.ownership(i, params[families.GATE_UP].shape[0])
            engine = _engine_of(ctx, f, _owned_rows(params, own, expert_parallel), options)
            originals = _on_cpu(params) if keep_original else None
            del params
            attach(handle, f, engine, originals)
            if own is not None:
                attach_expert_parallel(f.module, expert_parallel, own)
        select_implementation(handle, [f.module for f in found])
        attach_placement(handle, placement, model)
    except BaseException:
        if keep_original:
            handle.undo()
        raise
    return handle


def _engine_of(
    ctx: Context, found: FoundExperts, params: dict[str, torch.Tensor], options: ExpertsOptions
) -> MoEExperts:
    """A MoEExperts packed from the module's own parameters (mapped onto the
    engine's [out, in] orientation by its family)."""
    family = found.family
    with torch.no_grad():
        gate, up, down = family.to_engine(params[families.GATE_UP], params[families.DOWN])
        kw = {}
        if family.bias:
            kw["gate_bias"], kw["up_bias"], kw["down_bias"] = family.engine_biases(
                *(params[b] for b in families.BIAS_PARAMS)
            )
        return MoEExperts(ctx, gate, up, down, family.engine_options(options, found.module), **kw)


def _owned_rows(params: dict[str, torch.Tensor], own, ep) -> dict[str, torch.Tensor]:
    """The parameters' rows of this rank's experts (expert-major [E, ...] in every family), or all."""
    if own is None:
        return params
    rows = torch.tensor(own.owned(ep.rank), dtype=torch.int64)
    return {k: v.detach().index_select(0, rows.to(v.device)) for k, v in params.items()}


def attach_expert_parallel(module: nn.Module, ep, own) -> None:
    """Routes the calls of an attached experts module through expert parallelism (its engine
    holds exactly the experts `own` gives ep.rank)."""
    from moetune.parallel.layer import EPLayer

    st = experts_state(module)
    if st.engine.num_experts != len(own.owned(ep.rank)):
        raise ValueError(
            f"moetune: {st.name}: the engine holds {st.engine.num_experts} experts, rank {ep.rank} owns "
            f"{len(own.owned(ep.rank))}"
        )
    st.ep = EPLayer(ep, own)


def _on_cpu(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The original Parameters kept for undo(): the same objects where on the CPU, else CPU copies."""
    originals = {}
    for pname, p in params.items():
        if p.device.type != "cpu":
            p = nn.Parameter(p.detach().to("cpu"), requires_grad=p.requires_grad)
        originals[pname] = p
    return originals
