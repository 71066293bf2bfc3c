"""Evaluate pretrained GPT-2 on OpenWebText (nanoGPT's eval_gpt2*.py).

`configs/eval_gpt2.py` is gpt2 (124M); `configs/eval_gpt2.py:gpt2-medium` (and gpt2-large, gpt2-xl)
picks a bigger one. nanoGPT reports val losses of 3.11, 2.85, 2.66 and 2.56 for these four.
"""

from flaxgpt.config import base_config
from flaxgpt.model import PRESETS


def get_config(model: str = "gpt2"):
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(PRESETS)}")
    c = base_config()
    c.batch_size = 8
    c.gradient_accumulation_steps = 1
    c.eval_iters = 500  # use more iterations to get a good estimate
    c.eval_only = True
    c.init_from = model
    c.out_dir = f"out-eval-{model}"
    return c
