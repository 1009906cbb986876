"""The placement cost model (moetune.placement.cost): formulas against a plain reference, the
defaults against the measured figures they come from, JSON round trip, input checks."""

import json
import math

import numpy as np
import pytest
import torch
from placement_reference import reference_makespan

from moetune.placement.cost import (
    CostCoefficients,
    CostModel,
    LayerShape,
    PhaseCoefficients,
    ReferenceRates,
    cost_phase,
)
from moetune.placement.plan import LayerPlan, Where

QWEN = dict(num_experts=128, hidden_size=2048, intermediate_size=768)
DSV3 = dict(num_experts=256, hidden_size=7168, intermediate_size=2048)


def bf16_shape(**kw):
    return LayerShape(stored_bytes=3 * kw["hidden_size"] * kw["intermediate_size"] * 2, **kw)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("staging", [1, 2, 3])
def test_predict_matches_reference_formulas(fmt, staging):
    rng = np.random.default_rng(staging)
    E, H, I = 24, 512, 256
    stored = 3 * H * I * (2 if fmt == "bf16" else 1)
    shape = LayerShape(E, H, I, stored, weight_format=fmt)
    coeffs = CostCoefficients.defaults(shape)
    model = CostModel(shape, coeffs, staging_buffers=staging)
    model.scales.update({"cpu/forward": 1.3, "gpu/backward": 0.7, "copy": 1.1})
    model.invalidate()
    for trial in range(40):
        counts = rng.poisson(rng.choice([0.5, 5, 50, 500]), E) * (rng.random(E) < 0.8)
        where = rng.integers(0, 3, E).astype(np.int8)
        phase = ["forward", "backward", "recompute"][trial % 3]
        copies = trial % 4 != 0
        pred = model.predict(torch.from_numpy(counts), torch.from_numpy(where), phase, copies=copies)
        ref, Xe, Y, C = reference_makespan(
            shape, coeffs, counts, where, phase, copies=copies, staging=staging, scales=model.scales
        )
        assert pred.makespan == pytest.approx(ref, rel=1e-12, abs=1e-15)
        assert pred.cpu_eff == pytest.approx(Xe, rel=1e-12, abs=1e-15)
        assert pred.gpu_side == pytest.approx(Y, rel=1e-12, abs=1e-15)
        assert pred.copy == pytest.approx(C, rel=1e-12, abs=1e-15)
        m = int(((where == Where.GPU_STREAMED) & (counts > 0)).sum())
        assert pred.streamed == m
        assert pred.copy_bytes == (m * stored if copies else 0)


def test_slowdown_applies_to_the_overlapped_part_only():
    shape = bf16_shape(**QWEN)
    coeffs = CostCoefficients.defaults(shape).replace(cpu_slowdown=2.0)
    model = CostModel(shape, coeffs)
    counts = np.zeros(128, dtype=np.int64)
    where = np.zeros(128, dtype=np.int8)
    counts[:4] = 100  # CPU work
    alone = model.predict(counts, where, "forward")
    assert alone.cpu_eff == alone.cpu  # no copies, no slowdown
    # One streamed expert: a short copy, partly overlapped: X + C (1 - 1/s).
    counts[4] = 10
    where[4] = Where.GPU_STREAMED
    p = model.predict(counts, where, "forward")
    assert p.copy < p.cpu
    assert p.cpu_eff == pytest.approx(p.cpu + p.copy * 0.5)
    # Many streamed experts: copies outlast the slowed engine: X * s.
    counts[5:100] = 10
    where[5:100] = Where.GPU_STREAMED
    p = model.predict(counts, where, "forward")
    assert p.copy > 2 * p.cpu
    assert p.cpu_eff == pytest.approx(2 * p.cpu)
    # Experts without pairs cost nothing wherever they are.
    where[100:] = Where.GPU_STREAMED
    assert model.predict(counts, where, "forward") == p


def test_defaults_reproduce_the_measured_figures():
    """The defaults come from the reference machine's measurements (ReferenceRates): predicting
    those measurements gives them back within the fit's residual (CPU 15%, GPU 35%)."""
    rng = np.random.default_rng(0)
    models = {"qwen": CostModel(bf16_shape(**QWEN)), "dsv3": CostModel(bf16_shape(**DSV3))}

    def fwd_bwd(model, T, where):
        E = model.shape.num_experts
        c = np.bincount(rng.integers(0, E, T * 8), minlength=E)
        w = np.full(E, int(where), dtype=np.int8)
        return model.predict(c, w, "forward").makespan + model.predict(c, w, "backward").makespan

    # CPU engine fwd+bwd, 16 threads (BENCHMARKS.md; reference-system.md).
    for name, T, ms in (
        ("qwen", 128, 92.2),
        ("qwen", 1024, 129.4),
        ("qwen", 4096, 211.1),
        ("dsv3", 1024, 702),
        ("dsv3", 4096, 1074),
        ("dsv3", 16384, 3350),
    ):
        assert fwd_bwd(models[name], T, Where.CPU) == pytest.approx(ms * 1e-3, rel=0.15), (name, T)
    # GPU fwd+bwd of one layer (weights resident).
    for name, T, ms in (
        ("qwen", 1024, 3.2),
        ("qwen", 4096, 6.0),
        ("qwen", 16384, 19.3),
        ("dsv3", 1024, 24),
        ("dsv3", 4096, 38),
        ("dsv3", 16384, 87),
    ):
        assert fwd_bwd(models[name], T, Where.GPU_RESIDENT) == pytest.approx(ms * 1e-3, rel=0.35), (name, T)
    # The forward / backward split of the CPU engine at T = 4096: 84.1 / 127.0 ms.
    c = np.bincount(rng.integers(0, 128, 4096 * 8), minlength=128)
    cpu = np.zeros(128, dtype=np.int8)
    assert models["qwen"].predict(c, cpu, "forward").makespan == pytest.approx(84.1e-3, rel=0.25)
    assert models["qwen"].predict(c, cpu, "backward").makespan == pytest.approx(127.0e-3, rel=0.15)
    # Copying a whole layer: 22 ms (Qwen3, 1.13 GiB) and 413 ms (DeepSeek-V3, 21 GiB) at 55 GB/s.
    for name, ms in (("qwen", 22), ("dsv3", 413)):
        E = models[name].shape.num_experts
        streamed = np.full(E, int(Where.GPU_STREAMED), dtype=np.int8)
        assert models[name].predict(np.ones(E), streamed, "forward").copy == pytest.approx(ms * 1e-3, rel=0.05)
    # The slowdown: 1.6-1.8x measured.
    assert 1.6 <= models["qwen"].coefficients.cpu_slowdown <= 1.8


def test_quantized_format_copies_fewer_bytes_and_pays_dequant():
    H, I = 2048, 768
    int8 = LayerShape(128, H, I, stored_bytes=4_732_928, weight_format="int8")
    bf16 = bf16_shape(**QWEN)
    q, b = CostCoefficients.defaults(int8), CostCoefficients.defaults(bf16)
    assert q.forward.dequant > 0 and b.forward.dequant == 0
    assert q.forward.dequant == pytest.approx(25e-6, rel=0.1)  # 3.2 ms per 128-expert layer, measured
    assert int8.resident_dequant  # held in the stored format by default
    assert not LayerShape(128, H, I, 4_732_928, weight_format="int8", resident_bytes=3 * H * I * 2).resident_dequant
    mq, mb = CostModel(int8), CostModel(bf16)
    counts = np.full(128, 64)
    streamed = np.full(128, int(Where.GPU_STREAMED), dtype=np.int8)
    assert mq.predict(counts, streamed, "forward").copy < 0.6 * mb.predict(counts, streamed, "forward").copy


def test_coefficients_json_round_trip(tmp_path):
    shape = bf16_shape(**DSV3)
    c = CostCoefficients.defaults(shape)
    path = str(tmp_path / "c.json")
    c.save(path)
    assert CostCoefficients.load(path) == c
    assert json.load(open(path))["copy_bandwidth"] == c.copy_bandwidth
    # Folding the online correction into new coefficients predicts the same times.
    m = CostModel(shape, c)
    m.scales.update({"cpu/forward": 2.0, "cpu/backward": 0.5, "gpu/forward": 1.5, "copy": 1.25})
    m.slowdown = 1.3
    m.invalidate()
    folded = CostModel(shape, m.effective())
    rng = np.random.default_rng(1)
    for phase in ("forward", "backward"):
        counts = rng.poisson(30, 256)
        where = rng.integers(0, 3, 256).astype(np.int8)
        assert folded.predict(counts, where, phase).makespan == pytest.approx(
            m.predict(counts, where, phase).makespan, rel=1e-12
        )
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        CostCoefficients.load(str(tmp_path / "bad.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"forward": {}}))
    with pytest.raises(ValueError, match="partial.json"):
        CostCoefficients.load(str(tmp_path / "partial.json"))


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="stored_bytes"):
        LayerShape(8, 64, 32, 0)
    with pytest.raises(ValueError, match="num_experts"):
        LayerShape(0, 64, 32, 100)
    with pytest.raises(ValueError, match="cpu_expert"):
        PhaseCoefficients(0, -1.0, 0, 0, 0, 0, 0)
    shape = LayerShape(8, 64, 32, 12288)
    with pytest.raises(ValueError, match="cpu_slowdown"):
        CostCoefficients.defaults(shape).replace(cpu_slowdown=0.5)
    with pytest.raises(ValueError, match="copy_bandwidth"):
        CostCoefficients.defaults(shape).replace(copy_bandwidth=0.0)
    with pytest.raises(ValueError, match="unknown phase"):
        cost_phase("sideways")
    m = CostModel(shape)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        m.predict(np.zeros(7), np.zeros(8), "forward")
    with pytest.raises(ValueError, match="staging_buffers"):
        CostModel(shape, staging_buffers=0)


def test_layer_shape_of_engine_experts():
    import moetune

    ctx = moetune.Context(1)
    E, H, I = 4, 64, 32
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)]
    for fmt in ("bf16", "int8"):
        ex = moetune.MoEExperts(ctx, *w, weight_format=fmt)
        s = LayerShape.of(ex)
        assert (s.num_experts, s.hidden_size, s.intermediate_size) == (E, H, I)
        assert s.stored_bytes == ex.packed_bytes_per_expert
        assert s.weight_format == fmt
        assert s.quantized == (fmt != "bf16")


def test_layer_plan_helpers():
    counts = torch.tensor([3, 0, 5, 1])
    p = LayerPlan(torch.tensor([0, 2, 1, 2], dtype=torch.int8), counts)
    assert p.cpu_mask.tolist() == [True, False, False, False]
    assert p.experts(Where.GPU_STREAMED).tolist() == [1, 3]
    u = LayerPlan.uniform(counts.to(torch.int32), Where.GPU_RESIDENT)
    assert u.where.dtype == torch.int8 and u.counts.dtype == torch.int64 and u.predicted == {}
    assert math.isclose(ReferenceRates().cpu_slowdown, 1.7)
