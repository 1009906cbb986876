"""The obvious PyTorch reference of the engine's weight formats (kernels/quant.h).

HF expert weights [E, out, in]; groups run along `in` (the GEMM's K):
int8 one scale per output row, int4 one per `group_size` inputs (the last
group of a row may be shorter). Symmetric: s = amax / Q (Q = 127 | 7),
s = 0 when s < FLT_MIN, q = clamp(round_half_even(w / s), -Q, Q),
dq = bf16(q * s) with the product in fp32.
"""

from __future__ import annotations

import torch

FLT_MIN = torch.finfo(torch.float32).tiny


def dequantized(w: torch.Tensor, weight_format: str, group_size: int = 128) -> torch.Tensor:
    """dq(q(w)) as bf16, same shape as w."""
    if weight_format == "bf16":
        return w.to(torch.bfloat16)
    q_max = {"int8": 127.0, "int4": 7.0}[weight_format]
    w = w.to(torch.bfloat16).float() if w.dtype != torch.float32 else w
    *lead, k = w.shape
    g = k if weight_format == "int8" else group_size
    groups = -(-k // g)
    padded = torch.zeros(*lead, groups * g, dtype=torch.float32)
    padded[..., :k] = w  # zeros never change a group's amax
    pg = padded.reshape(*lead, groups, g)
    s = pg.abs().amax(-1, keepdim=True) / q_max
    s = torch.where(s >= FLT_MIN, s, torch.zeros_like(s))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(pg / safe).clamp(-q_max, q_max), torch.zeros_like(pg))
    return (q * s).reshape(*lead, groups * g)[..., :k].to(torch.bfloat16)
