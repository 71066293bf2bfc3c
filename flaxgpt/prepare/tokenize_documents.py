"""Documents to a dataset folder: GPT-2 BPE in threads on every core, a seeded split by document,
and a preparation that an interruption never spoils (the next run resumes where it stopped).

    the documents of each input file, in order -> chunks of about CHUNK_CHARS characters -> a pool
    of threads, each tokenizing a chunk (tiktoken releases the GIL while it encodes) -> the tokens
    appended in input order to staged train and val files -> published into out_dir
    (`dataset_folder.publish`), meta.json last

Each document is followed by <|endoftext|>, as in GPT-2's training data, and goes to val when a hash
of its text keyed by the seed falls below val_fraction: the split depends on (seed, text) alone, not
on the order of the documents or the number of threads.

Staging: out_dir/.preparing for a local out_dir; for a bucket, a local folder under flaxgpt's cache
($FLAXGPT_CACHE, else ~/.cache/flaxgpt), uploaded when complete. Every CHECKPOINT_SECONDS and after
each input file, the staged files are flushed to disk and then progress.json beside them is
replaced. A later run with the same inputs and settings cuts the files back to that point and goes
on from there; any other run starts over. out_dir's own train.bin, val.bin and meta.json change
only when the new ones are complete.
"""

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, ContextManager, Iterator, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from flaxgpt import storage
from flaxgpt.prepare.dataset_folder import SPLITS, file_sha256, publish, token_dtype
from flaxgpt.prepare.documents import DOCUMENT_SEPARATOR, InputFile, read_documents
from flaxgpt.tokenizer import GPT2_EOT, GPT2_VOCAB_SIZE, GPT2Tokenizer, user_cache_dir

CHUNK_CHARS = 1 << 20  # text per task of a tokenizer thread (~250k GPT-2 tokens of English)
TASKS_PER_THREAD = 2  # chunks in flight per thread: every thread stays busy, little memory
CHECKPOINT_SECONDS = 60.0
STAGING_DIR = ".preparing"
FORMAT_VERSION = 1  # of the staged files and progress.json; a run of another version starts over
DTYPE = token_dtype(GPT2_VOCAB_SIZE)
ITEMSIZE = np.dtype(DTYPE).itemsize
_EOT = np.array([GPT2_EOT], dtype=np.uint32)


class Source(Protocol):
    """Input files and a way to read each: `documents.Files`, `fineweb.HubFiles`."""
    files: Sequence[InputFile]

    def describe(self) -> dict: ...  # what meta.json records as the source

    def open(self, index: int) -> ContextManager[storage.Path]: ...  # the file (maybe a download)


@functools.lru_cache(maxsize=1)
def gpt2() -> GPT2Tokenizer:
    """GPT-2 BPE, loaded once per process; a failed download of its ranks is a ConnectionError."""
    try:
        return GPT2Tokenizer()
    except RuntimeError as e:  # the BPE ranks could not be downloaded; the message says what to do
        raise ConnectionError(str(e)) from None


def tokenize_chunk(texts: Sequence[str], val_below: int,
                   key: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens [N], val tokens [M], documents in val) of `texts`: each text's GPT-2 tokens and
    <|endoftext|>, in val if the text's 64-bit hash keyed by `key` is below `val_below`."""
    encoding = gpt2().encoding
    parts, n_val = ([], []), 0
    for text in texts:
        text, in_val = in_val_split(text, val_below, key)
        n_val += in_val
        parts[in_val].extend((encoding.encode_to_numpy(text, disallowed_special=()), _EOT))
    train, val = (np.concatenate(p).astype(DTYPE) if p else np.empty(0, DTYPE) for p in parts)
    return train, val, n_val


def in_val_split(text: str, val_below: int, key: bytes) -> tuple[str, bool]:
    """(text, whether it goes to val): its 64-bit hash keyed by `key` is below `val_below`. Lone
    surrogates, which JSON can hold, become U+FFFD."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        data = text.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8, key=key).digest()
    return text, int.from_bytes(digest, "little") < val_below


def split_keys(val_fraction: float, seed: int) -> dict:
    """`in_val_split`'s val_below and key for a val fraction and a seed."""
    return {"val_below": int(val_fraction * 2**64), "key": seed.to_bytes(8, "little")}


@dataclasses.dataclass
class Chunk:
    """Documents [first, first + len(texts)) of input file number `file`, which is read up to byte
    `end`; `last`: its last chunk."""
    file: int
    first: int
    texts: list[str]
    end: int
    last: bool


def chunks(source: Source, text_field: str, start_file: int, skip: int) -> Iterator[Chunk]:
    """The documents of the source's files from `start_file` on, less the first `skip` of that one,
    in chunks of about CHUNK_CHARS characters; a chunk holds documents of one file."""
    for index in range(start_file, len(source.files)):
        file = source.files[index]
        with source.open(index) as path:
            first = skip if index == start_file else 0
            texts, chars, n, end = [], 0, 0, 0
            for n, (text, end) in enumerate(read_documents(path, file.name, text_field), 1):
                if n <= first:
                    continue
                texts.append(text)
                chars += len(text)
                if chars >= CHUNK_CHARS:
                    yield Chunk(index, n - len(texts), texts, end, last=False)
                    texts, chars = [], 0
            yield Chunk(index, n - len(texts), texts, file.size, last=True)


@dataclasses.dataclass
class Progress:
    """What the staged files hold: every document before document `skip` of file `next_file`."""
    next_file: int = 0
    skip: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_documents: int = 0
    val_documents: int = 0


class Staging:
    """The staged token files and progress.json of one preparation (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = folder
        self.settings = json.loads(json.dumps(settings))  # as progress.json gives it back
        self.tokens = folder / "tokens"  # train.bin and val.bin alone: the folder `publish` uploads
        self.record = folder / "progress.json"

    @staticmethod
    def folder_for(out_dir: storage.Path) -> Path:
        if storage.is_remote(out_dir):
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.fspath(out_dir))
            return user_cache_dir() / "prepare" / name
        return Path(out_dir) / STAGING_DIR

    def resume(self) -> Progress:
        """The progress to go on from, with the staged files cut back to it; a fresh start when none
        was recorded, or for other inputs or settings."""
        progress = self._recorded()
        if progress is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.tokens.mkdir(parents=True)
            for split in SPLITS:
                (self.tokens / f"{split}.bin").touch()
            return Progress()
        for split in SPLITS:
            n_tokens = getattr(progress, f"{split}_tokens")
            os.truncate(self.tokens / f"{split}.bin", n_tokens * ITEMSIZE)
        return progress

    def _recorded(self) -> Progress | None:
        try:
            record = json.loads(self.record.read_text())
            progress = Progress(**record["progress"])
        except (OSError, ValueError, TypeError, KeyError):  # none, or unreadable: start over
            return None
        if record.get("settings") != self.settings:
            return None
        for split in SPLITS:
            path, n_tokens = self.tokens / f"{split}.bin", getattr(progress, f"{split}_tokens")
            if not path.is_file() or path.stat().st_size < n_tokens * ITEMSIZE:
                return None
        return progress

    def save(self, progress: Progress, files: dict[str, IO[bytes]]) -> None:
        """Make the staged files durable up to `progress`, then record it."""
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        record = {"settings": self.settings, "progress": dataclasses.asdict(progress)}
        storage.write_atomically(storage.path(self.record), json.dumps(record) + "\n")


def tokenize_to_folder(source: Source, out_dir: str | os.PathLike, *, dataset: str,
                       val_fraction: float, seed: int, num_threads: int, text_field: str = "text",
                       checkpoint_seconds: float | None = None) -> dict:
    """Tokenize the documents of `source` into out_dir's train.bin, val.bin and meta.json (see the
    module docstring) and return meta.json's content. Progress is saved every `checkpoint_seconds`
    (default CHECKPOINT_SECONDS) and after each file."""
    if num_threads < 1:
        raise ValueError(f"--num_proc {num_threads}: give at least 1 thread")
    gpt2()  # the BPE ranks, before any thread needs them
    out_dir = storage.path(out_dir)
    # What the staged tokens depend on: not the source's revision, which moves with any commit
    settings = {"version": FORMAT_VERSION, "dataset": dataset, "text_field": text_field,
                "files": [dataclasses.astuple(f) for f in source.files],
                "val_fraction": val_fraction, "seed": seed}
    staging = Staging(Staging.folder_for(out_dir), settings)
    progress = staging.resume()
    if progress.next_file or progress.skip:
        print(f"resuming the preparation staged in {staging.folder} after {progress.next_file} of "
              f"{len(source.files)} files and {progress.skip:,} documents of the next "
              f"({progress.train_tokens + progress.val_tokens:,} tokens)")
    if checkpoint_seconds is None:
        checkpoint_seconds = CHECKPOINT_SECONDS
    with (open(staging.tokens / "train.bin", "ab") as train,
          open(staging.tokens / "val.bin", "ab") as val):
        appender = _Appender({"train": train, "val": val}, progress, staging, source,
                             checkpoint_seconds)
        _tokenize_in_threads(chunks(source, text_field, progress.next_file, progress.skip),
                             appender, **split_keys(val_fraction, seed), num_threads=num_threads)
    n_documents = progress.train_documents + progress.val_documents
    for split in SPLITS:
        if getattr(progress, f"{split}_documents") == 0:
            shutil.rmtree(staging.folder)
            raise ValueError(f"the {split} split got none of the {n_documents:,} documents "
                             f"(--val_fraction {val_fraction}): give more documents, a "
                             "val_fraction nearer 0.5, or separate the documents of a .txt file "
                             f"with {DOCUMENT_SEPARATOR!r} lines")
    meta = {"dataset": dataset, "tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "dtype": DTYPE,
            "train_tokens": progress.train_tokens, "val_tokens": progress.val_tokens,
            "train_documents": progress.train_documents, "val_documents": progress.val_documents,
            "source": source.describe(),
            "split": {"val_fraction": val_fraction, "seed": seed, "by": "document"},
            "sha256": {f"{split}.bin": file_sha256(staging.tokens / f"{split}.bin")
                       for split in SPLITS}}
    if storage.is_remote(out_dir):
        n_bytes = (progress.train_tokens + progress.val_tokens) * ITEMSIZE
        print(f"uploading {n_bytes / 1e9:.2f} GB to {out_dir}")
    publish(staging.tokens, out_dir, meta)
    shutil.rmtree(staging.folder)
    return meta


def _tokenize_in_threads(work: Iterator[Chunk], appender: "_Appender", *, val_below: int,
                         key: bytes, num_threads: int) -> None:
    """`tokenize_chunk` of each chunk in a pool of `num_threads` threads; the results handed to
    `appender` in input order."""
    pending: collections.deque[tuple[Chunk, Future]] = collections.deque()
    pool = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenize")

    def append_oldest():
        chunk, future = pending.popleft()
        appender.append(chunk, *future.result())

    try:
        for chunk in work:
            pending.append((chunk, pool.submit(tokenize_chunk, chunk.texts, val_below, key)))
            if len(pending) >= TASKS_PER_THREAD * num_threads:
                append_oldest()
        while pending:
            append_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        appender.close()


class _Appender:
    """Appends tokenized chunks to the staged files, advances the progress, saves it now and then,
    and shows it: input bytes read (the bar and its ETA), documents and tokens per second."""

    def __init__(self, files: dict[str, IO[bytes]], progress: Progress, staging: Staging,
                 source: Source, checkpoint_seconds: float):
        self.files, self.progress, self.staging = files, progress, staging
        self.checkpoint_seconds = checkpoint_seconds
        self.sizes = [f.size for f in source.files]
        self.done_bytes = sum(self.sizes[:progress.next_file])  # the files before the current one
        self.bar = tqdm(total=sum(self.sizes), initial=self.done_bytes, unit="B", unit_scale=True,
                        desc="tokenizing", mininterval=1.0, smoothing=0.05)
        self.start = self.saved = time.monotonic()
        self.tokens = self.documents = 0

    def append(self, chunk: Chunk, train: np.ndarray, val: np.ndarray, n_val: int) -> None:
        p = self.progress
        self.files["train"].write(train.data)
        self.files["val"].write(val.data)
        p.train_tokens, p.val_tokens = p.train_tokens + len(train), p.val_tokens + len(val)
        p.train_documents += len(chunk.texts) - n_val
        p.val_documents += n_val
        p.next_file, p.skip = ((chunk.file + 1, 0) if chunk.last
                               else (chunk.file, chunk.first + len(chunk.texts)))
        self.tokens += len(train) + len(val)
        self.documents += len(chunk.texts)
        self.bar.update(self.done_bytes + chunk.end - self.bar.n)
        if chunk.last:
            self.done_bytes += self.sizes[chunk.file]
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.documents:,} docs, {rate / 1e6:.2f}M tokens/s",
                                 refresh=False)
        if chunk.last or time.monotonic() - self.saved >= self.checkpoint_seconds:
            self.staging.save(p, self.files)
            self.saved = time.monotonic()

    def close(self) -> None:
        self.bar.close()
