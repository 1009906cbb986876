"""A rank lost in the middle of `moetune train` with expert parallelism (2 processes, gloo, CPU):
the other rank fails fast with moetune's error (moetune.parallel.failure.RankLostError: which rank
noticed, at which step, in which operation, the group's timeout), never hangs.

* killed under torchrun: the survivor's error, and torchrun's agent names the killed rank (its
  failure summary) and ends the run;
* stopped (SIGSTOP: alive but silent; started as torchrun's workers are, without its agent):
  the survivor gives up after dist_timeout_s with the error naming that timeout;
* Ctrl-C reaching one rank only: every rank stops after the same step and checkpoints (without
  the per-step agreement, the ranks' collectives mismatched and the run hung).

Wall time is bounded: each run must end within a fixed number of seconds after the loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_parallel_train import _flags, _free_port  # noqa: E402

PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))
TIMEOUT_S = 4  # dist_timeout_s of the stopped-rank run
ARGS = dict(
    dtype="float32",
    device="cpu",
    max_steps=10000,  # never reached: a rank is lost first
    micro_batch_size=2,
    max_length=32,
    save_every=0,
    eval_every=0,
    progress=False,
    sample_prompts=[],
)


def _env(tag: str) -> dict:
    # MOETUNE_TEST_TAG: only this test reads it (to find its own processes in /proc)
    return {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", ""), "MOETUNE_TEST_TAG": tag}


def _train_args(run: str, **extra) -> list[str]:
    return ["-m", "moetune", "train", *_flags({**ARGS, "output_dir": run, **extra})]


def _wait_training(run: str, procs, limit_s: float = 120.0) -> None:
    """Until rank 0 has logged a training step (both ranks are in the step loop)."""
    path = os.path.join(run, "metrics.jsonl")
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line)["kind"] == "train" for line in f if line.strip()):
                    return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended before training started:\n{p.communicate()[0][-3000:]}")
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _worker_pid(tag: str, rank: int) -> int:
    """The pid of the moetune worker of `rank` started by this test (tag in its environment)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if f"MOETUNE_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and b"moetune" in cmd:
            if b"torch.distributed.run" not in cmd:
                return int(d)
    raise AssertionError(f"no worker of rank {rank} found")


def _end(procs, limit_s: float) -> list[str]:
    """Each process's output; fails if any is still running limit_s after the call (then killed)."""
    t0, outs = time.monotonic(), []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, limit_s - (time.monotonic() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"still running {limit_s} s later: a hang") from None
    return outs


def test_killed_rank_under_torchrun(tmp_path):
    tag, run = uuid.uuid4().hex, str(tmp_path / "run")
    # monitor interval 2 s: the survivor meets the dead peer before the agent tears it down, so
    # its own error is in the log too (the agent's default reacts faster)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    p = subprocess.Popen(
        [*cmd, "--monitor-interval", "2", *_train_args(run)],
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_training(run, [p])
    os.kill(_worker_pid(tag, 1), signal.SIGKILL)
    t_kill = time.monotonic()
    (out,) = _end([p], 30)
    assert p.returncode != 0
    assert "moetune train: error: moetune: rank 0 of 2, step" in out, out[-3000:]
    assert "another rank stopped" in out
    # torchrun's failure summary: the killed rank, by signal
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]
    assert time.monotonic() - t_kill < 30


def test_stopped_rank_times_out(tmp_path):
    """A rank that hangs (SIGSTOP) instead of dying: the other gives up after dist_timeout_s."""
    tag, run, port = uuid.uuid4().hex, str(tmp_path / "run"), _free_port()
    procs = []
    for rank in range(2):  # the launcher contract torchrun fulfils, without its agent
        env = {
            **_env(tag),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *_train_args(run, dist_timeout_s=TIMEOUT_S)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        _wait_training(run, procs)
        procs[1].send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        (out,) = _end(procs[:1], TIMEOUT_S + 30)
        waited = time.monotonic() - t_stop
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, out[-3000:]
    assert "moetune train: error: moetune: rank 0 of 2, step" in out, out[-3000:]
    assert f"did not answer within the process group's timeout ({TIMEOUT_S} s, dist_timeout_s)" in out
    assert "Timed out" in out  # gloo's own words, quoted
    assert waited >= TIMEOUT_S - 1  # it did wait for the stopped rank (not another failure)


def test_ctrl_c_on_one_rank_stops_every_rank(tmp_path):
    """Ctrl-C reaching one rank only (SIGINT to rank 1): every rank stops after the same step (the
    flag is agreed each step), the run checkpoints and ends cleanly, no mismatched collectives."""
    tag, run = uuid.uuid4().hex, str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    p = subprocess.Popen(
        [*cmd, *_train_args(run, save_every=10000)],
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_training(run, [p])
    os.kill(_worker_pid(tag, 1), signal.SIGINT)
    (out,) = _end([p], 60)
    assert p.returncode == 0, out[-3000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl")) if '"train"' in line]
    ckpts = os.listdir(os.path.join(run, "checkpoints"))
    assert ckpts == [f"step-{steps[-1]:08d}"], (ckpts, steps[-1])  # one checkpoint: the step both stopped after
    assert steps[-1] < ARGS["max_steps"]
