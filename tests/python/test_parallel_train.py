"""`moetune train` under torchrun / accelerate launch (2 processes, gloo, CPU): expert parallelism + DDP against one
process training on the same micro-batches (grad_accum x 2): losses per step within 16u (the
AdamW-steps bound of test_hf_exactness), grad norms within 14u, the final eval loss of the
gathered adapter within 16u, every tensor of the saved adapter within 16u (Frobenius); on one
host, as 2 "nodes" of one rank each (torchrun --nnodes 2 on localhost, c10d rendezvous), and
under `accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; on the CPU too), and
with the non-expert part under FSDP2 (`--data-parallel fsdp2`) instead of DDP.
Rank 0 alone prints, writes the metrics file and the adapter.

`moetune train` without --model is the embedded demo, whose settings (moetune.demo.DEMO_DEFAULTS:
LoRA rank, warmup, sample prompts...) sit on top of TrainConfig's defaults: the one-process
reference is made with the same base, and the two runs' saved configs are compared, so the
comparison is between the same training runs."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from moetune.demo import DEMO_DEFAULTS  # noqa: E402
from moetune.train.config import make_config  # noqa: E402
from moetune.train.loop import train  # noqa: E402

U = 2.0**-8
PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))
STEPS = 3
COMMON = dict(
    dtype="float32",
    device="cpu",
    max_steps=STEPS,
    lr=1e-2,
    micro_batch_size=2,
    save_every=2,
    eval_every=0,
    lora_dropout=0.0,
    max_length=48,
    progress=False,
    max_new_tokens=4,  # the demo's before / after generations run under expert parallelism too
    tensorboard=False,
    plot=False,
)


def _flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            out += [flag, *map(str, v)]  # an empty list: the flag alone
        else:
            out += [flag, str(v)]
    return out


def _records(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _config(run) -> dict:
    import yaml

    with open(os.path.join(run, "config.yaml")) as f:
        return yaml.safe_load(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = make_config(
        None, {**COMMON, "grad_accum": 2, "output_dir": str(out), "engine_threads": 1}, base=DEMO_DEFAULTS
    )
    train(cfg, say=lambda *a: None)
    return str(out)


# The settings each launch kind adds to COMMON (fsdp2: the non-expert part sharded by FSDP2).
EXTRA = {
    "torchrun-cuda": {"device": "cuda"},
    "profile": {"ep_routing_profile": 2},
    "fsdp2": {"data_parallel": "fsdp2"},
    "fsdp2-cuda": {"data_parallel": "fsdp2", "device": "cuda"},
}


def _launch(tmp_path, how: str, overrides: dict | None = None) -> tuple[str, str]:
    """(run folder, the launcher's output) of a 2-process `moetune train`: how = "torchrun" (one
    host), "nodes" (2 torchrun node groups on localhost), "accelerate" (accelerate launch) or
    "torchrun-cuda" (one host, each rank's non-expert part on its own GPU, NCCL); overrides: more
    settings (after EXTRA's)."""
    run = str(tmp_path / "run")
    extra = {**EXTRA.get(how, {}), **(overrides or {})}
    args = ["-m", "moetune", "train", *_flags({**COMMON, "grad_accum": 1, "output_dir": run, **extra})]
    env = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tr = [sys.executable, "-m", "torch.distributed.run"]
    logs = []

    def log():
        logs.append(open(tmp_path / f"launch{len(logs)}.log", "w"))
        return logs[-1]

    if how == "accelerate":
        # accelerate's multi-process launcher is torchrun's (torch.distributed.run): it sets the
        # same variables. --cpu would not do: it starts ONE process (several only through mpirun)
        acc = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        acc += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        acc += ["--main_process_port", str(_free_port())]
        procs = [subprocess.Popen([*acc, *args], env=env, stdout=log(), stderr=subprocess.STDOUT, text=True)]
    elif how in ("torchrun", "torchrun-cuda", "profile", "fsdp2", "fsdp2-cuda"):
        procs = [
            subprocess.Popen(
                [*tr, "--standalone", "--nproc-per-node", "2", *args],
                env=env,
                stdout=log(),
                stderr=subprocess.STDOUT,
                text=True,
            )
        ]
    else:
        port = _free_port()
        procs = [
            subprocess.Popen(
                [
                    *tr,
                    "--nnodes",
                    "2",
                    "--node-rank",
                    str(i),
                    "--nproc-per-node",
                    "1",
                    "--rdzv-backend",
                    "c10d",
                    f"--rdzv-endpoint=localhost:{port}",
                    "--rdzv-id",
                    "ep",
                    *args,
                ],
                env=env,
                stdout=log(),
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
    # Each process writes into its own file, not a pipe: waiting on one process while another's pipe
    # fills up (64 KiB of warnings or progress) would block that rank mid-collective and hang both.
    deadline = time.monotonic() + 300
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
            q.wait()
        raise
    finally:
        for f in logs:
            f.close()
    outs = [pathlib.Path(f.name).read_text(errors="replace") for f in logs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return run, "".join(outs)


def _check_ownership(run: str) -> None:
    """The profile's record: every layer's owners are by_load of its counts (8 experts over 2 ranks),
    which here differ from by_index and lower the busiest rank's load on the profile."""
    from moetune.parallel import by_index, by_load

    with open(os.path.join(run, "ep_ownership.json")) as f:
        rec = json.load(f)
    assert sorted(rec) == ["0", "1"]
    sums = {sum(r["counts"]) for r in rec.values()}
    assert len(sums) == 1 and sums.pop() > 0  # every layer sees the same token slots (k per token)
    for r in rec.values():
        assert len(r["counts"]) == 8 and tuple(r["owner"]) == by_load(r["counts"], 2).owner
        assert sorted(set(r["owner"])) == [0, 1]
    assert any(tuple(r["owner"]) != by_index(8, 2).owner for r in rec.values())
    assert sum(max(r["load_by_load"]) for r in rec.values()) < sum(max(r["load_by_index"]) for r in rec.values())


CUDA2 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs >= 2 CUDA devices (NCCL)"
)


@pytest.mark.parametrize(
    "how",
    [
        "torchrun",
        "nodes",
        "accelerate",
        "profile",
        "fsdp2",
        pytest.param("torchrun-cuda", marks=CUDA2),
        pytest.param("fsdp2-cuda", marks=CUDA2),
    ],
)
def test_launch_matches_one_process(tmp_path, one_process, how):
    """On CUDA the reference is still the one-process CPU run (device differs from it too).
    profile: expert ownership balanced by a routing profile of 2 micro-batches per rank. fsdp2: the
    non-expert part sharded by FSDP2 instead of replicated by DDP (`--data-parallel fsdp2`)."""
    if how == "accelerate":
        pytest.importorskip("accelerate")
    run, out = _launch(tmp_path, how)
    # rank 0 alone speaks: one banner, counting both ranks' batches
    assert out.count("\nmoetune train\n") == 1 and "(2 x 1 accumulated x 2 ranks)" in out, out[-3000:]
    # the same run but for the split of each step's micro-batches over ranks and the engine threads
    ours_cfg, ref_cfg = (_config(r) for r in (run, one_process))
    differ = {k for k in ours_cfg.keys() | ref_cfg.keys() if ours_cfg.get(k) != ref_cfg.get(k)}
    expected = {"output_dir", "grad_accum", "engine_threads"}
    expected |= set(EXTRA.get(how, {}))
    assert differ == expected, differ
    if how == "profile":
        _check_ownership(run)
    else:
        assert not os.path.exists(os.path.join(run, "ep_ownership.json"))
    ours = [r for r in _records(run) if r["kind"] == "train"]
    ref = [r for r in _records(one_process) if r["kind"] == "train"]
    assert len(ours) == len(ref) == STEPS
    for a, b in zip(ours, ref):
        assert a["target_tokens"] == b["target_tokens"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 16 * U * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 14 * U * b["grad_norm"]
        for r in range(2):  # per-rank expert load and its CPU / GPU split (all on the CPU off CUDA)
            assert a[f"ep_rows_rank{r}"] > 0
            assert a[f"ep_cpu_rows_rank{r}"] + a[f"ep_gpu_rows_rank{r}"] == a[f"ep_rows_rank{r}"]
            if EXTRA.get(how, {}).get("device") != "cuda":
                assert a[f"ep_gpu_rows_rank{r}"] == 0
    ev = [r["eval_loss"] for r in _records(run) if r["kind"] == "eval"][-1]
    ev_ref = [r["eval_loss"] for r in _records(one_process) if r["kind"] == "eval"][-1]
    assert abs(ev - ev_ref) <= 16 * U * abs(ev_ref)
    # one adapter with every expert's factors, shaped as the one-process one
    from safetensors.torch import load_file

    a = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(one_process, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    for k in b:
        err, scale = (a[k] - b[k]).norm().item(), b[k].norm().item()
        assert err <= 16 * U * scale, f"adapter {k}: ||d||_F = {err:.3g}, ||ref||_F = {scale:.3g}"
    experts = [k for k in a if ".experts." in k and "lora_A" in k]
    assert experts and all(
        torch.count_nonzero(a[k].view(8, -1, a[k].shape[-1]).abs().sum(-1)) == a[k].shape[0] for k in experts
    )  # every expert's rows present (lora_A is random, nonzero)
    assert os.path.isdir(os.path.join(run, "checkpoints"))
