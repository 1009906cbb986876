"""The process group as the launcher made it: torchrun / `accelerate launch` set RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process (torch's launcher
contract, not moetune configuration). This module is the one place that reads them.

Ranks are global (any number of hosts, `torchrun --nnodes M`); LOCAL_RANK / LOCAL_WORLD_SIZE
count the ranks of this host only (its CPU share, its GPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place: global rank / world size, rank / ranks on this host."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> Launch | None:
    """The launcher's environment, or None when not started by a distributed launcher
    (WORLD_SIZE unset); a partial or inconsistent one is a ValueError naming the variable."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in _KEYS if k not in os.environ]
    if missing:
        raise ValueError(f"moetune: WORLD_SIZE is set but {', '.join(missing)} not: not a torchrun-style launch")
    try:
        v = {k: int(os.environ[k]) for k in _KEYS}
    except ValueError:
        raise ValueError(
            f"moetune: launcher variables must be integers: { {k: os.environ[k] for k in _KEYS} }"
        ) from None
    launch = Launch(v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["LOCAL_WORLD_SIZE"])
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size):
        raise ValueError(f"moetune: inconsistent launcher variables {launch}")
    return launch


def init_from_launcher(*, backend: str | None = None, timeout_s: float = 600.0) -> Launch:
    """Initializes the default process group from the launcher's environment (if not already):
    NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), else gloo. timeout_s: how long a
    collective waits for a missing rank before failing (a dead rank fails the others, no hang)."""
    launch = launched()
    if launch is None:
        raise RuntimeError("moetune: not launched by torchrun / accelerate launch (WORLD_SIZE is not set)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=launch.rank, world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return launch
