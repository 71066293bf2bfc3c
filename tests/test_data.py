"""Token files and the deterministic batch sampler (flaxgpt/data.py)."""

import json
import pickle

import numpy as np
import pytest

from flaxgpt import tokenizer
from flaxgpt.data import get_batch, load_meta, open_split


def write_dataset(data_dir, train, val, dtype, **meta):
    data_dir.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(data_dir / "train.bin")
    np.asarray(val, dtype=dtype).tofile(data_dir / "val.bin")
    (data_dir / "meta.json").write_text(json.dumps({"dtype": dtype, **meta}))


def test_same_seed_and_step_same_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(batch_size=8, block_size=32)
    x0, y0 = get_batch(tokens, seed=1, step=5, **kw)
    x1, y1 = get_batch(tokens, seed=1, step=5, **kw)
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(y0, y1)
    assert x0.shape == y0.shape == (8, 32) and x0.dtype == y0.dtype == np.int32
    assert not np.array_equal(x0, get_batch(tokens, seed=1, step=6, **kw)[0])
    assert not np.array_equal(x0, get_batch(tokens, seed=2, step=5, **kw)[0])
    assert not np.array_equal(x0, get_batch(tokens, seed=1, step=5, split="val", **kw)[0])


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(5_000, dtype=np.uint16)  # token == position: windows are easy to check
    x, y = get_batch(tokens, seed=0, step=0, batch_size=4, block_size=16)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))


def test_rows_slices_concatenate_to_the_full_batch():
    tokens = np.arange(100_000, dtype=np.uint32)
    kw = dict(seed=3, step=7, batch_size=12, block_size=64)
    x, y = get_batch(tokens, **kw)
    parts = [get_batch(tokens, rows=slice(p * 3, (p + 1) * 3), **kw) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([px for px, _ in parts]), x)
    np.testing.assert_array_equal(np.concatenate([py for _, py in parts]), y)
    xs, _ = get_batch(tokens, rows=np.array([11, 0]), **kw)
    np.testing.assert_array_equal(xs, x[[11, 0]])


def test_windows_stay_in_bounds_and_reach_the_end():
    block_size = 8
    tokens = np.arange(block_size + 3, dtype=np.uint16)  # 3 possible windows
    x, y = get_batch(tokens, seed=0, step=0, batch_size=200, block_size=block_size)
    assert set(x[:, 0]) == {0, 1, 2}
    assert y.max() == len(tokens) - 1
    x, y = get_batch(tokens[:block_size + 1], seed=0, step=0, batch_size=2, block_size=block_size)
    np.testing.assert_array_equal(x, [np.arange(8)] * 2)  # exactly one window: the whole array
    np.testing.assert_array_equal(y, [np.arange(1, 9)] * 2)


def test_uint32_files_round_trip(tmp_path):
    # a vocabulary past uint16, e.g. cl100k's 100,277
    big = np.array([0, 65_535, 65_536, 100_276] * 25)
    write_dataset(tmp_path / "big", big, big[:10], "uint32", vocab_size=100_277)
    train = open_split(tmp_path / "big", "train")
    assert train.dtype == np.uint32 and len(train) == 100
    x, y = get_batch(train, seed=0, step=0, batch_size=4, block_size=4)
    assert x.dtype == np.int32 and set(x.ravel()) | set(y.ravel()) <= set(big.tolist())
    assert 65_536 in set(get_batch(train, seed=0, step=0, batch_size=64, block_size=4)[0].ravel())
    assert load_meta(tmp_path / "big")["vocab_size"] == 100_277


def test_nanogpt_folder_without_meta_is_assumed_gpt2_uint16(tmp_path):
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "train.bin")
    assert load_meta(tmp_path) == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
                                   "assumed": True}
    np.testing.assert_array_equal(open_split(tmp_path, "train"), np.arange(50))


def test_nanogpt_char_folder_reads_meta_pkl(tmp_path):
    """nanoGPT's prepare.py for shakespeare_char writes meta.pkl (no meta.json): its characters
    are used."""
    chars = sorted(set("hello world"))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    meta = load_meta(tmp_path)
    assert meta == {"tokenizer": "char", "chars": chars, "vocab_size": len(chars),
                    "dtype": "uint16"}


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_meta(tmp_path / "data")


def test_missing_data_names_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError,
                       match=r"data/shakespeare_char.*`python prepare.py shakespeare_char`"):
        open_split("data/shakespeare_char", "train")
    (tmp_path / "elsewhere" / "openwebtext").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        open_split(tmp_path / "elsewhere" / "openwebtext", "val")
    assert "val.bin" in str(e.value) and "python prepare.py openwebtext --out_dir" in str(e.value)


def test_too_short_dataset_says_to_lower_block_size():
    with pytest.raises(ValueError, match=r"has 64 tokens.*block_size=64.*lower block_size"):
        get_batch(np.arange(64), seed=0, step=0, batch_size=2, block_size=64)


def test_a_dataset_in_a_bucket_reads_the_same_windows_as_a_local_copy(tmp_path, gcs_dir):
    from flaxgpt import data, storage
    rng = np.random.default_rng(0)
    write_dataset(tmp_path, rng.integers(0, 65, 5000), rng.integers(0, 65, 600), "uint16",
                  train_tokens=5000, val_tokens=600, tokenizer="char", vocab_size=65)
    for name in ("train.bin", "val.bin", "meta.json"):
        storage.write_atomically(storage.path(gcs_dir) / name, (tmp_path / name).read_bytes())
    local, remote = open_split(tmp_path, "train"), open_split(gcs_dir, "train")
    assert isinstance(remote, data.RemoteTokens) and len(remote) == len(local) == 5000
    rows = np.array([5, 0, 7])
    for a, b in zip(get_batch(local, seed=1, step=3, batch_size=8, block_size=32, rows=rows),
                    get_batch(remote, seed=1, step=3, batch_size=8, block_size=32, rows=rows)):
        np.testing.assert_array_equal(a, b)
    meta = load_meta(gcs_dir)
    splits = lambda d: {s: open_split(d, s) for s in ("train", "val")}
    assert data.fingerprint(meta, splits(tmp_path)) == data.fingerprint(meta, splits(gcs_dir))


def test_an_unprepared_dataset_in_a_missing_bucket_is_one_line_not_gpt2s_vocabulary(gcs_dir):
    """--compile_for takes a dataset not prepared here as GPT-2's; a bucket that is not there
    says so instead."""
    from types import SimpleNamespace
    from flaxgpt import data
    here = SimpleNamespace(data_dir=f"{gcs_dir}/not_prepared", dataset="owt")
    assert data.model_vocab_size(here, unprepared_is_gpt2=True) == tokenizer.GPT2_PADDED_VOCAB_SIZE
    missing = SimpleNamespace(data_dir="gs://no-such-bucket-here/owt", dataset="owt")
    with pytest.raises(OSError, match=r"^data_dir=gs://no-such-bucket-here/owt: the bucket"):
        data.model_vocab_size(missing, unprepared_is_gpt2=True)


def test_a_copy_of_another_length_than_meta_json_says_is_refused(tmp_path):
    write_dataset(tmp_path, np.arange(1000), np.arange(100), "uint16", train_tokens=1200,
                  val_tokens=100)
    with pytest.raises(ValueError, match=r"train.bin holds 1,000 tokens but .*meta.json says "
                                         r"1,200: the copy is incomplete or from another "
                                         r"preparation"):
        open_split(tmp_path, "train")


def test_the_fingerprint_tells_different_tokens_apart(tmp_path):
    from flaxgpt import data
    tokens = np.arange(50_000) % 65
    write_dataset(tmp_path / "a", tokens, tokens[:500], "uint16")
    changed = tokens.copy()
    changed[20_000] += 1  # one token, inside one of the sampled windows
    write_dataset(tmp_path / "b", changed, tokens[:500], "uint16")
    prints = [data.fingerprint({"dtype": "uint16"},
                               {s: open_split(tmp_path / d, s) for s in ("train", "val")})
              for d in "ab"]
    assert prints[0] != prints[1]
