"""Everything moetune knows per MoE family, in one table (`FAMILIES`).

A family is one transformers experts class, decorated with
`@use_experts_implementation`: its routed experts live in a fused
`gate_up_proj` and a `down_proj` parameter (the names transformers' experts
interface reads on every such class, so they are the same for all families).
Everything that differs between families is a field of its `Family` entry:

* the class (module path + name) and the config it is sized from (the
  `config.model_type` and the config attributes giving E, H, I);
* the storage layout, i.e. the decorator's flags: `transposed`
  (`is_transposed`: gate_up_proj [E, H, 2I], down_proj [E, I, H], applied as
  x @ W, instead of [E, 2I, H], [E, H, I]), `interleaved` (`not
  is_concatenated`: gate/up alternate along 2I instead of gate rows first,
  then up) and `bias` (`has_bias`: gate_up_proj_bias [E, 2I] in the same
  gate/up order, down_proj_bias [E, H]);
* the activation: "swiglu" (silu(g) * u; the config's hidden_act must be
  silu) or "gpt_oss" (the clamped SwiGLU, with the constants the module holds
  as attributes, `constants`);
* the per-expert checkpoint key names, where transformers' conversion rules
  cannot be read (`moetune.hf.keymap` prefers those rules; a test checks both
  agree).

The engine takes every projection in the nn.Linear [out, in] orientation:
gate, up [E, I, H], down [E, H, I] (one expert: [I, H], [H, I]).
`Family.to_engine` maps a family's storage onto it (views, no copy) and
`Family.from_engine` back, bit-exactly; patching, loading, merging and the
PEFT mapping all go through these.

Adding a family = one `Family(...)` entry below. tests/python/test_hf_families.py
runs over every entry: the class imports in the installed transformers, its
decorator flags equal the entry's, its parameters have the shapes the entry
predicts, storage -> engine -> storage is bit-exact, and the class's own forward
equals the engine's math (tests/python/reference.py) on the converted weights.
The end-to-end tests (test_hf_exactness / test_load_model: a tiny model of the
family through patch, PEFT and load_model) list their families by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import torch

from moetune.options import ExpertsOptions

PROJ = ("gate", "up", "down")
# The experts' parameters as transformers' experts interface names them (every family).
GATE_UP, DOWN = "gate_up_proj", "down_proj"
WEIGHT_PARAMS = (GATE_UP, DOWN)
BIAS_PARAMS = ("gate_up_proj_bias", "down_proj_bias")
# PEFT `target_parameters` LoRA on an experts module: the two weights (biases stay frozen).
LORA_PARAMS = WEIGHT_PARAMS
# Projection -> the fused parameter that holds it.
PARAM_OF = {"gate": GATE_UP, "up": GATE_UP, "down": DOWN}
# Per-expert checkpoint names of gate, up, down as most families publish them.
STANDARD_KEY_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    """One MoE family: see the module docstring for what each field means."""

    name: str  # what users read ("Qwen3-MoE")
    module: str  # transformers module holding the experts class
    class_name: str  # the experts class
    model_type: str  # config.model_type of its models
    config_dims: tuple[str, str, str]  # config attributes the class takes E, H, I from
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    activation: str = "swiglu"  # the engine's activation name
    constants: tuple[str, ...] = ()  # module attributes = the engine's keywords for the activation's constants
    key_names: tuple[str, str, str] = STANDARD_KEY_NAMES  # per-expert checkpoint names of gate, up, down
    key_renames: tuple[tuple[str, str], ...] = ()  # (checkpoint substring, model substring)

    # ---- the class ----
    def experts_class(self) -> type:
        """The experts class in the installed transformers (ImportError / AttributeError if absent)."""
        return getattr(importlib.import_module(self.module), self.class_name)

    @property
    def decorator_flags(self) -> dict[str, bool]:
        """The `@use_experts_implementation` attributes an instance of the class must carry."""
        return {
            "has_gate": True,
            "has_bias": self.bias,
            "is_transposed": self.transposed,
            "is_concatenated": not self.interleaved,
        }

    # ---- parameters and shapes ----
    @property
    def param_names(self) -> tuple[str, ...]:
        """The module's expert parameters that the engine takes over."""
        return WEIGHT_PARAMS + (BIAS_PARAMS if self.bias else ())

    def dims(self, gate_up_shape) -> tuple[int, int, int]:
        """(E, H, I) read off a gate_up_proj shape (I rounded down where 2I is odd:
        `param_shapes` then disagrees with the module)."""
        if self.transposed:
            E, H, I2 = gate_up_shape
        else:
            E, I2, H = gate_up_shape
        return E, H, I2 // 2

    def param_shapes(self, E: int, H: int, I: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of `param_names` for E experts, hidden H, intermediate I."""
        out = {
            GATE_UP: (E, H, 2 * I) if self.transposed else (E, 2 * I, H),
            DOWN: (E, I, H) if self.transposed else (E, H, I),
        }
        if self.bias:
            out.update({BIAS_PARAMS[0]: (E, 2 * I), BIAS_PARAMS[1]: (E, H)})
        return out

    @property
    def shapes_text(self) -> str:
        return "[E, H, 2I] / [E, I, H]" if self.transposed else "[E, 2I, H] / [E, H, I]"

    @property
    def per_expert_keys(self) -> bool:
        """Whether checkpoints may hold it per expert ([out, in] tensors, no biases).
        Only the default layout: the others are published fused."""
        return not (self.transposed or self.interleaved or self.bias or self.activation != "swiglu")

    # ---- storage <-> engine ([out, in]) ----
    def engine_view(self, t: torch.Tensor) -> torch.Tensor:
        """A stored weight ([..., E,] in, out when transposed) as [..., out, in] (a view)."""
        return t.transpose(-1, -2) if self.transposed else t

    def storage_view(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of engine_view: an [..., out, in] weight in the family's orientation."""
        return t.transpose(-1, -2) if self.transposed else t

    def split_gate_up(self, t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) views of a fused gate/up tensor along `dim` (its 2I axis)."""
        dim = dim % t.dim()
        n = t.shape[dim]
        if self.interleaved:
            idx = [slice(None)] * t.dim()
            idx[dim] = slice(0, None, 2)
            gate = t[tuple(idx)]
            idx[dim] = slice(1, None, 2)
            return gate, t[tuple(idx)]
        return t.narrow(dim, 0, n // 2), t.narrow(dim, n // 2, n // 2)

    def join_gate_up(self, gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
        """The inverse of split_gate_up: one fused tensor (a new one)."""
        if self.interleaved:
            dim = dim % gate.dim()
            return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)
        return torch.cat((gate, up), dim=dim)

    def to_engine(self, gate_up: torch.Tensor, down: torch.Tensor):
        """(gate, up, down) in the engine's [out, in] orientation, as views, of the
        stored gate_up_proj / down_proj: whole stacks ([E, ...]) or one expert's rows."""
        return (*self.split_gate_up(self.engine_view(gate_up), -2), self.engine_view(down))

    def from_engine(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        """(gate_up_proj, down_proj) in the family's storage layout: the inverse of to_engine."""
        return self.storage_view(self.join_gate_up(gate, up, -2)), self.storage_view(down)

    def engine_biases(self, gate_up_bias: torch.Tensor, down_bias: torch.Tensor):
        """(gate, up, down) biases ([E, I], [E, I], [E, H]) of the stored ones, as views."""
        return (*self.split_gate_up(gate_up_bias, -1), down_bias)

    # ---- activation ----
    def engine_options(self, options: ExpertsOptions, module) -> ExpertsOptions:
        """`options` (the user's) with this family's activation and its constants read off
        `module`: the activation is a fact of the model, never the caller's choice."""
        return options.replace(activation=self.activation, **{c: float(getattr(module, c)) for c in self.constants})

    def activation_problems(self, module) -> list[str]:
        """Why the engine's activation would not be `module`'s ([] if it is)."""
        if self.activation == "swiglu":
            act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            return [] if act in ("silu", "swish") else [f"hidden_act={act!r} (the engine computes SwiGLU)"]
        problems = []
        for attr in self.constants:
            v = getattr(module, attr, None)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{attr}={v!r} (the clamped SwiGLU needs a finite number)")
        return problems

    # ---- checkpoints ----
    @property
    def proj_names(self) -> dict[str, str]:
        """ "gate" / "up" / "down" -> the per-expert checkpoint name of that projection."""
        return dict(zip(PROJ, self.key_names))


FAMILIES: tuple[Family, ...] = (
    Family(
        "Qwen3-MoE",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeExperts",
        "qwen3_moe",
        ("num_experts", "hidden_size", "moe_intermediate_size"),
    ),
    Family(
        "Mixtral",
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralExperts",
        "mixtral",
        ("num_local_experts", "hidden_size", "intermediate_size"),
        key_names=("w1", "w3", "w2"),
        key_renames=((".block_sparse_moe.", ".mlp."),),
    ),
    Family(
        "OLMoE",
        "transformers.models.olmoe.modeling_olmoe",
        "OlmoeExperts",
        "olmoe",
        ("num_local_experts", "hidden_size", "intermediate_size"),
    ),
    Family(
        "Qwen2-MoE",
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeExperts",
        "qwen2_moe",
        ("num_experts", "hidden_size", "moe_intermediate_size"),
    ),
    Family(
        "DeepSeek-V2",
        "transformers.models.deepseek_v2.modeling_deepseek_v2",
        "DeepseekV2Experts",
        "deepseek_v2",
        ("num_experts", "hidden_size", "moe_intermediate_size"),
    ),
    Family(
        "DeepSeek-V3",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3Experts",
        "deepseek_v3",
        ("num_local_experts", "hidden_size", "moe_intermediate_size"),
    ),
    Family(
        "GLM-4-MoE",
        "transformers.models.glm4_moe.modeling_glm4_moe",
        "Glm4MoeExperts",
        "glm4_moe",
        ("num_local_experts", "hidden_size", "moe_intermediate_size"),
    ),
    # @use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True); alpha / limit
    # are module attributes (set from config.swiglu_alpha / swiglu_limit in transformers >= 5.2x,
    # constants before).
    Family(
        "gpt-oss",
        "transformers.models.gpt_oss.modeling_gpt_oss",
        "GptOssExperts",
        "gpt_oss",
        ("num_local_experts", "hidden_size", "intermediate_size"),
        transposed=True,
        interleaved=True,
        bias=True,
        activation="gpt_oss",
        constants=("alpha", "limit"),
    ),
)

# name -> (module, experts class), the form `moetune.hf.SUPPORTED_FAMILIES` has always had.
SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {f.name: (f.module, f.class_name) for f in FAMILIES}


def supported_classes() -> dict[type, Family]:
    """{experts class: family} for the families this transformers has."""
    out = {}
    for f in FAMILIES:
        try:
            out[f.experts_class()] = f
        except (ImportError, AttributeError):  # pragma: no cover - older/newer transformers
            pass
    return out


def supported_text() -> str:
    """The families and their classes, for error messages."""
    return ", ".join(f"{f.name} ({f.class_name})" for f in FAMILIES)


def by_model_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def per_expert_shapes(H: int, I: int) -> dict[str, tuple[int, int]]:
    """Shapes of one expert's per-expert checkpoint tensors ([out, in], every family)."""
    return {"gate": (I, H), "up": (I, H), "down": (H, I)}
