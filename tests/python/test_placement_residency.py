"""The residency policy (moetune.placement.residency): the byte budget across layers, the refresh
cadence, no thrashing under routing noise, tracking a routing shift, the "auto" budget."""

import numpy as np
import pytest
import torch

from moetune.placement.cost import CostModel, LayerShape
from moetune.placement.residency import GIB, CudaMemoryProbe, GpuMemory, ResidencyPolicy, auto_budget_bytes
from moetune.placement.scheduler import Scheduler

QWEN = LayerShape(128, 2048, 768, 3 * 2048 * 768 * 2)  # 9.4 MB per expert
QWEN_INT8 = LayerShape(128, 2048, 768, 4_732_928, weight_format="int8")


def zipf_probs(E, rng, a=1.1):
    p = 1.0 / np.arange(1, E + 1) ** a
    return rng.permutation(p / p.sum())


def run_steps(policy, layers, probs, rng, steps, tokens=4096, k=8, calls=1):
    refreshed = []
    for _ in range(steps):
        for key in layers:
            for _ in range(calls):
                policy.record(key, torch.from_numpy(rng.multinomial(tokens * k, probs[key])))
        refreshed.append(policy.end_step())
    return refreshed


def wanted_set(policy, layers):
    return {(key, int(e)) for key in layers for e in torch.nonzero(policy.wanted(key)).flatten().tolist()}


def layer_time(sched, policy, key, mu):
    """Predicted step time of one layer (one call per step) with the policy's residents."""
    return sched.best_makespan(key, mu, policy.wanted(key))


def test_budget_respected_across_layers_of_different_sizes():
    models = {0: CostModel(QWEN), 1: CostModel(QWEN), 2: CostModel(QWEN_INT8)}
    rng = np.random.default_rng(0)
    probs = {key: zipf_probs(128, rng) for key in models}
    for budget_gib in (0.0, 0.05, 0.3, 1.0, 10.0):
        sched = Scheduler(models.__getitem__, correction=False)
        policy = ResidencyPolicy(sched, budget=budget_gib, warmup_steps=2, refresh_every=5)
        run_steps(policy, models, probs, rng, 2)
        used = sum(int(policy.wanted(key).sum()) * models[key].shape.resident_size for key in models)
        assert used <= budget_gib * GIB
        assert used == policy.wanted_bytes() == policy.last_refresh["bytes"]
        if 0 < budget_gib <= 0.3:
            # Binding: what is left is smaller than one expert of the largest size.
            assert budget_gib * GIB - used < QWEN.resident_size
        if budget_gib == 10.0:  # ample: every layer as fast as with all its experts resident
            for key in models:
                mu = probs[key] * 4096 * 8
                assert layer_time(sched, policy, key, mu) <= 1.01 * sched.best_makespan(key, mu, np.ones(128, bool))
        for key in models:  # within a layer: the busiest experts (as observed) first
            w = policy.wanted(key).numpy()
            mu = policy._averages(policy._layer(key))[0]
            assert mu[w].min(initial=np.inf) >= mu[~w].max(initial=0.0)


def test_budget_spreads_over_layers_with_diminishing_gains():
    """Identical layers, T = 16384 (the GPU side becomes compute-bound once most experts are
    resident, so a layer's gains diminish), budget a third of the expert bytes: the residents
    spread over the layers and the predicted step is faster than filling the first layers."""
    layers = list(range(6))
    model = CostModel(QWEN)
    sched = Scheduler(model, correction=False)
    rng = np.random.default_rng(6)
    probs = {key: rng.dirichlet(np.full(128, 2.0)) for key in layers}
    budget = len(layers) * 128 * QWEN.resident_size / 3 / GIB
    policy = ResidencyPolicy(sched, budget=budget, warmup_steps=1)
    for key in layers:
        policy.record(key, (probs[key] * 16384 * 8).round())
    policy.end_step()
    per_layer = [int(policy.wanted(key).sum()) for key in layers]
    assert min(per_layer) >= 20 and max(per_layer) <= 80, per_layer
    spread = sum(layer_time(sched, policy, key, probs[key] * 16384 * 8) for key in layers)
    n_total = sum(per_layer)
    filled = 0.0
    for key in layers:  # the first layers full (busiest first), the rest none
        r = min(128, n_total)
        n_total -= r
        res = np.zeros(128, bool)
        res[np.argsort(-probs[key])[:r]] = True
        filled += sched.best_makespan(key, probs[key] * 16384 * 8, res)
    assert spread < 0.95 * filled


def test_refresh_cadence():
    policy = ResidencyPolicy(Scheduler(CostModel(QWEN)), budget=1.0, warmup_steps=3, refresh_every=4)
    rng = np.random.default_rng(2)
    probs = {"a": zipf_probs(128, rng)}
    assert not policy.wanted("a").any()  # nothing before the first refresh
    refreshed = run_steps(policy, ["a"], probs, rng, 16)
    steps = [i + 1 for i, r in enumerate(refreshed) if r]
    assert steps == [3, 7, 11, 15]
    assert policy.last_refresh["step"] == 15
    assert policy.wanted("a").any()


def test_no_thrashing_under_routing_noise():
    """Stationary routing, sampled anew each step (multinomial noise; a boundary expert's traffic
    fluctuates by several % between refreshes): after the first refresh the set hardly moves;
    without hysteresis it moves more."""
    layers = list(range(4))
    model = CostModel(QWEN)

    def swaps(hysteresis):
        rng = np.random.default_rng(3)
        probs = {key: zipf_probs(128, rng, a=0.6) for key in layers}
        policy = ResidencyPolicy(
            Scheduler(model), budget=1.5, warmup_steps=5, refresh_every=5, ema=0.8, hysteresis=hysteresis
        )
        run_steps(policy, layers, probs, rng, 5, tokens=512)
        first = wanted_set(policy, layers)
        moved = 0
        for _ in range(20):
            run_steps(policy, layers, probs, rng, 5, tokens=512)
            moved += policy.last_refresh["swaps_in"] + policy.last_refresh["swaps_out"]
        return first, moved, policy

    first, moved, policy = swaps(0.25)
    assert len(first) > 100
    assert moved <= 0.02 * len(first) * 20  # < 2% of the set per refresh
    _, moved_without, _ = swaps(0.0)
    assert moved_without > moved


def test_tracks_a_routing_shift():
    """40 of each layer's 128 experts get the traffic (the rest almost none); then the routing
    moves to other experts (e.g. a new data mix). By the next refresh the resident set follows.
    (Among experts that are all busy, residency saves about one copy whichever is resident, so
    the policy rightly keeps its incumbents there: the shift that matters is in who is active.)"""
    layers = ["x", "y"]
    model = CostModel(QWEN)
    rng = np.random.default_rng(4)

    def hot_probs(offset):
        p = np.full(128, 1e-6)
        p[(np.arange(40) + offset) % 128] = zipf_probs(40, rng)
        return p / p.sum()

    probs = {key: hot_probs(0) for key in layers}
    policy = ResidencyPolicy(Scheduler(model), budget=0.4, warmup_steps=10, refresh_every=20)
    run_steps(policy, layers, probs, rng, 30, tokens=1024)
    before = wanted_set(policy, layers)
    hot_before = {(key, int(e)) for key in layers for e in np.flatnonzero(probs[key] > 1e-3)}
    assert len(before) >= 40 and before <= hot_before
    probs = {key: hot_probs(64) for key in layers}
    refreshed = run_steps(policy, layers, probs, rng, 20, tokens=1024)
    assert refreshed[-1]
    after = wanted_set(policy, layers)
    hot_after = {(key, int(e)) for key in layers for e in np.flatnonzero(probs[key] > 1e-3)}
    assert len(after) >= 40 and len(after & hot_after) >= 0.95 * len(after)


def test_auto_budget_computation():
    total = 80 * GIB
    # 0.5 GiB used outside torch, torch reserves 20 GiB now (of which 4 GiB residents), peak 30.
    mem = GpuMemory(total=total, free=total - GIB // 2 - 20 * GIB, reserved=20 * GIB, peak_reserved=30 * GIB)
    got = auto_budget_bytes(mem, resident_bytes=4 * GIB)
    margin = GIB + int(0.05 * total)
    assert got == total - GIB // 2 - (30 - 4) * GIB - margin
    # Never negative; explicit margins.
    full = GpuMemory(total=total, free=GIB, reserved=70 * GIB, peak_reserved=79 * GIB)
    assert auto_budget_bytes(full, resident_bytes=0) == 0
    assert (
        auto_budget_bytes(mem, resident_bytes=4 * GIB, margin_bytes=0, margin_fraction=0.0)
        == total - GIB // 2 - 26 * GIB
    )
    with pytest.raises(ValueError, match="total"):
        auto_budget_bytes(GpuMemory(0, 0, 0, 0), resident_bytes=0)


def test_auto_budget_reserves_activations_of_longer_forwards():
    """A step's activations (peak_allocated - allocated at the boundary) are reserved token_scale
    times: a 4x longer forward than the measured one keeps 3 more activations' worth free."""
    total = 80 * GIB
    mem = GpuMemory(
        total=total,
        free=total - 20 * GIB,
        reserved=20 * GIB,
        peak_reserved=30 * GIB,
        allocated=12 * GIB,
        peak_allocated=28 * GIB,
    )
    base = auto_budget_bytes(mem, resident_bytes=4 * GIB, margin_bytes=0, margin_fraction=0.0)
    assert base == total - 26 * GIB
    four = auto_budget_bytes(mem, resident_bytes=4 * GIB, margin_bytes=0, margin_fraction=0.0, token_scale=4.0)
    assert base - four == 3 * 16 * GIB
    with pytest.raises(ValueError, match="token_scale"):
        auto_budget_bytes(mem, resident_bytes=0, token_scale=0.5)


def test_policy_token_scale_from_hint_and_from_the_longest_call_seen():
    model = CostModel(QWEN)
    total = 80 * GIB
    probe_mem = GpuMemory(
        total=total,
        free=total - 10 * GIB,
        reserved=10 * GIB,
        peak_reserved=12 * GIB,
        allocated=4 * GIB,
        peak_allocated=10 * GIB,
    )
    hinted = ResidencyPolicy(
        Scheduler(model),
        budget="auto",
        memory_probe=lambda: probe_mem,
        warmup_steps=1,
        margin_bytes=0,
        margin_fraction=0.0,
        max_tokens=16384,
    )
    plain = ResidencyPolicy(
        Scheduler(model),
        budget="auto",
        memory_probe=lambda: probe_mem,
        warmup_steps=1,
        margin_bytes=0,
        margin_fraction=0.0,
    )
    for pol in (hinted, plain):
        assert pol.token_scale() == 1.0  # nothing observed yet
        pol.observe_tokens(4096)
        pol.observe_tokens(1024)
        pol.record("L", np.full(128, 64))
        pol.end_step()  # refresh: reads the probe
    assert plain.budget_bytes == total - 12 * GIB
    assert hinted.budget_bytes == total - 12 * GIB - 3 * 6 * GIB  # 16384 / 4096 = 4x the activations
    # Without a hint, a window of shorter calls after a longer one still reserves the longest.
    plain.observe_tokens(2048)
    assert plain.token_scale() == 2.0 and hinted.window_tokens == 0  # the window resets per reading
    with pytest.raises(ValueError, match="max_tokens"):
        ResidencyPolicy(Scheduler(model), budget=1.0, max_tokens=0)


def test_auto_budget_policy_measures_at_each_refresh():
    """'auto' reads the (injected) probe at every refresh, gives the residents it holds back to the
    budget, and follows a growing peak (longer sequences) down."""
    model = CostModel(QWEN)
    total = 8 * GIB
    state = {"peak": 6.5 * GIB}
    held = []

    def probe():
        residents = held[-1] if held else 0
        reserved = 4 * GIB + residents
        return GpuMemory(
            total=total,
            free=total - reserved - GIB // 4,
            reserved=reserved,
            peak_reserved=int(state["peak"]) + residents,
        )

    policy = ResidencyPolicy(
        Scheduler(model),
        budget="auto",
        memory_probe=probe,
        warmup_steps=2,
        refresh_every=3,
        margin_bytes=GIB // 2,
        margin_fraction=0.0,
    )
    rng = np.random.default_rng(5)
    probs = {"L": np.full(128, 1 / 128)}
    run_steps(policy, ["L"], probs, rng, 2)
    expect = total - GIB // 4 - int(6.5 * GIB) - GIB // 2  # 0.75 GiB: 85 of the 128 experts
    assert policy.budget_bytes == expect
    assert policy.wanted_bytes() <= expect and policy.wanted_bytes() > expect - QWEN.resident_size
    held.append(policy.wanted_bytes())
    run_steps(policy, ["L"], probs, rng, 3)
    assert policy.budget_bytes == expect  # stable: the held residents are not counted twice
    state["peak"] = 7 * GIB
    run_steps(policy, ["L"], probs, rng, 3)
    assert policy.budget_bytes == expect - GIB // 2
    assert policy.wanted_bytes() <= policy.budget_bytes
    with pytest.raises(ValueError, match="memory_probe"):
        ResidencyPolicy(Scheduler(model), budget="auto")
    with pytest.raises(ValueError, match="GiB"):
        ResidencyPolicy(Scheduler(model), budget="lots")
    with pytest.raises(ValueError, match=">= 0"):
        ResidencyPolicy(Scheduler(model), budget=-1.0)


def test_attach_and_input_checks():
    model = CostModel(QWEN)
    sched = Scheduler(model, phases={"forward": 1.0, "recompute": 1.0, "backward": 1.0}, backward_copies=False)
    policy = ResidencyPolicy.attach(sched, budget=1.0)
    assert sched.residency is policy and policy.scheduler is sched
    with pytest.raises(ValueError, match=r"expected \[128\]"):
        policy.record(0, torch.zeros(64))
    with pytest.raises(ValueError, match="refresh_every"):
        ResidencyPolicy(sched, budget=1.0, refresh_every=0)
    with pytest.raises(ValueError, match="curve_points"):
        ResidencyPolicy(sched, budget=1.0, curve_points=1)
    assert set(policy.stats()) == {"resident_experts", "resident_bytes", "resident_budget", "resident_swaps"}


def test_benefit_is_zero_for_idle_and_positive_for_busy_experts():
    policy = ResidencyPolicy(Scheduler(CostModel(QWEN)), budget=1.0, warmup_steps=1)
    counts = np.zeros(128, dtype=np.int64)
    counts[3] = 500
    counts[4] = 5
    policy.record("L", counts)
    policy.end_step()
    b = policy.benefit("L")
    assert b[3] > b[4] > 0 and (np.delete(b, [3, 4]) == 0).all()
    assert policy.wanted("L")[3] and policy.wanted("L")[4]
    # The rest of the budget fills with idle experts (resident is never slower).
    assert int(policy.wanted("L").sum()) == GIB // QWEN.resident_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine)")
def test_cuda_memory_probe():
    probe = CudaMemoryProbe("cuda")
    probe()  # starts a window
    nbytes = 256 << 20
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    m = probe()  # the window held x
    assert m.total > 0 and 0 < m.free <= m.total and m.peak_reserved >= nbytes
    del x
    torch.cuda.empty_cache()
    probe()  # this window started while x was alive
    m2 = probe()  # this one did not
    assert m2.peak_reserved <= m.peak_reserved - nbytes  # the peak counters were reset per reading
    assert probe.run_peak_reserved >= m.peak_reserved and probe.run_peak_allocated >= nbytes
    budget = auto_budget_bytes(m2, resident_bytes=0)
    assert 0 <= budget < m2.free


def test_budget_left_by_the_gains_fills_with_more_experts():
    """A budget that holds every expert makes every expert resident (idle ones too: a resident
    expert is never slower), in one refresh, and later refreshes under routing noise swap none;
    a binding budget fills with the busiest remaining experts, never beyond the budget."""
    layers = [0, 1]
    model = CostModel(QWEN)
    rng = np.random.default_rng(3)
    probs = {}
    for key in layers:
        p = zipf_probs(128, rng)
        p[:10] = 0.0  # idle experts
        probs[key] = p / p.sum()
    sched = Scheduler(model, correction=False)
    policy = ResidencyPolicy(sched, budget=(2 * 128 + 0.5) * QWEN.resident_size / GIB, warmup_steps=1, refresh_every=1)
    run_steps(policy, layers, probs, rng, 1)
    assert all(bool(policy.wanted(key).all()) for key in layers)
    assert policy.last_refresh["bytes"] == 2 * 128 * QWEN.resident_size
    run_steps(policy, layers, probs, rng, 5)
    assert policy.last_refresh["swaps_in"] == policy.last_refresh["swaps_out"] == 0
    # Binding: 100 experts' bytes over two layers -> exactly 100 resident, the busiest by mu.
    policy = ResidencyPolicy(sched, budget=100.5 * QWEN.resident_size / GIB, warmup_steps=1)
    run_steps(policy, layers, probs, rng, 1)
    assert sum(int(policy.wanted(key).sum()) for key in layers) == 100
    for key in layers:
        w = policy.wanted(key).numpy()
        assert not w[:10].any()  # idle experts are the last to fill
