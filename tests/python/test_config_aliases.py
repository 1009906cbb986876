"""Other tools' option names in `moetune train` (issue 14): the alias table turns LLaMA-Factory /
TRL / axolotl / Unsloth keys and flags into TrainConfig fields with the same meaning, near misses
get a "did you mean", foreign keys moetune cannot honour fail with the reason, and a
LLaMA-Factory-style LoRA YAML trains with only its model and data lines changed."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("yaml")

from moetune import cli  # noqa: E402
from moetune.train import aliases  # noqa: E402
from moetune.train.config import ConfigError, TrainConfig, load_yaml, make_config  # noqa: E402


def _parse(argv):
    from moetune.commands.flags import Parser

    parser = Parser(prog="moetune")
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train")
    t.add_argument("--config")
    cli.add_config_flags(t)
    return parser.parse_args(argv)


def test_every_alias_targets_real_fields():
    fields = TrainConfig.fields()
    for key, a in aliases.ALIASES.items():
        assert key not in fields, f"{key} is a TrainConfig field and an alias"
        for target in a.target.split(", "):
            if not target.startswith("("):
                assert target in fields, f"alias {key} -> unknown field {target}"
    assert not set(aliases.IGNORED) & set(fields) and not set(aliases.REFUSED) & set(fields)


def test_yaml_aliases_mean_the_same_as_moetune_names(tmp_path):
    out = str(tmp_path / "o")
    foreign = make_config(
        {
            "learning_rate": 3e-4,
            "num_train_epochs": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 8,
            "cutoff_len": 512,
            "save_steps": 7,
            "save_total_limit": 3,
            "logging_steps": 5,
            "eval_steps": 11,
            "warmup_ratio": 0.1,
            "lr_scheduler_type": "constant_with_warmup",
            "bf16": False,
            "lora_target": "all",
            "lora_r": 4,
            "output_dir": out,
        }
    )
    native = make_config(
        {
            "lr": 3e-4,
            "epochs": 2.0,
            "micro_batch_size": 2,
            "grad_accum": 8,
            "max_length": 512,
            "save_every": 7,
            "keep_checkpoints": 3,
            "log_every": 5,
            "eval_every": 11,
            "warmup_ratio": 0.1,
            "schedule": "constant",
            "dtype": "float32",
            "lora_attention": True,
            "lora_mlp": True,
            "lora_experts": True,
            "lora_rank": 4,
            "output_dir": out,
        }
    )
    assert foreign.to_dict() == native.to_dict()
    for key in ("max_seq_length", "sequence_len"):
        assert make_config({key: 256, "output_dir": out}).max_length == 256
    assert make_config({"bf16": True, "output_dir": out}).dtype == "bfloat16"


def test_lora_target_lists(tmp_path):
    out = str(tmp_path / "o")
    c = make_config({"lora_target": "q_proj,k_proj,v_proj,o_proj", "output_dir": out})
    assert (c.lora_attention, c.lora_mlp, c.lora_experts) == (True, False, False)
    c = make_config({"lora_target_modules": ["gate_proj", "up_proj", "down_proj"], "output_dir": out})
    assert (c.lora_attention, c.lora_mlp, c.lora_experts) == (False, True, True)
    # Part of a group would silently widen to the whole group: refused, with the way out.
    with pytest.raises(ConfigError, match=r"q_proj, v_proj is part of the attention projections"):
        make_config({"lora_target": "q_proj,v_proj", "output_dir": out})
    with pytest.raises(ConfigError, match=r"lora_target: embed_tokens not known"):
        make_config({"lora_target": "embed_tokens", "output_dir": out})


def test_refused_ignored_and_conflicting_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage: sft\nfinetuning_type: lora\ntemplate: qwen3\npreprocessing_num_workers: 16\nlr: 1.0e-4\n")
    notes = []
    raw = load_yaml(str(f), notes)
    assert raw == {"lr": 1e-4, "num_proc": 16}
    assert any(n.startswith("template ignored:") for n in notes) and len(notes) == 1
    f.write_text("stage: dpo\n")
    with pytest.raises(ConfigError, match="stage 'dpo': moetune does supervised fine-tuning"):
        load_yaml(str(f))
    f.write_text("fp16: true\n")
    with pytest.raises(ConfigError, match="fp16: moetune trains in bf16"):
        load_yaml(str(f))
    f.write_text("quantization_bit: 4\n")
    with pytest.raises(ConfigError, match="expert_format"):
        load_yaml(str(f))
    f.write_text("lr: 1e-4\nlearning_rate: 2e-4\n")
    with pytest.raises(ConfigError, match="lr is given twice .*'lr' and as 'learning_rate'"):
        load_yaml(str(f))


def test_did_you_mean(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_yaml(str(f))
    f.write_text("lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        load_yaml(str(f))
    with pytest.raises(SystemExit):
        _parse(["train", "--lerning-rate", "1e-3"])
    assert "did you mean --learning-rate?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["train", "--max-stesp", "3"])
    assert "did you mean --max-steps?" in capsys.readouterr().err


def test_flag_spellings(tmp_path):
    out = str(tmp_path / "o")
    args = _parse(
        [
            "train",
            "--learning_rate",
            "5e-4",
            "--per-device-train-batch-size",
            "3",
            "--max_steps",
            "4",
            "--bf16",
            "--lr_scheduler_type",
            "linear",
            "--output_dir",
            out,
        ]
    )
    c = cli.config_from_args(args)
    assert (c.lr, c.micro_batch_size, c.max_steps, c.dtype, c.schedule) == (5e-4, 3, 4, "bfloat16", "linear")
    assert c.output_dir == out


def test_warmup_ratio_gives_the_hf_warmup(tmp_path):
    from moetune.train.loop import warmup_steps

    c = make_config({"warmup_ratio": 0.1, "output_dir": str(tmp_path / "o")})
    assert warmup_steps(c, 95) == math.ceil(9.5) == 10
    c = make_config({"warmup_ratio": 0.1, "warmup_steps": 3, "output_dir": str(tmp_path / "o")})
    assert warmup_steps(c, 95) == 3  # explicit steps win, as in HF TrainingArguments
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        make_config({"warmup_ratio": 1.5, "output_dir": str(tmp_path / "o")})


# A LoRA SFT config written the way LLaMA-Factory's examples are, for a MoE model: only
# model_name_or_path and dataset would change for a real run (here: the tiny demo checkpoint
# and a slice of the demo data, and max_steps keeps the test short). Relative paths resolve
# against the working directory, as they do in LLaMA-Factory.
LF_YAML = """\
### model
model_name_or_path: base
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: data.jsonl
template: qwen3
cutoff_len: 64
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/tiny-moe/lora/sft
logging_steps: 1
save_steps: 500
plot_loss: false
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-2
num_train_epochs: 3.0
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_llama_factory_yaml_trains(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    from moetune.train.demo_model import demo_data_path, save_demo_base

    monkeypatch.chdir(tmp_path)
    save_demo_base("base")
    with open(demo_data_path()) as f:
        (tmp_path / "data.jsonl").write_text("".join(f.readlines()[:24]))
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "qwen3moe_lora_sft.yaml").write_text(LF_YAML)
    rc = cli.main(
        ["train", "--config", "lf/qwen3moe_lora_sft.yaml", "--device", "cpu", "--engine-threads", "1", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "template ignored" in err and "max_samples ignored" in err
    run = tmp_path / "saves" / "tiny-moe" / "lora" / "sft"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    expect = dict(
        model=str(tmp_path / "base"),
        data=str(tmp_path / "data.jsonl"),
        lora_rank=8,
        lora_attention=True,
        lora_mlp=True,
        lora_experts=True,
        max_length=64,
        log_every=1,
        save_every=500,
        plot=False,
        report_to=["none"],
        overwrite=True,
        num_proc=16,
        micro_batch_size=2,
        grad_accum=2,
        lr=1e-2,
        epochs=3.0,
        max_steps=2,
        schedule="cosine",
        warmup_ratio=0.1,
        dtype="bfloat16",
        eval_fraction=0.1,
        eval_every=500,
    )
    assert {k: cfg[k] for k in expect} == expect
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and os.path.isfile(run / "adapter" / "adapter_model.safetensors")
