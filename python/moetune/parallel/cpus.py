"""Each rank's engine on its own CPUs: ranks of one host never share cores.

`rank_context` makes the engine Context of one local rank pinned to its disjoint CPU share
(moetune.topology.rank_cpus: whole NUMA nodes or an even split of one) and keeps torch's own
intra-op threads small (the engine does the CPU-heavy work; torch's CPU work under EP is
bookkeeping), so N ranks on one host use each core once.
"""

from __future__ import annotations

import torch

from moetune import topology
from moetune.engine import Context


def rank_context(
    local_rank: int, local_world_size: int, *, isa: str = "auto", torch_threads: int | None = 1, nodes=None
) -> Context:
    """The engine Context of a local rank, pinned to topology.rank_cpus(local_rank, local_world_size)
    (nodes: made-up topology for tests); torch_threads: torch.set_num_threads (None: unchanged)."""
    share = topology.rank_cpus(local_rank, local_world_size, nodes)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return Context(num_threads=len(share.cpus), cpus=share.cpus, isa=isa)
