"""flaxgpt: nanoGPT in JAX and Flax."""

from flaxgpt.quiet_import import quiet_plugin_start_up

with quiet_plugin_start_up():  # jax's first import, without unstartable plugins' lines
    import jax  # noqa: F401

from flaxgpt.generate import Decoder, generate, generate_stream
from flaxgpt.loader import LoadedModel, load
from flaxgpt.loss import cross_entropy_loss
from flaxgpt.model import GPT, GPTConfig, count_params, init_params
from flaxgpt.pretrained import load_pretrained, save_pretrained

__version__ = "0.1.0"
