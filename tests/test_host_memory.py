"""flaxgpt/host_memory.py: a CPU train step reuses the last step's memory instead of new pages."""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys

import pytest

from flaxgpt import host_memory

# Runs the README's CPU model's train step in a fresh process (malloc settings are per process) and
# prints whether malloc was tuned, the step's temporary buffer size and each step's page faults.
STEP_FAULTS = """
import json, resource, sys
import jax, numpy as np
from flaxgpt import host_memory, optim, sharding
from flaxgpt.config import model_config
from flaxgpt.train_step import TrainStep
import configs.shakespeare_char as shakespeare_char

if sys.argv[1] == "on":
    host_memory.keep_freed_memory()
config = shakespeare_char.get_config("cpu")
model = model_config(config, vocab_size=65)
steps = TrainStep(model, optim.make_optimizer(config),
                  sharding.make_mesh({"data": 1}, jax.devices()[:1]))
state = steps.init(jax.random.key(0))
x = jax.device_put(np.zeros((1, config.batch_size, model.block_size), np.int32),
                   steps.batch_sharding)
temp = steps.train_fn.lower(state, x, x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = steps.train_fn(state, x, x)
    jax.block_until_ready(metrics)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
applied = sys.argv[1] == "on" and host_memory.keep_freed_memory()
print(json.dumps({"applied": applied, "temp_bytes": temp, "faults": faults}))
"""
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "LD_PRELOAD")


def step_faults(setting: str) -> dict:
    """-> {"applied", "temp_bytes", "faults": per step} of a fresh process on one CPU device
    (glibc untuned)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name not in MALLOC_ENVIRONMENT}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, setting], capture_output=True,
                            text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_a_cpu_train_step_reuses_the_last_steps_pages():
    unmapped = step_faults("off")
    pages = unmapped["temp_bytes"] / resource.getpagesize()
    # Over 32 MB of temporaries: glibc alone maps the block afresh every step (this module's case).
    assert unmapped["temp_bytes"] > 32 << 20
    if statistics.median(unmapped["faults"]) < 0.5 * pages:
        pytest.skip("this glibc does not fault the block in every step (e.g. huge pages): "
                    f"{unmapped['faults']}")
    kept = step_faults("on")
    assert kept["applied"] is True
    # The first step on each of XLA's threads still faults the block in; most steps fault nothing.
    assert statistics.median(kept["faults"]) < 0.1 * pages, kept["faults"]


@pytest.mark.parametrize("variable, value",
                         [("MALLOC_ARENA_MAX", "2"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                                             ("MALLOC_PERTURB_", "1"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.check=0"),
                                             ("LD_PRELOAD",
                                              "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_malloc_settings_of_the_user_are_left_alone(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert host_memory.user_tunes_malloc()
    assert host_memory.keep_freed_memory.__wrapped__() is False


def test_nothing_is_tuned_off_glibc(monkeypatch):
    malloc_variables = [name for name in os.environ if name.startswith("MALLOC_")]
    for variable in malloc_variables + list(MALLOC_ENVIRONMENT):
        monkeypatch.delenv(variable, raising=False)
    assert not host_memory.user_tunes_malloc()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory.__wrapped__() is False
