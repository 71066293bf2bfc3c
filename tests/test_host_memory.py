"""flaxgpt/host_memory.py: a CPU train step reuses the memory of the step before instead of mapping new pages."""

import json
import os
import platform
import subprocess
import sys

import pytest

from flaxgpt import host_memory

# Runs the README's CPU model's train step in a fresh process (malloc settings are per process) and prints
# the step's temporary buffer size and the page faults per step once warm.
STEP_FAULTS = """
import json, resource, sys
import jax, numpy as np
from flaxgpt import host_memory, optim, sharding
from flaxgpt.config import model_config
from flaxgpt.train_step import TrainStep
import configs.shakespeare_char as shakespeare_char

if sys.argv[1] == "off":
    host_memory.keep_freed_memory = lambda: False
config = shakespeare_char.get_config("cpu")
model = model_config(config, vocab_size=65)
steps = TrainStep(model, optim.make_optimizer(config), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
state = steps.init(jax.random.key(0))
x = jax.device_put(np.zeros((1, config.batch_size, model.block_size), np.int32), steps.batch_sharding)
temp = steps.train_fn.lower(state, x, x).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
    state, metrics = steps.train_fn(state, x, x)
jax.block_until_ready(metrics)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    state, metrics = steps.train_fn(state, x, x)
    jax.block_until_ready(metrics)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"temp_pages": temp / resource.getpagesize(), "faults_per_step": faults}))
"""


def step_faults(setting: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, setting], capture_output=True, text=True,
                            env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_a_cpu_train_step_reuses_the_last_steps_pages():
    kept, unmapped = step_faults("on"), step_faults("off")
    # Over 32 MB of temporaries: glibc alone maps the block afresh every step (the case this module is for).
    assert kept["temp_pages"] * 4096 > 32 << 20
    assert unmapped["faults_per_step"] > 0.5 * unmapped["temp_pages"], unmapped
    assert kept["faults_per_step"] < 0.1 * kept["temp_pages"], kept


@pytest.mark.parametrize("variable, value", [("MALLOC_ARENA_MAX", "2"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576"),
                                             ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_malloc_settings_of_the_user_are_left_alone(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert host_memory.keep_freed_memory.__wrapped__() is False


@pytest.fixture
def untuned_environment(monkeypatch):
    for variable in (*host_memory.USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(variable, raising=False)


def test_nothing_is_tuned_off_glibc(monkeypatch, untuned_environment):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory.__wrapped__() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_glibc_takes_every_setting(untuned_environment):
    assert host_memory.keep_freed_memory.__wrapped__() is True
