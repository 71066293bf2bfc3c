"""Tokenizers and vocabulary metadata (flaxgpt/tokenizer.py): meta.json, nanoGPT's meta.pkl,
streaming text."""

import json
import os
import pickle

import pytest

from flaxgpt import tokenizer
from flaxgpt.tokenizer import GPT2Tokenizer, StreamDecoder

CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak."))


def write_meta_pkl(folder, meta):
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def test_read_nanogpt_meta(tmp_path):
    write_meta_pkl(tmp_path, {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                              "stoi": {c: i for i, c in enumerate(CHARS)}})
    read = tokenizer.read_nanogpt_meta(tmp_path / "meta.pkl")
    assert read == {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}
    tok = tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == len(CHARS) and tok.decode(tok.encode("hear me")) == "hear me"


class _Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_read_nanogpt_meta_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    write_meta_pkl(tmp_path, {"vocab_size": 1, "itos": {0: _Malicious(marker)}})
    with pytest.raises(ValueError, match="refusing to load .*system"):
        tokenizer.read_nanogpt_meta(tmp_path / "meta.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    # a text file given as meta.pkl
    (b"vocab_size: 65\n", "is not nanoGPT's meta.pkl"),
    (b"", "is not nanoGPT's meta.pkl"),
    (pickle.dumps([1, 2, 3]), "expected a dict with vocab_size and itos"),
    (pickle.dumps({"vocab_size": 3, "itos": {0: "a"}}), "does not cover vocab_size=3"),
])
def test_read_nanogpt_meta_errors_are_one_line(tmp_path, content, message):
    (tmp_path / "meta.pkl").write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        tokenizer.read_meta(tmp_path)
    assert "\n" not in str(e.value)


def test_read_meta_prefers_meta_json_and_assumes_gpt2_without_either(tmp_path):
    assert tokenizer.read_meta(tmp_path) == {**tokenizer.GPT2_META, "assumed": True}
    assert isinstance(tokenizer.from_dir(tmp_path), GPT2Tokenizer)
    write_meta_pkl(tmp_path, {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS))})
    assert tokenizer.read_meta(tmp_path)["tokenizer"] == "char"
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257,
                                                    "dtype": "uint16"}))
    assert tokenizer.read_meta(tmp_path)["tokenizer"] == "gpt2"
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenizer.read_meta(tmp_path)


def test_model_vocab_size_pads_gpt2_only():
    padded = tokenizer.model_vocab_size(tokenizer.GPT2_META)
    assert padded == tokenizer.GPT2_PADDED_VOCAB_SIZE == 50304
    assert tokenizer.model_vocab_size({"tokenizer": "char", "vocab_size": 65}) == 65


def test_char_tokenizer_names_unknown_characters():
    tok = tokenizer.CharTokenizer(CHARS)
    with pytest.raises(ValueError, match="'j'"):
        tok.encode("jazz")


def test_gpt2_tokenizer_round_trip_and_end_of_text():
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world<|endoftext|>")
    assert ids[-1] == tokenizer.GPT2_EOT and tok.decode(ids) == "Hello world<|endoftext|>"
    assert tok.encode_ordinary("Hello world") == ids[:-1]


def test_stream_decoder_holds_back_partial_characters():
    tok = GPT2Tokenizer()
    text = "日本 café ✓"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # some token ended inside a character
