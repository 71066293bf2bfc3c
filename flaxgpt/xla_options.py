"""XLA compiler options flaxgpt's jitted train and eval steps compile with, per platform.

On CPU, XLA hands matrix products and some reductions to YNNPACK by default. Inside the train step of the
README's CPU model those products ran at about half the speed of XLA's own (Eigen) ones on the same shapes,
and the step is ~10% faster without YNNPACK (docs/performance.md). GPUs and TPUs keep XLA's defaults.
An option the user sets in XLA_FLAGS is left as the user set it.
"""

import os

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # an empty list: no YNNPACK fusions


def compiler_options(platform: str) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on devices of `platform` ("cpu", "gpu", "tpu")."""
    if platform != "cpu":
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in CPU_OPTIONS.items() if f"--{name}" not in user_flags}
    return options or None
