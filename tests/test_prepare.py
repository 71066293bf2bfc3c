"""Dataset preparation (flaxgpt/prepare.py): token files, meta.json, sources and their errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import flaxgpt.prepare as prep
from flaxgpt.data import load_meta, open_split
from flaxgpt.prepare import dataset_folder, openwebtext, whole_text
from flaxgpt.tokenizer import GPT2_EOT, GPT2Tokenizer, from_meta

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).parents[1].parent / "shared/data"
RANKS = SHARED / "gpt2/r50k_base.tiktoken"
needs_ranks = pytest.mark.skipif(not RANKS.is_file(),
                                 reason=f"GPT-2 BPE ranks not at {RANKS} (offline machine)")


@pytest.fixture
def gpt2_ranks(monkeypatch):
    monkeypatch.setenv("FLAXGPT_DATA", str(SHARED))


def shakespeare_text(tmp_path) -> Path:
    """The shared tinyshakespeare corpus, or a small generated stand-in where there is none."""
    shared = SHARED / "tinyshakespeare/input.txt"
    if shared.is_file():
        return shared
    rng = np.random.default_rng(0)
    words = ["First", "Citizen:", "Before", "we", "proceed", "any", "further,", "hear", "me",
             "speak.", "\n"]
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
        counts = (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"])
        assert counts == (65, 1_003_854, 111_540)
    train, val = open_split(tmp_path / "out", "train"), open_split(tmp_path / "out", "val")
    assert train.dtype == np.uint16 and len(train) == n_train
    assert from_meta(meta).decode(np.concatenate([train, val])) == text
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["meta.json", "train.bin", "val.bin"]


def test_text_from_flaxgpt_data(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "tinyshakespeare").mkdir(parents=True)
    text = "To be, or not to be: that is the question.\n" * 10
    (mirror / "tinyshakespeare/input.txt").write_text(text)
    monkeypatch.setenv("FLAXGPT_DATA", str(mirror))
    # must not be used:
    monkeypatch.setattr(whole_text, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
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
    assert train.tolist() == tokenizer.encode_ordinary(text[:n])
    assert len(train) == meta["train_tokens"]
    assert tokenizer.decode(val) == text[n:] and len(val) == meta["val_tokens"]


@needs_ranks
def test_openwebtext_documents_end_with_eot(tmp_path, gpt2_ranks):
    docs = {"train": ["hello world", "", "The quick brown fox.\n\nJumps."],
            "val": ["<|endoftext|> is text here"]}
    meta = openwebtext.write_documents(docs, tmp_path)
    tokenizer = GPT2Tokenizer()
    for split, texts in docs.items():
        expected = [t for text in texts for t in tokenizer.encode_ordinary(text) + [GPT2_EOT]]
        tokens = open_split(tmp_path, split)
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected
        assert meta[f"{split}_tokens"] == len(expected)
    assert open_split(tmp_path, "train")[:3].tolist() == [31373, 995, GPT2_EOT]
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert (meta["dtype"], meta["tokenizer"], meta["dataset"]) == ("uint16", "gpt2", "openwebtext")


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
    # nothing listens there:
    monkeypatch.setattr(whole_text, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(ConnectionError,
                       match=r"could not download .*pass --input PATH.*set FLAXGPT_DATA"):
        prep.prepare("shakespeare_char", out_dir=tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        prep.main(["shakespeare_char", "--out_dir", str(tmp_path / "out")])
    assert "--input" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # no partial input.txt or token files, no folder
    with pytest.raises(SystemExit, match="no such file"):
        prep.main(["shakespeare_char", "--input", str(tmp_path / "missing.txt"), "--out_dir",
                   str(tmp_path)])


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d, "is a directory"),
    (lambda d: (d / "empty.txt", (d / "empty.txt").write_text(""))[0], "(of 0 characters)"),
    (lambda d: (d / "data.bin", (d / "data.bin").write_bytes(bytes(range(256)) * 4))[0],
     "is not UTF-8 text"),
    (lambda d: (d / "fifo", os.mkfifo(d / "fifo"))[0], "not a regular file"),
])
def test_bad_input_files_are_one_line_and_write_nothing(tmp_path, make_input, message):
    source = tmp_path / "source"
    source.mkdir()
    with pytest.raises(SystemExit) as e:
        prep.main(["shakespeare_char", "--input", str(make_input(source)), "--out_dir",
                   str(tmp_path / "out")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


# fineweb_edu and text: documents streamed from files, tokenized in threads, a seeded val split.

FINEWEB_EDU_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score",
                       "token_count", "score", "int_score")


def documents_of(text: str, n: int) -> list[str]:
    """n distinct documents of a few hundred characters cut from `text` (numbered: none equal)."""
    step = max(len(text) // n, 1)
    return [f"Document {i}.\n{text[i * step:(i + 1) * step].strip()}" for i in range(n)]


def write_fineweb_edu_parquet(path: Path, texts: list[str], row_group_size: int = 64) -> Path:
    """A parquet file with HuggingFaceFW/fineweb-edu's columns, a row per document."""
    pa = pytest.importorskip("pyarrow", reason="parquet needs pyarrow: pip install 'flaxgpt[data]'")
    import pyarrow.parquet as pq
    n = len(texts)
    columns = {"text": texts, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
               "dump": ["CC-MAIN-2024-10"] * n,
               "url": [f"https://example.org/{i}" for i in range(n)],
               "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/0.warc.gz"] * n,
               "language": ["en"] * n, "language_score": [0.97] * n,
               "token_count": [len(t) // 4 for t in texts], "score": [3.2] * n,
               "int_score": [3] * n}
    assert tuple(columns) == FINEWEB_EDU_COLUMNS
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, texts: list[str], **extra) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text, **extra}) + "\n")
    return path


def split_documents(tokens) -> list[list[int]]:
    """A token file cut after each <|endoftext|>: a token list per document (all must end so)."""
    tokens = np.asarray(tokens).tolist()
    assert not tokens or tokens[-1] == GPT2_EOT
    docs, current = [], []
    for token in tokens:
        if token == GPT2_EOT:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


def read_splits(folder) -> dict[str, list[str]]:
    tokenizer = GPT2Tokenizer()
    return {split: [tokenizer.decode(doc) for doc in split_documents(open_split(folder, split))]
            for split in ("train", "val")}


def accepted_by_train(folder) -> bool:
    """Whether train.py would open `folder` as a dataset (data.Dataset.open: its meta, both splits
    and their lengths)."""
    import ml_collections
    from flaxgpt.data import Dataset
    try:
        Dataset.open(ml_collections.ConfigDict({"data_dir": str(folder), "dataset": "x"}))
        return True
    except (FileNotFoundError, ValueError):
        return False


@pytest.fixture(scope="module")
def corpus_docs() -> list[str]:
    from conftest import corpus_text
    return documents_of(corpus_text(400_000), 600)


@needs_ranks
def test_text_from_parquet_and_jsonl_is_every_document_once_with_eot(tmp_path, gpt2_ranks,
                                                                     corpus_docs, capsys):
    docs = corpus_docs[:300] + ["", "a literal <|endoftext|> is text", "surrogate \ud800 alone"]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_fineweb_edu_parquet(inputs / "000.parquet", docs[:200])
    write_jsonl(inputs / "001.jsonl", docs[200:], url="https://example.org")
    meta = prep.main(["text", "--input", str(inputs / "*"), "--name", "mine", "--out_dir", str(out),
                      "--val_fraction", "0.1", "--num_proc", "2"])
    assert "mine: gpt2 vocabulary of 50,257 tokens (uint16)" in capsys.readouterr().out
    assert meta == load_meta(out) and accepted_by_train(out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    tokenizer = GPT2Tokenizer()
    expected = [d.replace("\ud800", "\ufffd") for d in docs]
    splits = read_splits(out)
    for split, texts in splits.items():
        assert texts == [d for d in expected if d in set(texts)]  # input order within each split
        tokens = open_split(out, split)
        assert tokens.tolist() == [t for text in texts
                                   for t in tokenizer.encode_ordinary(text) + [GPT2_EOT]]
        assert meta[f"{split}_tokens"] == len(tokens) and meta[f"{split}_documents"] == len(texts)
        assert meta["sha256"][f"{split}.bin"] == dataset_folder.file_sha256(out / f"{split}.bin")
    assert sorted(splits["train"] + splits["val"]) == sorted(expected)
    assert 10 <= len(splits["val"]) <= 55  # 10% of 303 documents, binomially
    assert meta["source"] == {"input": str(inputs / "*"), "files": 2}
    assert meta["split"] == {"val_fraction": 0.1, "seed": prep.SPLIT_SEED, "by": "document"}
    assert (meta["dataset"], meta["tokenizer"], meta["dtype"]) == ("mine", "gpt2", "uint16")


@needs_ranks
def test_the_val_split_depends_on_seed_and_document_not_on_order_files_or_threads(
        tmp_path, gpt2_ranks, corpus_docs, monkeypatch):
    from flaxgpt.prepare import tokenize_documents
    monkeypatch.setattr(tokenize_documents, "CHUNK_CHARS", 2_000)  # many chunks in flight
    docs = corpus_docs[:400]
    write_jsonl(tmp_path / "all.jsonl", docs)
    (tmp_path / "parts").mkdir()
    shuffled = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    write_fineweb_edu_parquet(tmp_path / "parts" / "a.parquet", shuffled[:150], row_group_size=7)
    write_jsonl(tmp_path / "parts" / "b.jsonl", shuffled[150:])
    one_file = tmp_path / "all.jsonl"
    runs = {"one thread": (one_file, 1, 2357), "three threads": (one_file, 3, 2357),
            "shuffled": (tmp_path / "parts", 2, 2357), "other seed": (one_file, 2, 1)}
    metas, vals = {}, {}
    for run, (source, threads, seed) in runs.items():
        metas[run] = prep.prepare("text", tmp_path / run, source, threads, val_fraction=0.2,
                                  seed=seed)
        vals[run] = set(read_splits(tmp_path / run)["val"])
    assert metas["one thread"]["sha256"] == metas["three threads"]["sha256"]
    assert vals["one thread"] == vals["three threads"] == vals["shuffled"] != vals["other seed"]
    assert 40 <= len(vals["one thread"]) <= 120


@pytest.mark.parametrize("content, field, expected", [
    ("one\ntwo\n", "text", ["one\ntwo"]),
    ("first\n<|endoftext|>\nsecond\n\nstill second\n<|endoftext|>\n", "text",
     ["first", "second\n\nstill second"]),
    ('{"text": "a"}\n\n{"text": "b\\nc", "id": 2}\n', "text", ["a", "b\nc"]),
    ('{"body": "x"}\n', "body", ["x"]),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_documents_of_text_and_json_lines_files(tmp_path, content, field, expected, compressed):
    import gzip
    from flaxgpt.prepare import documents
    suffix = ".txt" if not content.startswith("{") else ".jsonl"
    path = tmp_path / ("f" + suffix + (".gz" if compressed else ""))
    path.write_bytes(gzip.compress(content.encode()) if compressed else content.encode())
    read = list(documents.read_documents(documents.storage.path(path), path.name, field))
    assert [text for text, _ in read] == expected
    positions = [position for _, position in read]
    assert positions == sorted(positions) and positions[-1] == path.stat().st_size


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", b"text\n", "unsupported file type"),
    ("a.jsonl", b'{"text": "ok"}\n{"body": "x"}\n',
     "line 2 has no 'text' field (it has: body): pass --text_field"),
    ("a.jsonl", b'{"text": 3}\n', "'text' holds a int, not text"),
    ("a.jsonl", b"not json\n", "line 1 is not a JSON object"),
    ("a.txt", b"caf\xe9\n", "line 1 is not UTF-8"),
    ("a.parquet", b"PAR1 but not really", "is not a parquet file"),
])
def test_bad_input_files_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
        prep.main(["text", "--input", str(tmp_path / name), "--out_dir", str(tmp_path / "out")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_missing_column_or_input_says_what_to_do(tmp_path):
    write_fineweb_edu_parquet(tmp_path / "a.parquet", ["x", "y"])
    with pytest.raises(SystemExit, match=r"no 'body' column \(it has: text, id, dump, url.*--tex"):
        prep.main(["text", "--input", str(tmp_path / "a.parquet"), "--out_dir", str(tmp_path / "o"),
                   "--text_field", "body"])
    out = ["--out_dir", str(tmp_path / "o")]
    for argv, message in [(["--input", str(tmp_path / "none*.jsonl"), *out], "no .parquet, .jsonl"),
                          (["--input", str(tmp_path / "missing.jsonl"), *out], "no such file or"),
                          (["--input", str(tmp_path / "**" / "*.parquet"), *out], r"\*\* is not"),
                          (out, "text needs --input"),
                          (["--input", str(tmp_path / "a.parquet")], "text needs --name NAME")]:
        with pytest.raises(SystemExit, match=message):
            prep.main(["text", *argv])


def book_in_files(tmp_path: Path, n_files: int) -> tuple[Path, str]:
    """A folder holding the first 40,000 characters of tinyshakespeare in n_files .txt files."""
    text = shakespeare_text(tmp_path).read_text(encoding="utf-8")[:40_000]
    folder, size = tmp_path / "book", len(text) // n_files
    folder.mkdir()
    for i in range(n_files):
        (folder / f"{i}.txt").write_text(text[i * size:(i + 1) * size if i < n_files - 1 else None])
    return folder, text


@needs_ranks
@pytest.mark.parametrize("n_files, val_fraction", [(1, None), (1, 0.5), (4, 0.5)])
def test_a_book_in_a_few_files_is_split_by_position(tmp_path, gpt2_ranks, capsys, n_files,
                                                    val_fraction):
    folder, text = book_in_files(tmp_path, n_files)
    argv = ["text", "--input", str(folder), "--out_dir", str(tmp_path / "out")]
    meta = prep.main(argv + (["--val_fraction", str(val_fraction)] if val_fraction else []))
    lines = capsys.readouterr().out.splitlines()
    assert f"{n_files} document" in lines[0] and "splitting by position, the last" in lines[0]
    fraction = val_fraction or 0.1
    assert meta["split"] == {"val_fraction": fraction, "by": "position"}
    tokenizer, eot = GPT2Tokenizer(), "<|endoftext|>"
    train, val = (tokenizer.decode(open_split(tmp_path / "out", s)) for s in ("train", "val"))
    assert (train + val).count(eot) == n_files and val.endswith(eot)
    n_val, n_all = len(val.replace(eot, "")), len((train + val).replace(eot, ""))
    assert abs(n_val / n_all - fraction) < 0.001  # of the text, not of the documents


def test_text_by_characters_as_shakespeare_char(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("To be, or not to be: that is the question.\n" * 50)
    meta = prep.main(["text", "--input", str(book), "--tokenizer", "char", "--out_dir",
                      str(tmp_path / "out")])
    text = book.read_text()
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(text))
    tokens = np.concatenate([open_split(tmp_path / "out", s) for s in ("train", "val")])
    assert from_meta(meta).decode(tokens) == text
    assert abs(meta["val_tokens"] / len(text) - 0.1) < 0.001
    assert "--config.dataset" not in capsys.readouterr().out  # out_dir is not data/<name>


def test_char_text_with_many_documents_is_split_by_document(tmp_path, corpus_docs):
    write_jsonl(tmp_path / "docs.jsonl", corpus_docs)
    meta = prep.prepare("text", tmp_path / "out", tmp_path / "docs.jsonl", tokenizer="char",
                        val_fraction=0.1)
    assert meta["split"]["by"] == "document" and meta["tokenizer"] == "char"
    from flaxgpt.prepare.tokenize_documents import in_val_split, split_keys
    keys = split_keys(0.1, prep.SPLIT_SEED)  # the same documents as the streamed BPE split takes
    val = [d for d in corpus_docs if in_val_split(d, **keys)[1]]
    assert 30 <= len(val) <= 100
    assert from_meta(meta).decode(open_split(tmp_path / "out", "val")) == "".join(
        d + "\n" for d in val)


def prepare_fails(capsys, argv) -> tuple[int, str]:
    """(exit code, the one line of stderr) of a prepare.py that fails."""
    with pytest.raises(SystemExit) as e:
        prep.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prepare.py: error: "), err
    return e.value.code, err.strip()


def test_a_failed_prepare_leaves_no_folder_and_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("")
    for argv, code, message in [
            (["text", "--input", "missing.txt", "--name", "mine"], 1, "no such file"),
            (["text", "--input", "empty.txt", "--name", "mine", "--tokenizer", "char"], 1,
             "no text"),
            (["nosuch"], 2, "invalid choice: 'nosuch'"),
            (["text", "--input", "empty.txt", "--name", "m", "--val_fraction", "1.5"], 2,
             "give a fraction between 0 and 1"),
            (["shakespeare", "--tokenizer", "char"], 2, "--tokenizer char: text takes"),
            (["shakespeare_char", "--out_dir", "afile"], 1, "--out_dir afile is a file: remove"),
            (["shakespeare_char", "--out_dir", "afile/sub"], 1, "a file is in the way")]:
        assert prepare_fails(capsys, argv)[0] == code
        assert message in prepare_fails(capsys, argv)[1]
    assert not (tmp_path / "data").exists()


def test_fineweb_edu_subsets_come_from_its_dataset_card():
    from flaxgpt.prepare import fineweb
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*/*"}]},
               {"config_name": "sample-10BT",
                "data_files": [{"split": "train", "path": "sample/10BT/*"}]},
               {"config_name": "CC-MAIN-2024-10", "data_files": "data/CC-MAIN-2024-10/*"}]
    assert fineweb.subset_patterns(configs, "sample-10BT") == ["sample/10BT/*"]
    assert fineweb.subset_patterns(configs, "CC-MAIN-2024-10") == ["data/CC-MAIN-2024-10/*"]
    assert [fineweb.static_prefix(p) for p in ("sample/10BT/*", "data/*/*")] == ["sample/10BT",
                                                                                 "data"]
    assert fineweb.matches("sample/10BT/000_00000.parquet", "sample/10BT/*")
    assert not fineweb.matches("sample/100BT/000_00000.parquet", "sample/10BT/*")
    assert fineweb.matches("data/CC-MAIN-2024-10/000_00000.parquet", "data/*/*")
    assert not fineweb.matches("data/CC-MAIN-2024-10/x/0.parquet", "data/*/*")  # * within a folder
    with pytest.raises(ValueError, match=r"no such subset \(its subsets: default, sample-10BT, C"):
        fineweb.subset_patterns(configs, "sample-1BT")
    assert prep.default_out_dir("fineweb_edu") == os.path.join("data", "fineweb_edu")
    assert prep.default_out_dir("fineweb_edu", subset="sample-100BT") == os.path.join(
        "data", "fineweb_edu_sample-100BT")


def test_fineweb_edu_without_the_hub_is_one_line_naming_the_offline_route(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        prep.main(["fineweb_edu", "--out_dir", str(tmp_path / "out")])
    assert "could not list the files of HuggingFaceFW/fineweb-edu (OfflineModeIsEna" in str(e.value)
    assert "prepare.py text --input 'DIR/*.parquet' --name fineweb_edu" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "meta.json").exists()


def fineweb_edu_run(data_dir, out_dir, **overrides):
    """configs/fineweb_edu.py shrunk to seconds on a CPU (conftest.TINY_RUN's model, two steps)."""
    from configs import fineweb_edu
    from conftest import TINY_RUN
    c = fineweb_edu.get_config()
    run = {"max_iters": 2, "eval_interval": 2, "eval_iters": 1, "data_dir": str(data_dir),
           "out_dir": str(out_dir)}
    for key, value in {**TINY_RUN, **run, **overrides}.items():
        c[key] = value
    return c


def test_the_fineweb_edu_config_is_build_nanogpts_gpt2_124m():
    from configs import fineweb_edu
    from flaxgpt.config import validate
    c = fineweb_edu.get_config()
    validate(c)
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 2**19  # tokens a step
    assert c.max_iters == 10**10 // 2**19  # one pass over 10B tokens, rounded as build-nanogpt
    assert (c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters) == (6e-4, 6e-5, 715, 19073)
    assert (c.weight_decay, c.n_layer, c.n_embd, c.dataset) == (0.1, 12, 768, "fineweb_edu")


@needs_ranks
def test_text_in_a_bucket_to_a_bucket_trains_with_the_fineweb_edu_config(tmp_path, gpt2_ranks,
                                                                         gcs_dir, corpus_docs):
    import gcsfs
    from flaxgpt.loop import train
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    write_fineweb_edu_parquet(tmp_path / "000_00000.parquet", corpus_docs[:300])
    write_jsonl(tmp_path / "001_00000.jsonl", corpus_docs[300:])
    (tmp_path / "notes.csv").write_text("a,b\n")
    for name, folder in (("000_00000.parquet", ""), ("001_00000.jsonl", ""), ("notes.csv", "x/")):
        fs.put_file(str(tmp_path / name), f"{gcs_dir}/raw/{folder}{name}")  # the csv is left out
    bucket_out = f"{gcs_dir}/data/mine"
    meta = prep.main(["text", "--input", f"{gcs_dir}/raw", "--out_dir", bucket_out,
                      "--val_fraction", "0.1"])
    local = prep.prepare("text", tmp_path / "local", tmp_path / "*_00000.*", val_fraction=0.1)
    assert meta["sha256"] == local["sha256"] and meta["source"]["files"] == 2
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(bucket_out)) == ["meta.json", "train.bin",
                                                                      "val.bin"]
    assert not prep.Staging.folder_for(prep.storage.path(bucket_out)).exists()
    again = prep.prepare("text", bucket_out, f"{gcs_dir}/raw", val_fraction=0.3)  # replaces it
    assert load_meta(bucket_out) == again and again["val_tokens"] > meta["val_tokens"]
    losses = train(fineweb_edu_run(bucket_out, tmp_path / "run"))
    assert np.isfinite(losses["val"]) and losses["step"] == 2
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["tokenizer"] == "gpt2"


def staged(out_dir: Path) -> Path:
    from flaxgpt.prepare.tokenize_documents import STAGING_DIR
    return out_dir / STAGING_DIR


@needs_ranks
def test_an_interrupted_prepare_is_no_dataset_and_resumes_to_the_same_one(tmp_path, gpt2_ranks,
                                                                          corpus_docs, monkeypatch,
                                                                          capsys):
    from flaxgpt.prepare import tokenize_documents
    write_fineweb_edu_parquet(tmp_path / "a.parquet", corpus_docs[:250])
    write_jsonl(tmp_path / "b.jsonl", corpus_docs[250:])
    clean = prep.prepare("text", tmp_path / "clean", tmp_path / "?.*", val_fraction=0.1)
    monkeypatch.setattr(tokenize_documents, "CHUNK_CHARS", 3_000)
    monkeypatch.setattr(tokenize_documents, "CHECKPOINT_SECONDS", 0.0)  # save after every chunk
    read = tokenize_documents.read_documents

    def read_until_interrupted(path, name, text_field):
        for i, document in enumerate(read(path, name, text_field)):
            if name.endswith("a.parquet") and i == 180:
                raise KeyboardInterrupt
            yield document

    monkeypatch.setattr(tokenize_documents, "read_documents", read_until_interrupted)
    out = tmp_path / "out"
    argv = ["text", "--input", str(tmp_path / "?.*"), "--out_dir", str(out), "--val_fraction",
            "0.1"]
    with pytest.raises(SystemExit, match="interrupted; run the same command again to resume"):
        prep.main(argv)
    assert os.listdir(out) == [".preparing"] and not accepted_by_train(out)
    progress = json.loads((staged(out) / "progress.json").read_text())["progress"]
    assert progress["next_file"] == 0 and 0 < progress["skip"] <= 180  # part of the first file
    monkeypatch.setattr(tokenize_documents, "read_documents", read)
    resumed = prep.main(argv)
    assert f"after 0 of 2 files and {progress['skip']:,} documents of the next" in (
        capsys.readouterr().out)  # it went on from there
    assert resumed == {**clean, "dataset": "out"} and accepted_by_train(out)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


@needs_ranks
def test_other_settings_start_over(tmp_path, gpt2_ranks, corpus_docs, capsys):
    write_jsonl(tmp_path / "a.jsonl", corpus_docs[:100])
    prep.prepare("text", tmp_path / "out", tmp_path / "a.jsonl", val_fraction=0.1)
    (staged(tmp_path / "out") / "tokens").mkdir(parents=True)
    record = {"settings": {"seed": 3}, "progress": {"next_file": 1}}
    (staged(tmp_path / "out") / "progress.json").write_text(json.dumps(record))
    again = prep.prepare("text", tmp_path / "out", tmp_path / "a.jsonl", val_fraction=0.2)
    assert "resuming" not in capsys.readouterr().out
    assert again["split"]["val_fraction"] == 0.2 and accepted_by_train(tmp_path / "out")


@needs_ranks
def test_a_failure_while_publishing_leaves_no_dataset_train_py_accepts(tmp_path, gpt2_ranks,
                                                                      corpus_docs, monkeypatch):
    write_jsonl(tmp_path / "old.jsonl", corpus_docs[:100])
    write_jsonl(tmp_path / "new.jsonl", corpus_docs[100:300])
    out = tmp_path / "out"
    old = prep.prepare("text", out, tmp_path / "old.jsonl", val_fraction=0.5)
    replace = os.replace

    def fail_on_val(source, destination):
        if str(destination).endswith("val.bin"):
            raise OSError("disk full")
        replace(source, destination)

    monkeypatch.setattr(dataset_folder.os, "replace", fail_on_val)
    with pytest.raises(OSError, match="disk full"):
        prep.prepare("text", out, tmp_path / "new.jsonl", val_fraction=0.5)
    assert not accepted_by_train(out)  # not the old dataset's val with the new train, nor a half
    assert {"train.bin", "val.bin", "meta.json"} - set(os.listdir(out)) == {"val.bin", "meta.json"}
    monkeypatch.setattr(dataset_folder.os, "replace", replace)
    new = prep.prepare("text", out, tmp_path / "new.jsonl", val_fraction=0.5)
    assert new["train_documents"] + new["val_documents"] == 200
    assert old["train_documents"] + old["val_documents"] == 100 and accepted_by_train(out)


@needs_ranks
def test_sigkill_mid_write_leaves_no_dataset_and_the_next_run_resumes(tmp_path, gpt2_ranks,
                                                                      corpus_docs, capsys):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for i in range(16):
        texts = [f"{d}\n{d}" for d in corpus_docs[i * 37:(i + 1) * 37]] * 8
        write_jsonl(inputs / f"{i:02d}.jsonl", texts)
    process = subprocess.Popen([sys.executable, "prepare.py", "text", "--input", str(inputs),
                                "--out_dir", str(out), "--num_proc", "1"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not (staged(out) / "progress.json").exists() and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    process.kill()  # SIGKILL: no handler runs
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not accepted_by_train(out)
    assert not {"train.bin", "val.bin", "meta.json"} & set(os.listdir(out))
    progress = json.loads((staged(out) / "progress.json").read_text())["progress"]
    assert 1 <= progress["next_file"] < 16
    resumed = prep.prepare("text", out, inputs)
    assert f"after {progress['next_file']} of 16 files" in capsys.readouterr().out
    clean = prep.prepare("text", tmp_path / "clean", inputs)
    assert resumed["sha256"] == clean["sha256"] and accepted_by_train(out)
