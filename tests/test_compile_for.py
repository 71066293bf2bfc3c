"""The train step compiles, on this CPU machine, for TPU slices (compile-only devices from libtpu),
several slices joined over DCN, and NVIDIA GPUs (compile-only devices from JAX's CUDA plugin and
flaxgpt/gpu_targets/): DP, FSDP and TP meshes, a padded vocabulary and 25 heads under TP, the
remat policies, the verdict lines, the per-host rows, and the target names.

Each configuration is compiled once per module (`compiled`) and its report shared by the tests that
read it. A tiny GPT with a 128-token vocabulary stands in wherever the point is not GPT-2's
vocabulary; the smallest target that makes each point is used."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flaxgpt import compile_for, sharding, tpu_targets
from flaxgpt.config import base_config

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='compiling for TPUs needs libtpu: pip install "flaxgpt[tpu]"')
needs_cuda_plugin = pytest.mark.skipif(
    not any(importlib.util.find_spec(plugin) for plugin in compile_for.CUDA_PLUGINS),
    reason='compiling for GPUs needs the CUDA plugin: pip install "flaxgpt[gpu-compile]"')
GPT2_VOCAB = "gpt2"  # small_config(vocab=...): GPT-2's padded vocabulary, 50304


def small_config(data_root: Path, vocab=128, **overrides):
    """A 2-layer GPT of width 128 over a dataset folder holding only meta.json: a character
    vocabulary of `vocab` tokens, or GPT-2's (no folder) for vocab="gpt2"."""
    c = base_config()
    c.data_dir = str(data_root / f"vocab-{vocab}")
    if vocab != GPT2_VOCAB and not Path(c.data_dir).is_dir():
        os.makedirs(c.data_dir)
        meta = {"tokenizer": "char", "vocab_size": vocab, "dtype": "uint32"}
        (Path(c.data_dir) / "meta.json").write_text(json.dumps(meta))
    c.n_layer, c.n_head, c.n_embd, c.block_size = 2, 2, 128, 128
    c.batch_size, c.gradient_accumulation_steps, c.eval_iters = 8, 1, 1
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
    return result, lines


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compiled(target, **config overrides) -> (Plan, report lines), each compiled once."""
    root, done = tmp_path_factory.mktemp("datasets"), {}

    def get(target_name, **overrides):
        key = (target_name, tuple(sorted(overrides.items())))
        if key not in done:
            done[key] = report(small_config(root, **overrides), target_name)
        return done[key]
    return get


def header(lines):
    """The report's line naming target, mesh, batch, remat, attention, dtype."""
    return next(line for line in lines if " compiled in " in line)


def line(lines, start):
    return next(line for line in lines if line.startswith(start))


MESHES = {"dp": {}, "fsdp": {"mesh.data": 1, "mesh.fsdp": -1},
          "tp": {"mesh.data": -1, "mesh.tensor": 2},
          "fsdp_tp": {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2}}


# -------------------------------------------------------------------------------------- TPU slices

@needs_libtpu
@pytest.mark.parametrize("slice_name, mesh, want", [
    ("v5e-8", "dp", {"data": 8, "fsdp": 1, "tensor": 1}),
    ("v5e-8", "fsdp", {"data": 1, "fsdp": 8, "tensor": 1}),
    ("v5e-8", "tp", {"data": 4, "fsdp": 1, "tensor": 2}),
    ("v4-8", "fsdp_tp", {"data": 1, "fsdp": 2, "tensor": 2}),  # megacore chips
])
def test_small_model_compiles_and_fits_a_tpu_slice(compiled, slice_name, mesh, want):
    result, lines = compiled(slice_name, **MESHES[mesh])
    assert result.fits, lines
    hbm = tpu_targets.GENERATIONS[slice_name.split("-")[0]].hbm_gib
    assert lines[-1].startswith("fits: ") and lines[-1].endswith(f"of {hbm:.2f} GiB per chip")
    assert 0 < result.total_gib <= hbm
    assert f"mesh {want}" in header(lines)
    assert "attention splash" in header(lines) and "bfloat16" in header(lines)
    assert not any(line.startswith("weights replicated") for line in lines)  # 128 divides
    assert line(lines, "per-host rows: 1 host, each reads 8 of the 8 rows")


@needs_libtpu
def test_25_heads_and_padded_vocabulary_under_tensor_parallelism(compiled):
    """gpt2-xl's 25 heads do not divide by tensor=2: replicated (splash sees all heads), and the
    report says so with the fix; GPT-2's padded vocabulary, 50304, divides and is split."""
    result, lines = compiled("v5e-8", vocab=GPT2_VOCAB, n_layer=1, n_head=25, n_embd=1600,
                             **MESHES["tp"])
    assert result.fits, lines
    replicated = [line for line in lines if line.startswith("weights replicated")]
    assert len(replicated) == 1 and "the heads dimension (25) of " in replicated[0], lines
    assert replicated[0].endswith("set --config.mesh.tensor so that tensor=2 divides 25")


@needs_libtpu
def test_unscanned_remat_model_compiles(compiled):
    result, lines = compiled("v5e-8", scan_layers=False, remat="full")
    assert result.fits and "remat full" in header(lines), lines


@needs_libtpu
def test_each_remat_policy_keeps_what_its_name_says_in_the_compiled_step(tmp_path):
    """On a TPU, attention is splash, a custom call no dots policy sees: dots_saveable keeps its
    named output, dots_with_no_batch_dims_saveable recomputes it, full keeps neither."""
    temporaries = {}
    devices = compile_for.target_named("v5e-8").devices
    for remat in ("full", "dots_with_no_batch_dims_saveable", "dots_saveable"):
        # with a 128-token vocabulary and 2 layers the policies' differences vanish in the noise
        config = small_config(tmp_path, remat=remat, n_layer=4, batch_size=64)
        _, train_step, _ = compile_for.compile_steps(config, devices, 50304, print_fn=print,
                                                     eval_step=False)
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
    """train.py's exit status and last line, and nothing on stderr (libtpu's lines that it has no
    TPU are dropped). 512 sequences of 1024 tokens per chip: one chunk of their float32 logits
    (512 x 128 positions x 50304, loss.py) alone is 12.3 GiB of a v5e's 16."""
    rc, out, err = compile_in_a_process("v5e-8", "--config.n_layer=1", "--config.n_head=2",
                                        "--config.n_embd=128", "--config.batch_size=4096",
                                        f"--config.data_dir={tmp_path / 'none'}")
    assert rc == 1 and out.strip(), out + err[-2000:]
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: ")
    assert " GiB of 16.00 GiB per chip: try --config." in verdict
    assert not err.strip(), err[-2000:]


# ------------------------------------------------------------------ several hosts, several slices

@needs_libtpu
def test_two_slices_split_the_batch_over_the_slices_and_check_each_hosts_rows(compiled):
    """2 x v5e-8 as GKE's 4-chip hosts: 16 chips, 4 hosts, 2 slices over DCN. A batch of 12 does
    not divide over 16 chips, so the compile takes the nearest split and says so; the data axis
    spans the slices, so the hosts of slice 0 read the first half of the batch, those of slice 1
    the second; every row is read."""
    result, lines = compiled("2xv5e-8:hosts-of-4", batch_size=12, gradient_accumulation_steps=4)
    assert result.fits, lines
    assert lines[0] == ("batch: batch_size=12 does not divide over the 16 data-parallel devices, "
                        "so this compiles --config.batch_size=16 "
                        "--config.gradient_accumulation_steps=3 (the same 48 sequences per step); "
                        "set both to choose another split")
    assert header(lines).startswith("2xv5e-8:hosts-of-4 (2 x v5e:2x4 over DCN, 16 chips, 4 hosts "
                                    "of 4 chips): ")
    rows = line(lines, "per-host rows: ")
    assert rows.startswith("per-host rows: 4 hosts in 2 slices, each reads 4 of the 16 rows of a "
                           "micro-batch") and rows.endswith(": ok"), rows
    shown = dict(re.findall(r"host (\d+): rows ([\d, -]+)", rows))
    as_rows = lambda text: {int(r) for part in text.split(", ")
                            for r in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    assert as_rows(shown["0"]) <= set(range(8)) and as_rows(shown["3"]) <= set(range(8, 16))


@needs_libtpu
@pytest.mark.parametrize("name, hosts, chips_per_host, slices", [
    ("v5e-8", 1, 8, 1), ("v5litepod-8:hosts-of-4", 2, 4, 1), ("v6e-16", 4, 4, 1),
    ("v4-32", 4, 4, 1), ("v5p-16", 2, 4, 1), ("2xv5e-16", 8, 4, 2), ("4xv5p-8", 4, 4, 4),
])
def test_topologies_have_the_hosts_and_slices_their_names_say(name, hosts, chips_per_host,
                                                               slices):
    devices = compile_for.target_named(name).devices
    by_host = {}
    for device in devices:
        by_host.setdefault(device.process_index, []).append(device)
    assert sorted(by_host) == list(range(hosts))
    assert {len(held) for held in by_host.values()} == {chips_per_host}
    assert sharding.num_slices(devices) == slices


@needs_libtpu
def test_fsdp_minus_one_on_a_v5e_256_splits_gpt2_xl_by_64_and_gives_the_rest_to_data():
    """n_embd 1600 does not divide by 256: FSDP 256 would replicate every weight; 64 divides."""
    c = base_config()
    c.n_embd, c.mesh.fsdp, c.mesh.data = 1600, -1, 1
    mesh = sharding.make_mesh(c.mesh, compile_for.target_named("v5e-256").devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 64, "tensor": 1}


# -------------------------------------------------------------------------------------------- GPUs

@needs_cuda_plugin
@pytest.mark.parametrize("target_name, mesh",
                         [("h100-8", "dp"), ("a100-1", "dp"), ("h200-16", "fsdp")])
def test_small_model_compiles_and_fits_gpus(compiled, target_name, mesh):
    """Each GPU's target config compiles (h200-16: two hosts of 8 GPUs). Auto attention is cuDNN's
    wherever the cuDNN library loads (no GPU needed); without it, XLA's, and a line says so."""
    result, lines = compiled(target_name, batch_size=16, **MESHES[mesh])
    assert result.fits, lines
    target = compile_for.target_named(target_name)
    gpu, count = target_name.split("-")
    assert len(target.devices) == int(count) and gpu.upper() in target.devices[0].device_kind
    assert {d.process_index for d in target.devices} == set(range(max(1, int(count) // 8)))
    assert lines[-1].endswith(f"of {target.memory_gib:.2f} GiB per GPU")
    assert 0 < result.total_gib < 1  # 2 layers of 128: well under a GiB per GPU
    assert "bfloat16" in header(lines)
    assert f"({16 // int(count)} per GPU per micro-step)" in header(lines)
    assert "XLA's cost analysis gives none" in line(lines, "FLOPs")
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
    """A 4M-token vocabulary of width 1024 is 4.3G parameters: their float32 state (params, grads,
    AdamW, 16 bytes each) alone is 64 GiB, more than JAX's 59.33 GiB pool on an H100."""
    config = small_config(tmp_path, vocab=2**22, n_layer=1, n_head=8, n_embd=1024,
                          attention="xla", batch_size=1)
    result, lines = report(config, "h100-1")
    assert not result.fits and result.total_gib > 59.33, lines
    assert lines[-1].startswith(f"does not fit: {result.total_gib:.2f} GiB of 59.33 GiB per GPU: "
                                "try --config.mesh.fsdp=-1 --config.mesh.data=1")


# ------------------------------------------------------------------------- names, memory, messages

def test_out_of_memory_messages_are_parsed():
    assert compile_for.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == pytest.approx(20.5)
    assert compile_for.parse_out_of_memory(
        "RESOURCE_EXHAUSTED: ... HLO temporaries (97.88G) exceeds available HBM (15.75G)"
    ) == pytest.approx(97.88)
    assert compile_for.parse_out_of_memory("RESOURCE_EXHAUSTED: something else") is None


@pytest.mark.parametrize("name, topology, chips, host_bounds, slices", [
    ("v5e-1", "v5e:1x1", 1, (1, 1, 1), 1), ("v5e-4", "v5e:2x2", 4, (2, 2, 1), 1),
    ("v5litepod-8", "v5e:2x4", 8, (2, 4, 1), 1), ("v6e-8:hosts-of-4", "v6e:2x4", 8, (2, 2, 1), 1),
    ("v5e-32", "v5e:4x8", 32, (2, 2, 1), 1), ("v6e-128", "v6e:8x16", 128, (2, 2, 1), 1),
    ("2xv5e-256", "v5e:16x16", 256, (2, 2, 1), 2), ("v4-8", "v4:2x2x1", 4, (2, 2, 1), 1),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1), 1), ("v4-1536", "v4:8x8x12", 768, (2, 2, 1), 1),
    ("v5p-16", "v5p:2x2x2", 8, (2, 2, 1), 1), ("4xv5p-128", "v5p:4x4x4", 64, (2, 2, 1), 4),
    ("v5p-768", "v5p:4x8x12", 384, (2, 2, 1), 1), ("v5p-12288", "v5p:16x16x24", 6144, (2, 2, 1), 1),
])
def test_tpu_names_are_read_as_googles_accelerator_types(name, topology, chips, host_bounds,
                                                         slices):
    parsed = tpu_targets.parse(name)
    assert (parsed.topology, parsed.chips, parsed.host_bounds, parsed.num_slices) == (
        topology, chips, host_bounds, slices)


@pytest.mark.parametrize("name, sizes", [
    ("v5e-2", "v5e-1, v5e-4, v5e-8, v5e-16, v5e-32, v5e-64, v5e-128, v5e-256"),
    ("v6e-512", "v6e-1, v6e-4, v6e-8"),
    ("v4-12", "v4-8, v4-16, v4-32, v4-64, then v4-128, v4-256, ... (multiples of 128) up to "
              "v4-8192"),
    ("2xv5p-96", "up to v5p-12288"),
])
def test_a_name_that_is_not_a_slice_is_refused_in_one_line_with_the_valid_sizes(name, sizes):
    with pytest.raises(ValueError) as e:
        compile_for.target_named(name)
    assert "is not a" in str(e.value) and sizes in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["v9-8", "h100", "b200-8", "h100-12", "h100-0", "2xh100-8"])
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
