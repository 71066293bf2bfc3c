"""Dataset preparation: nanoGPT's `data/*/prepare.py` scripts, FineWeb-Edu and your own text.

    python prepare.py shakespeare_char [--input PATH] [--out_dir DIR]
    python prepare.py fineweb_edu [--subset sample-10BT] [--out_dir DIR] [--num_proc N]
    python prepare.py text --input 'PATH_OR_GLOB' --name NAME [--out_dir DIR] [--text_field text]

writes `data/<name>/train.bin` and `val.bin` (flat token arrays, uint16 while the vocabulary fits,
else uint32) and `meta.json` (tokenizer, vocab_size, dtype, token counts; "chars" for the character
vocabulary). --out_dir may be a bucket (gs://BUCKET/data/NAME), which every host of a pod then
reads. Token files appear under their names only when complete and meta.json comes last
(`dataset_folder`), so an interrupted run never leaves a folder that train.py would read.

- shakespeare_char: one token per distinct character; first 90% of the text train, last 10% val.
- shakespeare: GPT-2 BPE of the same text, same split.
- openwebtext: GPT-2 BPE of Hugging Face's openwebtext through `datasets`
  (`pip install 'flaxgpt[data]'`), 0.05% held out for val, `<|endoftext|>` after each document.
- fineweb_edu: GPT-2 BPE of a FineWeb-Edu subset from the Hugging Face Hub (`fineweb`), sample-10BT
  by default; text: of your own .txt / .jsonl / .parquet files, local or gs:// (`documents`). Both
  stream their documents through threads on every core, hold out a seeded fraction of the documents
  for val, end each document with `<|endoftext|>`, record the token files' sha256 in meta.json and
  resume when interrupted (`tokenize_documents`).
"""

import argparse
import os
import sys
from typing import Sequence

from flaxgpt import storage
from flaxgpt.prepare import documents, fineweb
from flaxgpt.prepare.openwebtext import DEFAULT_NUM_PROC, load_openwebtext, write_documents
from flaxgpt.prepare.shakespeare import prepare_shakespeare
from flaxgpt.prepare.tokenize_documents import Staging, tokenize_to_folder

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "fineweb_edu", "text")
STREAMED = ("fineweb_edu", "text")  # tokenized by `tokenize_documents`
VAL_FRACTION = {"fineweb_edu": 0.0005, "text": 0.01}  # of the documents: ~5M tokens of sample-10BT
SPLIT_SEED = 2357  # nanoGPT's openwebtext split seed


def default_out_dir(dataset: str, name: str | None = None, subset: str | None = None) -> str:
    """data/<name>: the dataset's name, with its subset if not the default one, or text's --name."""
    if dataset == "text":
        if not name:
            raise ValueError("text needs --name NAME (the dataset's name: data/NAME) or --out_dir "
                             "DIR")
        return os.path.join("data", name)
    if dataset == "fineweb_edu" and subset not in (None, fineweb.DEFAULT_SUBSET):
        return os.path.join("data", f"fineweb_edu_{subset}")
    return os.path.join("data", dataset)


def prepare(dataset: str, out_dir: str | os.PathLike | None = None,
            input_path: str | os.PathLike | None = None, num_proc: int | None = None, *,
            name: str | None = None, subset: str | None = None, val_fraction: float | None = None,
            seed: int = SPLIT_SEED, text_field: str = "text") -> dict:
    """Prepare `dataset` in `out_dir` (default: `default_out_dir`); returns its meta.json as a dict.

    input_path: the shakespeare datasets' text file, openwebtext's dataset folder, or text's files
    (a path, a folder or a glob). num_proc: openwebtext's processes (default DEFAULT_NUM_PROC), or
    fineweb_edu's and text's tokenizer threads (default: one per core). name: a text dataset's name
    (default: out_dir's). subset, val_fraction, seed, text_field: fineweb_edu's and text's."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if out_dir is None:
        out_dir = default_out_dir(dataset, name, subset)
    out_dir = storage.path(out_dir)
    storage.check_reachable(out_dir, "--out_dir")
    if dataset == "text" and input_path is None:
        raise ValueError("text needs --input: a file, a folder or a glob ('data/*.parquet', "
                         "gs://...)")
    if dataset == "fineweb_edu" and input_path is not None:
        raise ValueError("fineweb_edu downloads its files: for local copies of them use "
                         "`prepare.py text --input 'DIR/*.parquet' --name fineweb_edu`")
    out_dir.mkdir(parents=True, exist_ok=True)
    if dataset == "openwebtext":
        num_proc = num_proc or DEFAULT_NUM_PROC
        return write_documents(load_openwebtext(input_path, num_proc), out_dir, num_proc=num_proc)
    if dataset not in STREAMED:
        return prepare_shakespeare(dataset, out_dir, input_path)
    if dataset == "fineweb_edu":
        downloads = Staging.folder_for(out_dir) / "downloads"
        source, name = fineweb.HubFiles(subset or fineweb.DEFAULT_SUBSET, downloads), "fineweb_edu"
    else:
        source = documents.Files(os.fspath(input_path), documents.expand(os.fspath(input_path)))
        name = name or out_dir.name
    if val_fraction is None:
        val_fraction = VAL_FRACTION[dataset]
    num_threads = num_proc or os.cpu_count() or 1
    return tokenize_to_folder(source, out_dir, dataset=name, text_field=text_field, seed=seed,
                              val_fraction=val_fraction, num_threads=num_threads)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Tokenize a dataset into train.bin, val.bin and meta.json.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--input", help="shakespeare*: tinyshakespeare's input.txt; openwebtext: a "
                        "dataset folder or save_to_disk folder (default: download); text: a file, "
                        "folder or glob of .txt/.jsonl/.json/.parquet files, local or gs://")
    parser.add_argument("--out_dir", help="a folder or gs:// URL (default: data/<dataset>, or "
                        "data/<name> for text)")
    parser.add_argument("--name", help="text: the dataset's name (default: out_dir's)")
    parser.add_argument("--subset", help=f"fineweb_edu: the subset of {fineweb.REPO} (default "
                        f"{fineweb.DEFAULT_SUBSET}; sample-100BT, CC-MAIN-2024-10, ...)")
    parser.add_argument("--text_field", default="text", help="text: the JSON field or parquet "
                        "column holding the documents (default: text)")
    defaults = ", ".join(f"{v} for {k}" for k, v in VAL_FRACTION.items())
    parser.add_argument("--val_fraction", type=float, help="fineweb_edu, text: the fraction of "
                        f"documents held out for val (default: {defaults})")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED,
                        help=f"fineweb_edu, text: the val split's seed (default: {SPLIT_SEED})")
    parser.add_argument("--num_proc", type=int, help="openwebtext: processes (default: "
                        f"{DEFAULT_NUM_PROC}); fineweb_edu, text: tokenizer threads (default: one "
                        "per core)")
    args = parser.parse_args(argv)
    options = dict(name=args.name, subset=args.subset, val_fraction=args.val_fraction,
                   seed=args.seed, text_field=args.text_field)
    try:
        out_dir = args.out_dir or default_out_dir(args.dataset, args.name, args.subset)
        meta = prepare(args.dataset, out_dir, args.input, args.num_proc, **options)
    except (OSError, ValueError, ModuleNotFoundError) as e:  # and ConnectionError: users can fix it
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        if args.dataset not in STREAMED:
            raise
        sys.exit("prepare.py: interrupted; run the same command again to resume")
    documents_line = (f" ({meta['train_documents']:,} and {meta['val_documents']:,} documents)"
                      if "train_documents" in meta else "")
    print(f"{meta['dataset']}: {meta['tokenizer']} vocabulary of {meta['vocab_size']:,} tokens "
          f"({meta['dtype']}); train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} "
          f"tokens{documents_line} -> {out_dir}")
    return meta
