"""tinyshakespeare, as nanoGPT's shakespeare_char and shakespeare: the text's first 90% is train,
the rest val, tokenized by characters (one token per distinct character) or by GPT-2 BPE."""

import os
import shutil
import urllib.request
from pathlib import Path

from flaxgpt import storage
from flaxgpt.prepare.dataset_folder import token_dtype, write_meta, write_tokens
from flaxgpt.prepare.tokenize_documents import gpt2
from flaxgpt.tokenizer import CharTokenizer, local_data_file

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
            raise ValueError(f"--input {input_path} is not a regular file (a pipe or a device): "
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
        raise ValueError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}): give a plain "
                         "text file") from None
    if len(text) < 10:
        raise ValueError(f"{source} holds {len(text)} characters: a dataset needs text to split "
                         "into train and val (tinyshakespeare has about 1.1M)")
    if name == "shakespeare_char":
        tokenizer = CharTokenizer.from_text(text)
        encode, kind, extra = tokenizer.encode, "char", {"chars": tokenizer.chars}
    else:
        tokenizer = gpt2()
        encode, kind, extra = tokenizer.encode_ordinary, "gpt2", {}
    dtype = token_dtype(tokenizer.vocab_size)
    n = int(len(text) * 0.9)
    counts = {}
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = encode(part)
        write_tokens(out_dir / f"{split}.bin", [[ids]], len(ids), dtype)
        counts[f"{split}_tokens"] = len(ids)
    meta = {"dataset": name, "tokenizer": kind, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
            **counts, **extra}
    write_meta(out_dir, meta)
    return meta
