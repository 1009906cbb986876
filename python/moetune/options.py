"""moetune.ExpertsOptions: the typed options of one layer's routed experts.

The engine's C++ struct (csrc/engine/experts_options.h) is the one definition
of every option: its default, the names of its values and its validation.
This frozen dataclass is that struct's Python face: defaults are read from a
default-constructed engine struct, value names are the engine's enum names,
and every instance is checked by the engine's validate() when it is made. It
holds plain strings and numbers (JSON-able for cache keys and configs), is
hashable, and compares equal iff the engine would compute the same thing.

    opts = moetune.ExpertsOptions(weight_format="int4")       # group_size 128
    moetune.MoEExperts(ctx, gate, up, down, opts)
    moetune.MoEExperts(ctx, gate, up, down, weight_format="int4")  # the same
    opts.host_bytes(E, H, I)      # packed bytes of one layer, nothing allocated

Python names differ from the C++ fields in two places, kept for the existing
keyword arguments: alpha, limit (C++ swiglu_alpha, swiglu_limit).

Where the experts run (placement: CPU / GPU, a GPU memory budget) is not an
expert option: it will be a separate Python-side object next to this one.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

from moetune import _moetune_ext as _ext

# Python field -> (C++ field, its nanobind enum or None for numbers).
_FIELDS = {
    "backward_weights": ("backward_weights", _ext.BackwardWeights),
    "activations": ("activations", _ext.ActivationPolicy),
    "activation": ("activation", _ext.Activation),
    "alpha": ("swiglu_alpha", None),
    "limit": ("swiglu_limit", None),
    "weight_format": ("weight_format", _ext.WeightFormat),
    "group_size": ("group_size", None),
    "row_group": ("row_group", None),
    "dequant_path": ("dequant_path", _ext.DequantPath),
    "dequant_cols": ("dequant_cols", None),
}
_ENGINE_DEFAULTS = _ext.ExpertsOptions()


def _python_value(ext_options, name: str):
    cpp, enum = _FIELDS[name]
    v = getattr(ext_options, cpp)
    return v.name if enum is not None else v


def _default(name: str):
    return _python_value(_ENGINE_DEFAULTS, name)


def _one_of(names) -> str:
    q = [repr(n) for n in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " or " + q[-1]


def _enum_value(enum, name: str, value):
    if isinstance(value, enum):
        return value
    if isinstance(value, str) and value in enum.__members__:
        return enum[value]
    raise ValueError(f"{name} must be {_one_of(enum.__members__)}, got {value!r}")


def _number(name: str, value, kind):
    try:
        return float(value) if kind is float else operator.index(value)
    except (TypeError, ValueError):
        what = "a number" if kind is float else "an integer"
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class ExpertsOptions:
    """Options of one MoE layer's routed experts (defaults: the engine's).

    backward_weights: "repack" (1x weight memory: backward tasks transpose
      slices of the packed weights) or "transposed_copy" (a second packed
      copy, faster backward).
    activations: "save" (keep g, u from forward) or "recompute".
    activation: "swiglu" (h = silu(g) * u) or "gpt_oss" (clamped SwiGLU with
      `alpha`, `limit`: gpt-oss's swiglu_alpha / swiglu_limit).
    weight_format: "bf16", "int8" (per-output-channel), "int4" (one scale
      per group_size inputs: 32, 64 or 128; None = the format's default, 128),
      "fp8_block" (e4m3, a scale per 128 x 128 block) or "mxfp4" (e2m1, an
      e8m0 scale per 32 inputs): moetune.weight_formats() lists them.
    row_group: rows of one expert per GEMM task, a speed knob only; 0 = auto.
    dequant_path, dequant_cols: how quantized weights reach the GEMM, speed
      knobs only (results are bit-identical): "panels" (dequantize a column
      slice of dequant_cols columns, 0 = auto from the kernels' L2 budget,
      into a bf16 panel, then the bf16 GEMM) or "tiles" (the ISA's fused
      kernel dequantizes each K block right before its tiles use it: AMX;
      "panels" elsewhere).

    Values are normalised to what the engine holds (alpha, limit as float32
    values; group_size filled in), so equal options mean equal engines.
    """

    backward_weights: str = _default("backward_weights")
    activations: str = _default("activations")
    activation: str = _default("activation")
    alpha: float = _default("alpha")
    limit: float = _default("limit")
    weight_format: str = _default("weight_format")
    group_size: int | None = None
    row_group: int = _default("row_group")
    dequant_path: str = _default("dequant_path")
    dequant_cols: int = _default("dequant_cols")

    def __post_init__(self):
        engine = self._to_ext()  # parses, normalises and validates, or raises ValueError
        for name in _FIELDS:
            object.__setattr__(self, name, _python_value(engine, name))

    # ---- the one conversion to / from the engine's struct ----
    def _to_ext(self):
        """The engine's ExpertsOptions for these values (ValueError if invalid)."""
        o = _ext.ExpertsOptions()
        for name, (cpp, enum) in _FIELDS.items():
            value = getattr(self, name)
            if enum is not None:
                value = _enum_value(enum, name, value)
            elif name == "group_size" and value is None:
                value = _ext.default_group_size(o.weight_format)  # weight_format is set before it
            else:
                value = _number(name, value, float if name in ("alpha", "limit") else int)
            try:
                setattr(o, cpp, value)
            except (TypeError, OverflowError):
                raise ValueError(f"{name} out of range: {value!r}") from None
        o.validate()
        return o

    @classmethod
    def _from_ext(cls, ext_options) -> ExpertsOptions:
        return cls(**{name: _python_value(ext_options, name) for name in _FIELDS})

    # ---- construction helpers ----
    @classmethod
    def resolve(cls, options: ExpertsOptions | Mapping[str, Any] | None = None, **overrides) -> ExpertsOptions:
        """options (an ExpertsOptions, a dict of fields, or None for the
        defaults) with keyword overrides applied, e.g. what
        MoEExperts(..., options, weight_format="int4") is given."""
        if options is None:
            base = cls()
        elif isinstance(options, ExpertsOptions):
            base = options
        elif isinstance(options, Mapping):
            base = cls.from_dict(options)
        else:
            raise TypeError(f"options must be a moetune.ExpertsOptions, a dict or None, got {type(options).__name__}")
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpertsOptions:
        _check_names(d)
        return cls(**d)

    def replace(self, **changes) -> ExpertsOptions:
        """A copy with some fields changed. Changing weight_format without
        giving group_size resets group_size to the new format's default."""
        _check_names(changes)
        if (
            "weight_format" in changes
            and "group_size" not in changes
            and changes["weight_format"] != self.weight_format
        ):
            changes["group_size"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain str / int / float (for cache keys and configs)."""
        return dataclasses.asdict(self)

    def host_bytes(self, num_experts: int, hidden_size: int, intermediate_size: int, *, biases: bool = False) -> int:
        """Host bytes the engine allocates for one layer's experts with these
        options (nothing is allocated): the packed / quantized weights, plus
        all three fp32 biases if `biases`. Exactly MoEExperts.packed_bytes of
        such a layer."""
        n = _ext.experts_host_bytes(int(num_experts), int(hidden_size), int(intermediate_size), self._to_ext())
        if biases:
            n += _ext.experts_bias_bytes(int(num_experts), int(hidden_size), int(intermediate_size))
        return n


def _check_names(d: Mapping[str, Any]) -> None:
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown expert option(s) {', '.join(unknown)}; the options are {', '.join(_FIELDS)}")
