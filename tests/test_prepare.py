"""Dataset preparation (flaxgpt/prepare.py): token files, meta.json, sources and their errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import flaxgpt.prepare as prep
from flaxgpt.data import load_meta, open_split
from flaxgpt.prepare import dataset_folder, openwebtext, shakespeare
from flaxgpt.tokenizer import GPT2_EOT, GPT2Tokenizer, from_meta

SHARED = Path(__file__).parents[1].parent / "shared/data"
RANKS = SHARED / "gpt2/r50k_base.tiktoken"
needs_ranks = pytest.mark.skipif(not RANKS.is_file(), reason=f"GPT-2 BPE ranks not at {RANKS} (offline machine)")


@pytest.fixture
def gpt2_ranks(monkeypatch):
    monkeypatch.setenv("FLAXGPT_DATA", str(SHARED))


def shakespeare_text(tmp_path) -> Path:
    """The shared tinyshakespeare corpus, or a small generated stand-in when this checkout has none."""
    shared = SHARED / "tinyshakespeare/input.txt"
    if shared.is_file():
        return shared
    rng = np.random.default_rng(0)
    words = ["First", "Citizen:", "Before", "we", "proceed", "any", "further,", "hear", "me", "speak.", "\n"]
    path = tmp_path / "input.txt"
    path.write_text(" ".join(rng.choice(words, size=20_000)), encoding="utf-8")
    return path


def test_shakespeare_char(tmp_path):
    source = shakespeare_text(tmp_path)
    text = source.read_text(encoding="utf-8")
    meta = prep.prepare("shakespeare_char", out_dir=tmp_path / "out", input_path=source)
    assert meta == load_meta(tmp_path / "out")
    n_train = int(len(text) * 0.9)
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(text))
    assert meta["vocab_size"] == len(meta["chars"]) and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (n_train, len(text) - n_train)
    if source.parent.parent == SHARED:
        assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    train, val = open_split(tmp_path / "out", "train"), open_split(tmp_path / "out", "val")
    assert train.dtype == np.uint16 and len(train) == n_train
    assert from_meta(meta).decode(np.concatenate([train, val])) == text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_text_from_flaxgpt_data(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "tinyshakespeare").mkdir(parents=True)
    text = "To be, or not to be: that is the question.\n" * 10
    (mirror / "tinyshakespeare/input.txt").write_text(text)
    monkeypatch.setenv("FLAXGPT_DATA", str(mirror))
    monkeypatch.setattr(shakespeare, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # must not be used
    meta = prep.prepare("shakespeare_char", out_dir=tmp_path / "out")
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert not (tmp_path / "out/input.txt").exists()


@needs_ranks
def test_shakespeare_bpe_cli(tmp_path, gpt2_ranks, capsys):
    text = shakespeare_text(tmp_path).read_text(encoding="utf-8")[:20_000]
    source = tmp_path / "slice.txt"
    source.write_text(text, encoding="utf-8")
    meta = prep.main(["shakespeare", "--input", str(source), "--out_dir", str(tmp_path / "out")])
    assert "50,257" in capsys.readouterr().out
    tokenizer = GPT2Tokenizer()
    assert tokenizer.encode("hello world") == [31373, 995]
    assert {k: meta[k] for k in ("dataset", "tokenizer", "vocab_size", "dtype")} == {
        "dataset": "shakespeare", "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}
    n = int(len(text) * 0.9)  # split on characters first, then encode each part, as nanoGPT
    train, val = open_split(tmp_path / "out", "train"), open_split(tmp_path / "out", "val")
    assert train.tolist() == tokenizer.encode_ordinary(text[:n]) and len(train) == meta["train_tokens"]
    assert tokenizer.decode(val) == text[n:] and len(val) == meta["val_tokens"]


@needs_ranks
def test_openwebtext_documents_end_with_eot(tmp_path, gpt2_ranks):
    docs = {"train": ["hello world", "", "The quick brown fox.\n\nJumps."], "val": ["<|endoftext|> is text here"]}
    meta = openwebtext.write_documents(docs, tmp_path)
    tokenizer = GPT2Tokenizer()
    for split, texts in docs.items():
        expected = [t for text in texts for t in tokenizer.encode_ordinary(text) + [GPT2_EOT]]
        tokens = open_split(tmp_path, split)
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected
        assert meta[f"{split}_tokens"] == len(expected)
    assert open_split(tmp_path, "train")[:3].tolist() == [31373, 995, GPT2_EOT]
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "gpt2" and meta["dataset"] == "openwebtext"


def test_token_files_are_written_whole_or_not_at_all(tmp_path):
    token_dtype = dataset_folder.token_dtype
    assert token_dtype(65) == token_dtype(65_536) == "uint16" and token_dtype(65_537) == "uint32"

    def shards():
        yield [[1, 2, 3], [70_000]]
        raise KeyboardInterrupt  # interrupted half way

    with pytest.raises(KeyboardInterrupt):
        dataset_folder.write_tokens(tmp_path / "train.bin", shards(), 8, "uint32")
    assert os.listdir(tmp_path) == []
    dataset_folder.write_tokens(tmp_path / "train.bin", [[[1, 2, 3], [70_000]], [[5]]], 5, "uint32")
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint32).tolist() == [1, 2, 3, 70_000, 5]


def test_failed_download_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLAXGPT_DATA", raising=False)
    monkeypatch.setattr(shakespeare, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens there
    with pytest.raises(ConnectionError, match=r"could not download .*pass --input PATH.*set FLAXGPT_DATA"):
        prep.prepare("shakespeare_char", out_dir=tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        prep.main(["shakespeare_char", "--out_dir", str(tmp_path / "out")])
    assert "--input" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path / "out") == []  # no partial input.txt or token files
    with pytest.raises(SystemExit, match="no such file"):
        prep.main(["shakespeare_char", "--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path)])


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d, "is a directory"),
    (lambda d: (d / "empty.txt", (d / "empty.txt").write_text(""))[0], "holds 0 characters"),
    (lambda d: (d / "data.bin", (d / "data.bin").write_bytes(bytes(range(256)) * 4))[0], "is not UTF-8 text"),
    (lambda d: (d / "fifo", os.mkfifo(d / "fifo"))[0], "not a regular file"),
])
def test_bad_input_files_are_one_line_and_write_nothing(tmp_path, make_input, message):
    source = tmp_path / "source"
    source.mkdir()
    with pytest.raises(SystemExit) as e:
        prep.main(["shakespeare_char", "--input", str(make_input(source)), "--out_dir", str(tmp_path / "out")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()
