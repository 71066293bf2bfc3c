"""The train step of a small model compiles for TPU slices (compile-only devices from libtpu) on this CPU
machine: DP, FSDP and TP meshes, a padded vocabulary and 25 heads under TP, and the verdict line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason='compiling for TPUs needs libtpu: pip install "flaxgpt[tpu]"')

from flaxgpt import tpu_compile  # noqa: E402
from flaxgpt.config import base_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path, **overrides):
    c = base_config()
    c.data_dir = str(tmp_path / "no-dataset")  # GPT-2's padded vocabulary, 50304
    c.n_layer, c.n_head, c.n_embd, c.block_size = 2, 2, 128, 128
    c.batch_size, c.gradient_accumulation_steps, c.eval_iters = 8, 2, 1
    for key, value in overrides.items():
        if key.startswith("mesh."):
            c.mesh[key[5:]] = value
        else:
            c[key] = value
    return c


def report(config, slice_name):
    lines = []
    result = tpu_compile.plan(config, slice_name, print_fn=lines.append)
    if result.fits:
        assert f"fits: {result.total_gib:.2f} GiB" in lines[-1] and result.floor_ms > 0
    return result.fits, lines


MESHES = {"dp": {}, "fsdp": {"mesh.data": 1, "mesh.fsdp": -1}, "tp": {"mesh.data": -1, "mesh.tensor": 2}}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("slice_name", ["v5e-8", "v4-8"])
def test_small_model_compiles_and_fits(tmp_path, slice_name, mesh):
    fits, lines = report(small_config(tmp_path, **MESHES[mesh]), slice_name)
    assert fits, lines
    hbm = tpu_compile.SLICES[slice_name].hbm_gib
    assert lines[-1].startswith("fits: ") and lines[-1].endswith(f"of {hbm:.2f} GiB per chip")
    used = float(lines[-1].split()[1])
    assert 0 < used <= hbm
    assert "attention splash" in lines[0] and "bfloat16" in lines[0]


def test_25_heads_and_padded_vocabulary_under_tensor_parallelism(tmp_path):
    """gpt2-xl's 25 heads do not divide by tensor=2 (replicated, splash sees all heads); 50304 does."""
    config = small_config(tmp_path, n_layer=1, n_head=25, n_embd=1600, **{"mesh.tensor": 2, "mesh.data": -1})
    fits, lines = report(config, "v5e-8")
    assert fits, lines


def test_unscanned_remat_model_compiles(tmp_path):
    fits, lines = report(small_config(tmp_path, scan_layers=False, remat="full"), "v4-8")
    assert fits and "remat full" in lines[0], lines


def test_a_config_that_cannot_fit_gets_the_one_line_verdict(tmp_path):
    """Tens of thousands of 1024-token sequences per chip: the logits alone exceed a v5e's 16 GiB."""
    args = [sys.executable, "train.py", "--config=configs/owt.py", "--compile_for=v5e-8",
            "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=128", "--config.batch_size=512",
            "--config.gradient_accumulation_steps=1", "--config.eval_iters=1",
            f"--config.data_dir={tmp_path / 'none'}"]
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # this test process has loaded libtpu too
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode != 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.strip(), result.stderr[-2000:]
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: ") and " GiB of 16.00 GiB per chip: try --config." in verdict
    assert "Traceback" not in result.stderr


def test_out_of_memory_messages_are_parsed():
    assert tpu_compile.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == pytest.approx(20.5)
    assert tpu_compile.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: ... HLO temporaries (97.88G) exceeds available HBM (15.75G)") == pytest.approx(97.88)
    assert tpu_compile.parse_out_of_memory("RESOURCE_EXHAUSTED: something else") is None


def test_unknown_slice_names_the_choices():
    with pytest.raises(ValueError, match="v5e-8"):
        tpu_compile.topology_devices("v9-8")
