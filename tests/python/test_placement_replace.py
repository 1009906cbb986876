"""Replacing a layer's experts while its placement computes on the GPU
(moetune.hf.placement.ModelPlacement.replace_engine, what expert moves between ranks use).

The GPU path runs on its CPU stand-in (PlacementOptions(device="cpu")); the same tests run on a
CUDA device where there is one (the `cuda` cases skip elsewhere). A layer whose placement was
running (residents held, planned once per step) gets a new engine with another number of experts
and other experts; from then on its results must be bit-identical to those of a placement started
fresh on the new engine, step after step (first streamed and planned per call, then resident and
planned per step), and nothing the placement kept per old expert index may survive.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from op_cases import get_ctx

import moetune
from moetune.hf.placement import ModelPlacement
from moetune.placement.cost import CostModel, LayerShape
from moetune.placement.residency import ResidencyPolicy
from moetune.placement.scheduler import Scheduler

E_FULL, H, I, R, K, T = 7, 64, 32, 4, 2, 24
OLD = [0, 1, 2, 3, 4, 5]  # the layer's experts before (6) ...
NEW = [1, 3, 5, 6]  # ... and after the replacement (4: some kept, some gone, one new)
PROJ_DIMS = {"gate": (I, H), "up": (I, H), "down": (H, I)}  # (out, in)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def full_weights():
    g = torch.Generator().manual_seed(0)
    gate, up = ((torch.randn(E_FULL, I, H, generator=g) * 0.1).bfloat16() for _ in range(2))
    down = (torch.randn(E_FULL, H, I, generator=g) * 0.1).bfloat16()
    return gate, up, down


def engine_of(experts: list[int], **kw) -> moetune.MoEExperts:
    idx = torch.tensor(experts)
    return moetune.MoEExperts(get_ctx(), *(w[idx] for w in full_weights()), **kw)


class _Module:  # stands in for a patched experts module (weak-referenced; no config: top-k 8)
    pass


class _State:  # stands in for its ExpertsState (the placement reads .engine)
    def __init__(self, engine):
        self.engine = engine


def options(plan: str, device: str, **kw) -> moetune.PlacementOptions:
    """mode "gpu" (every expert with pairs on the GPU): "streamed" with no resident budget,
    "resident" with a budget holding every expert from the first refresh (after step 1); the
    residency cadence far away, so that only the start and the replacement make it refresh."""
    budget = 0.0 if plan == "streamed" else 1.0
    base = dict(mode="gpu", device=device, gpu_budget_gib=budget, calibrate=False, warmup_steps=1, refresh_every=50)
    return moetune.PlacementOptions(**{**base, **kw})


def placement_on(engine, opts) -> tuple[ModelPlacement, _Module, _State]:
    module, state = _Module(), _State(engine)
    pl = ModelPlacement(opts, [(module, state)])
    assert pl.start() == "gpu"
    return pl, module, state


def step_inputs(E: int, step: int, device: str):
    """One call's inputs for a layer of E experts (ids local to it) and LoRA factors of its E."""
    g = torch.Generator().manual_seed(10 * E + step)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    dout = torch.randn(T, H, generator=g)
    lora = {
        p: ((torch.randn(E, R, i, generator=g) * 0.2), (torch.randn(E, o, R, generator=g) * 0.2))
        for p, (o, i) in PROJ_DIMS.items()
    }
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(x), mv(ids), mv(w), mv(dout), {p: (mv(a), mv(b)) for p, (a, b) in lora.items()}


def one_step(pl: ModelPlacement, E: int, step: int, device: str) -> dict:
    """One call of the layer with its backward, then end_step(): outputs, gradients, numbers."""
    x, ids, w, dout, lora = step_inputs(E, step, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    leaves = {p: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for p, (a, b) in lora.items()}
    out = pl.forward(0, x, ids, w, moetune.LoraWeights(**leaves, scaling=0.5))
    out.backward(dout.to(out.dtype))
    numbers = pl.end_step()
    return {
        "out": out.detach(),
        "dx": x.grad,
        "dw": w.grad,
        **{f"d{p}.{n}": t.grad for p, pair in leaves.items() for n, t in zip("AB", pair)},
        "numbers": {k: v for k, v in numbers.items() if k.startswith(("placement_experts_", "placement_tokens_"))},
        "steady": pl.scheduler.steady(0),
        "resident": pl.layers[0].gpu.resident_mask().clone(),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", ["streamed", "resident"])
def test_replaced_layer_computes_as_a_fresh_placement(plan, device):
    """After two steps on the old experts (resident plan: held and planned per step by then),
    replace_engine: the old GPU side is gone (pool freed, closed, the old engine collectable), no
    state of the old expert indices is left (steady flag, last routing, cost-model choice,
    residency averages), and three steps on the new experts give bit for bit the outputs,
    gradients and placement numbers of a placement started fresh on them."""
    opts = options(plan, device)
    old = engine_of(OLD)
    ours, _module, state = placement_on(old, opts)
    for s in range(2):
        before = one_step(ours, len(OLD), s, device)
    old_gpu = ours.layers[0].gpu
    if plan == "resident":  # the layer was steady: fully resident, planned once per step
        assert before["steady"] and bool(before["resident"].all()) and before["resident"].numel() == len(OLD)
        assert ours.runtime.store.used_bytes > 0
    assert 0 in ours.scheduler._last_counts and 0 in ours.policy._layers

    new = engine_of(NEW)
    state.engine = new
    ours.replace_engine(0, new, state)
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None, "the old engine is still referenced by the placement"
    assert old_gpu.closed and old_gpu.pool.weights is None and not old_gpu.host
    layer = ours.layers[0]
    assert layer.engine is new and layer.gpu.experts is new and layer.gpu is not old_gpu
    assert layer.gpu.fmt.num_experts == len(NEW) and layer.shape.num_experts == len(NEW)
    assert ours.runtime.store.used_bytes == 0 and not bool(layer.gpu.resident_mask().any())
    assert layer.gpu.resident_mask().numel() == len(NEW)
    assert not ours.scheduler.steady(0)
    assert 0 not in ours.scheduler._last_counts and 0 not in ours.scheduler._models
    assert 0 not in ours.policy._layers
    assert ours.scheduler.cost_model(0).shape == layer.shape
    assert {f.num_experts for f in ours.runtime._streamers} <= {len(NEW)}  # the old format's staging freed

    fresh, _, _ = placement_on(engine_of(NEW), opts)
    for s in range(3):
        a, b = one_step(ours, len(NEW), 100 + s, device), one_step(fresh, len(NEW), 100 + s, device)
        for k in b:
            if isinstance(b[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), f"step {s}: {k} differs from the fresh placement's"
            else:
                assert a[k] == b[k], f"step {s}: {k}: {a[k]} != {b[k]}"
        if s == 0:  # planned per call from this step's counts, streamed (nothing resident yet)
            assert a["numbers"]["placement_tokens_streamed"] == T * K and a["numbers"]["placement_tokens_cpu"] == 0
    if plan == "resident":  # re-planned: held again and planned per step, like the fresh one
        assert a["steady"] and bool(a["resident"].all())
        assert a["numbers"]["placement_tokens_resident"] == T * K
    else:
        assert not a["steady"] and not bool(a["resident"].any())


@pytest.mark.parametrize("device", DEVICES)
def test_replace_engine_mid_step_is_refused(device):
    """A call whose backward is still to come pins the layer: replace_engine refuses and changes
    nothing (the backward then gives the gradients of the untouched layer); once it ran, the
    replacement goes through. A forward without autograd (eval) pins nothing."""
    opts = options("streamed", device)
    old = engine_of(OLD)
    pl, _module, state = placement_on(old, opts)
    ref, _, _ = placement_on(engine_of(OLD), opts)
    x, ids, w, dout, lora = step_inputs(len(OLD), 0, device)
    lw = moetune.LoraWeights(**lora, scaling=0.5)
    xg = x.clone().requires_grad_(True)
    out = pl.forward(0, xg, ids, w, lw)
    new = engine_of(NEW)
    with pytest.raises(RuntimeError, match=r"layer 0's GPU experts cannot be released in the middle of a step"):
        pl.replace_engine(0, new, _State(new))
    assert pl.layers[0].engine is old and not pl.layers[0].gpu.closed
    with pytest.raises(RuntimeError, match="middle of a step"):
        pl.check_idle(0)
    out.backward(dout.to(out.dtype))
    pl.check_idle(0)
    xr = x.clone().requires_grad_(True)
    ref.forward(0, xr, ids, w, lw).backward(dout.to(out.dtype))
    assert torch.equal(xg.grad, xr.grad)
    with torch.no_grad():  # LoRA leaves that require grad, as in an eval of a training run
        leaves = {p: tuple(t.clone().requires_grad_(True) for t in pair) for p, pair in lora.items()}
        pl.forward(0, x, ids, w, moetune.LoraWeights(**leaves, scaling=0.5))
    pl.replace_engine(0, new, _State(new))
    assert pl.layers[0].engine is new and pl.layers[0].gpu.experts is new
    with pytest.raises(ValueError, match="was closed: its layer's experts were replaced"):
        moetune.placement.placed_moe_experts(old, x, ids, w, lw, planner=pl.planner, gpu=_closed_gpu(old, device))


def _closed_gpu(engine, device):
    from moetune.placement.experts import GpuExperts, GpuRuntime

    g = GpuExperts(GpuRuntime(device), engine, layer_key="closed")
    g.close()
    return g


def test_replace_engine_refuses_bad_arguments():
    pl, _m, _s = placement_on(engine_of(OLD), options("streamed", "cpu"))
    with pytest.raises(TypeError, match="needs a moetune.MoEExperts"):
        pl.replace_engine(0, object(), None)
    with pytest.raises(KeyError, match="no experts layer 1"):
        pl.replace_engine(1, engine_of(NEW), None)


def test_replace_engine_before_start_just_swaps():
    """Not started (or mode "cpu"): only the engine is swapped; the GPU side is built at start from it."""
    module, state = _Module(), _State(engine_of(OLD))
    pl = ModelPlacement(options("streamed", "cpu"), [(module, state)])
    new = engine_of(NEW)
    pl.replace_engine(0, new, _State(new))
    assert pl.layers[0].engine is new and pl.layers[0].gpu is None
    pl.start()
    assert pl.layers[0].gpu.experts is new and pl.layers[0].gpu.fmt.num_experts == len(NEW)


def test_cost_model_follows_the_layer_shape_and_keep_budget_is_rederived():
    """Two layers; layer 0 replaced by an engine of layer 1's shape: its cost model is then layer
    1's (one per shape, as at start), and the keep slot's budget is the largest layer's again."""
    m0, m1 = _Module(), _Module()
    s0, s1 = _State(engine_of(OLD)), _State(engine_of(NEW))
    pl = ModelPlacement(options("streamed", "cpu"), [(m0, s0), (m1, s1)])
    pl.start()
    per_expert = pl.layers[0].gpu.fmt.decoded_bytes_per_expert
    assert pl.runtime.keep.budget_bytes == len(OLD) * per_expert
    assert pl.scheduler.cost_model(0) is not pl.scheduler.cost_model(1)
    new = engine_of(NEW[::-1])
    pl.replace_engine(0, new, _State(new))
    assert pl.scheduler.cost_model(0) is pl.scheduler.cost_model(1)
    assert pl.runtime.keep.budget_bytes == len(NEW) * per_expert


def test_residency_forget_restarts_a_layers_averages_and_refreshes_next_step():
    """ResidencyPolicy.forget: the layer's averages restart (debiased over its own steps: one step
    of routing gives that step's counts), the wanted set is empty, and the next end_step
    refreshes even off the cadence (not during the warm-up: its own refresh comes then)."""
    shape = LayerShape(4, H, I, stored_bytes=3 * H * I * 2)
    policy = ResidencyPolicy(Scheduler(CostModel(shape)), budget=1.0, warmup_steps=2, refresh_every=100)
    counts = np.array([5.0, 0.0, 3.0, 1.0])
    refreshed = []
    for _ in range(4):
        policy.record("a", counts)
        refreshed.append(policy.end_step())
    assert refreshed == [False, True, False, False]
    assert bool(policy.wanted("a").any())
    policy.forget("a")
    assert not bool(policy.wanted("a").any())
    fresh = [3.0, 4.0, 0.0, 2.0]
    policy.record("a", fresh)
    assert policy.end_step()  # off the cadence: the forgotten layer's refresh
    mu, active, calls = policy._averages(policy._layer("a"))
    np.testing.assert_allclose(mu, fresh)
    np.testing.assert_allclose(active, [1, 1, 0, 1])
    assert calls == pytest.approx(1.0)
    assert not policy.end_step()  # back to the cadence
    early = ResidencyPolicy(Scheduler(CostModel(shape)), budget=1.0, warmup_steps=3, refresh_every=100)
    early.record("a", counts)
    early.end_step()
    early.forget("a")
    assert [early.end_step() for _ in range(3)] == [False, True, False]  # the warm-up's refresh only


def test_calibrated_start_and_replacement_with_lora_of_every_expert():
    """calibrate=True under expert parallelism: the engine holds a share of the layer's experts
    while the module's PEFT LoRA covers all of them (E_FULL rows); the calibration runs on the
    engine's experts at start and again for the new shape of a replacement (one measurement per
    shape, the layer then planned with that shape's model)."""

    def lora_of(_module, _state):
        g = torch.Generator().manual_seed(0)
        return moetune.LoraWeights(
            **{
                p: (torch.randn(E_FULL, R, i, generator=g), torch.randn(E_FULL, o, R, generator=g))
                for p, (o, i) in PROJ_DIMS.items()
            },
            scaling=0.5,
        )

    module, state = _Module(), _State(engine_of(OLD))
    pl = ModelPlacement(options("streamed", "cpu", calibrate=True), [(module, state)], lora_of=lora_of)
    assert pl.start() == "gpu"
    assert list(pl.calibration.values()) == ["measured"]
    new = engine_of(NEW)
    pl.replace_engine(0, new, _State(new))
    assert len(pl.calibration) == 2 and pl.calibration[pl.layers[0].shape] == "measured"
    assert (
        pl.layers[0].shape.num_experts == len(NEW) and pl.scheduler.cost_model(0) is pl.cost_models[pl.layers[0].shape]
    )
    one_step(pl, len(NEW), 0, "cpu")
