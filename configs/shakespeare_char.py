"""The baby GPT on tiny Shakespeare characters (nanoGPT's train_shakespeare_char.py).

`configs/shakespeare_char.py` is the GPU/TPU setting (a few minutes on one GPU, val loss ~1.47);
`configs/shakespeare_char.py:cpu` is nanoGPT's laptop setting (val loss ~1.88 after 2000 steps).
"""

from flaxgpt.config import base_config


def get_config(variant: str = "gpu"):
    c = base_config()
    c.out_dir = "out-shakespeare-char"
    c.eval_interval = 250  # we overfit, so keep an eye on val
    c.eval_iters = 200
    c.log_interval = 10
    c.always_save_checkpoint = False  # save only when val improves
    c.wandb_project = "shakespeare-char"
    c.wandb_run_name = "mini-gpt"
    c.dataset = "shakespeare_char"
    c.gradient_accumulation_steps = 1
    c.batch_size = 64
    c.block_size = 256  # context of up to 256 previous characters
    c.n_layer = 6
    c.n_head = 6
    c.n_embd = 384
    c.dropout = 0.2
    c.learning_rate = 1e-3  # with baby networks we can afford to go a bit higher
    c.max_iters = 5000
    c.lr_decay_iters = 5000  # make equal to max_iters usually
    c.min_lr = 1e-4  # learning_rate / 10 usually
    c.beta2 = 0.99  # bigger because the number of tokens per iter is small
    c.warmup_iters = 100
    if variant == "cpu":
        c.eval_iters = 20  # log_interval stays 10, as nanoGPT's
        c.block_size = 64
        c.batch_size = 12
        c.n_layer = 4
        c.n_head = 4
        c.n_embd = 128
        c.max_iters = 2000
        c.lr_decay_iters = 2000
        c.dropout = 0.0
        c.dtype = "float32"
        # 4 layers compile fast unrolled and run faster than scanned (docs/performance.md)
        c.scan_layers = False
    elif variant != "gpu":
        raise ValueError(
            f"unknown variant {variant!r} of shakespeare_char: use gpu (default) or cpu")
    return c
