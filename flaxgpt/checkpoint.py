"""Checkpoints with orbax: `<out_dir>/checkpoints/<step>/{params,opt_state,meta}` (local or gs://),
meta a JSON record (step, run id, best val loss, configs, a checksum of every array). Every process
writes its own shards, so a checkpoint restores onto any mesh. A step that any process cannot read,
or whose arrays differ from their checksums, is passed over by all for the one before (not deleted).
"""

import contextlib
import itertools
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxgpt import distributed, faults, storage
from flaxgpt.model import GPTConfig, init_params

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint in a checkpoints folder."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint step that cannot be restored (half written, foreign, damaged)."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path} is unreadable ({reason})")


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The steps in a checkpoints folder (readable or not, not half written), oldest first."""
    directory = storage.path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def run_id_of(out_dir: str | os.PathLike, step: int) -> str | None:
    """The id of the run that saved `step` in out_dir, or None if it has none or cannot be read."""
    try:
        with Checkpoints(out_dir, create=False) as checkpoints:
            return checkpoints.read_meta(step).get("run_id")
    except Exception:  # an unreadable step: orbax raises many kinds of errors
        return None


def unused_path(path: storage.Path, sep: str = "") -> storage.Path:
    """path, or the first of path{sep}1, path{sep}2, ... that does not exist: what is set aside
    never goes over what was set aside before."""
    names = (f"{path.name}{sep}{n}" if n else path.name for n in itertools.count())
    return next(p for p in map(path.with_name, names) if not p.exists())


@jax.jit
def _checksums(tree):
    """uint32 checksum of every array: sum of its bits times odd position weights, mod 2^32. Integer
    addition is associative, so the result does not depend on the mesh or the reduction order."""
    def checksum(x):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = (x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, unsigned))
        weights = (jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * jnp.uint32(2654435761)
                   + jnp.uint32(1))
        return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)
    return jax.tree.map(checksum, tree)


def tree_checksums(tree) -> dict[str, int]:
    """{array path: checksum} of a tree of (possibly sharded, multi-host) arrays."""
    sums = _checksums(tree)
    return {jax.tree_util.keystr(path): int(np.asarray(leaf.addressable_data(0)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(sums)}


def verify_checksums(tree, expected: dict[str, int], where: storage.Path) -> None:
    """Raise UnreadableCheckpointError naming the arrays whose checksums are not the saved ones."""
    bad = [path for path, value in tree_checksums(tree).items()
           if path in expected and expected[path] != value]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UnreadableCheckpointError(where, f"{', '.join(bad[:3])}{more} differ from the "
                                        "checksums saved with them (the files changed on disk)")


class Checkpoints:
    """Saves and restores training checkpoints in `<out_dir>/checkpoints`; a context manager that
    waits for the last save and closes on exit."""

    def __init__(self, out_dir: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, create: bool = True):
        out_dir = storage.path(out_dir)
        self.directory = ((out_dir if storage.is_remote(out_dir) else out_dir.absolute())
                          / "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))
        # Reads go through the handlers, without the barrier orbax's restore ends with: a process
        # that fails to read must not leave the others waiting there (see `restore`).
        self._arrays = ocp.StandardCheckpointHandler()
        self._saving = (None, 0)  # (step, bytes) of the last save

    def __enter__(self):
        return self

    def __exit__(self, *_):
        try:
            self.wait()
        finally:
            self.close()

    def steps(self) -> list[int]:
        return saved_steps(self.directory)

    def set_aside(self, steps: list[int]) -> None:
        """Rename unreadable steps to `<step>.unreadable`: kept, but no longer checkpoints (a
        resumed run can write that step again, and max_to_keep counts good ones). What failed
        saves left half written (`<step>.orbax-checkpoint-tmp`, never a checkpoint; on a full
        disk, the space the resumed run needs) is deleted."""
        if distributed.is_main_process():
            for step in steps:
                path = self.directory / str(step)
                target = unused_path(path.with_name(f"{step}.unreadable"))
                storage.move(path, target)
                log.warning("set aside unreadable checkpoint %s as %s", path, target.name)
            for path in self.directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"):
                path.rmtree()
                log.warning("deleted %s, left half written by a failed save", path)
        distributed.all_values("checkpoints set aside", "")
        self.manager.reload()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Start writing `step` (in the background when async); `wait()` before reading it back."""
        self.check_for_errors()  # an earlier background save that failed is reported as such
        meta = {**meta, "checksums": {"params": tree_checksums(params),
                                      "opt_state": tree_checksums(opt_state)}}
        self.directory.mkdir(parents=True, exist_ok=True)  # now: a run that fails early leaves none
        self._saving = (step, sum(x.nbytes for x in jax.tree.leaves((params, opt_state))))
        with self._save_errors():  # a synchronous save fails here
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        with self._save_errors():
            self.manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raise an OSError of one line if a background save failed (e.g. the disk is full)."""
        with self._save_errors():
            self.manager.check_for_errors()
            # orbax's finalize thread keeps the writer's error for itself (check_for_errors alone
            # never sees it); once no save is in progress, waiting returns at once and raises it
            if not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _save_errors(self):
        """A failed save (orbax's error, the writer's inside) as an OSError of one line: the root
        cause first (a full disk: the space it needs), which step, and that nothing was lost (orbax
        writes a step under a temporary name and renames it only once it is complete)."""
        try:
            yield
        except Exception as error:
            step, n_bytes = self._saving
            where, mib = self.directory / str(step), n_bytes / 2**20
            if faults.is_disk_full(error):
                free = (0 if storage.is_remote(self.directory)
                        else shutil.disk_usage(self.directory).free)
                what = (f"disk full: saving checkpoint {where} needs about {mib:,.1f} MiB, "
                        f"{max(n_bytes - free, 0) / 2**20:,.1f} MiB more than is free")
            else:
                what = (f"saving checkpoint {where} failed ({faults.describe(error)}); it needs "
                        f"about {mib:,.1f} MiB free")
            failure = OSError(f"{what}. Nothing was lost: the earlier checkpoints in "
                              f"{self.directory} are untouched; free some space, then resume from "
                              "the newest with --config.init_from=resume")
            failure.errno = getattr(faults.innermost(error), "errno", None)
            raise failure from None

    def close(self) -> None:
        self.manager.close()
        self._arrays.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record saved with `step`."""
        return ocp.JsonCheckpointHandler().restore(self.directory / str(step) / "meta")

    def restore(self, abstract_params, abstract_opt_state=None, *, run_id: str | None = None,
                newest: int | None = None):
        """Restore the newest readable step (or the newest from `newest` down) -> (params,
        opt_state or None, meta with its step). The abstract trees (ShapeDtypeStructs with
        shardings; abstract_params may be a function of the step's meta) say where every shard
        goes; with run_id, another run's steps are passed over. All processes check the arrays'
        checksums together, so every one gets the same verdict."""
        def read(s):  # this process's shards only: no collective, so no peer is left waiting
            meta = {"step": s, **self.read_meta(s)}
            if run_id is not None and meta.get("run_id") != run_id:
                raise ValueError(f"saved by run {meta.get('run_id')}, not by run {run_id}")
            targets = {"params": abstract_params(meta) if callable(abstract_params)
                       else abstract_params, "opt_state": abstract_opt_state}
            return meta, {name: self._arrays.restore(self.directory / str(s) / name,
                                                     args=ocp.args.StandardRestore(target))
                          for name, target in targets.items() if target is not None}

        def verify(s, read_back):
            meta, restored = read_back
            for name, tree in restored.items():
                verify_checksums(tree, meta.get("checksums", {}).get(name, {}),
                                 self.directory / str(s))

        meta, restored = self.newest_readable(read, newest=newest, verify=verify)
        return restored["params"], restored.get("opt_state"), meta

    def newest_readable(self, read, *, newest: int | None = None, verify=None):
        """`read(step)` of the newest step every process can read (or the newest from `newest`
        down), then `verify(step, result)` on all processes together. Every process tries the
        steps process 0 lists, in order; a step that any of them cannot read is passed over by
        all, with a warning naming the process and its reason, and left on disk."""
        candidates = [s for s in distributed.decided_by_main("checkpoint steps", self.steps)[::-1]
                      if newest is None or s <= newest]
        if not candidates:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}: train first, or use "
                                          "init_from='scratch'")
        for s in candidates:
            try:
                result, failure = read(s), ""
            except Exception as e:  # orbax raises many kinds of errors for a broken step directory
                result, failure = None, faults.describe(e)
            failures = distributed.all_values(f"read checkpoint {s}", failure)
            bad = [(i, reason) for i, reason in enumerate(failures) if reason]
            try:
                if bad:
                    process, reason = bad[0]
                    where = f" on process {process}" if len(failures) > 1 else ""
                    raise UnreadableCheckpointError(f"{self.directory / str(s)}{where}", reason)
                if verify is not None:
                    verify(s, result)
                return result
            except UnreadableCheckpointError as e:
                if len(candidates) == 1:
                    raise
                log.warning("%s: using the one before", e)
        raise ValueError(f"none of the checkpoints {candidates} in {self.directory} could be read; "
                         "restore an earlier copy of them, or train a new run in another out_dir")


def model_config_from_meta(meta: dict[str, Any], **overrides) -> GPTConfig:
    return GPTConfig(**{"scan_layers": False, **meta["model"], **overrides})  # older: no scan


def load_run(out_dir: str | os.PathLike, *,
             dtype: str | None = None) -> tuple[GPTConfig, Any, dict[str, Any]]:
    """(model config, params, meta with the step and run_id) of the newest readable checkpoint of
    a training run, on the default device. For inference: dtype overrides the compute dtype, and
    attention is "auto" (a run trained with splash or cuDNN attention runs anywhere)."""
    out_dir = storage.path(out_dir)
    storage.check_reachable(out_dir, "out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a training run's out_dir")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    overrides = {"attention": "auto", **({"dtype": dtype} if dtype else {})}

    def target(meta):  # the model's shape is stored in the checkpoint
        config = model_config_from_meta(meta, **overrides)
        shapes = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            shapes)
    with Checkpoints(out_dir, create=False) as checkpoints:
        try:
            params, _, meta = checkpoints.restore(target)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint in {checkpoints.directory}: train a model with train.py "
                f"--config.out_dir={out_dir} first") from None
    return model_config_from_meta(meta, **overrides), params, meta


def load_params(out_dir: str | os.PathLike, *, dtype: str | None = None) -> tuple[GPTConfig, Any]:
    """`load_run` without the meta."""
    config, params, _ = load_run(out_dir, dtype=dtype)
    return config, params
