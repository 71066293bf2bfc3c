"""The training loop (flaxgpt/loop.py) and train.py end to end: loss goes down, exact resume, run
identity, checkpoints, stop requests, and its error messages."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from flaxgpt.checkpoint import Checkpoints, load_params
from flaxgpt.prepare import prepare
from flaxgpt.loop import train
from conftest import (assert_trees_close, corpus_text, one_device_env, program_lines,
                      tiny_run_config, to_host)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(shakespeare_char_dir) -> Path:
    return shakespeare_char_dir


@pytest.mark.slow
def test_train_cli_loss_falls_well_below_unigram_baseline(data_dir, tmp_path):
    """A short version of the README's CPU shakespeare_char run (2000 steps reach ~1.88), through
    train.py."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    out = tmp_path / "out"
    subprocess.run([sys.executable, "train.py", "--config=configs/shakespeare_char.py:cpu",
                    f"--config.data_dir={data_dir}", f"--config.out_dir={out}",
                    "--config.max_iters=150", "--config.lr_decay_iters=150",
                    "--config.eval_interval=150", "--config.eval_iters=10",
                    "--config.log_interval=50"], cwd=REPO, env=env, check=True, timeout=600)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_loss = [line["val/loss"] for line in lines if "val/loss" in line][-1]
    counts = np.bincount(np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r"))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # the loss of the best model that ignores context
    assert val_loss < unigram - 0.6, (val_loss, unigram)
    logged = [line for line in lines if "loss" in line]
    assert logged[0]["step"] == 1 and "compile_s" in logged[0] and "ms_per_step" not in logged[0]
    assert len(logged) > 1 and all({"lr", "ms_per_step", "tokens_per_s"} <= line.keys()
                                   and "mfu" not in line for line in logged[1:])  # no CPU peak
    assert load_params(out)[0].n_layer == 4


def test_resume_continues_exactly(data_dir, tmp_path):
    """6 steps straight == 3 steps + resume + 3 steps, bit for bit (with dropout and
    accumulation)."""
    common = dict(dropout=0.1, gradient_accumulation_steps=2)
    train(tiny_run_config(data_dir, tmp_path / "straight", **common))
    train(tiny_run_config(data_dir, tmp_path / "halves", max_iters=3, **common))
    assert Checkpoints(tmp_path / "halves").steps() == [3]
    train(tiny_run_config(data_dir, tmp_path / "halves", init_from="resume", **common))
    _, straight = load_params(tmp_path / "straight")
    _, resumed = load_params(tmp_path / "halves")
    chex.assert_trees_all_equal(straight, resumed)


def test_eval_only_and_sample_metadata(data_dir, tmp_path):
    losses = train(tiny_run_config(data_dir, tmp_path, eval_only=True))
    assert losses["step"] == 0 and np.isfinite(losses["val"])
    assert not Checkpoints(tmp_path).steps()
    assert json.loads((tmp_path / "meta.json").read_text())["tokenizer"] == "char"


def test_resume_skips_broken_checkpoints_and_keeps_them(data_dir, tmp_path, caplog):
    train(tiny_run_config(data_dir, tmp_path, max_iters=3))
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir / "3", ckpt_dir / "5")
    shutil.rmtree(ckpt_dir / "5" / "params")  # half written
    (ckpt_dir / "9").mkdir()  # foreign
    (ckpt_dir / "9" / "notes.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        losses = train(tiny_run_config(data_dir, tmp_path, init_from="resume", max_iters=4,
                                       eval_interval=100))
    assert losses["step"] == 4
    assert "is unreadable (" in caplog.text and "using the one before" in caplog.text
    # Nothing deleted: the unreadable steps are set aside under another name, and step 4 is written.
    assert {"5.unreadable", "9.unreadable", "3", "4"} <= {p.name for p in ckpt_dir.iterdir()}
    assert (ckpt_dir / "9.unreadable" / "notes.txt").read_text() == "not a checkpoint"
    assert Checkpoints(tmp_path).steps() == [3, 4]
    # eval_only on a resumed run evaluates whatever the step.
    losses = train(tiny_run_config(data_dir, tmp_path, init_from="resume", eval_only=True,
                                   eval_interval=100))
    assert losses["step"] == 4 and np.isfinite(losses["val"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    train(tiny_run_config(data_dir, tmp_path, max_iters=3))
    before = Checkpoints(tmp_path).steps()
    with pytest.raises(FloatingPointError, match="nothing was saved"):
        train(tiny_run_config(data_dir, tmp_path, init_from="resume", learning_rate=1e30,
                              decay_lr=False, grad_clip=0.0))
    assert Checkpoints(tmp_path).steps() == before
    load_params(tmp_path)  # still readable


def test_errors_say_what_to_do(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="python prepare.py text --input 'FILES' --name nothing_here"):
        train(tiny_run_config(tmp_path / "nothing_here", tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_run_config(data_dir, tmp_path / "empty", init_from="resume"))
    assert not (tmp_path / "empty").exists()  # a failed resume leaves nothing behind
    train(tiny_run_config(data_dir, tmp_path / "run", max_iters=3))
    with pytest.raises(ValueError, match="n_layer=2 \\(config: 3\\)"):
        train(tiny_run_config(data_dir, tmp_path / "run", init_from="resume", n_layer=3))
    (tmp_path / "short.txt").write_text(corpus_text(300))  # val split: 30 tokens
    prepare("shakespeare_char", out_dir=tmp_path / "short", input_path=tmp_path / "short.txt")
    with pytest.raises(ValueError, match="lower block_size"):
        train(tiny_run_config(tmp_path / "short", tmp_path / "out", block_size=64))
    with pytest.raises(ValueError, match="divisible by the 8 data-parallel devices"):
        train(tiny_run_config(data_dir, tmp_path / "out", batch_size=12))


def test_finetune_from_a_hugging_face_folder(data_dir, tmp_path):
    """init_from a pretrained folder: its weights and shape, cropped to the config's block_size."""
    from flaxgpt.model import GPTConfig, init_params
    from flaxgpt.pretrained import save_pretrained

    pretrained = GPTConfig(block_size=32, vocab_size=97, n_layer=1, n_head=2, n_embd=16)
    save_pretrained(init_params(pretrained, __import__("jax").random.key(3)), pretrained,
                    tmp_path / "hf")
    # the model's shape comes from the folder, not the config
    losses = train(tiny_run_config(data_dir, tmp_path / "out", init_from=str(tmp_path / "hf"),
                                   max_iters=2, n_layer=5))
    config, params = load_params(tmp_path / "out")
    assert (config.n_layer, config.n_embd, config.block_size, config.vocab_size) == (1, 16, 16, 97)
    assert losses["step"] == 2 and np.isfinite(losses["val"])
    # Resuming a fine-tuning run takes the model's shape from the checkpoint, as the first run did.
    losses = train(tiny_run_config(data_dir, tmp_path / "out", init_from="resume", max_iters=3))
    assert losses["step"] == 3 and load_params(tmp_path / "out")[0].n_layer == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits(data_dir, tmp_path, signum):
    """Preemption or Ctrl-C: train.py saves the current step and stops cleanly, in a few lines."""
    env = one_device_env()
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/shakespeare_char.py:cpu",
         f"--config.data_dir={data_dir}", f"--config.out_dir={out}", "--config.max_iters=100000",
         "--config.eval_interval=100000", "--config.n_layer=1", "--config.n_embd=32",
         "--config.eval_iters=1", "--config.log_interval=1000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        # the eval and step 1
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 1):
            assert process.poll() is None and time.monotonic() < deadline, (
                "train.py did not get going")
            time.sleep(0.2)
        time.sleep(0.5)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    finally:
        process.kill()
    assert "Traceback" not in stdout + stderr and len(program_lines(stderr)) <= 3, stderr
    assert "stopping at step" in stdout and signal.Signals(signum).name in stdout
    steps = Checkpoints(out).steps()
    assert len(steps) == 1 and steps[0] >= 1


def files_and_mtimes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_new_run_never_reuses_another_runs_out_dir(data_dir, tmp_path, capsys):
    train(tiny_run_config(data_dir, tmp_path, max_iters=3))
    first_run = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["run"]
    before = files_and_mtimes(tmp_path)
    with pytest.raises(ValueError) as e:
        train(tiny_run_config(data_dir, tmp_path, max_iters=3, learning_rate=1e-2))
    message = str(e.value)
    assert f"run {first_run}" in message and "steps 3" in message
    assert "init_from=resume" in message and "out_dir" in message and "overwrite=True" in message
    assert files_and_mtimes(tmp_path) == before  # nothing written, nothing deleted

    # overwrite moves the earlier run aside, file for file, and starts afresh.
    train(tiny_run_config(data_dir, tmp_path, max_iters=2, overwrite=True))
    aside = tmp_path / "previous" / first_run
    assert {k.removeprefix(f"previous/{first_run}/"): v
            for k, v in files_and_mtimes(tmp_path).items()
            if k.startswith("previous/")} == before
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len({row["run"] for row in rows}) == 1 and rows[0]["run"] != first_run
    assert (Checkpoints(tmp_path).steps() == [2]
            and Checkpoints(aside.parent / first_run).steps() == [3])


def test_resume_names_its_run_and_a_finished_run_says_so(data_dir, tmp_path, capsys):
    train(tiny_run_config(data_dir, tmp_path, max_iters=3))
    run_id = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["run"]
    capsys.readouterr()
    losses = train(tiny_run_config(data_dir, tmp_path, max_iters=3, init_from="resume"))
    out = capsys.readouterr().out
    assert (f"resuming run {run_id} at step 3" in out and "is finished" in out
            and losses["step"] == 3)
    train(tiny_run_config(data_dir, tmp_path, max_iters=4, init_from="resume"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {row["run"] for row in rows} == {run_id}
    assert "sample.py --out_dir=" in capsys.readouterr().out


def test_a_nanogpt_character_dataset_trains_with_its_own_vocabulary(data_dir, tmp_path):
    """nanoGPT's prepare.py writes train.bin, val.bin and meta.pkl (no meta.json): characters, not
    GPT-2 BPE."""
    import pickle

    from flaxgpt.tokenizer import from_dir

    nanogpt_data = tmp_path / "nanogpt_shakespeare_char"
    nanogpt_data.mkdir()
    for split in ("train", "val"):
        shutil.copy(data_dir / f"{split}.bin", nanogpt_data / f"{split}.bin")
    chars = json.loads((data_dir / "meta.json").read_text())["chars"]
    with open(nanogpt_data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    losses = train(tiny_run_config(nanogpt_data, tmp_path / "out", max_iters=2))
    config, _ = load_params(tmp_path / "out")
    # ln(65) = 4.17 at the start, not ln(50304)
    assert config.vocab_size == len(chars) and losses["val"] < 4.5
    assert from_dir(tmp_path / "out").decode([0, 1, 2]) == "".join(chars[:3])


def test_a_vocabulary_the_model_lacks_stops_before_the_first_step(data_dir, tmp_path):
    """A fine-tuned 97-token model resumed on GPT-2 BPE data would train to NaN: it stops with the
    reason."""
    from flaxgpt.model import GPTConfig, init_params
    from flaxgpt.pretrained import save_pretrained

    pretrained = GPTConfig(block_size=32, vocab_size=97, n_layer=1, n_head=2, n_embd=16)
    save_pretrained(init_params(pretrained, __import__("jax").random.key(3)), pretrained,
                    tmp_path / "hf")
    train(tiny_run_config(data_dir, tmp_path / "out", init_from=str(tmp_path / "hf"), max_iters=2))
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    for split in ("train", "val"):
        np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16).tofile(
            bpe / f"{split}.bin")
    (bpe / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257,
                                               "dtype": "uint16"}))
    with pytest.raises(ValueError, match="a vocabulary of 50,257.*more than the model's 97"):
        train(tiny_run_config(bpe, tmp_path / "out", init_from="resume", max_iters=4))
    assert Checkpoints(tmp_path / "out").steps() == [2]


def test_training_loop_on_fsdp4_tp2_matches_one_device(alphabet64_dir, tmp_path, monkeypatch):
    """The whole loop on an FSDP 4 x TP 2 mesh of 8 devices logs, evaluates and saves what one
    device does."""
    from flaxgpt import sharding

    def loop_config(out_dir, mesh):
        return tiny_run_config(alphabet64_dir, out_dir, mesh=mesh, gradient_accumulation_steps=2,
                               max_iters=4, eval_interval=4, warmup_iters=100,
                               lr_decay_iters=2000)

    results = {"2d": train(loop_config(tmp_path / "2d", {"fsdp": 4, "tensor": 2}))}
    make_mesh = sharding.make_mesh
    # train() puts its mesh over all jax.devices(); give it only the first one.
    monkeypatch.setattr(sharding, "make_mesh",
                        lambda shape, devices=None: make_mesh(shape, jax.devices()[:1]))
    results["one"] = train(loop_config(tmp_path / "one", {"data": 1}))
    monkeypatch.undo()
    assert results["2d"]["step"] == results["one"]["step"] == 4
    np.testing.assert_allclose(results["2d"]["val"], results["one"]["val"], rtol=2e-6, atol=0)

    logs = {k: [json.loads(line)
                for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in results}
    assert [line["step"] for line in logs["2d"]] == [0, 1, 2, 3, 4, 4]  # eval, 4 steps, eval
    for key in ("loss", "grad_norm", "train/loss", "val/loss"):
        pairs = [(a[key], b[key]) for a, b in zip(logs["2d"], logs["one"], strict=True) if key in a]
        assert pairs, key
        np.testing.assert_allclose(*zip(*pairs), err_msg=key, rtol=2e-6, atol=0)

    params = {k: to_host(load_params(tmp_path / k)[1]) for k in results}
    assert_trees_close(params["2d"], params["one"], rtol=1e-5, atol=1e-7)  # reduction order


def test_an_unscanned_checkpoint_resumes_into_scanned_layers(data_dir, tmp_path):
    """A run saved with one block per layer continues with scan_layers (params and Adam moments
    stacked) and gives the losses of a run that never changed layout; and back again."""
    straight = train(tiny_run_config(data_dir, tmp_path / "straight", max_iters=6,
                                     scan_layers=False))
    train(tiny_run_config(data_dir, tmp_path / "switch", max_iters=3, scan_layers=False))
    switched = train(tiny_run_config(data_dir, tmp_path / "switch", max_iters=6, scan_layers=True,
                                     init_from="resume"))
    np.testing.assert_allclose(switched["val"], straight["val"], rtol=1e-5)
    config, params = load_params(tmp_path / "switch")
    assert config.scan_layers and jax.tree.leaves(params["h"])[0].shape[0] == 2
    back = train(tiny_run_config(data_dir, tmp_path / "switch", max_iters=7, scan_layers=False,
                                 init_from="resume"))
    assert back["step"] == 7 and np.isfinite(back["val"])


def test_train_and_sample_with_everything_in_a_bucket(data_dir, tmp_path, gcs_dir):
    """train.py with out_dir (and the dataset) in a bucket writes nothing local; sample.py reads the
    run there."""
    from flaxgpt import storage
    bucket_data = f"{gcs_dir}/data"
    for name in ("train.bin", "val.bin", "meta.json"):
        storage.write_atomically(storage.path(bucket_data) / name, (data_dir / name).read_bytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = one_device_env()
    run = [sys.executable, str(REPO / "train.py"),
           f"--config={REPO / 'configs/shakespeare_char.py'}:cpu",
           f"--config.data_dir={bucket_data}", f"--config.out_dir={gcs_dir}/run",
           "--config.max_iters=4", "--config.eval_interval=2", "--config.eval_iters=2",
           "--config.n_layer=1", "--config.n_embd=32", "--config.compilation_cache_dir="]
    result = subprocess.run(run, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in storage.path(f"{gcs_dir}/run").iterdir()}
    assert {"checkpoints", "metrics.jsonl", "meta.json", "tensorboard", "loss.png"} <= names, names
    sample = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={gcs_dir}/run",
                             "--num_samples=1", "--max_new_tokens=10", "--compilation_cache_dir="],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (sample.returncode == 0
            and f"at step 4 ({gcs_dir}/run/checkpoints/4)" in sample.stderr), sample.stderr
    assert list(cwd.iterdir()) == []
