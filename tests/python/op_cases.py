"""Shared helpers for the moetune.moe_experts tests (test_moe_op.py, test_moe_op_errors.py).

Cases, input generation, engine/reference runners, the tolerance table and the
comparison helpers, and the bad-input builders.

Tolerances
==========
The engine computes every product with bf16 operands and fp32 accumulation.
The test inputs (x, weights, LoRA A/B, topk_weights, upstream gradients) are
generated bf16-valued, so rounding them is exact; the reference runs in fp32 on
the same values.  What separates the engine from the reference is therefore
only the rounding of *intermediates* to bf16, each of which is a relative
perturbation of at most u = 2^-8 (bf16 has an 8-bit significand, round to
nearest).  fp32 accumulation error (~K * 2^-24 with K <= 128 here) is three
orders of magnitude smaller and ignored.

To first order the errors of the individual roundings add, each multiplied by
the condition number of what follows it (products: 1; silu:
|1 + g (1 - sigmoid(g))|, <= 2 for g >= -2.5, i.e. for the bulk of the O(1)
pre-activations used here).  We compare norm-wise,

    max_i |engine_i - ref_i|  <=  (c + n_out) * u * scale

with scale = max_i |ref_i| and c = 2 x (number of bf16 roundings on the
longest dependency chain of the quantity), the factor 2 covering the condition
numbers above and the random-walk sum of the per-rounding errors.  n_out = 1
when the quantity itself is returned in bf16 (x bf16 -> out and dx; bf16
topk_weights -> their gradient; bf16 LoRA params -> dA, dB): that final
rounding adds at most u * |ref_i| <= u * scale, exactly.

Roundings counted (forward):  a = s*(A_gate/up x) [1], g and u [2], h [3],
s*(A_down h) [4].  Backward: dout, or w*dout, as the down GEMM operand [5],
s*(B_down^T dy) [6], dh [7], dg and du [8], s*(B_gate/up^T dg) [9].

  quantity          depends on roundings                    n   c = 2n
  out               1 2 3 4                                 4    8
  d topk_weights    1 2 3 4 (y) + 5 (dout) [*]              5   10
  dB (worst: gate)  1 2 (a, g/u) 5 6 7 8 (dg)               6   12
  dA (worst: gate)  1 2 5 6 7 8 (dg) + 9                    7   14
  dx                1 2 5 6 7 8 9                           7   14

[*] d topk_weights[t, j] = <dout[t], y[t, j]> is a single dot product over H,
so for tiny T*k its max|ref| may suffer accidental cancellation.  Its scale is
max(max|ref|, max_{t,j} ||dout[t]||_2 ||y[t,j]||_2 / sqrt(H)): the
RMS-product magnitude that a dot product of H terms has for generic data,
equal to max|ref| up to O(1) when T*k is not tiny, but immune to
cancellation.  The error of a dot product whose operand y carries an error
dy is ~ ||dout|| ||dy|| / sqrt(H) statistically, so this is the right
yardstick.  (The engine computes it as <Wd^T dout + s Ad^T(Bd^T dout), h>,
the same value with the same number of roundings.)

test_tolerance_table_is_attainable checks that a bf16 *emulation* of the
engine (reference.py, emulate_bf16=True, which rounds at all of the points
above) passes these same tolerances on every sweep case: the table is not too
tight for a correct implementation.  Over 30 seeds of every sweep, bitwise and
ISA case, the emulation's worst err/(u*scale) was: out 2.4, dx 2.7,
d topk_weights 6.4, dA 5.9, dB 4.0 (medians ~1), against c = 8, 14, 10, 14, 12.
Do not loosen this table to make a test pass: a failure here is a finding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import pytest
import reference as R
import torch
import torch.nn as nn
import torch.utils.checkpoint
from reference import PROJS

try:  # A missing or broken moetune must FAIL the tests, not skip them (no importorskip).
    import moetune
except Exception as _import_error:  # noqa: BLE001
    _IMPORT_ERROR = repr(_import_error)

    class _MissingMoetune:
        """Stands in for the module: any use fails the test that uses it (FAILED, not skipped)."""

        def __getattr__(self, name):
            # Only the API names (Context, MoEExperts, LoraWeights, moe_experts) fail; anything
            # else (pytest's own probing of module globals at collection) is a plain AttributeError.
            if not name[:1].isupper() and name != "moe_experts":
                raise AttributeError(name)
            pytest.fail(f"cannot import moetune: {_IMPORT_ERROR}", pytrace=False)

    moetune = _MissingMoetune()

U = 2.0**-8  # bf16 unit roundoff

# c per quantity, see the module docstring for the derivation.
TOL_C = {
    "out": 8,
    "dtopk_weights": 10,
    "dB": 12,
    "dA": 14,
    "dx": 14,
}

BF16, F32, I32, I64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
ALL = ("gate", "up", "down")
# Every ISA of the engine's table (moetune.isas()); each runs where the CPU has it, else skips.
ISAS = tuple(isa.name for isa in moetune.isas())


@functools.cache
def get_ctx(num_threads: int = 2, isa: str = "auto"):
    return moetune.Context(num_threads=num_threads, isa=isa)


def isa_ctx_or_skip(isa: str, num_threads: int = 2):
    """The (cached) Context of `isa`, or a skip naming what this CPU lacks. A
    runnable ISA whose Context fails is a failure, not a skip."""
    info = next(i for i in moetune.isas() if i.name == isa)
    if not info.runnable:
        pytest.skip(f"ISA {isa} not available on this CPU (lacks {' '.join(info.missing_features)})")
    return get_ctx(num_threads, isa)


# ----------------------------------------------------------------------------
# Cases and inputs
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int
    H: int
    I: int
    E: int
    k: int
    r: int
    lora: tuple[str, ...]
    w_dtype: torch.dtype = F32
    ids_dtype: torch.dtype = I64
    x_dtype: torch.dtype = F32
    routing: str = "uniform"  # uniform | subset | single | dup | skewed
    lora_dtype: torch.dtype = F32

    def __str__(self):
        s = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return (
            f"{self.name}-T{self.T}H{self.H}I{self.I}E{self.E}k{self.k}r{self.r}"
            f"-lora[{','.join(self.lora) or 'none'}]-w{s(self.w_dtype)}-ids{s(self.ids_dtype)}"
            f"-x{s(self.x_dtype)}-{self.routing}-lora{s(self.lora_dtype)}"
        )


SWEEP = [
    Case("T1_k1", 1, 32, 16, 4, 1, 4, ALL),
    Case("T1_kE", 1, 40, 24, 4, 4, 1, ("gate",), BF16, I32, BF16),
    Case("kE_odd", 9, 33, 17, 3, 3, 1, ("gate", "up"), F32, I32, F32),
    Case("odd_all_r16", 7, 33, 17, 5, 2, 16, ALL, BF16, I64, F32),
    Case("H40_I24_down", 11, 40, 24, 6, 2, 16, ("down",), F32, I64, BF16),
    Case("up_only", 8, 40, 24, 4, 2, 4, ("up",), BF16, I32, F32),
    Case("no_lora", 16, 64, 32, 8, 2, 4, ()),
    Case("no_lora_bf16", 5, 40, 24, 4, 2, 4, (), BF16, I32, BF16),
    Case("empty_experts", 6, 48, 32, 16, 2, 4, ALL, F32, I64, F32, "subset"),
    Case("one_expert", 12, 40, 24, 6, 1, 4, ALL, F32, I32, F32, "single"),
    Case("one_expert_odd", 12, 33, 17, 6, 1, 1, ("down",), BF16, I64, BF16, "single"),
    Case("dup_slots", 5, 32, 16, 4, 2, 4, ALL, F32, I64, F32, "dup"),
    Case("skewed", 48, 64, 48, 8, 2, 4, ALL, F32, I64, BF16, "skewed"),
    Case("lora_bf16", 10, 40, 24, 4, 2, 4, ALL, BF16, I64, F32, "uniform", BF16),
    Case("lora_bf16_gate_up", 10, 33, 17, 5, 3, 16, ("gate", "up"), F32, I32, BF16, "uniform", BF16),
    Case("r1_all", 20, 48, 40, 6, 2, 1, ALL, BF16, I64, F32),
    Case("E1", 3, 32, 16, 1, 1, 4, ALL),
    Case("larger", 64, 96, 80, 8, 4, 16, ALL, F32, I64, F32, "skewed"),
]


@dataclasses.dataclass
class Inputs:
    case: Case
    x: torch.Tensor  # [T, H] x_dtype
    ids: torch.Tensor  # [T, k] ids_dtype
    w: torch.Tensor  # [T, k] w_dtype
    gate: torch.Tensor  # [E, I, H] bf16
    up: torch.Tensor
    down: torch.Tensor  # [E, H, I] bf16
    lora_params: dict[str, tuple[torch.Tensor, torch.Tensor]]  # all three projections, lora_dtype
    scaling: float
    dout: torch.Tensor  # [T, H] x_dtype, bf16-valued

    def lora_for_reference(self, projs=None):
        projs = self.case.lora if projs is None else projs
        return {p: self.lora_params[p] for p in projs}


def _bf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bf16-valued tensor stored as dtype."""
    return t.to(BF16).to(dtype).contiguous()


def make_routing(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, E, k = case.T, case.E, case.k
    ids = torch.empty(T, k, dtype=I64)
    if case.routing == "uniform":
        for t in range(T):
            ids[t] = torch.randperm(E, generator=gen)[:k]
    elif case.routing == "subset":  # only every third expert, starting at 1, ever gets tokens
        allowed = torch.arange(1, E, 3)
        assert allowed.numel() >= k
        for t in range(T):
            ids[t] = allowed[torch.randperm(allowed.numel(), generator=gen)[:k]]
    elif case.routing == "single":  # slot 0 of every token goes to the same expert
        e0 = E // 2
        others = torch.tensor([e for e in range(E) if e != e0], dtype=I64)
        for t in range(T):
            ids[t, 0] = e0
            if k > 1:
                ids[t, 1:] = others[torch.randperm(others.numel(), generator=gen)[: k - 1]]
    elif case.routing == "dup":  # all slots of a token name the same expert
        for t in range(T):
            ids[t] = torch.randint(0, E, (1,), generator=gen).item()
    elif case.routing == "skewed":  # Zipf-like popularity
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E, generator=gen)]
        ids = torch.multinomial(p.expand(T, E), k, replacement=False, generator=gen)
    else:
        raise AssertionError(case.routing)
    return ids.to(case.ids_dtype).contiguous()


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    T, H, I, E, k, r = case.T, case.H, case.I, case.E, case.k, case.r
    rn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = _bf(rn(T, H), case.x_dtype)
    gate = _bf(rn(E, I, H) / math.sqrt(H), BF16)
    up = _bf(rn(E, I, H) / math.sqrt(H), BF16)
    down = _bf(rn(E, H, I) / math.sqrt(I), BF16)
    # s != 1 everywhere, so a dropped or doubled scaling cannot go unnoticed;
    # B is scaled so that s*B(Ax) is as large as W x (LoRA errors must show in `out`).
    scaling = 32.0 / r
    lora = {}
    for p, (din, dout_) in zip(PROJS, ((H, I), (H, I), (I, H))):
        A = _bf(rn(E, r, din) / math.sqrt(din), case.lora_dtype)
        B = _bf(rn(E, dout_, r) / (math.sqrt(r) * scaling), case.lora_dtype)
        lora[p] = (A, B)
    ids = make_routing(case, gen)
    w = torch.rand(T, k, generator=gen) + 0.05
    w = _bf(w / w.sum(1, keepdim=True), case.w_dtype)
    dout = _bf(rn(T, H), case.x_dtype)
    return Inputs(case, x, ids, w, gate, up, down, lora, scaling, dout)


def sweep_seed(case: Case) -> int:
    return 1000 + SWEEP.index(case)


# ----------------------------------------------------------------------------
# Running the engine
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    out: torch.Tensor
    dx: torch.Tensor | None
    dtopk_weights: torch.Tensor | None
    dA: dict[str, torch.Tensor | None]
    dB: dict[str, torch.Tensor | None]


def make_experts(inp: Inputs, ctx=None, **kw):
    ctx = get_ctx() if ctx is None else ctx
    return moetune.MoEExperts(ctx, inp.gate, inp.up, inp.down, **kw)


def fresh_lora(inp: Inputs, projs):
    """New nn.Parameters for all three projections; returns (params, LoraWeights or None)."""
    params = {
        p: (nn.Parameter(inp.lora_params[p][0].clone()), nn.Parameter(inp.lora_params[p][1].clone())) for p in PROJS
    }
    if not projs:
        return params, None
    lw = moetune.LoraWeights(**{p: (params[p] if p in projs else None) for p in PROJS}, scaling=inp.scaling)
    return params, lw


def run_engine(experts, inp: Inputs, projs=None, *, expert_mask=None) -> Result:
    """Forward + out.backward(dout) with fresh leaves; returns the .grad of each."""
    projs = inp.case.lora if projs is None else projs
    x = inp.x.detach().clone().requires_grad_(True)
    w = inp.w.detach().clone().requires_grad_(True)
    params, lw = fresh_lora(inp, projs)
    out = moetune.moe_experts(experts, x, inp.ids, w, lora=lw, expert_mask=expert_mask)
    out.backward(inp.dout)
    for p in PROJS:
        if p not in projs:
            assert params[p][0].grad is None and params[p][1].grad is None, f"LoRA {p} was not passed but got a grad"
    return Result(
        out.detach(), x.grad, w.grad, {p: params[p][0].grad for p in projs}, {p: params[p][1].grad for p in projs}
    )


def reference(inp: Inputs, projs=None, expert_mask=None, emulate_bf16=False):
    return R.reference_forward_backward(
        inp.x,
        inp.ids,
        inp.w,
        inp.gate,
        inp.up,
        inp.down,
        inp.lora_for_reference(projs),
        inp.scaling,
        inp.dout,
        expert_mask=expert_mask,
        emulate_bf16=emulate_bf16,
    )


# ----------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------


def check_close(name, actual, ref, c, *, bf16_out=False, scale=None, dtype=None):
    assert actual is not None, f"{name}: no gradient was produced"
    if dtype is not None:
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(ref.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a = actual.detach().to(torch.float32)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (a - ref).abs().max().item() if ref.numel() else 0.0
    cc = c + (1 if bf16_out else 0)
    tol = cc * U * scale
    assert err <= tol, (
        f"{name}: max|err| = {err:.4g} > tol = {cc}*u*{scale:.4g} = {tol:.4g} "
        f"(err/(u*scale) = {err / (U * scale) if scale else float('inf'):.2f})"
    )
    return err / (U * scale) if scale else 0.0


def dw_scale(ref, dout) -> float:
    H = dout.shape[1]
    rms_prod = (dout.float().norm(dim=1)[:, None] * ref["ys"].norm(dim=2)).max().item() / math.sqrt(H)
    return max(ref["dtopk_weights"].abs().max().item(), rms_prod)


def compare(
    res: Result, ref: dict, inp: Inputs, projs=None, expert_mask=None, *, check_grads_of_x=True, check_grads_of_w=True
) -> dict[str, float]:
    """Checks res against ref with the tolerance table; returns err/(u*scale) per quantity."""
    case = inp.case
    projs = case.lora if projs is None else projs
    xb = case.x_dtype == BF16
    ratios = {}
    ratios["out"] = check_close("out", res.out, ref["out"], TOL_C["out"], bf16_out=xb, dtype=case.x_dtype)
    if check_grads_of_x:
        ratios["dx"] = check_close("dx", res.dx, ref["dx"], TOL_C["dx"], bf16_out=xb, dtype=case.x_dtype)
    if check_grads_of_w:
        ratios["dtopk_weights"] = check_close(
            "dtopk_weights",
            res.dtopk_weights,
            ref["dtopk_weights"],
            TOL_C["dtopk_weights"],
            bf16_out=case.w_dtype == BF16,
            scale=dw_scale(ref, inp.dout),
            dtype=case.w_dtype,
        )
    idle = R.experts_without_tokens(inp.ids, case.E, expert_mask)
    for p in projs:
        for kind in ("dA", "dB"):
            g = getattr(res, kind)[p]
            ratios[f"{kind}.{p}"] = check_close(
                f"{kind}.{p}",
                g,
                ref[kind][p],
                TOL_C[kind],
                bf16_out=case.lora_dtype == BF16,
                dtype=inp.lora_params[p][0 if kind == "dA" else 1].dtype,
            )
            for e in idle:
                assert torch.count_nonzero(g[e]) == 0, f"{kind}.{p}[{e}]: expert without tokens has a non-zero grad"
    return ratios


def assert_results_equal(a: Result, b: Result, what: str):
    assert torch.equal(a.out, b.out), f"{what}: out differs"
    for f in ("dx", "dtopk_weights"):
        ga, gb = getattr(a, f), getattr(b, f)
        assert (ga is None) == (gb is None), f"{what}: {f} presence differs"
        if ga is not None:
            assert torch.equal(ga, gb), f"{what}: {f} differs"
    for kind in ("dA", "dB"):
        assert getattr(a, kind).keys() == getattr(b, kind).keys()
        for p in getattr(a, kind):
            assert torch.equal(getattr(a, kind)[p], getattr(b, kind)[p]), f"{what}: {kind}.{p} differs"


def _graph_inputs(inp: Inputs, projs):
    x = inp.x.detach().clone().requires_grad_(True)
    w = inp.w.detach().clone().requires_grad_(True)
    params, lw = fresh_lora(inp, projs)
    leaves = [x, w] + [t for p in projs for t in params[p]]
    return x, w, params, lw, leaves


def _grads_to_result(out, grads, projs):
    dA = {p: grads[2 + 2 * i] for i, p in enumerate(projs)}
    dB = {p: grads[3 + 2 * i] for i, p in enumerate(projs)}
    return Result(out.detach(), grads[0], grads[1], dA, dB)


# ---------------------------------------------------------------------------- bad input

BAD_CASE = Case("bad", 6, 40, 24, 8, 2, 4, ALL)


def _contains_number(msg: str, v: int) -> bool:
    return re.search(rf"(?<![\d-]){re.escape(str(v))}(?!\d)", msg) is not None


def _contains_shape(msg: str, shape) -> bool:
    """shape printed as (a, b), [a, b], a x b, ... : the dims in order, separated by 1-3 non-digits."""
    pat = r"\D{1,3}".join(str(d) for d in shape)
    return re.search(rf"(?<!\d){pat}(?!\d)", msg) is not None


def _bad_setup():
    inp = make_inputs(BAD_CASE, 71)
    experts = make_experts(inp)
    params, lw = fresh_lora(inp, ALL)
    with torch.no_grad():
        good = moetune.moe_experts(experts, inp.x, inp.ids, inp.w, lora=lw)
    return inp, experts, params, lw, good


def _still_works(inp, experts, lw, good):
    with torch.no_grad():
        again = moetune.moe_experts(experts, inp.x, inp.ids, inp.w, lora=lw)
    assert torch.equal(again, good), "a valid call after a rejected one gives a different result"
    res = run_engine(experts, inp)
    compare(res, reference(inp), inp)


def _bad_calls(inp: Inputs, params):
    """name -> (thunk returning kwargs overrides for moe_experts, name regex, actual shape that must appear).

    Thunks, because LoraWeights may already validate (and raise) at construction."""
    T, H, I, E, k, r = (BAD_CASE.T, BAD_CASE.H, BAD_CASE.I, BAD_CASE.E, BAD_CASE.k, BAD_CASE.r)
    s = inp.scaling
    A = lambda p: params[p][0]  # noqa: E731
    B = lambda p: params[p][1]  # noqa: E731
    z = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731

    def lw(**repl):
        full = dict(gate=params["gate"], up=params["up"], down=params["down"])
        full.update(repl)
        return dict(lora=moetune.LoraWeights(**full, scaling=s))

    return {
        "ids_float": (lambda: dict(topk_ids=inp.ids.float()), "topk_ids", None),
        "ids_rows": (lambda: dict(topk_ids=inp.ids[: T - 1]), "topk_ids", (T - 1, k)),
        "ids_1d": (lambda: dict(topk_ids=inp.ids[:, 0].contiguous()), "topk_ids", None),
        "weights_cols": (lambda: dict(topk_weights=torch.full((T, k + 1), 0.3)), "topk_weights", (T, k + 1)),
        "weights_rows": (lambda: dict(topk_weights=torch.full((T + 1, k), 0.3)), "topk_weights", (T + 1, k)),
        "x_hidden": (lambda: dict(x=torch.zeros(T, H + 3)), r"\bx\b", (T, H + 3)),
        "x_3d": (lambda: dict(x=inp.x.view(1, T, H)), r"\bx\b", None),
        "x_1d": (lambda: dict(x=inp.x[0].contiguous()), r"\bx\b", None),
        "lora_gate_A_shape": (lambda: lw(gate=(z(E, r, H + 1), B("gate"))), "gate", (E, r, H + 1)),
        "lora_up_A_experts": (lambda: lw(up=(z(E - 1, r, H), B("up"))), "up", (E - 1, r, H)),
        "lora_down_B_shape": (lambda: lw(down=(A("down"), z(E, H + 2, r))), "down", (E, H + 2, r)),
        "lora_gate_rank_mismatch": (lambda: lw(gate=(A("gate"), z(E, I, r + 1))), "gate", None),
        "lora_up_int_dtype": (lambda: lw(up=(A("up").detach().long(), B("up"))), "up", None),
        "expert_mask_len": (lambda: dict(expert_mask=torch.ones(E + 1, dtype=torch.bool)), "expert_mask", None),
    }


_BAD_NAMES = [
    "ids_float",
    "ids_rows",
    "ids_1d",
    "weights_cols",
    "weights_rows",
    "x_hidden",
    "x_3d",
    "x_1d",
    "lora_gate_A_shape",
    "lora_up_A_experts",
    "lora_down_B_shape",
    "lora_gate_rank_mismatch",
    "lora_up_int_dtype",
    "expert_mask_len",
]


def _noncontig(t: torch.Tensor, how: str) -> torch.Tensor:
    """Same values as t, non-contiguous storage."""
    if how == "strided":  # every other column of a wider buffer
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        v = buf[..., ::2]
    else:  # transposed storage
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not v.is_contiguous() and torch.equal(v, t)
    return v
