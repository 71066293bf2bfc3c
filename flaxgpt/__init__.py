"""flaxgpt: nanoGPT in JAX and Flax."""

from flaxgpt.model import GPT, GPTConfig, cross_entropy_loss, count_params, init_params

__version__ = "0.1.0"
