"""Per-step placement metrics (moetune.placement.metrics) and the Chrome/Perfetto trace writer
(moetune.placement.trace): written, loaded back with json and checked for structure."""

import json

import numpy as np
import pytest
import torch

from moetune.placement.cost import CostModel, LayerShape
from moetune.placement.metrics import PlacementMetrics
from moetune.placement.plan import LayerPlan
from moetune.placement.trace import LANE_IDS, Lane, Trace

SHAPE = LayerShape(8, 256, 128, 3 * 256 * 128 * 2)


def test_metrics_per_step():
    model = CostModel(SHAPE)
    m = PlacementMetrics()
    counts = torch.tensor([10, 0, 5, 7, 3, 0, 1, 2])
    where = torch.tensor([0, 0, 1, 2, 2, 1, 0, 1], dtype=torch.int8)
    plan = LayerPlan(where, counts)
    fwd = model.predict(counts, where, "forward")
    bwd = model.predict(counts, where, "backward")
    m.record("L0", plan, {"cpu": 0.010, "gpu": 0.004, "copy": 0.002, "wall": 0.011, "phase": "forward"}, fwd)
    m.record("L0", plan, {"cpu": 0.020, "gpu": 0.008, "copy": 0.002, "wall": 0.021, "phase": "backward"}, bwd)
    m.record("L1", plan, {"cpu": 0.010, "phase": "recompute", "copy_bytes": 123}, None)
    n = m.end_step()
    p = "placement_"
    assert n[p + "calls"] == 3
    # Forward calls only: experts with pairs and their pairs, per placement.
    assert (n[p + "experts_cpu"], n[p + "tokens_cpu"]) == (2, 11)
    assert (n[p + "experts_resident"], n[p + "tokens_resident"]) == (2, 7)
    assert (n[p + "experts_streamed"], n[p + "tokens_streamed"]) == (2, 10)
    assert n[p + "gpu_token_share"] == pytest.approx(17 / 28)
    # Bytes: the predictions' (2 streamed experts per copying phase) + a reported figure.
    assert n[p + "bytes_copied"] == 2 * 2 * SHAPE.stored_bytes + 123
    assert n[p + "cpu_s"] == pytest.approx(0.040) and n[p + "gpu_s"] == pytest.approx(0.012)
    assert n[p + "copy_s"] == pytest.approx(0.004) and n[p + "wall_s"] == pytest.approx(0.032)
    assert n[p + "predicted_s"] == pytest.approx(fwd.makespan + bwd.makespan)
    assert n[p + "predicted_ratio"] == pytest.approx(0.032 / (fwd.makespan + bwd.makespan))
    assert all(isinstance(v, float) for v in n.values())
    json.dumps(n)  # a metrics.jsonl record
    text = PlacementMetrics.progress(n)
    assert text.startswith("gpu 61% tok (res 25%, str 36%)") and "GB copied" in text and "wall/pred" in text
    assert len(text) < 80
    # The next step starts from zero.
    empty = m.end_step()
    assert empty[p + "calls"] == 0 and empty[p + "tokens_cpu"] == 0
    assert PlacementMetrics.progress(empty) == "no experts"
    assert m.steps == 2


def test_trace_written_and_loaded_back(tmp_path):
    clock = iter(np.arange(100.0, 200.0, 0.5)).__next__
    tr = Trace(clock=clock)  # origin = 100.0
    tr.add(Lane.CPU_ENGINE, "fwd L0", 100.5, 0.25, {"experts": 5})
    with tr.span(Lane.PYTHON, "step"):  # the clock reads 100.5, then 101.0
        pass

    class Ev:  # a CUDA event stand-in: times in ms
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, other):
            return other.ms - self.ms

    tr.add_cuda(Lane.GPU_COPY, "copy e3", Ev(10.0), Ev(12.5))
    with pytest.raises(RuntimeError, match="anchor"):
        tr.flush_cuda()
    tr.set_anchor(Ev(0.0), 102.0)  # GPU t=0 ms is host 102.0 s
    tr.add_cuda(Lane.GPU_COMPUTE, "gemm", Ev(11.0), Ev(14.0), {"tokens": 99})
    path = tr.write(str(tmp_path / "trace.json"))
    d = json.load(open(path))
    assert set(d) >= {"traceEvents", "displayTimeUnit"}
    events = d["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    assert len(spans) == 4
    for e in spans:
        assert set(e) >= {"name", "ph", "ts", "dur", "pid", "tid"}
        assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0
    by_name = {e["name"]: e for e in spans}
    assert by_name["fwd L0"]["ts"] == pytest.approx(0.5e6) and by_name["fwd L0"]["dur"] == pytest.approx(0.25e6)
    assert by_name["fwd L0"]["args"] == {"experts": 5}
    assert by_name["step"]["ts"] == pytest.approx(0.5e6) and by_name["step"]["dur"] == pytest.approx(0.5e6)
    assert by_name["copy e3"]["ts"] == pytest.approx(2.010e6) and by_name["copy e3"]["dur"] == pytest.approx(2500)
    assert by_name["gemm"]["ts"] == pytest.approx(2.011e6) and by_name["gemm"]["dur"] == pytest.approx(3000)
    # One (pid, tid) per lane, named by metadata; host and GPU lanes in separate processes.
    for lane, name in (
        (Lane.CPU_ENGINE, "fwd L0"),
        (Lane.PYTHON, "step"),
        (Lane.GPU_COPY, "copy e3"),
        (Lane.GPU_COMPUTE, "gemm"),
    ):
        assert (by_name[name]["pid"], by_name[name]["tid"]) == LANE_IDS[lane]
    assert len(set(LANE_IDS.values())) == 4
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert names == {ids: lane.value for lane, ids in LANE_IDS.items()}
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert procs == {1: "host", 2: "GPU"}
    assert LANE_IDS[Lane.PYTHON][0] == LANE_IDS[Lane.CPU_ENGINE][0] != LANE_IDS[Lane.GPU_COPY][0]


def test_disabled_trace_records_nothing(tmp_path):
    tr = Trace(enabled=False)
    assert tr.span(Lane.PYTHON, "a") is tr.span(Lane.CPU_ENGINE, "b")  # one shared no-op
    with tr.span(Lane.PYTHON, "a"):
        pass
    tr.add(Lane.CPU_ENGINE, "x", 0.0, 1.0)
    tr.add_cuda(Lane.GPU_COPY, "y", None, None)
    tr.cuda_anchor()  # no CUDA needed when disabled
    d = json.load(open(tr.write(str(tmp_path / "t.json"))))
    assert [e for e in d["traceEvents"] if e["ph"] == "X"] == []


def test_trace_event_cap():
    tr = Trace(max_events=3)
    for i in range(5):
        tr.add(Lane.PYTHON, f"s{i}", tr.origin + i, 0.1)
    assert len([e for e in tr.events() if e["ph"] == "X"]) == 3 and tr.dropped == 2
    tr.clear()
    assert tr.dropped == 0 and not [e for e in tr.events() if e["ph"] == "X"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine)")
def test_trace_with_cuda_events(tmp_path):
    tr = Trace()
    tr.cuda_anchor()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    x = torch.randn(2048, 2048, device="cuda")
    s.record()
    for _ in range(10):
        x = x @ x
        x = x / x.norm()
    e.record()
    tr.add_cuda(Lane.GPU_COMPUTE, "matmuls", s, e)
    torch.cuda.synchronize()
    d = json.load(open(tr.write(str(tmp_path / "t.json"))))
    (span,) = [ev for ev in d["traceEvents"] if ev["ph"] == "X"]
    assert span["dur"] > 0 and span["ts"] >= 0
