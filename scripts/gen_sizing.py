"""Host-RAM / GPU-memory sizing table of docs/HARDWARE.md, computed, never typed by hand.

For each model: its published config.json dimensions (the few fields below, the rest
transformers' defaults for that model_type) build the model on the meta device (no memory), the
routed-experts modules moetune would put on the engine are found as load_model finds them, and
the engine's own size function (`moetune.ExpertsOptions(...).host_bytes(E, H, I)`, what
load_model's host-RAM check uses) gives the packed experts per weight format. The non-expert
weights are counted from the same skeleton (bf16).

    python scripts/gen_sizing.py           # rewrite the table in docs/HARDWARE.md
    python scripts/gen_sizing.py --check   # exit 1 if the committed table differs
"""

from __future__ import annotations

import argparse
import os
import sys

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "HARDWARE.md")
BEGIN, END = "<!-- sizing:begin (scripts/gen_sizing.py) -->", "<!-- sizing:end -->"
FORMATS = ("bf16", "int8", "int4")

# name -> (model_type, config fields as in the published config.json)
MODELS = {
    "OLMoE-1B-7B": (
        "olmoe",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            intermediate_size=1024,
            vocab_size=50304,
        ),
    ),
    "Qwen3-30B-A3B": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            intermediate_size=6144,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
    "gpt-oss-20b (bf16)": (
        "gpt_oss",
        dict(
            hidden_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            intermediate_size=2880,
            vocab_size=201088,
        ),
    ),
    "Mixtral-8x7B": (
        "mixtral",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=14336,
            vocab_size=32000,
        ),
    ),
    "gpt-oss-120b (bf16)": (
        "gpt_oss",
        dict(
            hidden_size=2880,
            num_hidden_layers=36,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=128,
            num_experts_per_tok=4,
            intermediate_size=2880,
            vocab_size=201088,
        ),
    ),
    "Qwen3-235B-A22B": (
        "qwen3_moe",
        dict(
            hidden_size=4096,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=1536,
            intermediate_size=12288,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
    "DeepSeek-V3 / R1": (
        "deepseek_v3",
        dict(
            hidden_size=7168,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            moe_intermediate_size=2048,
            intermediate_size=18432,
            first_k_dense_replace=3,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            vocab_size=129280,
        ),
    ),
}


def sizes(model_type: str, fields: dict) -> dict:
    """{"E H I": dims text, "layers": MoE layers, fmt: packed host bytes per format,
    "layer_src": one layer's experts as bf16 in the checkpoint, "nonexpert": bf16 bytes}."""
    import torch
    import transformers

    from moetune.hf import patching
    from moetune.hf.loader import packed_bytes_estimate, skeleton
    from moetune.options import ExpertsOptions

    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = skeleton(config, torch.bfloat16)
    found = patching.find_experts(model)
    dims = []
    expert_params = set()
    for f in found:
        gate_up = f.module.gate_up_proj
        dims.append((*f.family.dims(tuple(gate_up.shape)), f.family.bias))
        expert_params |= {id(p) for p in f.module.parameters()}
    out = {"layers": len(found), "E H I": "{} {} {}".format(*dims[0][:3])}
    for fmt in FORMATS:
        opts = ExpertsOptions(weight_format=fmt)
        out[fmt] = sum(packed_bytes_estimate(E, H, I, opts, biases=b) for E, H, I, b in dims)
    E, H, I, _ = dims[0]
    out["layer_src"] = 3 * E * H * I * 2
    out["nonexpert"] = sum(p.numel() * 2 for p in model.parameters() if id(p) not in expert_params)
    return out


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f}"


def table() -> str:
    rows = [
        "| model | MoE layers | E H I | packed experts, host RAM (GiB): bf16 / int8 / int4 | one layer unpacked while loading (GiB) | non-expert weights, bf16 (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (model_type, fields) in MODELS.items():
        s = sizes(model_type, fields)
        packed = " / ".join(gib(s[f]) for f in FORMATS)
        rows.append(
            f"| {name} | {s['layers']} | {s['E H I']} | {packed} | {gib(s['layer_src'])} | {gib(s['nonexpert'])} |"
        )
    return "\n".join(rows)


def render(doc: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/HARDWARE.md's table is stale")
    args = ap.parse_args()
    with open(DOC) as f:
        doc = f.read()
    new = render(doc)
    if args.check:
        if new != doc:
            print("docs/HARDWARE.md sizing table is stale: run python scripts/gen_sizing.py", file=sys.stderr)
            return 1
        return 0
    with open(DOC, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
