"""moetune.hf.patch: bookkeeping, undo, placeholders and refusals (CPU, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from test_hf_exactness import LORA, ctx  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
from moetune.hf import EngineHeldTensor  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402


def qwen3_moe(seed=0):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        norm_topk_prob=True,
    )
    torch.manual_seed(seed)
    m = transformers.Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
    return m


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"]


def test_model_without_moe_experts_is_refused():
    cfg = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    dense = transformers.Qwen3ForCausalLM(cfg)
    with pytest.raises(ValueError) as e:
        moetune.hf.patch(dense, ctx=ctx())
    for family in moetune.hf.patching.SUPPORTED_FAMILIES:
        assert family in str(e.value)
    with pytest.raises(ValueError, match="Supported families"):
        moetune.hf.patch(torch.nn.Linear(4, 4), ctx=ctx())


def test_unsupported_experts_class_is_refused():
    # An experts class of transformers' registry that the engine does not compute (no gate: up -> act -> down).
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class UngatedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up_proj = torch.nn.Parameter(torch.zeros(4, 32, 64))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 64, 32))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = UngatedExperts(transformers.Qwen3MoeConfig())
    with pytest.raises(ValueError, match="unsupported classes.*UngatedExperts"):
        moetune.hf.patch(model, ctx=ctx())


def test_gpt_oss_with_mismatched_layout_is_refused():
    # gpt-oss is supported with its own layout descriptor; a GptOssExperts whose flags say otherwise is refused
    # by name, before anything is moved.
    cfg = transformers.GptOssConfig(
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        layer_types=["full_attention"],
    )
    model = transformers.GptOssForCausalLM(cfg)
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = False
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.*is_transposed=False"):
        moetune.hf.patch(model, ctx=ctx())
    experts.is_transposed = True
    experts.limit = float("nan")
    with pytest.raises(ValueError, match="limit=nan"):
        moetune.hf.patch(model, ctx=ctx())
    assert not isinstance(experts.gate_up_proj, EngineHeldTensor)


def test_placeholders_and_undo_restore_exactly():
    model = qwen3_moe()
    ref = copy.deepcopy(model)
    impl_before = model.config._experts_implementation
    originals = {(id(m), n): getattr(m, n) for m in experts_modules(model) for n in ("gate_up_proj", "down_proj")}
    full = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    handle = moetune.hf.patch(model, ctx=ctx())
    assert len(handle.module_names) == 2 and handle.families == ["Qwen3-MoE"]
    assert model.config._experts_implementation == "moetune"
    for m in experts_modules(model):
        for n in ("gate_up_proj", "down_proj"):
            p = getattr(m, n)
            assert isinstance(p, EngineHeldTensor) and isinstance(p, torch.nn.Parameter)
            assert p.shape == originals[(id(m), n)].shape and p.stride() == (0, 0, 0)
            assert not p.requires_grad
            assert p.to("meta") is p and p.cuda() is p and p.bfloat16() is p  # never moved / materialised
            with pytest.raises(RuntimeError, match="held by the moetune engine"):
                p[0]
    assert sum(p.numel() for p in model.parameters()) == full  # shapes kept for reporting
    assert handle.packed_bytes > 0 and handle.original_bytes == sum(p.numel() * 4 for p in originals.values())
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = ref(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()) < 8 * 2.0**-8
    handle.undo()
    assert model.config._experts_implementation == impl_before
    for m in experts_modules(model):
        assert experts_state(m) is None
        for n in ("gate_up_proj", "down_proj"):
            assert getattr(m, n) is originals[(id(m), n)]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    handle.undo()  # idempotent


def test_undo_after_peft_restores_peft_wrappers():
    model = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(**LORA))
    handle = moetune.hf.patch(model, ctx=ctx())
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4 and all(type(w) is not ParamWrapper for w in wrappers)
    ids = torch.randint(0, 128, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(NotImplementedError, match="merge"):
        model.merge_and_unload()
    handle.undo()
    assert all(type(w) is ParamWrapper for w in wrappers)
    model(input_ids=ids, labels=ids).loss.backward()  # PEFT's own path works again


def test_patch_twice_and_keep_original_false():
    model = qwen3_moe()
    handle = moetune.hf.patch(model, ctx=ctx(), keep_original=False)
    assert handle.original_bytes == 0
    with pytest.raises(ValueError, match="already held"):
        moetune.hf.patch(model, ctx=ctx())
    with pytest.raises(RuntimeError, match="keep_original=False"):
        handle.undo()


def test_lora_dropout_on_experts_is_refused():
    # PEFT itself refuses lora_dropout > 0 with target_parameters at get_peft_model time ...
    with pytest.raises(ValueError, match="lora_dropout"):
        peft.get_peft_model(qwen3_moe(), peft.LoraConfig(**{**LORA, "lora_dropout": 0.1}))
    # ... and if a dropout module is put there anyway, the engine path refuses it too.
    model = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(**LORA))
    moetune.hf.patch(model, ctx=ctx())
    next(m for m in model.modules() if isinstance(m, ParamWrapper)).lora_dropout["default"] = torch.nn.Dropout(0.1)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        model(input_ids=torch.randint(0, 128, (1, 4)))


def test_unpatched_module_on_moetune_config_raises():
    model = qwen3_moe()
    handle = moetune.hf.patch(model, ctx=ctx())
    stray = type(experts_modules(model)[0])(model.config)  # built later from the same config
    with pytest.raises(RuntimeError, match="not patched"):
        stray(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    handle.undo()
