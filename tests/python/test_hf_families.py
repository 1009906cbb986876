"""Every entry of the family table (moetune.hf.families) against the installed
transformers, and what adding a family takes.

Per entry (no per-family code here: a new entry is checked as soon as it exists):
* complete: the experts class imports, its config (AutoConfig.for_model(model_type))
  sizes it from the entry's config_dims, and its parameters are exactly the
  entry's param_names with the shapes param_shapes(E, H, I) predicts;
* consistent: the class's `@use_experts_implementation` attributes (has_gate,
  has_bias, is_transposed, is_concatenated) equal the entry's layout flags, the
  activation's constants are on the module, and the per-expert checkpoint key
  names equal transformers' own conversion rules;
* storage -> engine -> storage is bit-exact, the engine side as views;
* the conversion is the class's math: its own (eager) forward equals the
  reference experts (tests/python/reference.py) on the converted weights.

Adding a family = one `Family(...)` entry in FAMILIES; test_a_new_family_is_one_entry
shows it with a made-up experts class (transposed, concatenated gate/up: a
layout no shipped family has) that patch() then runs on the engine.

Tolerances: the forward comparison is fp32 against fp32 with dot products of
at most H = 24 terms, three chained products: |d| <= 1e-5 max|ref| (about 100
times the worst rounding, and 1e4 times smaller than any layout mix-up, which
moves outputs by O(max|ref|)). The engine comparison: bf16 operands, at most
c = 8 roundings per output (test_moe_op's `out` row): |d| <= 8 u max|ref|,
u = 2^-8.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reference import moe_forward_reference  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
from moetune.hf import families, patching  # noqa: E402
from moetune.hf.families import FAMILIES, Family  # noqa: E402
from moetune.hf.keymap import key_map  # noqa: E402

U = 2.0**-8
# Distinct sizes, so that any swapped axis changes a shape: E, H, I with H != I, H != 2I.
E, H, I = 4, 24, 10
IDS = [f.name for f in FAMILIES]


def tiny_config(family: Family, **sizes):
    """The family's own config class with E, H, I set through its config_dims."""
    cfg = transformers.AutoConfig.for_model(family.model_type)
    for attr, v in zip(family.config_dims, (sizes.get("E", E), sizes.get("H", H), sizes.get("I", I))):
        setattr(cfg, attr, v)
    cfg._experts_implementation = "eager"
    return cfg


def tiny_experts(family: Family, cfg=None, seed: int = 0) -> torch.nn.Module:
    """An experts module of the family (fp32) with random weights (and biases: a quarter at +-9,
    so that clamping activations clamp)."""
    cfg = cfg or tiny_config(family)
    torch.manual_seed(seed)
    m = family.experts_class()(cfg).float()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() == 3 else 0.5))
            if name == families.BIAS_PARAMS[0]:
                pick = torch.rand(p.shape)
                p.copy_(torch.where(pick < 0.125, 9.0, torch.where(pick < 0.25, -9.0, p)))
    return m


def routing(T: int = 12, k: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    return x, ids, w


def engine_reference(family: Family, m: torch.nn.Module, x, ids, w) -> torch.Tensor:
    """The engine's math (reference.py) on the module's weights as the family maps them."""
    params = {p: getattr(m, p).detach() for p in family.param_names}
    gate, up, down = family.to_engine(params[families.GATE_UP], params[families.DOWN])
    biases = None
    if family.bias:
        biases = dict(zip(("gate", "up", "down"), family.engine_biases(*(params[b] for b in families.BIAS_PARAMS))))
    o = family.engine_options(moetune.ExpertsOptions(), m)  # what patch / load_model give the engine
    out, _ = moe_forward_reference(
        x,
        ids,
        w,
        gate.contiguous(),
        up.contiguous(),
        down.contiguous(),
        biases=biases,
        activation=o.activation,
        alpha=o.alpha,
        limit=o.limit,
    )
    return out


def test_table_has_one_entry_per_name_class_and_model_type():
    for key in ("name", "class_name", "model_type"):
        values = [getattr(f, key) for f in FAMILIES]
        assert len(set(values)) == len(values), key
    assert moetune.hf.SUPPORTED_FAMILIES == {f.name: (f.module, f.class_name) for f in FAMILIES}
    assert set(families.supported_classes().values()) == set(FAMILIES)
    for f in FAMILIES:
        assert families.by_model_type(f.model_type) is f
        assert f.activation in ("swiglu", "gpt_oss")
        assert (f.activation == "gpt_oss") == bool(f.constants)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_entry_is_complete_and_agrees_with_its_class(family):
    cls = family.experts_class()  # imports in this transformers
    cfg = tiny_config(family)
    assert cfg.model_type == family.model_type
    with torch.device("meta"):
        m = cls(cfg)
    # The decorator's attributes are the entry's layout flags.
    for attr, want in family.decorator_flags.items():
        assert getattr(m, attr) == want, attr
    assert getattr(m, "has_post_expert_norm", False) is False
    # Exactly the entry's parameters, with the predicted shapes; dims() reads E, H, I back.
    have = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert have == family.param_shapes(E, H, I)
    assert set(have) == set(family.param_names)
    assert family.dims(m.gate_up_proj.shape) == (E, H, I)
    assert set(families.LORA_PARAMS) <= set(have)
    # The activation: SwiGLU with silu, or finite constants on the module that the engine gets.
    assert family.activation_problems(m) == []
    user = moetune.ExpertsOptions(
        weight_format="int8", activation="gpt_oss" if family.activation == "swiglu" else "swiglu"
    )
    o = family.engine_options(user, m)  # the family's activation wins over the caller's; other options stay
    assert o.activation == family.activation and o.weight_format == "int8"
    for c in family.constants:
        assert getattr(o, c) == pytest.approx(float(getattr(m, c)), rel=1e-7), c
    patching.check_module("experts", m, family, loaded=False)  # what patch / load_model require


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_checkpoint_key_names_agree_with_transformers(family):
    from accelerate import init_empty_weights

    cfg = transformers.AutoConfig.for_model(family.model_type)
    cfg.num_hidden_layers = 1
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    km = key_map(model)
    if km.source != "transformers":
        # Only families published fused may lack per-expert conversion rules.
        assert not family.per_expert_keys, family.name
        return
    assert km.proj_names == family.proj_names
    probe = "model.layers.3.block_sparse_moe.experts.0.w1.weight"
    want = probe
    for a, b in family.key_renames:
        want = want.replace(a, b)
    assert km.rename(probe) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_storage_to_engine_and_back_is_bit_exact(family, dtype):
    g = torch.Generator().manual_seed(3)
    stored = {p: torch.randn(s, generator=g).to(dtype) for p, s in family.param_shapes(E, H, I).items()}
    gu, down = stored[families.GATE_UP], stored[families.DOWN]
    gate, up, d = family.to_engine(gu, down)
    assert (tuple(gate.shape), tuple(up.shape), tuple(d.shape)) == ((E, I, H), (E, I, H), (E, H, I))
    for t, src in ((gate, gu), (up, gu), (d, down)):  # views: nothing copied
        assert t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    back_gu, back_down = family.from_engine(gate, up, d)
    assert torch.equal(back_gu, gu) and torch.equal(back_down, down)
    # One expert's rows (what load_model reads) map like the stack.
    for e in range(E):
        ge, ue, de = family.to_engine(gu[e], down[e])
        assert torch.equal(ge, gate[e]) and torch.equal(ue, up[e]) and torch.equal(de, d[e])
    # The gate/up split of a fused output axis (biases, PEFT's B) and its inverse.
    if family.bias:
        gb, ub, db = family.engine_biases(*(stored[b] for b in families.BIAS_PARAMS))
        assert (tuple(gb.shape), tuple(ub.shape), tuple(db.shape)) == ((E, I), (E, I), (E, H))
        assert torch.equal(family.join_gate_up(gb, ub, -1), stored[families.BIAS_PARAMS[0]])
    B = torch.randn(E, 2 * I, 3, generator=g).to(dtype)
    assert torch.equal(family.join_gate_up(*family.split_gate_up(B, 1), 1), B)
    # The orientation alone (merge's fused delta): [E, out, in] -> storage -> back.
    W = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    assert tuple(family.storage_view(W).shape) == family.param_shapes(E, H, I)[families.GATE_UP]
    assert torch.equal(family.engine_view(family.storage_view(W)), W)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_conversion_is_the_class_math(family):
    m = tiny_experts(family)
    x, ids, w = routing()
    with torch.no_grad():
        got = m(x, ids, w)  # the class's own eager forward
    want = engine_reference(family, m, x, ids, w)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{family.name}: max|d| = {err}"
    # Each activation constant is read off the module: changed there, the class's output moves far beyond
    # the tolerance and the reference follows it (the +-9 biases put units beyond gpt-oss's limit of 7).
    for c in family.constants:
        setattr(m, c, getattr(m, c) * 1.5)
        with torch.no_grad():
            moved = m(x, ids, w)
        assert (moved - got).abs().max() > 1e-2 * want.abs().max(), c
        assert (moved - engine_reference(family, m, x, ids, w)).abs().max() <= 1e-5 * want.abs().max(), c


# ---- adding a family ----


@use_experts_implementation(is_transposed=True)
class TransposedExperts(torch.nn.Module):
    """A made-up family: x @ W storage (gate_up_proj [E, H, 2I], down_proj [E, I, H]),
    gate rows then up rows, SwiGLU, no biases. Its forward is written here the obvious way."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = torch.nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, 2 * config.moe_intermediate_size)
        )
        self.down_proj = torch.nn.Parameter(
            torch.empty(config.num_experts, config.moe_intermediate_size, config.hidden_size)
        )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                gate, up = (hidden_states[t] @ self.gate_up_proj[e]).chunk(2)
                out[t] += top_k_weights[t, j] * ((torch.nn.functional.silu(gate) * up) @ self.down_proj[e])
        return out


NEW = Family(
    "Transposed-MoE",
    __name__,
    "TransposedExperts",
    "qwen3_moe",
    ("num_experts", "hidden_size", "moe_intermediate_size"),
    transposed=True,
)


def test_a_new_family_is_one_entry(monkeypatch):
    """The entry above is all it takes: with it in the table, the checks above hold for
    the new class and patch() runs it on the engine like its own forward."""
    monkeypatch.setattr(families, "FAMILIES", FAMILIES + (NEW,))
    cfg = tiny_config(NEW)
    m = tiny_experts(NEW, cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())  # bf16-representable: the engine's operand rounding is exact
    for attr, want in NEW.decorator_flags.items():
        assert getattr(m, attr) == want, attr
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == NEW.param_shapes(E, H, I)
    x, ids, w = routing()
    x = x.bfloat16().float()
    with torch.no_grad():
        want = m(x, ids, w)
    assert (want - engine_reference(NEW, m, x, ids, w)).abs().max() <= 1e-5 * want.abs().max()

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = m
    handle = moetune.hf.patch(model, ctx=moetune.Context(num_threads=1))
    assert handle.families == ["Transposed-MoE"] and handle.module_names == ["mlp.experts"]
    assert isinstance(m.gate_up_proj, moetune.hf.EngineHeldTensor)
    with torch.no_grad():
        got = m(x, ids, w)  # dispatched to the engine now
    assert (got - want).abs().max() <= 8 * U * want.abs().max()
    handle.undo()
    with torch.no_grad():
        assert torch.equal(m(x, ids, w), want)
