"""Moving experts between ranks during training (moetune.parallel.rebalance), 2 gloo processes:
the decision (plan_layer), the move of one layer (packed bytes of every engine format bit for bit,
biases, LoRA rows and optimizer state bit for bit), and training with a rebalance after every
step on a skewed routing against the same run without moving (losses, every LoRA gradient, the
gathered adapter and optimizer state within the parallel tests' tolerances: the math per slot is
the same, only which rank sums which partials changes), and a resume after a move; training,
resume and moetune train each with the non-expert part under DDP and under FSDP2."""

from __future__ import annotations

import ep_cases as C
import pytest
import rebalance_cases as RC
import torch
from op_cases import U

from moetune.parallel import LayerOwnership, by_index, by_load, fsdp, load_per_rank
from moetune.parallel.rebalance import LayerMoves, plan_layer
from moetune.parallel.rebalance_options import RebalanceOptions


def test_plan_layer_keeps_experts_in_place_and_needs_a_gain():
    own = by_index(6, 2)  # (0, 0, 0, 1, 1, 1)
    counts = [100, 90, 80, 1, 1, 1]
    new = plan_layer(own, counts, 0.1)
    # by_load: 100 -> a, 90 -> b, 80 -> b, then 1, 1, 1 -> a, i.e. groups {0, 3, 4, 5} and {1, 2};
    # the first is mostly on rank 1 already, the second wholly on rank 0: one expert moves (0 -> 1)
    assert by_load(counts, 2).owner == (0, 1, 1, 0, 0, 0)
    assert new.owner == (1, 0, 0, 1, 1, 1)
    assert load_per_rank(new, counts) == [170.0, 103.0] and max(load_per_rank(own, counts)) == 270.0
    # balanced already, or a gain below min_gain: stay
    assert plan_layer(own, [1, 1, 1, 1, 1, 1], 0.0) is None
    cur, best = max(load_per_rank(own, counts)), max(load_per_rank(new, counts))
    assert plan_layer(own, counts, (cur - best) / cur) is None
    assert plan_layer(own, counts, (cur - best) / cur * 0.99) == new
    assert plan_layer(own, [0] * 6, 0.0) is None  # nothing routed: nothing to balance


def test_layer_moves_agree_between_ranks():
    old, new = by_index(5, 2), LayerOwnership(RC.NEW_OWNER, 2)
    m0, m1 = LayerMoves.of(old, new, 0), LayerMoves.of(old, new, 1)
    assert m0.sends == [[], [0]] and m1.recvs == [[0], []]
    assert m1.sends == [[2, 4], []] and m0.recvs == [[], [2, 4]]


def test_options_validated():
    assert RebalanceOptions().every == 0  # never, unless asked
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        RebalanceOptions(-1)
    with pytest.raises(ValueError, match=r"min_gain must be in \[0, 1\)"):
        RebalanceOptions(1, 1.0)


BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not C.nccl_ready(2), reason="NCCL needs >= 2 CUDA devices")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_move_layer_bit_exact(tmp_path, backend):
    """Every engine format (bf16, int8 with biases, int4, int8 + transposed copy): after the move
    each rank holds exactly its new experts, each expert's packed bytes and biases equal the
    one-process engine's bit for bit (moved, not re-quantized) and compute the same output; the LoRA
    rows and optimizer state of moved experts arrive bit for bit, the rest stays untouched."""
    C.spawn(RC.move_worker, 2, tmp_path, str(tmp_path), backend)
    res = [torch.load(tmp_path / f"move{r}.pt") for r in range(2)]
    new = LayerOwnership(RC.NEW_OWNER, 2)
    for name, _, with_bias in RC.engine_options():
        total = 0
        for r in range(2):
            got = res[r][name]
            assert got["num_experts"] == len(new.owned(r)) and sorted(got["experts"]) == list(new.owned(r))
            total += got["packed_bytes"]
            for e, x in got["experts"].items():
                assert x["bytes"].keys() == x["ref_bytes"].keys()
                for b in x["bytes"]:
                    assert torch.equal(x["bytes"][b], x["ref_bytes"][b]), f"{name}: expert {e} buffer {b}"
                for b, rb in zip(x["biases"], x["ref_biases"]):
                    assert (b is None) == (rb is None) == (not with_bias)
                    assert b is None or torch.equal(b, rb)
                assert torch.equal(x["y"], x["ref_y"]), f"{name}: expert {e} output"
        assert total > 0
    old = by_index(C.E, 2)
    for n in "AB":
        for r in range(2):
            before, after = res[r]["lora"]["before"][n], res[r]["lora"]["after"][n]
            for v_before, v_after, src_all in zip(
                before, after, zip(*(res[s]["lora"]["before"][n] for s in range(2))), strict=True
            ):
                view = (
                    (lambda t: t.view(C.E, C.R, -1))
                    if n == "A"
                    else (lambda t: t.view(t.shape[0], C.R, C.E).permute(2, 0, 1))
                )
                for e in range(C.E):
                    a, b = old.owner[e], new.owner[e]
                    want = view(src_all[a])[e] if (a != b and b == r) else view(v_before)[e]
                    assert torch.equal(view(v_after)[e], want), f"LoRA {n}: rank {r} expert {e}"
        assert res[0]["lora"]["step"] == res[1]["lora"]["step"] == [3.0, 3.0]  # one counter per tensor: unmoved


def _fro_close(name, g, ref, c):
    err, scale = (g - ref).norm().item(), ref.norm().item()
    assert err <= c * U * scale, f"{name}: ||d||_F = {err:.4g} > {c}*u*{scale:.4g} (ratio {err / (U * scale):.2f})"


def assert_same_training(moving, fixed, adapter_moving, adapter_fixed) -> None:
    """A run that moved experts (per-rank records `moving`, its saved adapter folder) against the
    one that did not: losses (8u in the first step's micro-batches, 16u after), every LoRA gradient
    (14u), final LoRA values and AdamW moments (16u), eval loss, the saved adapters (16u)."""
    from safetensors.torch import load_file

    for r in range(2):
        for i, (a, b) in enumerate(zip(moving[r]["loss"], fixed[r]["loss"], strict=True)):
            c = 8 if i < C.ACCUM else 16
            assert abs(a - b) <= c * U * abs(b), f"loss {i} rank {r}: {a} vs {b}"
        for step, (ga, gb) in enumerate(zip(moving[r]["grads"], fixed[r]["grads"], strict=True)):
            assert ga.keys() == gb.keys()
            for n in gb:
                _fro_close(f"step {step} grad {n} rank {r}", ga[n], gb[n], 14)
        for n, v in fixed[r]["final"].items():
            _fro_close(f"final {n} rank {r}", moving[r]["final"][n], v, 16)
            for k, (a, b) in enumerate(zip(moving[r]["final_opt"][n][:2], fixed[r]["final_opt"][n][:2])):
                _fro_close(f"optimizer state {k} of {n} rank {r}", a, b, 16)
        assert abs(moving[r]["eval"] - fixed[r]["eval"]) <= 16 * U * abs(fixed[r]["eval"])
    a, b = (load_file(d / "adapter_model.safetensors") for d in (adapter_moving, adapter_fixed))
    assert a.keys() == b.keys()
    for k in b:
        _fro_close(f"adapter {k}", a[k], b[k], 16)


# The non-expert part under DDP, or sharded by FSDP2 (the routed experts and their LoRA are
# fully_shard's ignored_params: they move the same way; the step and the saves differ).
DATA_PARALLEL = [
    "ddp",
    pytest.param(
        "fsdp2", marks=pytest.mark.skipif(fsdp.unsupported_reason() is not None, reason=str(fsdp.unsupported_reason()))
    ),
]


@pytest.fixture(scope="module", params=DATA_PARALLEL)
def runs(request, tmp_path_factory):
    """The skewed training run without moving (every=0) and with a rebalance after every step, under
    DDP or FSDP2: (their folder, data_parallel)."""
    out = tmp_path_factory.mktemp(f"rebalance-{request.param}")
    for every in (0, 1):
        d = out / f"run{every}"
        d.mkdir()
        C.spawn(RC.rebalance_train_worker, 2, d, str(out), every, request.param)
    return out, request.param


def test_training_with_moves_matches_training_without(runs):
    """Tolerances: test_parallel_ep's (losses 8u first step, 16u after AdamW steps; gradients 14u
    Frobenius; adapter and optimizer state 16u Frobenius)."""

    runs, data_parallel = runs
    fixed = [torch.load(runs / f"rb0_{r}.pt") for r in range(2)]
    moving = [torch.load(runs / f"rb1_{r}.pt") for r in range(2)]
    for rec in fixed + moving:  # FSDP2 shards the non-expert part (its LoRA too), never the experts
        assert bool(rec["sharded"]) == (data_parallel == "fsdp2")
        assert any("q_proj.lora_A" in n for n in rec["sharded"]) or not rec["sharded"]
        assert not set(rec["sharded"]) & set(rec["expert_names"])
    # experts did move: the ownership changed, on both layers, and the engines hold the new sets
    owners = moving[0]["owners"]
    assert owners[0] == [by_index(C.E, 2).owner] * 2 and fixed[0]["owners"][-1] == owners[0]
    assert all(o != owners[0][i] for i, o in enumerate(owners[1])), owners
    assert owners == moving[1]["owners"]  # every rank decided the same
    for r in range(2):
        assert moving[r]["engine_experts"][-1] == [len(LayerOwnership(o, 2).owned(r)) for o in owners[-1]]
        moves = moving[r]["moves"]
        assert len(moves) == C.STEPS and moves[0]["numbers"]["moved_experts"] > 0
        assert moves[0]["numbers"]["busiest_after"] < moves[0]["numbers"]["busiest_before"]
        assert all(m["exact"] for m in moves)  # owners' values carried over bit for bit
        assert all(m["freed"] for m in moves) and moves[0]["replaced"] == moves[0]["numbers"]["moved_layers"] == 2
        assert moves[0]["gained_entries"] > 0
    assert_same_training(moving, fixed, runs / "adapter_1", runs / "adapter_0")
    for r in range(2):
        for n in fixed[r]["final"]:
            assert moving[r]["final_opt"][n][2] == fixed[r]["final_opt"][n][2] == C.STEPS


def test_resume_after_a_move(tmp_path, runs):
    """Stopped after 2 steps (experts moved), saved as moetune train saves (every expert from its
    owner), resumed in a fresh model (ownership by index again) for step 3: the same losses and
    final adapter as the uninterrupted run with moves."""
    runs, data_parallel = runs
    C.spawn(RC.resume_worker, 2, tmp_path, str(tmp_path), data_parallel)
    res = [torch.load(tmp_path / f"resume{r}.pt") for r in range(2)]
    moving = [torch.load(runs / f"rb1_{r}.pt") for r in range(2)]
    for r in range(2):
        assert res[r]["moved"] > 0 and res[r]["moved_after"] > 0
        for i, (a, b) in enumerate(zip(res[r]["loss"], moving[r]["loss"], strict=True)):
            c = 8 if i < C.ACCUM else 16
            assert abs(a - b) <= c * U * abs(b), f"loss {i} rank {r}: {a} vs {b}"
        for n, v in moving[r]["final"].items():
            _fro_close(f"final {n} rank {r}", res[r]["final"][n], v, 16)


# ---- moetune train under torchrun: --ep-rebalance-every, stopped after a move and resumed ----


def _torchrun(tmp_path, name: str, extra: dict) -> str:
    """The launcher's output of a 2-process `moetune train` (test_parallel_train's settings)."""
    import os
    import subprocess
    import sys

    import test_parallel_train as T

    args = ["-m", "moetune", "train", *T._flags({**T.COMMON, "grad_accum": 1, **extra})]
    env = {**os.environ, "PYTHONPATH": T.PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:  # a file, not a pipe (see test_parallel_train._launch)
        p = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
    out = log.read_text(errors="replace")
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("data_parallel", DATA_PARALLEL)
def test_moetune_train_rebalances_and_resumes(tmp_path, data_parallel):
    """--ep-rebalance-every 1 (min gain 0): experts move after the first steps (a rebalance record
    per step in metrics.jsonl, rank 0 says so), the run stops after step 2 and resumes (ownership
    by index again) to step 3; losses and the adapter match the one-process run (test_parallel_train's
    tolerances). Under DDP and under FSDP2 (--data-parallel fsdp2)."""
    import json
    import os

    import test_parallel_train as T
    from safetensors.torch import load_file

    from moetune.demo import DEMO_DEFAULTS
    from moetune.train.config import make_config
    from moetune.train.loop import train

    ref = str(tmp_path / "one")
    cfg = make_config(None, {**T.COMMON, "grad_accum": 2, "output_dir": ref, "engine_threads": 1}, base=DEMO_DEFAULTS)
    train(cfg, say=lambda *a: None)
    run = str(tmp_path / "run")
    extra = {"output_dir": run, "ep_rebalance_every": 1, "ep_rebalance_min_gain": 0.0, "data_parallel": data_parallel}
    out = _torchrun(tmp_path, "first", {**extra, "stop_after_steps": 2})
    assert "experts moved between ranks" in out, out[-3000:]
    first = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    moves = [r for r in first if r["kind"] == "rebalance"]
    assert [r["step"] for r in moves] == [1, 2] and moves[0]["moved_experts"] > 0
    assert all(r["busiest_after"] <= r["busiest_before"] for r in moves)
    out = _torchrun(tmp_path, "resumed", {**extra, "resume": "latest"})
    assert "resumed from" in out, out[-3000:]
    ours = [r for r in T._records(run) if r["kind"] == "train"]
    theirs = [r for r in T._records(ref) if r["kind"] == "train"]
    assert [r["step"] for r in ours] == [1, 2, 3] and len(theirs) == 3
    assert [r["step"] for r in T._records(run) if r["kind"] == "rebalance"] == [1, 2, 3]
    for a, b in zip(ours, theirs):
        assert a["target_tokens"] == b["target_tokens"]
        assert abs(a["loss"] - b["loss"]) <= 16 * U * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    a = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(ref, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        _fro_close(f"adapter {k}", a[k], b[k], 16)
