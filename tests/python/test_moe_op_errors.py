"""Tests that moetune.moe_experts / MoEExperts reject bad inputs (and keep working after)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from op_cases import (
    _BAD_NAMES,
    ALL,
    BAD_CASE,
    BF16,
    F32,
    I32,
    I64,
    Case,
    Result,
    _bad_calls,
    _bad_setup,
    _contains_number,
    _contains_shape,
    _noncontig,
    _still_works,
    compare,
    fresh_lora,
    get_ctx,
    make_inputs,
    moetune,
    reference,
)


@pytest.mark.parametrize("ids_dtype", [I64, I32])
@pytest.mark.parametrize("bad_id", ["E", 130, -1])
def test_bad_expert_id(bad_id, ids_dtype):
    inp, experts, params, lw, good = _bad_setup()
    bad_id = BAD_CASE.E if bad_id == "E" else bad_id
    ids = inp.ids.clone().to(ids_dtype)
    ids[3, 1] = bad_id
    with pytest.raises(ValueError, match="topk_ids") as ei:
        moetune.moe_experts(experts, inp.x, ids, inp.w, lora=lw)
    assert _contains_number(str(ei.value), bad_id), f"message does not name the id {bad_id}: {ei.value}"
    _still_works(inp, experts, lw, good)


def test_bad_expert_id_with_grad():
    """Rejected inside an autograd graph, too (nothing half-recorded)."""
    inp, experts, params, lw, good = _bad_setup()
    ids = inp.ids.clone()
    ids[0, 0] = 130
    x = inp.x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="topk_ids") as ei:
        moetune.moe_experts(experts, x, ids, inp.w.clone().requires_grad_(True), lora=lw)
    assert _contains_number(str(ei.value), 130)
    _still_works(inp, experts, lw, good)


@pytest.mark.parametrize("which", _BAD_NAMES)
def test_bad_input_rejected(which):
    inp, experts, params, lw, good = _bad_setup()
    thunk, name_re, shape = _bad_calls(inp, params)[which]
    kw = dict(x=inp.x, topk_ids=inp.ids, topk_weights=inp.w, lora=lw, expert_mask=None)
    with pytest.raises(ValueError, match=name_re) as ei:
        kw.update(thunk())
        moetune.moe_experts(
            experts, kw["x"], kw["topk_ids"], kw["topk_weights"], lora=kw["lora"], expert_mask=kw["expert_mask"]
        )
    if shape is not None:
        assert _contains_shape(str(ei.value), shape), f"message lacks the actual shape {shape}: {ei.value}"
    _still_works(inp, experts, lw, good)


@pytest.mark.parametrize(
    "which", ["gate_2d", "up_shape", "down_shape", "down_experts", "int_dtype", "backward_weights", "activations"]
)
def test_bad_experts_rejected(which):
    inp = make_inputs(BAD_CASE, 72)
    E, I, H = BAD_CASE.E, BAD_CASE.I, BAD_CASE.H
    g, u, d, kw = inp.gate, inp.up, inp.down, {}
    name = {
        "gate_2d": "gate_proj",
        "up_shape": "up_proj",
        "down_shape": "down_proj",
        "down_experts": "down_proj",
        "int_dtype": "up_proj",
        "backward_weights": "backward_weights",
        "activations": "activations",
    }[which]
    if which == "gate_2d":
        g = g[0]
    elif which == "up_shape":
        u = torch.zeros(E, I + 1, H, dtype=BF16)
    elif which == "down_shape":
        d = torch.zeros(E, H, I + 1, dtype=BF16)
    elif which == "down_experts":
        d = torch.zeros(E - 1, H, I, dtype=BF16)
    elif which == "int_dtype":
        u = u.to(torch.int16)
    else:
        kw[which] = "bogus"
    with pytest.raises(ValueError, match=name):
        moetune.MoEExperts(get_ctx(), g, u, d, **kw)


@pytest.mark.parametrize("which", ["x", "topk_ids", "topk_weights", "lora.gate.A", "lora.down.B", "gate_proj"])
def test_non_contiguous_inputs(which):
    """Either accepted (and then correct) or rejected with a ValueError naming the tensor."""
    case = Case("nc", 10, 40, 24, 6, 3, 4, ALL, F32, I64, F32)
    inp = make_inputs(case, 81)
    ref = reference(inp)
    name_re = {
        "x": r"\bx\b",
        "topk_ids": "topk_ids",
        "topk_weights": "topk_weights",
        "lora.gate.A": "gate",
        "lora.down.B": "down",
        "gate_proj": "gate_proj",
    }[which]
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    ids = inp.ids
    params, _ = fresh_lora(inp, ALL)
    leaves = {p: list(params[p]) for p in ALL}
    gate = inp.gate
    if which == "x":
        x = _noncontig(inp.x, "strided").requires_grad_(True)
    elif which == "topk_ids":
        ids = _noncontig(inp.ids, "strided")
    elif which == "topk_weights":
        w = _noncontig(inp.w, "transposed").requires_grad_(True)
    elif which == "lora.gate.A":
        leaves["gate"][0] = nn.Parameter(_noncontig(params["gate"][0].detach(), "transposed"))
    elif which == "lora.down.B":
        leaves["down"][1] = nn.Parameter(_noncontig(params["down"][1].detach(), "strided"))
    elif which == "gate_proj":
        gate = _noncontig(inp.gate, "transposed")
    for lst in leaves.values():
        assert isinstance(lst[0], nn.Parameter) and isinstance(lst[1], nn.Parameter)
    if which == "lora.gate.A":
        assert not leaves["gate"][0].is_contiguous()
    lw = moetune.LoraWeights(**{p: tuple(leaves[p]) for p in ALL}, scaling=inp.scaling)
    try:
        experts = moetune.MoEExperts(get_ctx(), gate, inp.up, inp.down)
        out = moetune.moe_experts(experts, x, ids, w, lora=lw)
    except ValueError as e:
        assert re.search(name_re, str(e)), f"rejected non-contiguous {which} without naming it: {e}"
        return
    out.backward(inp.dout)
    res = Result(out.detach(), x.grad, w.grad, {p: leaves[p][0].grad for p in ALL}, {p: leaves[p][1].grad for p in ALL})
    compare(res, ref, inp)
