"""Config files, overrides and validation: every mistake names its key."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import eval_gpt2, finetune_shakespeare, owt, shakespeare_char
from flaxgpt.config import base_config, validate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", [owt.get_config(), shakespeare_char.get_config(), shakespeare_char.get_config("cpu"),
                                    finetune_shakespeare.get_config(), eval_gpt2.get_config("gpt2-xl")])
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
    ("dropout", 1.0, "config.dropout"),
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
    (["--config=configs/shakespeare_char.py:cpu", "--config.max_iters=ten"], "--config.max_iters=ten"),
    (["--config=configs/nope.py"], "no config file configs/nope.py"),
    (["--config=configs/shakespeare_char.py:tpu"], "unknown variant 'tpu'"),
    (["--config=configs/shakespeare_char.py:cpu", "--config.dataset=not_prepared", "--config.out_dir=/tmp/x"],
     "python prepare.py not_prepared"),
])
def test_train_cli_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
