"""What a run is built from and starts from: its mesh and TrainStep (shared with --compile_for),
its out_dir (`claim_out_dir`), its id, and its first state (`initial_state`: fresh, resumed from
out_dir or a pretrained model). A new run never starts in an out_dir that holds another run's
checkpoints; process 0 decides such things and every process follows.
"""

import datetime
import secrets

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flaxgpt import checkpoint, distributed, optim, sharding, storage
from flaxgpt.layer_stacking import convert_layers
from flaxgpt.metrics import TENSORBOARD_DIR
from flaxgpt.model import PRESETS, GPTConfig, crop_block_size
from flaxgpt.profiling import PROFILE_DIR
from flaxgpt.train_step import TrainState, TrainStep

# Settings a resumed run must share with its checkpoint (others, e.g. dropout, may change).
MODEL_KEYS_TO_MATCH = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias",
                       "gelu_approximate")
# What a run takes from its config when the model's shape comes from a pretrained model.
RUN_SETTINGS = ("dropout", "attention", "dtype", "scan_layers", "remat")
# What a run writes into its out_dir; `overwrite` moves these aside and touches nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "meta.json", TENSORBOARD_DIR, "loss.png", PROFILE_DIR)


def make_mesh(config, devices=None) -> Mesh:
    """The config's mesh over `devices` (default: all of jax's); a batch that does not divide over
    its data-parallel devices is an error that proposes one that does."""
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % data_parallel:
        batch, accumulation = sharding.divisible_batch(
            config.batch_size, config.gradient_accumulation_steps, data_parallel)
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                         f"{data_parallel} data-parallel devices (mesh data x fsdp): e.g. "
                         f"--config.batch_size={batch} "
                         f"--config.gradient_accumulation_steps={accumulation}")
    return mesh


def build(config, model: GPTConfig, mesh: Mesh) -> TrainStep:
    """The TrainStep of `model` on `mesh`, with the config's optimizer and seed."""
    return TrainStep(model, optim.make_optimizer(config), mesh, seed=config.seed)


def new_run_id() -> str:
    """A readable unique id, e.g. 20261122-093512-4f2a9c, the same on every process of the run."""
    return distributed.decided_by_main(
        "run id", lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-")
        + secrets.token_hex(3))


def claim_out_dir(out_dir: storage.Path, overwrite: bool) -> None:
    """Make sure a new run does not mix with another in out_dir: with another run's checkpoints
    there, stop with the choices, or (overwrite) move that run's files into out_dir/previous/<its
    id>/. Process 0 looks and moves; every process raises its error."""
    def claim():
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"out_dir {out_dir} is a file: "
                                     "choose a directory with --config.out_dir")
        steps = checkpoint.saved_steps(out_dir / "checkpoints")
        if not steps:
            return
        owner = checkpoint.run_id_of(out_dir, steps[-1])
        if not overwrite:
            run = f"run {owner}" if owner else "an earlier run"
            raise ValueError(
                f"{out_dir} holds the checkpoints of {run} (steps {', '.join(map(str, steps))}): "
                "continue it with --config.init_from=resume, choose another --config.out_dir, or "
                "set --config.overwrite=True to move that run's files aside (nothing is deleted)")
        aside = checkpoint.unused_path(
            out_dir / "previous" / (owner or f"run-before-{datetime.date.today():%Y%m%d}"), ".")
        aside.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (out_dir / name).exists():
                storage.move(out_dir / name, aside / name)
        print(f"overwrite: moved the files of the earlier run to {aside}", flush=True)
    distributed.decided_by_main("out_dir claimed", claim)


def initial_state(config, mesh: Mesh, wanted: GPTConfig, ckpts: checkpoint.Checkpoints):
    """(TrainStep, first state, {"run_id", "best_val_loss", "model_source", ...} as a resumed run
    recorded them) for config.init_from. The model's shape is the config's, or that of the
    pretrained model the run started from (also when it resumes)."""
    if config.init_from == "resume":
        return _resumed(config, mesh, wanted, ckpts)
    if config.init_from == "scratch":
        train_step = build(config, wanted, mesh)
        return train_step, train_step.init(jax.random.key(config.seed)), {"run_id": new_run_id()}
    pretrained, params = load_pretrained_once(config.init_from, wanted.dtype, wanted.param_dtype)
    if config.block_size < pretrained.block_size:
        params, pretrained = crop_block_size(params, pretrained, config.block_size)
    train_step = build(config, pretrained.replace(**{k: getattr(wanted, k) for k in RUN_SETTINGS}),
                       mesh)
    params = convert_layers(params, wanted.scan_layers)
    return train_step, train_step.state_from_params(params), {"run_id": new_run_id(),
                                                              "model_source": config.init_from}


def _resumed(config, mesh: Mesh, wanted: GPTConfig, ckpts: checkpoint.Checkpoints):
    """initial_state of init_from="resume": the newest checkpoint every process can read, restored
    in the layer layout it was saved in, then (un)stacked to the config's."""
    saved_meta = ckpts.newest_readable(ckpts.read_meta)
    saved = checkpoint.model_config_from_meta(saved_meta)
    if saved_meta.get("model_source", "config") == "config":
        diffs = [f"{k}={getattr(saved, k)} (config: {getattr(wanted, k)})"
                 for k in MODEL_KEYS_TO_MATCH if getattr(saved, k) != getattr(wanted, k)]
        if diffs:
            raise ValueError(f"the checkpoint in {ckpts.directory.parent} has {', '.join(diffs)}: "
                             "set the config to the checkpoint's model, or pick another out_dir to "
                             "start a new run")
    else:
        wanted = saved.replace(**{k: getattr(wanted, k) for k in RUN_SETTINGS})
    train_step = build(config, wanted, mesh)
    target = train_step.abstract_state
    if saved.scan_layers != wanted.scan_layers:
        target = build(config, wanted.replace(scan_layers=saved.scan_layers), mesh).abstract_state
    params, opt_state, saved_meta = ckpts.restore(target.params, target.opt_state,
                                                  run_id=saved_meta.get("run_id"),
                                                  newest=saved_meta["step"])
    if saved.scan_layers != wanted.scan_layers:
        params, opt_state = jax.jit(
            lambda *tree: convert_layers(tree, wanted.scan_layers),
            out_shardings=(train_step.state_sharding.params,
                           train_step.state_sharding.opt_state))(params, opt_state)
    ckpts.set_aside([s for s in ckpts.steps() if s > saved_meta["step"]])  # newer: unreadable
    step = jax.device_put(np.int32(saved_meta["step"]), target.step.sharding)
    if "run_id" not in saved_meta:  # a checkpoint from before run ids
        saved_meta["run_id"] = new_run_id()
    return train_step, TrainState(step=step, params=params, opt_state=opt_state), saved_meta


def load_pretrained_once(init_from: str, dtype: str, param_dtype: str) -> tuple[GPTConfig, dict]:
    """`pretrained.load_pretrained` on process 0 alone (one download per run, not one per host); the
    other processes receive its config and weights, one array at a time."""
    from flaxgpt.pretrained import load_pretrained
    loaded = {}

    def load() -> dict:
        config, loaded["params"] = load_pretrained(init_from, dtype=dtype, param_dtype=param_dtype)
        leaves = traverse_util.flatten_dict(loaded["params"], sep="/")
        return {"config": config.to_dict(),
                "leaves": {k: [list(v.shape), str(v.dtype)] for k, v in leaves.items()}}

    described = distributed.decided_by_main("pretrained model", load)
    config = GPTConfig(**described["config"])
    if jax.process_count() == 1:
        return config, loaded["params"]
    mine = traverse_util.flatten_dict(loaded["params"], sep="/") if "params" in loaded else {}
    params = {}
    for name, (shape, dtype_name) in sorted(described["leaves"].items()):
        leaf = np.asarray(mine[name]) if mine else np.zeros(shape, dtype_name)
        params[name] = multihost_utils.broadcast_one_to_all(leaf)
    return config, traverse_util.unflatten_dict(params, sep="/")


def check_vocabulary(dataset_meta: dict, directory, model: GPTConfig, init_from: str) -> None:
    """Tokens the model has no embedding for would train to NaN: say so before the first step."""
    kind = dataset_meta.get("tokenizer", "gpt2")
    if init_from in PRESETS and kind != "gpt2":
        raise ValueError(f"{directory} holds {kind} tokens, but {init_from} reads GPT-2 BPE "
                         "tokens: fine-tune on a GPT-2 BPE dataset (e.g. python prepare.py "
                         "shakespeare)")
    if dataset_meta["vocab_size"] > model.vocab_size:
        raise ValueError(f"{directory} holds {kind} tokens (a vocabulary of "
                         f"{dataset_meta['vocab_size']:,}), more than the model's "
                         f"{model.vocab_size:,}: train this model on the dataset it was made for, "
                         "or start a new run in another out_dir")


def check_backend(attention: str) -> None:
    """An attention kernel that this backend cannot run is a setting to change."""
    backend = jax.default_backend()
    if attention == "cudnn" and backend != "gpu":
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this backend is {backend}): use "
                         "attention='xla'")
    if attention == "splash" and backend != "tpu":
        raise ValueError(f"attention='splash' needs a TPU (this backend is {backend}): use "
                         "attention='auto' or 'xla'")
