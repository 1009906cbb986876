"""The expert engine as a PyTorch op.

`moe_experts` is built from two torch.autograd.Functions (submit / wait)
rather than a torch.library custom op: the engine state it needs (packed weights in a C++ object, the per-call
handle of saved activations) is not expressible in a custom op schema without
smuggling pointers through integer tensors, and the op has host side effects
(queued CPU jobs) that torch.compile could not trace anyway; an
autograd.Function keeps the handle on the autograd graph node, so it lives
exactly as long as the graph (dropped with it, reused by a retained graph,
and never shared between micro-batches or checkpoint recomputes). Splitting
the op in two lets the caller's GPU work run between submit and wait, in
forward and (mirrored by autograd's reverse order) in backward.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Tuple

import torch

from moetune import _moetune_ext as _ext
from moetune.isa import isas

_PROJ = ("gate", "up", "down")


class Context:
    """Owns the engine's worker threads, scratch memory and kernel choice.

    num_threads: engine threads (default: every core this process may run on;
    pass it explicitly when torch also computes on the CPU, and give torch the
    remaining cores).
    cpus: optional list of core ids to pin the workers to.
    isa: "auto" (the fastest this CPU runs) or the name of one of `moetune.isas()`
    (e.g. "avx512": AVX-512 F/BW/VL/DQ without BF16, for Skylake-SP / Cascade
    Lake); one this CPU/OS cannot run raises RuntimeError naming the missing
    features, an unknown name ValueError listing the choices.
    """

    def __init__(self, num_threads: Optional[int] = None, *, cpus=(), isa: str = "auto"):
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0))
        self._ctx = _ext.Context(int(num_threads), list(cpus), isa)
        # Wall seconds the calling (training) thread spent blocked waiting for this
        # context's jobs (forward and backward); `moetune train` reports it as the
        # CPU-expert share of the step time.
        self.wait_seconds = 0.0

    @property
    def num_threads(self) -> int:
        return self._ctx.num_threads

    @property
    def isa(self) -> str:
        return self._ctx.isa

    def info(self) -> dict:
        """The chosen ISA, its GEMM kernel and the code it shares (as in
        `moetune.isas()`), the thread count and what the CPU offers."""
        isa = self._ctx.isa
        return {
            "isa": isa,
            "kernel": self._ctx.kernel,
            "kernels": next(i.kernels for i in isas() if i.name == isa),
            "num_threads": self._ctx.num_threads,
            "cpu": _ext.cpu_summary(),
        }

    def __repr__(self) -> str:
        return f"moetune.Context({self._ctx.info()})"


def _host(t: torch.Tensor, dtypes=(torch.bfloat16, torch.float32)) -> torch.Tensor:
    """A contiguous CPU view/copy of t without autograd history."""
    t = t.detach()
    if t.dtype not in dtypes:
        t = t.to(dtypes[0])
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


class MoEExperts:
    """One MoE layer's frozen routed experts, packed into the engine.

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I] (the HF per-expert
    nn.Linear layout stacked over experts). bf16 is taken bit-exact; fp32 is
    rounded to bf16. The tensors are not kept: the engine holds its own packed
    copy (twice if backward_weights="transposed_copy").

    activation: "swiglu" (h = silu(g) * u) or "gpt_oss" (gpt-oss's clamped
    SwiGLU: h = (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha * gc) with
    gc = min(g, limit); `alpha`, `limit` are gpt-oss's swiglu_alpha / swiglu_limit).
    gate_bias, up_bias [E, I] and down_bias [E, H]: optional frozen expert
    biases (added to g, u before the activation and to each expert's output;
    kept as fp32, no gradient). Any subset may be given.

    weight_format: "bf16" (default), "int8" (per-output-channel symmetric) or
    "int4" (symmetric, one scale per group_size inputs; group_size 32, 64 or
    128, default 128): weights are quantized at load and dequantized inside
    the engine's GEMMs, forward and backward alike (activations, gradients
    and LoRA stay bf16/fp32). With a quantized format,
    backward_weights="transposed_copy" adds a bf16 copy of the dequantized
    weights for a faster backward (same values, same gradients).

    row_group: rows of one expert per GEMM task, a speed knob only (results
    are bit-identical for any value). 0 (default) = auto: up to 768 where a
    task prepares data per weight slice (dequantization, the backward's W^T
    repack), else up to 192.
    """

    def __init__(self, ctx: Context, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                 down_proj: torch.Tensor, *, backward_weights: str = "repack",
                 activations: str = "save", activation: str = "swiglu", alpha: float = 1.702,
                 limit: float = 7.0, gate_bias: Optional[torch.Tensor] = None,
                 up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
                 weight_format: str = "bf16", group_size: Optional[int] = None, row_group: int = 0):
        if gate_proj.dim() != 3:
            raise ValueError(f"gate_proj must be [E, I, H], got shape {list(gate_proj.shape)}")
        E, I, H = gate_proj.shape
        self._allocate(ctx, E, H, I, backward_weights=backward_weights, activations=activations,
                       activation=activation, alpha=alpha, limit=limit, weight_format=weight_format,
                       group_size=group_size, row_group=row_group)
        for name, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor (bfloat16 or float32; float16 "
                                 f"is converted), got {getattr(t, 'dtype', type(t).__name__)}")
        # bf16 is taken bit-exact; float32 is rounded by the engine; other floats go through bf16.
        dtype = torch.float32 if gate_proj.dtype == torch.float32 else torch.bfloat16
        self._ex.load(_host(gate_proj, (dtype,)), _host(up_proj, (dtype,)), _host(down_proj, (dtype,)))
        if any(b is not None for b in (gate_bias, up_bias, down_bias)):
            self.load_biases(gate_bias, up_bias, down_bias)

    def load_biases(self, gate_bias: Optional[torch.Tensor] = None, up_bias: Optional[torch.Tensor] = None,
                    down_bias: Optional[torch.Tensor] = None) -> None:
        """Frozen expert biases: gate_bias, up_bias [E, I], down_bias [E, H] (any subset)."""
        biases = {"gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_bias}
        if any(b is not None for b in biases.values()):
            for name, b in biases.items():
                if b is not None and (not isinstance(b, torch.Tensor) or not b.is_floating_point()):
                    raise ValueError(f"{name} must be a floating-point tensor (bfloat16 or float32), got "
                                     f"{getattr(b, 'dtype', type(b).__name__)}")
            # One dtype for all: bf16 if every given bias is bf16 (exact), else fp32 (exact for fp16/bf16).
            given = [b for b in biases.values() if b is not None]
            bdt = torch.bfloat16 if all(b.dtype == torch.bfloat16 for b in given) else torch.float32
            self._ex.load_biases(*[None if b is None else _host(b, (bdt,)) for b in biases.values()])

    @property
    def has_biases(self) -> Tuple[bool, bool, bool]:
        """Whether the (gate, up, down) biases are loaded."""
        return tuple(self._ex.has_biases)

    def _allocate(self, ctx, E, H, I, *, backward_weights="repack", activations="save", activation="swiglu",
                  alpha=1.702, limit=7.0, weight_format="bf16", group_size=None, row_group=0):
        self.ctx = ctx
        self.activation = activation
        if group_size is None:
            group_size = 128 if weight_format == "int4" else 0
        self._ex = _ext.Experts(ctx._ctx, E, H, I, backward_weights, activations, activation, float(alpha),
                                float(limit), weight_format=weight_format, group_size=int(group_size),
                                row_group=int(row_group))
        self.options = dict(backward_weights=backward_weights, activations=activations,
                            weight_format=weight_format, group_size=int(group_size), row_group=int(row_group))

    @classmethod
    def empty(cls, ctx: Context, num_experts: int, hidden_size: int, intermediate_size: int,
              **options) -> "MoEExperts":
        """Experts of the given shape with nothing loaded yet; fill every expert
        with load_expert (streaming loaders: one expert's weights in memory at a
        time). options: as for the constructor (backward_weights, ...)."""
        self = cls.__new__(cls)
        self._allocate(ctx, int(num_experts), int(hidden_size), int(intermediate_size), **options)
        return self

    def load_expert(self, e: int, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Packs expert e from gate/up [I, H] and down [H, I] (bf16 bit-exact, fp32
        rounded, other floats through bf16). Distinct experts may be loaded from
        several threads at once."""
        for name, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"expert {e}: {name} must be a floating-point tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        dtype = torch.float32 if gate_proj.dtype == torch.float32 else torch.bfloat16
        self._ex.load_expert(int(e), _host(gate_proj, (dtype,)), _host(up_proj, (dtype,)), _host(down_proj, (dtype,)))

    num_experts = property(lambda self: self._ex.num_experts)
    hidden_size = property(lambda self: self._ex.hidden_size)
    intermediate_size = property(lambda self: self._ex.intermediate_size)
    packed_bytes = property(lambda self: self._ex.packed_bytes)
    weight_format = property(lambda self: self._ex.weight_format)
    group_size = property(lambda self: self._ex.group_size)

    @property
    def packed_bytes_per_expert(self) -> int:
        """Host memory of one expert's frozen weights in the engine (all formats)."""
        return self._ex.packed_bytes // self._ex.num_experts


@dataclasses.dataclass
class LoraWeights:
    """LoRA on the experts: out = W x + scaling * B (A x) per projection.

    Each of gate/up/down is None or a pair (A [E, r, in], B [E, out, r]),
    fp32 or bf16, typically nn.Parameters; an optimizer may update them in
    place between steps (the engine reads them at every call).
    """

    gate: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    up: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    down: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    scaling: float = 1.0

    def flat(self):
        out = []
        for name in _PROJ:
            pair = getattr(self, name)
            if pair is None:
                out += [None, None]
            else:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(f"lora.{name} must be a pair (A, B) or None")
                out += list(pair)
        return out


class _Pending:
    """State shared by the two halves of one engine call (see moe_experts_async)."""

    __slots__ = ("experts", "scaling", "handle", "job", "out", "device", "x_dtype", "w_dtype",
                 "k", "lora_h", "lora", "needs", "bwd_job", "grads", "keep")

    def __del__(self):
        # A queued job writes into buffers this object owns: never free them
        # under it. This happens when autograd drops a half-run recompute
        # (non-reentrant checkpointing stops recomputing early) or when an
        # output is never waited on.
        for name in ("job", "bwd_job"):
            job = getattr(self, name, None)
            if job is not None:
                try:
                    job.wait()
                except Exception:  # its error was (or will be) reported where it was awaited
                    pass


class _Submit(torch.autograd.Function):
    """Queues the engine forward; its backward waits for the engine backward."""

    @staticmethod
    def forward(ctx, state, experts, scaling, x, topk_ids, topk_weights, expert_mask, *lora):
        xh = _host(x)
        ids = topk_ids.detach().to("cpu").contiguous()
        wh = _host(topk_weights)
        mask = None if expert_mask is None else expert_mask.detach().to("cpu", torch.bool).contiguous()
        lora_h = [None if t is None else _host(t) for t in lora]
        out = torch.empty(xh.shape, dtype=xh.dtype) if xh.dim() == 2 else torch.empty(0)
        state.handle, state.job = experts._ex.forward(xh, ids, wh, mask, *lora_h, float(scaling), out)
        # The engine reads these while the job runs: keep them alive until wait().
        state.keep = (xh, ids, wh, mask)
        state.experts, state.scaling, state.out = experts, float(scaling), out
        state.device, state.x_dtype, state.w_dtype = x.device, x.dtype, topk_weights.dtype
        state.k = topk_ids.shape[1]
        state.lora_h = lora_h
        state.lora = lora
        state.needs = ctx.needs_input_grad[3:]  # (x, ids, w, mask, *lora)
        state.bwd_job = None
        ctx.state = state
        # Saved through autograd so in-place edits before backward are caught.
        ctx.save_for_backward(*lora)
        return torch.empty(0, device=x.device)  # a ticket linking the two halves

    @staticmethod
    def backward(ctx, _grad_ticket):
        ctx.saved_tensors  # version check of the LoRA tensors
        st = ctx.state
        if st.bwd_job is None:
            raise RuntimeError("moetune: engine backward was not started (output had no gradient)")
        t0 = time.perf_counter()
        st.bwd_job.wait()
        st.experts.ctx.wait_seconds += time.perf_counter() - t0
        st.bwd_job = st.keep = None
        dx, dw, grads = st.grads
        st.grads = None
        out_lora = [None if g is None else g.to(device=o.device, dtype=o.dtype) for o, g in zip(st.lora, grads)]
        return (None, None, None,
                None if dx is None else dx.to(device=st.device, dtype=st.x_dtype),
                None,
                None if dw is None else dw.to(device=st.device, dtype=st.w_dtype),
                None, *out_lora)


class _Wait(torch.autograd.Function):
    """Waits for the engine forward; its backward queues the engine backward."""

    @staticmethod
    def forward(ctx, state, ticket):
        t0 = time.perf_counter()
        state.job.wait()
        state.experts.ctx.wait_seconds += time.perf_counter() - t0
        out = state.out
        # Drop every reference to the output: it will point back to this node
        # (grad_fn), and a cycle through autograd's C++ edges is never freed.
        state.job = state.keep = state.out = None
        ctx.state = state
        return out.to(state.device)

    @staticmethod
    def backward(ctx, grad_out):
        st = ctx.state
        need = st.needs  # (x, ids, w, mask, *lora)
        g = _host(grad_out)
        T, H = g.shape
        dx = torch.empty((T, H), dtype=g.dtype) if need[0] else None
        dw = torch.empty((T, st.k), dtype=torch.float32) if need[2] else None
        grads = [torch.empty(t.shape, dtype=torch.float32) if (t is not None and need[4 + i]) else None
                 for i, t in enumerate(st.lora_h)]
        st.bwd_job = st.experts._ex.backward(st.handle, g, *st.lora_h, st.scaling, dx, dw, *grads)
        st.grads = (dx, dw, grads)
        st.keep = g  # read by the engine until the job is waited on
        return None, torch.zeros(0, device=grad_out.device)


class PendingMoE:
    """An engine forward in flight. `wait()` returns the output (differentiable).

    Between `moe_experts_async(...)` and `wait()` the caller's own work (e.g.
    shared experts on the GPU) overlaps with the CPU experts; in backward the
    engine's backward likewise runs while autograd computes the gradients of
    whatever was computed in between.
    """

    def __init__(self, state: _Pending, ticket: torch.Tensor):
        self._state, self._ticket, self._out = state, ticket, None

    @property
    def saved_bytes(self) -> int:
        """Host memory held for backward by this call (freed with the graph)."""
        return self._state.handle.nbytes

    def wait(self) -> torch.Tensor:
        if self._out is None:
            self._out = _Wait.apply(self._state, self._ticket)
        return self._out


def moe_experts_async(experts: "MoEExperts", x: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor, lora: Optional[LoraWeights] = None,
                      expert_mask: Optional[torch.Tensor] = None) -> PendingMoE:
    """Like moe_experts, but returns at once; call .wait() for the output."""
    if not isinstance(experts, MoEExperts):
        raise TypeError("experts must be a moetune.MoEExperts")
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"x has dtype {x.dtype}, expected torch.bfloat16 or torch.float32")
    if topk_weights.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"topk_weights has dtype {topk_weights.dtype}, expected torch.bfloat16 or torch.float32")
    lora = lora or LoraWeights()
    flat = lora.flat()
    for i, t in enumerate(flat):
        if t is not None and t.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"lora.{_PROJ[i // 2]}.{'AB'[i % 2]} has dtype {t.dtype}, expected bfloat16 or float32")
    state = _Pending()
    ticket = _Submit.apply(state, experts, lora.scaling, x, topk_ids, topk_weights, expert_mask, *flat)
    return PendingMoE(state, ticket)


def moe_experts(experts: MoEExperts, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, lora: Optional[LoraWeights] = None,
                expert_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x[t]), gated
    experts (SwiGLU or gpt-oss's variant, see MoEExperts) with optional LoRA, computed by the CPU engine; differentiable in
    x, topk_weights and the LoRA tensors. Returns x's dtype on x's device."""
    return moe_experts_async(experts, x, topk_ids, topk_weights, lora, expert_mask).wait()
