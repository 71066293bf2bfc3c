"""What a person sees when something fails.

A user's mistake (`UserError`, or an OSError, ValueError, ... raised by flaxgpt's own checks) ends a
command-line tool in ONE line, `<program>: error: ...`, that says what to do: exit code 2 for a
command-line mistake (as argparse's), else 1. Anything unexpected (a bug, an XLA error) ends in one
line naming the file that holds its traceback, or with --verbose (FLAXGPT_VERBOSE=1) the traceback.
`quiet_library_reports` drops the ERROR reports that orbax and TensorStore make in their background
threads as well as to their caller (one full disk printed 300 lines); warnings always show.
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
_WRITABLE = "choose a folder you can write to"
_ADVICE = {errno.EEXIST: "a file is in the way: remove it or choose another path",
           errno.ENOTDIR: "a file is in the way of a folder: remove it or choose another path",
           errno.EACCES: f"no permission: {_WRITABLE}", errno.EPERM: f"no permission: {_WRITABLE}",
           errno.EROFS: f"a read-only file system: {_WRITABLE}",
           errno.ENOENT: "no such file or folder: check the path",
           errno.ENOSPC: "the disk is full: free some space or choose another disk",
           errno.EISDIR: "a folder, where a file is needed: give the file"}


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


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def explain(error: BaseException) -> str:
    """A user's mistake as one line; an OSError with what to do instead of its raw errno."""
    if not isinstance(error, OSError) or error.errno is None or not error.strerror:
        return first_line(error)
    advice = _ADVICE.get(error.errno, error.strerror)
    return f"{error.filename}: {advice}" if error.filename else advice


def report(program: str, error: BaseException, verbose_: bool | None = None) -> tuple[str, int]:
    """(the last line to print, the exit code) for `error` ending `program`; the traceback goes to
    stderr (verbose) or to a file that the line names (unexpected errors)."""
    verbose_ = verbose() if verbose_ is None else verbose_
    if verbose_:
        traceback.print_exception(error)
    if is_users_mistake(error):
        return f"{program}: error: {explain(error)}", \
            EXIT_USAGE if isinstance(error, UsageError) else EXIT_ERROR
    line = f"{program}: error: unexpected {describe(error, 160)}"  # "TypeError: ..."
    if not verbose_:
        try:
            fd, path = tempfile.mkstemp(prefix=f"{Path(program).stem}-traceback-", suffix=".txt")
            with os.fdopen(fd, "w") as f:
                traceback.print_exception(error, file=f)
            line += f" (its traceback: {path}; --verbose prints it)"
        except OSError:
            traceback.print_exception(error)
    return line, EXIT_ERROR


def exit_with(message: str, code: int = EXIT_USAGE):
    """End the program with `message` on stderr and exit code `code`."""
    print(message, file=sys.stderr, flush=True)
    stop = SystemExit(message)  # str(stop) is the message; Python exits with stop.code
    stop.code = code
    raise stop


@contextlib.contextmanager
def errors_reported(program: str, interrupted: str = "interrupted",
                    exit_program: Callable[[str, int], None] = exit_with) -> Iterator[None]:
    """Run a command-line tool's body: an exception ends it as `report` says; Ctrl-C with
    `<program>: <interrupted>` and exit code 130. exit_program(message, code) ends the program."""
    try:
        yield
    except KeyboardInterrupt:
        exit_program(f"\n{program}: {interrupted}", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - every exception is reported, the unexpected ones whole
        exit_program(*report(program, e))


def _from_libraries(text: str, source=None, error: BaseException | None = None) -> bool:
    """Whether a report points into LIBRARIES or is TensorStore's, by its text, its source's repr
    and code file (a coroutine's, whose frames are gone), its error and its traceback's files."""
    code = getattr(source, "cr_code", None) or getattr(source, "gi_code", None)
    tb = getattr(error, "__traceback__", None)
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
    text = " ".join([text, repr(source), getattr(code, "co_filename", ""), *files, str(error)])
    return "tensorstore" in text.lower() or " in OCDBT database" in text or any(
        f"{os.sep}{name}{os.sep}" in text or f"{os.sep}{name}." in text or f"<{name}" in text
        for name in LIBRARIES)


class _LibraryReports(logging.Filter):
    """Drops ERROR records raised inside LIBRARIES, their warnings known as noise (_LIBRARY_NOISE),
    and asyncio's reports of their leftover tasks; other warnings pass. One instance per
    installation, so that removing one leaves the others."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if _from_libraries(record.pathname):
            return record.levelno < logging.ERROR and not record.getMessage().startswith(
                _LIBRARY_NOISE)
        # asyncio's "Task exception was never retrieved": a read orbax gave up on
        error = record.exc_info[1] if record.exc_info else None
        return record.name != "asyncio" or not _from_libraries(record.getMessage(), error=error)


def quiet_library_reports(hooks: bool = False) -> contextlib.ExitStack:
    """Drop the libraries' ERROR records (see the module docstring) until the returned stack
    closes (`with quiet_library_reports():`), unless FLAXGPT_VERBOSE is set; hooks: also their
    threads' and coroutines' reports (the unraisable and thread hooks, a warnings filter)."""
    undo = contextlib.ExitStack()
    if verbose():
        return undo
    reports = _LibraryReports()
    for logger in map(logging.getLogger, _LOGGERS):
        logger.addFilter(reports)
        undo.callback(logger.removeFilter, reports)
    if not hooks:
        return undo
    previous, previous_thread = sys.unraisablehook, threading.excepthook

    def unraisable(u):  # e.g. a TensorStore read still in flight when orbax closed its event loop
        if not _from_libraries("", u.object, u.exc_value) and \
                str(u.exc_value) != "Event loop is closed":
            previous(u)

    def thread(args):  # a library's worker thread that died with the error its caller also gets
        if not _from_libraries("", args.thread, args.exc_value):
            previous_thread(args)

    sys.unraisablehook, threading.excepthook = unraisable, thread
    undo.callback(setattr, sys, "unraisablehook", previous)
    undo.callback(setattr, threading, "excepthook", previous_thread)
    undo.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", _ORBAX_COROUTINES, RuntimeWarning)
    return undo


def quiet_until_exit() -> None:
    """`quiet_library_reports(hooks=True)` for the rest of the program, for the command-line tools:
    the libraries' threads and coroutines may still report a failure while Python shuts down."""
    quiet_library_reports(hooks=True)  # its stack is never closed


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def innermost(error: BaseException) -> BaseException:
    """The error at the bottom of a chain: orbax wraps TensorStore's and the writer's errors, and
    the innermost one says what happened."""
    return list(_chain(error))[-1]


def is_disk_full(error: BaseException) -> bool:
    """Whether any error of the chain is ENOSPC (TensorStore says so only in its message)."""
    return any(getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
               for e in _chain(error))


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
    # TensorStore: 'OUT_OF_RANGE: Error reading "h_0.attn.kernel/0.0" in ...: <what went wrong>'
    array = re.search(r'Error (?:reading|writing) "([^"/]+)[^"]*" in OCDBT', text)
    if array:
        what = text.rsplit(": ", 1)[-1]
        if re.search(r"not valid for value of size|Truncated|Unexpected end of", what, re.I):
            what = f"its data file is truncated ({what})"
        text = f"array {array.group(1)}: {what}"
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(cause).__name__}: {text}" if text and not array else text or type(cause).__name__
