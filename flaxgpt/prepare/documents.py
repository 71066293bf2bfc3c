"""Documents from files: plain text, JSON lines and parquet, local or in a bucket (gs://), read one
document at a time so that no file has to fit in memory.

- `.parquet`: a document per row of the text column (read a batch of rows at a time), as FineWeb's
  files;
- `.jsonl` / `.json`: one JSON object per line, the document in its text field;
- `.txt`: a file is one document, or several separated by lines holding only `<|endoftext|>` (as
  TinyStories' text files); the line break before a separator belongs to no document.
`.jsonl.gz`, `.json.gz` and `.txt.gz` are read through gzip.
"""

import contextlib
import dataclasses
import gzip
import json
import os
import re
from typing import IO, Iterator

from flaxgpt import storage

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
DOCUMENT_SEPARATOR = "<|endoftext|>"  # a line holding only this ends a document in a text file
PARQUET_BATCH_ROWS = 1024
_GLOB = re.compile(r"[*?\[]")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file to read documents from: its path or URL, or its name in a Hugging Face repository."""
    name: str
    size: int  # bytes: the unit of the progress bar
    version: str  # changes with the content (modification time, content hash): resuming checks it


class Files:
    """The documents of local or bucket files (`expand`'s list), read where they lie."""

    def __init__(self, pattern: str, files: list[InputFile]):
        self.pattern, self.files = pattern, files

    def describe(self) -> dict:
        return {"input": self.pattern, "files": len(self.files)}

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[storage.Path]:
        yield storage.path(self.files[index].name)


def file_format(name: str) -> tuple[str, bool]:
    """(parquet | jsonl | txt, gzip-compressed) of a file name; a ValueError says what is
    supported."""
    stem, compressed = (name[:-3], True) if name.endswith(".gz") else (name, False)
    suffix = os.path.splitext(stem)[1].lower()
    if suffix not in FORMATS or (compressed and FORMATS[suffix] == "parquet"):
        raise ValueError(f"{name}: unsupported file type; give .parquet, .jsonl, .json (JSON "
                         "lines) or .txt files (.gz compressed for the last three)")
    return FORMATS[suffix], compressed


def _supported(name: str) -> bool:
    try:
        file_format(name)
        return True
    except ValueError:
        return False


def expand(pattern: str) -> list[InputFile]:
    """The files `pattern` names, sorted: a file, a folder (its supported files, recursively) or a
    glob ("data/*.parquet", "gs://bucket/corpus/*/*.jsonl"); local or in a bucket."""
    location = os.path.expanduser(pattern)
    if _GLOB.search(location):
        if "**" in location:
            raise ValueError(f"--input {pattern}: ** is not supported; give a folder (its files "
                             "are read recursively) or a glob within folders (DIR/*.parquet, "
                             "DIR/*/*.jsonl)")
        parts = location.split("/")
        first = next(i for i, part in enumerate(parts) if _GLOB.search(part))
        base = storage.path("/".join(parts[:first]) or ".")
        storage.check_reachable(base, "--input")
        paths = [p for p in base.glob("/".join(parts[first:])) if p.is_file()]
        for p in paths:
            file_format(p.name)  # a glob that matches an unsupported file is a mistake to report
    else:
        path = storage.path(location)
        storage.check_reachable(path, "--input")
        if path.is_dir():
            paths = [p for p in _files_under(path) if _supported(p.name)]
        elif path.is_file():
            file_format(path.name)
            paths = [path]
        else:
            raise FileNotFoundError(f"--input {pattern}: no such file or folder")
    if not paths:
        raise FileNotFoundError(f"--input {pattern}: no .parquet, .jsonl, .json or .txt files "
                                "there")
    files = []
    for p in sorted(paths, key=str):
        stat = p.stat()
        files.append(InputFile(str(p), stat.length, str(stat.mtime)))
    return files


def _files_under(folder: storage.Path) -> Iterator[storage.Path]:
    """Every file below `folder`, at any depth."""
    prefix = os.fspath(folder).split("://", 1)[-1].rstrip("/")
    for root, _, names in folder.walk():
        # epath's walk of a bucket gives folders without gs://: rebuild them from the relative part
        relative = os.fspath(root).split("://", 1)[-1][len(prefix):].strip("/")
        yield from ((folder / relative / name) if relative else folder / name for name in names)


def read_documents(path: storage.Path, name: str,
                   text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, bytes of the file read so far) for each document of the file at `path`, in order;
    `name` gives its format and appears in errors. Bad content is a ValueError naming the file."""
    kind, compressed = file_format(name)
    with path.open("rb") as raw:
        if kind == "parquet":
            yield from _parquet_documents(raw, name, text_field)
            return
        lines = _lines(gzip.GzipFile(fileobj=raw) if compressed else raw, raw, name)
        if kind == "jsonl":
            yield from _jsonl_documents(lines, name, text_field)
        else:
            yield from _text_documents(lines)


def _lines(f: IO[bytes], raw: IO[bytes], name: str) -> Iterator[tuple[int, str, int]]:
    """(line number, line, bytes of the raw file read so far) of a UTF-8 file."""
    for number, line in enumerate(f, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} line {number} is not UTF-8 ({e.reason}): convert the file to "
                             "UTF-8") from None
        yield number, text, raw.tell()


def _text_documents(lines: Iterator[tuple[int, str, int]]) -> Iterator[tuple[str, int]]:
    document, position = [], 0
    for _, line, position in lines:
        if line.strip() == DOCUMENT_SEPARATOR:
            yield _without_last_newline("".join(document)), position
            document = []
        else:
            document.append(line)
    if document:
        yield _without_last_newline("".join(document)), position


def _without_last_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _jsonl_documents(lines: Iterator[tuple[int, str, int]], name: str,
                     field: str) -> Iterator[tuple[str, int]]:
    for number, line, position in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} line {number} is not a JSON object ({e.msg}): JSON lines "
                             "files hold one object per line") from None
        if not isinstance(record, dict) or field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{name} line {number} has no {field!r} field (it has: {fields}): "
                             "pass --text_field NAME")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{name} line {number}: {field!r} holds a {type(text).__name__}, "
                             "not text")
        yield text, position


def _parquet_documents(f: IO[bytes], name: str, field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ModuleNotFoundError("parquet files need pyarrow: pip install "
                                  "'flaxgpt[data]'") from None
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    try:
        parquet = pq.ParquetFile(f)
    except pa.ArrowException as e:
        raise ValueError(f"{name} is not a parquet file ({e})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{name} has no {field!r} column (it has: {', '.join(schema.names)}): "
                         "pass --text_field NAME")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{name}: column {field!r} holds {kind}, not text")
    rows, total = 0, max(parquet.metadata.num_rows, 1)
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        texts = batch.column(0).to_pylist()
        for i, text in enumerate(texts, rows + 1):
            yield text or "", size * i // total  # a null is an empty document
        rows += len(texts)


def read_all(source: Files, text_field: str = "text", limit: int | None = None) -> list[str] | None:
    """Every document of `source`'s files, in order; None once there are more than `limit`."""
    texts = []
    for index, file in enumerate(source.files):
        with source.open(index) as path:
            for text, _ in read_documents(path, file.name, text_field):
                texts.append(text)
                if limit is not None and len(texts) > limit:
                    return None
    return texts
