"""Training speed: ms/step, tokens/s and MFU of a config's model and batch, measured after compilation.

    python bench.py --config=configs/shakespeare_char.py:cpu [--steps=20] [--config.key=value ...]

Batches are random tokens (the speed does not depend on the data); MFU is against the device's peak
(flaxgpt/mfu.py: a table for TPUs and NVIDIA GPUs, a measured float32 matmul on CPU).
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flaxgpt import data, mfu, optim, sharding, tokenizer
from flaxgpt.config import model_config, validate
from flaxgpt.model import count_params, flops_per_token
from flaxgpt.train_step import TrainStep

CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:cpu", "the config to time")
STEPS = flags.DEFINE_integer("steps", 20, "timed steps, after 2 warm-up steps (compilation)")
VOCAB = flags.DEFINE_integer("vocab_size", None, "vocabulary size (default: the prepared dataset's, as train.py)")


def vocab_size(config) -> int:
    """The model vocabulary train.py would use: from the prepared dataset's metadata."""
    if VOCAB.value:
        return VOCAB.value
    try:
        return tokenizer.model_vocab_size(data.load_meta(Path(config.data_dir or Path("data") / config.dataset)))
    except (OSError, ValueError) as e:
        sys.exit(f"bench.py: error: {e} (or give --vocab_size)")


def main(_):
    config = CONFIG.value
    validate(config)
    vocab = vocab_size(config)
    model = model_config(config, vocab)
    mesh = sharding.make_mesh(config.mesh)
    step_fns = TrainStep(model, optim.make_optimizer(config), mesh, seed=config.seed)
    state = step_fns.init(jax.random.key(config.seed))
    A, B, T = config.gradient_accumulation_steps, config.batch_size, model.block_size
    tokens = np.random.default_rng(0).integers(0, vocab, (A, B, T + 1), dtype=np.int32)
    x, y = (jax.device_put(a, step_fns.batch_sharding) for a in (tokens[..., :-1], tokens[..., 1:]))

    for _ in range(2):  # compile and warm up
        state, metrics = step_fns.train_fn(state, x, y)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(STEPS.value):
        state, metrics = step_fns.train_fn(state, x, y)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - start) / STEPS.value

    n_params = count_params(state.params)
    tokens_per_s = A * B * T / dt
    peak = mfu.device_peak_flops()
    utilisation = mfu.mfu(flops_per_token(model, n_params, T), tokens_per_s, jax.device_count(), peak)
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} (peak {peak / 1e12:.2f} TFLOP/s each), "
          f"mesh {dict(mesh.shape)}, dtype {model.dtype}, attention {model.attention or 'default'}")
    print(f"model: {n_params / 1e6:.2f}M params, batch {A} x {B} x {T} = {A * B * T:,} tokens/step")
    print(f"{dt * 1000:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, MFU {utilisation * 100:.1f}%")


if __name__ == "__main__":
    app.run(main)
