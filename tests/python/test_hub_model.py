"""Models by Hub id (issue 14): `--model org/name` and `moetune.load_model("org/name")` resolve
through huggingface_hub's local cache (laid out here by hand as the hub client lays it out:
models--org--name/{blobs, refs/main, snapshots/<commit>/ -> blobs}), HF_HUB_CACHE / HF_HUB_OFFLINE
respected; what cannot be used (not cached while offline, a dense model, a .bin-only checkpoint,
--device cuda without a GPU) is one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import torch  # noqa: E402

from moetune import cli  # noqa: E402

PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """`folder`'s files as the hub client caches repo `repo`: content in blobs/<sha256>, the
    snapshot of COMMIT as relative symlinks to them, refs/main naming COMMIT."""
    store = root / ("models--" + repo.replace("/", "--"))
    (store / "blobs").mkdir(parents=True)
    (store / "refs").mkdir()
    (store / "refs" / "main").write_text(COMMIT)
    snap = store / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (store / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / f.name)
    return snap


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moetune.train.demo_model import demo_data_path, save_demo_base

    root = tmp_path_factory.mktemp("hub")
    base = Path(save_demo_base(str(root / "base")))
    snap = hub_cache(root / "cache", "tiny-org/tiny-moe", base)
    data = root / "d.jsonl"
    with open(demo_data_path()) as f:
        data.write_text("".join(f.readlines()[:16]))
    return root, base, snap, data


@pytest.fixture
def offline_cache(tiny, monkeypatch):
    """huggingface_hub reading the test cache, offline (what HF_HUB_CACHE / HF_HUB_OFFLINE set)."""
    from huggingface_hub import constants

    root = tiny[0]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root / "cache"


def test_env_vars_reach_the_hub_client(tiny):
    """In a fresh process the hub client takes the cache and offline mode from the environment."""
    root, _, snap, _ = tiny
    env = {**os.environ, "HF_HUB_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = PY + os.pathsep + os.environ.get("PYTHONPATH", "")
    code = "from moetune.hf.hub import resolve_model; print(resolve_model('tiny-org/tiny-moe'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(snap)
    r = subprocess.run(
        [sys.executable, "-c", code.replace("tiny-moe", "absent")], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode != 0 and "HF_HUB_OFFLINE is set" in r.stderr


def test_load_model_by_hub_id_equals_the_folder(tiny, offline_cache):
    import moetune

    _, base, _, _ = tiny
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = moetune.load_model("tiny-org/tiny-moe", dtype=torch.float32, num_threads=1, progress=False)(ids).logits
        b = moetune.load_model(str(base), dtype=torch.float32, num_threads=1, progress=False)(ids).logits
    assert torch.equal(a, b)


def test_train_by_hub_id(tiny, offline_cache, tmp_path, capsys):
    _, _, snap, data = tiny
    rc = cli.main(
        [
            "train",
            "--model",
            "tiny-org/tiny-moe",
            "--data",
            str(data),
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--max-steps",
            "1",
            "--micro-batch-size",
            "4",
            "--engine-threads",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
            "--no-plot",
            "--no-tensorboard",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"model: {snap}" in out.out


def _one_line_error(capsys, argv, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_one_line_errors(tiny, offline_cache, tmp_path, capsys):
    _, base, _, data = tiny
    common = ["--data", str(data), "--output-dir", str(tmp_path / "run")]
    _one_line_error(capsys, ["train", "--model", "tiny-org/absent", *common], "is not in the local Hub cache")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    (dense / "model.safetensors").write_bytes(b"")
    line = _one_line_error(capsys, ["train", "--model", str(dense), *common], "is a 'qwen2' model")
    assert "Qwen3-MoE" in line and "PEFT" in line
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text((base / "config.json").read_text())
    (binonly / "pytorch_model.bin").write_bytes(b"\0")
    _one_line_error(capsys, ["train", "--model", str(binonly), *common], "has only PyTorch .bin weights")
    _one_line_error(capsys, ["eval", "--model", str(binonly), "--data", str(data)], "has only PyTorch .bin weights")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["train", "--model", str(base), "--device", "cuda", *common], "torch sees no CUDA GPU")
        _one_line_error(capsys, ["demo", "--device", "cuda:0"], "torch sees no CUDA GPU")
        _one_line_error(capsys, ["chat", "--device", "cuda", "--prompt", "hi"], "torch sees no CUDA GPU")
