"""What a person sees when something fails.

Errors: a user's mistake (`UserError`, or an OSError, ValueError, RuntimeError, ... raised by
flaxgpt's own checks) ends a command-line tool in ONE line, `<program>: error: ...`, that says what
to do; exit code 2 for a mistake in the command line (as argparse's), 1 for any other. Anything else
is unexpected (a bug, an XLA error): one line that points to the file holding its full traceback,
or with --verbose (FLAXGPT_VERBOSE=1) the traceback itself (`errors_reported`).

Library reports: orbax and TensorStore write and read checkpoints in background threads and
coroutines, and report a failure there as well as to their caller (absl ERROR logs with tracebacks,
"Exception ignored in <coroutine ...>", "coroutine ... was never awaited"). One full disk printed
over 300 lines that way. `quiet_library_reports()` (which `train()` enters) drops their ERROR
records; the command-line tools also drop, for the rest of the program (`quiet_until_exit`), their
threads' and coroutines' leftover reports. Warnings (a gcsfs retry) always show. --verbose keeps
everything.
"""

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

VERBOSE_VARIABLE = "FLAXGPT_VERBOSE"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
LIBRARIES = ("orbax", "tensorstore", "gcsfs", "fsspec")  # whose background reports are dropped
_LOGGERS = ("absl", "asyncio", "gcsfs", "fsspec", "orbax", "tensorstore")
# orbax's warnings about a checkpoint that flaxgpt reports as unreadable itself
_LIBRARY_NOISE = ("Metadata file does not exist",)
_TENSORSTORE_NOISE = (" [tensorstore_spec", " See full TensorStore details", " [source locations=")
# orbax's reads left behind when a checkpoint cannot be read: Python warns at exit
_ORBAX_COROUTINES = r"coroutine '(_read_array_index_and_device_put|_read_and_device_put)'"
# Checks raise these; raised by flaxgpt's own code they are a user's mistake, elsewhere unexpected.
CHECK_ERRORS = (ValueError, RuntimeError, FloatingPointError, ImportError)
_PACKAGE = Path(__file__).resolve().parent


class UserError(Exception):
    """A mistake the user can fix; the message says what to do."""


class UsageError(UserError):
    """A mistake in the command line: exit code 2, as argparse's."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are `UsageError`s (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(f"{message} (--help lists the options)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def is_users_mistake(error: BaseException) -> bool:
    """A UserError, any OSError (a path, a permission, a full disk), or one of CHECK_ERRORS (of the
    built-in types or flaxgpt's) raised by flaxgpt's own code; not an error of jax, XLA or a
    library."""
    if isinstance(error, (UserError, OSError)):
        return True
    if not isinstance(error, CHECK_ERRORS) or type(error).__module__.split(".")[0] not in (
            "builtins", "flaxgpt"):  # not jax's JaxRuntimeError, for one
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True  # raised where no frame was kept: by us (tests) or re-raised bare
    where = Path(frames[-1].filename).resolve()
    return where.is_relative_to(_PACKAGE) or where.parent == _PACKAGE.parent  # or the CLIs


def explain(error: BaseException) -> str:
    """A user's mistake as one line; an OSError with what to do instead of its raw errno."""
    if not isinstance(error, OSError) or error.errno is None or not error.strerror:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = error.filename or ""
    advice = {errno.EEXIST: "a file is in the way: remove it or choose another path",
              errno.ENOTDIR: "a file is in the way of a folder: remove it or choose another path",
              errno.EACCES: "no permission: choose a folder you can write to",
              errno.EPERM: "no permission: choose a folder you can write to",
              errno.EROFS: "a read-only file system: choose a folder you can write to",
              errno.ENOENT: "no such file or folder: check the path",
              errno.ENOSPC: "the disk is full: free some space or choose another disk",
              errno.EISDIR: "a folder, where a file is needed: give the file"}
    return f"{where}: {advice.get(error.errno, error.strerror)}" if where else \
        advice.get(error.errno, error.strerror)


def report(program: str, error: BaseException, verbose_: bool | None = None) -> tuple[str, int]:
    """(the last line to print, the exit code) for `error` ending `program`; the traceback goes to
    stderr (verbose) or to a file that the line names (unexpected errors)."""
    verbose_ = verbose() if verbose_ is None else verbose_
    if verbose_:
        traceback.print_exception(error)
    if is_users_mistake(error):
        code = EXIT_USAGE if isinstance(error, UsageError) else EXIT_ERROR
        return f"{program}: error: {explain(error)}", code
    line = f"{program}: error: unexpected {describe(error, 160)}"  # "TypeError: ..."
    if verbose_:
        return line, EXIT_ERROR
    try:
        fd, path = tempfile.mkstemp(prefix=f"{Path(program).stem}-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exception(error, file=f)
        return f"{line} (its traceback: {path}; --verbose prints it)", EXIT_ERROR
    except OSError:
        traceback.print_exception(error)
        return line, EXIT_ERROR


class Exit(SystemExit):
    """The end of a program with exit code `code`, its last line (already printed) kept."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_with(message: str, code: int = EXIT_USAGE):
    """End the program with `message` on stderr and exit code `code`."""
    print(message, file=sys.stderr, flush=True)
    raise Exit(message, code)


@contextlib.contextmanager
def errors_reported(program: str, verbose_: bool | None = None, interrupted: str = "interrupted",
                    exit_program: Callable[[str, int], None] = exit_with) -> Iterator[None]:
    """Run a command-line tool's body: an exception ends it as `report` says; Ctrl-C with
    `<program>: <interrupted>` and exit code 130. exit_program(message, code) ends the program."""
    try:
        yield
    except KeyboardInterrupt:
        exit_program(f"\n{program}: {interrupted}", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - every exception is reported, the unexpected ones whole
        exit_program(*report(program, e, verbose_))


def _from_libraries(text: str) -> bool:
    """Whether text (file names, reprs, an error's message) points into LIBRARIES or is
    TensorStore's."""
    return "tensorstore" in text.lower() or " in OCDBT database" in text or any(
        f"{os.sep}{name}{os.sep}" in text or f"{os.sep}{name}." in text or f"<{name}" in text
        for name in LIBRARIES)


class _LibraryReports(logging.Filter):
    """Drops ERROR records raised inside LIBRARIES, their warnings known as noise (_LIBRARY_NOISE),
    and asyncio's reports of their leftover tasks; other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if _from_libraries(record.pathname):
            return record.levelno < logging.ERROR and not record.getMessage().startswith(
                _LIBRARY_NOISE)
        if record.name != "asyncio":
            return True
        # "Task exception was never retrieved": a read orbax gave up on, TensorStore's error inside
        error = record.exc_info[1] if record.exc_info else None
        return not _from_libraries(record.getMessage() + _where(None, error))


@contextlib.contextmanager
def quiet_library_reports(hooks: bool = False) -> Iterator[None]:
    """Drop the libraries' ERROR records (see the module docstring) while the block runs, unless
    FLAXGPT_VERBOSE is set; hooks: their threads' and coroutines' reports too."""
    undo = _drop_library_reports(hooks)
    try:
        yield
    finally:
        undo()


def quiet_until_exit() -> None:
    """`quiet_library_reports(hooks=True)` for the rest of the program, for the command-line tools:
    the libraries' threads and coroutines may still report a failure while the interpreter shuts
    down."""
    _drop_library_reports(hooks=True)


def _drop_library_reports(hooks: bool) -> Callable[[], None]:
    """Install the log filter (and the unraisable and thread hooks and a warnings filter);
    -> what removes them again."""
    if verbose():
        return lambda: None
    reports = _LibraryReports()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(reports)
    previous_hook, previous_thread_hook = sys.unraisablehook, threading.excepthook
    caught = warnings.catch_warnings()

    # e.g. a TensorStore read still in flight when orbax closed its event loop
    def hook(unraisable):
        where = _where(unraisable.object, unraisable.exc_value, unraisable.exc_traceback)
        if not _from_libraries(where) and str(unraisable.exc_value) != "Event loop is closed":
            previous_hook(unraisable)

    # a library's own worker thread that died with the error its caller also gets
    def thread_hook(args):
        if not _from_libraries(_where(args.thread, args.exc_value, args.exc_traceback)):
            previous_thread_hook(args)

    if hooks:
        sys.unraisablehook, threading.excepthook = hook, thread_hook
        caught.__enter__()
        warnings.filterwarnings("ignore", _ORBAX_COROUTINES, RuntimeWarning)

    def undo():
        if hooks:
            sys.unraisablehook, threading.excepthook = previous_hook, previous_thread_hook
            caught.__exit__(None, None, None)
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
