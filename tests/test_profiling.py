"""The profiler switch (flaxgpt/profiling.py)."""

import jax
import jax.numpy as jnp
import pytest

from flaxgpt.profiling import StepProfiler, parse_profile_steps


@pytest.mark.parametrize("text, expected", [("", None), ("3:5", (3, 5)), ("0:1", (0, 1))])
def test_parse(text, expected):
    assert parse_profile_steps(text) == expected


@pytest.mark.parametrize("text", ["5", "5:3", "a:b", "-1:2", "1:2:3"])
def test_parse_errors_name_the_key(text):
    with pytest.raises(ValueError, match="config.profile_steps"):
        parse_profile_steps(text)


def test_a_trace_of_the_chosen_steps_is_written(tmp_path):
    lines = []
    profiler = StepProfiler("2:4", tmp_path, lines.append)
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    for step in range(6):
        profiler.before_step(step)
        x = step_fn(x)
        profiler.after_step(step + 1, x)
    assert not profiler.tracing and lines == [f"profiled steps 2 to 3 into {tmp_path / 'profile'}"]
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
