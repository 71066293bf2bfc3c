"""The train step of a small model compiles, on this CPU machine, for TPU slices (compile-only
devices from libtpu) and NVIDIA GPUs (compile-only devices from JAX's CUDA plugin and
flaxgpt/gpu_targets/): DP, FSDP and TP meshes, a padded vocabulary and 25 heads under TP, the
verdict lines, and the target names."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxgpt import compile_for
from flaxgpt.config import base_config

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='compiling for TPUs needs libtpu: pip install "flaxgpt[tpu]"')
needs_cuda_plugin = pytest.mark.skipif(
    not any(importlib.util.find_spec(plugin) for plugin in compile_for.CUDA_PLUGINS),
    reason='compiling for GPUs needs the CUDA plugin: pip install "flaxgpt[gpu-compile]"')


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


def report(config, target_name):
    lines = []
    result = compile_for.plan(config, target_name, print_fn=lines.append)
    if result.fits:
        assert f"fits: {result.total_gib:.2f} GiB" in lines[-1] and result.floor_ms > 0
    return result.fits, lines


def header(lines):
    """The report's first line: target, mesh, batch, remat, attention, dtype."""
    return next(line for line in lines if " compiled in " in line)


MESHES = {"dp": {}, "fsdp": {"mesh.data": 1, "mesh.fsdp": -1},
          "tp": {"mesh.data": -1, "mesh.tensor": 2}}


@needs_libtpu
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("slice_name", ["v5e-8", "v4-8"])
def test_small_model_compiles_and_fits_a_tpu_slice(tmp_path, slice_name, mesh):
    fits, lines = report(small_config(tmp_path, **MESHES[mesh]), slice_name)
    assert fits, lines
    hbm = compile_for.SLICES[slice_name].hbm_gib
    assert lines[-1].startswith("fits: ") and lines[-1].endswith(f"of {hbm:.2f} GiB per chip")
    used = float(lines[-1].split()[1])
    assert 0 < used <= hbm
    assert "attention splash" in lines[0] and "bfloat16" in lines[0]


@needs_libtpu
def test_25_heads_and_padded_vocabulary_under_tensor_parallelism(tmp_path):
    """gpt2-xl's 25 heads do not divide by tensor=2 (replicated, splash sees all heads); 50304
    does."""
    config = small_config(tmp_path, n_layer=1, n_head=25, n_embd=1600,
                          **{"mesh.tensor": 2, "mesh.data": -1})
    fits, lines = report(config, "v5e-8")
    assert fits, lines


@needs_libtpu
def test_unscanned_remat_model_compiles(tmp_path):
    fits, lines = report(small_config(tmp_path, scan_layers=False, remat="full"), "v4-8")
    assert fits and "remat full" in lines[0], lines


@needs_libtpu
def test_each_remat_policy_keeps_what_its_name_says_in_the_compiled_step(tmp_path):
    """On a TPU, attention is splash, a custom call no dots policy sees: dots_saveable keeps its
    named output, dots_with_no_batch_dims_saveable recomputes it, full keeps neither."""
    temporaries = {}
    for remat in ("full", "dots_with_no_batch_dims_saveable", "dots_saveable"):
        config = small_config(tmp_path, remat=remat, n_layer=4, batch_size=64,
                              gradient_accumulation_steps=1)
        devices = compile_for.target_named("v5e-8").devices
        _, train_step, _ = compile_for.compile_steps(config, devices, 50304, print_fn=print)
        temporaries[remat] = train_step.memory_analysis().temp_size_in_bytes
    assert (temporaries["full"] < temporaries["dots_with_no_batch_dims_saveable"]
            < temporaries["dots_saveable"]), temporaries


def compile_in_a_process(target_name, *overrides):
    """train.py --compile_for in a fresh process: (exit status, stdout, stderr)."""
    args = [sys.executable, "train.py", "--config=configs/owt.py", f"--compile_for={target_name}",
            "--config.gradient_accumulation_steps=1", "--config.eval_iters=1", *overrides]
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # this process may hold libtpu too
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    return result.returncode, result.stdout, result.stderr


@needs_libtpu
def test_a_config_that_cannot_fit_a_tpu_gets_the_one_line_verdict(tmp_path):
    """512 sequences of 1024 tokens per chip: one chunk of their float32 logits (512 x 128
    positions x 50304, loss.py) alone is 12.3 GiB of a v5e's 16."""
    rc, out, err = compile_in_a_process("v5e-8", "--config.n_layer=1", "--config.n_head=2",
                                        "--config.n_embd=128", "--config.batch_size=4096",
                                        f"--config.data_dir={tmp_path / 'none'}")
    assert rc == 1 and out.strip(), out + err[-2000:]
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: ")
    assert " GiB of 16.00 GiB per chip: try --config." in verdict
    assert "Traceback" not in err


@needs_cuda_plugin
@pytest.mark.parametrize("target_name, mesh",
                         [("h100-8", "dp"), ("a100-1", "dp"), ("h200-16", "fsdp")])
def test_small_model_compiles_and_fits_gpus(tmp_path, target_name, mesh):
    """Each GPU's target config compiles (h200-16: two hosts of 8 GPUs). Auto attention is cuDNN's
    wherever the cuDNN library loads (no GPU needed); without it, XLA's, and a line says so."""
    fits, lines = report(small_config(tmp_path, batch_size=16, **MESHES[mesh]), target_name)
    assert fits, lines
    target = compile_for.target_named(target_name)
    gpu, count = target_name.split("-")
    assert len(target.devices) == int(count) and gpu.upper() in target.devices[0].device_kind
    assert {d.process_index for d in target.devices} == set(range(max(1, int(count) // 8)))
    assert lines[-1].endswith(f"of {target.memory_gib:.2f} GiB per GPU")
    assert 0 < float(lines[-1].split()[1]) < 1  # 2 layers of 128: well under a GiB per GPU
    assert "bfloat16" in header(lines)
    assert f"({16 // int(count)} per GPU per micro-step)" in header(lines)
    flops = next(line for line in lines if line.startswith("FLOPs"))
    assert "XLA's cost analysis gives none" in flops
    reason = compile_for.cudnn_attention_unavailable()
    if reason is None:
        assert "attention cudnn (its workspace" in header(lines), lines
        assert not any(line.startswith("attention: ") for line in lines)
    else:
        assert lines[0].startswith("attention: compiled as xla, not cudnn")
        assert reason.rstrip(".") in lines[0]
        assert "attention xla," in header(lines)


@needs_cuda_plugin
def test_a_config_that_cannot_fit_an_h100_gets_the_one_line_verdict(tmp_path):
    """4096 sequences of 1024 tokens on one H100: one chunk of their float32 logits (4096 x 128
    positions x 50304, loss.py) alone is ~98 GiB."""
    rc, out, err = compile_in_a_process("h100-1", "--config.n_layer=1", "--config.n_head=2",
                                        "--config.n_embd=128", "--config.batch_size=4096",
                                        "--config.attention=xla",
                                        f"--config.data_dir={tmp_path / 'none'}")
    assert rc == 1 and out.strip(), out + err[-2000:]
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: ")
    assert " GiB of 59.33 GiB per GPU: try --config." in verdict
    assert float(verdict.split()[3]) > 80
    assert "Traceback" not in err


def test_out_of_memory_messages_are_parsed():
    assert compile_for.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == pytest.approx(20.5)
    assert compile_for.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: ... HLO temporaries (97.88G) exceeds available HBM (15.75G)"
    ) == pytest.approx(97.88)
    assert compile_for.parse_out_of_memory("RESOURCE_EXHAUSTED: something else") is None


@pytest.mark.parametrize("name", ["v9-8", "h100", "b200-8", "h100-12", "h100-0"])
def test_unknown_targets_name_the_choices(name):
    with pytest.raises(ValueError, match="h100-8|multiple of 8|count 1 to 8"):
        compile_for.target_named(name)


def test_every_gpu_has_its_target_config_and_a_peak():
    from flaxgpt import mfu
    for gpu, file in compile_for.GPUS.items():
        text = (compile_for.GPU_TARGETS / file).read_text()
        assert text.startswith("# ") and "Source: " in text and 'platform_name: "CUDA"' in text
        assert mfu.listed_peak_flops(gpu.upper()) > 0


def test_the_gpu_memory_a_step_may_use_follows_jax_allocator_settings(monkeypatch):
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    assert compile_for.gpu_memory_fraction() == 0.75
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert compile_for.gpu_memory_fraction() == 0.9
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", ".5")
    assert compile_for.gpu_memory_fraction() == 0.5


@needs_libtpu
def test_a_multi_host_slice_checks_each_hosts_rows_and_splits_a_batch_anew(tmp_path):
    """v5e-16 is 4 hosts of 4 chips: a batch of 12 does not divide over 16 chips, so the compile
    takes the nearest split and says so; the hosts' rows are interleaved along the data axis, and
    every row is read."""
    fits, lines = report(small_config(tmp_path, batch_size=12, gradient_accumulation_steps=4),
                         "v5e-16")
    assert fits, lines
    assert lines[0] == ("batch: batch_size=12 does not divide over the 16 data-parallel devices, "
                        "so this compiles --config.batch_size=16 "
                        "--config.gradient_accumulation_steps=3 (the same 48 sequences per step); "
                        "set both to choose another split")
    rows = next(line for line in lines if line.startswith("per-host rows: "))
    assert rows.startswith("per-host rows: 4 hosts, each reads 4 of the 16 rows of a micro-batch "
                           "(interleaved; host 0: rows ") and rows.endswith(": ok"), rows
