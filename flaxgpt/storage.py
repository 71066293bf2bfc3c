"""Where flaxgpt reads and writes: local folders and object stores (gs://, ...) as one path type.

`path(...)` returns an `etils.epath.Path`, the path type orbax uses: a local path behaves as
`pathlib.Path`, a URL is served by fsspec (gcsfs for gs://, from `pip install "flaxgpt[gcs]"`).
Object stores have no appends or atomic renames (`atomic_output`, `local_folder` and `append` write
whole objects), cache listings (turned off) and may never answer (time-outs; a bucket that stays
dead becomes a stall, named by `waiting_calls`). docs/scaling.md ("Storage") says more.
"""

import contextlib
import functools
import os
import re
import shutil
import sys
import tempfile
import traceback
from typing import IO, Iterator

from etils import epath

from flaxgpt import faults

Path = epath.Path
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
CONNECT_TIMEOUT_S = 30
READ_TIMEOUT_S = 60  # no byte received (gcsfs), or under 1 byte/s (TensorStore), for this long


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL (gs://bucket/path, s3://...) rather than a local path."""
    return bool(_SCHEME.match(os.fspath(location)))


def path(location: str | os.PathLike) -> Path:
    """The path type for a local path or a URL ("out", "/data/owt", "gs://bucket/run")."""
    if is_remote(location):
        _configure_remote()
    return epath.Path(location)


@functools.cache
def _configure_remote() -> None:
    """No listings cache (a host would not see files another host wrote since it listed a folder)
    and request time-outs, as fsspec's defaults, which epath, orbax and JAX's cache use too; and
    TensorStore's time-outs in the environment (a value already set there wins)."""
    import fsspec.config
    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
    with contextlib.suppress(ImportError):  # aiohttp comes with gcsfs
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                        sock_read=READ_TIMEOUT_S)
        for protocol in ("gs", "gcs"):
            fsspec.config.conf[protocol].setdefault("requests_timeout", timeout)
    for name, value in (("CONNECT_TIMEOUT_SECONDS", CONNECT_TIMEOUT_S),
                        ("LOW_SPEED_TIME_SECONDS", READ_TIMEOUT_S),
                        ("LOW_SPEED_LIMIT_BYTES", 1)):
        os.environ.setdefault(f"TENSORSTORE_CURL_{name}", str(value))


def _remote_fs(location: str | os.PathLike):
    """(fsspec filesystem, its path string) of a URL."""
    import fsspec
    _configure_remote()
    return fsspec.core.url_to_fs(os.fspath(location))


def waiting_calls() -> list[str]:
    """The object-store calls the threads of this process wait in now, e.g. "cat_ranges
    gs://bucket/data/train.bin": every blocking fsspec call (gcsfs, whoever makes it) passes through
    fsspec.asyn.sync, whose frame holds the call and its path. TensorStore's are not seen."""
    sync = getattr(sys.modules.get("fsspec.asyn"), "sync", None)  # None while fsspec imports
    calls = []
    for top in sys._current_frames().values() if sync else ():
        for frame, _ in traceback.walk_stack(top):
            if frame.f_code is sync.__code__:
                func, args = frame.f_locals.get("func"), frame.f_locals.get("args") or ("",)
                target = args[0][0] if isinstance(args[0], (list, tuple)) and args[0] else args[0]
                fs = getattr(func, "__self__", None)  # gcsfs's paths lack the protocol
                where = (fs.unstrip_protocol(target) if isinstance(target, str)
                         and hasattr(fs, "unstrip_protocol") else str(target))
                calls.append(f"{getattr(func, '__name__', 'call').lstrip('_')} {where}")
    return calls


def check_reachable(location: str | os.PathLike, what: str) -> None:
    """For a URL: raise one line (OSError) if its bucket does not exist or cannot be reached with
    this machine's credentials; `what` names the setting, e.g. "--config.out_dir". Local paths
    pass."""
    if not is_remote(location):
        return
    scheme = os.fspath(location).split("://", 1)[0]
    try:
        fs, _ = _remote_fs(location)
    except (ImportError, ValueError) as e:  # no fsspec implementation for the scheme
        hint = (' pip install "flaxgpt[gcs]"' if scheme in ("gs", "gcs")
                else f" install fsspec's {scheme} support")
        raise OSError(f"{what}={location}: {scheme}:// needs a filesystem that is not installed "
                      f"({e}):{hint}") from None
    bucket = os.fspath(location).split("://", 1)[1].split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except Exception as e:  # connection, credential and permission errors of the client libraries
        said = faults.first_line(e)[:200] if str(e).strip() else ""
        raise OSError(f"{what}={location}: cannot reach {scheme}://{bucket} ({type(e).__name__}: "
                      f"{said}): check the network and this machine's "
                      "credentials (gcloud auth application-default login, or the VM's service "
                      "account)") from None
    if not exists:
        raise OSError(f"{what}={location}: the bucket {scheme}://{bucket} does not exist or this "
                      "machine's credentials cannot see it: create it (gcloud storage buckets "
                      f"create {scheme}://{bucket}) or fix the name")


@contextlib.contextmanager
def atomic_output(destination: Path) -> Iterator[IO[bytes]]:
    """A binary file to write `destination` through, which appears only if the block succeeds:
    a temporary file renamed at the end, or in a bucket uploaded at the end in one piece. On
    failure the temporary file is removed and `destination` is untouched."""
    destination = path(destination)
    if is_remote(destination):
        with local_folder(destination.parent, upload_on_error=False) as folder:
            with open(os.path.join(folder, destination.name), "wb") as f:
                yield f
        return
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, destination)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def local_folder(destination: Path, *, upload_on_error: bool = True) -> Iterator[str]:
    """The one way flaxgpt writes into a bucket: a local folder to write `destination`'s files in:
    the folder itself (created), or for a bucket a temporary folder whose files are uploaded under
    `destination` when the block ends (each object appears whole), then removed."""
    destination = path(destination)
    if not is_remote(destination):
        destination.mkdir(parents=True, exist_ok=True)
        yield os.fspath(destination)
        return
    folder = tempfile.mkdtemp(prefix=f"flaxgpt-{destination.name}-")
    try:
        yield folder
        upload(folder, destination)
    except BaseException:
        if upload_on_error:
            upload(folder, destination)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_atomically(destination: Path, data: str | bytes) -> None:
    """Write text or bytes to `destination`: readers see the old content or the new, not a part."""
    with atomic_output(destination) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def move(source: Path, destination: Path) -> None:
    """Move a file or folder (on an object store: a copy of every object, then a delete)."""
    source, destination = path(source), path(destination)
    # copy and delete: gcsfs's move first tries an API not every bucket offers
    if is_remote(source):
        fs, src = _remote_fs(source)
        fs.copy(src, _remote_fs(destination)[1], recursive=True)
        fs.rm(src, recursive=True)
    else:
        source.rename(destination)


def upload(local: str | os.PathLike, destination: Path) -> None:
    """Copy a local folder's files under `destination` (a URL), keeping their relative paths."""
    fs, target = _remote_fs(destination)
    fs.put(os.fspath(local).rstrip("/") + "/", target, recursive=True)


COMPOSE_LIMIT = 1000  # Cloud Storage composes an object of at most 1024 parts


def append(destination: Path, data: bytes) -> None:
    """Add `data` at the end of a file (created if missing). In a bucket, only `data` is uploaded:
    as an object of its own that Cloud Storage composes with the file (every COMPOSE_LIMIT appends,
    and on stores without compose, the file is written whole instead)."""
    destination = path(destination)
    if not is_remote(destination):
        with open(destination, "ab") as f:
            f.write(data)
        return
    fs, name = _remote_fs(destination)
    try:
        info = fs.info(name)
    except FileNotFoundError:
        fs.pipe_file(name, data)
        return
    if not hasattr(fs, "merge") or int(info.get("componentCount") or 1) >= COMPOSE_LIMIT:
        fs.pipe_file(name, fs.cat_file(name) + data)
    else:
        part = f"{name}.part-{os.getpid()}"
        fs.pipe_file(part, data)
        try:
            fs.merge(name, [name, part])
        finally:
            fs.rm_file(part)


def read_ranges(location: Path, starts, stops) -> list[bytes]:
    """The bytes [start, stop) of a file for each pair, read concurrently from an object store."""
    fs, name = _remote_fs(location)
    return fs.cat_ranges([name] * len(starts), [int(s) for s in starts], [int(s) for s in stops],
                         on_error="raise")


def size(location: Path) -> int:
    """The size of a file in bytes."""
    location = path(location)  # a local stat() of epath also looks its owner up, which may fail
    return int(location.stat().length) if is_remote(location) else os.path.getsize(location)
