"""Tokenizers: GPT-2 BPE through tiktoken, and nanoGPT's character vocabulary.

Offline machines: set FLAXGPT_DATA to a folder that mirrors the downloads
(`gpt2/r50k_base.tiktoken`, `tinyshakespeare/input.txt`); anything missing there is downloaded.
"""

import os
from pathlib import Path
from typing import Protocol, Sequence

import tiktoken

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257


def local_data_file(relative: str) -> Path | None:
    """`$FLAXGPT_DATA/relative` if FLAXGPT_DATA is set and the file is there, else None."""
    root = os.environ.get("FLAXGPT_DATA")
    if root and (Path(root) / relative).is_file():
        return Path(root) / relative
    return None


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


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
    """GPT-2 BPE (tiktoken's `gpt2` encoding); `<|endoftext|>` is allowed in text and is token 50256."""

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


def gpt2_encoding(ranks_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding, from a local ranks file when there is one, else tiktoken's download."""
    ranks_file = ranks_file or local_data_file("gpt2/r50k_base.tiktoken")
    if ranks_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' and urllib's connection errors differ between versions
            raise RuntimeError(
                f"could not download GPT-2's BPE ranks ({type(e).__name__}). Offline, set FLAXGPT_DATA to a "
                "folder holding gpt2/r50k_base.tiktoken (or TIKTOKEN_CACHE_DIR to tiktoken's cache).") from None
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(ranks_file), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def from_meta(meta: dict | None) -> Tokenizer:
    """The tokenizer a dataset's meta.json describes: {"tokenizer": "char", "chars": [...]} or GPT-2 BPE."""
    if meta and meta.get("tokenizer") == "char":
        return CharTokenizer(meta["chars"])
    return GPT2Tokenizer()
