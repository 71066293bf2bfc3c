"""Text held in memory: tinyshakespeare as nanoGPT's shakespeare_char and shakespeare prepare it,
and your own text when it has too few documents to hold whole ones out (`prepare.py text`).

Split by position, as nanoGPT splits tinyshakespeare: the first (1 - val_fraction) of the characters
is train, the rest val (the document at the cut is cut in two); or, given which documents go to
val, by document. Tokenized by characters (one token per distinct character, nanoGPT's
shakespeare_char way) or by GPT-2 BPE; your own documents end with "\n" or <|endoftext|>.
"""

import os
import shutil
import urllib.request
from pathlib import Path

from flaxgpt import storage
from flaxgpt.faults import UserError
from flaxgpt.prepare.dataset_folder import SPLITS, token_dtype, write_meta, write_tokens
from flaxgpt.prepare.tokenize_documents import gpt2
from flaxgpt.tokenizer import GPT2_EOT, CharTokenizer, local_data_file

TOKENIZERS = ("gpt2", "char")
SHAKESPEARE_VAL_FRACTION = 0.1  # nanoGPT's: the last 10% of the text
Pieces = list[tuple[str, bool]]  # (text, whether a document ends with it)

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")


def fetch_tinyshakespeare(out_dir: storage.Path,
                          input_path: str | os.PathLike | None = None) -> Path:
    """The tinyshakespeare text: `input_path`, else $FLAXGPT_DATA's copy, else `out_dir/input.txt`,
    downloaded there if it is not there yet."""
    if input_path is not None:
        path = Path(input_path)
        if not path.exists():
            raise FileNotFoundError(f"--input {input_path}: no such file")
        if path.is_dir():
            raise IsADirectoryError(f"--input {input_path} is a directory: give the text file "
                                    "itself")
        if not path.is_file():
            raise UserError(f"--input {input_path} is not a regular file (a pipe or a device): "
                             "save the text to a file first")
        return path
    local = local_data_file("tinyshakespeare/input.txt") or out_dir / "input.txt"
    if local.is_file():
        return local
    try:
        with (urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as response,
              storage.atomic_output(local) as f):
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError, HTTPError, timeouts, refused connections
        raise ConnectionError(f"could not download {TINYSHAKESPEARE_URL} ({e}): pass --input PATH "
                              "to a local copy, or set FLAXGPT_DATA to a folder holding "
                              "tinyshakespeare/input.txt") from None
    return local


def prepare_shakespeare(name: str, out_dir: storage.Path,
                        input_path: str | os.PathLike | None = None) -> dict:
    """Tokenize tinyshakespeare by characters or GPT-2 BPE; the first 90% is train, the rest val."""
    source = fetch_tinyshakespeare(out_dir, input_path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}): give a plain "
                        "text file") from None
    train, val = split_by_position([text], SHAKESPEARE_VAL_FRACTION)
    tokenizer = "char" if name == "shakespeare_char" else "gpt2"
    split = {"val_fraction": SHAKESPEARE_VAL_FRACTION, "by": "position"}
    return write_pieces(out_dir, name, tokenizer, train, val, split, end_documents=False)


def split_by_position(documents: list[str], val_fraction: float) -> tuple[Pieces, Pieces]:
    """(train, val) pieces of `documents`, cut at character int(n * (1 - val_fraction)) of their
    n characters."""
    cut, seen = int(sum(map(len, documents)) * (1 - val_fraction)), 0
    train, val = [], []
    for doc in documents:
        if seen >= cut:
            val.append((doc, True))
        elif seen + len(doc) <= cut:
            train.append((doc, True))
        else:
            train.append((doc[:cut - seen], False))
            val.append((doc[cut - seen:], True))
        seen += len(doc)
    return train, val


def write_pieces(out_dir: storage.Path, name: str, tokenizer: str, train: Pieces, val: Pieces,
                 split: dict, end_documents: bool = True, extra: dict | None = None) -> dict:
    """Tokenize the train and val pieces by `tokenizer` (char or gpt2) into out_dir's train.bin and
    val.bin, then meta.json; each document ends with "\n" (char) or <|endoftext|> (gpt2) if
    end_documents. A split without text is a UserError."""
    parts = {"train": train, "val": val}
    for split_name, pieces in parts.items():
        if not any(text for text, _ in pieces):
            n = sum(len(text) for text, _ in train + val)
            raise UserError(f"the {split_name} split got no text (of {n:,} characters): give more "
                            "text, or a --val_fraction nearer 0.5")
    if tokenizer == "char":
        texts = {s: "".join(t + ("\n" if end and end_documents else "") for t, end in pieces)
                 for s, pieces in parts.items()}
        char = CharTokenizer.from_text(texts["train"] + texts["val"])
        ids = {s: char.encode(text) for s, text in texts.items()}
        vocab_size, extra = char.vocab_size, {**(extra or {}), "chars": char.chars}
    else:
        bpe, eot = gpt2(), [GPT2_EOT] if end_documents else []
        ids = {s: [t for text, end in pieces
                   for t in bpe.encode_ordinary(text) + (eot if end else [])]
               for s, pieces in parts.items()}
        vocab_size = bpe.vocab_size
    dtype = token_dtype(vocab_size)
    for s in SPLITS:
        write_tokens(out_dir / f"{s}.bin", [[ids[s]]], len(ids[s]), dtype)
    meta = {"dataset": name, "tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": dtype,
            **{f"{s}_tokens": len(ids[s]) for s in SPLITS}, "split": split, **(extra or {})}
    write_meta(out_dir, meta)
    return meta
