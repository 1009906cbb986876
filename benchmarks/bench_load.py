"""Host memory and throughput of loading a MoE checkpoint: moetune.load_model
vs transformers from_pretrained + moetune.hf.patch.

    python benchmarks/bench_load.py --dir /tmp/qwen3-shaped --layers 2   # write (once) and measure

Writes a random Qwen3-30B-A3B-shaped checkpoint (real config values, fewer
layers; published per-expert key layout, one shard per layer plus one for
embeddings / head) if --dir has none, then loads it in a fresh subprocess per
method and reports, from /proc/self/status:
* peak RSS (VmHWM) during the load, minus the RSS before it (Python, torch,
  transformers imported), against the bound of issue 3:
  packed expert bytes + one layer's unpacked experts + the non-expert part;
* load throughput = checkpoint bytes / load seconds (not meaningful on a
  contended machine: measure it on an idle one);
* with --device cuda: the GPU memory peak during the load and what stays
  allocated (transformers' from_pretrained puts the experts on the GPU
  first; moetune never does). All figures in GiB.

Packed-experts disk cache (load_model's cache_dir):

    python benchmarks/bench_load.py --dir /tmp/qwen3-shaped --layers 2 --weight-format int4 --cache-dir /tmp/qwen3-cache

runs three loads in fresh processes: `moetune` (no cache), `cache-cold` (the
checkpoint's cache folder emptied first: quantize + pack + write the cache)
and `cache-warm` (every layer read back from the cache: no quantization).
Checkpoint and cache files are whatever the OS page cache holds (just written
or read), so this compares CPU work, not disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2.0**30


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def qwen3_30b_config(layers: int):
    import transformers

    # Qwen3-30B-A3B's config.json values, num_hidden_layers reduced.
    return transformers.Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def write_checkpoint(folder: Path, layers: int) -> None:
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    cfg = qwen3_30b_config(layers)
    with init_empty_weights():
        model = transformers.Qwen3MoeForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rnd(shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    groups = {"model-head.safetensors": [k for k in shapes if not k.startswith("model.layers.")]}
    for L in range(layers):
        groups[f"model-layer{L:03d}.safetensors"] = [k for k in shapes if k.startswith(f"model.layers.{L}.")]
    weight_map, total = {}, 0
    for fname, keys in groups.items():
        tensors = {}
        for k in keys:
            if k.endswith("experts.gate_up_proj"):
                E, I2, H = shapes[k]
                q = k[: -len(".gate_up_proj")]
                for e in range(E):
                    tensors[f"{q}.{e}.gate_proj.weight"] = rnd((I2 // 2, H))
                    tensors[f"{q}.{e}.up_proj.weight"] = rnd((I2 // 2, H))
            elif k.endswith("experts.down_proj"):
                E, H, I = shapes[k]
                q = k[: -len(".down_proj")]
                for e in range(E):
                    tensors[f"{q}.{e}.down_proj.weight"] = rnd((H, I))
            else:
                tensors[k] = (
                    rnd(shapes[k]) if not k.endswith("norm.weight") else torch.ones(shapes[k], dtype=torch.bfloat16)
                )
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: fname for k in tensors})
        del tensors
        print(f"[write] {fname}", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(d, indent=1))


def measure(method: str, folder: Path, threads: int, device: str, engine: dict, cache_dir) -> dict:
    """Runs in a fresh process: one load, its memory and time."""
    import torch
    import transformers

    import moetune
    import moetune.hf
    from moetune.hf.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    expert_bytes = sum(e.nbytes for k, e in ckpt.entries.items() if ".experts." in k)
    layer_bytes = max(
        sum(e.nbytes for k, e in ckpt.entries.items() if k.startswith(f"model.layers.{L}.mlp.experts."))
        for L in range(1000)
        if f"model.layers.{L}.input_layernorm.weight" in ckpt.entries
    )
    file_bytes = sum(e.nbytes for e in ckpt.entries.values())
    ctx = moetune.Context(threads)
    base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    cache = None
    if method == "moetune" or method.startswith("cache-"):
        model = moetune.load_model(
            folder,
            ctx=ctx,
            progress=False,
            device=device,
            cache_dir=cache_dir if method.startswith("cache-") else None,
            **engine,
        )
        packed = model.moetune_handle.packed_bytes
        cache = getattr(model, "moetune_cache", None)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
        handle = moetune.hf.patch(model, ctx=ctx, keep_original=False, **engine)
        packed = handle.packed_bytes
    dt = time.perf_counter() - t0
    if method == "cache-warm" and set(cache.values()) != {"hit"}:
        raise RuntimeError(f"cache-warm: not every layer came from the cache: {cache}")
    if method == "cache-cold" and any(v == "hit" for v in cache.values()):
        raise RuntimeError(f"cache-cold: a layer came from the cache: {cache}")
    nonexpert = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not isinstance(p, moetune.hf.EngineHeldTensor)
    )
    peak = status_kib("VmHWM") * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    gpu_after = torch.cuda.memory_allocated() if device != "cpu" else 0
    return dict(
        cache=cache,
        gpu_peak=gpu_peak,
        gpu_after=gpu_after,
        method=method,
        seconds=dt,
        file_bytes=file_bytes,
        expert_bytes=expert_bytes,
        packed_bytes=packed,
        layer_bytes=layer_bytes,
        nonexpert_bytes=nonexpert,
        rss_before=base,
        peak_rss=peak,
        rss_after=status_kib("VmRSS") * 1024,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--methods", default="moetune,transformers")
    ap.add_argument("--device", default="cpu", help="where the non-expert parts go (cuda: also GPU memory)")
    ap.add_argument(
        "--weight-format",
        default="bf16",
        choices=("bf16", "int8", "int4"),
        help="packed expert format (quantized while loading)",
    )
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument(
        "--cache-dir", type=Path, help="packed-experts cache folder: methods default to moetune,cache-cold,cache-warm"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    engine = {"weight_format": a.weight_format}
    if a.weight_format == "int4":
        engine["group_size"] = a.group_size
    if a.child:
        print("RESULT " + json.dumps(measure(a.child, a.dir, a.threads, a.device, engine, a.cache_dir)))
        return
    if a.cache_dir is not None and a.methods == ap.get_default("methods"):
        a.methods = "moetune,cache-cold,cache-warm"
    if any(m.startswith("cache-") for m in a.methods.split(",")) and a.cache_dir is None:
        ap.error("the cache-cold / cache-warm methods need --cache-dir")
    if not (a.dir / "model.safetensors.index.json").is_file():
        write_checkpoint(a.dir, a.layers)
    print(
        f"checkpoint {a.dir} ({a.layers} layers of Qwen3-30B-A3B shape, bf16); engine threads {a.threads}; "
        f"non-expert parts on {a.device}; experts {a.weight_format}"
        + (f" (group {a.group_size})" if a.weight_format == "int4" else "")
    )
    print(
        f"{'method':<13} {'load s':>7} {'GB/s':>6} {'peak-base GiB':>13} {'bound GiB':>9} {'peak/bound':>10} "
        f"{'packed':>7} {'1 layer':>7} {'non-exp':>7} {'base':>6} {'GPU peak':>8} {'GPU after':>9}"
    )
    for method in a.methods.split(","):
        if method == "cache-cold":
            from moetune.hf.expert_cache import folder as cache_folder

            shutil.rmtree(cache_folder(a.cache_dir, a.dir), ignore_errors=True)
        cmd = [
            sys.executable,
            __file__,
            "--dir",
            str(a.dir),
            "--threads",
            str(a.threads),
            "--device",
            a.device,
            "--weight-format",
            a.weight_format,
            "--group-size",
            str(a.group_size),
            "--child",
            method,
        ]
        if a.cache_dir is not None:
            cmd += ["--cache-dir", str(a.cache_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{method}: failed\n{r.stderr[-2000:]}")
            continue
        m = json.loads(line[0][7:])
        bound = m["packed_bytes"] + m["layer_bytes"] + m["nonexpert_bytes"]
        used = m["peak_rss"] - m["rss_before"]
        print(
            f"{method:<13} {m['seconds']:7.1f} {m['file_bytes'] / m['seconds'] / 1e9:6.2f} {used / GiB:13.2f} "
            f"{bound / GiB:9.2f} {used / bound:10.2f} {m['packed_bytes'] / GiB:7.2f} {m['layer_bytes'] / GiB:7.2f} "
            f"{m['nonexpert_bytes'] / GiB:7.2f} {m['rss_before'] / GiB:6.2f} {m['gpu_peak'] / GiB:8.2f} "
            f"{m['gpu_after'] / GiB:9.2f}"
        )


if __name__ == "__main__":
    main()
