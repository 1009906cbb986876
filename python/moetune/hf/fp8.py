"""Block-scaled FP8 weights, as in DeepSeek-V3's published checkpoints.

A weight W [out, in] is stored as `weight` (float8_e4m3fn) plus
`weight_scale_inv` (fp32, [ceil(out / bo), ceil(in / bi)], block (bo, bi) =
config.quantization_config["weight_block_size"], 128 x 128 as published):
W[r, c] = weight[r, c] * weight_scale_inv[r // bo, c // bi]. The loader
dequantizes to bf16 (what DeepSeek's own fp8 -> bf16 cast produces); the
engine then packs experts in its own format. `quantize` (the inverse, for
tests and benchmarks) picks each block's scale so its max maps to e4m3's max.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"
E4M3 = getattr(torch, "float8_e4m3fn", None)


def block_size(config) -> tuple[int, int] | None:
    """(bo, bi) if config declares DeepSeek-style block FP8 weights, else None.
    Other quantization methods are refused (the engine needs real weights)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    if not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else vars(q)
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"moetune: checkpoint quantization {method!r} is not supported (block FP8 'fp8' as in "
            "DeepSeek-V3, or unquantized bf16/fp16/fp32 checkpoints)"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"moetune: FP8 format {fmt!r} is not supported (e4m3)")
    bo, bi = q.get("weight_block_size") or (128, 128)
    return int(bo), int(bi)


def scale_shape(shape, block) -> tuple[int, int]:
    out, inn = shape
    return (-(-out // block[0]), -(-inn // block[1]))


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """bf16 W from e4m3 `w` [out, in] and fp32 block scales."""
    if w.dim() != 2:
        raise ValueError(f"moetune: FP8 tensor {name} has shape {list(w.shape)}; block scales need a 2-D weight")
    want = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"moetune: {name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, expected {list(want)} "
            f"for weight {list(w.shape)} with block {list(block)}"
        )
    out, inn = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inn]
    return (w.float() * s).to(torch.bfloat16)


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale_inv) of a 2-D weight, one scale per block."""
    out, inn = w.shape
    so, si = scale_shape(w.shape, block)
    wf = w.float()
    pad = torch.zeros(so * block[0], si * block[1])
    pad[:out, :inn] = wf.abs()
    amax = pad.view(so, block[0], si, block[1]).amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = amax / torch.finfo(E4M3).max
    s = scale_inv.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inn]
    return (wf / s).to(E4M3), scale_inv
