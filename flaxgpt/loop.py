"""The training loop: nanoGPT's train.py as one function of a config (see flaxgpt/config.py).

`train(config)` reads top to bottom: the config and the processes, the mesh, the data, the first
state (fresh, resumed or pretrained: run.py), then the loop: evaluate, save, step, log, until
max_iters, a stop request (preemption.py: SIGTERM, Ctrl-C, a Cloud TPU preemption) or a non-finite
loss. On a pod every host runs it with the same config; distributed.py keeps their decisions alike
and stops them together.
"""

import contextlib
import json
import math
import os
import time

import jax

from flaxgpt import (checkpoint, data, distributed, faults, host_memory, mfu, optim, run, storage,
                     tokenizer, xla_options)
from flaxgpt.config import model_config, validate
from flaxgpt.metrics import MetricsLog
from flaxgpt.model import count_params
from flaxgpt.preemption import StopRequest
from flaxgpt.profiling import StepProfiler
from flaxgpt.train_step import TrainState, TrainStep
from flaxgpt.watchdog import Watchdog, coordination_heartbeat_s


def train(config) -> dict:
    """Train (or evaluate) as the config says; returns the last losses {"train", "val", "step"}."""
    validate(config)
    out_dir = storage.path(config.out_dir)
    storage.check_reachable(out_dir, "out_dir")
    distributed.use_cpu_without_accelerators()
    distributed.initialize(config.distributed.coordinator_address, config.distributed.num_processes,
                           config.distributed.process_id,
                           heartbeat_timeout_s=coordination_heartbeat_s(config.stall_timeout_s))
    with (faults.quiet_library_reports(), Watchdog(config.stall_timeout_s, out_dir) as watchdog,
          contextlib.ExitStack() as stack):
        xla_options.use_compilation_cache(compilation_cache_dir(config, out_dir))
        distributed.check_shared_directory(out_dir, "out_dir")
        run.check_backend(config.attention)
        if jax.default_backend() == "cpu":  # malloc keeps what a step frees for the next step
            host_memory.keep_freed_memory()
        mesh = run.make_mesh(config)

        dataset = data.Dataset.open(config)
        dataset.check_same_on_every_host()
        if dataset.meta.get("assumed") and distributed.is_main_process():
            print(f"{dataset.directory} has no meta.json or meta.pkl: assuming GPT-2 BPE tokens "
                  "(uint16), as nanoGPT's openwebtext and shakespeare folders hold", flush=True)

        if config.init_from != "resume" and not config.eval_only:
            run.claim_out_dir(out_dir, config.overwrite)
        ckpts = stack.enter_context(checkpoint.Checkpoints(
            out_dir, max_to_keep=config.max_to_keep, async_save=config.async_checkpointing,
            create=False))
        wanted = model_config(config, tokenizer.model_vocab_size(dataset.meta))
        train_step, state, start = run.initial_state(config, mesh, wanted, ckpts)
        run.check_vocabulary(dataset.meta, dataset.directory, train_step.model_config,
                             config.init_from)
        out_dir.mkdir(parents=True, exist_ok=True)
        start.setdefault("run_id", run.new_run_id())  # a checkpoint from before run ids
        resumed_at = int(state.step) if config.init_from == "resume" else None
        log = stack.enter_context(MetricsLog(config, out_dir, start["run_id"],
                                             start_step=int(state.step), resumed_at=resumed_at))
        if distributed.is_main_process():  # the tokenizer, for sample.py
            storage.write_atomically(out_dir / "meta.json", json.dumps(
                {k: v for k, v in dataset.meta.items() if k != "assumed"}))
        loop = Loop(config, train_step, start, ckpts, log, watchdog,
                    batches=stack.enter_context(data.Batches(
                        dataset, train_step.batch_sharding, config.seed, config.batch_size,
                        train_step.model_config.block_size)),
                    stop=stack.enter_context(StopRequest()),
                    profiler=stack.enter_context(StepProfiler(config.profile_steps, out_dir,
                                                              log.print)))
        losses = loop.run(state, resumed_at)
    _plot(out_dir)
    return losses


def compilation_cache_dir(config, out_dir: storage.Path) -> str | None:
    """config.compilation_cache_dir; on several hosts by default `<out_dir>/compilation_cache`: JAX
    writes compiled programs from process 0 only, so a cache on each host's own disk would serve
    only host 0."""
    if config.compilation_cache_dir is None and jax.process_count() > 1:
        return os.fspath(out_dir / "compilation_cache")
    return config.compilation_cache_dir


def _plot(out_dir: storage.Path) -> None:
    """out_dir/loss.png of the run, when matplotlib is installed (the `plot` extra)."""
    if not distributed.is_main_process():
        return
    try:
        from flaxgpt.plot import plot_runs
        plot_runs([out_dir], out_dir / "loss.png")
    except ImportError:
        pass


class Loop:
    """Evaluate, save, step and log, from a first state until the run is over."""

    def __init__(self, config, train_step: TrainStep, start: dict, ckpts: checkpoint.Checkpoints,
                 log: MetricsLog, watchdog: Watchdog, batches: data.Batches, stop: StopRequest,
                 profiler: StepProfiler):
        self.config, self.train_step, self.ckpts, self.log = config, train_step, ckpts, log
        self.watchdog = watchdog
        self.batches, self.stop, self.profiler = batches, stop, profiler
        self.run_id, self.model_source = start["run_id"], start.get("model_source", "config")
        self.best_val_loss = start.get("best_val_loss", math.inf)
        self.tokens_per_step = (config.gradient_accumulation_steps * config.batch_size
                                * train_step.model_config.block_size)

    def run(self, state: TrainState, resumed_at: int | None) -> dict:
        """-> the last losses {"train", "val", "step"}; resumed_at: the step a resumed run was
        evaluated and saved at by its earlier attempt (None for a new run)."""
        config, log = self.config, self.log
        step, losses = int(state.step), {}
        if not self._announce(state, resumed_at):
            return {"step": step}
        A, T = config.gradient_accumulation_steps, self.train_step.model_config.block_size
        tokens_per_step = self.tokens_per_step
        schedule = optim.learning_rate_schedule(config)
        flops = mfu.flops_per_token(self.train_step.model_config, count_params(state.params), T)
        peak = mfu.device_peak_flops()
        t_last, steps_since, compiled = time.perf_counter(), 0, False
        self.watchdog.progress(f"the start at step {step}")
        while True:
            eval_due = step % config.eval_interval == 0 or step == config.max_iters
            if config.eval_only or (eval_due and step != resumed_at):
                losses = self.evaluate(state, step)
                t_last, steps_since = time.perf_counter(), 0  # eval time is not step time
            if config.eval_only or step >= config.max_iters:
                break
            if self.stop.reached(step, self.ckpts.manager):
                why = self.stop.signal_name or "SIGTERM: preempted"
                log.print(f"stopping at step {step} ({why}): saving a checkpoint")
                self.save(state, step)
                break
            self.ckpts.check_for_errors()
            self.profiler.before_step(step)
            x, y = self.batches("train", step, A)
            self.batches.prefetch("train", step + 1, A)
            with self.watchdog.first_call("train step"):  # compiles; its first run connects hosts
                state, metrics = self.train_step.train_fn(state, x, y)
                if not compiled:
                    jax.block_until_ready(metrics)
            step, steps_since = step + 1, steps_since + 1
            self.watchdog.progress(f"step {step}")  # dispatched: jax runs few steps ahead
            self.profiler.after_step(step, metrics)
            log.step_done(step)
            if compiled and step % config.log_interval:
                continue
            loss = float(metrics["loss"])  # waits for the step
            if not math.isfinite(loss):
                raise self._non_finite("training loss", loss, step)
            now = time.perf_counter()
            dt = (now - t_last) / steps_since
            t_last, steps_since = now, 0
            row = dict(loss=loss, lr=float(schedule(step - 1)),
                       grad_norm=float(metrics["grad_norm"]), tokens=step * tokens_per_step)
            log.step_done(step, loss)
            if not compiled:  # the first step compiles: its time is not a step time
                compiled = True
                log.print(f"iter {step}: loss {loss:.4f}, lr {row['lr']:.2e}, "
                          f"compiled and ran in {dt:.1f} s")
                log.write(step, **row, compile_s=dt)
                continue
            tokens_per_s, utilisation = mfu.throughput(tokens_per_step, dt, flops,
                                                       jax.device_count(), peak)
            log.print_step(f"iter {step}: loss {loss:.4f}, lr {row['lr']:.2e}, {dt * 1000:.1f} ms,"
                           f" {tokens_per_s:,.0f} tok/s{mfu.shown(utilisation)}", step)
            log.write(step, **row, ms_per_step=dt * 1000, tokens_per_s=tokens_per_s,
                      **({} if utilisation is None else {"mfu": utilisation}))
        self.ckpts.wait()
        saved = self.ckpts.steps()
        if saved and not config.eval_only:
            newest = self.ckpts.directory / str(saved[-1])
            log.print(f"run {self.run_id}: newest checkpoint {newest}; sample from it with "
                      f"python sample.py --out_dir={config.out_dir}")
        return {**losses, "step": step}

    def _announce(self, state: TrainState, resumed_at: int | None) -> bool:
        """Print what the run is; False if a resumed run has nothing left to do."""
        step, mesh = int(state.step), dict(self.train_step.mesh.shape)
        size = f"{count_params(state.params) / 1e6:.2f}M parameters on mesh {mesh}"
        if resumed_at is None:
            self.log.print(f"run {self.run_id}: {size}")
            return True
        self.log.print(f"resuming run {self.run_id} at step {step} "
                       f"({self.ckpts.directory / str(step)}): {size}")
        if step >= self.config.max_iters and not self.config.eval_only:
            self.log.print(f"run {self.run_id} is finished: it reached max_iters="
                           f"{self.config.max_iters}; raise --config.max_iters (and "
                           "lr_decay_iters) to train it further")
            return False
        return True

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, logged; saves a checkpoint when the val
        loss improved (or always_save_checkpoint)."""
        config = self.config
        with self.watchdog.first_call("evaluation"):
            losses = {split: float(self.train_step.eval_fn(
                state.params, *self.batches(split, step, config.eval_iters)))
                for split in ("train", "val")}
        self.watchdog.progress(f"the evaluation at step {step}")
        self.log.print(f"step {step}: train loss {losses['train']:.4f}, "
                       f"val loss {losses['val']:.4f}")
        self.log.write(step, **{"train/loss": losses["train"], "val/loss": losses["val"],
                                "tokens": step * self.tokens_per_step})
        if not all(map(math.isfinite, losses.values())):
            raise self._non_finite("loss", losses, step)
        if losses["val"] < self.best_val_loss or config.always_save_checkpoint:
            self.best_val_loss = min(self.best_val_loss, losses["val"])
            if step > 0 and not config.eval_only:
                self.save(state, step, val_loss=losses["val"])
        return losses

    def save(self, state: TrainState, step: int, **extra) -> None:
        """Save `step` unless it is there already (the step a run resumed from, or a broken folder
        that is never overwritten). Process 0's listing decides for all: every process enters the
        save, or none."""
        if distributed.decided_by_main(f"save {step}", lambda: step in self.ckpts.steps()):
            return
        with self.watchdog.first_call("checkpoint"):
            self.ckpts.save(step, state.params, state.opt_state, {
                "step": step, "run_id": self.run_id, "best_val_loss": self.best_val_loss,
                "model": self.train_step.model_config.to_dict(),
                "model_source": self.model_source, "config": self.config.to_dict(), **extra})
        self.watchdog.progress(f"checkpoint {step}")
        self.log.upload()

    def _non_finite(self, what: str, value, step: int) -> FloatingPointError:
        return FloatingPointError(f"the {what} is {value} at step {step}; nothing was saved over "
                                  f"the checkpoints in {self.ckpts.directory} (the learning rate "
                                  "may be too high: lower learning_rate, or raise warmup_iters, "
                                  "then resume)")
