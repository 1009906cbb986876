"""Run-folder checkpoints, written atomically.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  adapter/            the PEFT adapter (model.save_pretrained: a standard adapter)
  optimizer.pt        AdamW state
  scheduler.pt        LR scheduler state
  rng.pt              torch (CPU + every CUDA device) and Python `random` states
  state.json          step, data stream position, tokens so far, elapsed time
It is first written to `checkpoints/.tmp-step-NNNNNNNN-<pid>/`, flushed to disk,
then renamed into place (rename is atomic on POSIX), so a crash or kill during
a save leaves the previous checkpoint as the latest; leftovers of an
interrupted save are removed at the next save or resume. Only folders named
step-* count as checkpoints; the oldest beyond `keep` are deleted after a
successful save.

A save that fails (a full disk: the error says "no space left") removes its
temporary folder and keeps every earlier checkpoint. Resume reads a checkpoint
completely and checks it before applying any of it; a damaged latest
checkpoint (truncated or garbled file, missing key) is reported by file and
the previous intact one is used instead (load_latest_intact).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    d = checkpoints_dir(output_dir)
    if not os.path.isdir(d):
        return []
    found = sorted((int(m.group(1)), n) for n in os.listdir(d) if (m := _NAME.match(n)))
    return [os.path.join(d, n) for _, n in found]


def latest_checkpoint(output_dir: str) -> str | None:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def clean_partial(output_dir: str) -> list[str]:
    """Remove leftovers of interrupted saves; returns what was removed."""
    d = checkpoints_dir(output_dir)
    removed = []
    if os.path.isdir(d):
        for n in os.listdir(d):
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(d, n), ignore_errors=True)
                removed.append(n)
    return removed


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(output_dir: str, step: int, *, model, optimizer, scheduler, state: dict[str, Any], keep: int) -> str:
    """Write checkpoint `step` atomically; returns its path."""
    d = checkpoints_dir(output_dir)
    os.makedirs(d, exist_ok=True)
    clean_partial(output_dir)
    final = os.path.join(d, f"step-{step:08d}")
    if os.path.isdir(final):  # same step saved already (Ctrl-C right after a periodic save): same state
        return final
    tmp = os.path.join(d, f".tmp-step-{step:08d}-{os.getpid()}")
    try:
        os.makedirs(tmp)
        model.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump({"step": step, **state}, fh, indent=1)
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except (OSError, RuntimeError) as e:
        # Nothing of this save stays (the space it took is given back); earlier checkpoints
        # are untouched (old ones are removed only after a successful save).
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {prev} is kept" if prev else "there is no earlier checkpoint"
        if _out_of_space(e, d):
            raise OSError(
                errno.ENOSPC, f"checkpoint step {step} not saved: no space left on the device of {d}; {kept}"
            ) from e
        raise RuntimeError(f"checkpoint step {step} not saved ({e}); {kept}") from e
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _out_of_space(e: BaseException, d: str) -> bool:
    """A full device: ENOSPC / EDQUOT anywhere in the chain (torch's writer wraps it in a
    RuntimeError that does not say so), or no free block left on d's file system."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        st = os.statvfs(d)
        return st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        return False


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that cannot be restored; names the checkpoint and the file."""

    def __init__(self, path: str, file: str, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {file}: {reason}")
        self.path, self.file = path, file


def read(path: str) -> dict[str, Any]:
    """Every file of checkpoint `path`, read and checked, nothing applied yet:
    {"adapter", "optimizer", "scheduler", "rng", "state"}; DamagedCheckpoint names what is wrong."""
    from safetensors.torch import load_file

    def one(name, fn):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise DamagedCheckpoint(path, name, "missing")
        try:
            return fn(full)
        except Exception as e:  # any unreadable / truncated / garbled content
            raise DamagedCheckpoint(path, name, f"{type(e).__name__}: {e}") from None

    def torch_load(p):
        return torch.load(p, weights_only=False)

    def json_load(p):
        with open(p) as fh:
            return json.load(fh)

    out = {
        "adapter": one(os.path.join("adapter", "adapter_model.safetensors"), load_file),
        "optimizer": one("optimizer.pt", torch_load),
        "scheduler": one("scheduler.pt", torch_load),
        "rng": one("rng.pt", torch_load),
        "state": one("state.json", json_load),
    }
    for name, want in (("optimizer.pt", ("state", "param_groups")), ("rng.pt", ("torch", "python"))):
        got = out[name.split(".")[0]]
        if not isinstance(got, dict) or any(k not in got for k in want):
            raise DamagedCheckpoint(path, name, f"expected a dict with keys {list(want)}")
    st = out["state"]
    needed = ("step", "data", "tokens", "target_tokens", "wall_seconds")
    if not isinstance(st, dict) or any(k not in st for k in needed):
        raise DamagedCheckpoint(path, "state.json", f"expected an object with keys {list(needed)}")
    if not isinstance(out["scheduler"], dict):
        raise DamagedCheckpoint(path, "scheduler.pt", "expected a dict")
    return out


def load_latest_intact(output_dir: str, *, model, optimizer, scheduler, say) -> tuple[str, dict[str, Any]]:
    """Restores the newest checkpoint of output_dir that reads back intact (see load); a damaged
    one is reported through `say` (which file, why) and the one before it is tried. Returns
    (its path, its state.json). Raises DamagedCheckpoint if none is intact."""
    cks = list_checkpoints(output_dir)
    if not cks:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_dir(output_dir)}")
    errors = []
    for path in reversed(cks):
        try:
            return path, load(path, model=model, optimizer=optimizer, scheduler=scheduler)
        except DamagedCheckpoint as e:
            errors.append(str(e))
            say(f"resume: {e}; falling back to the previous checkpoint")
    raise DamagedCheckpoint(cks[-1], "every checkpoint", "none is intact: " + "; ".join(errors))


def load(path: str, *, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore a checkpoint into the (already built, same-config) model, optimizer
    and scheduler; sets the RNG states; returns state.json."""
    from peft.utils import set_peft_model_state_dict

    ck = read(path)  # everything read and checked first: a damaged one changes nothing
    res = set_peft_model_state_dict(model, ck["adapter"])
    missing = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"checkpoint {path}: adapter keys not in the model: {missing[:5]}")
    try:
        optimizer.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(path, "optimizer.pt", f"does not fit this optimizer: {e}") from None
    scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    return ck["state"]


def load_adapter(model, adapter_dir: str) -> int:
    """Load a PEFT adapter folder's weights into the (same-shaped) LoRA of `model` (`init_adapter`);
    every LoRA tensor of the model must be in it with its shape. Returns the tensors loaded."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from moetune.train.config import ConfigError

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    try:
        weights = load_file(path)
    except Exception as e:
        raise ConfigError(f"init_adapter: cannot read {path}: {type(e).__name__}: {e}") from None
    want = get_peft_model_state_dict(model)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ConfigError(
            f"init_adapter {adapter_dir}: its tensors do not match this model's LoRA (lora_* targets or the "
            f"model differ): missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
            f"{extra[:3]}{' ...' if len(extra) > 3 else ''}"
        )
    bad = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in want.items() if weights[k].shape != v.shape]
    if bad:
        raise ConfigError(f"init_adapter {adapter_dir}: shapes differ (lora_rank?): {'; '.join(bad[:3])}")
    set_peft_model_state_dict(model, weights)
    return len(weights)
