#!/usr/bin/env python
"""Time of the placement scheduler's plan() per layer call, and of one residency refresh.

The scheduler runs once per MoE layer call (forward, backward, recompute), so its Python time is
paid per layer per step: target < 1 ms. Reference-machine coefficients (cost.ReferenceRates),
Qwen3-30B-A3B expert shapes with E experts, Dirichlet-skewed routing with T tokens x top-8, a
third of the experts resident. Prints the median / p90 microseconds of plan() (process CPU
time, so a loaded machine does not inflate it), the streamed / resident / CPU split and the
predicted ms against all-CPU and all-GPU, then one ResidencyPolicy.refresh() over --layers
layers. Also prints the time of a few trivial numpy operations, the floor any vectorised Python
code on this machine stands on.

  python benchmarks/bench_scheduler.py
  python benchmarks/bench_scheduler.py --experts 128 256 384 --tokens 256 4096 16384 --reps 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import cpu_name

from moetune.placement.cost import CostModel, LayerShape
from moetune.placement.residency import ResidencyPolicy
from moetune.placement.scheduler import Scheduler


def cpu_us(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.process_time_ns()
        fn()
        out.append((time.process_time_ns() - t0) / 1e3)
    return statistics.median(out), float(np.percentile(out, 90))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096, 16384])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=48, help="layers in the residency refresh timing")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, numpy {np.__version__}")
    a = np.random.default_rng(0).random(129)
    floor, _ = cpu_us(lambda: np.maximum(a * 2.0, a + 1.0), 2000)
    print(f"numpy floor: 3 small-array ops take {floor:.1f} us here")
    rng = np.random.default_rng(0)
    for E in args.experts:
        shape = LayerShape(E, 2048, 768, 3 * 2048 * 768 * 2)
        sched = Scheduler(CostModel(shape), correction=False)
        resident = torch.from_numpy(rng.random(E) < 1 / 3)
        for T in args.tokens:
            counts = torch.from_numpy(rng.multinomial(T * 8, rng.dirichlet(np.full(E, 1.0))))
            plan = sched.plan(0, counts, resident)
            med, p90 = cpu_us(lambda: sched.plan(0, counts, resident), args.reps)
            w = plan.where.numpy()
            p = plan.predicted
            print(
                f"E={E:4d} T={T:6d}: plan {med:7.0f} us (p90 {p90:.0f})  streamed {int((w == 2).sum()):3d} "
                f"resident {int((w == 1).sum()):3d} cpu {int(((w == 0) & (counts.numpy() > 0)).sum()):3d}  "
                f"predicted fwd+bwd {1e3 * p['makespan']:.1f} ms (all-CPU {1e3 * p['all_cpu']:.1f}, "
                f"all-GPU {1e3 * p['all_gpu']:.1f})"
            )
    E = args.experts[0]
    shape = LayerShape(E, 2048, 768, 3 * 2048 * 768 * 2)
    sched = Scheduler(CostModel(shape), correction=False)
    policy = ResidencyPolicy(sched, budget=args.layers * E * shape.resident_size / 3 / (1 << 30), warmup_steps=1)
    for layer in range(args.layers):
        policy.record(layer, rng.multinomial(4096 * 8, rng.dirichlet(np.full(E, 1.0))))
    t0 = time.process_time()
    policy.end_step()
    dt = time.process_time() - t0
    print(
        f"residency refresh, {args.layers} layers x {E} experts, budget 1/3 of the expert bytes: "
        f"{dt * 1e3:.0f} ms ({policy.last_refresh['experts']} experts resident)"
    )


if __name__ == "__main__":
    main()
