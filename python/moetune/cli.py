"""`moetune` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moetune", description="LoRA fine-tuning of MoE models with CPU experts")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LoRA on one MoE layer through the CPU engine (embedded, seeded)")
    d.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    d.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    d.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("info", help="print the CPU features and the kernel the engine would use")
    i.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from moetune.demo import run_demo

        run_demo(steps=args.steps, num_threads=args.threads, seed=args.seed)
        return 0
    if args.command == "info":
        from moetune.engine import Context

        print(Context(args.threads).info())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
