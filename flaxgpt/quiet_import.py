"""jax's plugins that cannot start, quiet: on a machine without accelerators, the CUDA plugin and
libtpu (installed to compile for GPUs and TPUs: the gpu-compile and tpu extras) print 6 to 30 lines
that they cannot start, when jax is imported and when it first starts its backends. `import
flaxgpt` imports jax within `quiet_plugin_start_up`, which drops those lines and changes nothing
else: every other line comes through, and jax chooses its platforms as it would.
"""

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from typing import Callable, Iterator

from flaxgpt.faults import verbose

# What plugins print as they fail to start: native (absl, glog) log lines, the loggers' notices
# before their first line, libtpu's lines without TPUs and its source location trace.
_START_UP_LINE = re.compile(
    rb"^([IWEF]\d{4} [\d:. ]+\d+ [\w.-]+:\d+\] |WARNING: All log messages before absl::"
    rb"|WARNING: Logging before InitGoogle\(\)|Failed to find host bounds for accelerator type"
    rb"|=== Source Location Trace: ===|[\w/.-]+\.cc:\d+\s*$)")


@contextlib.contextmanager
def quiet_plugin_start_up() -> Iterator[None]:
    """Import jax within this block: on a machine without accelerators, the lines that jax's
    plugins print while it imports them and while it first starts its backends (_START_UP_LINE)
    are dropped, and "Jax plugin configuration error" records of the CUDA plugin; every other line
    comes through, after the block. With accelerators, or FLAXGPT_VERBOSE, nothing is dropped."""
    with _native_lines_dropped(lambda: not _accelerators_attached()):
        yield
        from jax._src import xla_bridge  # noqa: PLC0415 - jax is imported within the block
    if verbose() or _accelerators_attached() or xla_bridge.backends_are_initialized():
        return
    logging.getLogger(xla_bridge.__name__).addFilter(_cuda_plugin_error)
    start_backends = xla_bridge.backends

    @functools.wraps(start_backends)
    def backends():
        if xla_bridge.backends_are_initialized():
            return start_backends()
        with _native_lines_dropped(lambda: True):
            return start_backends()
    xla_bridge.backends = backends


def _accelerators_attached() -> bool:
    from flaxgpt.distributed import accelerators_attached  # noqa: PLC0415 - imports jax
    return accelerators_attached()


def _cuda_plugin_error(record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith("Jax plugin configuration error")
                and "cuda" in record.getMessage())


@contextlib.contextmanager
def _native_lines_dropped(drop: Callable[[], bool]) -> Iterator[None]:
    """Capture file descriptor 2 during the block; then write back every line, less the plugins'
    start-up lines when drop() says so (all of them under FLAXGPT_VERBOSE)."""
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
            if not verbose() and drop():
                lines = [line for line in lines if not _START_UP_LINE.match(line)]
            os.write(2, b"".join(lines))
