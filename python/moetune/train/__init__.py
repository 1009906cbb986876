"""`moetune train`: LoRA fine-tuning of a HF MoE checkpoint (experts on the CPU
engine) from a config, as a library:

    from moetune.train import make_config, train
    summary = train(make_config(None, {"model": "/models/qwen3-moe", "data": "chat.jsonl"}))

Modules: config (TrainConfig), data, model (loading, LoRA), loop (train),
checkpoint, metrics, report, demo_model (the embedded demo).
"""

from moetune.train.config import ConfigError, TrainConfig, make_config
from moetune.train.data import DataError
from moetune.train.loop import train

__all__ = ["ConfigError", "DataError", "TrainConfig", "make_config", "train"]
