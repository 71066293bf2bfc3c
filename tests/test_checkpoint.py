"""Checkpoints (flaxgpt/checkpoint.py): checksums, fallback past corrupt steps, run ids, failed
saves."""

import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import assert_trees_close, one_device_mesh, to_host
from flaxgpt import checkpoint, optim, sharding
from flaxgpt.config import base_config
from flaxgpt.train_step import TrainStep
from flaxgpt.model import GPTConfig, init_params

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def save_steps(out_dir: Path, steps, run_id="run-a"):
    """Steps of a run whose params differ from step to step -> {step: params}."""
    saved = {}
    with checkpoint.Checkpoints(out_dir, async_save=False) as ckpts:
        for step in steps:
            params = init_params(TINY, jax.random.key(step))
            ckpts.save(step, params, {"count": jnp.int32(step)},
                       {"step": step, "run_id": run_id, "model": TINY.to_dict()})
            saved[step] = params
    return saved


def params_files(step_dir: Path) -> list[Path]:
    """The data files that hold a step's params (orbax's OCDBT layout), largest first."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and "manifest" not in p.name
             and p.stat().st_size > 1000]
    return sorted(files, key=lambda p: -p.stat().st_size)


def test_checksums_are_the_same_on_any_mesh_and_catch_one_changed_value():
    params = init_params(TINY, jax.random.key(0))
    one = checkpoint.tree_checksums(params)
    mesh = sharding.make_mesh({"fsdp": 8})

    def split_last_axis(x):  # over 8 devices where it divides, else replicated
        axis = "fsdp" if x.shape[-1] % 8 == 0 else None
        return jax.device_put(x, NamedSharding(mesh, P(*([None] * (x.ndim - 1)), axis)))

    sharded = jax.tree.map(split_last_axis, params)
    assert checkpoint.tree_checksums(sharded) == one
    changed = jax.tree.map(lambda x: x, params)
    changed["h"]["mlp"]["c_fc"]["kernel"] = (
        changed["h"]["mlp"]["c_fc"]["kernel"].at[1, 3, 5].add(1e-7))
    with pytest.raises(checkpoint.UnreadableCheckpointError,
                       match=r"\['h'\]\['mlp'\]\['c_fc'\]\['kernel'\]"):
        checkpoint.verify_checksums(changed, one, Path("somewhere"))
    checkpoint.verify_checksums(params, one, Path("somewhere"))  # unchanged: passes


def test_flipped_bytes_make_a_step_unreadable_and_the_previous_one_is_used(tmp_path, caplog):
    saved = save_steps(tmp_path, [1, 2])
    target = jax.eval_shape(lambda: saved[1])
    data_file = params_files(tmp_path / "checkpoints" / "2")[0]
    blob = bytearray(data_file.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(len(blob) // 4, len(blob) - 64), size=64, replace=False):
        blob[i] ^= 0x5A
    data_file.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(tmp_path, create=False) as ckpts:
        params, _, meta = ckpts.restore(target)
    assert meta["step"] == 1 and "checkpoints/2" in caplog.text
    # Whether the flipped bytes land in a compressed chunk's header or frame (zstd refuses it, in
    # words that depend on where) or in its payload (it decodes to other numbers, which only the
    # checksums catch) depends on how orbax laid out the file.
    assert "differ from the checksums" in caplog.text or "is unreadable (array " in caplog.text
    assert "TensorStore(" not in caplog.text  # one line, without tensorstore's spec
    jax.tree.map(np.testing.assert_array_equal, params, saved[1])
    config, params = checkpoint.load_params(tmp_path)  # sampling falls back the same way
    jax.tree.map(np.testing.assert_array_equal, params, saved[1])


def test_arrays_that_decode_but_changed_on_disk_are_caught_by_the_checksums(tmp_path, caplog):
    saved = save_steps(tmp_path, [1, 2, 3])
    steps = tmp_path / "checkpoints"
    shutil.rmtree(steps / "2" / "params")
    # a bad copy: valid files, other values
    shutil.copytree(steps / "3" / "params", steps / "2" / "params")
    shutil.rmtree(steps / "3")
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(tmp_path, create=False) as ckpts:
        params, _, meta = ckpts.restore(jax.eval_shape(lambda: saved[1]))
    assert (meta["step"] == 1 and "checkpoints/2" in caplog.text
            and "differ from the checksums" in caplog.text)
    jax.tree.map(np.testing.assert_array_equal, params, saved[1])


def test_restore_passes_over_another_runs_steps(tmp_path, caplog):
    save_steps(tmp_path, [1], run_id="run-a")
    save_steps(tmp_path, [2], run_id="run-b")
    assert checkpoint.saved_steps(tmp_path / "checkpoints") == [1, 2]
    assert (checkpoint.run_id_of(tmp_path, 2) == "run-b"
            and checkpoint.run_id_of(tmp_path, 7) is None)
    target = jax.eval_shape(lambda: init_params(TINY, jax.random.key(0)))
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(tmp_path, create=False) as ckpts:
        assert ckpts.restore(target, run_id="run-a")[2]["step"] == 1
        assert ckpts.restore(target, run_id="run-b")[2]["step"] == 2
    assert "not by run run-a" in caplog.text


def random_state(abstract, seed=0):
    """Host arrays of the abstract state's shapes with distinct random values (zeros prove
    little)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype) if s.ndim else
                        np.asarray(rng.integers(1, 100), s.dtype), abstract)


@pytest.mark.parametrize("source, targets", [("fsdp8", ["one", "tp2_dp4"]), ("one", ["fsdp8"])])
def test_checkpoint_restores_onto_another_mesh(source, targets, tmp_path):
    optimizer = optim.make_optimizer(base_config())

    def train_step_on(name):
        mesh = one_device_mesh() if name == "one" else sharding.make_mesh(
            {'fsdp8': {'fsdp': 8}, 'tp2_dp4': {'data': 4, 'tensor': 2}}[name])
        return TrainStep(TINY, optimizer, mesh)

    saver = train_step_on(source)
    values = random_state(saver.abstract_state)
    state = jax.device_put(values, saver.state_sharding)
    ckpts = checkpoint.Checkpoints(tmp_path)
    ckpts.save(7, state.params, state.opt_state, {"step": 7})
    ckpts.wait()
    for name in targets:
        target = train_step_on(name).abstract_state
        params, opt_state, meta = ckpts.restore(target.params, target.opt_state)
        assert meta["step"] == 7 and set(meta["checksums"]) == {"params", "opt_state"}
        restored = {"params": params, "opt_state": opt_state}
        expected = {"params": target.params, "opt_state": target.opt_state}
        assert_trees_close(to_host(restored),
                           {"params": values.params, "opt_state": values.opt_state},
                           rtol=0, atol=0)
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
            assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), name
    ckpts.close()


def test_a_full_disk_during_a_background_save_fails_the_next_check(tmp_path, monkeypatch):
    """orbax's writer hits ENOSPC while saving step 2 in the background: the next check (the loop
    makes one before every step) raises one line naming the step; step 1 is untouched and still the
    newest."""
    import errno
    import time

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    saved = save_steps(tmp_path, [1])
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):
        if "2.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
    ckpts = checkpoint.Checkpoints(tmp_path, async_save=True)
    ckpts.save(2, saved[1], {"count": jnp.int32(2)},
               {"step": 2, "run_id": "run-a", "model": TINY.to_dict()})
    with pytest.raises(OSError) as e:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ckpts.check_for_errors()
            time.sleep(0.05)
    message = str(e.value)
    assert "\n" not in message and e.value.errno == errno.ENOSPC
    assert f"disk full: saving checkpoint {tmp_path / 'checkpoints' / '2'} needs about " in message
    assert "Nothing was lost" in message
    monkeypatch.undo()
    try:
        ckpts.close()
    except OSError:
        pass
    assert checkpoint.saved_steps(tmp_path / "checkpoints") == [1]
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(tmp_path)[1], saved[1])


def test_checkpoints_in_a_bucket_fall_back_and_set_aside_like_local_ones(gcs_dir, caplog):
    from flaxgpt import storage
    saved = save_steps(gcs_dir, [1, 2])
    newest = storage.path(gcs_dir) / "checkpoints" / "2" / "params"
    for data_file in [*newest.glob("d/*"), *newest.glob("*/d/*")]:  # OCDBT's data files
        storage.write_atomically(data_file, b"\0" * 16)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=NamedSharding(one_device_mesh(), P())),
        saved[1])
    with checkpoint.Checkpoints(gcs_dir) as ckpts, caplog.at_level(logging.WARNING):
        params, _, meta = ckpts.restore(target)
        assert (meta["step"] == 1 and "is unreadable (" in caplog.text
                and "using the one before" in caplog.text)
        assert_trees_close(to_host(params), to_host(saved[1]), rtol=0, atol=0)
        ckpts.set_aside([2])
        assert ckpts.steps() == [1]
    assert (sorted(p.name for p in (storage.path(gcs_dir) / "checkpoints").iterdir())
            == ["1", "2.unreadable"])
