"""The engine's frozen expert weight formats (csrc/kernels/weight_format.h, the one table).

`weight_formats()` returns that table as read from the engine: each format's name, bits per
weight code, scale storage, the group a scale covers and the checkpoints that publish it.
Nothing here restates a size: everything is read from the engine.

Published formats, kept as the checkpoint ships them (no re-quantization; see
csrc/kernels/quant_published.h for the exact layouts):

  fp8_block  e4m3fn codes + fp32 `weight_scale_inv` per 128 x 128 block (DeepSeek-V3, Qwen3-FP8)
  mxfp4      e2m1 nibbles + e8m0 scale per 32 inputs (gpt-oss `*_blocks` / `*_scales`)
  int4       symmetric INT4 nibbles (q + 8) + bf16 / fp32 scale per group of inputs
             (compressed-tensors "pack-quantized", Kimi-K2: bit-exactly moetune's own int4)
"""

from __future__ import annotations

import dataclasses
from functools import cache

import torch

from moetune import _moetune_ext as _ext


@dataclasses.dataclass(frozen=True)
class WeightFormatInfo:
    """One row of the engine's format table."""

    name: str
    code_bits: int  # bits of one stored weight code (16 for bf16 itself)
    scale_type: str  # "none" | "f32" | "e8m0"
    scale_bytes: int  # bytes of one stored scale
    group_k: int  # inputs per scale; 0: all of them (per output channel); -1: the group_size option
    group_n: int  # outputs per scale: 1 (per channel) or a block (fp8_block: 128)
    published: str  # which checkpoints ship it

    @property
    def quantized(self) -> bool:
        return self.scale_type != "none"

    def bytes_per_weight(self, group_size: int | None = None) -> float:
        """Stored bytes per weight (codes + scales) for whole groups, e.g. mxfp4 0.5 + 1/32."""
        g = group_size if self.group_k == -1 else self.group_k
        scales = 0.0 if not self.quantized or g == 0 else self.scale_bytes / (g * self.group_n)
        return self.code_bits / 8 + scales


@cache
def weight_formats() -> dict[str, WeightFormatInfo]:
    """{name: WeightFormatInfo} of every format the engine holds, in table order."""
    return {row[0]: WeightFormatInfo(*row) for row in _ext.weight_formats()}


def format_info(name: str) -> WeightFormatInfo:
    formats = weight_formats()
    if name not in formats:
        raise ValueError(f"unknown weight format {name!r}; the formats are {', '.join(formats)}")
    return formats[name]


def describe() -> list[str]:
    """`moetune info`'s lines on the expert weight formats (from the engine's table)."""
    lines = ["Expert weight formats (ExpertsOptions.weight_format; load_model keeps a checkpoint's own):"]
    for f in weight_formats().values():
        if not f.quantized:
            size = "2 bytes/weight"
        else:
            group = {0: "per output channel", -1: "per group_size inputs"}.get(f.group_k, f"per {f.group_k} inputs")
            if f.group_n > 1:
                group = f"per {f.group_n} x {f.group_k} block"
            g = 32 if f.group_k == -1 else None
            size = f"{f.code_bits}-bit codes + {f.scale_type} scale {group} (~{f.bytes_per_weight(g):.3g} bytes/weight"
            size += " at group 32)" if g else ")"
        lines.append(f"  {f.name:10} {size}; {f.published}")
    return lines


PUBLISHED = ("fp8_block", "mxfp4", "int4")  # formats load_expert_published takes


def published_arrays(
    weight_format: str, codes: torch.Tensor, scales: torch.Tensor, out_features: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of one published [out, in] weight as the engine's load_expert_published
    takes them: codes as contiguous uint8 [out, bytes per row] (float8_e4m3fn, int32 words or
    uint8 blocks of any trailing shape are reinterpreted byte for byte, never converted),
    scales contiguous on the CPU (uint8 e8m0 for mxfp4; float32 / bfloat16 otherwise)."""
    if weight_format not in PUBLISHED:
        raise ValueError(f"moetune: {what}: weight format {weight_format!r} has no published layout ({PUBLISHED})")
    codes = codes.detach().to("cpu").contiguous()
    if codes.shape[0] != out_features:
        raise ValueError(
            f"moetune: {what}: codes have {codes.shape[0]} rows, expected {out_features} (output features)"
        )
    codes = codes.view(torch.uint8).reshape(out_features, -1)
    scales = scales.detach().to("cpu").contiguous()
    if weight_format == "mxfp4":
        if scales.dtype != torch.uint8:
            raise ValueError(f"moetune: {what}: mxfp4 scales must be uint8 (e8m0), got {scales.dtype}")
    elif scales.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"moetune: {what}: {weight_format} scales must be float32 or bfloat16, got {scales.dtype}")
    return codes, scales
