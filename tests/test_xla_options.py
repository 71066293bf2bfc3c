"""flaxgpt/xla_options.py: the XLA options of the train and eval steps, and their effect."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

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


@pytest.mark.parametrize("flag", ["--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
                                  "-xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"])
def test_an_option_the_user_sets_in_xla_flags_is_left_alone(monkeypatch, flag):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {flag}")
    others = {k: v for k, v in xla_options.CPU_OPTIONS.items()
              if k != "xla_cpu_experimental_ynn_fusion_type"}
    assert xla_options.compiler_options("cpu") == others
    # another flag
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type_other=1")
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS


def test_an_option_this_jaxlib_does_not_know_is_dropped(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    known = dict(xla_options.CPU_OPTIONS)
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {**known, "xla_cpu_no_such_option": "1"})
    assert xla_options.compiler_options("cpu") == known


def test_the_cpu_train_and_eval_steps_compile_without_ynnpack_fusions_and_reduction_trees(
        monkeypatch):
    """The same train step under a plain jax.jit has both (so the check can fail)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    step = TrainStep(TINY, optax.adamw(1e-3), one_device_mesh())
    state = step.abstract_state
    batch = jax.ShapeDtypeStruct((1, 8, TINY.block_size), np.int32, sharding=step.batch_sharding)
    plain = jax.jit(step._train_step).lower(state, batch, batch).compile().as_text()
    train = step.train_fn.lower(state, batch, batch).compile().as_text()
    assert "ynn_fusion" in plain and "reduce-window(" in plain
    assert "ynn_fusion" not in train and "reduce-window(" not in train
    assert "ynn_fusion" not in step.eval_fn.lower(state.params, batch, batch).compile().as_text()


def _compile_in_a_fresh_process(cache_dir, **env_vars) -> None:
    """A process that calls use_compilation_cache(cache_dir) and compiles one small program (far
    below JAX's one second threshold: it is only cached because flaxgpt caches every program)."""
    directory = None if cache_dir is None else str(cache_dir)
    # the jitted function compiles in milliseconds
    code = ("import jax; from flaxgpt import xla_options\n"
            f"xla_options.use_compilation_cache({directory!r})\n"
            "jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()")
    # conftest's session cache
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update({k: str(v) for k, v in env_vars.items()})
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def test_the_compilation_cache_keeps_compiled_programs_where_it_is_told(tmp_path):
    _compile_in_a_fresh_process(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())


def test_jax_compilation_cache_dir_in_the_environment_wins(tmp_path):
    """The user's own cache keeps JAX's settings: the small program is not cached there unless
    they ask."""
    _compile_in_a_fresh_process(tmp_path / "ours", JAX_COMPILATION_CACHE_DIR=tmp_path / "users")
    assert not (tmp_path / "ours").exists()
    assert not (tmp_path / "users").exists() or not any((tmp_path / "users").iterdir())
    _compile_in_a_fresh_process(tmp_path / "ours", JAX_COMPILATION_CACHE_DIR=tmp_path / "users",
                                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
    assert any((tmp_path / "users").iterdir()) and not (tmp_path / "ours").exists()


def test_the_default_cache_is_under_flaxgpt_cache_and_empty_means_none(tmp_path):
    _compile_in_a_fresh_process(None, FLAXGPT_CACHE=tmp_path / "flaxgpt")
    assert any((tmp_path / "flaxgpt" / "xla").iterdir())
    _compile_in_a_fresh_process("", FLAXGPT_CACHE=tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_a_compile_time_threshold_the_user_sets_wins(tmp_path):
    _compile_in_a_fresh_process(tmp_path / "cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=60)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
