"""GPT-2 124M on OpenWebText: nanoGPT's train_gpt2.py (~0.5M tokens per step, 600k steps).

nanoGPT runs this on 8 A100s as 12 sequences x 40 micro-steps x 1024 tokens = 480 sequences per
step; here batch_size is the micro-batch over all devices, so the same 480 are 48 x 10, which 1 to
16 devices divide (on a pod, raise batch_size and lower the accumulation so that they still multiply
to 480).
"""

from flaxgpt.config import base_config


def get_config():
    c = base_config()
    c.wandb_run_name = "gpt2-124M"
    c.batch_size = 48
    c.block_size = 1024
    c.gradient_accumulation_steps = 10
    c.max_iters = 600000
    c.lr_decay_iters = 600000
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.weight_decay = 1e-1
    return c
