"""Reading prepared token files (`prepare.py`'s output) and sampling training batches from them.

A prepared dataset is a folder `data/<name>/` holding `train.bin` and `val.bin` (flat token arrays,
uint16 or uint32) and `meta.json` (tokenizer, vocab_size, dtype), or nanoGPT's `meta.pkl` for its
character datasets (see `tokenizer.read_meta`). Batches are random windows, as in
nanoGPT, but drawn from an RNG keyed by (seed, step, split): a batch depends on nothing else, so a
resumed run sees the same batches, and every host of a multi-host run can draw the same offsets and
read only its own rows.
"""

import os
from pathlib import Path

import numpy as np

from flaxgpt import tokenizer

SPLIT_CODES = {"train": 0, "val": 1}


def _missing(path: Path, data_dir: Path) -> FileNotFoundError:
    """The error for a dataset that was not prepared: names the path and the command that writes it."""
    name = data_dir.resolve().name
    out_dir = "" if data_dir == Path("data") / name else f" --out_dir {data_dir}"
    return FileNotFoundError(f"{path} not found: prepare the dataset first with "
                             f"`python prepare.py {name}{out_dir}`")


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The dataset's vocabulary and token dtype (`tokenizer.read_meta`); a missing folder says how to make it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise _missing(data_dir, data_dir) if not data_dir.exists() else NotADirectoryError(
            f"data_dir {data_dir} is a file, not a dataset folder")
    return tokenizer.read_meta(data_dir)


def open_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """`<data_dir>/<split>.bin` as a read-only memmap [n_tokens], of the dtype the dataset's meta names."""
    data_dir = Path(data_dir)
    dtype = load_meta(data_dir)["dtype"]
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        raise _missing(path, data_dir)
    return np.memmap(path, dtype=dtype, mode="r")


def _check(n_tokens: int, block_size: int, split: str) -> None:
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if n_tokens < block_size + 1:
        raise ValueError(f"the {split} split has {n_tokens} tokens, but a window of block_size={block_size} "
                         f"needs {block_size + 1}: lower block_size (or use more data)")


def batch_offsets(n_tokens: int, *, seed: int, step: int, batch_size: int, block_size: int,
                  split: str = "train") -> np.ndarray:
    """Start positions [batch_size] of the global batch's windows; a function of (seed, step, split) only."""
    _check(n_tokens, block_size, split)
    rng = np.random.default_rng((seed, step, SPLIT_CODES[split]))
    # High is exclusive, so the last possible window ends on the last token (its y needs offset + block_size).
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, block_size: int,
              split: str = "train", rows: slice | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x and targets y (x shifted by one), int32 [rows, block_size], from the token array `tokens`.

    The offsets of all `batch_size` rows are drawn; `rows` (a slice or index array, default all) picks the
    rows this process reads, so only those windows of the memmap are touched and the processes' slices
    together make up the single-process batch.
    """
    offsets = batch_offsets(len(tokens), seed=seed, step=step, batch_size=batch_size,
                            block_size=block_size, split=split)
    if rows is not None:
        offsets = offsets[rows]
    # One gather of every selected window [rows, block_size + 1]; numpy reads just those pages of a memmap.
    windows = np.asarray(tokens[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
