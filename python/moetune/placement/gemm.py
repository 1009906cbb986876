"""Grouped bf16 GEMMs of the GPU experts path: torch's grouped_mm, or a per-expert torch.mm loop.

Two shapes, both with bf16 operands, fp32 accumulation and a bf16 result (bf16 of the fp32 sum):
  mm(a [n, K], b [G, K, N], sizes)    rows [o_g, o_g + sizes[g]) of a times b[g]    -> [n, N]
  mm_tn(a [n, M], b [n, N], sizes)    per group g: a[rows_g]^T b[rows_g]            -> [G, M, N]
`sizes` (host ints, zeros allowed in mm, not in mm_tn) are the group row counts; `offs` is their
cumulative sum as an int32 tensor on the device (grouped_mm's offsets; built once per group set).
`sizes=None`: the group sizes exist only on the device (`device_offsets`, the sync-free resident
path of op.py); then grouped_mm must be usable (`device_sized`), and mm_tn's empty groups give
zeros (checked by the probe: grouped_mm writes every group of a token contraction, empty ones
included).

Why torch.nn.functional.grouped_mm (CUTLASS on sm90+ CUDA; a per-group loop on CPU):
- one launch for all experts of a segment, whatever the token counts (no padding, no host sync:
  the offsets stay on the device), so launch overhead does not grow with the number of experts;
  a Triton kernel would buy an fp32 output (see below) at the price of a second GEMM code base
  that CI (no GPU) could not run.
- it exists on the CPU too (torch >= 2.13), so the CI stand-in runs the same calls, layouts and
  numerics.
Its constraints (torch 2.11-2.13, aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp):
- bf16 operands and a bf16 output: out_dtype=float32 is rejected for bf16 inputs ("output dtype
  must match mat_a dtype"), and fp32 inputs leave the CUDA fast path for a loop that copies the
  offsets to the host (a sync). So every GEMM output of the GPU path is bf16(fp32 accumulation):
  one rounding where the CPU engine keeps some sums in fp32; gpu_math.py counts them.
- int32 offsets; 2-D operands sliced along the grouped dimension; row-major or column-major
  operands whose leading stride is a multiple of 16 bytes (8 bf16) and data 16-byte aligned:
  H, I and the (padded) LoRA rank must be multiples of 8 - true of every released MoE model.
- the CUDA fast path needs compute capability 9.0+ (H100); below it torch loops with a host sync.
Hence `mode="auto"`: grouped_mm where the operands qualify and the device has the fast path (or
is the CPU stand-in), else the per-expert loop over the host-known group sizes (correct for any
shape, no host sync, one launch per non-empty group). A one-time probe per Gemm checks
grouped_mm against the loop on small cases of exactly the layouts used here (column- and
row-major weights, empty groups, token contractions) and falls back to the loop, with a warning,
if it raises or disagrees.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

MODES = ("auto", "grouped", "per_expert")


def _grouped_fn():
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def _aligned_2d(t: torch.Tensor) -> bool:
    """grouped_mm's stride rule for the two trailing dims (plus 16-byte aligned data)."""
    if t.dtype != torch.bfloat16 or t.data_ptr() % 16:
        return False
    s, z = t.stride(), t.shape
    if t.dim() == 3 and s[0] % 8:
        return False
    if s[-1] == 1 and s[-2] >= max(1, z[-1]):
        return s[-2] % 8 == 0
    if s[-2] == 1 and s[-1] >= max(1, z[-2]):
        return s[-1] % 8 == 0
    return False


def device_offsets(counts: torch.Tensor) -> torch.Tensor:
    """int32 cumulative group ends of device-resident group sizes (int64 [G]), without a host sync."""
    return counts.cumsum(0).to(torch.int32)


def offsets(sizes: Sequence[int], device) -> torch.Tensor:
    """int32 cumulative group ends on `device` (uploaded without a host sync)."""
    host = torch.tensor(list(sizes), dtype=torch.int64).cumsum(0).to(torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


class Gemm:
    """The grouped GEMMs of one device. mode: "auto" | "grouped" | "per_expert" (see module doc)."""

    def __init__(self, device: torch.device, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"gemm mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device)
        self.mode = mode
        self._fn = _grouped_fn()
        self._usable = None  # {"mm": bool, "tn": bool, "tn_empty": bool}, decided on first use (the probe)
        self.calls = {"grouped": 0, "per_expert": 0}

    @property
    def grouped_available(self) -> bool:
        """Whether grouped_mm is used for mm (x W shapes); `grouped_tn_available` for mm_tn."""
        return self._decide()["mm"]

    @property
    def grouped_tn_available(self) -> bool:
        return self._decide()["tn"]

    @property
    def device_sized(self) -> bool:
        """Whether GEMMs whose group sizes exist only on the device (sizes=None) can run: grouped_mm
        for both shapes, empty token-contraction groups written as zeros."""
        u = self._decide()
        return u["mm"] and u["tn"] and u["tn_empty"]

    def _decide(self) -> dict:
        if self._usable is not None:
            return self._usable
        if self.mode == "per_expert":
            self._usable = {"mm": False, "tn": False, "tn_empty": False}
            return self._usable
        reasons = {}
        if self._fn is None:
            reasons = dict.fromkeys(("mm", "tn", "tn_empty"), "this torch has no grouped_mm")
        elif self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (9, 0):
            reasons = dict.fromkeys(
                ("mm", "tn", "tn_empty"),
                "grouped_mm's fast path needs compute capability 9.0+ (below it torch loops with a host sync)",
            )
        else:
            reasons = self._probe()
        if reasons and self.mode == "grouped":
            raise RuntimeError(f"moetune.placement: gemm mode 'grouped' requested but {reasons}")
        for kind, why in reasons.items():
            if kind == "tn_empty" and "tn" in reasons:
                continue  # said once
            warnings.warn(
                f"moetune.placement: per-expert GEMMs for the {kind} shapes: {why}", RuntimeWarning, stacklevel=4
            )
        self._usable = {k: k not in reasons for k in ("mm", "tn", "tn_empty")}
        return self._usable

    def _probe(self) -> dict:
        """{kind: why not} for the kinds ("mm", "tn", "tn_empty") where grouped_mm fails or disagrees
        with the per-expert loop on small cases of exactly the layouts used here ("tn_empty": a token
        contraction with an empty group, run over memory just filled with NaN, must give zeros)."""
        g = torch.Generator().manual_seed(0)
        dev = self.device

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(torch.bfloat16).to(dev)

        sizes = [5, 0, 16, 3]  # an empty group, unaligned group starts
        offs = offsets(sizes, dev)
        a, w = rnd(sum(sizes), 32), rnd(len(sizes), 24, 32)  # w [G, out, in]
        tn_sizes = [7, 1, 16]
        tn_offs = offsets(tn_sizes, dev)
        ta, tb = rnd(sum(tn_sizes), 16), rnd(sum(tn_sizes), 24)
        e_sizes = [7, 0, 16]
        e_offs = offsets(e_sizes, dev)

        def tn_empty(f, l):
            if l is self._tn_loop:
                return self._tn_loop_empty(ta, tb, e_offs, e_sizes)
            # Same size as the output, freed at once: the caching allocator hands its block to the output.
            torch.full((len(e_sizes), ta.shape[1], tb.shape[1]), float("nan"), dtype=torch.bfloat16, device=dev)
            return l(ta, tb, e_offs, e_sizes)

        cases = [
            ("mm", "x W^T (column-major weights)", lambda f, l: f(a, w.transpose(1, 2), offs, sizes)),
            ("mm", "d W (row-major weights)", lambda f, l: f(a[:, :24].contiguous(), w, offs, sizes)),
            ("tn", "token contraction", lambda f, l: l(ta, tb, tn_offs, tn_sizes)),
            ("tn_empty", "token contraction with an empty group", tn_empty),
        ]
        reasons = {}
        for kind, what, run in cases:
            if kind in reasons:
                continue
            try:
                if kind == "mm":
                    got, ref = run(self._mm_grouped, None), run(self._mm_loop, None)
                else:
                    got, ref = run(None, self._tn_grouped), run(None, self._tn_loop)
                if kind == "tn_empty" and "tn" in reasons:
                    raise RuntimeError("the token contraction failed already")
            except Exception as e:  # noqa: BLE001 - any failure means: do not use it for this kind
                reasons[kind] = f"grouped_mm failed on the probe ({what}): {type(e).__name__}: {e}"
                continue
            ref32 = ref.float()
            err = (got.float() - ref32).abs().nan_to_num(float("inf")).max().item()
            if not err <= 2.0**-7 * max(ref32.abs().max().item(), 1e-30):  # a bf16 ulp either way
                reasons[kind] = f"grouped_mm disagrees with per-expert GEMMs on the probe ({what}: max|diff| {err:.3g})"
        return reasons

    # ---- public entry points ----
    def mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
        if _aligned_2d(a) and _aligned_2d(b) and b.shape[-1] % 8 == 0 and self.grouped_available:
            self.calls["grouped"] += 1
            return self._mm_grouped(a, b, offs, sizes)
        self._need_host_sizes(sizes, "mm", a, b)
        self.calls["per_expert"] += 1
        return self._mm_loop(a, b, offs, sizes)

    def mm_tn(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
        if sizes is not None and any(s <= 0 for s in sizes):
            raise ValueError(f"mm_tn needs non-empty groups, got sizes {list(sizes)}")
        if (
            _aligned_2d(a.t())
            and _aligned_2d(b)
            and self.grouped_tn_available
            and (sizes is not None or self.device_sized)
        ):
            self.calls["grouped"] += 1
            return self._tn_grouped(a, b, offs, sizes)
        self._need_host_sizes(sizes, "mm_tn", a, b)
        self.calls["per_expert"] += 1
        return self._tn_loop(a, b, offs, sizes)

    @staticmethod
    def _need_host_sizes(sizes, what: str, a, b) -> None:
        if sizes is None:  # a caller bug: device-sized GEMMs are only issued where device_sized holds
            raise RuntimeError(
                f"moetune.placement: {what} with device-only group sizes needs grouped_mm, which cannot run "
                f"these operands (shapes {list(a.shape)} x {list(b.shape)}, strides {a.stride()} / {b.stride()})"
            )

    # ---- implementations ----
    def _mm_grouped(self, a, b, offs, sizes):
        return self._fn(a, b, offs=offs)

    def _tn_grouped(self, a, b, offs, sizes):
        return self._fn(a.t(), b, offs=offs)

    @staticmethod
    def _mm_loop(a, b, offs, sizes):
        out = torch.empty((a.shape[0], b.shape[-1]), dtype=torch.bfloat16, device=a.device)
        o = 0
        for gi, n in enumerate(sizes):
            if n:
                torch.mm(a[o : o + n], b[gi], out=out[o : o + n])
            o += n
        return out

    @staticmethod
    def _tn_loop_empty(a, b, offs, sizes):
        """_tn_loop's result with empty groups allowed (zeros): the probe's reference."""
        out = torch.zeros((len(sizes), a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        o = 0
        for gi, n in enumerate(sizes):
            if n:
                torch.mm(a[o : o + n].t(), b[o : o + n], out=out[gi])
            o += n
        return out

    @staticmethod
    def _tn_loop(a, b, offs, sizes):
        out = torch.empty((len(sizes), a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        o = 0
        for gi, n in enumerate(sizes):
            torch.mm(a[o : o + n].t(), b[o : o + n], out=out[gi])
            o += n
        return out
