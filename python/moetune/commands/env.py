"""`moetune env`: what a bug report needs (versions, CUDA, CPU features, the engine's kernel,
threads, NUMA / SMT), as text or --json. `moetune --version` prints the first line only."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "datasets", "trl")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "env",
        help="print versions (moetune, torch, transformers, peft...), CUDA, CPU features and the engine's kernel",
        description="The environment moetune runs in, for bug reports and sizing: package versions, CUDA "
        "devices, the CPU features the engine found, the kernel it chose, the cores this process may use, "
        "NUMA nodes and SMT.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _numa_nodes() -> list[str]:
    """NUMA nodes and the CPUs of each this process may use (moetune.topology)."""
    from moetune.topology import format_cpulist, numa_nodes

    return [f"node{n.index}: cpus {format_cpulist(n.cpus)}" for n in numa_nodes()]


def _smt() -> str | None:
    try:
        with open("/sys/devices/system/cpu/smt/active") as f:
            return "on" if f.read().strip() == "1" else "off"
    except OSError:
        return None


def collect() -> dict[str, Any]:
    import torch

    import moetune
    from moetune.engine import Context

    cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "devices": []}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda["devices"].append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = Context(1).info()
    return {
        "moetune": moetune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": cuda,
        "cpu": {
            "features": list(moetune.cpu_features()),
            "isa": info["isa"],
            "kernel": info["kernel"],
            "kernels": info["kernels"],
            "runnable_isas": [i.name for i in moetune.isas() if i.runnable],
            "cores_usable": usable,
            "logical_cpus": os.cpu_count(),
            "smt": _smt(),
            "numa_nodes": _numa_nodes(),
        },
    }


def run(args) -> int:
    env = collect()
    if args.json:
        print(json.dumps(env))
        return 0
    print(f"moetune {env['moetune']} (python {env['python']}, {env['platform']})")
    for name, v in env["packages"].items():
        print(f"  {name:16} {v or 'not installed'}")
    c = env["cuda"]
    print(f"CUDA: torch built with {c['torch_cuda'] or 'no CUDA'}; " + (", ".join(c["devices"]) or "no GPU visible"))
    cpu = env["cpu"]
    print(f"CPU features: {' '.join(cpu['features'])}")
    print(f"engine kernel: {cpu['kernel']} (isa {cpu['isa']}; runnable: {', '.join(cpu['runnable_isas'])})")
    print(
        f"cores this process may use: {cpu['cores_usable']} of {cpu['logical_cpus']} logical CPUs; SMT "
        f"{cpu['smt'] or 'unknown'}; NUMA: {'; '.join(cpu['numa_nodes']) or 'unknown'}"
    )
    return 0
