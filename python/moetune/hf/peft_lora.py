"""PEFT `target_parameters` LoRA on engine-held experts.

PEFT (>= 0.17) implements LoRA on a 3-D experts parameter with
`peft.tuners.lora.layer.ParamWrapper`: one wrapper per targeted parameter,
nested when several parameters of one module are targeted
(`ParamWrapper(ParamWrapper(experts, "gate_up_proj"), "down_proj")` or the
reverse order). Its forward registers a torch parametrization that
materialises `W + scaling * B @ A` for the whole expert stack on every call.
That is what we must avoid: the weights live in the engine and the engine
applies the low-rank factors itself.

Layout PEFT 0.21 uses for a 3-D parameter of shape [E, out, in] (the
HF "not transposed" layout; PEFT swaps its in/out features for it):

    lora_A[adapter].weight : [E * r, in]    rows e*r .. e*r+r-1 belong to expert e
    lora_B[adapter].weight : [out, r * E]   column j*E + e is rank j of expert e (interleaved)

(see ParamWrapper.get_delta_factors). The engine wants A [E, r, in] and
B [E, out, r]; both are *views* of PEFT's parameters:

    A = lora_A.weight.view(E, r, in)
    B = lora_B.weight.view(out, r, E).permute(2, 0, 1)

so autograd sends the engine's gradients straight to PEFT's own parameters
(the engine copies the small factors to contiguous host buffers per call).
"""

from __future__ import annotations

import torch
from torch import nn

from moetune.hf.families import LORA_PARAMS

try:  # peft is optional
    from peft.tuners.lora.layer import ParamWrapper
except Exception:  # pragma: no cover - peft missing or too old
    ParamWrapper = None

if ParamWrapper is not None:

    class EngineParamWrapper(ParamWrapper):
        """A PEFT ParamWrapper whose wrapped experts run on the moetune engine.

        moetune.hf.patch switches the class of PEFT's wrappers around patched
        experts to this subclass (and undo() switches it back). It is still a
        ParamWrapper / LoraLayer for PEFT (adapters, saving, set_adapter,
        enable/disable all work); only the forward differs: no parametrization,
        no W + dW. The moetune experts implementation reads this wrapper's
        LoRA factors and hands them to the engine.
        """

        def forward(self, x, *args, **kwargs):
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("moetune: mixed adapter batches are not supported on engine-held experts")
            if self.merged:
                raise NotImplementedError("moetune: merged adapters on engine-held experts are not supported")
            return self.base_layer(x, *args, **kwargs)

        def merge(self, *args, **kwargs):
            raise NotImplementedError(
                "moetune: cannot merge a LoRA into expert weights held by the moetune engine; "
                "call handle.undo() first (with keep_original=True), then merge with PEFT."
            )
else:
    EngineParamWrapper = None


def is_param_wrapper(m: nn.Module) -> bool:
    return ParamWrapper is not None and isinstance(m, ParamWrapper)


def wrapper_chain(top: nn.Module, experts: nn.Module):
    """The PEFT ParamWrappers between `top` (what the parent module calls) and `experts`."""
    chain = []
    m = top
    while m is not experts:
        if not is_param_wrapper(m):
            raise RuntimeError(
                f"moetune: patched experts are wrapped by an unsupported module {type(m).__name__}; "
                "only PEFT LoRA target_parameters (ParamWrapper) wrappers are supported"
            )
        if m.parameter_name not in LORA_PARAMS:
            raise NotImplementedError(
                f"moetune: PEFT targets experts parameter {m.parameter_name!r}; only {LORA_PARAMS} are supported"
            )
        chain.append(m)
        m = m.base_layer
    return chain


def adopt(chain) -> list:
    """Switch plain ParamWrappers to EngineParamWrapper; returns those switched."""
    switched = []
    for w in chain:
        if type(w) is ParamWrapper:
            w.__class__ = EngineParamWrapper
            switched.append(w)
        elif not isinstance(w, EngineParamWrapper):
            raise NotImplementedError(
                f"moetune: unsupported ParamWrapper subclass {type(w).__name__} around engine-held experts"
            )
    return switched


def release(wrappers) -> None:
    for w in wrappers:
        if type(w) is EngineParamWrapper:
            w.__class__ = ParamWrapper


def lora_factors(w, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A [E, r, in], B [E, out, r], scaling) of w's active adapter, as views; None if inactive.

    transposed: the experts store [E, in, out] (gpt-oss; `is_transposed=True`).
    PEFT then keeps in/out as they are (no swap) and its delta is
    einsum("o r e, e r i -> e i o", B, A) = (B_e A_e)^T per expert, which
    `x @ (W + delta)` applies as B_e (A_e x): the same A / B views as above.
    """
    if w.merged:
        raise NotImplementedError("moetune: merged adapters on engine-held experts are not supported")
    if w.disable_adapters:
        return None
    active = [a for a in w.active_adapters if a in w.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise NotImplementedError(
            f"moetune: {len(active)} active LoRA adapters on {w.parameter_name}; only one active adapter is supported"
        )
    a = active[0]
    if not isinstance(w.lora_dropout[a], nn.Identity):
        raise NotImplementedError("moetune: lora_dropout > 0 on experts parameters is not supported")
    if w.lora_bias.get(a, False):
        raise NotImplementedError("moetune: lora_bias on experts parameters is not supported")
    if w._did_swap_in_out_features == transposed:
        raise NotImplementedError(
            f"moetune: PEFT's in/out orientation of {w.parameter_name} does not match the experts layout "
            f"(transposed={transposed}); unsupported PEFT version?"
        )
    E, r = w.num_experts, w.r[a]
    A = w.lora_A[a].weight
    B = w.lora_B[a].weight
    A = A.view(E, r, A.shape[-1])
    B = B.view(B.shape[0], r, E).permute(2, 0, 1)
    return A, B, float(w.scaling[a])
