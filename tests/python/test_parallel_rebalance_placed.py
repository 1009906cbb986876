"""Moving experts between ranks while a GPU placement is active on every rank
(moetune.parallel.rebalance -> moetune.hf.placement.ModelPlacement.replace_engine), 2 gloo
processes with the GPU path on its CPU stand-in (PlacementOptions(device="cpu"), mode "gpu":
every routed expert computed by the GPU path), for a streamed plan (no resident budget) and a
resident one (every expert held from the first refresh on, layers planned once per step); the
`cuda_` cases run the same on a CUDA device (skipped without one).

rebalance_cases.placed_rebalance_train_worker trains the skewed model of test_parallel_rebalance
(grad_accum 2, gradient checkpointing, clipping, AdamW) without moving and with a rebalance after
every step; the run that moves must match the one that does not within the tolerances of
test_parallel_rebalance (the math per slot is the same; which rank sums which partials and, right
after a move, streamed rather than resident weights change). Around each move the placement must
have rebuilt the moved layers for their new experts and forgotten their old per-index state."""

from __future__ import annotations

import ep_cases as C
import pytest
import rebalance_cases as RC
import torch
from test_parallel_rebalance import assert_same_training

from moetune.parallel import LayerOwnership, by_index

PLACEMENTS = {
    "streamed": dict(mode="gpu", device="cpu", gpu_budget_gib=0.0, calibrate=False),
    # residents from the first refresh (warm-up 1) on; the cadence far away, so that after a move
    # only the replacement's own refresh (at the next end_step) makes the moved layer resident again
    "resident": dict(mode="gpu", device="cpu", gpu_budget_gib=1.0, warmup_steps=1, refresh_every=50, calibrate=False),
}
# The same on a CUDA device (both ranks' placements on the one GPU there is, gloo for the expert
# exchange: expert parallelism with a GPU placement, not a speed test); skipped without CUDA.
PLACEMENTS.update({f"cuda_{k}": {**v, "device": "cuda"} for k, v in list(PLACEMENTS.items())})
PREFIX = "placement_"
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(
    scope="module",
    params=[pytest.param(k, marks=[_NO_CUDA] if k.startswith("cuda_") else []) for k in sorted(PLACEMENTS)],
)
def placed(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"placed_{request.param}")
    d = out / "spawn"
    d.mkdir()
    C.spawn(RC.placed_rebalance_train_worker, 2, d, str(out), PLACEMENTS[request.param])
    return request.param.removeprefix("cuda_"), out


def test_moves_with_an_active_gpu_placement_match_training_without(placed):

    plan, runs = placed
    fixed = [torch.load(runs / f"rbplaced0_{r}.pt") for r in range(2)]
    moving = [torch.load(runs / f"rbplaced1_{r}.pt") for r in range(2)]

    # the placement computed every routed slot on the GPU path, in both runs, on both ranks
    for run in fixed + moving:
        for numbers in run["placed"]:
            assert numbers[PREFIX + "tokens_cpu"] == 0
            assert numbers[PREFIX + "tokens_resident"] + numbers[PREFIX + "tokens_streamed"] > 0
            if plan == "streamed":
                assert numbers[PREFIX + "tokens_resident"] == 0
    for r in range(2):
        assert all(n[PREFIX + "tokens_resident"] > 0 for n in fixed[r]["placed"][1:]) == (plan == "resident")
        last = fixed[r]["placement"][-1]
        if plan == "resident":
            assert last["steady"] == [True, True] and last["resident"] == last["gpu_experts"]
        else:
            assert last["resident"] == [0, 0] and last["held_bytes"] == 0

    # experts moved: the ownership changed on both layers, every rank decided the same
    owners = moving[0]["owners"]
    assert owners[0] == [by_index(C.E, 2).owner] * 2 and fixed[0]["owners"][-1] == owners[0]
    assert all(o != owners[0][i] for i, o in enumerate(owners[1])), owners
    assert owners == moving[1]["owners"]
    for r in range(2):
        moves = moving[r]["moves"]
        assert len(moves) == RC.PLACED_STEPS and moves[0]["numbers"]["moved_experts"] > 0
        assert all(m["exact"] for m in moves) and all(m["freed"] for m in moves)
        assert moves[0]["replaced"] == moves[0]["numbers"]["moved_layers"] == 2
        assert "cannot be released in the middle of a step" in moving[r]["refused_mid_step"]
        for step, (after_move, ended) in enumerate(zip(moving[r]["placement_moved"], moving[r]["placement"][1:])):
            mine = [len(LayerOwnership(o, 2).owned(r)) for o in owners[step + 1]]
            # right after the move: the GPU side built for the layer's new engine and expert count
            assert after_move["built_for_engine"] == [True, True] and after_move["gpu_experts"] == mine
            assert after_move["closed"] == [False, False]
            moved = [a != b for a, b in zip(owners[step], owners[step + 1])]
            for li, m in enumerate(moved):
                if m:  # forgotten: nothing resident, planned per call again
                    assert after_move["resident"][li] == 0 and not after_move["steady"][li]
            if plan == "resident":  # the next end_step chose its residents again: held, planned per step
                assert ended["resident"] == ended["gpu_experts"] == mine and ended["steady"] == [True, True]
        if plan == "resident":
            resident_after_move(moving[r], owners)

    # the same training (test_parallel_rebalance's tolerances)
    assert_same_training(moving, fixed, runs / "adapterplaced_1", runs / "adapterplaced_0")


def resident_after_move(run: dict, owners: list) -> None:
    """The resident plan's moving run went through both states of a moved layer: the step right
    after a move computes it from streamed weights, and a layer moved earlier, held again and not
    moved since computes from its residents (the run must contain such a step)."""
    seen = False
    for s in range(1, len(run["placed"])):  # step s (0-based) ran with owners[s]
        moved_before = [a != b for a, b in zip(owners[s - 1], owners[s])]
        if any(moved_before):
            assert run["placed"][s][PREFIX + "tokens_streamed"] > 0, f"step {s}: a moved layer streams"
        held = [
            li
            for li in range(len(owners[s]))
            if not moved_before[li] and any(owners[j][li] != owners[0][li] for j in range(s))
        ]
        if held:
            assert run["placed"][s][PREFIX + "tokens_resident"] > 0, f"step {s}: layers {held} compute resident"
            seen = True
    assert seen, "no step computed a layer held again after its move"
