"""How flaxgpt compiles: the XLA options of its train and eval steps per platform, and the
persistent cache that keeps compiled programs for the next run.

On CPU, XLA hands matrix products and some reductions to YNNPACK by default. Inside the train step
of the README's CPU model those products ran several times slower than XLA's own (Eigen) products in
the same step, and the step is faster without YNNPACK. XLA's tree reduction rewriter also stays off
on CPU: it splits each of the step's reductions into a reduce-window and a second reduce (89 more
ops a step), and the step takes less CPU time without it, with the same loss curve
(docs/performance.md has the figures). GPUs and TPUs keep XLA's defaults. An option the user sets in XLA_FLAGS is left as the user set it, and
one this jaxlib does not know (the option is experimental) is dropped rather than failing the
compile.

The compilation cache: a run that compiles a program an earlier run compiled (same code, config,
jax and machine) loads it from disk instead, in a fraction of the compile time. In a local directory
flaxgpt caches every program (JAX alone keeps those that took over a second to compile). JAX evicts
nothing unless jax_compilation_cache_max_size is set, and writes from process 0 only (on a pod, give
a directory every host can read, e.g. a gs:// bucket).
"""

import functools
import os
import re
import sys

import jax

from flaxgpt.tokenizer import user_cache_dir

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",  # an empty list: no YNNPACK fusions
    # short reductions (LayerNorm's 128 features) as one loop, not a reduce-window tree and a reduce
    "xla_disable_hlo_passes": "tree_reduction_rewriter",
}
MIN_COMPILE_TIME_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def compiler_options(platform: str) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on `platform` ("cpu", "gpu", "tpu")."""
    if platform != "cpu":
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in CPU_OPTIONS.items()
               if not re.search(rf"(^|\s)--?{name}(=|\s|$)", user_flags) and _known(name, value)}
    return options or None


@functools.cache
def _known(name: str, value: str) -> bool:
    """Whether this jaxlib's CPU compiler accepts the option (tried on a one-op program)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(0.0).compile()
        return True
    except jax.errors.JaxRuntimeError:
        return False


def use_compilation_cache(directory: str | None) -> None:
    """Keep compiled programs in `directory` for later runs: None for $FLAXGPT_CACHE/xla
    (~/.cache/flaxgpt/xla), '' for no cache. A cache directory already set
    (JAX_COMPILATION_CACHE_DIR, or jax.config) wins, and is left to JAX's own settings.

    In a local directory of its own flaxgpt keeps every program, not only those that took JAX's
    default of a second to compile: the evaluation step and the small set-up programs compile in
    well under a second each, and a short CPU run starts sooner with all of them cached
    (docs/performance.md). A remote cache (gs://...) keeps JAX's threshold: each small program would
    be a network round trip. So does a threshold the user set
    (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS)."""
    if directory == "" or jax.config.jax_compilation_cache_dir:
        return
    if directory is None:
        try:
            directory = str(user_cache_dir() / "xla")
        except RuntimeError:  # no HOME and no FLAXGPT_CACHE: run without the cache
            print("no compilation cache: set FLAXGPT_CACHE or HOME to keep compiled programs",
                  file=sys.stderr)
            return
    # gs:// paths stay as given
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    if "://" not in directory and MIN_COMPILE_TIME_VARIABLE not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
