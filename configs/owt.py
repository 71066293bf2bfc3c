"""GPT-2 124M on OpenWebText: nanoGPT's train_gpt2.py (~0.5M tokens per step, 600k steps).

nanoGPT runs this on 8 A100s as batch 12 x 40 accumulation steps x 1024 tokens; here the same global
batch is split over whatever mesh the run has (on a pod, raise batch_size and lower the accumulation).
"""

from flaxgpt.config import base_config


def get_config():
    c = base_config()
    c.wandb_run_name = "gpt2-124M"
    c.batch_size = 12
    c.block_size = 1024
    c.gradient_accumulation_steps = 40
    c.max_iters = 600000
    c.lr_decay_iters = 600000
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.weight_decay = 1e-1
    return c
