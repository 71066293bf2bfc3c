"""Checkpoints with orbax: params, optimizer state and a JSON record (step, best val loss, configs).

Layout: `<out_dir>/checkpoints/<step>/{params,opt_state,meta}`. Every process writes its own shards,
so a checkpoint saved on one mesh restores onto any other (the restore target carries the shardings).
"""

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flaxgpt.model import GPTConfig, init_params

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    pass


class Checkpoints:
    """Saves and restores training checkpoints in `<out_dir>/checkpoints`."""

    def __init__(self, out_dir: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = Path(out_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.directory.is_dir() else []

    def set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories to `<step>.unreadable`: kept on disk, but no longer counted
        as checkpoints (so a resumed run can write that step again and max_to_keep counts good ones)."""
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                target = path.with_name(f"{step}.unreadable")
                for n in range(1, 1000):  # never over an earlier one
                    if not target.exists():
                        break
                    target = path.with_name(f"{step}.unreadable{n}")
                path.rename(target)
                log.warning("set aside unreadable checkpoint %s as %s", path, target.name)
        multihost_utils.sync_global_devices("flaxgpt: checkpoints set aside")
        self.manager.reload()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Start writing step `step` (in the background when async); `wait()` before reading it back."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_params, abstract_opt_state=None, *, step: int | None = None):
        """Restore the newest readable step (or `step`) -> (params, opt_state or None, meta).

        The abstract trees (jax.ShapeDtypeStruct with shardings) say where every shard goes.
        """
        def read(s):
            items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
            if abstract_opt_state is not None:
                items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            return restored["params"], restored.get("opt_state"), restored["meta"]
        return self.newest_readable(read, step=step)

    def newest_readable(self, read, *, step: int | None = None):
        """`read(step)` of the newest step it succeeds on (or of `step` alone).

        A step that cannot be read (half written, foreign, corrupt) is skipped with a warning and left
        on disk: it is never deleted here.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}: train first, or use "
                                          "init_from='scratch'")
        for s in candidates:
            try:
                return read(s)
            except Exception as e:  # orbax raises many kinds of errors for a broken step directory
                if len(candidates) == 1:
                    raise ValueError(f"cannot read checkpoint {self.directory / str(s)}: {e}") from e
                log.warning("skipping unreadable checkpoint %s (%s: %s)", self.directory / str(s),
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise ValueError(f"none of the checkpoints {candidates} in {self.directory} could be read; "
                         "move them aside and resume from an earlier copy, or start with init_from='scratch'")


def model_config_from_meta(meta: dict[str, Any], **overrides) -> GPTConfig:
    return GPTConfig(**{"scan_layers": False, **meta["model"], **overrides})  # older runs had no scan


def load_params(out_dir: str | Path, *, dtype: str | None = None) -> tuple[GPTConfig, Any]:
    """The model config and params of the newest checkpoint of a training run, on the default device.

    For inference: dtype overrides the compute dtype, and attention is XLA's (as `generate` uses).
    """
    checkpoints = Checkpoints(out_dir, create=False)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def read(step):  # the model's shape is stored in the checkpoint; the params' target follows from it
        config = model_config_from_meta(checkpoints.read_meta(step), attention="xla",
                                        **({"dtype": dtype} if dtype else {}))
        shapes = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
        params, _, _ = checkpoints.restore(target, step=step)
        return config, params

    try:
        return checkpoints.newest_readable(read)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint in {checkpoints.directory}: train a model with "
                                      f"train.py --config.out_dir={out_dir} first") from None
    finally:
        checkpoints.close()
