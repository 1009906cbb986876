"""`moetune train` runs on the embedded demo model (tiny, CPU): the demo's loss
falls, --resume continues the exact trajectory, a save killed half-way leaves
the previous checkpoint usable, Ctrl-C stops with a checkpoint, and the run
folder has what it promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("datasets")

from moetune.demo import DEMO_DEFAULTS, run_demo  # noqa: E402
from moetune.train import checkpoint  # noqa: E402
from moetune.train.config import make_config  # noqa: E402
from moetune.train.loop import train  # noqa: E402

# Subprocesses import the moetune this process imported (an installed one, or the
# source tree with a dev build in it), never another copy.
PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))

# Small and quick, but with everything that carries state across a resume:
# shuffled data over an epoch boundary, dropout (RNG), warmup + cosine,
# grad accumulation, clipping, AdamW moments.
FAST = dict(
    max_steps=8,
    micro_batch_size=4,
    grad_accum=2,
    lora_rank=4,
    lora_alpha=8.0,
    lora_dropout=0.1,
    warmup_steps=2,
    lr=3e-3,
    save_every=2,
    keep_checkpoints=2,
    eval_every=4,
    engine_threads=1,
    progress=False,
    tensorboard=True,
    plot=True,
    sample_prompts=[],
    max_length=48,
)
# One epoch of the eval-split demo data is ~270 samples: use a 40-record slice so 8 steps x 8 samples wrap it.


def demo_slice(tmp_path, n=40):
    from moetune.train.demo_model import demo_data_path

    lines = open(demo_data_path()).read().splitlines()[:n]
    p = tmp_path / "slice.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def cfg_for(out, data, **kw):
    return make_config(None, {**FAST, "output_dir": str(out), "data": data, **kw}, base=DEMO_DEFAULTS)


def quiet(*a):
    pass


def losses_of(out_dir):
    recs = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r["loss"] for r in recs if r["kind"] == "train"], [r["eval_loss"] for r in recs if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = demo_slice(tmp)
    s = train(cfg_for(tmp / "run", data), say=quiet)
    return data, s, tmp / "run"


def test_run_folder_contents(reference):
    _, s, out = reference
    assert s["finished"] and s["steps"] == 8 and len(s["losses"]) == 8
    for f in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
    ):
        assert os.path.isfile(out / f), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tensorboard"))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["step-00000006", "step-00000008"]
    cfg = json.load(open(out / "adapter/adapter_config.json"))
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    summ = json.load(open(out / "summary.json"))
    assert summ["tokens"] > 0 and summ["peak_host_rss_bytes"] > 0 and 0.0 <= summ["expert_share"] <= 1.0
    _, evals = losses_of(out)
    assert len(evals) == 3  # steps 0 (start), 4 and 8


def test_resume_gives_the_same_trajectory(reference, tmp_path):
    data, ref, _ = reference
    out = tmp_path / "split"
    first = train(cfg_for(out, data, stop_after_steps=4), say=quiet)
    assert not first["finished"] and first["steps"] == 4
    second = train(cfg_for(out, data, resume=True), say=quiet)
    assert second["finished"] and second["steps"] == 8
    got, evals = losses_of(out)
    want, want_evals = losses_of(reference[2])
    assert len(got) == 8
    # Same arithmetic in the same order: expected bit-identical; 1e-6 relative leaves no room for a
    # different batch, dropout mask, LR or optimizer state (those change the loss at 1e-3 or more).
    for a, b in zip(got + evals, want + want_evals):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)


_KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from moetune.train import checkpoint
    from moetune.train.config import make_config
    from moetune.train.loop import train
    from moetune.demo import DEMO_DEFAULTS
    import json
    fast = json.loads(sys.argv[2])
    real_save = torch.save
    def save(obj, path, *a, **k):
        # Half-way through writing checkpoint step 6: part of optimizer.pt, then SIGKILL.
        if "step-00000006" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as fh:
                fh.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)
    checkpoint.torch.save = save
    train(make_config(None, fast, base=DEMO_DEFAULTS), say=lambda *a: None)
""")


def test_kill_during_save_keeps_the_previous_checkpoint(reference, tmp_path):
    data, _, ref_out = reference
    out = tmp_path / "killed"
    fast = {**FAST, "output_dir": str(out), "data": data}
    r = subprocess.run([sys.executable, "-c", _KILL, PY, json.dumps(fast)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ck = out / "checkpoints"
    names = sorted(os.listdir(ck))
    assert names[1:] == ["step-00000002", "step-00000004"] and names[0].startswith(".tmp-step-00000006-"), names
    assert os.path.getsize(ck / names[0] / "optimizer.pt") == len(b"partial")  # killed mid-write, as intended
    assert checkpoint.latest_checkpoint(str(out)).endswith("step-00000004")
    s = train(cfg_for(out, data, resume=True), say=quiet)
    assert s["finished"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(ck))
    got, _ = losses_of(out)
    want, _ = losses_of(ref_out)
    assert len(got) == 8
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)


def test_sigint_stops_with_a_checkpoint(tmp_path):
    data = demo_slice(tmp_path)
    out = tmp_path / "int"
    script = textwrap.dedent("""
        import os, signal, sys
        sys.path.insert(0, sys.argv[1])
        from moetune.train import loop
        from moetune.train.config import make_config
        from moetune.demo import DEMO_DEFAULTS
        import json
        real = loop.data.Stream.next_batch
        calls = [0]
        def next_batch(self):
            calls[0] += 1
            if calls[0] == 5:  # during step 3 (2 micro-batches per step)
                os.kill(os.getpid(), signal.SIGINT)
            return real(self)
        loop.data.Stream.next_batch = next_batch
        s = loop.train(make_config(None, json.loads(sys.argv[2]), base=DEMO_DEFAULTS), say=print)
        print("RESULT", s["steps"], s["interrupted"], s["checkpoint"])
    """)
    cfg = {**FAST, "output_dir": str(out), "data": data, "save_every": 0, "max_steps": 20}
    r = subprocess.run([sys.executable, "-c", script, PY, json.dumps(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][0].split()
    assert line[1:3] == ["3", "True"] and line[3].endswith("step-00000003"), r.stdout
    assert "Ctrl-C" in r.stdout and "--resume" in r.stdout


def test_demo_loss_falls(tmp_path):
    """The README's first command, with fewer steps: training must clearly work."""
    s = run_demo(
        {
            "output_dir": str(tmp_path / "demo"),
            "max_steps": 60,
            "eval_every": 30,
            "save_every": 0,
            "progress": False,
            "engine_threads": 2,
            "max_new_tokens": 4,
            "sample_prompts": ["What does a cow say?"],
        },
        say=quiet,
    )
    L = s["losses"]
    assert len(L) == 60 and all(l == l for l in L)
    head, tail = sum(L[:3]) / 3, sum(L[-5:]) / 5
    assert tail < 0.5 * head, (head, tail)  # observed 5.56 -> 1.49 at 60 steps
    assert s["last_eval_loss"] < s["first_eval_loss"]
    assert s["samples"][0]["before"] != s["samples"][0]["after"]
    assert os.path.isfile(tmp_path / "demo" / "adapter" / "adapter_model.safetensors")


def test_cli_demo_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetune",
            "demo",
            "--max-steps",
            "3",
            "--no-progress",
            "--output-dir",
            str(tmp_path / "d"),
            "--engine-threads",
            "2",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "before:" in out.stdout and "after:" in out.stdout and "train loss" in out.stdout


def test_packing_and_gradient_checkpointing_runs(tmp_path):
    """Non-reentrant checkpointing recomputes the same forward (engine included): the
    loss trajectory is unchanged; packed rows train too."""
    data = demo_slice(tmp_path)
    kw = dict(max_steps=3, save_every=0, eval_every=0, tensorboard=False, plot=False, packing=True, lora_dropout=0.0)
    a = train(cfg_for(tmp_path / "a", data, **kw), say=quiet)["losses"]
    b = train(cfg_for(tmp_path / "b", data, gradient_checkpointing=True, **kw), say=quiet)["losses"]
    assert len(a) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-6 * abs(y), (a, b)


def test_quantized_expert_formats_train(tmp_path):
    """expert_format reaches the engine: int8 / int4 runs start from the same LoRA and
    data, so their losses differ from bf16's (a different frozen model) but only by
    the quantization error, and they train."""
    data = demo_slice(tmp_path)
    kw = dict(max_steps=4, save_every=0, eval_every=0, tensorboard=False, plot=False, lora_dropout=0.0)
    ref = train(cfg_for(tmp_path / "bf16", data, **kw), say=quiet)["losses"]
    for fmt in ("int8", "int4"):
        got = train(cfg_for(tmp_path / fmt, data, expert_format=fmt, int4_group_size=32, **kw), say=quiet)["losses"]
        assert got != ref, fmt
        assert abs(got[0] - ref[0]) <= 0.05 * ref[0], (fmt, got, ref)
        assert got[-1] < got[0], (fmt, got)


def test_layer_split_over_devices_runs(tmp_path, monkeypatch):
    """The several-devices path end to end on the CPU: the device list is resolved to
    [cpu, cpu], so load_base builds a per-layer device map and hands it to load_model;
    training runs and matches the one-device run."""
    import torch

    from moetune.train import model as model_mod
    from moetune.train.demo_model import save_demo_base

    base = save_demo_base(str(tmp_path / "base"))
    data = demo_slice(tmp_path)
    maps = []
    real_load = __import__("moetune").load_model
    monkeypatch.setattr(
        __import__("moetune"), "load_model", lambda path, **kw: maps.append(kw["device"]) or real_load(path, **kw)
    )
    kw = dict(
        model=base,
        max_steps=2,
        save_every=0,
        eval_every=0,
        tensorboard=False,
        plot=False,
        lora_dropout=0.0,
        dtype="float32",
        device="cpu",
    )
    one = train(cfg_for(tmp_path / "one", data, **kw), say=quiet)["losses"]
    monkeypatch.setattr(model_mod, "resolve_devices", lambda cfg: [torch.device("cpu"), torch.device("cpu")])
    two = train(cfg_for(tmp_path / "two", data, **kw), say=quiet)["losses"]
    assert isinstance(maps[-1], dict) and maps[-1]["model.layers.0"] == "cpu" and "lm_head" in maps[-1]
    assert one == two


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
    reason="needs 2 CUDA devices (nvidia-h200-x2)",
)
def test_two_gpus(tmp_path):
    """Two GPUs: layers split over cuda:0 / cuda:1; trains like the CPU run."""
    from moetune.train.demo_model import save_demo_base

    base = save_demo_base(str(tmp_path / "base"))
    data = demo_slice(tmp_path)
    kw = dict(
        model=base,
        max_steps=3,
        save_every=0,
        eval_every=0,
        tensorboard=False,
        plot=False,
        lora_dropout=0.0,
        dtype="float32",
        expert_placement="cpu",
    )
    s = train(cfg_for(tmp_path / "gpu", data, device="cuda:0,cuda:1", **kw), say=quiet)
    ref = train(cfg_for(tmp_path / "cpu", data, device="cpu", **kw), say=quiet)
    assert s["peak_gpu_bytes"] > 0
    for a, b in zip(s["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (s["losses"], ref["losses"])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (GPU machine)")
def test_demo_on_cuda(tmp_path):
    """GPU machine: the non-expert part on CUDA, the experts on the CPU engine (placement cpu); the
    loss falls as on the CPU and the summary reports the GPU's peak memory."""
    s = run_demo(
        {
            "output_dir": str(tmp_path / "gpu"),
            "device": "cuda",
            "expert_placement": "cpu",
            "max_steps": 60,
            "eval_every": 0,
            "save_every": 0,
            "progress": False,
            "sample_prompts": [],
        },
        say=quiet,
    )
    L = s["losses"]
    assert sum(L[-5:]) / 5 < 0.5 * sum(L[:3]) / 3
    assert s["peak_gpu_bytes"] is not None and s["peak_gpu_bytes"] > 0


def test_cli_train_from_a_model_folder(tmp_path):
    """The non-demo path: `moetune train --model FOLDER --data FILE` (moetune.load_model);
    the adapter it writes loads into plain transformers + PEFT, and the merged export
    (--merge-export) is a plain checkpoint with the adapter model's logits."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    from moetune.train.demo_model import save_demo_base

    base = save_demo_base(str(tmp_path / "base"))
    data = demo_slice(tmp_path)
    env = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetune",
            "train",
            "--model",
            base,
            "--data",
            data,
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--micro-batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
            "--engine-threads",
            "1",
            "--merge-export",
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model: " + base in r.stdout
    adapter = tmp_path / "run" / "adapter"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    state = pm.state_dict()
    assert saved and any("experts" in k for k in saved)
    for k, v in saved.items():
        key = k.replace(".weight", ".default.weight") if k.replace(".weight", ".default.weight") in state else k
        assert torch.equal(state[key], v), k
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained (B starts at zero)
    # The merged export: plain transformers, no adapter, same logits as base + adapter.
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), "merged checkpoint differs from base + adapter"


def test_cli_int4_fits_where_bf16_would_not(tmp_path, monkeypatch):
    """Defect 1 (issue 10) through `moetune train --expert-format int4`: with exactly the host RAM
    the int4 experts need, the run trains; the bf16 default is refused before loading."""
    import torch
    from ckpt_util import host_need_besides_packed

    import moetune
    from moetune import cli
    from moetune.hf import loader
    from moetune.train.demo_model import save_demo_base

    base = save_demo_base(str(tmp_path / "base"))
    data = demo_slice(tmp_path)
    kw = dict(dtype=torch.float32, num_threads=1, progress=False, placement="cpu", check_memory=False)
    packed = moetune.load_model(base, weight_format="int4", **kw).moetune_handle.packed_bytes
    need = packed + host_need_besides_packed(base, moetune.load_model(base, **kw))
    monkeypatch.setattr(loader, "available_host_memory", lambda: need)
    argv = [
        "train",
        "--model",
        base,
        "--data",
        data,
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--max-steps",
        "1",
        "--no-progress",
        "--engine-threads",
        "1",
        "--no-tensorboard",
        "--no-plot",
        "--eval-fraction",
        "0",
    ]
    assert cli.main(argv + ["--expert-format", "int4", "--output-dir", str(tmp_path / "int4")]) == 0
    assert os.path.isfile(tmp_path / "int4" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(MemoryError, match="as bf16"):
        cli.main(argv + ["--output-dir", str(tmp_path / "bf16")])


def test_expert_cache_gives_the_same_losses(tmp_path):
    """expert_cache_dir: the first run builds and writes the int4 experts, the second
    reads every MoE layer from the cache and starts from the same losses."""
    from moetune.train.demo_model import save_demo_base

    base = save_demo_base(str(tmp_path / "base"))
    data = demo_slice(tmp_path)
    kw = dict(
        model=base,
        max_steps=2,
        save_every=0,
        eval_every=0,
        tensorboard=False,
        plot=False,
        lora_dropout=0.0,
        dtype="float32",
        device="cpu",
        expert_format="int4",
        int4_group_size=32,
        expert_cache_dir=str(tmp_path / "cache"),
    )
    said = [[], []]
    first = train(cfg_for(tmp_path / "a", data, **kw), say=said[0].append)["losses"]
    second = train(cfg_for(tmp_path / "b", data, **kw), say=said[1].append)["losses"]
    assert any(s.endswith("0 MoE layers read from it, 2 built from the checkpoint") for s in said[0]), said[0]
    assert any(s.endswith("2 MoE layers read from it, 0 built from the checkpoint") for s in said[1]), said[1]
    assert len(first) == 2 and second == first
