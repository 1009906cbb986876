"""`moetune export`: an adapter out of moetune in the layouts serving engines load.

* `merged`: base + LoRA merged into a full checkpoint (the source's key layout, shard by shard,
  no base weight held in RAM: moetune.merge_and_save on the (base folder, adapter folder) pair).
  Every engine that serves the base model serves this.
* `per-expert`: a PEFT adapter with one LoRA per expert and projection
  (`...experts.{e}.gate_proj.lora_A.weight`; moetune.export_per_expert_adapter), the layout
  engines that apply MoE LoRA at serving time read (docs/SERVING.md says which).
* `peft`: the adapter as trained (fused-expert `target_parameters` LoRA), copied; transformers +
  PEFT load it directly.

An adapter trained on int8 / int4 experts merged into the bf16 checkpoint warns (the merged model
is not the one that trained).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings

from moetune.commands.common import UsageError, run_config

LAYOUTS = ("merged", "per-expert", "peft")
SERVES = {
    "merged": "a plain HF checkpoint: transformers, vLLM, SGLang, TGI, ... serve it as the base model",
    "per-expert": "a PEFT adapter with per-expert LoRA keys: for servers that apply MoE expert LoRA at "
    "serving time (see docs/SERVING.md for versions)",
    "peft": "the adapter as trained (PEFT target_parameters on the fused experts): transformers + PEFT",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="merge an adapter into a full checkpoint, or write it per expert, for serving",
        description="Write an adapter for serving. Layouts: "
        + "; ".join(f"{k}: {v}" for k, v in SERVES.items())
        + ". The base model comes from --model or the adapter's run (RUN/config.yaml).",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter folder (e.g. RUN/adapter)")
    p.add_argument("--model", help="base checkpoint folder or Hub id (default: the adapter's run's model)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write (refused if it exists)")
    p.add_argument("--layout", choices=LAYOUTS, default="merged", help="what to write (default: merged)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    import moetune
    from moetune.hf import hub, merge, preflight

    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"adapter: {args.adapter} has no adapter_config.json (not a PEFT adapter folder)")
    if os.path.exists(args.out):
        raise UsageError(f"out: {args.out} exists (the export goes to a new folder)")
    run = run_config(args.adapter)
    if args.layout == "peft":
        shutil.copytree(args.adapter, args.out)
        print(f"adapter copied to {args.out}: {SERVES['peft']}")
        return 0
    model = args.model or run.get("model")
    if model is None:
        raise UsageError("model: give --model (the base checkpoint); the adapter's run names none (the demo model)")
    try:
        base = hub.resolve_model(model)
        preflight.check_model_folder(base)
    except (hub.HubError, preflight.PreflightError) as e:
        raise UsageError(str(e)) from None
    if args.layout == "merged":
        with warnings.catch_warnings():  # said once, as a line of its own
            warnings.simplefilter("ignore", merge.QuantizedMergeWarning)
            msg = merge.warn_if_quantized(run.get("expert_format"), run.get("int4_group_size"))
            if msg is not None:
                print(f"moetune export: warning: {msg}", file=sys.stderr)
            moetune.merge_and_save((base, args.adapter), args.out, progress=args.progress)
    else:
        pm = merge._adapter_on_skeleton(base, args.adapter)
        moetune.export_per_expert_adapter(pm, args.out)
    print(f"{args.layout} export written to {args.out}: {SERVES[args.layout]}")
    return 0
