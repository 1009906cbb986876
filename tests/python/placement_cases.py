"""Shared helpers of the placement tests (test_placement_*.py): setups, plans, runners, tolerances.

Inputs and the fp32 reference are op_cases.py's / reference.py's. The GPU path rounds at more
points than the CPU engine (every grouped-GEMM result is bf16, see python/moetune/placement/
gpu_math.py, which lists the bf16-rounded points on the longest dependency chain of each result:
out 6, d topk_weights 7, dB 8, dA 9, dx 9). With op_cases.py's derivation (c = 2 x roundings,
plus 1 when the result itself is returned in bf16) that gives TOL_C_GPU below; any plan with GPU
experts is held to it, the all-CPU plan to op_cases.TOL_C (and to bit-identity with moe_experts).

gpt-oss: the clamps make h's derivative jump at +-limit; a pre-activation within a few bf16
ulps of the limit can fall on either side under two correct roundings (a discontinuity, not an
error: see reference.py, which decides membership on the CPU engine's rounding). For experts the
GPU computes, `gptoss_reference` decides it on the GPU path's rounding instead (values exact).
"""

from __future__ import annotations

import contextlib
import dataclasses

import reference as R
import torch
import torch.nn.functional as F
from op_cases import ALL, BF16, F32, Case, Inputs, Result, check_close, dw_scale, fresh_lora, make_inputs, moetune
from quant_reference import dequantized

U = 2.0**-8
TOL_C_GPU = {"out": 12, "dtopk_weights": 14, "dB": 16, "dA": 18, "dx": 18}
PLANS = ("cpu", "streamed", "resident", "mixed")
FORMATS = [("bf16", None), ("int8", None), ("int4", 32), ("int4", 128)]


def placement():
    import moetune.placement as P  # imported late: a broken package fails the tests that use it

    return P


# ---------------------------------------------------------------------------- plans


def plan_fn(name: str):
    """where_fn(layer_key, counts, resident_mask) of a named plan."""
    W = placement().Where

    def fn(_key, counts, resident):
        E = counts.numel()
        if name == "cpu":
            return W.CPU
        if name == "streamed":
            return W.GPU_STREAMED
        if name == "resident":
            return W.GPU_RESIDENT
        if name == "mixed":  # every third expert on each side; resident where held, else streamed
            return torch.tensor(
                [
                    int(W.CPU) if e % 3 == 0 else int(W.GPU_RESIDENT) if bool(resident[e]) else int(W.GPU_STREAMED)
                    for e in range(E)
                ],
                dtype=torch.int8,
            )
        raise AssertionError(name)

    return fn


def resident_set(name: str, E: int) -> torch.Tensor:
    m = torch.zeros(E, dtype=torch.bool)
    if name == "resident":
        m[:] = True
    elif name == "mixed":
        m[1::2] = True
    return m


# ---------------------------------------------------------------------------- setups


@dataclasses.dataclass
class Setup:
    experts: object
    runtime: object
    gpu: object


def make_setup(
    inp: Inputs,
    device="cpu",
    *,
    resident: torch.Tensor | None = None,
    chunk_experts: int = 2,
    keep_bytes: int = 0,
    gemm: str = "auto",
    ctx=None,
    **experts_kw,
) -> Setup:
    P = placement()
    from op_cases import get_ctx

    experts = moetune.MoEExperts(ctx or get_ctx(), inp.gate, inp.up, inp.down, **experts_kw)
    fmt = P.format_of(experts)
    opts = P.GpuOptions(
        resident_budget_bytes=fmt.num_experts * fmt.decoded_bytes_per_expert,
        keep_budget_bytes=keep_bytes,
        stream_chunk_bytes=chunk_experts * fmt.stored_bytes_per_expert,
        gemm=gemm,
    )
    runtime = P.GpuRuntime(device, opts)
    gpu = P.GpuExperts(runtime, experts, layer_key="layer")
    if resident is not None:
        gpu.set_resident(resident)
    return Setup(experts, runtime, gpu)


def to_device(inp: Inputs, device) -> Inputs:
    mv = lambda t: t.to(device)  # noqa: E731
    return dataclasses.replace(
        inp,
        x=mv(inp.x),
        ids=mv(inp.ids),
        w=mv(inp.w),
        dout=mv(inp.dout),
        lora_params={p: (mv(a), mv(b)) for p, (a, b) in inp.lora_params.items()},
    )


def run_placed(
    st: Setup, inp: Inputs, plan: str, projs=None, *, ckpt: bool | None = None, planner=None, params=None
) -> Result:
    """Forward + out.backward(dout) through placed_moe_experts (optionally inside
    torch.utils.checkpoint, ckpt = use_reentrant) with fresh leaves; returns their grads."""
    P = placement()
    projs = inp.case.lora if projs is None else projs
    x = inp.x.detach().clone().requires_grad_(True)
    w = inp.w.detach().clone().requires_grad_(True)
    if params is None:
        params, _ = fresh_lora(inp, projs)
    lw = (
        moetune.LoraWeights(**{p: (params[p] if p in projs else None) for p in ALL}, scaling=inp.scaling)
        if projs
        else None
    )
    planner = planner or P.FixedPlanner(plan_fn(plan))

    def fn(x_, w_):
        return P.placed_moe_experts(st.experts, x_, inp.ids, w_, lw, planner=planner, gpu=st.gpu)

    if ckpt is None:
        out = fn(x, w)
    else:
        out = torch.utils.checkpoint.checkpoint(fn, x, w, use_reentrant=ckpt)
    (out.float() * inp.dout.float()).sum().backward()
    P.flush_timings(st.runtime)
    return Result(
        out.detach(), x.grad, w.grad, {p: params[p][0].grad for p in projs}, {p: params[p][1].grad for p in projs}
    )


def run_moe_experts(experts, inp: Inputs, projs=None) -> Result:
    """The same graph as run_placed through moetune.moe_experts (the all-CPU baseline)."""
    projs = inp.case.lora if projs is None else projs
    x = inp.x.detach().clone().requires_grad_(True)
    w = inp.w.detach().clone().requires_grad_(True)
    params, lw = fresh_lora(inp, projs)
    out = moetune.moe_experts(experts, x, inp.ids, w, lora=lw)
    (out.float() * inp.dout.float()).sum().backward()
    return Result(
        out.detach(), x.grad, w.grad, {p: params[p][0].grad for p in projs}, {p: params[p][1].grad for p in projs}
    )


# ---------------------------------------------------------------------------- references and comparison


def dq_inputs(inp: Inputs, fmt: str, group) -> Inputs:
    """The inputs with the weights the engine computes with (dq(q(W)) for int8/int4)."""
    if fmt == "bf16":
        return inp
    return dataclasses.replace(
        inp,
        gate=dequantized(inp.gate, fmt, group or 0),
        up=dequantized(inp.up, fmt, group or 0),
        down=dequantized(inp.down, fmt, group or 0),
    )


def reference(inp: Inputs, projs=None, **variant) -> dict:
    projs = inp.case.lora if projs is None else projs
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    lora = {p: (cpu(inp.lora_params[p][0]), cpu(inp.lora_params[p][1])) for p in projs}
    return R.reference_forward_backward(
        cpu(inp.x), cpu(inp.ids), cpu(inp.w), inp.gate, inp.up, inp.down, lora, inp.scaling, cpu(inp.dout), **variant
    )


def compare(res: Result, ref: dict, inp: Inputs, projs=None, table=None) -> dict[str, float]:
    """res against the fp32 reference with `table` (default TOL_C_GPU); err/(u*scale) per quantity.
    Also: experts without tokens have exactly zero LoRA gradients."""
    table = TOL_C_GPU if table is None else table
    case = inp.case
    projs = case.lora if projs is None else projs
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    xb = case.x_dtype == BF16
    ratios = {
        "out": check_close("out", cpu(res.out), ref["out"], table["out"], bf16_out=xb, dtype=case.x_dtype),
        "dx": check_close("dx", cpu(res.dx), ref["dx"], table["dx"], bf16_out=xb, dtype=case.x_dtype),
        "dtopk_weights": check_close(
            "dtopk_weights",
            cpu(res.dtopk_weights),
            ref["dtopk_weights"],
            table["dtopk_weights"],
            bf16_out=case.w_dtype == BF16,
            scale=dw_scale(ref, inp.dout.cpu()),
            dtype=case.w_dtype,
        ),
    }
    idle = R.experts_without_tokens(inp.ids.cpu(), case.E)
    for p in projs:
        for kind in ("dA", "dB"):
            g = cpu(getattr(res, kind)[p])
            ratios[f"{kind}.{p}"] = check_close(
                f"{kind}.{p}",
                g,
                ref[kind][p],
                table[kind],
                bf16_out=case.lora_dtype == BF16,
                dtype=inp.lora_params[p][0 if kind == "dA" else 1].dtype,
            )
            for e in idle:
                assert torch.count_nonzero(g[e]) == 0, f"{kind}.{p}[{e}]: expert without tokens has a non-zero grad"
    return ratios


def assert_equal(a: Result, b: Result, what: str) -> None:
    """Bitwise equality of two results (all fields, any device)."""
    for f in ("out", "dx", "dtopk_weights"):
        ta, tb = getattr(a, f), getattr(b, f)
        assert (ta is None) == (tb is None), f"{what}: {f} presence differs"
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta.cpu(), tb.cpu()), f"{what}: {f} differs"
    for kind in ("dA", "dB"):
        ga, gb = getattr(a, kind), getattr(b, kind)
        assert ga.keys() == gb.keys(), f"{what}: {kind} projections differ"
        for p in ga:
            assert ga[p].dtype == gb[p].dtype and torch.equal(ga[p].cpu(), gb[p].cpu()), f"{what}: {kind}.{p} differs"


# ---------------------------------------------------------------------------- gpt-oss


def make_biases(case: Case, amp: float, seed: int, dtype=F32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        p: ((torch.rand(case.E, n, generator=g) * 2 - 1) * amp).to(BF16).to(dtype)
        for p, n in (("gate", case.I), ("up", case.I), ("down", case.H))
    }


def _gpu_preact(xe, W, pair, scaling, bias):
    """A pre-activation as the GPU path rounds its terms before the final bf16 rounding:
    bf16(W x) + s * bf16(bf16(A x) B^T) [+ b] in fp32 (gpu_math.py)."""
    with torch.no_grad():
        v = R.bf16_round(F.linear(xe, W))
        if pair is not None:
            A, B = pair
            v = v + scaling * R.bf16_round(F.linear(R.bf16_round(F.linear(xe, A)), B))
        return v if bias is None else v + bias


@contextlib.contextmanager
def clamp_membership_of(inp: Inputs, gpu_experts):
    """reference.py decides gpt-oss clamp membership on the pre-activation rounded as the CPU engine
    rounds it (its docstring: a value within rounding reach of the limit is a discontinuity, not an
    error). For the experts of `gpu_experts` this decides it on the GPU path's rounding instead
    (the values stay exact fp32): an expert is recognised by its (fp32) gate/up weight."""
    mats = [(W[e].float(), e) for W in (inp.gate, inp.up) for e in range(inp.case.E)]
    gpu_experts = set(int(e) for e in gpu_experts)
    orig = R._rounded_preact

    def patched(xe, W, pair, scaling, bias):
        e = next(e for M, e in mats if M.shape == W.shape and torch.equal(M, W))
        return (_gpu_preact if e in gpu_experts else orig)(xe, W, pair, scaling, bias)

    R._rounded_preact = patched
    try:
        yield
    finally:
        R._rounded_preact = orig


def clamp_hits(inp: Inputs, biases, limit) -> tuple:
    """(# routed g above the limit, # routed u outside [-limit, limit]), exact fp32 values."""
    lora = inp.lora_for_reference()
    x = inp.x.float()
    ng = nu = 0
    for e in range(inp.case.E):
        tok = torch.where(inp.ids.long() == e)[0]
        if tok.numel() == 0:
            continue
        pair = lambda p: None if p not in lora else (lora[p][0][e].float(), lora[p][1][e].float())  # noqa: E731
        bias = lambda p: None if biases[p] is None else biases[p][e].float()  # noqa: E731
        g = R._rounded_preact(x[tok], inp.gate[e].float(), pair("gate"), inp.scaling, bias("gate"))
        u = R._rounded_preact(x[tok], inp.up[e].float(), pair("up"), inp.scaling, bias("up"))
        ng += int((g > limit).sum())
        nu += int((u.abs() > limit).sum())
    return ng, nu


def gptoss_setup(case: Case, seed: int, device="cpu", fmt=("bf16", None), amp=0.5, limit=1.0, **setup_kw):
    """(inputs, biases, limit, Setup) of a gpt-oss case (alpha 1.702, biases on all three); asserts
    that both clamps act on its data."""
    inp = make_inputs(case, seed)
    inp = dataclasses.replace(inp, x=(inp.x.float() * 2).to(inp.x.dtype))  # O(1+) pre-activations
    biases = make_biases(case, amp, seed + 1)
    ng, nu = clamp_hits(dq_inputs(inp, *fmt), biases, limit)
    assert ng > 0 and nu > 0, f"the clamps are not exercised (g above: {ng}, u outside: {nu})"
    kw = dict(
        activation="gpt_oss",
        alpha=1.702,
        limit=limit,
        weight_format=fmt[0],
        group_size=fmt[1],
        **{f"{p}_bias": b for p, b in biases.items()},
    )
    kw.update(setup_kw)
    return inp, biases, limit, make_setup(inp, device, **kw)


def gptoss_reference(inp, biases, limit, fmt=("bf16", None), gpu_experts=()) -> dict:
    """The fp32 reference; clamp membership decided on the GPU path's rounding for gpu_experts."""
    dq = dq_inputs(inp, *fmt)
    with clamp_membership_of(dq, gpu_experts):
        return reference(dq, activation="gpt_oss", alpha=1.702, limit=limit, biases=biases)
