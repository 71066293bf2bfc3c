"""Dataset preparation: nanoGPT's `data/*/prepare.py` scripts as one module.

    python prepare.py shakespeare_char [--input PATH] [--out_dir DIR] [--num_proc N]

writes `data/<name>/train.bin` and `val.bin` (flat token arrays, uint16 while the vocabulary fits,
else uint32) and `meta.json` (tokenizer, vocab_size, dtype, token counts; "chars" for the character
vocabulary). --out_dir may be a bucket (gs://BUCKET/data/NAME), which every host of a pod then reads.
Every file is written under a temporary name and renamed (uploaded whole to a bucket), and meta.json
comes last, so an interrupted run never leaves a half-written file under a final name.

- shakespeare_char: one token per distinct character; first 90% of the text train, last 10% val.
- shakespeare: GPT-2 BPE of the same text, same split.
- openwebtext: GPT-2 BPE of Hugging Face's openwebtext (needs `pip install 'flaxgpt[data]'`),
  0.05% held out for val, `<|endoftext|>` after each document.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from flaxgpt import storage
from flaxgpt.tokenizer import GPT2_EOT, GPT2_VOCAB_SIZE, CharTokenizer, GPT2Tokenizer, local_data_file

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext")
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_NUM_PROC = min(8, os.cpu_count() or 1)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_tokens(path: storage.Path, shards: Iterable[Sequence[Sequence[int]]], n_tokens: int, dtype: str,
                 total: int | None = None) -> None:
    """Write the token sequences of `shards` (each a list of documents' tokens), in order, to a flat file
    of `n_tokens` tokens (local or in a bucket); one shard in memory at a time."""
    if n_tokens == 0:
        raise ValueError(f"no tokens to write to {path}")
    written = 0
    with storage.atomic_output(path) as f:
        for shard in tqdm(shards, total=total, desc=f"writing {path}", disable=total is None or total <= 1):
            batch = np.concatenate([np.asarray(doc, dtype=dtype) for doc in shard])
            f.write(batch.tobytes())
            written += len(batch)
        if written != n_tokens:
            raise RuntimeError(f"wrote {written} tokens to {path}, expected {n_tokens}")


def write_meta(out_dir: storage.Path, meta: dict) -> None:
    storage.write_atomically(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")


def fetch_tinyshakespeare(out_dir: storage.Path, input_path: str | os.PathLike | None = None) -> Path:
    """The tinyshakespeare text: `input_path`, else $FLAXGPT_DATA's copy, else `out_dir/input.txt`,
    downloaded there if it is not there yet."""
    if input_path is not None:
        path = Path(input_path)
        if not path.exists():
            raise FileNotFoundError(f"--input {input_path}: no such file")
        if path.is_dir():
            raise IsADirectoryError(f"--input {input_path} is a directory: give the text file itself")
        if not path.is_file():
            raise ValueError(f"--input {input_path} is not a regular file (a pipe or a device): save the text to "
                             "a file first")
        return path
    local = local_data_file("tinyshakespeare/input.txt") or out_dir / "input.txt"
    if local.is_file():
        return local
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as response, storage.atomic_output(local) as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError, HTTPError, timeouts, refused connections
        raise ConnectionError(f"could not download {TINYSHAKESPEARE_URL} ({e}): pass --input PATH to a local "
                              "copy, or set FLAXGPT_DATA to a folder holding tinyshakespeare/input.txt") from None
    return local


@functools.lru_cache(maxsize=1)
def _gpt2() -> GPT2Tokenizer:
    try:
        return GPT2Tokenizer()
    except RuntimeError as e:  # the BPE ranks could not be downloaded; the message says what to do
        raise ConnectionError(str(e)) from None


def prepare_shakespeare(name: str, out_dir: storage.Path, input_path: str | os.PathLike | None = None) -> dict:
    """Tokenize tinyshakespeare by characters or GPT-2 BPE; the text's first 90% is train, the rest val."""
    source = fetch_tinyshakespeare(out_dir, input_path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}): give a plain text file") from None
    if len(text) < 10:
        raise ValueError(f"{source} holds {len(text)} characters: a dataset needs text to split into train and "
                         "val (tinyshakespeare has about 1.1M)")
    if name == "shakespeare_char":
        tokenizer = CharTokenizer.from_text(text)
        encode, kind, extra = tokenizer.encode, "char", {"chars": tokenizer.chars}
    else:
        tokenizer = _gpt2()
        encode, kind, extra = tokenizer.encode_ordinary, "gpt2", {}
    dtype = token_dtype(tokenizer.vocab_size)
    n = int(len(text) * 0.9)
    counts = {}
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = encode(part)
        write_tokens(out_dir / f"{split}.bin", [[ids]], len(ids), dtype)
        counts[f"{split}_tokens"] = len(ids)
    meta = {"dataset": name, "tokenizer": kind, "vocab_size": tokenizer.vocab_size, "dtype": dtype, **counts, **extra}
    write_meta(out_dir, meta)
    return meta


def tokenize_document(example: dict) -> dict:
    """{"text": str} -> {"ids": GPT-2 tokens + <|endoftext|>, "len": their number}; `Dataset.map`'s function."""
    ids = _gpt2().encode_ordinary(example["text"])
    ids.append(GPT2_EOT)
    return {"ids": ids, "len": len(ids)}


def write_documents(splits: Mapping, out_dir: storage.Path, *, num_proc: int = DEFAULT_NUM_PROC,
                    num_shards: int = 1024, dataset: str = "openwebtext") -> dict:
    """Tokenize each split's documents with `tokenize_document` and write out_dir/<split>.bin and meta.json.

    splits: split name -> a `datasets.Dataset` with a "text" column (tokenized in `num_proc` processes,
    written in `num_shards` contiguous shards, as nanoGPT does), or a list of strings.
    """
    _gpt2()  # load the BPE ranks once, before `map` starts its processes
    dtype = token_dtype(GPT2_VOCAB_SIZE)
    meta = {"dataset": dataset, "tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "dtype": dtype}
    for split, docs in splits.items():
        if isinstance(docs, (list, tuple)):
            ids = [tokenize_document({"text": text})["ids"] for text in docs]
            n_tokens, shards, total = sum(map(len, ids)), [ids], 1
        else:
            tokenized = docs.map(tokenize_document, remove_columns=docs.column_names,
                                 desc=f"tokenizing {split}", num_proc=num_proc)
            n_tokens = int(np.sum(tokenized["len"], dtype=np.uint64))
            total = min(num_shards, len(tokenized))
            shards = (tokenized.shard(num_shards=total, index=i, contiguous=True).with_format("numpy")["ids"]
                      for i in range(total))
        write_tokens(out_dir / f"{split}.bin", shards, n_tokens, dtype, total=total)
        meta[f"{split}_tokens"] = n_tokens
    write_meta(out_dir, meta)
    return meta


def load_openwebtext(input_path: str | os.PathLike | None = None, num_proc: int = DEFAULT_NUM_PROC) -> dict:
    """{"train", "val"} `datasets.Dataset`s: openwebtext (or `input_path`: a dataset folder, a hub name, or
    a `save_to_disk` folder) with 0.05% of its train split held out as val."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError("openwebtext needs Hugging Face datasets: pip install 'flaxgpt[data]'") from None
    source = Path(input_path) if input_path is not None else None
    if source is not None and ((source / "dataset_dict.json").is_file() or (source / "state.json").is_file()):
        ds = datasets.load_from_disk(str(source))
    else:
        ds = datasets.load_dataset(str(input_path or "openwebtext"), num_proc=num_proc)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    split = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    return {"train": split["train"], "val": split["test"]}


def prepare(name: str, out_dir: str | os.PathLike | None = None, input_path: str | os.PathLike | None = None,
            num_proc: int = DEFAULT_NUM_PROC) -> dict:
    """Prepare dataset `name` in `out_dir` (default data/<name>) and return its meta.json as a dict."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    out_dir = storage.path(out_dir if out_dir is not None else f"data/{name}")
    storage.check_reachable(out_dir, "--out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "openwebtext":
        return write_documents(load_openwebtext(input_path, num_proc), out_dir, num_proc=num_proc)
    return prepare_shakespeare(name, out_dir, input_path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Tokenize a dataset into train.bin, val.bin and meta.json.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--input", help="local source: tinyshakespeare's input.txt, or for openwebtext a "
                                        "dataset folder or save_to_disk folder (default: download)")
    parser.add_argument("--out_dir", help="output folder (default: data/<dataset>)")
    parser.add_argument("--num_proc", type=int, default=DEFAULT_NUM_PROC,
                        help=f"processes for openwebtext (default: {DEFAULT_NUM_PROC})")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join("data", args.dataset)
    try:
        meta = prepare(args.dataset, out_dir, args.input, args.num_proc)
    except (OSError, ValueError, ModuleNotFoundError) as e:  # includes ConnectionError: what a user can fix
        sys.exit(f"prepare.py: error: {e}")
    print(f"{args.dataset}: {meta['tokenizer']} vocabulary of {meta['vocab_size']:,} tokens ({meta['dtype']}); "
          f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta
