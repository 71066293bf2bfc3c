"""Timing for the benchmarks (bench.py, benchmarks/): one way to time steps and calls, and the
model a config describes, with the vocabulary of its prepared dataset as train.py would use.

Times are wall-clock seconds around `jax.block_until_ready`, after warm-up calls that compile.
"""

import statistics
import time
from typing import Any, Callable

import jax

from flaxgpt import data
from flaxgpt.config import model_config
from flaxgpt.model import GPTConfig


def dataset_vocab_size(config) -> int:
    """The model vocabulary train.py would use for config.dataset (from its prepared metadata)."""
    try:
        return data.model_vocab_size(config)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or give the vocabulary size)") from None


def benchmark_model(config, vocab_size: int | None = None) -> GPTConfig:
    """The GPTConfig that training with `config` builds (vocab_size: given, or the prepared
    dataset's)."""
    return model_config(config, vocab_size or dataset_vocab_size(config))


def time_steps(step: Callable[[Any], Any], state, *, steps: int, repeats: int = 1, warmup: int = 2):
    """Run `state = step(state)` warmup times, then `repeats` blocks of `steps` calls dispatched
    back to back.

    -> (the last state, [seconds per step of each block]).
    """
    for _ in range(warmup):
        state = step(state)
    jax.block_until_ready(state)
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state = step(state)
        jax.block_until_ready(state)
        per_step.append((time.perf_counter() - start) / steps)
    return state, per_step


def median_seconds_in_turns(runs: dict[Any, Callable[[], Any]], repeats: int,
                            calls: int = 1) -> dict:
    """{key: fn} -> {key: median seconds per call of fn}, over `repeats` rounds in which each fn in
    turn is called `calls` times back to back (fn returns once its work is done). Taking turns, the
    runs see the same machine: on a shared one whose speed drifts, they slow alike and their ratio
    holds."""
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[key].append((time.perf_counter() - start) / calls)
    return {key: statistics.median(t) for key, t in times.items()}


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn(), after one warm-up (compiling) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)
