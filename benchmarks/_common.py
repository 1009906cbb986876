"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`,
which puts this folder on sys.path)."""

from __future__ import annotations

import platform
import subprocess
from typing import Optional


def cpu_name() -> str:
    """The CPU model as lscpu names it (platform.processor() where lscpu fails)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor()


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (bytes); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
