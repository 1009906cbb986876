"""End-of-run report: a PNG plot of the losses and throughput (matplotlib,
Agg backend: no display needed) and the summary (printed and summary.json)."""

from __future__ import annotations

import json
import os
from typing import Any


def plot(records: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r["kind"] == "train"]
    ev = [r for r in records if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if ev:
        ax1.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], lw=1, color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens / s")
    ax2.set_title("throughput")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _short(text: str, n: int = 160) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 3] + "..."


def summarize(summary: dict[str, Any], output_dir: str) -> str:
    with open(os.path.join(output_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    s = summary
    tps = "n/a" if s.get("tokens_per_s") is None else f"{s['tokens_per_s']:,.0f}"
    share = "n/a" if s.get("expert_share") is None else f"{100 * s['expert_share']:.0f}%"
    lines = [
        f"steps {s['steps']}  tokens {s['tokens']:,} (loss on {s['target_tokens']:,})  "
        f"wall {s['wall_seconds']:.1f} s  {tps} tokens/s  CPU-expert share {share}"
        + (
            "  (figures of the run so far: no step ran in this invocation)"
            if s.get("throughput_of") == "the run so far"
            else ""
        ),
        f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        + (
            f"  eval loss {s['first_eval_loss']:.4f} -> {s['last_eval_loss']:.4f}"
            if s.get("last_eval_loss") is not None
            else ""
        ),
        f"peak GPU memory {_gib(s['peak_gpu_bytes'])}  peak host RAM {_gib(s['peak_host_rss_bytes'])}",
    ]
    p = s.get("placement")
    if p:
        lines.append(
            f"experts placement {p['mode']} on {p['device']}: {100 * p['gpu_token_share']:.0f}% of routed "
            f"tokens on the GPU, {p['bytes_copied'] / 1e9:.2f} GB copied; busy CPU {p['cpu_s']:.1f} s, "
            f"GPU {p['gpu_s']:.1f} s (logged steps)"
        )
    if s.get("placement_trace"):
        lines.append(f"placement trace: {s['placement_trace']}")
    tp = s.get("trainable_parameters")
    if tp:
        kinds = ", ".join(f"{k} {tp[k]:,}" for k in ("attention", "mlp", "experts", "other") if tp.get(k))
        lines.append(f"trainable parameters {tp['total']:,} ({kinds})")
    for d in s.get("data_samples") or []:
        lines += [
            f"sample ({d['where']}): {_short(d['prompt'])}",
            f"  generated: {_short(d['generated'])}",
            f"  data:      {_short(d['reference'])}",
        ]
    lines += [
        f"adapter: {s['adapter_dir']}",
    ]
    return "\n".join(lines)
