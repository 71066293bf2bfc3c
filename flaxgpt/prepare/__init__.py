"""Dataset preparation: nanoGPT's `data/*/prepare.py` scripts, FineWeb-Edu and your own text.

    python prepare.py shakespeare_char [--input PATH] [--out_dir DIR]
    python prepare.py fineweb_edu [--subset sample-10BT] [--out_dir DIR] [--num_proc N]
    python prepare.py text --input 'PATH_OR_GLOB' --name NAME [--tokenizer gpt2|char]
                           [--val_fraction F] [--out_dir DIR] [--text_field text]

writes `data/<name>/train.bin` and `val.bin` (flat token arrays, uint16 while the vocabulary fits,
else uint32) and `meta.json` (tokenizer, vocab_size, dtype, token counts; "chars" for the character
vocabulary). --out_dir may be a bucket (gs://BUCKET/data/NAME), which every host of a pod then
reads. Token files appear under their names only when complete and meta.json comes last
(`dataset_folder`), so an interrupted run never leaves a folder that train.py would read; a failed
one removes the folders it made.

- shakespeare_char: one token per distinct character; first 90% of the text train, last 10% val.
- shakespeare: GPT-2 BPE of the same text, same split (`whole_text`).
- openwebtext: GPT-2 BPE of Hugging Face's openwebtext through `datasets`
  (`pip install 'flaxgpt[data]'`), 0.05% held out for val, `<|endoftext|>` after each document.
- fineweb_edu: GPT-2 BPE of a FineWeb-Edu subset from the Hugging Face Hub (`fineweb`), sample-10BT
  by default, and text: your own .txt / .jsonl / .parquet files, local or gs:// (`documents`).
  With documents enough that val holds at least MIN_VAL_DOCUMENTS of them, a seeded val_fraction of
  the documents (so about that fraction of the text) is held out, streamed through threads on every
  core, each document ended with `<|endoftext|>`; the token files' sha256 go to meta.json, and an
  interrupted run resumes (`tokenize_documents`). With fewer (a book in one or a few files), text
  is split by position instead, as shakespeare: the last val_fraction of the text (default 10%) is
  val (`whole_text`). --tokenizer char (text held in memory) tokenizes by characters instead.
"""

import contextlib
import math
import os
from typing import Sequence

from flaxgpt import faults, storage
from flaxgpt.faults import UsageError, UserError
from flaxgpt.prepare import documents, fineweb, whole_text
from flaxgpt.prepare.openwebtext import DEFAULT_NUM_PROC, load_openwebtext, write_documents
from flaxgpt.prepare.tokenize_documents import (Staging, in_val_split, split_keys,
                                                tokenize_to_folder)

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "fineweb_edu", "text")
STREAMED = ("fineweb_edu", "text")  # tokenized by `tokenize_documents`
VAL_FRACTION = {"fineweb_edu": 0.0005, "text": 0.01}  # of the documents: ~5M tokens of sample-10BT
POSITION_VAL_FRACTION = whole_text.SHAKESPEARE_VAL_FRACTION  # text split by position
MIN_VAL_DOCUMENTS = 20  # fewer expected in val: text is split by position
SPLIT_SEED = 2357  # nanoGPT's openwebtext split seed


def default_out_dir(dataset: str, name: str | None = None, subset: str | None = None) -> str:
    """data/<name>: the dataset's name, with its subset if not the default one, or text's --name."""
    if dataset == "text":
        if not name:
            raise UsageError("text needs --name NAME (the dataset's name: data/NAME) or --out_dir "
                             "DIR")
        return os.path.join("data", name)
    if dataset == "fineweb_edu" and subset not in (None, fineweb.DEFAULT_SUBSET):
        return os.path.join("data", f"fineweb_edu_{subset}")
    return os.path.join("data", dataset)


def prepare(dataset: str, out_dir: str | os.PathLike | None = None,
            input_path: str | os.PathLike | None = None, num_proc: int | None = None, *,
            name: str | None = None, subset: str | None = None, val_fraction: float | None = None,
            seed: int = SPLIT_SEED, text_field: str = "text", tokenizer: str = "gpt2") -> dict:
    """Prepare `dataset` in `out_dir` (default: `default_out_dir`); returns its meta.json as a dict.
    Folders it made are removed again when it fails (not when interrupted: it resumes).

    input_path: the shakespeare datasets' text file, openwebtext's dataset folder, or text's files
    (a path, a folder or a glob). num_proc: openwebtext's processes (default DEFAULT_NUM_PROC), or
    fineweb_edu's and text's tokenizer threads (default: one per core). name: a text dataset's name
    (default: out_dir's). subset, val_fraction, seed, text_field: fineweb_edu's and text's;
    tokenizer (gpt2 or char): text's."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UsageError(f"--val_fraction {val_fraction}: give a fraction between 0 and 1")
    if tokenizer not in whole_text.TOKENIZERS or (tokenizer != "gpt2" and dataset != "text"):
        raise UsageError(f"--tokenizer {tokenizer}: text takes {' or '.join(whole_text.TOKENIZERS)}"
                         "; the other datasets have their own")
    if dataset == "text" and input_path is None:
        raise UsageError("text needs --input: a file, a folder or a glob ('data/*.parquet', "
                         "gs://...)")
    if dataset == "fineweb_edu" and input_path is not None:
        raise UsageError("fineweb_edu downloads its files: for local copies of them use "
                         "`prepare.py text --input 'DIR/*.parquet' --name fineweb_edu`")
    out_dir = storage.path(out_dir if out_dir is not None else
                           default_out_dir(dataset, name, subset))
    storage.check_reachable(out_dir, "--out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file: remove it or choose another --out_dir")
    made = [] if storage.is_remote(out_dir) else \
        [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        source = documents.Files(os.fspath(input_path), documents.expand(os.fspath(input_path))) \
            if dataset == "text" else None  # checked before any folder is made
        out_dir.mkdir(parents=True, exist_ok=True)
        return _prepare(dataset, out_dir, input_path, source, num_proc, name=name or out_dir.name,
                        subset=subset, val_fraction=val_fraction, seed=seed,
                        text_field=text_field, tokenizer=tokenizer)
    except Exception:
        for folder in made:  # deepest first; a folder holding a resumable preparation stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _prepare(dataset, out_dir, input_path, source, num_proc, *, name, subset, val_fraction, seed,
             text_field, tokenizer) -> dict:
    if dataset == "openwebtext":
        num_proc = num_proc or DEFAULT_NUM_PROC
        return write_documents(load_openwebtext(input_path, num_proc), out_dir, num_proc=num_proc)
    if dataset not in STREAMED:
        return whole_text.prepare_shakespeare(dataset, out_dir, input_path)
    if dataset == "fineweb_edu":
        downloads = Staging.folder_for(out_dir) / "downloads"
        source, name = fineweb.HubFiles(subset or fineweb.DEFAULT_SUBSET, downloads), "fineweb_edu"
    document_fraction = val_fraction or VAL_FRACTION[dataset]
    enough = math.ceil(MIN_VAL_DOCUMENTS / document_fraction)  # documents to split by document
    texts = None if dataset == "fineweb_edu" else documents.read_all(
        source, text_field, limit=None if tokenizer == "char" else enough - 1)
    if texts is None:  # GPT-2 BPE of `enough` documents or more: streamed
        return tokenize_to_folder(source, out_dir, dataset=name, text_field=text_field, seed=seed,
                                  val_fraction=document_fraction,
                                  num_threads=num_proc or os.cpu_count() or 1)
    split = {"val_fraction": document_fraction, "seed": seed, "by": "document"}
    if len(texts) >= enough:  # char: all documents in memory, the same split as streamed
        keys = split_keys(document_fraction, seed)
        chosen = [in_val_split(text, **keys) for text in texts]
        train, val = ([(t, True) for t, in_val in chosen if in_val == side] for side in (0, 1))
    else:
        split = {"val_fraction": val_fraction or POSITION_VAL_FRACTION, "by": "position"}
        percent = split["val_fraction"] * 100
        print(f"{name}: {len(texts):,} document{'s' if len(texts) != 1 else ''}, too few to hold "
              f"whole ones out: splitting by position, the last {percent:g}% of the text is val "
              "(as nanoGPT's shakespeare)")
        train, val = whole_text.split_by_position(texts, split["val_fraction"])
    return whole_text.write_pieces(out_dir, name, tokenizer, train, val, split,
                                   extra={"source": source.describe()})


def main(argv: Sequence[str] | None = None) -> dict:
    parser = faults.ArgumentParser(
        prog="prepare.py", description="Tokenize a dataset into train.bin, val.bin and meta.json.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--input", help="shakespeare*: tinyshakespeare's input.txt; openwebtext: a "
                        "dataset folder or save_to_disk folder (default: download); text: a file, "
                        "folder or glob of .txt/.jsonl/.json/.parquet files, local or gs://")
    parser.add_argument("--out_dir", help="a folder or gs:// URL (default: data/<dataset>, or "
                        "data/<name> for text)")
    parser.add_argument("--name", help="text: the dataset's name (default: out_dir's)")
    parser.add_argument("--tokenizer", default="gpt2", choices=whole_text.TOKENIZERS,
                        help="text: GPT-2 BPE (default) or one token per distinct character, as "
                        "shakespeare_char (a smaller, faster model; the text is read into memory)")
    parser.add_argument("--subset", help=f"fineweb_edu: the subset of {fineweb.REPO} (default "
                        f"{fineweb.DEFAULT_SUBSET}; sample-100BT, CC-MAIN-2024-10, ...)")
    parser.add_argument("--text_field", default="text", help="text: the JSON field or parquet "
                        "column holding the documents (default: text)")
    fractions = f"{VAL_FRACTION['text']} for text, {VAL_FRACTION['fineweb_edu']} for fineweb_edu"
    parser.add_argument("--val_fraction", type=float, help="fineweb_edu, text: the fraction of "
                        f"the text held out for val: whole documents (default {fractions}), or "
                        f"the last part of text with fewer than {MIN_VAL_DOCUMENTS} / val_fraction "
                        f"documents (default {POSITION_VAL_FRACTION})")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED,
                        help=f"fineweb_edu, text: the val split's seed (default: {SPLIT_SEED})")
    parser.add_argument("--num_proc", type=int, help="openwebtext: processes (default: "
                        f"{DEFAULT_NUM_PROC}); fineweb_edu, text: tokenizer threads (default: one "
                        "per core)")
    interrupted = "interrupted; run the same command again to resume"
    with faults.errors_reported("prepare.py", interrupted=interrupted):
        args = parser.parse_args(argv)
        options = dict(name=args.name, subset=args.subset, val_fraction=args.val_fraction,
                       seed=args.seed, text_field=args.text_field, tokenizer=args.tokenizer)
        out_dir = args.out_dir or default_out_dir(args.dataset, args.name, args.subset)
        meta = prepare(args.dataset, out_dir, args.input, args.num_proc, **options)
    documents_line = (f" ({meta['train_documents']:,} and {meta['val_documents']:,} documents)"
                      if "train_documents" in meta else "")
    print(f"{meta['dataset']}: {meta['tokenizer']} vocabulary of {meta['vocab_size']:,} tokens "
          f"({meta['dtype']}); train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} "
          f"tokens{documents_line} -> {out_dir}")
    if args.dataset == "text":
        where = (f"dataset={meta['dataset']}" if os.path.normpath(out_dir) == os.path.join(
            "data", meta["dataset"]) else f"data_dir={out_dir}")
        print(f"train on it: python train.py --config=configs/shakespeare_char.py:cpu "
              f"--config.{where} --config.out_dir=out-{meta['dataset']}")
    return meta
