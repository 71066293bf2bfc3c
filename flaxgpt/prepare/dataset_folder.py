"""The folder train.py reads: train.bin and val.bin (flat token arrays) and meta.json, written so
that an interrupted preparation never leaves a folder that train.py would take for a dataset.

train.py refuses a split whose length differs from meta.json's count (`data.open_split`) and reads a
folder without meta.json as nanoGPT's GPT-2 uint16 layout (`tokenizer.read_meta`). So token files
appear under their names only when complete, and meta.json, which makes a folder a flaxgpt dataset,
comes last.
"""

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from flaxgpt import storage

SPLITS = ("train", "val")
HASH_BLOCK = 1 << 23  # bytes read at a time for a checksum


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_tokens(path: storage.Path, shards: Iterable[Sequence[Sequence[int]]], n_tokens: int,
                 dtype: str, total: int | None = None) -> None:
    """Write the token sequences of `shards` (each a list of documents' tokens), in order, to a flat
    file of `n_tokens` tokens (local or in a bucket); one shard in memory at a time."""
    if n_tokens == 0:
        raise ValueError(f"no tokens to write to {path}")
    written = 0
    with storage.atomic_output(path) as f:
        for shard in tqdm(shards, total=total, desc=f"writing {path}",
                          disable=total is None or total <= 1):
            batch = np.concatenate([np.asarray(doc, dtype=dtype) for doc in shard])
            f.write(batch.tobytes())
            written += len(batch)
        if written != n_tokens:
            raise RuntimeError(f"wrote {written} tokens to {path}, expected {n_tokens}")


def write_meta(out_dir: storage.Path, meta: dict) -> None:
    storage.write_atomically(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a local file, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def publish(staged: str | os.PathLike, out_dir: storage.Path, meta: dict) -> None:
    """Replace the dataset in `out_dir` (local or a bucket) with the complete token files in the
    local folder `staged` (train.bin and val.bin alone), then write `meta` as meta.json.

    Every state in between is one that train.py refuses or reads right: the old train.bin, val.bin
    and meta.json go in that order (a split is missing), the new token files arrive (a split is
    missing until both are there; then the folder is GPT-2 uint16 without meta.json, which they
    are), then meta.json."""
    out_dir = storage.path(out_dir)
    for name in (*(f"{split}.bin" for split in SPLITS), "meta.json"):
        (out_dir / name).unlink(missing_ok=True)
    if storage.is_remote(out_dir):
        storage.upload(staged, out_dir)  # each object appears whole once uploaded
    else:
        for split in SPLITS:
            os.replace(os.path.join(staged, f"{split}.bin"), out_dir / f"{split}.bin")
    write_meta(out_dir, meta)
