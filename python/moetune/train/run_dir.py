"""The run folder policy: one run per output_dir, never mixed, never lost.

* A fresh run needs an empty (or absent) output_dir. One that holds a previous
  run is refused unless
    --resume            continue that run from its latest checkpoint, or
    --overwrite         start afresh: the previous run's files are removed (and
                        the removal is said). The tokenized-data cache is kept:
                        it is keyed by its content.
  A folder holding files moetune did not write is refused even with
  --overwrite (it is someone's folder, not a run).
* --resume PATH names a checkpoint folder (checkpoints/step-N) or a run folder
  (its latest checkpoint). Resuming from a checkpoint of output_dir that is not
  the latest moves the later ones (another trajectory) aside into
  checkpoints/abandoned-<time>/, said so; resuming from another run's
  checkpoint starts a new run folder (output_dir must be empty) from it.
* --init-adapter DIR starts a fresh run from an existing adapter's weights.

RUN_ENTRIES is the one list of what a run writes into its folder.
"""

from __future__ import annotations

import os
import shutil
import time

from moetune.train import checkpoint
from moetune.train.config import ConfigError

# What a run writes into output_dir (metrics.py, report.py, checkpoint.py, trackers.py, loop.py).
RUN_ENTRIES = (
    "config.yaml",
    "checkpoints",
    "adapter",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "tensorboard",
    "trackers",
    "data-cache",
)
KEPT_ON_OVERWRITE = ("data-cache",)
# Present without a run having started (a run that failed on its data): not a run to protect.
PRE_RUN_ENTRIES = ("config.yaml", "data-cache")


def normalize_resume(value):
    """The `resume` option: None (fresh), "latest", or a checkpoint / run folder path.
    YAML / Python booleans are accepted (true: latest)."""
    if value is True:
        return "latest"
    if value is False or value is None:
        return None
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "latest"):
        return "latest"
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "none", ""):
        return None
    return value


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from a checkpoint or run folder path (ConfigError if neither)."""
    p = os.path.abspath(path)
    if os.path.isfile(os.path.join(p, "state.json")):
        return p
    if os.path.isdir(p):
        latest = checkpoint.latest_checkpoint(p)
        if latest is not None:
            return latest
    raise ConfigError(
        f"resume: {path!r} is neither a checkpoint folder (with state.json) nor a run folder with checkpoints"
    )


def run_of(ckpt: str) -> str:
    """The run folder of a checkpoint folder (…/run/checkpoints/step-N)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))


def _step_of(ckpt: str) -> int:
    return int(os.path.basename(ckpt).split("-")[1])


def describe(out_dir: str) -> str:
    names = sorted(os.listdir(out_dir))
    n_ck = len(checkpoint.list_checkpoints(out_dir))
    bits = [f"{n_ck} checkpoint(s)"] if n_ck else []
    bits += [n for n in names if n not in ("checkpoints",)]
    return ", ".join(bits)


def prepare(cfg, say) -> tuple[str, str | None]:
    """(absolute output_dir, checkpoint to resume from or None), the folder made ready by the policy."""
    out = os.path.abspath(cfg.output_dir)
    if cfg.resume is not None and cfg.overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the run, or start it afresh")
    if cfg.resume is not None and cfg.init_adapter is not None:
        raise ConfigError("init_adapter starts a fresh run; a resumed run continues its own adapter")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    has_run = any(e not in PRE_RUN_ENTRIES for e in entries)
    if cfg.resume is None:
        if has_run:
            foreign = [e for e in entries if e not in RUN_ENTRIES]
            if foreign:
                raise ConfigError(
                    f"output_dir {cfg.output_dir!r} is not empty and holds files a run does not write "
                    f"({', '.join(foreign[:5])}); choose another output_dir"
                )
            if not cfg.overwrite:
                raise ConfigError(
                    f"output_dir {cfg.output_dir!r} holds a previous run ({describe(out)}); pass --resume to "
                    "continue it or --overwrite to start afresh (its files are removed), or choose another output_dir"
                )
            gone = [e for e in entries if e not in KEPT_ON_OVERWRITE]
            what = describe(out)
            for e in gone:
                p = os.path.join(out, e)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            say(f"output_dir {cfg.output_dir}: --overwrite: removed the previous run ({what}); starting afresh")
        return out, None
    if cfg.resume == "latest":
        ck = checkpoint.latest_checkpoint(out)
        if ck is None:
            raise ConfigError(f"resume: no checkpoint in {os.path.join(out, 'checkpoints')}")
        return out, ck
    ck = resolve_checkpoint(cfg.resume)
    if run_of(ck) == out:
        later = [c for c in checkpoint.list_checkpoints(out) if _step_of(c) > _step_of(ck)]
        if later:
            aside = os.path.join(checkpoint.checkpoints_dir(out), "abandoned-" + time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(aside)
            for c in later:
                os.rename(c, os.path.join(aside, os.path.basename(c)))
            say(
                f"resume from {os.path.basename(ck)}: the later checkpoint(s) "
                f"{', '.join(os.path.basename(c) for c in later)} (another trajectory) moved to {aside}"
            )
        return out, ck
    if has_run:
        raise ConfigError(
            f"resume: {ck} belongs to the run {run_of(ck)}; continuing it into another output_dir needs an empty "
            f"one, and {cfg.output_dir!r} holds a run ({describe(out)})"
        )
    say(f"resume: starting the run folder {cfg.output_dir} from {ck} (a branch of the run {run_of(ck)})")
    return out, ck


def resumed_run_config(out: str, ck: str) -> str:
    """The config.yaml a resume must stay compatible with: the resumed checkpoint's run's."""
    return os.path.join(run_of(ck), "config.yaml") if run_of(ck) != out else os.path.join(out, "config.yaml")


def check_init_adapter(path: str) -> str | None:
    """A reason init_adapter cannot be used (checked before anything loads), or None."""
    if not os.path.isdir(path):
        return f"{path!r} is not a folder"
    if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        return f"{path!r} has no adapter_model.safetensors (a PEFT adapter folder, e.g. a run's adapter/)"
    return None
