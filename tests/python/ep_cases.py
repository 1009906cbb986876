"""Workers of the expert-parallel tests (test_parallel_*.py): functions run in each of N
spawned processes (torch.multiprocessing, gloo over a file store), writing their results
to files that the test (one process) compares with the single-process runs."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

E, H, I, R = 5, 32, 16, 4  # E not divisible by 2: ownership 2 / 3
K = 2


def init(rank: int, world: int, store: str, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def spawn(fn, world: int, tmp_path, *args) -> None:
    """Runs fn(rank, world, store, *args) in `world` processes; raises if any fails."""
    import torch.multiprocessing as mp

    store = str(tmp_path / "store")
    mp.spawn(fn, args=(world, store, *args), nprocs=world, join=True)


# ---- one layer: EPLayer against the engine on every expert ----


def layer_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = [(torch.randn(s, generator=g) * 0.2).bfloat16() for s in ((E, I, H), (E, I, H), (E, H, I))]
    lora = {}
    for p, (i, o) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items():
        lora[p] = ((torch.randn(E, R, i, generator=g) * 0.2), (torch.randn(E, o, R, generator=g) * 0.2))
    return W, lora


def layer_inputs(rank: int, case: str):
    """x [T, H] bf16, topk_ids [T, k], topk_weights fp32, upstream gradient, for one rank."""
    g = torch.Generator().manual_seed(100 + rank)
    T = 9 if rank == 0 else 6
    x = (torch.randn(T, H, generator=g)).bfloat16()
    if case == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif case == "skewed":
        # every token of every rank on experts 0 and 1 (rank 0's): rank 1 receives no token at
        # all and owns experts (2, 3, 4) that no token uses
        ids = torch.tensor([[0, 1]] * T) if rank == 1 else torch.tensor([[1, 0]] * T)
    else:
        raise KeyError(case)
    w = torch.rand(T, K, generator=g) + 0.1
    dout = torch.randn(T, H, generator=g)
    return x, ids, w, dout


def layer_worker(rank: int, world: int, store: str, case: str, out: str) -> None:
    import moetune
    from moetune.parallel import ExpertParallel
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.layer import EPLayer

    init(rank, world, store)
    ep = ExpertParallel.from_group()
    own = ep.ownership(0, E)
    W, lora = layer_weights()
    owned = torch.tensor(own.owned(rank))
    ctx = rank_context(rank, world)
    engine = moetune.MoEExperts(ctx, *(w[owned] for w in W))
    layer = EPLayer(ep, own)
    x, ids, w, dout = layer_inputs(rank, case)
    x.requires_grad_(True)
    w.requires_grad_(True)
    leaves = {p: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for p, (a, b) in lora.items()}
    lw = moetune.LoraWeights(**leaves, scaling=0.5)

    def compute(xr, lid, wr, ll):
        return moetune.moe_experts(engine, xr, lid, wr, ll)

    y = layer.forward(x, ids, w, lw, compute)
    (y.float() * dout).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "dx": x.grad,
            "dw": w.grad,
            "dA": {p: a.grad for p, (a, b) in leaves.items()},
            "dB": {p: b.grad for p, (a, b) in leaves.items()},
            "owned": owned,
            "tokens_in": layer.tokens_in,
            "rows": layer.rows,
            "cpus": ctx.num_threads,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
