"""The token exchange of expert parallelism: rows to the ranks that own their experts and
partial outputs back, differentiable.

Collective: `torch.distributed.all_to_all_single` with per-rank split sizes, on NCCL (CUDA
tensors) and on gloo alike: torch's gloo backend implements all_to_all_single for CPU
tensors with uneven splits (ProcessGroupGloo's alltoall_base; checked on torch 2.13), so the
CPU path is the same code as the GPU one but for the backend and the device of the tensors.
Split sizes are exchanged first (`exchange_counts`, one small all_to_all of int64 counts).

Autograd: `Dispatch` sends token rows and per-slot routing weights in one node, `Combine`
sends partial outputs back; the backward of each is the reverse exchange (splits swapped).
Every rank must run the same collectives in the same order, forward and backward: both
Functions take an `anchor` (an empty tensor that requires grad) so their outputs require
grad on every rank, whatever its local data (a rank that received no rows still takes part
in the backward exchange); callers must keep each Dispatch output connected to the Combine
input (see moetune.parallel.layer). x travels forward in its own dtype (`wire_dtype`, bf16
for bf16 models) and comes back, as a gradient, in fp32, like the partial outputs: the
source adds the per-rank partial sums in fp32.

A rank that dies or stops answering makes every exchange fail (never hang past the group's
timeout) with moetune.parallel.failure.RankLostError (`ep.guard`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_to_all(t: torch.Tensor, send: list[int], recv: list[int], ep) -> torch.Tensor:
    """Rows t[sum(send[:r]) : sum(send[:r+1])] to rank r of ep.group (ep: the run's
    moetune.parallel.ExpertParallel); returns [sum(recv), *t.shape[1:]]."""
    out = t.new_empty((sum(recv), *t.shape[1:]))
    with ep.guard("the token exchange"):
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=ep.group)
    return out


def exchange_counts(send_counts: torch.Tensor, ep) -> torch.Tensor:
    """send_counts int64 [N, c] (row r: what this rank sends to rank r) -> [N, c] (row r: what
    rank r sends to this rank)."""
    n = send_counts.shape[0]
    return all_to_all(send_counts, [1] * n, [1] * n, ep)


class Dispatch(torch.autograd.Function):
    """(x_send [n, H] fp32, w_send [s] fp32, ids_send int64 [s, 2]) -> (x_recv fp32, w_recv fp32,
    ids_recv): token rows with x_splits, slot entries with slot_splits (per destination rank)."""

    @staticmethod
    def forward(ctx, x_send, w_send, ids_send, anchor, x_splits, x_recv_splits, s_splits, s_recv_splits, wire, ep):
        ctx.splits = (x_splits, x_recv_splits, s_splits, s_recv_splits)
        ctx.ep, ctx.H, ctx.device = ep, x_send.shape[1], x_send.device
        x_recv = all_to_all(x_send.to(wire), x_splits, x_recv_splits, ep).to(torch.float32)
        w_recv = all_to_all(w_send, s_splits, s_recv_splits, ep)
        ids_recv = all_to_all(ids_send, s_splits, s_recv_splits, ep)
        ctx.mark_non_differentiable(ids_recv)
        return x_recv, w_recv, ids_recv

    @staticmethod
    def backward(ctx, gx, gw, _gids):
        xs, xr, ss, sr = ctx.splits
        # A missing gradient is a zero one: the exchange still runs (every rank takes part).
        if gx is None:
            gx = torch.zeros((sum(xr), ctx.H), dtype=torch.float32, device=ctx.device)
        if gw is None:
            gw = torch.zeros((sum(sr),), dtype=torch.float32, device=ctx.device)
        dx = all_to_all(gx.float(), xr, xs, ctx.ep)
        dw = all_to_all(gw.float(), sr, ss, ctx.ep)
        return dx, dw, None, None, None, None, None, None, None, None


class Combine(torch.autograd.Function):
    """partial fp32 [n_recv, H] (one row per received token) -> [n_sent, H] back at the source."""

    @staticmethod
    def forward(ctx, partial, anchor, x_splits, x_recv_splits, ep):
        ctx.splits, ctx.ep = (x_splits, x_recv_splits), ep
        return all_to_all(partial, x_recv_splits, x_splits, ep)

    @staticmethod
    def backward(ctx, g):
        xs, xr = ctx.splits
        return all_to_all(g.float(), xs, xr, ctx.ep), None, None, None, None
