"""The training loop: nanoGPT's train.py as one function of a config (see flaxgpt/config.py).

`train(config)` reads top to bottom: the processes, the mesh, the data, the first state (fresh,
resumed or pretrained: run.py), then the loop: evaluate (and save when the val loss improved),
stop and save on request (preemption.py), step, log, until max_iters or a non-finite loss. On a pod
every host runs it with the same config; distributed.py keeps their decisions alike.
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
        cache_dir = config.compilation_cache_dir
        if cache_dir is None and jax.process_count() > 1:  # JAX writes it from process 0 only
            cache_dir = os.fspath(out_dir / "compilation_cache")
        xla_options.use_compilation_cache(cache_dir)
        distributed.check_shared_directory(out_dir, "out_dir")
        run.check_backend(config.attention)
        if jax.default_backend() == "cpu":  # malloc keeps what a step frees for the next step
            host_memory.keep_freed_memory()
        mesh = run.make_mesh(config)

        dataset = data.Dataset.open(config)  # says when it assumes GPT-2 tokens
        dataset.check_same_on_every_host()

        if config.init_from != "resume" and not config.eval_only:
            run.claim_out_dir(out_dir, config.overwrite)
        ckpts = stack.enter_context(checkpoint.Checkpoints(
            out_dir, max_to_keep=config.max_to_keep, async_save=config.async_checkpointing,
            create=False))
        wanted = model_config(config, tokenizer.model_vocab_size(dataset.meta))
        train_step, state, start = run.initial_state(config, mesh, wanted, ckpts)
        model = train_step.model_config
        run.check_vocabulary(dataset.meta, dataset.directory, model, config.init_from)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_id, model_source = start["run_id"], start.get("model_source", "config")
        step = int(state.step)
        resumed_at = step if config.init_from == "resume" else None
        log = stack.enter_context(MetricsLog(config, out_dir, run_id, start_step=step,
                                             resumed_at=resumed_at))
        if distributed.is_main_process():  # the tokenizer, for sample.py
            storage.write_atomically(out_dir / "meta.json", json.dumps(dataset.meta))
        batches = stack.enter_context(data.Batches(
            dataset, train_step.batch_sharding, config.seed, config.batch_size, model.block_size))
        stop = stack.enter_context(StopRequest())
        profiler = stack.enter_context(StepProfiler(config.profile_steps, out_dir, log.print))

        n_params = count_params(state.params)
        size = f"{n_params / 1e6:.2f}M parameters on mesh {dict(mesh.shape)}"
        if resumed_at is None:
            log.print(f"run {run_id}: {size}")
        else:
            log.print(f"resuming run {run_id} at step {step} ({ckpts.directory / str(step)}): "
                      f"{size}")
            if step >= config.max_iters and not config.eval_only:
                log.print(f"run {run_id} is finished: it reached max_iters={config.max_iters}; "
                          "raise --config.max_iters (and lr_decay_iters) to train it further")
                return {"step": step}

        def non_finite(what: str, value, step: int) -> FloatingPointError:
            return FloatingPointError(
                f"the {what} is {value} at step {step}; nothing was saved over the checkpoints "
                f"in {ckpts.directory} (the learning rate may be too high: lower learning_rate, "
                "or raise warmup_iters, then resume)")

        def save(state, step: int, **extra) -> None:
            """Save `step` unless it is there already (the step a run resumed from, or a broken
            folder that is never overwritten); process 0's listing decides for all."""
            if distributed.decided_by_main(f"save {step}", lambda: step in ckpts.steps()):
                return
            with watchdog.first_call("checkpoint"):
                ckpts.save(step, state.params, state.opt_state, {
                    "step": step, "run_id": run_id, "best_val_loss": best_val_loss,
                    "model": model.to_dict(), "model_source": model_source,
                    "config": config.to_dict(), **extra})
            watchdog.progress(f"checkpoint {step}")
            log.upload()

        A = config.gradient_accumulation_steps
        tokens_per_step = A * config.batch_size * model.block_size
        best_val_loss, losses = start.get("best_val_loss", math.inf), {}
        schedule = optim.learning_rate_schedule(config)
        flops = mfu.flops_per_token(model, n_params, model.block_size)
        peak = mfu.device_peak_flops()
        t_last, steps_since, compiled = time.perf_counter(), 0, False
        watchdog.progress(f"the start at step {step}")
        while True:
            eval_due = step % config.eval_interval == 0 or step == config.max_iters
            if config.eval_only or (eval_due and step != resumed_at):  # mean loss of each split
                with watchdog.first_call("evaluation"):
                    losses = {split: float(train_step.eval_fn(
                        state.params, *batches(split, step, config.eval_iters)))
                        for split in ("train", "val")}
                watchdog.progress(f"the evaluation at step {step}")
                log.print(f"step {step}: train loss {losses['train']:.4f}, "
                          f"val loss {losses['val']:.4f}")
                log.write(step, **{"train/loss": losses["train"], "val/loss": losses["val"],
                                   "tokens": step * tokens_per_step})
                if not all(map(math.isfinite, losses.values())):
                    raise non_finite("loss", losses, step)
                if losses["val"] < best_val_loss or config.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if step > 0 and not config.eval_only:
                        save(state, step, val_loss=losses["val"])
                t_last, steps_since = time.perf_counter(), 0  # eval time is not step time
            if config.eval_only or step >= config.max_iters:
                break
            if stop.reached(step, ckpts.manager):
                log.print(f"stopping at step {step} ({stop.signal_name or 'SIGTERM: preempted'})"
                          ": saving a checkpoint")
                save(state, step)
                break
            ckpts.check_for_errors()
            profiler.before_step(step)
            x, y = batches("train", step, A)
            batches.prefetch("train", step + 1, A)
            with watchdog.first_call("train step"):  # compiles; its first run connects hosts
                state, metrics = train_step.train_fn(state, x, y)
                if not compiled:
                    jax.block_until_ready(metrics)
            step, steps_since = step + 1, steps_since + 1
            watchdog.progress(f"step {step}")  # dispatched: jax runs few steps ahead
            profiler.after_step(step, metrics)
            if compiled and step % config.log_interval:
                log.step_done(step)
                continue
            loss = float(metrics["loss"])  # waits for the step
            if not math.isfinite(loss):
                raise non_finite("training loss", loss, step)
            now = time.perf_counter()
            dt, t_last, steps_since = (now - t_last) / steps_since, now, 0
            row = dict(loss=loss, lr=float(schedule(step - 1)),
                       grad_norm=float(metrics["grad_norm"]), tokens=step * tokens_per_step)
            log.step_done(step, loss)
            line = f"iter {step}: loss {loss:.4f}, lr {row['lr']:.2e}, "
            if not compiled:  # the first step compiles: its time is not a step time
                compiled = True
                log.print(f"{line}compiled and ran in {dt:.1f} s")
                log.write(step, **row, compile_s=dt)
                continue
            tokens_per_s, utilisation = mfu.throughput(tokens_per_step, dt, flops,
                                                       jax.device_count(), peak)
            log.print_step(f"{line}{dt * 1000:.1f} ms, {tokens_per_s:,.0f} tok/s"
                           f"{mfu.shown(utilisation)}", step)
            log.write(step, **row, ms_per_step=dt * 1000, tokens_per_s=tokens_per_s,
                      mfu=utilisation)
        ckpts.wait()
        saved = ckpts.steps()
        if saved and not config.eval_only:
            log.print(f"run {run_id}: newest checkpoint {ckpts.directory / str(saved[-1])}; "
                      f"sample from it with python sample.py --out_dir={config.out_dir}")
        return {**losses, "step": step}
