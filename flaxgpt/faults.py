"""What a person sees when something fails: the root cause in one line, and one line per decision
taken.

orbax and TensorStore write and read checkpoints in background threads and coroutines, and report a
failure there as well as to their caller: absl ERROR logs with tracebacks, "Exception ignored in
<coroutine ...>", "Task exception was never retrieved", gcsfs's retry tracebacks. One full disk
printed over 300 lines that way. Within `quiet_library_reports()` (which `train()` enters; the
command-line tools call `quiet_until_exit()` where they start) those reports are dropped; the error
itself still reaches flaxgpt's code, which reports it with `describe`. FLAXGPT_VERBOSE=1 (or
--verbose on the command line) keeps them all.
"""

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from typing import Callable, Iterator

VERBOSE_VARIABLE = "FLAXGPT_VERBOSE"
LIBRARIES = ("orbax", "tensorstore", "gcsfs", "fsspec")  # whose background reports are dropped
_LOGGERS = ("absl", "asyncio", "gcsfs", "fsspec", "orbax", "tensorstore")
_TENSORSTORE_NOISE = (" [tensorstore_spec", " See full TensorStore details", " [source locations=")


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def _from_libraries(text: str) -> bool:
    """Whether text (file names, reprs, an error's message) points into LIBRARIES or is
    TensorStore's."""
    return "tensorstore" in text.lower() or " in OCDBT database" in text or any(
        f"{os.sep}{name}{os.sep}" in text or f"{os.sep}{name}." in text or f"<{name}" in text
        for name in LIBRARIES)


class _LibraryReports(logging.Filter):
    """Drops log records of warnings and errors raised inside LIBRARIES (and asyncio's reports of
    their leftover tasks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if _from_libraries(record.pathname):
            return False
        if record.name != "asyncio":
            return True
        # "Task/Future exception was never retrieved": a read orbax gave up on, its TensorStore
        # error inside
        error = record.exc_info[1] if record.exc_info else None
        return not _from_libraries(record.getMessage() + _where(None, error))


@contextlib.contextmanager
def quiet_library_reports() -> Iterator[None]:
    """Drop the libraries' own reports of failures (see the module docstring) while the block runs,
    unless FLAXGPT_VERBOSE is set."""
    undo = _drop_library_reports()
    try:
        yield
    finally:
        undo()


def quiet_until_exit() -> None:
    """`quiet_library_reports` for the rest of the program, for the command-line tools: the
    libraries' threads and coroutines may still report a failure while the interpreter shuts
    down."""
    _drop_library_reports()


def _drop_library_reports() -> Callable[[], None]:
    """Install the log filter, the unraisable hook and the thread exception hook; -> what removes
    them again."""
    if verbose():
        return lambda: None
    reports = _LibraryReports()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(reports)
    previous_hook = sys.unraisablehook

    # e.g. a TensorStore read still in flight when orbax closed its event loop
    def hook(unraisable):
        where = _where(unraisable.object, unraisable.exc_value, unraisable.exc_traceback)
        if not _from_libraries(where) and str(unraisable.exc_value) != "Event loop is closed":
            previous_hook(unraisable)

    sys.unraisablehook = hook
    previous_thread_hook = threading.excepthook

    # a library's own worker thread that died with the error its caller also gets
    def thread_hook(args):
        if not _from_libraries(_where(args.thread, args.exc_value, args.exc_traceback)):
            previous_thread_hook(args)

    threading.excepthook = thread_hook

    def undo():
        sys.unraisablehook = previous_hook
        threading.excepthook = previous_thread_hook
        for logger in loggers:
            logger.removeFilter(reports)
    return undo


def _where(source, error: BaseException | None, tb=None) -> str:
    """What tells where a report comes from: the source's repr and code file (a coroutine's or
    generator's, when its frames are gone), the traceback's files and the error's message."""
    code = getattr(source, "cr_code", None) or getattr(source, "gi_code", None)
    tb = tb if tb is not None else getattr(error, "__traceback__", None)
    return " ".join([repr(source), getattr(code, "co_filename", ""), *_frames(tb), str(error)])


def _frames(tb) -> Iterator[str]:
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename
        tb = tb.tb_next


def innermost(error: BaseException) -> BaseException:
    """The error at the bottom of a chain: orbax wraps TensorStore's and the writer's errors, and
    the innermost one says what happened."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def is_disk_full(error: BaseException) -> bool:
    """Whether any error of the chain is ENOSPC (TensorStore says so only in its message)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(error: BaseException, limit: int = 240) -> str:
    """The root cause of an error chain in one line: "disk full", or for a checkpoint array that
    cannot be read, the array and TensorStore's last word on it; else the innermost error's first
    line."""
    if is_disk_full(error):
        return "the disk is full (No space left on device)"
    cause = innermost(error)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    for noise in _TENSORSTORE_NOISE:
        text = text.split(noise)[0]
    array = re.search(r'Error (?:reading|writing) "([^"/]+)[^"]*" in OCDBT', text)
    # TensorStore: 'OUT_OF_RANGE: Error reading "h_0.attn.kernel/0.0" in ...: <what went wrong>'
    if array:
        what = text.rsplit(": ", 1)[-1]
        if re.search(r"not valid for value of size|Truncated|Unexpected end of", what, re.I):
            what = f"its data file is truncated ({what})"
        text = f"array {array.group(1)}: {what}"
    text = text if len(text) <= limit else text[:limit] + " ..."
    if text and not array:
        return f"{type(cause).__name__}: {text}"
    return text or type(cause).__name__
