"""How flaxgpt compiles: the XLA options of its steps per platform (on CPU: no YNNPACK fusions,
which made the train step slower, and no tree reduction rewriter, which split each reduction in
two), and the persistent cache that keeps compiled programs for the next run. docs/performance.md
says why each is so.
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


def compiler_options(platform: str, ynnpack: bool = False) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on `platform` ("cpu", "gpu", "tpu"),
    less those the user sets in XLA_FLAGS and those this jaxlib does not know. ynnpack: keep XLA's
    YNNPACK fusions (the decoding programs' weight-first products run faster with them)."""
    if platform != "cpu":
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in CPU_OPTIONS.items()
               if not re.search(rf"(^|\s)--?{name}(=|\s|$)", user_flags) and _known(name, value)
               and not (ynnpack and name == "xla_cpu_experimental_ynn_fusion_type")}
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
    (~/.cache/flaxgpt/xla), '' for no cache; a cache directory already set (by the environment or
    jax.config) wins. A local cache keeps every program, a remote one (gs://) or a threshold the
    user set keeps JAX's one second threshold."""
    if directory == "" or jax.config.jax_compilation_cache_dir:
        return
    if directory is None:
        try:
            directory = str(user_cache_dir() / "xla")
        except RuntimeError:  # no HOME and no FLAXGPT_CACHE: run without the cache
            print("no compilation cache: set FLAXGPT_CACHE or HOME to keep compiled programs",
                  file=sys.stderr)
            return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    if "://" not in directory and MIN_COMPILE_TIME_VARIABLE not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
