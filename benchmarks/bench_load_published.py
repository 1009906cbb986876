"""Host RAM and time of loading a quantized checkpoint as published (issue 11), one per published
format, with real expert dims and fewer experts / layers and a small vocabulary so the experts
dominate:
  mxfp4  gpt-oss-20b-shaped (H = I = 2880, E = 32): fused `*_blocks` / `*_scales`;
  fp8    DeepSeek-V3-shaped (H = 7168, I = 2048, E = 16 of 256): per-expert e4m3 `weight` + fp32
         `weight_scale_inv` per 128 x 128 block;
  int4   Kimi-K2-shaped (DeepSeek-V3 architecture, same dims): compressed-tensors pack-quantized
         `weight_packed` int32 + bf16 `weight_scale` per 32 inputs + `weight_shape`.
The codes are random (valid values; the load does not depend on them). Loaded by
moetune.load_model keeping the format (weight_format="auto") vs converting to bf16, each in a fresh
subprocess: peak RSS (VmHWM) during the load minus the RSS before it, against the checkpoint's
expert bytes (codes + scales) and the engine's packed bytes.

    python benchmarks/bench_load_published.py --dir /tmp/gptoss-shaped --layers 2
    python benchmarks/bench_load_published.py --layout fp8 --dir /tmp/dsv3-fp8 --layers 2
    python benchmarks/bench_load_published.py --layout int4 --dir /tmp/kimi-int4 --layers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# Suffixes of the expert tensors each layout stores (counted as the checkpoint's expert bytes).
EXPERT_SUFFIXES = {
    "mxfp4": ("_blocks", "_scales"),
    "fp8": ("_proj.weight", "_proj.weight_scale_inv"),
    "int4": ("weight_packed", "weight_scale", "weight_shape"),
}


DTYPE_BYTES = {"U8": 1, "F8_E4M3": 1, "BF16": 2, "I32": 4, "F32": 4}


def write_deepseek(folder: Path, layers: int, layout: str) -> None:
    """A DeepSeek-V3-shaped checkpoint whose routed experts are block-FP8 (DeepSeek-V3's own
    layout) or compressed-tensors INT4 (Kimi-K2's), everything else bf16, one shard per layer."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    E, H, I = 16, 7168, 2048
    cfg = transformers.DeepseekV3Config(
        vocab_size=1024,
        hidden_size=H,
        intermediate_size=18432,
        moe_intermediate_size=I,
        n_routed_experts=E,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        num_hidden_layers=layers,
        first_k_dense_replace=0,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for layer in range(-1, layers):
        t = {}
        for k, v in model.state_dict().items():
            inside = f"layers.{layer}." in k
            if (layer == -1 and ".layers." in k) or (layer >= 0 and not inside):
                continue
            if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                continue  # written per expert below
            t[k] = (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
        for e in range(E if layer >= 0 else 0):
            for p, (out, inn) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items():
                base = f"model.layers.{layer}.mlp.experts.{e}.{p}_proj."
                if layout == "fp8":  # e4m3 codes without the NaN ones (0x7f, 0xff)
                    codes = torch.randint(0, 0x7F, (out, inn), generator=g, dtype=torch.uint8)
                    codes |= torch.randint(0, 2, (out, inn), generator=g, dtype=torch.uint8) << 7
                    t[base + "weight"] = codes.view(torch.float8_e4m3fn)
                    t[base + "weight_scale_inv"] = torch.rand(out // 128, inn // 128, generator=g) * 1e-3
                else:
                    t[base + "weight_packed"] = torch.randint(
                        -(2**31), 2**31 - 1, (out, inn // 8), generator=g, dtype=torch.int32
                    )
                    t[base + "weight_scale"] = (torch.rand(out, inn // 32, generator=g) * 1e-3).to(torch.bfloat16)
                    t[base + "weight_shape"] = torch.tensor([out, inn], dtype=torch.int32)
        name = f"model-{layer + 2:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = cfg.to_dict()
    if layout == "fp8":
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    else:
        d["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
                }
            },
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.gate$"],
        }
    (folder / "config.json").write_text(json.dumps(d))


def write(folder: Path, layers: int) -> None:
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    cfg = transformers.GptOssConfig(
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=1024,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
    )
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for layer in range(-1, layers):
        t = {}
        for k, v in model.state_dict().items():
            inside = f"layers.{layer}." in k
            if (layer == -1 and ".layers." in k) or (layer >= 0 and not inside):
                continue
            if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                E, inn, out = v.shape  # gpt-oss stores [E, in, out]
                t[k + "_blocks"] = torch.randint(0, 256, (E, out, inn // 32, 16), generator=g, dtype=torch.uint8)
                t[k + "_scales"] = torch.randint(118, 124, (E, out, inn // 32), generator=g, dtype=torch.uint8)
            else:
                t[k] = (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
        name = f"model-{layer + 2:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(d))


def measure(folder: str, weight_format: str) -> dict:
    import torch  # noqa: F401  (imports counted in the baseline)
    import transformers  # noqa: F401

    import moetune
    from moetune.hf.patching import experts_state

    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    model = moetune.load_model(folder, progress=False, weight_format=weight_format, placement="cpu")
    secs = time.perf_counter() - t0
    engines = [st.engine for st in (experts_state(m) for m in model.modules()) if st is not None]
    return {
        "weight_format": weight_format,
        "peak_minus_before_gib": (status_kib("VmHWM") - before) / 2**20,
        "packed_gib": sum(e.packed_bytes for e in engines) / 2**30,
        "seconds": secs,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layout", choices=sorted(EXPERT_SUFFIXES), default="mxfp4")
    ap.add_argument("--formats", nargs="+", default=["auto", "bf16"])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.dir, args.one)))
        return
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        if args.layout == "mxfp4":
            write(folder, args.layers)
        else:
            write_deepseek(folder, args.layers, args.layout)
    from safetensors import safe_open

    expert = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():
                if ".experts." in k and k.endswith(EXPERT_SUFFIXES[args.layout]):
                    s = r.get_slice(k).get_shape()
                    n = 1
                    for d in s:
                        n *= d
                    expert += n * DTYPE_BYTES[r.get_slice(k).get_dtype()]
    print(f"checkpoint {folder} ({args.layout}): expert codes + scales {expert / 2**30:.3f} GiB")
    for fmt in args.formats:
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(folder), "--one", fmt], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"  weight_format={fmt:5}: engine packed {r['packed_gib']:.3f} GiB, peak RSS - before "
            f"{r['peak_minus_before_gib']:.3f} GiB, load {r['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
