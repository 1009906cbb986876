"""What the user sees during long work: interval-averaged lines without a terminal (and
with --no-progress), a tqdm bar on one; trackers through accelerate's classes, checked
by reading back the TensorBoard events a run wrote (offline), the others when installed."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct

import pytest

from moetune.train import progress, trackers
from moetune.train.config import ConfigError, make_config


def test_interval_lines_average_over_the_interval():
    lines = []
    p = progress.Progress(True, total=25, initial=0, fallback=lines.append, every=10, tty=False)
    assert p.bar is None  # not a terminal: lines, even with progress on
    for i in range(25):
        p.update(
            loss=float(i), lr=1e-4, tokens_per_s=0.0, expert_share=0.5, step_tokens=100 * (i + 1), step_seconds=1.0
        )
    assert [l.split("  ")[0] for l in lines] == ["step 10/25", "step 20/25", "step 25/25"]
    # loss: the mean over the interval's steps; tok/s: its tokens over its seconds
    assert "loss 4.5000" in lines[0] and "loss 14.5000" in lines[1] and "loss 22.0000" in lines[2]
    assert f"{sum(100 * (i + 1) for i in range(10)) / 10:,.0f} tok/s" in lines[0]
    assert "experts 50%" in lines[0] and "ETA" in lines[0] and "lr 1.00e-04" in lines[0]
    # resumed at step 20: counts from there
    lines.clear()
    p = progress.Progress(False, total=25, initial=20, fallback=lines.append, every=10, tty=True)
    assert p.bar is None  # --no-progress: lines even on a terminal
    for _ in range(5):
        p.update(loss=1.0, lr=1e-4, tokens_per_s=0.0, expert_share=0.0, step_tokens=10, step_seconds=0.5)
    assert len(lines) == 1 and lines[0].startswith("step 25/25  loss 1.0000")


def test_a_terminal_gets_the_bar():
    lines = []
    p = progress.Progress(True, total=3, initial=0, fallback=lines.append, every=1, tty=True)
    assert p.bar is not None
    for _ in range(3):
        p.update(loss=1.0, lr=1e-3, tokens_per_s=5.0, expert_share=0.1)
    p.close()
    assert lines == [] and p.bar.n == 3


def read_scalars(folder):
    """{tag: [(step, value)]} from the TensorBoard event files in folder (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)):
        with open(path, "rb") as fh:
            buf = fh.read()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i : i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(buf[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_tracker_round_trip(tmp_path):
    t = trackers.Trackers(trackers.resolve(["tensorboard"]), str(tmp_path))
    assert t.names == ["tensorboard"]
    t.store_config({"lr": 1e-3, "betas": [0.9, 0.99], "data": None})
    for s in range(1, 4):
        t.log("train", s, {"loss": 1.0 / s, "note": "x", "ok": True})
    t.finish()
    got = read_scalars(str(tmp_path / "tensorboard"))
    assert got["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert "train/ok" not in got


def test_report_to_names_are_accelerates():
    assert trackers.resolve(["tensorboard,wandb", "mlflow"]) == ["tensorboard", "wandb", "mlflow"]
    assert trackers.resolve(["none"]) == [] and trackers.resolve(["tensorboard"], tensorboard=False) == []
    assert "tensorboard" in trackers.resolve(["all"])
    assert trackers.check_report_to(["tensorbored"]).startswith("unknown tracker 'tensorbored'; known: ")
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            assert trackers.check_report_to([name]) == f"{name} is not installed here (pip install {name})"
    with pytest.raises(ConfigError, match="report_to: unknown tracker"):
        make_config(None, {"report_to": ["tensorbored"]})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = trackers.Trackers(["wandb"], str(tmp_path))
    assert t.names == ["wandb"]
    t.log("train", 1, {"loss": 2.0})
    t.finish()
    assert glob.glob(str(tmp_path / "trackers" / "wandb" / "offline-run-*"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_file_store(tmp_path):
    t = trackers.Trackers(["mlflow"], str(tmp_path))
    assert t.names == ["mlflow"]
    t.log("train", 1, {"loss": 2.0})
    t.finish()
    import mlflow

    db = tmp_path / "trackers" / "mlflow.db"
    assert db.is_file()  # in the run folder, not the working directory
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs["metrics.train/loss"].tolist() == [2.0], runs.columns.tolist()


def test_a_run_logs_to_its_trackers_and_prints_lines(tmp_path):
    """A short demo run: stdout is not a terminal, so progress lines appear every print_every steps;
    the TensorBoard events hold exactly metrics.jsonl's losses."""
    pytest.importorskip("datasets")
    from moetune.demo import DEMO_DEFAULTS
    from moetune.train.loop import train

    said = []
    cfg = make_config(
        None,
        {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "micro_batch_size": 4,
            "engine_threads": 1,
            "print_every": 2,
            "eval_every": 0,
            "save_every": 0,
            "sample_prompts": [],
            "plot": False,
            "report_to": ["tensorboard"],
        },
        base=DEMO_DEFAULTS,
    )
    train(cfg, say=said.append)
    assert [l.split("  ")[0] for l in said if l.startswith("step ") and "/4" in l] == ["step 2/4", "step 4/4"]
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    want = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    got = read_scalars(str(tmp_path / "run" / "tensorboard"))["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)  # float32 in the event file
