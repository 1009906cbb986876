"""Quantized checkpoints read as published: which scheme config.json declares, the expert
tensors it ships, and how load_model keeps them in the engine (no expansion, no re-quantization).

Schemes (`quantization_config.quant_method`) and what their routed experts hold:

  "fp8"                 DeepSeek-V3 / Qwen3-FP8: per-expert `...{gate,up,down}_proj.weight`
                        (float8_e4m3fn [out, in]) + `.weight_scale_inv` (fp32 [ceil(out/bo),
                        ceil(in/bi)], block (bo, bi) = `weight_block_size`). Kept as engine
                        format "fp8_block" when the block is 128 x 128 (as published).
  "mxfp4"               gpt-oss: fused `experts.gate_up_proj_blocks` (uint8 [E, 2I, H/32, 16], two
                        e2m1 codes per byte, low nibble first; rows = the gate/up-interleaved
                        outputs), `experts.gate_up_proj_scales` (e8m0 uint8 [E, 2I, H/32]) and the
                        same for down_proj ([E, H, I/32, 16], [E, H, I/32]). Engine format "mxfp4".
  "compressed-tensors"  Kimi-K2 ("pack-quantized", symmetric int4, strategy "group"): per-expert
                        `.weight_packed` (int32 [out, in/8], 8 nibbles q + 8 per word, lowest
                        input in the lowest nibble), `.weight_scale` (bf16 [out, in/G]) and
                        `.weight_shape` ([out, in]). Engine format "int4" (group G), bit-exactly.

`weight_format="auto"` (load_model's default) keeps the published format; any explicit format
converts: the published values are dequantized exactly to bf16 here (`dequantize`, plain torch)
and the engine packs / quantizes them as for an unquantized checkpoint; the loader logs that.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from moetune.hf import fp8 as fp8_mod
from moetune.hf.families import DOWN, GATE_UP, PROJ, per_expert_shapes
from moetune.options import ExpertsOptions

log = logging.getLogger("moetune")

AUTO = "auto"
METHODS = ("fp8", "mxfp4", "compressed-tensors")
E8M0_NAN = 255
# Per-expert key kinds (the last name part after the projection): weight codes and scales.
WEIGHT_KINDS = ("weight", "weight_packed")
SCALE_KINDS = {"weight_scale_inv": "weight", "weight_scale": "weight_packed"}  # scale kind -> its weight kind
SHAPE_KIND = "weight_shape"  # compressed-tensors' record of the unpacked [out, in]
ALL_KINDS = WEIGHT_KINDS + tuple(SCALE_KINDS) + (SHAPE_KIND,)
# Fused MXFP4 tensors (gpt-oss): checkpoint parameter name -> (model parameter, "codes" | "scales").
FUSED_MXFP4 = {
    f"{GATE_UP}_blocks": (GATE_UP, "codes"),
    f"{GATE_UP}_scales": (GATE_UP, "scales"),
    f"{DOWN}_blocks": (DOWN, "codes"),
    f"{DOWN}_scales": (DOWN, "scales"),
}
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What config.json's quantization_config declares for the experts."""

    method: str  # one of METHODS
    weight_format: str | None  # the engine format holding them as published; None: the engine cannot
    group_size: int = 0  # int4's group
    block: tuple[int, int] | None = None  # fp8's (bo, bi)

    def engine_options(self, options: ExpertsOptions) -> ExpertsOptions:
        return options.replace(weight_format=self.weight_format, group_size=self.group_size or None)


def _as_dict(q) -> dict:
    if isinstance(q, dict):
        return q
    return q.to_dict() if hasattr(q, "to_dict") else dict(vars(q))


def read(config) -> Quantization | None:
    """The checkpoint's quantization (None: unquantized); a ValueError naming the field for a
    scheme moetune does not read."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = _as_dict(q)
    method = q.get("quant_method")
    if method == "fp8":
        block = fp8_mod.block_size(config)
        return Quantization("fp8", "fp8_block" if block == (128, 128) else None, block=block)
    if method == "mxfp4":
        return Quantization("mxfp4", "mxfp4")
    if method == "compressed-tensors":
        return Quantization("compressed-tensors", "int4", group_size=_ct_group(q))
    raise ValueError(
        f"moetune: config.json quantization_config.quant_method {method!r} is not supported; moetune reads "
        "'fp8' (block FP8, DeepSeek-V3), 'mxfp4' (gpt-oss) and 'compressed-tensors' pack-quantized "
        "symmetric int4 (Kimi-K2), or unquantized checkpoints"
    )


def _ct_group(q: dict) -> int:
    """The group size of a compressed-tensors pack-quantized symmetric int4 config (ValueError otherwise)."""
    fmt = q.get("format")
    if fmt != "pack-quantized":
        raise ValueError(f"moetune: compressed-tensors format {fmt!r} is not supported (pack-quantized int4)")
    groups = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
    if len(groups) != 1:
        raise ValueError(f"moetune: compressed-tensors config with {len(groups)} weight groups (one is supported)")
    w = groups[0]
    want = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
    if bad or w.get("group_size") not in (32, 64, 128):
        raise ValueError(
            f"moetune: compressed-tensors weights {w} are not supported: symmetric int4 with strategy 'group' "
            "and group_size 32, 64 or 128 (as Kimi-K2) is"
        )
    return int(w["group_size"])


def choose_options(quant: Quantization | None, options: ExpertsOptions, weight_format: str, path) -> ExpertsOptions:
    """The experts' options for load_model: `weight_format` "auto" keeps the published format
    unless `options` name another one than the default bf16 (then that one, as if explicit; an
    unquantized checkpoint: `options`' format); an explicit format (already in `options`)
    converts (logged)."""
    if weight_format == AUTO and options.weight_format != ExpertsOptions().weight_format:
        weight_format = options.weight_format  # e.g. moetune train --expert-format int8
    if weight_format != AUTO:
        if quant is not None and options.weight_format != quant.weight_format:
            log.info(
                "moetune: %s: converting the %s experts to %s as requested (published values dequantized exactly "
                "to bf16%s)",
                path,
                quant.method,
                options.weight_format,
                "" if options.weight_format == "bf16" else ", then quantized by the engine",
            )
        return options
    if quant is None:
        return options
    if quant.weight_format is None:
        log.info(
            "moetune: %s: FP8 block %s is not the engine's 128 x 128: experts converted to %s",
            path,
            list(quant.block),
            options.weight_format,
        )
        return options
    return quant.engine_options(options)


def keeps(quant: Quantization | None, options: ExpertsOptions) -> bool:
    """Whether the experts load as published (codes and scales kept) with these options."""
    return (
        quant is not None
        and quant.weight_format == options.weight_format
        and (quant.weight_format != "int4" or options.group_size == quant.group_size)
    )


# ---- plan checks ----


def published_fused(ep) -> bool:
    return any(p in FUSED_MXFP4 for p in ep.fused)


def layer_problems(ep, ckpt, quant: Quantization | None, keep: bool = False) -> list[str]:
    """Problems of one layer's published expert tensors (compressed-tensors per expert, MXFP4
    fused); adds their bytes to ep.src_bytes. keep: the experts are to stay as published (block
    FP8 then needs every expert weight in e4m3). [] for layers of other kinds."""
    if keep and quant is not None and quant.method == "fp8":
        plain = sorted(k for k in ep.per_expert.values() if ckpt.entries[k].dtype != fp8_mod.E4M3)
        plain += [k for p, k in ep.fused.items() if p in (GATE_UP, DOWN)]
        return [
            f"{k} is {ckpt.entries[k].dtype}, not block-FP8 e4m3 as config.json declares: the experts cannot be "
            "kept as published (pass weight_format= to convert them)"
            for k in plain[:1]
        ]
    if published_fused(ep):
        return _mxfp4_problems(ep, ckpt, quant)
    if any(k.endswith(".weight_packed") for k in ep.per_expert.values()):
        return _ct_problems(ep, ckpt, quant)
    if quant is not None and quant.method in ("mxfp4", "compressed-tensors"):
        return [f"{ep.qual}: config.json declares {_declared(quant)} but the layer's experts are not quantized"]
    return []


def _mxfp4_problems(ep, ckpt, quant) -> list[str]:
    bad = []
    if quant is None or quant.method != "mxfp4":
        bad.append(f"{ep.qual} holds MXFP4 blocks but config.json declares {_declared(quant)}")
    dims = {GATE_UP: (2 * ep.I, ep.H), DOWN: (ep.H, ep.I)}
    for param, (out, inn) in dims.items():
        codes, scales = f"{param}_blocks", f"{param}_scales"
        for name in (codes, scales):
            if name not in ep.fused:
                bad.append(f"{ep.qual}.{name} is missing (MXFP4 {param} needs its blocks and scales)")
        if codes not in ep.fused or scales not in ep.fused:
            continue
        if inn % 32:
            bad.append(f"{ep.qual}: MXFP4 {param} has {inn} inputs, not a multiple of 32")
            continue
        want = {codes: (ep.E, out, inn // 32, 16), scales: (ep.E, out, inn // 32)}
        for name, shape in want.items():
            ent = ckpt.entries[ep.fused[name]]
            if tuple(ent.shape) != shape or ent.dtype != torch.uint8:
                bad.append(
                    f"{ep.fused[name]} is {ent.dtype} {list(ent.shape)}, expected torch.uint8 {list(shape)} "
                    f"(MXFP4, E={ep.E}, H={ep.H}, I={ep.I})"
                )
            ep.src_bytes += ent.nbytes
    for p in ep.family.param_names:
        if p in ep.fused and p not in (GATE_UP, DOWN):  # biases
            ep.src_bytes += ckpt.entries[ep.fused[p]].nbytes
        elif p in (GATE_UP, DOWN) and p in ep.fused:
            bad.append(f"{ep.qual}: the checkpoint holds both {p} and its MXFP4 blocks")
    return bad


def _ct_problems(ep, ckpt, quant) -> list[str]:
    bad = []
    if quant is None or quant.method != "compressed-tensors":
        bad.append(f"{ep.qual} holds compressed-tensors packed weights but config.json declares {_declared(quant)}")
        return bad
    G = quant.group_size
    shapes = per_expert_shapes(ep.H, ep.I)
    for e in range(ep.E):
        for p in PROJ:
            wk = ep.per_expert.get((e, p))
            if wk is None:
                continue  # reported as missing by the planner
            out, inn = shapes[p]
            ent = ckpt.entries[wk]
            if not wk.endswith(".weight_packed"):
                bad.append(f"{wk}: unquantized ({ent.dtype}) in a compressed-tensors layer; expected .weight_packed")
                continue
            if inn % 8 or inn % G:
                bad.append(f"{wk}: {inn} inputs are not a multiple of 8 and of the group size {G}")
                continue
            if tuple(ent.shape) != (out, inn // 8) or ent.dtype != torch.int32:
                bad.append(f"{wk} is {ent.dtype} {list(ent.shape)}, expected torch.int32 {[out, inn // 8]}")
            ep.src_bytes += ent.nbytes
            sk = ep.scales.get(wk)
            if sk is None:
                bad.append(f"{wk} has no scale tensor {wk[: -len('packed')]}scale")
                continue
            sent = ckpt.entries[sk]
            if tuple(sent.shape) != (out, inn // G) or sent.dtype not in (torch.bfloat16, torch.float32):
                bad.append(
                    f"{sk} is {sent.dtype} {list(sent.shape)}, expected bfloat16 / float32 {[out, inn // G]} "
                    f"(group {G})"
                )
            ep.src_bytes += sent.nbytes
    return bad


def fp8_scale_problem(ckpt, wk: str, sk: str, block) -> str | None:
    """The planner's check of an FP8 weight's scale shape (before any weight is read)."""
    want = fp8_mod.scale_shape(ckpt.entries[wk].shape, block)
    got = tuple(ckpt.entries[sk].shape)
    if got != want:
        return f"{sk} has shape {list(got)}, expected {list(want)} for weight {list(ckpt.entries[wk].shape)} with block {list(block)}"
    return None


def _declared(quant) -> str:
    return "no quantization" if quant is None else f"quant_method {quant.method!r}"


# ---- reading one expert ----


def read_published(reader, ep, e: int, quant: Quantization):
    """Expert e's ((codes, scales) of gate, up, down) as published, in [out, in] rows: what
    MoEExperts.load_expert_published takes (no conversion)."""
    if published_fused(ep):
        gb, gs = reader.get_row(ep.fused[f"{GATE_UP}_blocks"], e), reader.get_row(ep.fused[f"{GATE_UP}_scales"], e)
        db, ds = reader.get_row(ep.fused[f"{DOWN}_blocks"], e), reader.get_row(ep.fused[f"{DOWN}_scales"], e)
        (g_b, u_b), (g_s, u_s) = ep.family.split_gate_up(gb, 0), ep.family.split_gate_up(gs, 0)
        return (g_b, g_s), (u_b, u_s), (db, ds)
    out = []
    for p in PROJ:
        wk = ep.per_expert[(e, p)]
        out.append((reader.get(wk), reader.get(ep.scales[wk])))
    return tuple(out)


def read_dequantized(reader, ep, e: int, quant: Quantization):
    """Expert e's bf16 (gate, up, down) [out, in]: the published values, exactly."""
    shapes = per_expert_shapes(ep.H, ep.I)
    return tuple(
        dequantize(quant, codes, scales, shapes[p][1])
        for p, (codes, scales) in zip(PROJ, read_published(reader, ep, e, quant))
    )


def dequantize(quant: Quantization, codes: torch.Tensor, scales: torch.Tensor, inn: int) -> torch.Tensor:
    """bf16 [out, in] of one published weight: decode(code) * scale in fp32, rounded to bf16 (the
    engine's dq; exact for these formats' values)."""
    if quant.method == "fp8":
        return fp8_mod.dequantize(codes, scales, quant.block)
    out = codes.shape[0]
    b = codes.contiguous().view(torch.uint8).reshape(out, -1)
    nib = torch.stack((b & 15, b >> 4), dim=-1).reshape(out, -1)[:, :inn].long()
    if quant.method == "mxfp4":
        if (scales == E8M0_NAN).any():
            raise ValueError("moetune: an MXFP4 scale is the e8m0 NaN code 255")
        v = torch.tensor(_E2M1, dtype=torch.float32)[nib]
        e = scales.to(torch.int32) - 127
        s = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
        g = 32
    else:
        v = (nib - 8).to(torch.float32)
        s = scales.to(torch.float32)
        g = quant.group_size
    return (v * s.repeat_interleave(g, dim=1)[:, :inn]).to(torch.bfloat16)


# ---- merge_and_save: published tensors written dequantized ----


def merged_source_tensor(reader, ckpt, key: str, quant: Quantization, family):
    """For merge_and_save: None for a published tensor folded into another (a scale, a shape
    record); else (output key, tensor, was quantized) with quantized weights dequantized exactly
    to bf16 under the unquantized model's key and orientation (`family`: the checkpoint's MoE
    family, for MXFP4's fused [E, in, out] storage); other tensors unchanged."""
    if quant.method == "fp8":
        if key.endswith(fp8_mod.SCALE_SUFFIX):
            return None
        t = reader.get(key)
        if t.dtype == fp8_mod.E4M3:
            return key, fp8_mod.dequantize(t, reader.get(key + fp8_mod.SCALE_SUFFIX), quant.block, key), True
        return key, t, False
    if quant.method == "compressed-tensors":
        if key.endswith((".weight_scale", ".weight_shape")):
            return None
        if key.endswith(".weight_packed"):
            base = key[: -len("weight_packed")]
            inn = int(reader.get(base + "weight_shape")[1]) if base + SHAPE_KIND in ckpt else None
            packed = reader.get(key)
            inn = inn if inn is not None else packed.shape[1] * 8
            return base + "weight", dequantize(quant, packed, reader.get(base + "weight_scale"), inn), True
        return key, reader.get(key), False
    # mxfp4
    if key.endswith("_proj_scales"):
        return None
    if key.endswith("_proj_blocks"):
        blocks, scales = reader.get(key), reader.get(key[: -len("blocks")] + "scales")
        E, out, G, B = blocks.shape
        w = dequantize(quant, blocks.reshape(E * out, G * B), scales.reshape(E * out, G), G * 32).reshape(E, out, -1)
        return key[: -len("_blocks")], (family.storage_view(w) if family is not None else w).contiguous(), True
    return key, reader.get(key), False


def requantized(quant: Quantization, key: str, w: torch.Tensor, family) -> dict[str, torch.Tensor]:
    """merge_and_save(..., merged_format="published"): a merged weight (the output of
    merged_source_tensor's key and orientation) quantized back into the source's published
    tensors (a second rounding on top of the published one): fp8 e4m3 + scale_inv per block
    (amax / 448), compressed-tensors int4 (bf16 scale amax / 7.5, q = clamp(round(w / s), -8,
    7)), MXFP4 (OCP: e8m0 2^(floor(log2 amax) - 2), nearest e2m1, ties to even)."""
    if quant.method == "fp8":
        q, s = fp8_mod.quantize(w, quant.block)
        return {key: q, key + fp8_mod.SCALE_SUFFIX: s}
    if quant.method == "compressed-tensors":
        packed, scale = int4_quantize(w, quant.group_size)
        base = key[: -len("weight")]
        return {
            base + "weight_packed": packed,
            base + "weight_scale": scale,
            base + SHAPE_KIND: torch.tensor(list(w.shape), dtype=torch.int32),
        }
    v = family.engine_view(w) if family is not None else w  # [E, out, in]
    blocks, scales = mxfp4_quantize(v)
    return {key + "_blocks": blocks, key + "_scales": scales}


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors pack-quantized symmetric int4 of [out, in]: (int32 [out, in/8], bf16 [out, in/group])."""
    out, inn = w.shape
    g = w.float().reshape(out, inn // group, group)
    s = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
    sf = s.float()[..., None]
    q = torch.where(sf > 0, torch.clamp(torch.round(g / torch.where(sf > 0, sf, 1.0)), -8, 7), 0.0)
    u = (q.to(torch.int64) + 8).reshape(out, inn // 8, 8)
    words = sum(u[..., i] << (4 * i) for i in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), s


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX FP4 of [..., out, in] (in % 32 == 0): (blocks uint8 [..., out, in/32, 16], e8m0 scales)."""
    *lead, out, inn = w.shape
    g = w.float().reshape(*lead, out, inn // 32, 32)
    amax = g.abs().amax(-1)
    # floor(log2 amax) exactly: frexp's exponent minus one (log2 may round up just below 2^n).
    e2 = torch.frexp(amax).exponent.to(torch.float32) - 1
    exp = torch.where(amax > 0, e2 - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    x = g / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32))[..., None]
    # Nearest magnitude code, ties to the even code: the midpoint between codes i and i + 1 goes
    # up only when i is odd; beyond 6 saturates at code 7.
    a = x.abs()
    mags = _E2M1[:8]
    code = torch.zeros(a.shape, dtype=torch.int64)
    for i in range(7):
        mid = 0.5 * (mags[i] + mags[i + 1])
        code += (a >= mid if i % 2 else a > mid).to(torch.int64)
    code = (code | (((x < 0) & (code > 0)).to(torch.int64) << 3)).to(torch.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8)
