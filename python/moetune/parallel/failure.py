"""A lost rank: what the other ranks of an expert-parallel run raise instead of hanging.

Every collective of expert parallelism (the token exchange, the global gradient norm, the
adapter sync, moetune train's sums and gathers) runs inside `collective(...)`: a failure of
the collective (gloo: "Connection reset by peer" when a rank died, "Timed out waiting ...
ms" when it stopped answering; NCCL: its watchdog's abort after the timeout) becomes ONE
error type, `RankLostError`, whose message says which rank saw it, in which operation, and
what the process group's timeout is (moetune train: `dist_timeout_s`). Which rank died is
not visible from a survivor (the backends report a peer address, not a rank): torchrun's
agent names it (its failure summary: the rank, its exit code or signal) and tears the rest
of the group down.

Only torch.distributed's own failures are converted (RuntimeError and its DistError
subclasses raised inside the block); anything else passes through unchanged.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist


class RankLostError(RuntimeError):
    """A collective with the other ranks failed: a rank died, or did not answer in time.

    rank: the rank that noticed (of world_size); what: the operation; timeout_s: the group's
    timeout (None: unknown); cause: the backend's error, first line; step: the optimizer step
    (moetune train), when known."""

    def __init__(self, rank: int, world_size: int, what: str, timeout_s: float | None, cause: str, step=None):
        self.rank, self.world_size, self.what, self.timeout_s, self.cause, self.step = (
            rank,
            world_size,
            what,
            timeout_s,
            cause,
            step,
        )
        waited = f"within the process group's timeout ({timeout_s:g} s, dist_timeout_s)" if timeout_s else "in time"
        at = "" if step is None else f", step {step}"
        super().__init__(
            f"moetune: rank {rank} of {world_size}{at}: {what} with the other ranks failed: another rank "
            f"stopped (it died, or did not answer {waited}); the launcher's log names the failed rank. "
            f"Backend: {cause}"
        )

    def at_step(self, step: int) -> RankLostError:
        """The same error, naming the step."""
        return RankLostError(self.rank, self.world_size, self.what, self.timeout_s, self.cause, step)


@contextlib.contextmanager
def collective(rank: int, world_size: int, what: str, timeout_s: float | None = None):
    """Converts a torch.distributed failure inside the block into RankLostError (the original
    error kept as its cause and quoted)."""
    try:
        yield
    except RankLostError:
        raise
    except RuntimeError as e:  # torch.distributed.DistError is a RuntimeError too
        raise RankLostError(rank, world_size, what, timeout_s, first_line(e)) from e


def is_backend_failure(e: BaseException) -> bool:
    """Whether an error raised outside `collective` (e.g. by DDP's all-reduce in backward, which
    autograd re-raises as a plain RuntimeError) is a process-group failure: torch.distributed's
    DistError, or a message from the gloo / NCCL backends."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return "gloo" in text or "NCCL" in text or "ProcessGroup" in text


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (backend messages run to several lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
