"""Fine-tune a pretrained GPT-2 on tiny Shakespeare (GPT-2 BPE): nanoGPT's finetune_shakespeare.py.

Prepare the data with `python prepare.py shakespeare`; --config.init_from=gpt2 for a smaller model.
"""

from flaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-shakespeare"
    c.eval_interval = 5
    c.eval_iters = 40
    c.wandb_project = "shakespeare"
    c.wandb_run_name = "ft"
    c.dataset = "shakespeare"
    c.init_from = "gpt2-xl"  # the largest GPT-2 model
    c.always_save_checkpoint = False  # only save checkpoints if the validation loss improves
    # 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter; shakespeare has 301,966
    # tokens, so 1 epoch ~= 9.2 iters
    c.batch_size = 1
    c.gradient_accumulation_steps = 32
    c.max_iters = 20
    c.learning_rate = 3e-5  # finetune at constant LR
    c.decay_lr = False
    return c
