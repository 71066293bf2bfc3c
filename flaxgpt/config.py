"""The training config: nanoGPT's train.py settings as an ml_collections ConfigDict.

Config files in configs/ start from `base_config()` and change what they need; every key can be
overridden on the command line as `--config.key=value` (an unknown key or a wrong type is an error).
"""

import dataclasses

import jax
import ml_collections
from ml_collections import config_dict

from flaxgpt.model import GPTConfig
from flaxgpt.profiling import parse_profile_steps


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
    c.stall_timeout_s = 600.0  # a stall this long: hosts say why and exit (watchdog.py); 0: off
    # "scratch", "resume" (from out_dir), or a GPT-2 name / Hugging Face folder
    c.init_from = "scratch"
    c.overwrite = False  # a new run moves another run's files in out_dir to out_dir/previous/
    # logging
    c.progress = True  # a progress bar with ETA on a terminal (plain lines elsewhere)
    c.tensorboard = True  # TensorBoard scalars in out_dir/tensorboard
    c.profile_steps = ""  # "START:STOP": a jax.profiler trace of those steps in out_dir/profile
    # compiled steps for later runs ("": none); default ($FLAXGPT_CACHE or ~/.cache/flaxgpt)/xla
    c.compilation_cache_dir = config_dict.placeholder(str)
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
    # as nanoGPT trains from scratch; GPT-2 checkpoints bring their biases and tanh GELU
    c.bias = False
    c.gelu_approximate = False  # exact erf GELU
    # auto (splash on TPU, cuDNN on NVIDIA GPUs in bfloat16/float16, else xla), xla, cudnn, splash
    c.attention = "auto"
    c.scan_layers = True  # the blocks as one nn.scan: compile time stays flat as n_layer grows
    # what the backward pass keeps per block (model.py REMAT_POLICIES): none (everything), full
    # (block inputs: least memory, ~1/3 more compute), dots_saveable (matmul outputs),
    # dots_with_no_batch_dims_saveable (projections, not attention's [T, T] products)
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
    # parallelism: mesh axis sizes, -1 takes the remaining devices (see flaxgpt/sharding.py); on
    # several TPU slices data spans them. n_embd follows the model's: fsdp=-1 takes the largest
    # size that divides it (no weight replicated) and gives the other devices to data.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.mesh.n_embd = c.get_ref("n_embd")
    # multi-host (jax.distributed); auto-detected on Cloud TPU VMs and SLURM
    c.distributed = ml_collections.ConfigDict({"coordinator_address": config_dict.placeholder(str),
                                               "num_processes": config_dict.placeholder(int),
                                               "process_id": config_dict.placeholder(int)})
    c.seed = 1337
    return c


def resolve_dtype(name: str) -> str:
    """"auto": bfloat16 compute on accelerators, float32 on CPU (where bfloat16 is slower). Looks at
    the backend, so call it only after `distributed.initialize`."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_config(config: ml_collections.ConfigDict, vocab_size: int, *,
                 dtype: str | None = None) -> GPTConfig:
    """The GPTConfig a training config describes: each GPTConfig field is the config key of the same
    name, except vocab_size (the dataset's) and dtype ("auto" resolved, or `dtype` when given)."""
    fields = {f.name: config[f.name] for f in dataclasses.fields(GPTConfig) if f.name in config}
    return GPTConfig(**{**fields, "vocab_size": vocab_size,
                        "dtype": dtype or resolve_dtype(config.dtype)})


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that parse but cannot work, each naming the key. Touches no device, so it
    can run before `distributed.initialize`; the model's own settings are checked by GPTConfig."""
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if config.max_iters < 0:
        raise ValueError(f"config.max_iters must be >= 0, got {config.max_iters}")
    if config.dtype == "float16":
        raise ValueError("config.dtype='float16' would train without loss scaling, so small "
                         "gradients underflow to zero: use dtype='bfloat16' (float32's range, the "
                         "same speed on GPUs and TPUs)")
    if config.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"config.dtype={config.dtype!r}: use auto, float32 or bfloat16")
    if config.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.param_dtype={config.param_dtype!r}: use float32 or bfloat16")
    if config.stall_timeout_s < 0:
        raise ValueError(f"config.stall_timeout_s must be >= 0 (0 turns it off), got "
                         f"{config.stall_timeout_s}")
    if config.max_to_keep < 1:
        raise ValueError(f"config.max_to_keep must be at least 1, got {config.max_to_keep}")
    if config.attention == "cudnn" and config.dropout > 0:
        raise ValueError("attention='cudnn' has no attention dropout: set config.dropout=0, or use "
                         "attention='xla' (dropout then runs through a masked-softmax attention)")
    parse_profile_steps(config.profile_steps)
    # The model's own checks (heads divide the width, known attention, ...), with any vocabulary.
    model_config(config, vocab_size=1, dtype="float32" if config.dtype == "auto" else None)
