"""Calibration of the placement cost model (moetune.placement.calibrate): synthetic routing, the
non-negative fit, recovering known coefficients from fake timers, the real CPU engine timer, the
cache, and the online correction converging from a wrong start."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

import moetune
from moetune.placement.calibrate import (
    CalibrationCache,
    OnlineCorrection,
    calibrate,
    cuda_copy_timer,
    engine_timer,
    fit_nonneg,
    machine_fingerprint,
    routing_from_counts,
    synthetic_counts,
    under_copies,
)
from moetune.placement.cost import CostCoefficients, CostModel, LayerShape, PhaseCoefficients
from moetune.placement.scheduler import Scheduler

SHAPE = LayerShape(64, 1024, 512, 3 * 1024 * 512 * 2)


def test_synthetic_counts_and_routing():
    for E, m, T, k in ((64, 16, 100, 8), (64, 8, 37, 8), (8, 8, 1, 8), (128, 128, 4096, 8), (10, 3, 5, 2)):
        c = synthetic_counts(E, m, T, k)
        assert c.sum() == T * k and (c > 0).sum() == m and c.max() <= T
        ids = routing_from_counts(torch.from_numpy(c), k)
        assert ids.shape == (T, k) and ids.dtype == torch.int64
        assert torch.equal(torch.bincount(ids.flatten(), minlength=E), torch.from_numpy(c))
        for row in ids.tolist():
            assert len(set(row)) == k  # no token picks an expert twice
    with pytest.raises(ValueError, match="top_k"):
        synthetic_counts(64, 4, 10, 8)
    with pytest.raises(ValueError, match="multiple of top_k"):
        routing_from_counts([3, 2], 2)
    with pytest.raises(ValueError, match="expert 0 has 5 pairs"):
        routing_from_counts([5, 1], 2)


def test_fit_nonneg():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(12), rng.integers(1, 64, 12), rng.integers(10, 5000, 12)]).astype(float)
    b = np.array([1e-4, 2e-5, 3e-7])
    assert np.allclose(fit_nonneg(X, X @ b), b, rtol=1e-9)
    # Data better fit with a negative intercept: the intercept is clamped to 0, the rest refit.
    y = X @ np.array([0.0, 2e-5, 3e-7]) - 5e-5
    got = fit_nonneg(X, y)
    assert (got >= 0).all() and got[0] == 0.0
    ref = np.linalg.lstsq(X[:, 1:], y, rcond=None)[0]
    assert np.allclose(got[1:], ref)


def fake_timers(truth: CostCoefficients, shape: LayerShape, rng, noise=0.02):
    """Timers that follow `truth` exactly, with multiplicative noise."""

    def jitter():
        return float(np.exp(rng.normal(0, noise)))

    def resource(prefix):
        def run(phase, counts):
            c = truth.phase(phase)
            m, pairs = int((np.asarray(counts) > 0).sum()), int(np.asarray(counts).sum())
            return (
                getattr(c, f"{prefix}_call")
                + getattr(c, f"{prefix}_expert") * m
                + getattr(c, f"{prefix}_token") * pairs
            ) * jitter()

        return run

    cpu = resource("cpu")

    def copy(nbytes):
        return (truth.copy_latency + nbytes / truth.copy_bandwidth) * jitter()

    def under(phase, counts, cover_s):
        return cpu(phase, counts) * truth.cpu_slowdown

    def dequant(n):
        return truth.forward.dequant * n * jitter()

    return cpu, resource("gpu"), copy, under, dequant


def truth_coefficients(shape, *, cpu=3.0, gpu=0.5, bw=0.4, slowdown=1.25):
    d = CostCoefficients.defaults(shape)

    def scale(p):
        return PhaseCoefficients(
            cpu_call=p.cpu_call * 2,
            cpu_expert=p.cpu_expert * cpu,
            cpu_token=p.cpu_token * cpu / 2,
            gpu_call=p.gpu_call * 3,
            gpu_expert=p.gpu_expert * gpu,
            gpu_token=p.gpu_token * gpu * 2,
            dequant=p.dequant * 1.5,
        )

    return d.replace(
        forward=scale(d.forward),
        backward=scale(d.backward),
        copy_bandwidth=d.copy_bandwidth * bw,
        copy_latency=7e-6,
        cpu_slowdown=slowdown,
    )


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_calibration_recovers_known_coefficients(fmt):
    shape = LayerShape(64, 1024, 512, 3 * 1024 * 512 * (2 if fmt == "bf16" else 1), weight_format=fmt)
    truth = truth_coefficients(shape)
    rng = np.random.default_rng(1)
    cpu, gpu, copy, under, dequant = fake_timers(truth, shape, rng, noise=0.0)
    got = calibrate(
        shape, top_k=8, cpu_time=cpu, gpu_time=gpu, copy_time=copy, cpu_time_under_copy=under, dequant_time=dequant
    )
    for phase in ("forward", "backward"):
        for f in ("cpu_call", "cpu_expert", "cpu_token", "gpu_call", "gpu_expert", "gpu_token", "dequant"):
            assert getattr(got.phase(phase), f) == pytest.approx(getattr(truth.phase(phase), f), rel=1e-6), (phase, f)
    assert got.copy_bandwidth == pytest.approx(truth.copy_bandwidth, rel=1e-6)
    assert got.copy_latency == pytest.approx(truth.copy_latency, rel=1e-6)
    assert got.cpu_slowdown == pytest.approx(truth.cpu_slowdown, rel=1e-9)
    # With 2% timing noise, a few repeats: the coefficients that matter within a few %.
    cpu, gpu, copy, under, dequant = fake_timers(truth, shape, rng, noise=0.02)
    got = calibrate(shape, top_k=8, cpu_time=cpu, gpu_time=gpu, copy_time=copy, cpu_time_under_copy=under, repeats=3)
    model, ref = CostModel(shape, got), CostModel(shape, truth)
    for T in (64, 512, 4096):
        counts = np.bincount(rng.integers(0, 64, T * 8), minlength=64)
        where = rng.integers(0, 3, 64).astype(np.int8)
        for phase in ("forward", "backward"):
            assert model.predict(counts, where, phase).makespan == pytest.approx(
                ref.predict(counts, where, phase).makespan, rel=0.06
            )


def test_calibration_without_callables_keeps_the_base():
    base = CostCoefficients.defaults(SHAPE)
    assert calibrate(SHAPE, top_k=8) == base
    cpu, *_ = fake_timers(truth_coefficients(SHAPE), SHAPE, np.random.default_rng(0), noise=0.0)
    got = calibrate(SHAPE, top_k=8, cpu_time=cpu)
    assert got.forward.gpu_token == base.forward.gpu_token and got.copy_bandwidth == base.copy_bandwidth
    assert got.forward.cpu_token != base.forward.cpu_token
    with pytest.raises(ValueError, match="3 distinct"):
        calibrate(SHAPE, top_k=8, cpu_time=cpu, token_counts=(64,), active_fractions=(1.0,))
    with pytest.raises(ValueError, match="top_k"):
        calibrate(SHAPE, top_k=0, cpu_time=cpu)


def test_engine_timer_calibrates_the_real_cpu_engine():
    """The real engine (this machine's ISA), a tiny layer: every timed call runs, the fit gives
    finite non-negative coefficients, and they predict a fresh measurement to within 3x (the
    timing noise of a shared 2-core machine; this checks the plumbing, not the machine)."""
    E, H, I, k, r = 16, 128, 64, 4, 4
    ctx = moetune.Context(1)
    g = torch.Generator().manual_seed(0)
    experts = moetune.MoEExperts(
        ctx,
        torch.randn(E, I, H, generator=g) * 0.02,
        torch.randn(E, I, H, generator=g) * 0.02,
        torch.randn(E, H, I, generator=g) * 0.02,
    )
    lora = moetune.LoraWeights(
        gate=(torch.randn(E, r, H) * 0.01, torch.zeros(E, I, r)),
        up=(torch.randn(E, r, H) * 0.01, torch.zeros(E, I, r)),
        down=(torch.randn(E, r, I) * 0.01, torch.zeros(E, H, r)),
        scaling=2.0,
    )
    before = [t.clone() for t in lora.flat()]
    timer = engine_timer(experts, top_k=k, lora=lora)
    shape = LayerShape.of(experts)
    got = calibrate(shape, top_k=k, cpu_time=timer, token_counts=(16, 64, 256), repeats=2)
    for phase in ("forward", "backward"):
        c = got.phase(phase)
        assert all(math.isfinite(v) and v >= 0 for v in (c.cpu_call, c.cpu_expert, c.cpu_token))
        assert c.cpu_call + c.cpu_expert + c.cpu_token > 0
    counts = synthetic_counts(E, E, 128, k)
    measured = min(timer("forward", counts) for _ in range(3))
    predicted = CostModel(shape, got).predict(counts, np.zeros(E, np.int8), "forward").makespan
    assert measured / 3 < predicted < measured * 3
    for t, b in zip(lora.flat(), before):  # the timer worked on clones: no gradient, no change
        assert t.grad is None and torch.equal(t, b)


def test_cache_hit_miss_mismatch_and_corruption(tmp_path):
    cache = CalibrationCache(str(tmp_path / "cal"))
    machine = machine_fingerprint(engine_threads=4, isa="avx2")
    assert machine["cpu"] and machine["cores"] >= 1
    ident = CalibrationCache.identity(SHAPE, machine, {"top_k": 8})
    calls = []

    def measure():
        calls.append(1)
        return truth_coefficients(SHAPE)

    got, hit = cache.get_or_measure(ident, measure)
    assert not hit and len(calls) == 1
    again, hit = cache.get_or_measure(ident, measure)
    assert hit and again == got and len(calls) == 1
    # Another shape, format or machine: another key, measured again.
    other = CalibrationCache.identity(
        LayerShape(64, 1024, 512, 3 * 1024 * 512, weight_format="int8"), machine, {"top_k": 8}
    )
    assert CalibrationCache.key(other) != CalibrationCache.key(ident)
    _, hit = cache.get_or_measure(other, measure)
    assert not hit and len(calls) == 2
    # A file whose content belongs to another identity (a hash collision or a hand copy): a miss.
    path = cache.path(CalibrationCache.key(ident))
    d = json.load(open(path))
    d["identity"]["machine"]["cpu"] = "something else"
    json.dump(d, open(path, "w"))
    with pytest.warns(UserWarning, match="identity"):
        assert cache.load(ident) is None
    # A corrupted file: reported, measured again and rewritten.
    with open(path, "w") as fh:
        fh.write("{truncated")
    with pytest.warns(UserWarning, match="ignoring calibration cache"):
        _, hit = cache.get_or_measure(ident, measure)
    assert not hit and len(calls) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(ident) == got
    assert not [f for f in os.listdir(tmp_path / "cal") if ".tmp" in f]


def simulate(truth: CostModel, sched: Scheduler, rng, E, noise, outliers):
    """One layer call as in training: the scheduler plans with the model being corrected (or, one
    call in four, all-CPU / a random placement, as other layers and modes produce), and the
    'measured' timings follow the true model (noisy, some outliers)."""
    T = int(rng.choice([32, 256, 2048]))
    counts = rng.multinomial(T * 8, rng.dirichlet(np.full(E, 0.5)))
    resident = rng.random(E) < 0.2
    kind = rng.random()
    if kind < 0.15:
        where = np.zeros(E, np.int8)
    elif kind < 0.25:
        where = np.where(rng.random(E) < 0.5, 0, np.where(resident, 1, 2)).astype(np.int8)
    else:
        where = sched.plan(0, torch.from_numpy(counts), torch.from_numpy(resident)).where.numpy()
    phase = ["forward", "backward", "recompute"][int(rng.integers(3))]
    p = truth.predict(counts, where, phase)

    def meas(v):
        if v <= 0:
            return 0.0
        v *= math.exp(rng.normal(0, noise))
        return v * (8.0 if rng.random() < outliers else 1.0)

    return (
        counts,
        where,
        phase,
        {"cpu": meas(p.cpu_eff), "gpu": meas(p.gpu), "copy": meas(p.copy), "wall": p.makespan, "phase": phase},
    )


def test_online_correction_converges_from_a_wrong_start():
    """Start from the defaults; the machine is 3x slower on the CPU, 2x faster on the GPU, has a
    0.4x copy link and a 1.25 slowdown; 10% noise and 5% outliers (8x). In closed loop (the
    scheduler plans with the model being corrected), the factors converge to the true ones and
    the predictions with them."""
    E = 64
    truth = CostModel(SHAPE, CostCoefficients.defaults(SHAPE))
    truth.scales.update({"cpu/forward": 3.0, "cpu/backward": 2.5, "gpu/forward": 0.5, "gpu/backward": 0.6, "copy": 2.5})
    truth.slowdown = 1.25
    truth.invalidate()
    model = CostModel(SHAPE)
    corr = OnlineCorrection(model)
    sched = Scheduler(model, correction=False)
    rng = np.random.default_rng(3)
    keys = ("cpu/forward", "cpu/backward", "gpu/forward", "gpu/backward", "copy")
    tail = []
    for i in range(700):
        counts, where, phase, timings = simulate(truth, sched, rng, E, noise=0.1, outliers=0.05)
        corr.observe(counts, where, phase, timings)
        if i >= 400:  # converged: the factors fluctuate with the noise around the truth
            tail.append([math.log(model.scales[k]) for k in keys] + [math.log(model.slowdown)])
    settled = np.exp(np.mean(tail, axis=0))
    for key, got in zip(keys, settled):
        assert got == pytest.approx(truth.scales[key], rel=0.05), key
    assert settled[-1] == pytest.approx(1.25, rel=0.05)
    for key in keys:  # and every single state of the tail is close
        assert model.scales[key] == pytest.approx(truth.scales[key], rel=0.15), key
    assert sum(corr.ignored.values()) > 0  # outliers were seen and skipped
    # Predictions of new plans agree.
    for _ in range(20):
        counts, where, phase, _ = simulate(truth, sched, rng, E, 0, 0)
        assert model.predict(counts, where, phase).makespan == pytest.approx(
            truth.predict(counts, where, phase).makespan, rel=0.1
        )


def test_online_correction_is_robust_and_bounded():
    model = CostModel(SHAPE)
    corr = OnlineCorrection(model, max_factor=10.0)
    counts = np.full(64, 50)
    cpu = np.zeros(64, np.int8)
    pred = model.predict(counts, cpu, "forward").cpu
    for _ in range(30):  # correct predictions
        corr.observe(counts, cpu, "forward", {"cpu": pred})
    assert model.scales["cpu/forward"] == pytest.approx(1.0)
    # One wild measurement (100x) among correct ones: ignored as an outlier.
    corr.observe(counts, cpu, "forward", {"cpu": 100 * pred})
    assert model.scales["cpu/forward"] == pytest.approx(1.0)
    assert corr.ignored["cpu/forward"] == 1
    # A lasting 100x change: followed, within the bound.
    for _ in range(200):
        corr.observe(counts, cpu, "forward", {"cpu": 100 * pred})
    assert model.scales["cpu/forward"] == pytest.approx(10.0)
    # Missing / zero / tiny timings change nothing.
    before = dict(model.scales)
    corr.observe(counts, cpu, "forward", {"gpu": 1.0, "copy": 0.0})
    corr.observe(counts, cpu, "forward", {"cpu": 1e-9})
    assert model.scales == before
    with pytest.raises(ValueError, match="rate"):
        OnlineCorrection(model, rate=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine)")
def test_cuda_copy_timer_and_slowdown_measure():
    shape = LayerShape(8, 2048, 768, 3 * 2048 * 768 * 2)
    copy = cuda_copy_timer("cuda", 4 * shape.stored_bytes)
    got = calibrate(shape, top_k=2, copy_time=copy, repeats=3)
    assert 5e9 < got.copy_bandwidth < 1e12  # a pinned copy over PCIe / NVLink-C2C
    ctx = moetune.Context()
    experts = moetune.MoEExperts.empty(ctx, 8, 2048, 768)
    w = torch.randn(768, 2048) * 0.02
    for e in range(8):
        experts.load_expert(e, w, w, w.t().contiguous())
    timer = engine_timer(experts, top_k=2)
    loaded = under_copies(timer, "cuda", chunk_bytes=shape.stored_bytes)
    counts = synthetic_counts(8, 8, 512, 2)
    alone = min(timer("forward", counts) for _ in range(3))
    with_copies = min(loaded("forward", counts, 3 * alone) for _ in range(3))
    assert with_copies > 0.8 * alone
