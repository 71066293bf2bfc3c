"""Training speed: ms/step, tokens/s and MFU of a config's model and batch, measured after
compilation.

    python bench.py --config=configs/shakespeare_char.py:cpu [--steps=20] [--config.key=value ...]

Batches are random tokens (the speed does not depend on the data); the model's vocabulary is the
prepared dataset's, as in train.py (or --vocab_size). MFU is against the device's peak
(flaxgpt/mfu.py: a table for TPUs and NVIDIA GPUs; none on CPUs).
"""

from flaxgpt import distributed, faults, host_memory, mfu, optim, sharding  # first: quiet jax
from flaxgpt.config import validate
from flaxgpt.model import count_params
from flaxgpt.train_step import TrainStep

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import benchmarking

CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:cpu",
                                         "the config to time")
STEPS = flags.DEFINE_integer("steps", 20, "timed steps, after 2 warm-up steps (compilation)")
VOCAB = flags.DEFINE_integer("vocab_size", None,
                             "vocabulary size (default: the prepared dataset's, as train.py)")


def main(_):
    with faults.errors_reported("bench.py"):
        run(CONFIG.value)


def parse_flags(argv):
    """absl's parser, a mistake in one line."""
    try:
        return flags.FLAGS(argv)
    except AttributeError as e:  # ml_collections' error for a key the config does not have
        key = str(e).strip("\"'")
        faults.exit_with(f"bench.py: error: --config.{key}: the config has no key {key!r} (the "
                         "keys are in flaxgpt/config.py)")
    except flags.Error as e:
        faults.exit_with(f"bench.py: error: {str(e).strip().splitlines()[-1]}")


def run(config):
    distributed.use_cpu_without_accelerators()
    validate(config)
    model = benchmarking.benchmark_model(config, VOCAB.value)
    mesh = sharding.make_mesh(config.mesh)
    if jax.default_backend() == "cpu":  # as train() does
        host_memory.keep_freed_memory()
    train_step = TrainStep(model, optim.make_optimizer(config), mesh, seed=config.seed)
    state = train_step.init(jax.random.key(config.seed))
    A, B, T = config.gradient_accumulation_steps, config.batch_size, model.block_size
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (A, B, T + 1), dtype=np.int32)
    x, y = (jax.device_put(a, train_step.batch_sharding)
            for a in (tokens[..., :-1], tokens[..., 1:]))

    state, (dt,) = benchmarking.time_steps(lambda s: train_step.train_fn(s, x, y)[0], state,
                                           steps=STEPS.value)
    n_params = count_params(state.params)
    peak = mfu.device_peak_flops()
    flops = mfu.flops_per_token(model, n_params, T)
    tokens_per_s, utilisation = mfu.throughput(A * B * T, dt, flops, jax.device_count(), peak)
    peak_text = f"peak {peak / 1e12:.2f} TFLOP/s each" if peak else "no listed peak: no MFU"
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({peak_text}), "
          f"mesh {dict(mesh.shape)}, dtype {model.dtype}, attention {model.attention or 'default'}")
    print(f"model: {n_params / 1e6:.2f}M params, batch {A} x {B} x {T} = {A * B * T:,} tokens/step")
    print(f"{dt * 1000:.1f} ms/step, {tokens_per_s:,.0f} tokens/s{mfu.shown(utilisation)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
