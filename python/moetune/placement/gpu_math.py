"""The routed experts' math on the GPU for one segment of rows (experts sharing one weight set).

Per row (token t, slot j, expert e, routing weight w), as csrc/engine/moe_experts.h:
  g = Wg x + s Bg (Ag x) [+ bg],  u = Wu x + s Bu (Au x) [+ bu],  h = act(bf16(g), bf16(u))
  y = Wd h + s Bd (Ad h) [+ bd],  out[t] = sum_j w y   (the sum: routing.combine, fp32)
with act = SwiGLU (silu(g) u) or gpt-oss's clamped SwiGLU (alpha, limit, torch.clamp's
subgradient), and the manual backward: dx, d topk_weights (<dout, y> computed as <D, h> +
<dout, bd> with D = Wd^T dout + s Ad^T (Bd^T dout)), and the six LoRA gradients.

Numerics. Operands bf16, accumulation fp32, g and u rounded to bf16 before the activation (also
when recomputed in backward: results do not depend on whether the forward was a checkpoint
recompute), the per-token sums in fp32. Unlike the CPU engine, every GEMM result is rounded to
bf16 (grouped_mm writes bf16, see gemm.py), and the LoRA scale s is applied in fp32 after the
expand GEMM rather than before it (z = bf16(A x), then s * bf16(z B^T)): the bf16-rounded points
on the longest dependency chain of each result are

  out            z, bf16(z Bg^T), g, h, zd, bf16(zd Bd^T)                                  6
  d topk_weights those of y, dout                                                            7
  dB (gate)      z, bf16(z B^T), g, dout, q = bf16(dout Bd), bf16(q Ad), dg, bf16(dB)        8
  dA (gate)      ... dg (as dB), p = bf16(dg Bg), bf16(dA)                                  9
  dx             ... dg, p, bf16(p Ag)                                                      9

(the CPU engine: 4, 5, 6, 7, 7; tests/python/test_placement_gpu_math.py derives its tolerances
from this table). Routing weights multiply fp32 values except in the two down-LoRA gradient
operands bf16(w zd) and bf16(w q), which the engine rounds the same way.

Gate and up as one GEMM. When the weights are the two halves of one [G, 2I, H] buffer (formats.
empty_decoded: resident pools, staging, keep slots) and gate and up carry LoRA of one rank (or
neither does), both are computed together: [g | u] = x [Wg | Wu]^T + s (x [Ag | Au]^T) Bbd^T with
Bbd = [[Bg, 0], [0, Bu]] (SegmentOperands.lora["gate_up"]), and in backward dx = [dg | du] [Wg | Wu],
p = [dg | du] Bbd, dA = p^T x, dB = the diagonal blocks of [dg | du]^T [zg | zu], dx += s p [Ag | Au].
The zero blocks add exact zeros, so each value is the same sum (its fp32 accumulation order may
differ); the fused dx and its LoRA term are each rounded to bf16 once instead of twice (fewer
rounded points than the table above counts). Half the launches and one read of x for the two.

Nothing here keeps the weights: backward gets them again from the caller (resident pool, staging
buffers, or a keep slot) and recomputes g, u, h from x.
"""

from __future__ import annotations

import dataclasses

import torch

from moetune.placement.gemm import Gemm

BF16, F32 = torch.bfloat16, torch.float32


@dataclasses.dataclass(frozen=True)
class Activation:
    kind: str = "swiglu"  # "swiglu" | "gpt_oss"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.kind not in ("swiglu", "gpt_oss"):
            raise ValueError(f"activation must be 'swiglu' or 'gpt_oss', got {self.kind!r}")

    def forward(self, gb: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
        """h = bf16(act(g, u)) from bf16 g, u (fp32 math)."""
        g = gb.float()
        if self.kind == "swiglu":  # (g sigmoid(g)) u in fp32; u promoted inside the multiply
            return g.mul_(torch.sigmoid(g)).mul_(ub).to(BF16)
        u = ub.float()
        gc = g.clamp(max=self.limit)
        uc = u.clamp(-self.limit, self.limit)
        return ((uc + 1.0) * (gc * torch.sigmoid(self.alpha * gc))).to(BF16)

    def backward(self, gb: torch.Tensor, ub: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dg, du) in bf16 for the fp32 gradient dh of h."""
        g = gb.float()
        if self.kind == "swiglu":
            sg = torch.sigmoid(g)
            # dg = (dh u) sg (1 + g (1 - sg)), du = dh g sg: fp32, in place where the operand dies.
            dg = (dh * ub).mul_(sg).mul_(torch.rsub(sg, 1.0).mul_(g).add_(1.0))
            return dg.to(BF16), g.mul_(sg).mul_(dh).to(BF16)
        u = ub.float()
        gc = g.clamp(max=self.limit)
        uc = u.clamp(-self.limit, self.limit)
        sa = torch.sigmoid(self.alpha * gc)
        dg = dh * (uc + 1.0) * sa * (1.0 + self.alpha * gc * (1.0 - sa))
        du = dh * (gc * sa)
        zero = torch.zeros((), dtype=F32, device=g.device)
        # torch.clamp's subgradient: passes on the closed interval, 0 outside (and for NaN).
        dg = torch.where(g <= self.limit, dg, zero)
        du = torch.where((u >= -self.limit) & (u <= self.limit), du, zero)
        return dg.to(BF16), du.to(BF16)


@dataclasses.dataclass
class SegmentOperands:
    """The operands of one segment's GEMMs, all on the device.

    W: (gate [G, I, H], up [G, I, H], down [G, H, I]) bf16, one group per weight set member;
    offs/sizes: its row groups (device int32 cumulative ends / host counts, zeros allowed);
    coffs/csizes: the non-empty groups only (the LoRA groups: one per active expert);
    lora: proj -> (A [n_active, r8, in], B [n_active, out, r8]) bf16 (r padded to r8 with zeros)
    or None, and "gate_up" -> (A [n_active, 2 r8, H] = [Ag | Au], B [n_active, 2I, 2 r8] block-diagonal)
    when gate and up carry LoRA of one rank ("gate" / "up" are then views of it); biases: per-row (gate [n, I], up [n, I], down [n, H]) fp32 or None each."""

    W: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    offs: torch.Tensor
    sizes: list
    coffs: torch.Tensor
    csizes: list
    lora: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    scaling: float
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)


def fused_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """The [G, 2I, H] buffer whose halves are gate and up ([G, I, H] each, formats.empty_decoded),
    or None when they are separate tensors."""
    G, I, H = gate.shape
    if (
        up.shape != gate.shape
        or gate.stride() != (2 * I * H, H, 1)
        or up.stride() != gate.stride()
        or up.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()
        or up.data_ptr() != gate.data_ptr() + I * H * gate.element_size()
    ):
        return None
    return gate.as_strided((G, 2 * I, H), (2 * I * H, H, 1))


def _fused(ops: SegmentOperands) -> torch.Tensor | None:
    """W_gu when the segment's gate and up run as one GEMM (module doc), else None."""
    if ops.biases[0] is not None or ops.biases[1] is not None:
        return None
    has = (ops.lora.get("gate") is not None, ops.lora.get("up") is not None)
    if has != (False, False) and (has != (True, True) or ops.lora.get("gate_up") is None):
        return None
    return fused_gate_up(ops.W[0], ops.W[1])


def _proj_in(gemm: Gemm, ops: SegmentOperands, which: int, x: torch.Tensor):
    """bf16(W x + s B (A x) [+ b]) (the sum in fp32) for gate (0) / up (1), and z = bf16(A x)
    (None without LoRA). Without a bias the sum and its rounding are one bf16 add (torch adds bf16
    operands in fp32, `alpha` included, and rounds once): no fp32 copy of the [n, I] result."""
    name = ("gate", "up")[which]
    base = gemm.mm(x, ops.W[which].transpose(1, 2), ops.offs, ops.sizes)
    z = lo = None
    pair = ops.lora.get(name)
    if pair is not None:
        A, B = pair
        z = gemm.mm(x, A.transpose(1, 2), ops.coffs, ops.csizes)
        lo = gemm.mm(z, B.transpose(1, 2), ops.coffs, ops.csizes)
    bias = ops.biases[which]
    if bias is None:
        return (base if lo is None else torch.add(base, lo, alpha=ops.scaling)), z
    acc = base.float()
    if lo is not None:
        acc.add_(lo, alpha=ops.scaling)
    return acc.add_(bias).to(BF16), z


def _gate_up(gemm, act, ops, x):
    """(g, u, h, zg, zu, z_gu): z_gu = [zg | zu] when gate and up ran as one GEMM (else None)."""
    W = _fused(ops)
    if W is None:
        gb, zg = _proj_in(gemm, ops, 0, x)
        ub, zu = _proj_in(gemm, ops, 1, x)
        return gb, ub, act.forward(gb, ub), zg, zu, None
    I = ops.W[0].shape[1]
    gu = gemm.mm(x, W.transpose(1, 2), ops.offs, ops.sizes)
    z = None
    pair = ops.lora.get("gate_up")
    if pair is not None:
        A, B = pair
        z = gemm.mm(x, A.transpose(1, 2), ops.coffs, ops.csizes)
        gu = torch.add(gu, gemm.mm(z, B.transpose(1, 2), ops.coffs, ops.csizes), alpha=ops.scaling)
    gb, ub = gu[:, :I], gu[:, I:]
    r = None if z is None else z.shape[1] // 2
    zg, zu = (None, None) if z is None else (z[:, :r], z[:, r:])
    return gb, ub, act.forward(gb, ub), zg, zu, z


def forward_segment(
    gemm: Gemm, act: Activation, ops: SegmentOperands, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y fp32 [n, H] for the segment's rows x bf16 [n, H], written into `out` (fp32 [n, H], e.g.
    the caller's slice of all rows) when given."""
    h = _gate_up(gemm, act, ops, x)[2]
    base = gemm.mm(h, ops.W[2].transpose(1, 2), ops.offs, ops.sizes)
    y = base.float() if out is None else out.copy_(base)
    del base
    pair = ops.lora.get("down")
    if pair is not None:
        A, B = pair
        zd = gemm.mm(h, A.transpose(1, 2), ops.coffs, ops.csizes)
        y.add_(gemm.mm(zd, B.transpose(1, 2), ops.coffs, ops.csizes), alpha=ops.scaling)
    if ops.biases[2] is not None:
        y.add_(ops.biases[2])
    return y


@dataclasses.dataclass
class SegmentGrads:
    dx: torch.Tensor | None  # fp32 [n, H] per row (summed per token by the caller)
    dw: torch.Tensor | None  # fp32 [n] per row: d topk_weights of its slot
    lora: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]  # fp32 [n_active, ...] (r8)


def backward_segment(
    gemm: Gemm,
    act: Activation,
    ops: SegmentOperands,
    x: torch.Tensor,
    dout: torch.Tensor,
    w: torch.Tensor,
    *,
    need_dx: bool,
    need_dw: bool,
    need_lora: dict[str, tuple[bool, bool]],
) -> SegmentGrads:
    """Gradients for the segment's rows: x, dout bf16 [n, H] (dout of each row's token), w fp32 [n]
    (each row's routing weight). need_lora: proj -> (need dA, need dB)."""
    s = ops.scaling
    lo = ops.lora
    gb, ub, h, zg, zu, z_gu = _gate_up(gemm, act, ops, x)
    grads: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    # Through down: D = Wd^T dout + s Ad^T q with q = bf16(Bd^T dout).
    D = gemm.mm(dout, ops.W[2], ops.offs, ops.sizes).float()
    q = None
    if lo.get("down") is not None:
        A, B = lo["down"]
        q = gemm.mm(dout, B, ops.coffs, ops.csizes)
        D.add_(gemm.mm(q, A, ops.coffs, ops.csizes), alpha=s)
    dw = None
    if need_dw:
        dw = (D * h).sum(1)
        if ops.biases[2] is not None:
            dw.add_((dout.float() * ops.biases[2]).sum(1))
    if lo.get("down") is not None:
        nA, nB = need_lora.get("down", (False, False))
        wc = w[:, None]
        dA = dB = None
        if nB:  # dBd = s sum_t dout_t (w_t zd_t)^T, zd = bf16(Ad h)
            zd = gemm.mm(h, lo["down"][0].transpose(1, 2), ops.coffs, ops.csizes)
            dB = gemm.mm_tn(dout, (zd * wc).to(BF16), ops.coffs, ops.csizes).float().mul_(s)
        if nA:  # dAd = s sum_t (w_t q_t) h_t^T
            dA = gemm.mm_tn((q * wc).to(BF16), h, ops.coffs, ops.csizes).float().mul_(s)
        grads["down"] = (dA, dB)
    del h, q
    need_gu = need_dx or any(any(need_lora.get(p, (False, False))) for p in ("gate", "up") if lo.get(p) is not None)
    dx = None
    W_gu = _fused(ops)
    need_g, need_u = (need_lora.get(p, (False, False)) for p in ("gate", "up"))
    if need_gu and W_gu is not None and (z_gu is None or need_g == need_u):
        D.mul_(w[:, None])
        dx, grads_gu = _gate_up_backward(gemm, act, ops, W_gu, x, gb, ub, D, z_gu, need_dx, need_g)
        grads.update(grads_gu)
    elif need_gu:
        D.mul_(w[:, None])  # dh = w D
        dg, du = act.backward(gb, ub, D)
        del D, gb, ub
        if need_dx:
            dx = gemm.mm(dg, ops.W[0], ops.offs, ops.sizes).float()
            dx.add_(gemm.mm(du, ops.W[1], ops.offs, ops.sizes))
        for name, d, z in (("gate", dg, zg), ("up", du, zu)):
            if lo.get(name) is None:
                continue
            A, B = lo[name]
            nA, nB = need_lora.get(name, (False, False))
            p = gemm.mm(d, B, ops.coffs, ops.csizes) if (nA or need_dx) else None  # bf16(B^T dg)
            gA = gemm.mm_tn(p, x, ops.coffs, ops.csizes).float().mul_(s) if nA else None
            gB = gemm.mm_tn(d, z, ops.coffs, ops.csizes).float().mul_(s) if nB else None
            grads[name] = (gA, gB)
            if need_dx:
                dx.add_(gemm.mm(p, A, ops.coffs, ops.csizes), alpha=s)
    return SegmentGrads(dx, dw, grads)


def _gate_up_backward(gemm, act, ops, W_gu, x, gb, ub, dh, z_gu, need_dx, need_gate):
    """backward_segment's gate/up part as one set of GEMMs (module doc): (dx fp32 [n, H] or None,
    {"gate": (dA, dB), "up": (dA, dB)} when they carry LoRA)."""
    s = ops.scaling
    I = gb.shape[1]
    dg, du = act.backward(gb, ub, dh)
    d = torch.cat((dg, du), 1)  # [n, 2I]
    del dg, du
    dx = gemm.mm(d, W_gu, ops.offs, ops.sizes).float() if need_dx else None
    grads = {}
    if z_gu is None:
        return dx, grads
    A, B = ops.lora["gate_up"]  # [n_act, 2r, H], [n_act, 2I, 2r] block-diagonal
    r = A.shape[1] // 2
    nA, nB = need_gate
    p = gemm.mm(d, B, ops.coffs, ops.csizes) if (nA or need_dx) else None  # [n, 2r] = [dg Bg | du Bu]
    gA = gemm.mm_tn(p, x, ops.coffs, ops.csizes).float().mul_(s) if nA else None  # [n_act, 2r, H]
    gB = gemm.mm_tn(d, z_gu, ops.coffs, ops.csizes).float().mul_(s) if nB else None  # [n_act, 2I, 2r]
    grads["gate"] = (None if gA is None else gA[:, :r], None if gB is None else gB[:, :I, :r])
    grads["up"] = (None if gA is None else gA[:, r:], None if gB is None else gB[:, I:, r:])
    if need_dx:
        dx.add_(gemm.mm(p, A, ops.coffs, ops.csizes), alpha=s)
    return dx, grads
