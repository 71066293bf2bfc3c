"""flaxgpt: nanoGPT in JAX and Flax."""

from flaxgpt.model import GPT, GPTConfig, cross_entropy_loss, count_params, init_params
from flaxgpt.pretrained import load_pretrained, save_pretrained

__version__ = "0.1.0"
