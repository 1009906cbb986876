"""Moving experts between ranks during training: ownership follows the routing as it drifts.

When: every `RebalanceOptions.every` optimizer steps (moetune.parallel.rebalance_options), at the
step boundary (after the optimizer step, gradients cleared, no engine job in flight), on every
rank at the same step (`Rebalancer.maybe`; moetune train: `ep_rebalance_every`).

What is balanced: each layer's per-expert token slots routed since the last rebalance (a window
sum of `EPLayer.routed`, all ranks' tokens: one all_reduce). A window sum rather than an EMA:
the ownership chosen now serves the next `every` steps, whose best predictor is the routing of
the last `every` steps (routing drifts slowly over fine-tuning); a window is already thousands of
slots per layer (N x grad_accum micro-batches x tokens x k per step), and an EMA would keep the
routing of old windows and add a decay constant to tune. Slots of every forward count (gradient
checkpointing's recompute counts a step twice, evals count too): a uniform factor or a little
extra routing, the same on every rank, so the decision stays the same on every rank.

Decision, per layer: `by_load` of the window counts, its ranks relabelled so that as many experts
as possible stay where they are (`plan_layer`); the layer moves only if the busiest rank's
predicted load drops by more than `min_gain` of itself (small gains are within the noise of one
window and would make experts travel back and forth).

Moving one layer (`move_engine`, `move_lora`), one layer at a time, so host RAM never holds a
second copy of the experts: besides the rank's experts, at most its new engine for one layer
(built before that layer's old one is dropped) and one buffer's moved experts in transit:
- frozen weights: the engine's packed bytes, whatever the format (bf16 panels, int8 / int4 /
  fp8_block / mxfp4 codes and scales, the transposed copy): a new engine of the rank's new
  expert set is allocated empty (`MoEExperts.empty`), its kept experts are copied from the old
  engine byte for byte, its new ones received from their old owners byte for byte (never
  re-quantized; moetune.cache fills engines the same way), then marked loaded; frozen biases
  (fp32 rows) likewise. The old engine is dropped.
- LoRA: every rank holds the full PEFT tensors (moetune.parallel.expert_lora), only the owner's
  rows are true: the moved experts' rows (and every per-entry optimizer state tensor of the same
  shape: AdamW's exp_avg / exp_avg_sq, amsgrad's max) go from the old owner to the new one.
  AdamW's `step` is one counter per tensor, stepped on every rank at every step: equal everywhere,
  nothing to move.
- then the layer's EPLayer routes by the new ownership (`EPLayer.set_ownership`).
Transfers: `all_to_all_single` of bytes (uint8) with per-rank split sizes every rank computes from
the two ownerships (no size exchange): gloo on CPU tensors, NCCL on CUDA tensors (ep.device).

The math after a move is the same per slot (each slot is one row on its owner's engine); only
which partials are summed on which rank changes, so a run that moves matches one that does not up
to fp32 reduction order (the parallel tests' tolerances). Checkpoints do not depend on ownership
(moetune.parallel.adapter gathers every expert from its owner at save), so a resumed run starts
from the run's initial ownership and rebalances again at its next boundary.

With a GPU placement (expert_placement auto / gpu on the rank's GPU), each moved layer's GPU side
is rebuilt for the new expert set (`ModelPlacement.replace_engine`: the old resident pool, keep
slot and page-locking released, the new GpuExperts built as at start, the layer's scheduler and
residency state keyed by local expert index forgotten; it is planned per call and its residents
chosen again at the next step boundary). The LoRA rows move on whichever device holds them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from moetune.engine import MoEExperts
from moetune.hf import patching
from moetune.parallel.expert_lora import ExpertLoraTensor, expert_lora_tensors
from moetune.parallel.ownership import LayerOwnership, by_load, load_per_rank
from moetune.parallel.rebalance_options import RebalanceOptions


def plan_layer(own: LayerOwnership, counts, min_gain: float) -> LayerOwnership | None:
    """The layer's new ownership for per-expert `counts`, or None to stay: by_load's assignment
    with its ranks relabelled to keep the most experts in place (greedy on the overlap, ties by
    the lower new label, then the lower rank: the same on every rank), taken only if the busiest
    rank's load drops by more than min_gain of it."""
    N = own.world_size
    groups = by_load(counts, N).owner
    overlap = [[0] * N for _ in range(N)]  # [label][rank]: experts of label already on rank
    for e, label in enumerate(groups):
        overlap[label][own.owner[e]] += 1
    pairs = sorted(((overlap[a][r], a, r) for a in range(N) for r in range(N)), key=lambda p: (-p[0], p[1], p[2]))
    rank_of, used = {}, set()
    for _, a, r in pairs:
        if a not in rank_of and r not in used:
            rank_of[a] = r
            used.add(r)
    new = LayerOwnership(tuple(rank_of[a] for a in groups), N)
    cur, nxt = max(load_per_rank(own, counts)), max(load_per_rank(new, counts))
    if new.owner == own.owner or cur <= 0 or cur - nxt <= min_gain * cur:
        return None
    return new


@dataclasses.dataclass(frozen=True)
class LayerMoves:
    """This rank's part of one layer's move: sends[d] the experts it sends to rank d, recvs[s] the
    experts it receives from rank s (ascending ids, so both sides agree on the order)."""

    sends: list[list[int]]
    recvs: list[list[int]]

    @classmethod
    def of(cls, old: LayerOwnership, new: LayerOwnership, rank: int) -> LayerMoves:
        N = old.world_size
        sends, recvs = [[] for _ in range(N)], [[] for _ in range(N)]
        for e, (a, b) in enumerate(zip(old.owner, new.owner)):
            if a != b and a == rank:
                sends[b].append(e)
            elif a != b and b == rank:
                recvs[a].append(e)
        return cls(sends, recvs)


def _exchange_rows(src, src_index, dst, dst_index, moves: LayerMoves, ep) -> None:
    """dst[dst_index[e]] <- the old owner's src[src_index[e]] for every expert e this rank receives
    (src / dst: expert-major tensors, rows of equal shape and dtype; any strides), byte for byte.
    A collective: every rank of ep.group calls it with the same layer's moves."""
    row_bytes = src[0].numel() * src.element_size()
    out = [src[src_index[e]].contiguous().view(-1).view(torch.uint8) for d in moves.sends for e in d]
    send = torch.cat(out).to(ep.device) if out else torch.empty(0, dtype=torch.uint8, device=ep.device)
    send_splits = [len(d) * row_bytes for d in moves.sends]
    recv_splits = [len(s) * row_bytes for s in moves.recvs]
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=ep.device)
    with ep.guard("the expert move"):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=ep.group)
    ids = [e for s in moves.recvs for e in s]
    if ids:
        rows = recv.to(dst.device).view(dst.dtype).view(len(ids), *dst.shape[1:])
        dst[torch.tensor([dst_index[e] for e in ids], device=dst.device)] = rows


def _expert_major(t: torch.Tensor, factor: str, num_experts: int) -> torch.Tensor:
    """A view of a PEFT expert LoRA tensor (or its optimizer state) with the expert axis first:
    A [E * r, in] -> [E, r, in]; B [out, r * E] (column j*E + e) -> [E, out, r]."""
    if factor == "A":
        return t.view(num_experts, -1, t.shape[1])
    return t.view(t.shape[0], -1, num_experts).permute(2, 0, 1)


def _engine_rows(engine: MoEExperts) -> list[tuple[str, torch.Tensor]]:
    """(name, uint8 [E_local, per-expert bytes]) per packed buffer: views of the engine's memory."""
    E = engine.num_experts
    return [
        (b.name, torch.from_numpy(b.array)[: E * b.per_expert_bytes].view(E, b.per_expert_bytes))
        for b in engine.packed_buffers()
    ]


@torch.no_grad()
def move_engine(engine: MoEExperts, old: LayerOwnership, new: LayerOwnership, ep) -> MoEExperts:
    """This rank's engine for its experts of `new`, built from `engine` (its experts of `old`) and
    the experts the other ranks send: packed bytes and biases moved as they are. A collective."""
    rank, moves = ep.rank, LayerMoves.of(old, new, ep.rank)
    old_local = {e: i for i, e in enumerate(old.owned(rank))}
    new_local = {e: i for i, e in enumerate(new.owned(rank))}
    out = MoEExperts.empty(engine.ctx, len(new_local), engine.hidden_size, engine.intermediate_size, engine.options)
    kept = [e for e in new_local if e in old_local]
    src_rows, dst_rows = _engine_rows(engine), _engine_rows(out)
    if [n for n, _ in src_rows] != [n for n, _ in dst_rows]:
        raise RuntimeError(f"moetune: expert move: buffers {[n for n, _ in dst_rows]} != {[n for n, _ in src_rows]}")
    for (_, src), (_, dst) in zip(src_rows, dst_rows):
        for e in kept:
            dst[new_local[e]] = src[old_local[e]]
        _exchange_rows(src, old_local, dst, new_local, moves, ep)
    del src_rows, dst_rows
    if any(b is not None for b in engine.biases):
        biases = []
        for b in engine.biases:
            if b is None:
                biases.append(None)
                continue
            nb = torch.empty((len(new_local), *b.shape[1:]), dtype=b.dtype)
            for e in kept:
                nb[new_local[e]] = b[old_local[e]]
            _exchange_rows(b, old_local, nb, new_local, moves, ep)
            biases.append(nb)
        out.load_biases(*biases)
    out._ex.mark_loaded()  # every packed byte was copied from a loaded engine
    return out


@torch.no_grad()
def move_lora(tensors: list[ExpertLoraTensor], optimizer, old: LayerOwnership, new: LayerOwnership, ep) -> None:
    """The moved experts' LoRA rows and their optimizer state (per-entry tensors of the
    parameter's shape) from the old owner to the new one, in every tensor of `tensors` (one
    layer's). A collective."""
    moves = LayerMoves.of(old, new, ep.rank)
    ident = range(old.num_experts)
    for t in tensors:
        state = optimizer.state.get(t.param, {}) if optimizer is not None else {}
        per_entry = [v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor) and v.shape == t.param.shape]
        for v in [t.param.data, *per_entry]:
            view = _expert_major(v, t.factor, t.num_experts)
            _exchange_rows(view, ident, view, ident, moves, ep)


def _repoint_placement(st, engine: MoEExperts) -> None:
    """The model's placement keeps each layer's engine (and, on the GPU, what it built from it):
    give it the new one, so that the old engine's memory is freed and the GPU side follows."""
    if st.placement is not None and st.layer_key is not None:
        st.placement.replace_engine(st.layer_key, engine, st)


class Rebalancer:
    """The rebalancing of one expert-parallel model (see the module doc). `maybe(step, optimizer)`
    at every optimizer step boundary, on every rank."""

    def __init__(self, model, options: RebalanceOptions):
        self.options = options
        self.states = [patching.experts_state(f.module) for f in patching.find_experts(model)]
        if not self.states or any(st.ep is None for st in self.states):
            raise ValueError("moetune: rebalancing needs a model patched with expert_parallel=")
        self.ep = self.states[0].ep.ep
        tensors = expert_lora_tensors(model)
        self.tensors = [[t for t in tensors if t.layer is st.ep] for st in self.states]
        self._since = [st.ep.routed.clone() for st in self.states]

    def due(self, step: int) -> bool:
        return self.options.every > 0 and step > 0 and step % self.options.every == 0

    def maybe(self, step: int, optimizer) -> dict | None:
        """Rebalances if `step` (optimizer steps done) is a boundary; returns its numbers then."""
        return self.rebalance(optimizer) if self.due(step) else None

    @torch.no_grad()
    def window(self) -> list[list[int]]:
        """Per layer, every rank's slots per expert since the last call (a collective); restarts it."""
        now = [st.ep.routed.clone() for st in self.states]
        mine = torch.cat([a - b for a, b in zip(now, self._since)]).to(self.ep.device)
        self._since = now
        with self.ep.guard("the expert rebalance"):
            dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=self.ep.group)
        mine, out, at = mine.cpu(), [], 0
        for st in self.states:
            E = st.ep.own.num_experts
            out.append(mine[at : at + E].tolist())
            at += E
        return out

    @torch.no_grad()
    def rebalance(self, optimizer) -> dict:
        """One rebalance (a collective): {"moved_experts", "moved_layers", "busiest_before",
        "busiest_after" (the busiest rank's window slots summed over layers, before / after),
        "window_slots"}."""
        for st in self.states:  # before any collective: every rank refuses alike (they are in step)
            if st.placement is not None and st.layer_key is not None:
                st.placement.check_idle(st.layer_key)
        counts = self.window()
        moved = layers = 0
        before = after = 0.0
        for st, tensors, c in zip(self.states, self.tensors, counts):
            old = st.ep.own
            new = plan_layer(old, c, self.options.min_gain)
            before += max(load_per_rank(old, c))
            after += max(load_per_rank(new or old, c))
            if new is None:
                continue
            engine = move_engine(st.engine, old, new, self.ep)
            _repoint_placement(st, engine)
            st.engine = engine  # the old engine goes with its last reference
            move_lora(tensors, optimizer, old, new, self.ep)
            st.ep.set_ownership(new)
            moved += sum(a != b for a, b in zip(old.owner, new.owner))
            layers += 1
        return {
            "moved_experts": moved,
            "moved_layers": layers,
            "busiest_before": before,
            "busiest_after": after,
            "window_slots": float(sum(map(sum, counts))),
        }
