"""The training config: nanoGPT's train.py settings as an ml_collections ConfigDict.

Config files in configs/ start from `base_config()` and change what they need; every key can be
overridden on the command line as `--config.key=value` (an unknown key or a wrong type is an error).
"""

import ml_collections
from ml_collections import config_dict

from flaxgpt.model import REMAT_POLICIES


def base_config() -> ml_collections.ConfigDict:
    """nanoGPT's defaults: GPT-2 124M on OpenWebText."""
    c = ml_collections.ConfigDict()
    # I/O
    c.out_dir = "out"
    c.eval_interval = 2000
    c.log_interval = 1
    c.eval_iters = 200
    c.eval_only = False  # evaluate once and exit
    c.always_save_checkpoint = True  # else save only when val loss improves
    c.max_to_keep = 3  # checkpoints kept in out_dir/checkpoints
    c.async_checkpointing = True
    c.init_from = "scratch"  # "scratch", "resume" (from out_dir), or a GPT-2 name / Hugging Face folder
    # logging
    c.wandb_log = False
    c.wandb_project = "owt"
    c.wandb_run_name = "gpt2"
    # data
    c.dataset = "openwebtext"
    c.data_dir = config_dict.placeholder(str)  # default: data/<dataset>
    c.gradient_accumulation_steps = 40  # micro-batches per optimizer step
    c.batch_size = 12  # sequences per micro-batch, over all devices together
    c.block_size = 1024
    # model
    c.n_layer = 12
    c.n_head = 12
    c.n_embd = 768
    c.dropout = 0.0  # 0 for pretraining, 0.1+ for finetuning
    c.bias = True
    c.gelu_approximate = True  # GPT-2's tanh GELU; False for exact erf GELU as nanoGPT's own models
    # attention: auto (splash on TPU, cuDNN on NVIDIA GPUs in bfloat16/float16, else xla), xla, cudnn, splash
    c.attention = "auto"
    c.scan_layers = True  # the blocks as one nn.scan: compile time stays flat as n_layer grows
    # rematerialisation per block, what the backward pass keeps (flaxgpt/model.py REMAT_POLICIES):
    # none (everything), full (only block inputs: least memory, ~1/3 more compute), dots_saveable
    # (matmul outputs), dots_with_no_batch_dims_saveable (projections, not attention's [T, T] products)
    c.remat = "none"
    # AdamW
    c.learning_rate = 6e-4
    c.max_iters = 600000
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0  # 0 disables
    # learning rate schedule
    c.decay_lr = True
    c.warmup_iters = 2000
    c.lr_decay_iters = 600000  # ~= max_iters per Chinchilla
    c.min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
    # precision: "auto" is bfloat16 compute on GPU/TPU and float32 on CPU; params stay float32
    c.dtype = "auto"
    c.param_dtype = "float32"
    # parallelism: mesh axis sizes, -1 takes the remaining devices (see flaxgpt/sharding.py)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # multi-host (jax.distributed); auto-detected on Cloud TPU VMs and SLURM
    c.distributed = ml_collections.ConfigDict({
        "coordinator_address": config_dict.placeholder(str),
        "num_processes": config_dict.placeholder(int),
        "process_id": config_dict.placeholder(int),
    })
    c.seed = 1337
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that parse but cannot work, each naming the key."""
    positive = ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd")
    for key in positive:
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if config.n_embd % config.n_head:
        raise ValueError(f"config.n_embd={config.n_embd} must be divisible by config.n_head={config.n_head}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"config.dropout must be in [0, 1), got {config.dropout}")
    if config.max_iters < 0:
        raise ValueError(f"config.max_iters must be >= 0, got {config.max_iters}")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"config.dtype={config.dtype!r}: use auto, float32, bfloat16 or float16")
    if config.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.param_dtype={config.param_dtype!r}: use float32 or bfloat16")
    if config.max_to_keep < 1:
        raise ValueError(f"config.max_to_keep must be at least 1, got {config.max_to_keep}")
    if config.attention == "cudnn" and config.dropout > 0:
        raise ValueError("attention='cudnn' has no attention dropout: set config.dropout=0, or use attention='xla' "
                         "(dropout then runs through a masked-softmax attention)")
    if config.attention not in ("auto", "xla", "cudnn", "splash"):
        raise ValueError(f"config.attention={config.attention!r}: use auto, xla, cudnn or splash")
    if config.remat not in REMAT_POLICIES:
        raise ValueError(f"config.remat={config.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
