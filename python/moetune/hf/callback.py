"""moetune.hf.PlacementCallback: the placement's step boundary under HF Trainer / TRL's SFTTrainer.

    handle = moetune.hf.patch(model)                    # or model.moetune_handle after load_model
    model = peft.get_peft_model(model, lora_config)
    trainer = transformers.Trainer(..., callbacks=[moetune.hf.PlacementCallback(handle)])

on_train_begin: `handle.placement.adopt_lora(model, optimizer)` (expert LoRA parameters, and their
optimizer state, on the experts' GPU when experts may compute there); on_step_end (once per
optimizer step, after gradient accumulation): `handle.placement.end_step()`, the numbers kept in
`history` (and appended to `metrics_path` as JSON lines when given), a few of them added to the
Trainer's logs; on_train_end: the placement trace written (PlacementOptions.trace).
"""

from __future__ import annotations

import json

from transformers import TrainerCallback

# Numbers added to the Trainer's log lines (all of them are in `history` / metrics_path).
LOG_KEYS = ("placement_gpu_token_share", "placement_bytes_copied", "placement_cpu_s", "placement_gpu_s")


class PlacementCallback(TrainerCallback):
    """handle: the moetune.hf.PatchHandle (None: the trained model's `moetune_handle`, which
    load_model sets). metrics_path: optional JSON-lines file of the per-step numbers."""

    def __init__(self, handle=None, metrics_path: str | None = None):
        self.handle = handle
        self.metrics_path = metrics_path
        self.history: list[dict[str, float]] = []

    def _placement(self, model):
        handle = self.handle if self.handle is not None else getattr(model, "moetune_handle", None)
        if handle is None:
            raise ValueError(
                "moetune.hf.PlacementCallback: no patch handle (pass PlacementCallback(handle), or "
                "train a model from moetune.load_model)"
            )
        return handle.placement

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        placement = self._placement(model)
        if placement is not None:
            placement.adopt_lora(model, optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        placement = self._placement(model)
        numbers = placement.end_step() if placement is not None else {}
        if numbers:
            row = {"step": int(state.global_step), **numbers}
            self.history.append(row)
            if self.metrics_path is not None:
                with open(self.metrics_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Adds LOG_KEYS of the last step to the log line (the callbacks after this one see them)
        and to its entry in the Trainer's log_history (trainer_state.json)."""
        if logs is None or not self.history:
            return
        last = self.history[-1]
        extra = {k: last[k] for k in LOG_KEYS if k in last}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        placement = self._placement(model)
        if placement is not None:
            placement.write_trace()
