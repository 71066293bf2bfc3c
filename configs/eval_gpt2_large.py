"""Evaluate pretrained gpt2-large on OpenWebText: configs/eval_gpt2.py with model=gpt2-large."""

from configs.eval_gpt2 import get_config as _eval_config


def get_config():
    return _eval_config("gpt2-large")
