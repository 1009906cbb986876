"""Host RAM and time of loading a quantized checkpoint as published (issue 11): a gpt-oss-20b-shaped
MXFP4 checkpoint (real expert dims H = I = 2880, E = 32; fewer layers, a small vocabulary so the
experts dominate) loaded by moetune.load_model keeping MXFP4 (weight_format="auto") vs converting
to bf16, each in a fresh subprocess: peak RSS (VmHWM) during the load minus the RSS before it,
against the checkpoint's expert bytes (blocks + scales) and the engine's packed bytes.

    python benchmarks/bench_load_published.py --dir /tmp/gptoss-shaped --layers 2
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
    ap.add_argument("--formats", nargs="+", default=["auto", "bf16"])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.dir, args.one)))
        return
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        write(folder, args.layers)
    from safetensors import safe_open

    expert = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():
                if k.endswith(("_blocks", "_scales")):
                    s = r.get_slice(k).get_shape()
                    n = 1
                    for d in s:
                        n *= d
                    expert += n
    print(f"checkpoint {folder}: expert blocks + scales {expert / 2**30:.3f} GiB")
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
