"""GPT-2 124M on FineWeb-Edu's 10B-token sample, with build-nanogpt's settings (its train_gpt2.py).

    python prepare.py fineweb_edu      # data/fineweb_edu: ~10B GPT-2 tokens, ~20 GB
    python train.py --config=configs/fineweb_edu.py

One step is 2**19 = 524,288 tokens (64 sequences x 8 micro-batches x 1024), so 19,073 steps are one
pass over the 10B tokens; the learning rate warms up for 715 steps to 6e-4 and decays on a cosine to
10% of it. batch_size is the micro-batch over all devices: with more devices, raise it and lower the
accumulation so that they still multiply to 512 (build-nanogpt on 8 GPUs: --config.batch_size=512
--config.gradient_accumulation_steps=1). The model is build-nanogpt's GPT-2, biases and tanh GELU
included, so that its loss and HellaSwag curves compare.

HellaSwag is not evaluated during training (the loop evaluates val loss only): score a checkpoint
with `python eval_hellaswag.py --init_from=out-fineweb-edu`.
"""

from flaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-fineweb-edu"
    c.dataset = "fineweb_edu"
    c.wandb_project = "fineweb_edu"
    c.wandb_run_name = "gpt2-124M"
    c.batch_size = 64
    c.block_size = 1024
    c.gradient_accumulation_steps = 8
    c.bias = True
    c.gelu_approximate = True
    c.learning_rate = 6e-4
    c.min_lr = 6e-5
    c.warmup_iters = 715
    c.max_iters = 19073
    c.lr_decay_iters = 19073
    c.weight_decay = 0.1
    c.eval_interval = 250
    c.eval_iters = 20  # 20 x 64 x 1024 = 1.3M val tokens, as build-nanogpt
    c.log_interval = 10
    return c
