"""What one host shows of expert parallelism (issue 16): LoRA training steps of a Qwen3-MoE-shaped
model (synthetic weights) (a) in ONE process whose engine uses all C cores, and (b) in TWO ranks
(torchrun, gloo) on the same host, each owning half of every layer's routed experts and pinned to
its own disjoint half of the C cores (moetune.parallel.cpus.rank_context), side by side in one run.

    python benchmarks/bench_ep_one_host.py --size tiny                 # CI-class CPU: seconds
    python benchmarks/bench_ep_one_host.py --size medium --cores 16 --device cuda

Both runs train the same global batch per step: (a) 2 x --batch sequences of --seq random tokens,
(b) --batch of them on each rank (the same tokens). LoRA r=16 on q/k/v/o and on the routed experts,
gradient checkpointing (non-reentrant), AdamW, global-norm clipping; the routed experts always run
on the CPU engine (placement "cpu"); the non-expert part on the CPU, or with --device cuda on the one
GPU (both ranks share it: DDP's all-reduce and the token exchange go through gloo). torch's own
threads: --torch-threads in (a), half of them (at least 1) on each rank of (b).

Printed, per run: tokens/s (the global batch's tokens over the median step), (b) / (a), and per
process: the step, the engine's busy seconds (the experts' compute), the seconds the training thread
waited on the engine, the seconds inside the token exchange (moetune.parallel's all_to_all_single:
the transfer AND the wait for the other rank, i.e. load imbalance), the experts' packed bytes and the
host RSS (VmRSS after the steps; VmHWM, the peak, includes building the synthetic model). The sum of
the ranks' expert bytes against the one process's shows one copy of the experts on the host.

NOT a speed test of several GPUs: with --device cuda both ranks share ONE GPU (and gloo, not NCCL),
so (b) cannot gain from a second GPU; what this measures is the CPU side of one host (the experts on
two pinned halves of the cores plus the exchange between them against one engine on all the cores).
Multi-GPU figures (NCCL, one GPU per rank) belong to a machine with several GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import bench_train_step as bts

GiB = 2.0**30

# Sizes: Qwen3-30B-A3B's layer shape for "medium" (H 2048, I 768, E 128, k 8), fewer layers and a
# smaller vocabulary; "tiny" runs in seconds on a 2-core CPU. Every field can be set by its flag.
SIZES = {
    "tiny": dict(
        layers=2, hidden=64, intermediate=32, experts=8, topk=2, heads=4, kv_heads=2, vocab=256, seq=32, batch=1
    ),
    "small": dict(
        layers=2, hidden=512, intermediate=256, experts=32, topk=4, heads=8, kv_heads=2, vocab=2048, seq=256, batch=1
    ),
    "medium": dict(
        layers=2,
        hidden=2048,
        intermediate=768,
        experts=128,
        topk=8,
        heads=16,
        kv_heads=4,
        vocab=8192,
        seq=1024,
        batch=1,
    ),
}
FIELDS = tuple(SIZES["tiny"])
STEP_DEFAULTS = {"tiny": (1, 2), "small": (1, 3), "medium": (1, 3)}  # (warm-up, timed) steps


def model_config(a):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.intermediate,  # dense MLP (unused: every layer is a MoE layer)
        moe_intermediate_size=a.intermediate,
        num_experts=a.experts,
        num_experts_per_tok=a.topk,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=max(4096, a.seq),
        norm_topk_prob=True,
        tie_word_embeddings=False,
        mlp_only_layers=[],
    )


def batch_ids(a, rank: int):
    """Rank `rank`'s --batch sequences of random tokens (the one process takes both ranks')."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)


class ExchangeClock:
    """Wall seconds inside torch.distributed.all_to_all_single (moetune.parallel's token exchange
    and its split sizes): the transfer plus the wait for the other rank. Installed in a rank only."""

    def __init__(self):
        import torch.distributed as dist

        self.seconds = 0.0
        inner = dist.all_to_all_single

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        dist.all_to_all_single = timed


def child(kind: str, a) -> dict:
    """One process of run (a) (kind "one") or one rank of run (b) (kind "ep"); returns its numbers."""
    import torch

    import moetune
    import moetune.hf
    from moetune.hf import patching
    from moetune.parallel import grads

    device = torch.device(a.device)
    ep, clock, rank, world = None, None, 0, 1
    if kind == "ep":
        import torch.distributed as dist

        from moetune import topology
        from moetune.parallel import ExpertParallel
        from moetune.parallel.cpus import rank_context
        from moetune.parallel.launcher import init_from_launcher

        launch = init_from_launcher(backend="gloo")  # both ranks share the one GPU: no NCCL
        rank, world = launch.rank, launch.world_size
        ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
        ctx = rank_context(launch.local_rank, launch.local_world_size, torch_threads=max(1, a.torch_threads // 2))
        cpus = topology.rank_cpus(launch.local_rank, launch.local_world_size).cpus  # what rank_context pins to
        clock = ExchangeClock()
    else:
        torch.set_num_threads(a.torch_threads)
        cpus = tuple(sorted(os.sched_getaffinity(0)))  # the C cores main() gave this process
        ctx = moetune.Context(len(cpus), cpus=cpus)
    t0 = time.perf_counter()
    bts.build_model.experts_on_device = False
    model = bts.build_model(model_config(a), device)
    handle = moetune.hf.patch(model, ctx=ctx, keep_original=False, placement="cpu", expert_parallel=ep)
    model.to(device)
    pm = bts.lora_model(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    tensors, call = [], pm
    if ep is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from moetune.parallel.expert_lora import expert_lora_tensors

        tensors = expert_lora_tensors(pm)
        grads.ddp_ignore(pm, tensors)
        call = DDP(pm, device_ids=[device.index or 0] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=1e-5)
    build_s = time.perf_counter() - t0
    ids = batch_ids(a, rank) if ep is not None else torch.cat([batch_ids(a, r) for r in range(2)])
    ids = ids.to(device)
    steps, busy, wait, exch = [], [], [], []
    for step in range(a.warmup + a.steps):
        b0, w0, x0 = ctx.busy_seconds(), ctx.wait_seconds, clock.seconds if clock else 0.0
        t = time.perf_counter()
        loss = call(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if ep is not None:
            grads.scale_expert_grads(tensors, world)
            grads.clip_grad_norm_(params, 1.0, tensors)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            steps.append(time.perf_counter() - t)
            busy.append(ctx.busy_seconds() - b0)
            wait.append(ctx.wait_seconds - w0)
            exch.append((clock.seconds if clock else 0.0) - x0)
    engines = [patching.experts_state(f.module).engine for f in patching.find_experts(pm)]
    out = {
        "kind": kind,
        "rank": rank,
        "engine_threads": ctx.num_threads,
        "engine_cpus": list(cpus),
        "torch_threads": torch.get_num_threads(),
        "experts_here": [e.num_experts for e in engines],
        "expert_bytes": int(sum(e.packed_bytes for e in engines)),
        "tokens_per_step": int(ids.numel()),
        "step_s": statistics.median(steps),
        "busy_s": statistics.median(busy),
        "wait_s": statistics.median(wait),
        "exchange_s": statistics.median(exch),
        "rss_gib": bts.status_kib("VmRSS") * 1024 / GiB,
        "rss_peak_gib": bts.status_kib("VmHWM") * 1024 / GiB,
        "build_s": build_s,
        "loss": loss.item(),
    }
    del handle
    if ep is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return out


def _child_args(a) -> list[str]:
    out = []
    for f in (*FIELDS, "warmup", "steps", "cores", "torch_threads", "device"):
        out += ["--" + f.replace("_", "-"), str(getattr(a, f))]
    return out


def _run(cmd: list[str], cpus: list[int], log: str) -> None:
    """cmd on `cpus` (the children inherit the affinity), its output to its own file `log`."""
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus)
        )
        try:
            rc = p.wait(timeout=3600)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (rc {rc}); the end of {log}:\n{tail}")


def resolve(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=tuple(SIZES), help="the defaults of the shape flags below")
    for f in FIELDS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"(default: the size's {f})")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: the size's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, median (default: the size's)")
    ap.add_argument(
        "--cores", type=int, default=None, help="C: the cores of both runs (default: every core this process may use)"
    )
    ap.add_argument("--torch-threads", type=int, default=2, help="torch's threads in (a); (b): half per rank")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the non-expert part runs")
    ap.add_argument("--out", default=None, help="folder for the processes' logs and results (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", choices=("one", "ep"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for f in FIELDS:
        if getattr(a, f) is None:
            setattr(a, f, SIZES[a.size][f])
    warm, steps = STEP_DEFAULTS[a.size]
    a.warmup = warm if a.warmup is None else a.warmup
    a.steps = steps if a.steps is None else a.steps
    allowed = sorted(os.sched_getaffinity(0))
    a.cores = len(allowed) if a.cores is None else a.cores
    if not 2 <= a.cores <= len(allowed):
        ap.error(f"--cores must be in 2..{len(allowed)} (this process may use {len(allowed)} cores): got {a.cores}")
    if a.experts < 2:
        ap.error("--experts must be >= 2 (each rank owns some)")
    if a.hidden % a.heads:
        ap.error(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    return a


def main(argv=None) -> dict:
    """Runs (a) and (b), prints the table; returns {"one": numbers, "ep": [rank numbers], "ratio": b/a}."""
    a = resolve(argv)
    if a.child is not None:
        res = child(a.child, a)
        with open(a.result.replace("RANK", str(res["rank"])), "w") as f:
            json.dump(res, f)
        return res
    import tempfile

    out = a.out or tempfile.mkdtemp(prefix="bench-ep-one-host-")
    os.makedirs(out, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))[: a.cores]
    here = os.path.abspath(__file__)
    env_py = [sys.executable]
    t0 = time.perf_counter()
    one_json = os.path.join(out, "one.json")
    _run([*env_py, here, *_child_args(a), "--child", "one", "--result", one_json], cpus, os.path.join(out, "one.log"))
    t1 = time.perf_counter()
    logs = os.path.join(out, "ep-logs")  # torchrun: each rank's output in its own file
    _run(
        [
            *env_py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            logs,
            "--redirects",
            "3",
            here,
            *_child_args(a),
            "--child",
            "ep",
            "--result",
            os.path.join(out, "ep-RANK.json"),
        ],
        cpus,
        os.path.join(out, "ep.log"),
    )
    t2 = time.perf_counter()
    with open(one_json) as f:
        one = json.load(f)
    ranks = []
    for r in range(2):
        with open(os.path.join(out, f"ep-{r}.json")) as f:
            ranks.append(json.load(f))
    tps_one = one["tokens_per_step"] / one["step_s"]
    tokens_ep = sum(r["tokens_per_step"] for r in ranks)
    tps_ep = tokens_ep / max(r["step_s"] for r in ranks)
    res = {
        "config": {f: getattr(a, f) for f in (*FIELDS, "warmup", "steps", "cores", "torch_threads", "device")},
        "one": one,
        "ep": ranks,
        "tokens_per_s_one": tps_one,
        "tokens_per_s_ep": tps_ep,
        "ratio": tps_ep / tps_one,
        "expert_bytes_one": one["expert_bytes"],
        "expert_bytes_ep_sum": sum(r["expert_bytes"] for r in ranks),
        "wall_s": {"one": t1 - t0, "ep": t2 - t1},
        "out": out,
    }
    _print(res, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _print(res: dict, a) -> None:
    c = res["config"]
    print(
        f"model: Qwen3-MoE-shaped, {c['layers']} MoE layers, H {c['hidden']}, I {c['intermediate']}, E {c['experts']}, "
        f"k {c['topk']}, vocab {c['vocab']}; global batch {2 * c['batch']} x {c['seq']} tokens per step; "
        f"{c['warmup']} warm-up + {c['steps']} timed steps (median); C = {c['cores']} cores; non-expert part on "
        f"{c['device']}"
    )
    if c["device"] == "cuda":
        print(
            "NOTE: both ranks of (b) share ONE GPU (gloo): this is not a multi-GPU speed test; it shows the host "
            "side (experts on two pinned halves of the cores + the exchange) against one engine on all cores."
        )
    print(
        f"{'run':<14}{'tokens/s':>10}{'step s':>9}{'engine busy s':>15}{'engine wait s':>15}{'exchange s':>12}"
        f"{'experts':>9}{'expert MiB':>12}{'RSS GiB':>9}{'peak GiB':>10}  cpus"
    )
    rows = [("(a) 1 process", res["one"], res["tokens_per_s_one"])]
    rows += [(f"(b) rank {r['rank']}", r, res["tokens_per_s_ep"] if r["rank"] == 0 else None) for r in res["ep"]]
    for name, r, tps in rows:
        print(
            f"{name:<14}{'' if tps is None else f'{tps:,.0f}':>10}{r['step_s']:>9.3f}{r['busy_s']:>15.3f}"
            f"{r['wait_s']:>15.3f}{r['exchange_s']:>12.3f}{sum(r['experts_here']):>9}"
            f"{r['expert_bytes'] / 2**20:>12.1f}{r['rss_gib']:>9.2f}{r['rss_peak_gib']:>10.2f}  "
            f"{_cpulist(r['engine_cpus'])} (engine x{r['engine_threads']}, torch x{r['torch_threads']})"
        )
    ep_rss = sum(r["rss_gib"] for r in res["ep"])
    print(
        f"(b) / (a) tokens/s: {res['ratio']:.2f}x   expert bytes: ranks' sum {res['expert_bytes_ep_sum'] / 2**20:.1f} "
        f"MiB vs one process {res['expert_bytes_one'] / 2**20:.1f} MiB (one copy of the experts on the host); "
        f"RSS: ranks' sum {ep_rss:.2f} GiB vs one process {res['one']['rss_gib']:.2f} GiB (each rank also holds "
        "its own copy of the non-expert part, torch and the interpreter)"
    )
    print(f"wall: (a) {res['wall_s']['one']:.0f} s, (b) {res['wall_s']['ep']:.0f} s; logs and results in {res['out']}")


def _cpulist(cpus) -> str:
    from moetune.topology import format_cpulist

    return format_cpulist(cpus)


if __name__ == "__main__":
    main()
