"""The training loop: nanoGPT's train.py as one function of a config (see flaxgpt/config.py).

`train(config)` opens the dataset (`Dataset`), claims the out_dir for this run (`claim_out_dir`),
builds the model's sharded steps and first state (`initial_state`), then evaluates, checkpoints and
steps until max_iters, a stop request (`StopRequest`: SIGTERM, Ctrl-C, a Cloud TPU preemption) or a
non-finite loss.

Every run has an id, written into its checkpoints and metrics: a new run never starts in an out_dir
that holds another run's checkpoints, and `init_from="resume"` continues the run of the newest
checkpoint.

On several hosts (a pod slice) every process runs `train` with the same config. They check together
that out_dir is one storage they all see and that they read the same dataset; process 0 decides what
the run starts from and every process follows; an error on one process stops them all
(distributed.py).
"""

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import os
import secrets
import signal
import threading
import time

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from flaxgpt import (checkpoint, data, distributed, faults, host_memory, mfu, optim, sharding,
                     storage, tokenizer, xla_options)
from flaxgpt.config import model_config, validate
from flaxgpt.metrics import TENSORBOARD_DIR, MetricsLog
from flaxgpt.profiling import PROFILE_DIR, StepProfiler
from flaxgpt.layer_stacking import convert_layers
from flaxgpt.model import PRESETS, GPTConfig, count_params, crop_block_size, flops_per_token
from flaxgpt.train_step import TrainState, TrainStep

# Settings a resumed run must share with its checkpoint (the rest, e.g. dropout, may change on
# resume).
MODEL_KEYS_TO_MATCH = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias",
                       "gelu_approximate")
# What a run writes into its out_dir; `overwrite` moves these aside, and nothing else in out_dir is
# touched.
RUN_FILES = ("checkpoints", "metrics.jsonl", "meta.json", TENSORBOARD_DIR, "loss.png", PROFILE_DIR)


@dataclasses.dataclass
class Dataset:
    """A prepared dataset: its folder, its vocabulary description (`tokenizer.read_meta`) and its
    splits."""
    directory: storage.Path
    meta: dict
    splits: dict[str, np.memmap | data.RemoteTokens]

    @classmethod
    def open(cls, config) -> "Dataset":
        directory = data.dataset_dir(config)
        meta = data.load_meta(directory)
        return cls(directory, meta, {split: data.open_split(directory, split, meta)
                                     for split in ("train", "val")})

    def check_same_on_every_host(self) -> None:
        """Every process must read the same tokens (batches are drawn from the file lengths):
        compare the hosts' fingerprints (`data.fingerprint`) and stop every process in one line if
        they differ."""
        prints = distributed.all_values("dataset", data.fingerprint(self.meta, self.splits))
        if len(set(prints)) > 1:
            groups = {}
            for process, fingerprint in enumerate(prints):
                groups.setdefault(fingerprint, []).append(str(process))
            seen = "; ".join(f"process(es) {', '.join(p)} see {f}" for f, p in groups.items())
            raise ValueError(f"the hosts read different datasets from {self.directory} ({seen}; a "
                             "fingerprint hashes meta.json, the lengths and samples of the "
                             "tokens): give every host the same copy, or prepare it once into a "
                             "bucket: --config.data_dir=gs://BUCKET/data/NAME")

    @property
    def tokenizer(self) -> str:
        return self.meta.get("tokenizer", "gpt2")

    @property
    def model_vocab_size(self) -> int:
        return tokenizer.model_vocab_size(self.meta)


class Batches:
    """The global batch [n, B, T] (x and y) of (split, seed, step) as sharded arrays. This process
    reads only the rows its devices hold (`sharding.process_rows`), and reads the next training
    batch in a background thread while the current step runs. A context manager (the thread ends on
    exit)."""

    def __init__(self, dataset: Dataset, train_step: TrainStep, seed: int, batch_size: int):
        self.dataset, self.sharding, self.seed = dataset, train_step.batch_sharding, seed
        self.B, self.T = batch_size, train_step.model_config.block_size
        self.rows = sharding.process_rows(self.sharding, (1, self.B, self.T), batch_axis=1)
        self._reader = concurrent.futures.ThreadPoolExecutor(1,
                                                             thread_name_prefix="flaxgpt-batches")
        self._next = None  # ((split, step, n), the future of its local rows)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._reader.shutdown(cancel_futures=True)

    def read(self, split: str, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of x and y: int32 [n, len(rows), T]."""
        B, T = self.B, self.T
        local_rows = (np.arange(n)[:, None] * B + self.rows[None]).ravel()
        x, y = data.get_batch(self.dataset.splits[split], seed=self.seed, step=step,
                              batch_size=n * B, block_size=T, split=split, rows=local_rows)
        return x.reshape(n, -1, T), y.reshape(n, -1, T)

    def __call__(self, split: str, step: int, n: int):
        key = (split, step, n)
        ready, self._next = self._next, None
        x, y = ready[1].result() if ready and ready[0] == key else self.read(*key)
        if split == "train":
            self._next = ((split, step + 1, n), self._reader.submit(self.read, split, step + 1, n))
        shape = (n, self.B, self.T)
        return (sharding.global_batch(x, self.rows, self.sharding, shape, batch_axis=1),
                sharding.global_batch(y, self.rows, self.sharding, shape, batch_axis=1))


class StopRequest:
    """SIGTERM (a preempted VM, a cluster's time limit) or Ctrl-C: save at the next step, then stop;
    a second Ctrl-C stops at once. Only the main thread may set signal handlers; elsewhere (a
    notebook's worker thread) orbax's preemption check remains.

    With several processes, SIGTERM is left to JAX's preemption service, which makes every process
    stop at the same step (orbax's `reached_preemption`): a Cloud TPU maintenance event or spot
    preemption signals every host. Ctrl-C there sends this process a SIGTERM, so the run stops the
    same way."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._together = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT,) if self._together else (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, _frame):
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._together:  # JAX's handler tells every process to stop at the same step
            os.kill(os.getpid(), signal.SIGTERM)
        if distributed.is_main_process():
            print(f"\n{self.signal_name}: saving a checkpoint after this step, then stopping"
                  + (" (Ctrl-C again stops at once, without saving)"
                     if signum == signal.SIGINT else ""),
                  flush=True)

    def reached(self, step: int, ckpts: checkpoint.Checkpoints) -> bool:
        """Whether to save and stop before `step`; every process must ask at every step."""
        if self._together:
            return ckpts.manager.reached_preemption(step)
        return self.signal_name is not None or ckpts.manager.reached_preemption(step)


def new_run_id() -> str:
    """A readable unique id, e.g. 20261122-093512-4f2a9c, the same on every process of the run."""
    return distributed.decided_by_main(
        "run id", lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-")
        + secrets.token_hex(3))


def claim_out_dir(out_dir: storage.Path, overwrite: bool) -> None:
    """Make sure a new run does not mix with another in out_dir: with another run's checkpoints
    there, stop with the choices, or (overwrite) move that run's files into out_dir/previous/<its
    id>/. Process 0 looks and moves; every process raises its error."""
    distributed.decided_by_main("out_dir claimed", lambda: _claim(out_dir, overwrite))


def _claim(out_dir: storage.Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is a file: "
                                 "choose a directory with --config.out_dir")
    steps = checkpoint.saved_steps(out_dir)
    if not steps:
        return
    owner = checkpoint.run_id_of(out_dir, steps[-1])
    if not overwrite:
        raise ValueError(
            f"{out_dir} holds the checkpoints of {f'run {owner}' if owner else 'an earlier run'} "
            f"(steps {', '.join(map(str, steps))}): continue it with --config.init_from=resume, "
            "choose another --config.out_dir, or set --config.overwrite=True to move that run's "
            "files aside (nothing is deleted)")
    aside = out_dir / "previous" / (owner or f"run-before-{datetime.date.today():%Y%m%d}")
    for n in range(1, 1000):
        if not aside.exists():
            break
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    aside.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (out_dir / name).exists():
            storage.move(out_dir / name, aside / name)
    print(f"overwrite: moved the files of the earlier run to {aside}", flush=True)


def _check_same_model(saved: GPTConfig, wanted: GPTConfig, where: storage.Path) -> None:
    diffs = [f"{k}={getattr(saved, k)} (config: {getattr(wanted, k)})"
             for k in MODEL_KEYS_TO_MATCH if getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        raise ValueError(f"the checkpoint in {where} has {', '.join(diffs)}: set the config to the "
                         "checkpoint's model, or pick another out_dir to start a new run")


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


def initial_state(config, mesh, wanted: GPTConfig, ckpts: checkpoint.Checkpoints):
    """The TrainStep and its first state for config.init_from, with what a resumed run recorded.

    -> (train_step, state, {"run_id", "best_val_loss", "model_source", ...}). The model's shape
    comes from the config, or from the pretrained model a run started from (then also when that run
    resumes). Process 0 decides which checkpoint a resumed run continues; every process restores
    that one.
    """
    optimizer = optim.make_optimizer(config)
    if config.init_from == "scratch":
        train_step = TrainStep(wanted, optimizer, mesh, seed=config.seed)
        return train_step, train_step.init(jax.random.key(config.seed)), {"run_id": new_run_id()}
    if config.init_from == "resume":
        saved_meta = distributed.decided_by_main("resume from",
                                                 lambda: ckpts.newest_readable(ckpts.read_meta))
        saved = checkpoint.model_config_from_meta(saved_meta)
        if saved_meta.get("model_source", "config") == "config":
            _check_same_model(saved, wanted, ckpts.directory.parent)
        else:
            wanted = saved.replace(dropout=config.dropout, attention=wanted.attention,
                                   dtype=wanted.dtype, scan_layers=wanted.scan_layers,
                                   remat=wanted.remat)
        train_step = TrainStep(wanted, optimizer, mesh, seed=config.seed)
        target = train_step.abstract_state
        # restore in the saved layer layout, then (un)stack
        if saved.scan_layers != wanted.scan_layers:
            target = TrainStep(wanted.replace(scan_layers=saved.scan_layers), optimizer,
                               mesh).abstract_state
        params, opt_state, saved_meta = ckpts.restore(target.params, target.opt_state,
                                                      run_id=saved_meta.get("run_id"),
                                                      newest=saved_meta["step"])
        if saved.scan_layers != wanted.scan_layers:
            params, opt_state = jax.jit(
                lambda *tree: convert_layers(tree, wanted.scan_layers),
                out_shardings=(train_step.state_sharding.params,
                               train_step.state_sharding.opt_state))(params, opt_state)
        # newer, so unreadable
        ckpts.set_aside([s for s in ckpts.steps() if s > saved_meta["step"]])
        step = jax.device_put(np.int32(saved_meta["step"]), target.step.sharding)
        return train_step, TrainState(step=step, params=params, opt_state=opt_state), saved_meta
    pretrained, params = load_pretrained_once(config.init_from, wanted.dtype, wanted.param_dtype)
    if config.block_size < pretrained.block_size:
        params, pretrained = crop_block_size(params, pretrained, config.block_size)
    pretrained = pretrained.replace(dropout=config.dropout, attention=wanted.attention,
                                    scan_layers=wanted.scan_layers, remat=wanted.remat)
    train_step = TrainStep(pretrained, optimizer, mesh, seed=config.seed)
    params = convert_layers(params, wanted.scan_layers)
    return train_step, train_step.state_from_params(params), {"run_id": new_run_id(),
                                                              "model_source": config.init_from}


def _check_vocabulary(dataset: Dataset, model: GPTConfig, init_from: str) -> None:
    """Tokens the model has no embedding for would train to NaN: say so before the first step."""
    if init_from in PRESETS and dataset.tokenizer != "gpt2":
        raise ValueError(f"{dataset.directory} holds {dataset.tokenizer} tokens, but {init_from} "
                         "reads GPT-2 BPE tokens: fine-tune on a GPT-2 BPE dataset "
                         "(e.g. python prepare.py shakespeare)")
    if dataset.meta["vocab_size"] > model.vocab_size:
        raise ValueError(f"{dataset.directory} holds {dataset.tokenizer} tokens (a vocabulary of "
                         f"{dataset.meta['vocab_size']:,}), more than the model's "
                         f"{model.vocab_size:,}: train this model on the dataset it was made for, "
                         "or start a new run in another out_dir")


def evaluate(train_step: TrainStep, params, batches: Batches, step: int,
             eval_iters: int) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split: {"train": ..., "val": ...}."""
    return {split: float(train_step.eval_fn(params, *batches(split, step, eval_iters)))
            for split in ("train", "val")}


def _non_finite(what: str, value, step: int, ckpts: checkpoint.Checkpoints) -> FloatingPointError:
    return FloatingPointError(f"the {what} is {value} at step {step}; nothing was saved over the "
                              f"checkpoints in {ckpts.directory} (the learning rate may be too "
                              "high: lower learning_rate, or raise warmup_iters, then resume)")


def _check_backend(config) -> None:
    if config.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention='cudnn' needs an NVIDIA GPU "
                         f"(this backend is {jax.default_backend()}): use attention='xla'")
    if config.attention == "splash" and jax.default_backend() != "tpu":
        raise ValueError("attention='splash' needs a TPU "
                         f"(this backend is {jax.default_backend()}): "
                         "use attention='auto' or 'xla'")


def compilation_cache_dir(config, out_dir: storage.Path) -> str | None:
    """config.compilation_cache_dir; on several hosts by default `<out_dir>/compilation_cache`: JAX
    writes compiled programs from process 0 only, so a cache on each host's own disk would serve
    only host 0."""
    if config.compilation_cache_dir is None and jax.process_count() > 1:
        return os.fspath(out_dir / "compilation_cache")
    return config.compilation_cache_dir


def train(config) -> dict:
    """Train (or evaluate) as the config says; returns the last losses {"train", "val", "step"}."""
    validate(config)
    out_dir = storage.path(config.out_dir)
    storage.check_reachable(out_dir, "out_dir")
    distributed.use_cpu_without_accelerators()
    distributed.initialize(config.distributed.coordinator_address, config.distributed.num_processes,
                           config.distributed.process_id)
    with faults.quiet_library_reports(), distributed.stop_together():
        xla_options.use_compilation_cache(compilation_cache_dir(config, out_dir))
        distributed.check_shared_directory(out_dir, "out_dir")
        dataset = Dataset.open(config)
        dataset.check_same_on_every_host()
        if dataset.meta.get("assumed") and distributed.is_main_process():
            print(f"{dataset.directory} has no meta.json or meta.pkl: assuming GPT-2 BPE tokens "
                  "(uint16), as nanoGPT's openwebtext and shakespeare folders hold", flush=True)
        _check_backend(config)
        # this process's malloc keeps what a step frees for the next step
        if jax.default_backend() == "cpu":
            host_memory.keep_freed_memory()
        mesh = sharding.make_mesh(config.mesh)
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        if config.batch_size % data_parallel:
            batch, accumulation = sharding.divisible_batch(config.batch_size,
                                                           config.gradient_accumulation_steps,
                                                           data_parallel)
            raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                             f"{data_parallel} data-parallel devices (mesh data x fsdp): e.g. "
                             f"--config.batch_size={batch} "
                             f"--config.gradient_accumulation_steps={accumulation}")
        resuming = config.init_from == "resume"
        if not resuming and not config.eval_only:
            claim_out_dir(out_dir, config.overwrite)
        with contextlib.ExitStack() as stack:
            ckpts = stack.enter_context(checkpoint.Checkpoints(
                out_dir, max_to_keep=config.max_to_keep, async_save=config.async_checkpointing,
                create=False))
            train_step, state, start = initial_state(config, mesh,
                                                     model_config(config, dataset.model_vocab_size),
                                                     ckpts)
            _check_vocabulary(dataset, train_step.model_config, config.init_from)
            out_dir.mkdir(parents=True, exist_ok=True)
            start.setdefault("run_id", new_run_id())  # a checkpoint from before run ids
            log = stack.enter_context(MetricsLog(config, out_dir, start["run_id"],
                                                 start_step=int(state.step),
                                                 resumed_at=int(state.step) if resuming else None))
            stop = stack.enter_context(StopRequest())
            profiler = StepProfiler(config.profile_steps, out_dir, log.print)
            stack.callback(profiler.stop)
            if distributed.is_main_process():  # the tokenizer, for sample.py
                storage.write_atomically(out_dir / "meta.json", json.dumps(
                    {k: v for k, v in dataset.meta.items() if k != "assumed"}))
            batches = stack.enter_context(Batches(dataset, train_step, config.seed,
                                                  config.batch_size))
            losses = _train_until_done(config, train_step, state, start, batches, ckpts, log, stop,
                                       profiler)
        _plot(out_dir)
    return losses


def _plot(out_dir: storage.Path) -> None:
    """out_dir/loss.png of the run, when matplotlib is installed (the `plot` extra)."""
    if not distributed.is_main_process():
        return
    try:
        from flaxgpt.plot import plot_runs
        plot_runs([out_dir], out_dir / "loss.png")
    except ImportError:
        pass


def _train_until_done(config, train_step: TrainStep, state: TrainState, start: dict,
                      batches: Batches, ckpts: checkpoint.Checkpoints, log: MetricsLog,
                      stop: StopRequest, profiler: StepProfiler) -> dict:
    """Evaluate, save and step until the run is over; -> the last losses {"train", "val",
    "step"}."""
    model = train_step.model_config
    run_id, best_val_loss = start["run_id"], start.get("best_val_loss", math.inf)
    n_params = count_params(state.params)
    step = int(state.step)
    # evaluated and saved by the earlier run
    resumed_at = step if config.init_from == "resume" else None
    if resumed_at is None:
        log.print(f"run {run_id}: {n_params / 1e6:.2f}M parameters "
                  f"on mesh {dict(train_step.mesh.shape)}")
    else:
        log.print(f"resuming run {run_id} at step {step} ({ckpts.directory / str(step)}): "
                  f"{n_params / 1e6:.2f}M parameters on mesh {dict(train_step.mesh.shape)}")
        if step >= config.max_iters and not config.eval_only:
            log.print(f"run {run_id} is finished: it reached max_iters={config.max_iters}; raise "
                      "--config.max_iters (and lr_decay_iters) to train it further")
            return {"step": step}

    def save(step: int, **extra) -> None:
        # the step we resumed from, or a broken directory we never overwrite
        if step in ckpts.steps():
            return
        ckpts.save(step, state.params, state.opt_state, {
            "step": step, "run_id": run_id, "best_val_loss": best_val_loss,
            "model": model.to_dict(), "model_source": start.get("model_source", "config"),
            "config": config.to_dict(), **extra})

    A, B, T = config.gradient_accumulation_steps, config.batch_size, model.block_size
    schedule = optim.learning_rate_schedule(config)
    flops = flops_per_token(model, n_params, T)
    peak = mfu.device_peak_flops()
    losses = {}
    t_last, steps_since, compiled = time.perf_counter(), 0, False
    while True:
        eval_due = step % config.eval_interval == 0 or step == config.max_iters
        if config.eval_only or (eval_due and step != resumed_at):
            losses = evaluate(train_step, state.params, batches, step, config.eval_iters)
            log.print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}")
            log.write(step, **{"train/loss": losses["train"], "val/loss": losses["val"],
                               "tokens": step * A * B * T})
            if not all(map(math.isfinite, losses.values())):
                raise _non_finite("loss", losses, step, ckpts)
            if losses["val"] < best_val_loss or config.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if step > 0 and not config.eval_only:
                    save(step, val_loss=losses["val"])
            t_last, steps_since = time.perf_counter(), 0  # don't count eval time in ms/step
        if config.eval_only or step >= config.max_iters:
            break
        if stop.reached(step, ckpts):
            log.print(f"stopping at step {step} ({stop.signal_name or 'SIGTERM: preempted'}): "
                      "saving a checkpoint")
            save(step)
            break
        ckpts.check_for_errors()
        profiler.before_step(step)
        state, metrics = train_step.train_fn(state, *batches("train", step, A))
        step += 1
        steps_since += 1
        profiler.after_step(step, metrics)
        log.step_done(step)
        # the first step compiles: its time is reported apart, not as a step time
        first = not compiled
        if first or step % config.log_interval == 0:
            loss = float(metrics["loss"])  # waits for the step
            lr = float(schedule(step - 1))
            if not math.isfinite(loss):
                raise _non_finite("training loss", loss, step, ckpts)
            now = time.perf_counter()
            dt = (now - t_last) / steps_since
            t_last, steps_since, compiled = now, 0, True
            row = dict(loss=loss, lr=lr, grad_norm=float(metrics["grad_norm"]),
                       tokens=step * A * B * T)
            log.step_done(step, loss)
            if first:
                log.print(f"iter {step}: loss {loss:.4f}, lr {lr:.2e}, "
                          f"compiled and ran in {dt:.1f} s")
                log.write(step, **row, compile_s=dt)
                continue
            tokens_per_s, utilisation = mfu.throughput(A * B * T, dt, flops, jax.device_count(),
                                                       peak)
            log.print_step(f"iter {step}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms,"
                           f" {tokens_per_s:,.0f} tok/s{mfu.shown(utilisation)}", step)
            log.write(step, **row, ms_per_step=dt * 1000, tokens_per_s=tokens_per_s,
                      **({} if utilisation is None else {"mfu": utilisation}))
    ckpts.wait()
    saved = ckpts.steps()
    if saved and not config.eval_only:
        log.print(f"run {run_id}: newest checkpoint {ckpts.directory / str(saved[-1])}; "
                  "sample from it with "
                  f"python sample.py --out_dir={config.out_dir}")
    return {**losses, "step": step}
