"""jax's plugins that cannot start, quiet: without accelerators, the CUDA plugin and libtpu
(installed to compile for GPUs and TPUs) print lines that they cannot start when jax is imported and
when it first starts its backends. `import flaxgpt` imports jax within `quiet_plugin_start_up`,
which drops those lines alone: jax chooses its platforms as it would.
"""

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

from flaxgpt.faults import verbose

# What plugins print as they fail to start: native (absl, glog) log lines, the loggers' notices
# before their first line, libtpu's lines without TPUs and its source location trace.
_START_UP_LINE = re.compile(
    rb"^([IWEF]\d{4} [\d:. ]+\d+ [\w.-]+:\d+\] |WARNING: All log messages before absl::"
    rb"|WARNING: Logging before InitGoogle\(\)|Failed to find host bounds for accelerator type"
    rb"|=== Source Location Trace: ===|[\w/.-]+\.cc:\d+\s*$)")


@contextlib.contextmanager
def quiet_plugin_start_up() -> Iterator[None]:
    """Import jax within this block: without accelerators, the plugins' start-up lines
    (_START_UP_LINE) while jax imports them and first starts its backends are dropped, and the CUDA
    plugin's "Jax plugin configuration error" records. With accelerators, or FLAXGPT_VERBOSE,
    nothing is dropped."""
    with start_up_lines_dropped():
        yield
    from jax._src import xla_bridge  # noqa: PLC0415 - jax is imported within the block
    from flaxgpt.distributed import accelerators_attached  # noqa: PLC0415 - imports jax
    if verbose() or accelerators_attached() or xla_bridge.backends_are_initialized():
        return
    logging.getLogger(xla_bridge.__name__).addFilter(lambda r: not (
        r.getMessage().startswith("Jax plugin configuration error") and "cuda" in r.getMessage()))
    start_backends = xla_bridge.backends

    @functools.wraps(start_backends)
    def backends():
        if xla_bridge.backends_are_initialized():
            return start_backends()
        with start_up_lines_dropped():
            return start_backends()
    xla_bridge.backends = backends


@contextlib.contextmanager
def start_up_lines_dropped() -> Iterator[None]:
    """Capture file descriptor 2 during the block; then write back every line, less the plugins'
    start-up lines when no accelerator is attached (and FLAXGPT_VERBOSE is not set). Also around
    what starts a plugin later: a TPU or GPU topology described to compile for."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to capture
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().splitlines(keepends=True)
            from flaxgpt.distributed import accelerators_attached  # noqa: PLC0415 - imports jax
            if not verbose() and not accelerators_attached():
                lines = [line for line in lines if not _START_UP_LINE.match(line)]
            os.write(2, b"".join(lines))
