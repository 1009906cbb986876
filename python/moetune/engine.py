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
from typing import Any, NamedTuple

import torch

from moetune import _moetune_ext as _ext
from moetune.isa import isas
from moetune.numa import NUMA_DEFAULT, numa_partitions
from moetune.options import ExpertsOptions
from moetune.topology import format_cpulist

_PROJ = ("gate", "up", "down")


class Context:
    """Owns the engine's worker threads, scratch memory and kernel choice.

    num_threads: engine threads (default: every core this process may run on;
    pass it explicitly when torch also computes on the CPU, and give torch the
    remaining cores).
    cpus: optional list of core ids to pin the workers to.
    numa: "off" (default), "auto" (one partition per NUMA node where there are several) or an
    int N (N virtual nodes of the allowed CPUs, for tests): splits the engine's workers and
    experts per node, each expert's weights and GEMM tasks on one node (moetune.numa; results
    are bit-identical). With cpus, the nodes are restricted to them.
    isa: "auto" (the fastest this CPU runs) or the name of one of `moetune.isas()`
    (e.g. "avx512": AVX-512 F/BW/VL/DQ without BF16, for Skylake-SP / Cascade
    Lake); one this CPU/OS cannot run raises RuntimeError naming the missing
    features, an unknown name ValueError listing the choices.
    """

    def __init__(self, num_threads: int | None = None, *, cpus=(), isa: str = "auto", numa=NUMA_DEFAULT):
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0))
        parts = numa_partitions(numa, num_threads=int(num_threads), cpus=cpus)
        # Partitions pin the workers themselves (the engine takes one or the other).
        self._ctx = _ext.Context(int(num_threads), [] if parts else list(cpus), isa, [list(p) for p in parts])
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

    @property
    def numa_partitions(self) -> list[tuple[int, ...]]:
        """The CPUs of each NUMA partition of the engine ([] without partitions)."""
        return [tuple(p) for p in self._ctx.partition_cpus]

    def busy_seconds(self) -> float:
        """Seconds this context's engine has spent inside its phases so far (jobs run one
        at a time, so the difference around one job is that job's busy time)."""
        return float(sum(sec for _name, sec, _calls in self._ctx.phase_profile()))

    def info(self) -> dict:
        """The chosen ISA, its GEMM kernel and the code it shares (as in
        `moetune.isas()`), the thread count and what the CPU offers."""
        isa = self._ctx.isa
        return {
            "isa": isa,
            "kernel": self._ctx.kernel,
            "kernels": next(i.kernels for i in isas() if i.name == isa),
            "num_threads": self._ctx.num_threads,
            "numa_partitions": [format_cpulist(p) for p in self._ctx.partition_cpus],
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

    options: a moetune.ExpertsOptions (or a dict of its fields); keyword
    arguments set or override single options, e.g.
    MoEExperts(ctx, g, u, d, weight_format="int4", group_size=64). The options
    (see ExpertsOptions for each):

    activation: "swiglu" (h = silu(g) * u) or "gpt_oss" (gpt-oss's clamped
    SwiGLU: h = (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha * gc) with
    gc = min(g, limit); `alpha`, `limit` are gpt-oss's swiglu_alpha / swiglu_limit).

    weight_format: "bf16" (default), "int8" (per-output-channel symmetric),
    "int4" (symmetric, one scale per group_size inputs; group_size 32, 64 or
    128, default 128), "fp8_block" (e4m3 + a scale per 128 x 128 block) or
    "mxfp4" (e2m1 + an e8m0 scale per 32 inputs); moetune.weight_formats()
    lists them. Weights given here are quantized at load (published codes load
    as they are with load_expert_published) and dequantized inside
    the engine's GEMMs, forward and backward alike (activations, gradients
    and LoRA stay bf16/fp32). With a quantized format,
    backward_weights="transposed_copy" adds a bf16 copy of the dequantized
    weights for a faster backward (same values, same gradients).

    backward_weights ("repack" | "transposed_copy"), activations ("save" |
    "recompute"): memory / time trade-offs with bit-identical results.

    row_group: rows of one expert per GEMM task, a speed knob only (results
    are bit-identical for any value). 0 (default) = auto: up to 768 where a
    task prepares data per weight slice (dequantization, the backward's W^T
    repack), else up to 192.

    gate_bias, up_bias [E, I] and down_bias [E, H]: optional frozen expert
    biases (added to g, u before the activation and to each expert's output;
    kept as fp32, no gradient). Any subset may be given.
    """

    def __init__(
        self,
        ctx: Context,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        options: ExpertsOptions | None = None,
        *,
        gate_bias: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
        **option_kwargs,
    ):
        if gate_proj.dim() != 3:
            raise ValueError(f"gate_proj must be [E, I, H], got shape {list(gate_proj.shape)}")
        E, I, H = gate_proj.shape
        self._allocate(ctx, E, H, I, ExpertsOptions.resolve(options, **option_kwargs))
        for name, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(
                    f"{name} must be a floating-point tensor (bfloat16 or float32; float16 "
                    f"is converted), got {getattr(t, 'dtype', type(t).__name__)}"
                )
        # bf16 is taken bit-exact; float32 is rounded by the engine; other floats go through bf16.
        dtype = torch.float32 if gate_proj.dtype == torch.float32 else torch.bfloat16
        self._ex.load(_host(gate_proj, (dtype,)), _host(up_proj, (dtype,)), _host(down_proj, (dtype,)))
        if any(b is not None for b in (gate_bias, up_bias, down_bias)):
            self.load_biases(gate_bias, up_bias, down_bias)

    def load_biases(
        self,
        gate_bias: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> None:
        """Frozen expert biases: gate_bias, up_bias [E, I], down_bias [E, H] (any subset)."""
        biases = {"gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_bias}
        if any(b is not None for b in biases.values()):
            for name, b in biases.items():
                if b is not None and (not isinstance(b, torch.Tensor) or not b.is_floating_point()):
                    raise ValueError(
                        f"{name} must be a floating-point tensor (bfloat16 or float32), got "
                        f"{getattr(b, 'dtype', type(b).__name__)}"
                    )
            # One dtype for all: bf16 if every given bias is bf16 (exact), else fp32 (exact for fp16/bf16).
            given = [b for b in biases.values() if b is not None]
            bdt = torch.bfloat16 if all(b.dtype == torch.bfloat16 for b in given) else torch.float32
            self._ex.load_biases(*[None if b is None else _host(b, (bdt,)) for b in biases.values()])
            # The values the engine holds (it keeps them as fp32, exact for every input dtype), for
            # code that computes these experts elsewhere (moetune.placement's GPU path).
            self.biases = tuple(
                None if b is None else b.detach().to("cpu", torch.float32, copy=True) for b in biases.values()
            )

    @property
    def has_biases(self) -> tuple[bool, bool, bool]:
        """Whether the (gate, up, down) biases are loaded."""
        return tuple(self._ex.has_biases)

    def _allocate(self, ctx: Context, E: int, H: int, I: int, options: ExpertsOptions) -> None:
        self.ctx = ctx
        self._ex = _ext.Experts(ctx._ctx, int(E), int(H), int(I), options._to_ext())
        # Read back from the engine: what it actually holds.
        self._options = ExpertsOptions._from_ext(self._ex.options)
        self.biases = (None, None, None)  # (gate [E, I], up [E, I], down [E, H]) fp32 CPU, see load_biases

    @classmethod
    def empty(
        cls,
        ctx: Context,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        options: ExpertsOptions | None = None,
        **option_kwargs,
    ) -> MoEExperts:
        """Experts of the given shape with nothing loaded yet; fill every expert
        with load_expert (streaming loaders: one expert's weights in memory at a
        time). options / option_kwargs: as for the constructor."""
        self = cls.__new__(cls)
        self._allocate(
            ctx, num_experts, hidden_size, intermediate_size, ExpertsOptions.resolve(options, **option_kwargs)
        )
        return self

    @staticmethod
    def host_bytes(
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        options: ExpertsOptions | None = None,
        *,
        biases: bool = False,
        **option_kwargs,
    ) -> int:
        """Host bytes of such a layer's experts, computed by the engine without
        allocating (= packed_bytes once built; see ExpertsOptions.host_bytes)."""
        return ExpertsOptions.resolve(options, **option_kwargs).host_bytes(
            num_experts, hidden_size, intermediate_size, biases=biases
        )

    def load_expert(self, e: int, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Packs expert e from gate/up [I, H] and down [H, I] (bf16 bit-exact, fp32
        rounded, other floats through bf16). Distinct experts may be loaded from
        several threads at once."""
        for name, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(
                    f"expert {e}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
                )
        dtype = torch.float32 if gate_proj.dtype == torch.float32 else torch.bfloat16
        self._ex.load_expert(int(e), _host(gate_proj, (dtype,)), _host(up_proj, (dtype,)), _host(down_proj, (dtype,)))

    def load_expert_published(
        self,
        e: int,
        gate: tuple[torch.Tensor, torch.Tensor],
        up: tuple[torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Expert e from a checkpoint's own quantized (codes, scales) per projection (gate,
        up [I, H]; down [H, I] as [out, in]), kept bit for bit: this engine's weight_format
        must be the published one (fp8_block, mxfp4 or int4; moetune.weight_formats says
        what each holds). Codes of any dtype are read as their bytes: e4m3fn [out, in],
        mxfp4 uint8 [out, in / 32, 16], compressed-tensors int32 [out, in / 8]. A bad code
        or scale (NaN, wrong shape / dtype) is a ValueError naming the tensor and element."""
        from moetune.weight_formats import published_arrays

        arrays = []
        for name, pair, out in (
            ("gate_proj", gate, self.intermediate_size),
            ("up_proj", up, self.intermediate_size),
            ("down_proj", down, self.hidden_size),
        ):
            arrays += published_arrays(self.weight_format, pair[0], pair[1], out, f"{name} of expert {e}")
        self._ex.load_expert_published(int(e), *arrays)

    def unpack_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) bf16: the values the engine's
        GEMMs use for expert e (the loaded weights for bf16, dq(q(W)) for int8 /
        int4), unpacked by the engine's scalar code (an oracle; not fast)."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        if not 0 <= int(e) < E:
            raise ValueError(f"expert id {e} outside [0, {E})")
        gate, up = torch.empty(I, H, dtype=torch.bfloat16), torch.empty(I, H, dtype=torch.bfloat16)
        down = torch.empty(H, I, dtype=torch.bfloat16)
        self._ex.unpack_expert(int(e), gate, up, down)
        return gate, up, down

    def packed_buffers(self) -> list[PackedBuffer]:
        """The engine's packed weight buffers (biases excluded), e.g. for
        streaming one expert's bytes to another device: expert e's bytes of
        buffer b are b.array[e * b.per_expert_bytes:(e + 1) * b.per_expert_bytes].
        Layouts: csrc/kernels/gemm.h (bf16 panels), csrc/kernels/quant.h (q,
        scales), versioned by moetune._moetune_ext.PACKED_LAYOUT_VERSION. The
        arrays are views of the engine's memory: read-only by contract."""
        arrays = dict(self._ex.packed_buffers())
        return [
            PackedBuffer(name, proj, kind, K, N, per_expert, arrays[name])
            for name, proj, kind, K, N, per_expert, _ in self._ex.packed_layout()
        ]

    num_experts = property(lambda self: self._ex.num_experts)
    hidden_size = property(lambda self: self._ex.hidden_size)
    intermediate_size = property(lambda self: self._ex.intermediate_size)
    packed_bytes = property(lambda self: self._ex.packed_bytes)
    options = property(lambda self: self._options, doc="The typed options (moetune.ExpertsOptions).")
    weight_format = property(lambda self: self._options.weight_format)
    group_size = property(lambda self: self._options.group_size)
    activation = property(lambda self: self._options.activation)

    @property
    def packed_bytes_per_expert(self) -> int:
        """Host memory of one expert's frozen weights in the engine (all formats)."""
        return self._ex.packed_bytes // self._ex.num_experts


class PackedBuffer(NamedTuple):
    """One packed weight buffer of a MoEExperts (see MoEExperts.packed_buffers).

    name: "<projection>.<kind>"; projection: "gate" | "up" | "down"; kind:
    "bf16" (the forward operand [K = in, N = out] in bf16 panels), "q" /
    "scales" (that operand int8 / int4 quantized), "transposed_bf16" (the
    backward operand [K = out, N = in], backward_weights="transposed_copy");
    K, N: the packed operand's logical shape per expert; array: uint8 [E *
    per_expert_bytes], expert e at [e * per_expert_bytes, (e + 1) * per_expert_bytes).
    """

    name: str
    projection: str
    kind: str
    K: int
    N: int
    per_expert_bytes: int
    array: Any


@dataclasses.dataclass
class LoraWeights:
    """LoRA on the experts: out = W x + scaling * B (A x) per projection.

    Each of gate/up/down is None or a pair (A [E, r, in], B [E, out, r]),
    fp32 or bf16, typically nn.Parameters; an optimizer may update them in
    place between steps (the engine reads them at every call).
    """

    gate: tuple[torch.Tensor, torch.Tensor] | None = None
    up: tuple[torch.Tensor, torch.Tensor] | None = None
    down: tuple[torch.Tensor, torch.Tensor] | None = None
    scaling: float = 1.0

    def flat(self):
        """[A_gate, B_gate, A_up, B_up, A_down, B_down] (None where off)."""
        out = []
        for name in _PROJ:
            pair = getattr(self, name)
            if pair is None:
                out += [None, None]
            else:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(f"lora.{name} must be a pair (A, B) or None")
                if pair[0] is None or pair[1] is None:
                    raise ValueError(f"lora.{name}: A and B must both be given or both be None")
                out += list(pair)
        return out


def _ext_lora(flat, scaling: float):
    """The engine's Lora struct from flat [A_gate, B_gate, ..., B_down] (host tensors)."""
    pairs = {p: None if flat[2 * i] is None else (flat[2 * i], flat[2 * i + 1]) for i, p in enumerate(_PROJ)}
    return _ext.Lora(**pairs, scaling=float(scaling))


def _ext_lora_grads(flat):
    """The engine's LoraGrads struct from flat [dA_gate, dB_gate, ...] (None = not wanted)."""
    pairs = {
        p: None if flat[2 * i] is None and flat[2 * i + 1] is None else (flat[2 * i], flat[2 * i + 1])
        for i, p in enumerate(_PROJ)
    }
    return _ext.LoraGrads(**pairs)


class EngineCall:
    """One engine forward, then optionally its backward, in flight: the one way Python drives
    the engine (moe_experts here, the CPU share of moetune.placement's split layers).

    Each queued job (the binding's Job) holds every array it reads or writes until it is waited
    on, and waits for itself if dropped earlier, so nothing is freed under a running job: that
    happens when autograd drops a half-run recompute (non-reentrant checkpointing stops
    recomputing early) or an output is never waited on. This object keeps the output and
    gradient buffers it hands back and the saved-activation handle.
    Thread-compatible: one caller drives it. lora: the six flat LoRA tensors (None where
    absent; any device). out_dtype: the host output's dtype (default x's, bf16 or fp32);
    grads are fp32 but dx, which follows grad_dtype (default the incoming gradient's).
    pinned: page-locked host outputs (fast uploads to a GPU). busy_seconds: the engine time
    of the last job waited on.
    """

    def __init__(
        self,
        experts: MoEExperts,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_mask: torch.Tensor | None,
        lora,
        scaling: float,
        *,
        out_dtype: torch.dtype | None = None,
        pinned: bool = False,
    ):
        self.experts, self.scaling, self.pinned = experts, float(scaling), pinned
        self.job = self.bwd_job = self.grads = None
        self.busy_seconds = 0.0
        xh = _host(x)
        ids = topk_ids.detach().to("cpu").contiguous()
        wh = _host(topk_weights)
        mask = None if expert_mask is None else expert_mask.detach().to("cpu", torch.bool).contiguous()
        self.lora_h = [None if t is None else _host(t) for t in lora]
        self.k = topk_ids.shape[1] if topk_ids.dim() == 2 else 0
        self.out = (
            torch.empty(xh.shape, dtype=out_dtype or xh.dtype, pin_memory=pinned) if xh.dim() == 2 else torch.empty(0)
        )
        self._busy0 = experts.ctx.busy_seconds()
        # The job holds every array it reads or writes until it is waited on (the binding's
        # guarantee), so the host copies need no other owner here.
        self.handle, self.job = experts._ex.forward(xh, ids, wh, mask, _ext_lora(self.lora_h, scaling), self.out)
        # The engine reads these while the job runs: an in-place edit before the wait would mix
        # old and new values into the result, so it is detected there (version counters).
        self._reads = _Versions(
            {"x": xh, "topk_ids": ids, "topk_weights": wh, "expert_mask": mask, **_lora_names(self.lora_h)}
        )

    def _wait(self, job) -> None:
        t0 = time.perf_counter()
        job.wait()
        ctx = self.experts.ctx
        ctx.wait_seconds += time.perf_counter() - t0
        self.busy_seconds = ctx.busy_seconds() - self._busy0

    def wait_forward(self) -> torch.Tensor:
        """The output [T, H] on the host (rows of masked experts contribute 0)."""
        self._wait(self.job)
        out, self.out = self.out, None
        self.job = None
        self._reads.check("the engine forward (moe_experts_async ... wait())")
        return out

    def submit_backward(
        self, grad_out: torch.Tensor, need_dx: bool, need_dw: bool, need_lora, grad_dtype: torch.dtype | None = None
    ) -> None:
        if self.bwd_job is not None:
            raise RuntimeError("moetune: a backward of this engine call is already running")
        g = _host(grad_out)
        T, H = g.shape
        pin = self.pinned
        dx = torch.empty((T, H), dtype=grad_dtype or g.dtype, pin_memory=pin) if need_dx else None
        dw = torch.empty((T, self.k), dtype=torch.float32, pin_memory=pin) if need_dw else None
        grads = [
            torch.empty(t.shape, dtype=torch.float32, pin_memory=pin) if (t is not None and n) else None
            for t, n in zip(self.lora_h, need_lora)
        ]
        self._busy0 = self.experts.ctx.busy_seconds()
        self.bwd_job = self.experts._ex.backward(
            self.handle, g, _ext_lora(self.lora_h, self.scaling), dx, dw, _ext_lora_grads(grads)
        )
        self.grads = (dx, dw, grads)
        self._reads = _Versions({"grad_out": g, **_lora_names(self.lora_h)})

    @property
    def backward_started(self) -> bool:
        return self.bwd_job is not None

    def wait_backward(self):
        """(dx [T, H] | None, dw fp32 [T, k] | None, [six LoRA grads fp32 | None]) on the host;
        the LoRA grads of experts without rows here (masked or unrouted) are exact zeros."""
        self._wait(self.bwd_job)
        self.bwd_job = None
        grads, self.grads = self.grads, None
        self._reads.check("the engine backward")
        return grads

    def __del__(self):
        for name in ("job", "bwd_job"):
            job = getattr(self, name, None)
            if job is not None:
                try:
                    job.wait()
                except Exception:  # its error was (or will be) reported where it was awaited
                    pass


def _lora_names(flat) -> dict:
    return {f"lora.{_PROJ[i // 2]}.{'AB'[i % 2]}": t for i, t in enumerate(flat)}


class _Versions:
    """The version counters of the tensors a queued job reads (views and detached aliases share
    their base's counter, so an in-place edit of the caller's tensor shows here; a private host
    copy is never edited)."""

    def __init__(self, tensors: dict):
        self.seen = [(n, t, t._version) for n, t in tensors.items() if t is not None and not t.is_inference()]

    def check(self, what: str) -> None:
        changed = [n for n, t, v in self.seen if t._version != v]
        self.seen = []
        if changed:
            raise RuntimeError(
                f"moetune: {', '.join(changed)} modified in place while {what} was reading it: the "
                "result would mix old and new values; edit only after wait() (or pass a clone)"
            )


class _Pending:
    """The autograd side of one moe_experts_async call (shared by its two halves)."""

    __slots__ = ("call", "device", "x_dtype", "w_dtype", "lora", "needs")


class _Submit(torch.autograd.Function):
    """Queues the engine forward; its backward waits for the engine backward."""

    @staticmethod
    def forward(ctx, state, experts, scaling, x, topk_ids, topk_weights, expert_mask, *lora):
        state.call = EngineCall(experts, x, topk_ids, topk_weights, expert_mask, lora, scaling)
        state.device, state.x_dtype, state.w_dtype = x.device, x.dtype, topk_weights.dtype
        state.lora = lora
        state.needs = ctx.needs_input_grad[3:]  # (x, ids, w, mask, *lora)
        ctx.state = state
        # Saved through autograd so in-place edits before backward are caught.
        ctx.save_for_backward(*lora)
        return torch.empty(0, device=x.device)  # a ticket linking the two halves

    @staticmethod
    def backward(ctx, _grad_ticket):
        ctx.saved_tensors  # noqa: B018 - the version check of the LoRA tensors
        st = ctx.state
        if not st.call.backward_started:
            raise RuntimeError("moetune: engine backward was not started (output had no gradient)")
        dx, dw, grads = st.call.wait_backward()
        out_lora = [None if g is None else g.to(device=o.device, dtype=o.dtype) for o, g in zip(st.lora, grads)]
        return (
            None,
            None,
            None,
            None if dx is None else dx.to(device=st.device, dtype=st.x_dtype),
            None,
            None if dw is None else dw.to(device=st.device, dtype=st.w_dtype),
            None,
            *out_lora,
        )


class _Wait(torch.autograd.Function):
    """Waits for the engine forward; its backward queues the engine backward."""

    @staticmethod
    def forward(ctx, state, ticket):
        # The call drops every reference to the output: it will point back to this
        # node (grad_fn), and a cycle through autograd's C++ edges is never freed.
        out = state.call.wait_forward()
        ctx.state = state
        return out.to(state.device)

    @staticmethod
    def backward(ctx, grad_out):
        st = ctx.state
        need = st.needs  # (x, ids, w, mask, *lora)
        st.call.submit_backward(grad_out, need[0], need[2], need[4:])
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
        return self._state.call.handle.nbytes

    def wait(self) -> torch.Tensor:
        if self._out is None:
            self._out = _Wait.apply(self._state, self._ticket)
        return self._out


def moe_experts_async(
    experts: MoEExperts,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    lora: LoraWeights | None = None,
    expert_mask: torch.Tensor | None = None,
) -> PendingMoE:
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


def moe_experts(
    experts: MoEExperts,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    lora: LoraWeights | None = None,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x[t]), gated
    experts (SwiGLU or gpt-oss's variant, see MoEExperts) with optional LoRA, computed by the CPU engine; differentiable in
    x, topk_weights and the LoRA tensors. Returns x's dtype on x's device."""
    return moe_experts_async(experts, x, topk_ids, topk_weights, lora, expert_mask).wait()
