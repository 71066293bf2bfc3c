"""Tokenizers and vocabulary metadata: GPT-2 BPE through tiktoken, nanoGPT's character vocabulary,
and the one reader of the files that say which a dataset or a training run uses (meta.json,
nanoGPT's meta.pkl).

Offline machines: set FLAXGPT_DATA to a folder that mirrors the downloads
(`gpt2/r50k_base.tiktoken`, `tinyshakespeare/input.txt`); anything missing there is downloaded.
"""

import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import tiktoken

from flaxgpt import storage

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's last token
GPT2_VOCAB_SIZE = 50257
GPT2_PADDED_VOCAB_SIZE = 50304  # rounded up to a multiple of 64: nanoGPT's faster vocabulary
GPT2_META = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "dtype": "uint16"}


def local_data_file(relative: str) -> Path | None:
    """`$FLAXGPT_DATA/relative` if FLAXGPT_DATA is set and the file is there, else None."""
    root = os.environ.get("FLAXGPT_DATA")
    path = Path(root) / relative if root else None
    return path if path and path.is_file() else None


def user_cache_dir() -> Path:
    """Where flaxgpt keeps downloads and compiled programs: $FLAXGPT_CACHE, else ~/.cache/flaxgpt
    (RuntimeError without a home directory)."""
    return Path(os.environ.get("FLAXGPT_CACHE") or Path.home() / ".cache" / "flaxgpt")


class CharTokenizer:
    """nanoGPT's shakespeare_char vocabulary: one token per distinct character, sorted."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise ValueError(f"characters not in this model's vocabulary: {''.join(missing)!r} "
                             f"(it knows {self.vocab_size} characters: {''.join(self.chars)!r})")
        return [self.stoi[c] for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


class GPT2Tokenizer:
    """GPT-2 BPE (tiktoken's `gpt2` encoding); `<|endoftext|>` is allowed in text: token 50256."""

    vocab_size = GPT2_VOCAB_SIZE
    eot_token = GPT2_EOT

    def __init__(self, ranks_file: str | os.PathLike | None = None):
        self.encoding = gpt2_encoding(ranks_file)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.encoding.decode([int(t) for t in tokens])


Tokenizer = CharTokenizer | GPT2Tokenizer


def gpt2_encoding(ranks_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding, from a local ranks file if there is one, else downloaded."""
    ranks_file = ranks_file or local_data_file("gpt2/r50k_base.tiktoken")
    if ranks_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' and urllib's connection errors differ between versions
            raise RuntimeError(
                f"could not download GPT-2's BPE ranks ({type(e).__name__}). Offline, set "
                "FLAXGPT_DATA to a folder holding gpt2/r50k_base.tiktoken (or TIKTOKEN_CACHE_DIR "
                "to tiktoken's cache).") from None
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(ranks_file), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT},
                             explicit_n_vocab=GPT2_VOCAB_SIZE)


def from_meta(meta: dict | None) -> Tokenizer:
    """The tokenizer of a meta.json: {"tokenizer": "char", "chars": [...]}, else GPT-2 BPE."""
    if meta and meta.get("tokenizer") == "char":
        return CharTokenizer(meta["chars"])
    return GPT2Tokenizer()


def from_dir(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset or a training run's out_dir (see `read_meta`)."""
    return from_meta(read_meta(folder))


def read_meta(folder: str | os.PathLike) -> dict:
    """The vocabulary description in `folder`: {"tokenizer", "vocab_size", "dtype", ...}, from
    meta.json (written by prepare.py and train.py), else nanoGPT's meta.pkl (characters, uint16
    tokens), else GPT-2 BPE in uint16 as nanoGPT's openwebtext and shakespeare folders hold, marked
    {"assumed": True} so that callers can say so."""
    folder = storage.path(folder)
    if (folder / "meta.json").is_file():
        try:
            return json.loads((folder / "meta.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder / 'meta.json'} is not valid JSON ({e}): prepare the dataset "
                             "again") from None
    if (folder / "meta.pkl").is_file():
        return {**read_nanogpt_meta(folder / "meta.pkl"), "dtype": "uint16"}
    return {**GPT2_META, "assumed": True}


def model_vocab_size(meta: dict) -> int:
    """The vocabulary of a model trained from scratch on a dataset: GPT-2 BPE is padded to 50304
    (nanoGPT's faster size), any other vocabulary is the dataset's."""
    return GPT2_PADDED_VOCAB_SIZE if meta.get("tokenizer", "gpt2") == "gpt2" else meta["vocab_size"]


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, strings, numbers) and refuses every class or function."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl should hold only "
                                     "a plain dict, and unpickling a global could run arbitrary "
                                     "code")


def read_nanogpt_meta(meta_pkl_path: str | os.PathLike) -> dict:
    """nanoGPT's meta.pkl ({vocab_size, itos, stoi}) -> {"tokenizer": "char", "chars": [...],
    "vocab_size": V}, read without executing anything (a class or function is refused)."""
    path = storage.path(meta_pkl_path)
    try:
        with path.open("rb") as f:
            meta = _PlainDataUnpickler(f).load()
    # a text file, a truncated pickle, ...
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as e:
        if str(e).startswith("refusing"):
            raise ValueError(f"{path}: {e}") from None
        raise ValueError(f"{path} is not nanoGPT's meta.pkl ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not {"vocab_size", "itos"} <= meta.keys():
        raise ValueError(f"{path} is not nanoGPT's meta.pkl: expected a dict with vocab_size and "
                         "itos")
    try:
        vocab_size = int(meta["vocab_size"])
        chars = [meta["itos"][i] for i in range(vocab_size)]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its itos does not cover "
                         f"vocab_size={meta['vocab_size']!r} ({e})") from None
    if not all(isinstance(c, str) for c in chars):
        raise ValueError(f"{path}: itos must map token ids to strings")
    return {"tokenizer": "char", "chars": chars, "vocab_size": vocab_size}


class StreamDecoder:
    """Text of a growing token list, piece by piece: each `push` returns what the new token adds. A
    BPE token can end inside a multi-byte character (U+FFFD until its last byte comes), so a
    trailing U+FFFD is held back until the next token (or `flush`) settles it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self.flush(hold=True)

    def flush(self, hold: bool = False) -> str:
        """The text not yet returned; hold: none while it ends in U+FFFD."""
        text = self.tokenizer.decode(self.tokens)
        if hold and text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new
