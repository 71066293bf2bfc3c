"""Benchmark helpers (benchmarks/benchmarking.py): the timed loop, the model a config describes."""

import json
import time

import jax.numpy as jnp
import pytest

from configs import shakespeare_char
from benchmarks import benchmarking


def test_time_steps_runs_warmup_and_blocks():
    calls = []

    def step(state):
        calls.append(1)
        return state + 1

    state, per_step = benchmarking.time_steps(step, jnp.int32(0), steps=5, repeats=3, warmup=2)
    assert int(state) == len(calls) == 2 + 5 * 3
    assert len(per_step) == 3 and all(t > 0 for t in per_step)


def test_benchmark_model_is_the_config_model_with_the_dataset_vocabulary(tmp_path):
    config = shakespeare_char.get_config("cpu")
    config.data_dir = str(tmp_path / "shakespeare_char")
    with pytest.raises(FileNotFoundError, match="prepare.py shakespeare_char"):
        benchmarking.benchmark_model(config)
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "meta.json").write_text(
        json.dumps({"tokenizer": "char", "vocab_size": 65, "dtype": "uint16",
                    "chars": [chr(i) for i in range(65)]}))
    model = benchmarking.benchmark_model(config)
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (4, 4, 128, 64)
    assert model.vocab_size == 65 and model.gelu_approximate is False
    assert benchmarking.benchmark_model(config, vocab_size=100).vocab_size == 100


def test_median_seconds_in_turns_takes_turns_and_times_per_call():
    order = []
    runs = {"slow": lambda: (order.append("slow"), time.sleep(0.01)),
            "fast": lambda: order.append("fast")}
    seconds = benchmarking.median_seconds_in_turns(runs, repeats=2, calls=3)
    assert order == ["slow"] * 3 + ["fast"] * 3 + ["slow"] * 3 + ["fast"] * 3
    assert set(seconds) == {"slow", "fast"}
    assert 0.01 <= seconds["slow"] < 0.1 and seconds["fast"] < seconds["slow"]
