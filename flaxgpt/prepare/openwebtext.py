"""OpenWebText as nanoGPT prepares it: Hugging Face `datasets`, tokenized by `Dataset.map` in
processes, 0.05% of the documents held out for val, `<|endoftext|>` after each document."""

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from flaxgpt import storage
from flaxgpt.prepare.dataset_folder import token_dtype, write_meta, write_tokens
from flaxgpt.prepare.tokenize_documents import gpt2
from flaxgpt.tokenizer import GPT2_EOT, GPT2_VOCAB_SIZE

DEFAULT_NUM_PROC = min(8, os.cpu_count() or 1)


def tokenize_document(example: dict) -> dict:
    """{"text": str} -> {"ids": GPT-2 tokens + <|endoftext|>, "len": their number}: `Dataset.map`'s
    function."""
    ids = gpt2().encode_ordinary(example["text"])
    ids.append(GPT2_EOT)
    return {"ids": ids, "len": len(ids)}


def write_documents(splits: Mapping, out_dir: storage.Path, *, num_proc: int = DEFAULT_NUM_PROC,
                    num_shards: int = 1024, dataset: str = "openwebtext") -> dict:
    """Tokenize each split's documents with `tokenize_document` and write out_dir/<split>.bin and
    meta.json.

    splits: split name -> a `datasets.Dataset` with a "text" column (tokenized in `num_proc`
    processes, written in `num_shards` contiguous shards, as nanoGPT does), or a list of strings.
    """
    gpt2()  # load the BPE ranks once, before `map` starts its processes
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
            shards = (tokenized.shard(num_shards=total, index=i, contiguous=True)
                      .with_format("numpy")["ids"] for i in range(total))
        write_tokens(out_dir / f"{split}.bin", shards, n_tokens, dtype, total=total)
        meta[f"{split}_tokens"] = n_tokens
    write_meta(out_dir, meta)
    return meta


def load_openwebtext(input_path: str | os.PathLike | None = None,
                     num_proc: int = DEFAULT_NUM_PROC) -> dict:
    """{"train", "val"} `datasets.Dataset`s: openwebtext (or `input_path`: a dataset folder, a hub
    name, or a `save_to_disk` folder) with 0.05% of its train split held out as val."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError("openwebtext needs Hugging Face datasets: pip install "
                                  "'flaxgpt[data]'") from None
    source = Path(input_path) if input_path is not None else None
    if source is not None and any((source / name).is_file() for name in ("dataset_dict.json",
                                                                          "state.json")):
        ds = datasets.load_from_disk(str(source))
    else:
        ds = datasets.load_dataset(str(input_path or "openwebtext"), num_proc=num_proc)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    split = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    return {"train": split["train"], "val": split["test"]}
