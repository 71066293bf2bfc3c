"""How flaxgpt compiles: the XLA options of its train and eval steps per platform, and the persistent cache
that keeps compiled programs for the next run.

On CPU, XLA hands matrix products and some reductions to YNNPACK by default. Inside the train step of the
README's CPU model those products ran at about half the speed of XLA's own (Eigen) ones on the same shapes,
and the step is ~10% faster without YNNPACK (docs/performance.md). GPUs and TPUs keep XLA's defaults.
An option the user sets in XLA_FLAGS is left as the user set it.

The compilation cache: a run that compiles a program an earlier run compiled (same code, config, jax and
machine) loads it from disk instead: the README's CPU train step loads in 1.1-1.6 s instead of compiling
in 3.5-4.9 s.
"""

import os
from pathlib import Path

import jax

DEFAULT_CACHE_DIR = "~/.cache/flaxgpt/xla"

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # an empty list: no YNNPACK fusions


def compiler_options(platform: str) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on devices of `platform` ("cpu", "gpu", "tpu")."""
    if platform != "cpu":
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in CPU_OPTIONS.items() if f"--{name}" not in user_flags}
    return options or None


def use_compilation_cache(directory: str | None) -> None:
    """Keep compiled programs in `directory` (created if missing) for later runs; '' or None: no cache.

    JAX_COMPILATION_CACHE_DIR in the environment, when set, wins. Takes effect if called before the
    process first compiles (JAX sets its cache up once)."""
    if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
