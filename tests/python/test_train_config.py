"""`moetune train` configuration: YAML + flags (flags win), typed values,
unknown keys named with the valid ones listed, bad paths reported before any
model or tokenizer is loaded, --help documents every field with its default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("yaml")

from moetune import cli  # noqa: E402
from moetune.train import loop  # noqa: E402
from moetune.train.config import ConfigError, TrainConfig, load_yaml, make_config  # noqa: E402

# Subprocesses import the moetune this process imported (an installed one, or the
# source tree with a dev build in it), never another copy.
PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora_rnak: 8\nlr: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(str(f))
    msg = str(e.value)
    assert "'lora_rnak'" in msg and "did you mean 'lora_rank'" in msg
    assert "valid keys:" in msg and all(k in msg for k in TrainConfig.fields())
    with pytest.raises(ConfigError, match="unknown config key 'nope' in arguments"):
        make_config(None, {"nope": 1})


def test_types_and_ranges(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=r"lora_rank must be int, got 'eight'"):
        make_config(None, {"lora_rank": "eight", "output_dir": out})
    with pytest.raises(ConfigError, match=r"schedule must be one of cosine, linear, constant; got 'step'"):
        make_config(None, {"schedule": "step", "output_dir": out})
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 1"):
        make_config(None, {"micro_batch_size": 0, "output_dir": out})
    with pytest.raises(ConfigError, match=r"betas must be two floats in \[0, 1\)"):
        make_config(None, {"betas": [0.9, 1.5], "output_dir": out})
    with pytest.raises(ConfigError, match="nothing to train"):
        make_config(None, {"lora_attention": False, "lora_mlp": False, "lora_experts": False, "output_dir": out})
    c = make_config({"lr": 1, "packing": "yes", "max_steps": 3.0}, {"output_dir": out})
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.packing is True and c.max_steps == 3


def test_flags_override_the_file_and_file_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    # Relative paths in a config file resolve against the working directory (issue 14: as the
    # other fine-tuning tools and the command line do), not against the file's folder.
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    f = tmp_path / "cfg" / "c.yaml"
    f.write_text("data: d.jsonl\nlr: 0.5\nlora_rank: 4\noutput_dir: out\n")
    args = _parse(["train", "--config", str(f), "--lr", "0.25", "--no-shuffle"])
    cfg = cli.config_from_args(args)
    assert cfg.lr == 0.25 and cfg.lora_rank == 4 and cfg.shuffle is False
    assert os.path.abspath(cfg.data) == str(tmp_path / "d.jsonl")
    assert os.path.abspath(cfg.output_dir) == str(tmp_path / "out")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    f.write_text("model: m\ndata: d.jsonl\nexpert_cache_dir: cache\n")
    cfg = cli.config_from_args(_parse(["train", "--config", str(f)]))
    assert os.path.abspath(cfg.model) == str(tmp_path / "m")
    assert os.path.abspath(cfg.expert_cache_dir) == str(tmp_path / "cache")


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train")
    t.add_argument("--config")
    cli.add_config_flags(t)
    return parser.parse_args(argv)


@pytest.fixture
def no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model/tokenizer was loaded before the config error")

    monkeypatch.setattr(loop, "load_base", boom)
    monkeypatch.setattr(loop, "load_tokenizer", boom)


def test_bad_paths_fail_before_loading(tmp_path, no_loading):
    with pytest.raises(ConfigError, match=r"model: '/nonexistent/model' is not a folder"):
        make_config(None, {"model": "/nonexistent/model", "data": "x.jsonl"})
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        make_config(None, {"model": str(tmp_path / "m"), "data": "x.jsonl"})
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data: file '.*missing.jsonl' does not exist"):
        make_config(None, {"model": str(tmp_path / "m"), "data": str(tmp_path / "missing.jsonl")})
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(ConfigError, match=r"must end in .jsonl, .json or .parquet"):
        make_config(None, {"data": str(tmp_path / "d.csv")})
    with pytest.raises(ConfigError, match="a training file is required with a model"):
        make_config(None, {"model": str(tmp_path / "m")})
    with pytest.raises(ConfigError, match="merge_export needs a model folder"):
        make_config(None, {"merge_export": str(tmp_path / "merged"), "output_dir": str(tmp_path / "o")})
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="merge_export: .* exists already"):
        make_config(
            None,
            {
                "model": str(tmp_path / "m"),
                "data": str(tmp_path / "d.jsonl"),
                "merge_export": str(tmp_path),
                "output_dir": str(tmp_path / "o"),
            },
        )
    with pytest.raises(ConfigError, match="expert_cache_dir needs a model folder"):
        make_config(None, {"expert_cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="expert_cache_dir: .* exists and is not a folder"):
        make_config(
            None,
            {
                "model": str(tmp_path / "m"),
                "data": str(tmp_path / "d.jsonl"),
                "expert_cache_dir": str(tmp_path / "d.jsonl"),
                "output_dir": str(tmp_path / "o"),
            },
        )
    cfg = make_config(None, {"output_dir": str(tmp_path / "empty"), "resume": True})
    with pytest.raises(ConfigError, match="resume: no checkpoint in"):
        loop.train(cfg, say=lambda *a: None)


def test_cli_reports_config_errors_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "moetune", "train", "--model", str(tmp_path / "nope"), "--data", "x.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "moetune train: error: model:" in r.stderr and "Traceback" not in r.stderr
    h = subprocess.run(
        [sys.executable, "-m", "moetune", "train", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert h.returncode == 0
    text = " ".join(h.stdout.split())
    for name in TrainConfig.fields():
        assert "--" + name.replace("_", "-") in text, name
    assert text.count("(default:") >= len(TrainConfig.fields())
    assert "(default: 0.0002" in text and "(default: 'cosine'" in text


def test_example_config_has_only_valid_keys():
    raw = load_yaml(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train.yaml"))
    assert {"model", "data", "lora_rank", "grad_accum"} <= set(raw)


def test_resume_with_changed_settings_is_refused(tmp_path, no_loading):
    from moetune.train import checkpoint
    from moetune.train.config import save_run_config

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    save_run_config(make_config(None, {"output_dir": str(out), "lora_rank": 8}), str(out / "config.yaml"))
    assert checkpoint.latest_checkpoint(str(out)).endswith("step-00000002")
    cfg = make_config(None, {"output_dir": str(out), "lora_rank": 16, "seed": 0, "resume": True})
    with pytest.raises(ConfigError, match=r"resume: these settings differ .*lora_rank: 8 -> 16"):
        loop.train(cfg, say=lambda *a: None)


def test_device_lists(tmp_path):
    """Several GPUs: distinct cuda:N entries, only with a model folder; the layers are
    split evenly in order, embeddings first, final norm + LM head with the last layer."""
    import torch

    from moetune.train.model import layer_device_map

    out = str(tmp_path / "o")
    for bad in ("gpu", "cuda:x", "cuda:0,cpu", "cuda:0,cuda:0"):
        with pytest.raises(ConfigError, match="device"):
            make_config(None, {"device": bad, "output_dir": out})
    with pytest.raises(ConfigError, match="several GPUs need a model folder"):
        make_config(None, {"device": "cuda:0,cuda:1", "output_dir": out})
    m = layer_device_map(5, [torch.device("cuda:0"), torch.device("cuda:1")])
    assert m == {
        "": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:0",
        "model.layers.2": "cuda:0",
        "model.layers.3": "cuda:1",
        "model.layers.4": "cuda:1",
        "model.norm": "cuda:1",
        "lm_head": "cuda:1",
    }


def test_expert_and_placement_fields_follow_the_typed_options(tmp_path):
    """The config's expert / placement fields map onto ONE moetune.ExpertsOptions and one
    moetune.PlacementOptions: their defaults are those options' defaults, their choices the
    engine's value names / the placement modes, and the mapping keeps every value."""
    import moetune
    from moetune import _moetune_ext as _ext
    from moetune.placement.options import MODES
    from moetune.train.model import experts_options, placement_options

    f = TrainConfig.fields()
    o, p = moetune.ExpertsOptions(), moetune.PlacementOptions()
    assert (f["expert_format"].default, f["expert_activations"].default) == (o.weight_format, o.activations)
    assert f["int4_group_size"].default == moetune.ExpertsOptions(weight_format="int4").group_size
    assert set(f["expert_format"].metadata["choices"]) == set(_ext.WeightFormat.__members__)
    assert set(f["expert_activations"].metadata["choices"]) == set(_ext.ActivationPolicy.__members__)
    for g in f["int4_group_size"].metadata["choices"]:
        assert moetune.ExpertsOptions(weight_format="int4", group_size=g).group_size == g
    assert (f["expert_placement"].default, f["expert_gpu_budget_gib"].default, f["placement_trace"].default) == (
        p.mode,
        p.gpu_budget_gib,
        p.trace,
    )
    assert tuple(f["expert_placement"].metadata["choices"]) == MODES
    out = str(tmp_path / "o")
    assert experts_options(make_config(None, {"output_dir": out})) == o
    cfg = make_config(
        None,
        {
            "output_dir": out,
            "expert_format": "int4",
            "int4_group_size": 32,
            "expert_activations": "recompute",
            "expert_placement": "gpu",
            "expert_gpu_budget_gib": 1.5,
            "placement_trace": str(tmp_path / "t.json"),
        },
    )
    assert experts_options(cfg) == moetune.ExpertsOptions(weight_format="int4", group_size=32, activations="recompute")
    assert experts_options(make_config(None, {"output_dir": out, "expert_format": "int8"})).group_size == 0
    pl = placement_options(cfg)
    assert (pl.mode, pl.gpu_budget_gib, pl.trace) == ("gpu", 1.5, str(tmp_path / "t.json"))
    assert pl.max_tokens == cfg.micro_batch_size * cfg.max_length  # the auto budget's longest forward
    with pytest.raises(ConfigError, match="expert_placement must be one of auto, cpu, gpu"):
        make_config(None, {"output_dir": out, "expert_placement": "tpu"})
    with pytest.raises(ConfigError, match="expert_gpu_budget_gib must be >= 0"):
        make_config(None, {"output_dir": out, "expert_gpu_budget_gib": -1})
    with pytest.raises(ConfigError, match="placement_trace"):
        make_config(None, {"output_dir": out, "placement_trace": str(tmp_path)})
    # As flags, with the file's values overridden.
    import argparse

    args = argparse.ArgumentParser()
    cli.add_config_flags(args)
    ns = args.parse_args(["--expert-placement", "cpu", "--expert-gpu-budget-gib", "2", "--placement-trace", "x.json"])
    assert (ns.expert_placement, ns.expert_gpu_budget_gib, ns.placement_trace) == ("cpu", 2.0, "x.json")
