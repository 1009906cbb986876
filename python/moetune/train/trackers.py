"""Experiment trackers (`report_to`) through accelerate's tracker classes
(accelerate.tracking: tensorboard, wandb, mlflow, comet_ml, aim, clearml,
dvclive, swanlab, trackio), used directly, without an Accelerator: the names,
the availability checks and the integrations are accelerate's, so every
tracker it knows works here the way it does under HF Trainer.

Where local files go: TensorBoard events in output_dir/tensorboard (read by
`tensorboard --logdir`); the others' local stores (wandb's offline runs,
mlflow's file store, aim's repo) under output_dir/trackers. Each tracker's own
settings come from its usual environment variables (WANDB_MODE=offline,
MLFLOW_TRACKING_URI, ...), which belong to those tools, not to moetune.

Metric names are "<kind>/<name>" (train/loss, eval/eval_loss, ...), at the
optimizer step. On resume, TensorBoard drops the events past the checkpoint's
step (purge_step) so the curves read like one run.
"""

from __future__ import annotations

import os
from typing import Any


def tracker_names() -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return list(LOGGER_TYPE_TO_CLASS)


def available() -> list[str]:
    from accelerate.tracking import get_available_trackers

    return [str(t) for t in get_available_trackers()]


def resolve(report_to: list[str], tensorboard: bool = True) -> list[str]:
    """The tracker names of `report_to` (comma-separated items split; all / none expanded);
    tensorboard=False drops tensorboard."""
    names: list[str] = []
    for item in report_to:
        for n in (x.strip() for x in item.split(",")):
            if n and n not in names:
                names.append(n)
    if "none" in names:
        names = [n for n in names if n != "none"]
    if "all" in names:
        names = [n for n in names if n != "all"] + [n for n in available() if n not in names]
    if not tensorboard:
        names = [n for n in names if n != "tensorboard"]
    return names


def check_report_to(report_to: list[str]) -> str | None:
    """A reason report_to cannot be honoured (unknown name, package missing), or None."""
    try:
        names = resolve(report_to)
        known, have = tracker_names(), available()
    except ImportError:
        return "needs accelerate (pip install accelerate)" if report_to else None
    for n in names:
        if n not in known:
            return f"unknown tracker {n!r}; known: {', '.join(known)}, all, none"
        if n not in have and n != "tensorboard":  # tensorboard (the default): a warning at start, as before
            return f"{n} is not installed here (pip install {n})"
    return None


class Trackers:
    """The run's trackers: start, log scalars per step, store the config, finish."""

    def __init__(self, names: list[str], output_dir: str, *, resume_step: int | None = None, say=print):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        if names:
            # accelerate's trackers log through its logging adapter, which needs its (process-wide,
            # single-process here) state; HF Trainer creates the same through its Accelerator.
            from accelerate.state import PartialState

            PartialState()
        run = os.path.basename(os.path.abspath(output_dir)) or "moetune"
        local = os.path.join(output_dir, "trackers")
        have = available()
        for n in names:
            if n not in have:
                say(
                    f"report_to: {n} is not installed (pip install {n if n != 'tensorboard' else 'tensorboardX'}); skipped"
                )
                continue
            cls = LOGGER_TYPE_TO_CLASS[n]
            if n == "tensorboard":
                purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
                t = cls("", logging_dir=os.path.join(output_dir, "tensorboard"), **purge)
            elif n == "mlflow":
                os.makedirs(local, exist_ok=True)
                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    # The user's own tracking server wins; otherwise mlflow's default database
                    # backend, in the run folder (its default location is the working directory).
                    import mlflow

                    mlflow.set_tracking_uri("sqlite:///" + os.path.abspath(os.path.join(local, "mlflow.db")))
                t = cls(run, logging_dir=os.path.abspath(os.path.join(local, "mlruns")))
            elif n == "wandb":
                os.makedirs(local, exist_ok=True)
                t = cls(run, dir=local)
            elif cls.requires_logging_directory:
                os.makedirs(local, exist_ok=True)
                t = cls(run, logging_dir=local)
            else:
                t = cls(run)
            t.main_process_only = False  # one process: every call runs here
            try:
                t.start()
            except Exception as e:  # a tracker that cannot start must not cost the run
                say(f"report_to: {n} did not start ({type(e).__name__}: {e}); continuing without it")
                continue
            self.trackers.append((n, t))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.trackers]

    def store_config(self, values: dict[str, Any]) -> None:
        flat = {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v)) for k, v in values.items()}
        flat = {k: ("" if v is None else v) for k, v in flat.items()}
        for _, t in self.trackers:
            t.store_init_configuration(flat)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        scalars = {
            f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if scalars:
            for _, t in self.trackers:
                t.log(scalars, step=step)

    def finish(self) -> None:
        for _, t in self.trackers:
            t.finish()
        self.trackers = []
