"""Issue 13, `moetune train`: option ranges checked before anything loads, --resume refuses
changed optimizer / schedule settings, a damaged latest checkpoint falls back to the previous one
(and says which file), a full disk while saving keeps the previous checkpoint and says
"no space left"."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
import torch  # noqa: E402

import moetune  # noqa: E402
from moetune.demo import DEMO_DEFAULTS  # noqa: E402
from moetune.train import checkpoint, loop  # noqa: E402
from moetune.train.config import RANGES, ConfigError, TrainConfig, field_type, make_config  # noqa: E402
from moetune.train.loop import train  # noqa: E402

PY = os.path.dirname(os.path.dirname(moetune.__file__))


@pytest.fixture
def no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model/tokenizer was loaded before the config error")

    monkeypatch.setattr(loop, "load_base", boom)
    monkeypatch.setattr(loop, "load_tokenizer", boom)


def test_every_numeric_option_has_a_range():
    numeric = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if field_type(f)[0] in ("int", "float", "list[float]") and "choices" not in f.metadata
    ]
    assert sorted(numeric) == sorted(RANGES), set(numeric) ^ set(RANGES)
    # Every default is inside its range.
    defaults = TrainConfig().to_dict()
    for name, r in RANGES.items():
        v = defaults[name]
        assert v is None or all(r.contains(x) for x in (v if isinstance(v, list) else [v])), name


BAD = [
    ("max_grad_norm", -1.0, "max_grad_norm must be > 0"),
    ("max_grad_norm", 0.0, "max_grad_norm must be > 0"),
    ("max_grad_norm", math.nan, "max_grad_norm must be > 0 and finite"),
    ("lora_alpha", 0.0, "lora_alpha must be > 0"),
    ("lora_alpha", -2.0, "lora_alpha must be > 0"),
    ("lr", math.nan, "lr must be > 0"),
    ("lr", math.inf, "lr must be > 0 and finite"),
    ("lr", 0.0, "lr must be > 0"),
    ("epochs", math.inf, "epochs must be > 0"),
    ("adam_eps", 0.0, "adam_eps must be > 0"),
    ("weight_decay", math.nan, "weight_decay must be >= 0"),
    ("eval_fraction", math.nan, r"eval_fraction must be in \[0, 1\)"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("log_every", 0, "log_every must be >= 1"),
    ("seed", -1, "seed must be >= 0"),
    ("expert_gpu_budget_gib", math.nan, "expert_gpu_budget_gib must be >= 0"),
    ("betas", [0.9, math.nan], r"betas must be two floats in \[0, 1\)"),
]


@pytest.mark.parametrize("name,value,msg", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_out_of_range_options_fail_before_loading(name, value, msg, no_loading, tmp_path):
    with pytest.raises(ConfigError, match=msg):
        make_config(None, {name: value, "output_dir": str(tmp_path / "r")}, base=DEMO_DEFAULTS)
    # Also through train() on a config edited after make_config: validate() runs first.
    cfg = make_config(None, {"output_dir": str(tmp_path / "r")}, base=DEMO_DEFAULTS)
    setattr(cfg, name, value)
    with pytest.raises(ConfigError, match=msg):
        train(cfg, say=lambda *a: None)
    assert not os.path.exists(tmp_path / "r")  # nothing written either


def test_cli_rejects_gradient_ascent():
    for flags, msg in ((["--max-grad-norm", "-1"], "max_grad_norm must be > 0"), (["--lr", "nan"], "lr must be")):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {PY!r}); from moetune.cli import main; "
                f"sys.exit(main(['train', *{flags!r}]))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and msg in r.stderr, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize(
    "change",
    [{"lr": 1e-3}, {"max_steps": 9}, {"schedule": "linear"}, {"warmup_steps": 3}, {"betas": [0.8, 0.99]}],
    ids=lambda c: next(iter(c)),
)
def test_resume_refuses_changed_optimizer_or_schedule(change, tmp_path, no_loading):
    from moetune.train.config import save_run_config

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    base = {"output_dir": str(out), "max_steps": 8, "lr": 2e-4}
    save_run_config(make_config(None, base, base=DEMO_DEFAULTS), str(out / "config.yaml"))
    before = (out / "config.yaml").read_text()
    cfg = make_config(None, {**base, **change, "resume": True}, base=DEMO_DEFAULTS)
    with pytest.raises(ConfigError, match=f"resume: these settings differ .*{next(iter(change))}: "):
        train(cfg, say=lambda *a: None)
    assert (out / "config.yaml").read_text() == before  # the saved config still tells the truth
    # Run options may change (stop_after_steps, logging).
    ok = make_config(None, {**base, "resume": True, "stop_after_steps": 1, "log_every": 3}, base=DEMO_DEFAULTS)
    from moetune.train.config import check_resume_compatible

    check_resume_compatible(ok, str(out / "config.yaml"))


# ---- real checkpoints (a few demo steps) ----

FAST = dict(
    max_steps=6,
    micro_batch_size=2,
    grad_accum=1,
    lora_rank=2,
    lora_alpha=4.0,
    warmup_steps=1,
    lr=3e-3,
    save_every=2,
    keep_checkpoints=3,
    eval_every=0,
    engine_threads=1,
    progress=False,
    tensorboard=False,
    plot=False,
    sample_prompts=[],
    max_length=32,
)


def _data(tmp_path, n=24):
    from moetune.train.demo_model import demo_data_path

    p = tmp_path / "slice.jsonl"
    p.write_text("\n".join(open(demo_data_path()).read().splitlines()[:n]) + "\n")
    return str(p)


def _cfg(out, data, **kw):
    return make_config(None, {**FAST, "output_dir": str(out), "data": data, **kw}, base=DEMO_DEFAULTS)


def _losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"train"' in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = _data(tmp)
    train(_cfg(tmp / "run", data), say=lambda *a: None)
    return data, _losses(tmp / "run")


def _truncate(path, keep=0.5):
    b = open(path, "rb").read()
    open(path, "wb").write(b[: int(len(b) * keep)])


DAMAGE = {
    "optimizer truncated": ("optimizer.pt", lambda p: _truncate(p)),
    "adapter empty": ("adapter/adapter_model.safetensors", lambda p: open(p, "wb").close()),
    "state garbled": ("state.json", lambda p: open(p, "w").write("{not json")),
    "rng missing": ("rng.pt", os.remove),
    "state wrong structure": ("state.json", lambda p: open(p, "w").write("[1, 2]")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous(case, reference, tmp_path):
    data, want = reference
    out = tmp_path / "run"
    first = train(_cfg(out, data, stop_after_steps=4), say=lambda *a: None)
    assert first["steps"] == 4
    name, damage = DAMAGE[case]
    damage(str(out / "checkpoints" / "step-00000004" / name))
    said = []
    s = train(_cfg(out, data, resume=True), say=said.append)
    text = "\n".join(said)
    assert f"step-00000004 is damaged: {name}" in text and "falling back" in text, text
    assert "resumed from" in text and "step-00000002" in text, text
    assert s["finished"] and s["steps"] == 6
    # The log is cut back to step 2; from there the trajectory is the uninterrupted one.
    assert _losses(out) == pytest.approx(want, rel=1e-6)


def test_every_checkpoint_damaged_is_a_clear_error(reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    train(_cfg(out, data, stop_after_steps=4), say=lambda *a: None)
    for ck in checkpoint.list_checkpoints(str(out)):
        _truncate(os.path.join(ck, "optimizer.pt"))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="none is intact.*step-00000002 is damaged: optimizer.pt"):
        train(_cfg(out, data, resume=True), say=lambda *a: None)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    data, _ = reference
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-00000004" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(OSError, match="checkpoint step 4 not saved: no space left .*step-00000002 is kept"):
        train(_cfg(out, data), say=lambda *a: None)
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["step-00000002"], names  # no half-written leftovers taking space
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    s = train(_cfg(out, data, resume=True), say=lambda *a: None)
    assert s["finished"]


def test_torch_writer_error_on_a_full_device_says_no_space(tmp_path, monkeypatch):
    # torch's zip writer reports a failed write as a RuntimeError without errno; the device is
    # checked for free space then.
    def save(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(checkpoint.os, "statvfs", lambda d: Full)

    class M:
        def save_pretrained(self, p):
            os.makedirs(p)

    with pytest.raises(OSError, match="no space left"):
        checkpoint.save(
            str(tmp_path),
            3,
            model=M(),
            optimizer=torch.optim.SGD([torch.zeros(1)], lr=1),
            scheduler=None,
            state={},
            keep=2,
        )
    assert os.listdir(tmp_path / "checkpoints") == []
