"""Config files, overrides and validation: every mistake names its key."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import eval_gpt2, finetune_shakespeare, owt, shakespeare_char
from flaxgpt.config import base_config, validate
from conftest import one_device_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", [owt.get_config(), shakespeare_char.get_config(),
                                    shakespeare_char.get_config("cpu"),
                                    finetune_shakespeare.get_config(),
                                    eval_gpt2.get_config("gpt2-xl")])
def test_shipped_configs_are_valid(config):
    validate(config)


def test_owt_keeps_nanogpts_half_million_tokens_per_step():
    c = owt.get_config()
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 12 * 40 * 1024


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "config.batch_size must be positive"),
    ("n_head", 5, "n_embd=768 must be divisible by n_head=5"),  # GPTConfig's own check
    ("dtype", "float16", "loss scaling.*bfloat16"),
    ("dtype", "float8", "config.dtype"),
    ("param_dtype", "float33", "config.param_dtype"),
    ("max_to_keep", 0, "config.max_to_keep"),
    ("dropout", 1.0, "dropout must be in \\[0, 1\\)"),
])
def test_validate_names_the_key(key, value, message):
    c = base_config()
    c[key] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_cudnn_attention_has_no_dropout():
    c = base_config()
    c.attention, c.dropout = "cudnn", 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        validate(c)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/shakespeare_char.py:cpu", "--config.nonexistent=3"],
     "--config.nonexistent: the config has no key 'nonexistent'"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.max_iters=ten"],
     "--config.max_iters=ten"),
    (["--config=configs/nope.py"], "no config file configs/nope.py"),
    (["--config=configs/shakespeare_char.py:tpu"], "unknown variant 'tpu'"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.dataset=not_prepared",
      "--config.out_dir=/tmp/x"],
     "python prepare.py text --input 'FILES' --name not_prepared"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.learnin_rate=1"],
     "did you mean --config.learning_rate?"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.mes=1"], "did you mean --config.mesh "),
    (["--config=configs/shakespeare_char.py:cpu", "--config.distributd.process_id=1"],
     "--config.distributd.process_id: the config has no key 'distributd'; did you mean "
     "--config.distributed.process_id"),
    (["--config={tmp}/syntax.py"], "syntax.py:2: '(' was never closed"),
    (["--config={tmp}/raises.py"], "raises.py:3: KeyError"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.data_dir={data}",
      "--config.out_dir={tmp}/a_file"],
     "is a file"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.data_dir={data}",
      "--config.out_dir={tmp}/out", "--config.init_from={tmp}/hf"],
     "not a readable safetensors file"),
])
def test_train_cli_errors_are_one_line(args, message, tmp_path):
    """A mistake a user can fix: exit 1, one line on stderr, no traceback, nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": list("ab"),
                                                "vocab_size": 2, "dtype": "uint16"}))
    for split in ("train", "val"):
        np.zeros(1000, np.uint16).tofile(data / f"{split}.bin")
    (tmp_path / "syntax.py").write_text("def get_config():\n    return base_config(\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    c = {}\n    return c['missing']\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"n_positions": 16, "vocab_size": 50257,
                                                             "n_layer": 1, "n_head": 2,
                                                             "n_embd": 16}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"damaged")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env=one_device_env())
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
