"""Decoding the engine's packed expert weights into HF-layout bf16 tensors on any torch device.

The GPU path streams the engine's own packed buffers (no second host copy of the experts) and
turns them into the [n, out, in] bf16 weights its GEMMs use, with torch ops on the target device.
The layouts are the engine's (kernels/gemm.h, kernels/quant.h, packed layout version 1); per
projection with out = N, in = K (gate, up: N = I, K = H; down: N = H, K = I), P = ceil(N / 16)
panels of 16 columns and K padded to even Kp:

  bf16   "<proj>.bf16":   P * Kp * 16 bf16; element (k, n) at p*Kp*16 + (k/2)*32 + (n%16)*2 + k%2
  int8   "<proj>.q":      P * Kp/2 rows of 32 bytes: q(2kk, 16p+c) for c < 16, then q(2kk+1, 16p+c)
  int4   "<proj>.q":      P * Kp/2 rows of 16 bytes: byte c = (q(2kk, c) + 8) | (q(2kk+1, c) + 8) << 4
  int8/4 "<proj>.scales": fp32, panel p, group g, column c at (p * groups + g) * 16 + c,
                          groups = 1 (int8) or ceil(K / group_size) (int4)
  fp8_block "<proj>.q":   the int8 layout holding e4m3fn codes; "<proj>.scales": fp32, one per panel
                          and group of 128 K at p * groups + g (a 128 x 128 block's scale per panel)
  mxfp4  "<proj>.q":      the int4 layout holding e2m1 codes (no offset); "<proj>.scales": e8m0 bytes
                          (2^(s - 127)), panel p, group g (32 K), column c at (p * groups + g) * 16 + c

The bytes per code / scale and the group shapes come from the engine's format table
(moetune.weight_formats, kernels/weight_format.h).

Expert e of a buffer is bytes [e * stride, (e + 1) * stride), stride = buffer bytes // E.
Decoding is exact: bf16 gives back the packed values bit for bit; the quantized formats give
dq = bf16(code value * scale) with the product in fp32 rounded to nearest even, exactly
kernels/quant.h's dequant_code (the values every engine GEMM uses), i.e.
tests/python/quant_reference.py's dequantized(W) for int8 / int4 and the published values for
fp8_block / mxfp4. Works on any device (the CPU stand-in included): plain torch ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from moetune.weight_formats import format_info, weight_formats

PROJS = ("gate", "up", "down")
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_PANEL = 16


def _panels(n: int) -> int:
    return (n + _PANEL - 1) // _PANEL


def _kp(k: int) -> int:
    return (k + 1) // 2 * 2


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    """Shape and weight format of one layer's packed experts; sizes of its per-expert buffers."""

    weight_format: str  # a name of moetune.weight_formats(): "bf16" | "int8" | "int4" | "fp8_block" | "mxfp4"
    group_size: int  # int4: 32 | 64 | 128; 0 otherwise
    num_experts: int
    hidden: int  # H
    intermediate: int  # I

    def __post_init__(self):
        if self.weight_format not in weight_formats():
            raise ValueError(f"unknown weight format {self.weight_format!r}")
        if self.weight_format == "int4" and self.group_size not in (32, 64, 128):
            raise ValueError(f"int4 group_size must be 32, 64 or 128, got {self.group_size}")

    def dims(self, proj: str) -> tuple[int, int]:
        """(out, in) of a projection (HF nn.Linear orientation)."""
        H, I = self.hidden, self.intermediate
        return {"gate": (I, H), "up": (I, H), "down": (H, I)}[proj]

    def buffer_names(self, proj: str) -> tuple[str, ...]:
        return (f"{proj}.bf16",) if self.weight_format == "bf16" else (f"{proj}.q", f"{proj}.scales")

    @property
    def names(self) -> tuple[str, ...]:
        """Every buffer the decoder reads, projection by projection."""
        return tuple(n for p in PROJS for n in self.buffer_names(p))

    def expert_bytes(self, name: str) -> int:
        """Bytes of one expert in buffer `name` (the layout's formula)."""
        proj, kind = name.split(".", 1)
        N, K = self.dims(proj)
        P, Kp = _panels(N), _kp(K)
        if kind == "bf16":
            return P * Kp * _PANEL * 2
        info = format_info(self.weight_format)
        if kind == "q":
            return P * (Kp // 2) * (32 if info.code_bits == 8 else 16)
        if kind == "scales":
            return P * self.groups(K) * self._scale_cols * info.scale_bytes
        raise KeyError(name)

    def group_k(self, K: int) -> int:
        """Inputs (K) per scale group (the format table's group_k resolved)."""
        g = format_info(self.weight_format).group_k
        return self.group_size if g == -1 else (K if g == 0 else g)

    def groups(self, K: int) -> int:
        return -(-K // self.group_k(K))

    @property
    def _scale_cols(self) -> int:
        """Scales per panel and group: one per column, or one per panel (block formats)."""
        return _PANEL if format_info(self.weight_format).group_n == 1 else 1

    @property
    def stored_bytes_per_expert(self) -> int:
        """Bytes of one expert in its stored format (what a streamed expert moves over PCIe)."""
        return sum(self.expert_bytes(n) for n in self.names)

    @property
    def decoded_bytes_per_expert(self) -> int:
        """Bytes of one expert's decoded bf16 weights (gate + up + down)."""
        return 2 * 3 * self.hidden * self.intermediate

    def host_views(self, buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's buffers of a layer as [E, stride] uint8 views (no copy), checked against
        the layout's sizes (a mismatch means the engine's layout changed: a clear error, no decode)."""
        out = {}
        for name in self.names:
            if name not in buffers:
                raise ValueError(
                    f"packed experts have no buffer {name!r} (have {sorted(buffers)}); "
                    f"weight format {self.weight_format}"
                )
            buf = buffers[name]
            want = self.expert_bytes(name) * self.num_experts
            if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
                raise ValueError(
                    f"packed buffer {name!r}: {buf.numel()} {buf.dtype} elements, expected {want} "
                    f"uint8 ({self.num_experts} experts x {self.expert_bytes(name)} bytes)"
                )
            out[name] = buf.view(self.num_experts, self.expert_bytes(name))
        return out

    def empty_decoded(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uninitialised bf16 (gate [n, I, H], up [n, I, H], down [n, H, I]) for n decoded experts,
        gate and up the two halves of one [n, 2I, H] buffer (gpu_math.fused_gate_up: one GEMM for
        both). The one allocator of decoded experts (resident pools, staging, keep slots)."""
        H, I = self.hidden, self.intermediate
        gu = torch.empty((n, 2 * I, H), dtype=torch.bfloat16, device=device)
        return gu[:, :I], gu[:, I:], torch.empty((n, H, I), dtype=torch.bfloat16, device=device)

    def decode(self, proj: str, raw: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """bf16 [n, out, in] weights of projection `proj` for n experts, on raw's device.

        raw: name -> uint8 [n, expert_bytes(name)] (rows = experts, any device; row strides may be
        larger than the row). out: optional bf16 [n, out, in] to write into, each expert's [out, in]
        contiguous (e.g. a half of empty_decoded's gate/up buffer)."""
        names = self.buffer_names(proj)
        n = raw[names[0]].shape[0]
        for name in names:
            r = raw[name]
            if r.dtype != torch.uint8 or r.dim() != 2 or r.shape != (n, self.expert_bytes(name)) or r.stride(1) != 1:
                raise ValueError(
                    f"decode {proj}: raw {name!r} must be uint8 [{n}, {self.expert_bytes(name)}] with "
                    f"contiguous rows, got {r.dtype} {list(r.shape)} strides {r.stride()}"
                )
        N, K = self.dims(proj)
        P, Kp = _panels(N), _kp(K)
        dev = raw[names[0]].device
        if out is None:
            out = torch.empty((n, N, K), dtype=torch.bfloat16, device=dev)
        elif out.shape != (n, N, K) or out.dtype != torch.bfloat16 or out.stride()[1:] != (K, 1):
            raise ValueError(
                f"decode {proj}: out must be bf16 [{n}, {N}, {K}] with contiguous [{N}, {K}] experts, got "
                f"{out.dtype} {list(out.shape)} strides {out.stride()}"
            )
        if n == 0:
            return out
        if self.weight_format == "bf16":
            # [n, P, Kp/2, 16 columns, 2 K-neighbours]: the packed order, bit for bit.
            nat = _rows_as(raw[names[0]], torch.bfloat16).view(n, P, Kp // 2, _PANEL, 2)
            perm = nat.permute(0, 1, 3, 2, 4)  # [n, P, 16, Kp/2, 2] = [n, N padded, K padded]
        else:
            q = self._q_natural(raw[names[0]], n, P, Kp)  # [n, P, Kp/2, 2, 16] code values, the packed order
            s = self._scales_natural(raw[names[1]], n, P, K, Kp)  # broadcastable to q
            dq = (q.to(torch.float32) * s).to(torch.bfloat16)  # fp32 product, rounded to nearest even
            perm = dq.permute(0, 1, 4, 2, 3)  # [n, P, 16, Kp/2, 2]
        if N == P * _PANEL and K == Kp:  # no padding: one strided copy straight into `out`
            out.view(n, P, _PANEL, Kp // 2, 2).copy_(perm)
        else:
            out.copy_(perm.reshape(n, P * _PANEL, Kp)[:, :N, :K])
        return out

    def _q_natural(self, raw_q: torch.Tensor, n: int, P: int, Kp: int) -> torch.Tensor:
        """The codes' values (int16 for int8 / int4, float32 for the minifloat codes)."""
        if self.weight_format == "int8":
            return _rows_as(raw_q, torch.int8).view(n, P, Kp // 2, 2, _PANEL).to(torch.int16)
        if self.weight_format == "fp8_block":
            return _rows_as(raw_q, torch.float8_e4m3fn).view(n, P, Kp // 2, 2, _PANEL).to(torch.float32)
        b = raw_q.view(n, P, Kp // 2, _PANEL).to(torch.int16)
        lo, hi = b & 15, b >> 4  # j = 0: K row 2kk (low nibble), 1: 2kk+1
        if self.weight_format == "mxfp4":
            lut = torch.tensor(_E2M1, dtype=torch.float32, device=b.device)
            return torch.stack((lut[lo.long()], lut[hi.long()]), dim=3)
        return torch.stack((lo - 8, hi - 8), dim=3)

    def _scales_natural(self, raw_s: torch.Tensor, n: int, P: int, K: int, Kp: int) -> torch.Tensor:
        groups, cols = self.groups(K), self._scale_cols
        if self.weight_format == "mxfp4":  # e8m0 bytes: 2^(s - 127), exactly
            e = raw_s.view(n, P, groups, 1, 1, cols).to(torch.int32) - 127
            s = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
        else:
            s = _rows_as(raw_s, torch.float32).view(n, P, groups, 1, 1, cols)
        if groups == 1:
            return s.view(n, P, 1, 1, cols)
        # K row k = 2kk + j is in group k // G = kk // (G/2) (G even), so a group spans G/2 kk.
        half = self.group_k(K) // 2
        s = s.expand(n, P, groups, half, 1, cols).reshape(n, P, groups * half, 1, cols)
        return s[:, :, : Kp // 2]


def _rows_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [n, bytes] with contiguous rows -> dtype [n, bytes / size] (a view when the row
    stride allows it, else a copy)."""
    size = torch.empty(0, dtype=dtype).element_size()
    if raw.stride(0) % size or raw.storage_offset() % size:
        raw = raw.contiguous()
    return raw.view(dtype)


def format_of(experts) -> PackedFormat:
    """The PackedFormat of a moetune.MoEExperts (public properties only)."""
    return PackedFormat(
        experts.weight_format,
        int(experts.group_size),
        experts.num_experts,
        experts.hidden_size,
        experts.intermediate_size,
    )
