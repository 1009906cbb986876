"""The run folder never mixes or loses a run: a second run into a used output_dir is
refused (nothing touched), --overwrite starts afresh and says so, --resume PATH continues
from a named checkpoint (the later ones moved aside; the trajectory exactly the
uninterrupted one), or branches a new run folder from another run's checkpoint;
--init-adapter starts from an adapter; a finished run resumed reports honest figures;
the trainable-parameter count includes the expert LoRA. Plus the start-up banner and
the sample generations at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("datasets")

from moetune.demo import DEMO_DEFAULTS  # noqa: E402
from moetune.train import checkpoint  # noqa: E402
from moetune.train.config import ConfigError, make_config  # noqa: E402
from moetune.train.loop import train  # noqa: E402

FAST = dict(
    max_steps=6,
    micro_batch_size=4,
    grad_accum=1,
    lora_rank=4,
    lora_alpha=8.0,
    warmup_steps=1,
    lr=3e-3,
    save_every=2,
    keep_checkpoints=5,
    eval_every=3,
    engine_threads=1,
    progress=False,
    plot=False,
    sample_prompts=[],
    max_length=48,
    max_new_tokens=4,
)


def demo_slice(tmp_path, n=30):
    from moetune.train.demo_model import demo_data_path

    lines = open(demo_data_path()).read().splitlines()[:n]
    p = tmp_path / "slice.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def cfg_for(out, data, **kw):
    return make_config(None, {**FAST, "output_dir": str(out), "data": data, **kw}, base=DEMO_DEFAULTS)


def records(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def losses(out):
    return [r["loss"] for r in records(out) if r["kind"] == "train"]


def steps_of(out):
    return [int(os.path.basename(p).split("-")[1]) for p in checkpoint.list_checkpoints(str(out))]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = demo_slice(tmp)
    lines = []
    s = train(cfg_for(tmp / "run", data, sample_records=2), say=lines.append)
    return data, s, tmp / "run", lines


def test_a_used_output_dir_is_refused_untouched(ref, tmp_path):
    data, _, out, _ = ref
    before = {p: os.path.getmtime(p) for p in checkpoint.list_checkpoints(str(out))}
    with pytest.raises(ConfigError, match=r"holds a previous run \(3 checkpoint\(s\).*--resume.*--overwrite"):
        train(cfg_for(out, data))
    assert {p: os.path.getmtime(p) for p in checkpoint.list_checkpoints(str(out))} == before
    # the CLI: one line, exit 2
    r = subprocess.run(
        [sys.executable, "-m", "moetune.cli", "train", "--data", data, "--output-dir", str(out), "--max-steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "holds a previous run" in r.stderr
    # someone's folder (files a run does not write): refused even with --overwrite
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match=r"holds files a run does not write \(thesis.tex\)"):
        train(cfg_for(own, data, overwrite=True))
    assert (own / "thesis.tex").read_text() == "x"
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        train(cfg_for(out, data, overwrite=True, resume=True))


def test_overwrite_starts_afresh_and_says_so(ref, tmp_path):
    data, _, _, _ = ref
    out = tmp_path / "o"
    train(cfg_for(out, data, max_steps=4), say=lambda *a: None)
    assert steps_of(out) == [2, 4]
    said = []
    s = train(cfg_for(out, data, max_steps=2, overwrite=True), say=said.append)
    assert any("--overwrite: removed the previous run (2 checkpoint(s)" in l for l in said)
    assert steps_of(out) == [2] and s["checkpoint"].endswith("step-00000002")
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2]  # only this run's lines
    assert s["data"]["cache"] == "hit"  # the tokenized-data cache survived
    # A folder that only a failed start wrote to (config.yaml, data cache) is not a run: no flag needed.
    fresh = tmp_path / "failed"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("lr: 1\n")
    train(cfg_for(fresh, data, max_steps=1, save_every=0), say=lambda *a: None)


def test_resume_from_an_older_checkpoint_moves_the_later_aside(ref, tmp_path):
    import shutil

    data, s_ref, out_ref, _ = ref
    out = tmp_path / "copy"
    shutil.copytree(out_ref, out)
    said = []
    s = train(cfg_for(out, data, resume=str(out / "checkpoints" / "step-00000002")), say=said.append)
    assert any("step-00000004, step-00000006 (another trajectory) moved to" in l for l in said), said
    aside = [d for d in os.listdir(out / "checkpoints") if d.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(os.listdir(out / "checkpoints" / aside[0])) == ["step-00000004", "step-00000006"]
    assert steps_of(out) == [2, 4, 6] and s["finished"]
    got, want = losses(out), losses(out_ref)
    assert len(got) == 6 and [r["step"] for r in records(out) if r["kind"] == "train"] == list(range(1, 7))
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)


def test_resume_from_another_runs_checkpoint_branches(ref, tmp_path):
    data, _, out_ref, _ = ref
    out = tmp_path / "branch"
    said = []
    s = train(cfg_for(out, data, resume=str(out_ref / "checkpoints" / "step-00000004")), say=said.append)
    assert any("a branch of the run" in l for l in said)
    assert s["finished"] and steps_of(out) == [6]
    got, want = losses(out), losses(out_ref)
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [5, 6]
    for a, b in zip(got, want[4:]):
        assert abs(a - b) <= 1e-6 * abs(b)
    # settings the trajectory depends on are checked against the source run
    with pytest.raises(ConfigError, match="lora_rank"):
        train(cfg_for(tmp_path / "b2", data, lora_rank=8, resume=str(out_ref)))
    with pytest.raises(ConfigError, match="neither a checkpoint folder"):
        train(cfg_for(tmp_path / "b3", data, resume=str(tmp_path)))


def test_finished_run_resumed_reports_honest_figures(ref, tmp_path):
    import shutil

    data, s_ref, out_ref, _ = ref
    out = tmp_path / "again"
    shutil.copytree(out_ref, out)
    said = []
    s = train(cfg_for(out, data, resume=True), say=said.append)
    assert s["finished"] and s["steps"] == 6 and s["tokens"] == s_ref["tokens"]
    assert s["data"]["cache"] == "hit"  # --resume does not tokenize again
    assert s["expert_share"] is None and s["throughput_of"] == "the run so far"
    assert s["tokens_per_s"] == pytest.approx(
        s_ref["tokens"] / json.load(open(out_ref / "checkpoints" / "step-00000006" / "state.json"))["wall_seconds"]
    )
    line = [l for l in said if "tokens/s" in l][-1]
    assert "CPU-expert share n/a" in line and "no step ran in this invocation" in line
    assert 0.0 <= s_ref["expert_share"] <= 1.0 and s_ref["tokens_per_s"] > 0


def test_init_adapter_starts_from_its_weights(ref, tmp_path):
    data, s_ref, out_ref, _ = ref
    ev_ref = [r["eval_loss"] for r in records(out_ref) if r["kind"] == "eval"]
    s = train(cfg_for(tmp_path / "init", data, max_steps=1, init_adapter=str(out_ref / "adapter")), say=lambda *a: None)
    ev = [r["eval_loss"] for r in records(tmp_path / "init") if r["kind"] == "eval"]
    assert ev[0] == pytest.approx(ev_ref[-1], rel=1e-6)  # step 0 of the new run = the adapter's end
    assert s["steps"] == 1
    with pytest.raises(ConfigError, match=r"shapes differ \(lora_rank\?\)"):
        train(cfg_for(tmp_path / "init2", data, lora_rank=8, init_adapter=str(out_ref / "adapter")))
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        make_config(None, {"output_dir": str(tmp_path / "x"), "init_adapter": str(tmp_path)})


def test_trainable_parameters_include_the_expert_lora(ref):
    from moetune.train.demo_model import build_model, build_tokenizer

    _, s, _, lines = ref
    base = build_model(len(build_tokenizer()))
    r = FAST["lora_rank"]
    want = 0
    for layer in base.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            E, out_f, in_f = getattr(layer.mlp.experts, name).shape
            want += E * r * (in_f + out_f)  # A [r, in] and B [out, r] per expert
    tp = s["trainable_parameters"]
    assert tp["experts"] == want and tp["total"] == tp["experts"] + tp["attention"] + tp["mlp"] + tp["other"]
    assert tp["attention"] > 0 and tp["experts"] > tp["attention"]
    banner = "\n".join(lines)
    assert f"{tp['total']:,} trainable parameters" in banner and f"experts {tp['experts']:,}" in banner
    summary = json.load(open(os.path.join(s["adapter_dir"], "..", "summary.json")))
    assert summary["trainable_parameters"] == tp


def test_banner_and_sample_generations(ref):
    data, s, _, lines = ref
    text = "\n".join(lines)
    for what in ("moetune train", "2 MoE layers x 8 experts (top-2), bf16", "steps       6;", "effective batch 4"):
        assert what in text, what
    assert len(s["data_samples"]) == 2
    for d in s["data_samples"]:
        assert d["where"].startswith(data + ":") and d["reference"] and isinstance(d["generated"], str)
        assert f"sample ({d['where']})" in text


def test_resume_flag_alone_or_with_a_path(tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "moetune.cli", "train", "--output-dir", str(tmp_path / "o"), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = cli("--resume")
    assert r.returncode == 2 and "resume: no checkpoint in" in r.stderr and "Traceback" not in r.stderr
    r = cli("--resume", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "is neither a checkpoint folder" in r.stderr
    y = tmp_path / "c.yaml"
    y.write_text("resume: true\n")
    assert make_config(None, {"resume": True}).resume == "latest"
    assert make_config(None, {"resume": False}).resume is None
    r = subprocess.run(
        [sys.executable, "-m", "moetune.cli", "train", "--config", str(y), "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "resume: no checkpoint in" in r.stderr
