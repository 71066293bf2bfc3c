"""flaxgpt.load (flaxgpt/loader.py): one entry point for a training run, a Hugging Face folder and a
nanoGPT ckpt.pt, each with its tokenizer; one line for a name that is none of them."""

import json

import jax
import numpy as np
import pytest

import flaxgpt
from flaxgpt.checkpoint import Checkpoints
from flaxgpt.model import GPTConfig, init_params
from flaxgpt.tokenizer import GPT2Tokenizer

CONFIG = GPTConfig(block_size=16, vocab_size=12, n_layer=2, n_head=2, n_embd=32, attention="xla")


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_training_run_loads_its_newest_checkpoint_and_tokenizer(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    with Checkpoints(tmp_path, async_save=False) as checkpoints:
        checkpoints.save(7, params, {"count": np.zeros((), np.int32)},
                         {"model": CONFIG.to_dict(), "run_id": "r1"})
    chars = list("\n abcdefghij")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": chars,
                                                    "vocab_size": len(chars)}))
    loaded = flaxgpt.load(tmp_path, dtype="bfloat16")
    assert isinstance(loaded, flaxgpt.LoadedModel)
    assert loaded.config == CONFIG.replace(dtype="bfloat16", attention="auto")
    assert_same_params(loaded.params, params)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("bad")) == "bad"
    assert "run r1 at step 7" in loaded.description


def test_a_hugging_face_folder_is_load_pretrained(tiny_hf_gpt2):
    config, params, tokenizer, description = flaxgpt.load(tiny_hf_gpt2)
    expected_config, expected = flaxgpt.load_pretrained(tiny_hf_gpt2)
    assert config == expected_config and isinstance(tokenizer, GPT2Tokenizer)
    assert_same_params(params, expected)
    assert description == f"pretrained {tiny_hf_gpt2}"


def test_a_nanogpt_checkpoint_and_its_out_dir(tmp_path):
    pytest.importorskip("torch")
    from flaxgpt.pretrained import save_nanogpt

    config = CONFIG.replace(gelu_approximate=False, attention="auto")
    params = init_params(config, jax.random.key(1))
    save_nanogpt(params, config, tmp_path / "ckpt.pt")
    for source in (tmp_path / "ckpt.pt", tmp_path):
        loaded = flaxgpt.load(source)
        assert loaded.config.replace(scan_layers=True) == config
        assert loaded.description == f"nanoGPT {tmp_path / 'ckpt.pt'}"


def test_a_name_that_is_no_model_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a GPT-2 model .* nor an existing out_dir"):
        flaxgpt.load(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is a file, but not a nanoGPT ckpt.pt"):
        flaxgpt.load(tmp_path / "notes.txt")
