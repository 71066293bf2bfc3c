"""flaxgpt/xla_options.py: which XLA options the train and eval steps compile with, and that they apply."""

import jax
import numpy as np
import optax

from conftest import one_device_mesh
from flaxgpt import xla_options
from flaxgpt.model import GPTConfig
from flaxgpt.train_step import TrainStep

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=64)


def test_cpu_gets_the_cpu_options_and_other_platforms_xla_defaults(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
    assert xla_options.compiler_options("tpu") is None
    assert xla_options.compiler_options("gpu") is None


def test_an_option_the_user_sets_in_xla_flags_is_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                       "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert xla_options.compiler_options("cpu") is None


def test_the_cpu_train_and_eval_steps_compile_without_ynnpack_fusions(monkeypatch):
    """The same train step compiled by a plain jax.jit has YNNPACK fusions (so the check can fail)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    step = TrainStep(TINY, optax.adamw(1e-3), one_device_mesh())
    state = step.abstract_state
    batch = jax.ShapeDtypeStruct((1, 8, TINY.block_size), np.int32, sharding=step.batch_sharding)
    plain = jax.jit(step._train_step).lower(state, batch, batch).compile().as_text()
    assert "ynn_fusion" in plain
    assert "ynn_fusion" not in step.train_fn.lower(state, batch, batch).compile().as_text()
    assert "ynn_fusion" not in step.eval_fn.lower(state.params, batch, batch).compile().as_text()
