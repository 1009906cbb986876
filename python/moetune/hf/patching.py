"""Run the routed experts of Hugging Face transformers MoE models on the moetune engine.

Plugs into transformers' own experts-implementation registry
(`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`): experts classes
decorated with `@use_experts_implementation` dispatch their forward to the
function registered under `config._experts_implementation`. `patch()`
registers "moetune", packs each experts module's weights into the engine,
replaces the module's `gate_up_proj` / `down_proj` by shape-only placeholders
(`EngineHeldTensor`) and selects "moetune" on the experts' config. The router,
attention, norms, shared experts etc. stay the model's own torch code.

LoRA on the experts is PEFT's (`LoraConfig(target_parameters=[...])`), see
`moetune.hf._peft`; patch() works before or after `peft.get_peft_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import weakref
from typing import Dict, List, Optional

import torch
from torch import nn

from moetune.engine import Context, LoraWeights, MoEExperts, moe_experts
from moetune.hf import _peft
from moetune.hf._placeholder import EngineHeldTensor, held_parameter

IMPLEMENTATION = "moetune"

# family -> (module, experts class). Unless FAMILY_LAYOUTS says otherwise a family
# uses the fused layout gate_up_proj [E, 2I, H] (gate rows first, then up: the
# default _apply_gate does `gate, up = gate_up_out.chunk(2, dim=-1)`) and
# down_proj [E, H, I], SwiGLU (silu), no biases.
SUPPORTED_FAMILIES = {
    "Qwen3-MoE": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
    "Mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    "OLMoE": ("transformers.models.olmoe.modeling_olmoe", "OlmoeExperts"),
    "Qwen2-MoE": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
    "DeepSeek-V2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Experts"),
    "DeepSeek-V3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts"),
    "GLM-4-MoE": ("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeExperts"),
    "gpt-oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
}


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """How a family's fused experts module stores its weights (the flags of
    transformers' `@use_experts_implementation`) and which activation it applies."""

    transposed: bool = False   # gate_up_proj [E, H, 2I], down_proj [E, I, H] (x @ W) instead of [E, 2I, H], [E, H, I]
    interleaved: bool = False  # gate/up alternate along 2I (gate = [..., ::2], up = [..., 1::2]) instead of halves
    bias: bool = False         # gate_up_proj_bias [E, 2I] (same gate/up order), down_proj_bias [E, H]
    activation: str = "swiglu"  # or "gpt_oss": clamped SwiGLU with the module's .alpha / .limit

    @property
    def param_names(self):
        return _peft.EXPERT_PARAMS + (("gate_up_proj_bias", "down_proj_bias") if self.bias else ())


FAMILY_LAYOUTS = {
    # GptOssExperts: @use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True);
    # alpha/limit are module attributes (config.swiglu_alpha/limit in transformers >= 5.2x, constants before).
    "gpt-oss": ExpertsLayout(transposed=True, interleaved=True, bias=True, activation="gpt_oss"),
}


def _layout(family: str) -> ExpertsLayout:
    return FAMILY_LAYOUTS.get(family, ExpertsLayout())


def _split_gate_up(t: torch.Tensor, layout: ExpertsLayout, dim: int):
    """(gate, up) views of a fused gate/up tensor along `dim` (its 2I axis)."""
    n = t.shape[dim]
    if layout.interleaved:
        idx = [slice(None)] * t.dim()
        idx[dim] = slice(0, None, 2)
        gate = t[tuple(idx)]
        idx[dim] = slice(1, None, 2)
        return gate, t[tuple(idx)]
    return t.narrow(dim, 0, n // 2), t.narrow(dim, n // 2, n // 2)


def _supported_classes() -> Dict[type, str]:
    out = {}
    for family, (mod, cls) in SUPPORTED_FAMILIES.items():
        try:
            out[getattr(importlib.import_module(mod), cls)] = family
        except (ImportError, AttributeError):  # pragma: no cover - older/newer transformers
            pass
    return out


def _supported_text() -> str:
    return ", ".join(f"{fam} ({cls})" for fam, (_, cls) in SUPPORTED_FAMILIES.items())


@dataclasses.dataclass
class _ExpertsState:
    """Per patched experts module (stored as module._moetune_state)."""

    name: str
    family: str
    layout: ExpertsLayout
    engine: Optional[MoEExperts]
    parent: "weakref.ref[nn.Module]"
    attr: str
    intermediate: int
    originals: Optional[Dict[str, nn.Parameter]]
    switched: List[nn.Module] = dataclasses.field(default_factory=list)

    def chain(self, module: nn.Module):
        parent = self.parent()
        top = getattr(parent, self.attr) if parent is not None else module
        return _peft.wrapper_chain(top, module)

    def adopt(self, module: nn.Module):
        chain = self.chain(module)
        if chain:
            self.switched += _peft.adopt(chain)
        return chain


def _lora_for(module: nn.Module, st: _ExpertsState) -> LoraWeights:
    chain = st.chain(module)
    if any(type(w) is not _peft.EngineParamWrapper for w in chain):
        # Only reachable when the experts module is called directly rather than
        # through its parent (whose pre-hook switches the wrappers).
        st.switched += _peft.adopt(chain)
    lora = LoraWeights()
    scalings = {}
    for w in chain:
        f = _peft.lora_factors(w, transposed=st.layout.transposed)
        if f is None:
            continue
        A, B, s = f
        scalings[w.parameter_name] = s
        if w.parameter_name == "gate_up_proj":
            # One PEFT LoRA on the fused gate/up weight = gate and up LoRAs
            # sharing A (the engine computes A x once per projection); B's
            # output rows split like the weight's 2I axis.
            lora.gate, lora.up = ((A, b) for b in _split_gate_up(B, st.layout, 1))
        else:
            lora.down = (A, B)
    if len(set(scalings.values())) > 1:
        raise NotImplementedError(
            f"moetune: {st.name}: different LoRA scalings on gate_up_proj and down_proj ({scalings}) are not "
            "supported (the engine takes one scaling per call)")
    if scalings:
        lora.scaling = next(iter(scalings.values()))
    return lora


def moetune_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "moetune" entry of transformers' ALL_EXPERTS_FUNCTIONS."""
    st = getattr(self, "_moetune_state", None)
    if st is None or st.engine is None:
        raise RuntimeError(
            f"moetune: {type(self).__name__} dispatches to experts implementation 'moetune' but was not patched "
            "by moetune.hf.patch (or was undone); patch the model containing it")
    return moe_experts(st.engine, hidden_states, top_k_index, top_k_weights, _lora_for(self, st))


def register() -> None:
    """Register the "moetune" experts implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not moetune_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moetune_experts_forward)


def _adopt_hook(st_ref, module_ref, parent, args):
    st, module = st_ref(), module_ref()
    if st is not None and module is not None and st.engine is not None:
        st.adopt(module)


def _check_module(name: str, m: nn.Module, layout: ExpertsLayout, *, loaded: bool = True) -> None:
    """Refuses experts modules the engine cannot run. loaded=False: the weights
    are still to come (load_model's meta-device skeleton); only shapes count."""
    problems = []
    for attr, want in (("has_gate", True), ("has_bias", layout.bias), ("is_transposed", layout.transposed),
                       ("is_concatenated", not layout.interleaved), ("has_post_expert_norm", False),
                       ("_is_expert_parallel", False)):
        if getattr(m, attr, want) != want:
            problems.append(f"{attr}={getattr(m, attr)!r}")
    if layout.activation == "swiglu":
        act = getattr(getattr(m, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            problems.append(f"hidden_act={act!r} (the engine computes SwiGLU)")
    else:
        for attr in ("alpha", "limit"):
            v = getattr(m, attr, None)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{attr}={v!r} (the clamped SwiGLU needs a finite number)")
    for pname in layout.param_names:
        p = getattr(m, pname, None)
        if isinstance(p, EngineHeldTensor):
            problems.append(f"{pname} is already held by a moetune engine (patched twice?)")
        elif not isinstance(p, torch.Tensor) or p.dim() != (2 if pname.endswith("_bias") else 3):
            problems.append(f"{pname} is not a {2 if pname.endswith('_bias') else 3}-D tensor")
        elif loaded and p.device.type == "meta":
            problems.append(f"{pname} is on the meta device (load the weights first)")
    if not problems:
        if layout.transposed:
            E, H, I2 = m.gate_up_proj.shape
            want_down, text = (E, I2 // 2, H), "[E, H, 2I] / [E, I, H]"
        else:
            E, I2, H = m.gate_up_proj.shape
            want_down, text = (E, H, I2 // 2), "[E, 2I, H] / [E, H, I]"
        if I2 % 2 or tuple(m.down_proj.shape) != want_down:
            problems.append(f"shapes gate_up_proj {list(m.gate_up_proj.shape)} / down_proj "
                            f"{list(m.down_proj.shape)} are not {text}")
        elif layout.bias and (tuple(m.gate_up_proj_bias.shape) != (E, I2) or
                              tuple(m.down_proj_bias.shape) != (E, H)):
            problems.append(f"shapes gate_up_proj_bias {list(m.gate_up_proj_bias.shape)} / down_proj_bias "
                            f"{list(m.down_proj_bias.shape)} are not [E, 2I] / [E, H]")
    if hasattr(m, "parametrizations"):
        problems.append("parameters are parametrized (a PEFT forward in progress?)")
    if problems:
        raise ValueError(f"moetune: cannot patch experts module {name}: " + "; ".join(problems))


class PatchHandle:
    """What patch() did; `undo()` restores the model."""

    def __init__(self, ctx: Context, keep_original: bool):
        self.ctx = ctx
        self.keep_original = keep_original
        self._modules: List[nn.Module] = []
        self._hooks = []
        self._configs = []  # (config, previous _experts_implementation)
        self.undone = False

    @property
    def module_names(self) -> List[str]:
        return [m._moetune_state.name for m in self._modules]

    @property
    def families(self) -> List[str]:
        return sorted({m._moetune_state.family for m in self._modules})

    @property
    def packed_bytes(self) -> int:
        """Host bytes held by the engine for all patched experts."""
        return sum(m._moetune_state.engine.packed_bytes for m in self._modules)

    @property
    def original_bytes(self) -> int:
        """Host bytes held to make undo() possible (0 with keep_original=False)."""
        return sum(p.numel() * p.element_size() for m in self._modules
                   for p in (m._moetune_state.originals or {}).values())

    def __repr__(self) -> str:
        state = "undone" if self.undone else f"{len(self._modules)} experts modules ({', '.join(self.families)})"
        return f"moetune.hf.PatchHandle({state})"

    def undo(self) -> None:
        """Restore the original expert weights (the same Parameter objects), the
        model's experts implementation and PEFT's own wrapper class."""
        if self.undone:
            return
        if not self.keep_original:
            raise RuntimeError("moetune: patch(..., keep_original=False) dropped the original expert weights; "
                               "undo() is impossible (reload the model instead)")
        for h in self._hooks:
            h.remove()
        for m in self._modules:
            st = m._moetune_state
            _peft.release(st.switched)
            for pname, p in st.originals.items():
                setattr(m, pname, p)
            st.engine = None
            st.originals = None
            del m._moetune_state
        for cfg, prev in self._configs:
            cfg._experts_implementation = prev
        self._modules, self._hooks, self._configs = [], [], []
        self.undone = True


def _find_experts(model: nn.Module):
    supported = _supported_classes()
    found, unsupported, seen = [], [], set()
    for pname, parent in model.named_modules():
        if _peft.is_param_wrapper(parent):
            continue  # the edge wrapper -> base_layer is inside a chain already walked
        for attr, child in parent.named_children():
            base = child
            while _peft.is_param_wrapper(base):
                base = base.base_layer
            if id(base) in seen:
                continue
            qual = f"{pname}.{attr}" if pname else attr
            if type(base) in supported:
                seen.add(id(base))
                found.append((qual, parent, attr, base, supported[type(base)]))
            elif hasattr(base, "has_gate") and hasattr(base, "is_transposed") and hasattr(base, "config"):
                seen.add(id(base))
                unsupported.append(f"{qual} ({type(base).__name__})")
    return found, unsupported


def find_experts(model: nn.Module):
    """[(qualified name, parent, attribute, experts module, family)] of every
    routed-experts module; a clear error if there is none or if any is of a
    class the engine does not support (never a silent partial patch)."""
    found, unsupported = _find_experts(model)
    if not found:
        msg = (f"moetune: no supported MoE experts module found in {type(model).__name__}. "
               f"Supported families: {_supported_text()}.")
        if unsupported:
            msg += f" Found experts modules of unsupported classes: {', '.join(unsupported)}."
        raise ValueError(msg)
    if unsupported:
        raise ValueError(f"moetune: model has experts modules of unsupported classes ({', '.join(unsupported)}); "
                         f"supported families: {_supported_text()}")
    return found


def attach(handle: PatchHandle, qual: str, parent: nn.Module, attr: str, m: nn.Module, family: str,
           engine: MoEExperts, originals: Optional[Dict[str, nn.Parameter]] = None) -> None:
    """Hands experts module m to `engine` (already loaded): the one way both
    patch() and load_model() attach an engine. m's expert parameters become
    shape-only placeholders; PEFT wrappers around m are adopted now and at
    every call of its parent."""
    layout = _layout(family)
    gu = m.gate_up_proj
    I = (gu.shape[2] if layout.transposed else gu.shape[1]) // 2
    st = _ExpertsState(qual, family, layout, engine, weakref.ref(parent), attr, I, originals)
    m._moetune_state = st
    handle._modules.append(m)
    for pname in layout.param_names:
        setattr(m, pname, held_parameter(getattr(m, pname)))
    st.adopt(m)  # patch after get_peft_model
    handle._hooks.append(parent.register_forward_pre_hook(
        functools.partial(_adopt_hook, weakref.ref(st), weakref.ref(m))))


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


def patch(model: nn.Module, ctx: Optional[Context] = None, num_threads: Optional[int] = None, *,
          keep_original: bool = True, backward_weights: str = "repack", activations: str = "save",
          weight_format: str = "bf16", group_size: Optional[int] = None) -> PatchHandle:
    """Run every routed-experts module of `model` on the moetune engine.

    model: a transformers model (or a PEFT model wrapping one), weights loaded.
    ctx: an engine Context to share; else one is made with `num_threads`.
    keep_original: keep the original expert Parameters (moved to CPU, not
      registered in the model) so that `handle.undo()` can restore them. Costs
      one extra copy of all expert weights in host RAM on top of the engine's
      packed copy; pass False to free them (undo() then raises).
    backward_weights / activations / weight_format / group_size: passed to
      moetune.MoEExperts (weight_format "int8" / "int4" quantizes the frozen
      experts at patch time).

    After patching, each experts module's gate_up_proj / down_proj are
    shape-only placeholders (EngineHeldTensor, one element of storage, never
    moved by model.to(...)). LoRA is PEFT's: call peft.get_peft_model(...,
    LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"], lora_dropout=0.0)) before or after patch().
    To build a model with its experts streamed straight into the engine, see
    moetune.load_model.
    """
    found = find_experts(model)
    for qual, _, _, m, family in found:
        _check_module(qual, m, _layout(family))
    if ctx is None:
        ctx = Context(num_threads=num_threads)

    handle = PatchHandle(ctx, keep_original)
    try:
        for qual, parent, attr, m, family in found:
            layout = _layout(family)
            params = {pname: getattr(m, pname) for pname in layout.param_names}
            gu, down = params["gate_up_proj"], params["down_proj"]
            with torch.no_grad():
                if layout.transposed:  # the engine takes the [out, in] (nn.Linear) orientation
                    gu, down = gu.transpose(1, 2), down.transpose(1, 2)
                gate, up = _split_gate_up(gu, layout, 1)
                kw = {}
                if layout.bias:
                    kw["gate_bias"], kw["up_bias"] = _split_gate_up(params["gate_up_proj_bias"], layout, 1)
                    kw["down_bias"] = params["down_proj_bias"]
                if layout.activation != "swiglu":
                    kw.update(activation=layout.activation, alpha=float(m.alpha), limit=float(m.limit))
                engine = MoEExperts(ctx, gate, up, down, backward_weights=backward_weights,
                                    activations=activations, weight_format=weight_format,
                                    group_size=group_size, **kw)
                del gu, down, gate, up, kw
            originals = None
            if keep_original:
                originals = {}
                for pname, p in params.items():
                    if p.device.type != "cpu":
                        p = nn.Parameter(p.detach().to("cpu"), requires_grad=p.requires_grad)
                    originals[pname] = p
            del params
            attach(handle, qual, parent, attr, m, family, engine, originals)
        select_implementation(handle, [f[3] for f in found])
    except BaseException:
        if keep_original:
            handle.undo()
        raise
    return handle
