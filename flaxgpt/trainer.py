"""The training loop: nanoGPT's train.py as one function of a config (see flaxgpt/config.py)."""

import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from flaxgpt import checkpoint, data, distributed, mfu, optim, sharding
from flaxgpt.model import PRESETS, GPTConfig, convert_layers, count_params, crop_block_size, flops_per_token
from flaxgpt.train_step import Trainer

PADDED_GPT2_VOCAB = 50304  # 50257 rounded up to a multiple of 64
MODEL_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def resolve_dtype(name: str) -> str:
    """"auto": bfloat16 compute on accelerators, float32 on CPU (where bfloat16 is slower)."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_config(config, vocab_size: int) -> GPTConfig:
    return GPTConfig(block_size=config.block_size, vocab_size=vocab_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias,
                     gelu_approximate=config.gelu_approximate, dtype=resolve_dtype(config.dtype),
                     param_dtype=config.param_dtype, attention=config.attention, scan_layers=config.scan_layers,
                     remat=config.remat)


def _check_same_shape(saved: GPTConfig, wanted: GPTConfig, where: Path) -> None:
    diffs = [f"{k}={getattr(saved, k)} (config: {getattr(wanted, k)})"
             for k in MODEL_SHAPE_KEYS if getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        raise ValueError(f"the checkpoint in {where} has {', '.join(diffs)}: set the config to the "
                         "checkpoint's model, or pick another out_dir to start a new run")


class MetricsLog:
    """Printed lines and a JSON-lines file in out_dir (and wandb), from process 0 only."""

    def __init__(self, config, out_dir: Path):
        self.active = distributed.is_main_process()
        self.file = open(out_dir / "metrics.jsonl", "a") if self.active else None
        self.wandb = None
        if self.active and config.wandb_log:
            import wandb
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                                    config=config.to_dict())

    def print(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def write(self, step: int, **metrics) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _initial_state(config, mesh, wanted: GPTConfig, ckpts: checkpoint.Checkpoints):
    """The Trainer and its first state for config.init_from, with what a resumed run recorded.

    -> (trainer, state, {"best_val_loss", "model_source"}). The model's shape comes from the config,
    or from the pretrained model a run started from (then also when that run resumes).
    """
    optimizer = optim.make_optimizer(config)
    if config.init_from == "scratch":
        trainer = Trainer(wanted, optimizer, mesh, seed=config.seed)
        return trainer, trainer.init(jax.random.key(config.seed)), {}
    if config.init_from == "resume":
        saved_meta = ckpts.newest_readable(ckpts.read_meta)
        saved = checkpoint.model_config_from_meta(saved_meta)
        if saved_meta.get("model_source", "config") == "config":
            _check_same_shape(saved, wanted, ckpts.directory.parent)
        else:
            wanted = saved.replace(dropout=config.dropout, attention=wanted.attention, dtype=wanted.dtype,
                                   scan_layers=wanted.scan_layers, remat=wanted.remat)
        trainer = Trainer(wanted, optimizer, mesh, seed=config.seed)
        target = trainer.abstract_state
        if saved.scan_layers == wanted.scan_layers:
            params, opt_state, saved_meta = ckpts.restore(target.params, target.opt_state)
        else:  # restore in the saved layer layout, then stack (or unstack) params and Adam moments
            as_saved = Trainer(wanted.replace(scan_layers=saved.scan_layers), optimizer, mesh).abstract_state
            params, opt_state, saved_meta = ckpts.restore(as_saved.params, as_saved.opt_state)
            params, opt_state = jax.jit(
                lambda *tree: convert_layers(tree, wanted.scan_layers),
                out_shardings=(trainer.state_sharding.params, trainer.state_sharding.opt_state))(params, opt_state)
        ckpts.set_aside([s for s in ckpts.steps() if s > saved_meta["step"]])  # newer, so unreadable
        step = jax.device_put(np.int32(saved_meta["step"]), target.step.sharding)
        return trainer, type(target)(step=step, params=params, opt_state=opt_state), saved_meta
    from flaxgpt.pretrained import load_pretrained
    pretrained, params = load_pretrained(config.init_from, dtype=wanted.dtype, param_dtype=wanted.param_dtype)
    if config.block_size < pretrained.block_size:
        params, pretrained = crop_block_size(params, pretrained, config.block_size)
    if wanted.vocab_size != PADDED_GPT2_VOCAB and wanted.vocab_size > pretrained.vocab_size:
        raise ValueError(f"the dataset's vocabulary ({wanted.vocab_size}) is larger than {config.init_from}'s")
    pretrained = pretrained.replace(dropout=config.dropout, attention=wanted.attention,
                                    scan_layers=wanted.scan_layers, remat=wanted.remat)
    params = convert_layers(params, wanted.scan_layers)
    trainer = Trainer(pretrained, optimizer, mesh, seed=config.seed)
    return trainer, trainer.state_from_params(params), {"model_source": config.init_from}


def train(config) -> dict:
    """Train (or evaluate) as the config says; returns the last losses {"train", "val", "step"}."""
    distributed.initialize(config.distributed.coordinator_address, config.distributed.num_processes,
                           config.distributed.process_id)
    out_dir = Path(config.out_dir)
    data_dir = Path(config.data_dir or Path("data") / config.dataset)
    meta = data.load_meta(data_dir)
    tokenizer = meta.get("tokenizer", "gpt2")  # nanoGPT-style folders without meta.json hold GPT-2 tokens
    if config.init_from in PRESETS and tokenizer != "gpt2":
        raise ValueError(f"{data_dir} holds {tokenizer} tokens, but {config.init_from} reads GPT-2 BPE "
                         "tokens: fine-tune on a GPT-2 BPE dataset (e.g. python prepare.py shakespeare)")
    splits = {split: data.open_split(data_dir, split) for split in ("train", "val")}
    vocab_size = meta["vocab_size"] if tokenizer != "gpt2" else PADDED_GPT2_VOCAB

    if config.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this backend is {jax.default_backend()}): "
                         "use attention='xla'")
    if config.attention == "splash" and jax.default_backend() != "tpu":
        raise ValueError(f"attention='splash' needs a TPU (this backend is {jax.default_backend()}): "
                         "use attention='auto' or 'xla'")
    mesh = sharding.make_mesh(config.mesh)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % data_parallel:
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {data_parallel} "
                         "data-parallel devices (mesh data x fsdp)")
    ckpts = checkpoint.Checkpoints(out_dir, max_to_keep=config.max_to_keep,
                                   async_save=config.async_checkpointing, create=config.init_from != "resume")
    trainer, state, start = _initial_state(config, mesh, model_config(config, vocab_size), ckpts)
    model, best_val_loss = trainer.model_config, start.get("best_val_loss", math.inf)
    model_source = start.get("model_source", "config")

    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(config, out_dir)
    if distributed.is_main_process():
        (out_dir / "meta.json").write_text(json.dumps(meta))  # the tokenizer, for sample.py
    n_params = count_params(state.params)
    log.print(f"number of parameters: {n_params / 1e6:.2f}M on mesh {dict(mesh.shape)}")

    A, B, T = config.gradient_accumulation_steps, config.batch_size, model.block_size
    rows = sharding.process_rows(trainer.batch_sharding, (A, B, T), batch_axis=1)

    def batch(split: str, step: int, n: int):
        """The global batch [n, B, T] of (seed, step); this process reads only its rows."""
        local_rows = (np.arange(n)[:, None] * B + np.arange(B)[rows][None]).ravel()
        x, y = data.get_batch(splits[split], seed=config.seed, step=step, batch_size=n * B,
                              block_size=T, split=split, rows=local_rows)
        shape = (n, B, T)
        return (sharding.global_batch(x.reshape(n, -1, T), trainer.batch_sharding, shape),
                sharding.global_batch(y.reshape(n, -1, T), trainer.batch_sharding, shape))

    schedule = optim.learning_rate_schedule(config)
    flops = flops_per_token(model, n_params, T)
    peak = mfu.device_peak_flops()
    stop_requested = []
    # SIGTERM (a preempted VM, a cluster's time limit): save at the next step and stop. Only the main
    # thread may set signal handlers; elsewhere (a notebook's worker thread) orbax's preemption check remains.
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))

    def save(step: int, **extra) -> None:
        if step in ckpts.steps():  # the step we resumed from, or a broken directory we never overwrite
            return
        ckpts.save(step, state.params, state.opt_state, {
            "step": step, "best_val_loss": best_val_loss, "model": model.to_dict(), "model_source": model_source,
            "config": config.to_dict(), **extra})

    step = int(state.step)
    resumed_at = step if config.init_from == "resume" else None  # evaluated and saved by the earlier run
    losses = {}
    t_last, steps_since = time.perf_counter(), 0
    try:
        while True:
            eval_due = step % config.eval_interval == 0 or step == config.max_iters
            if config.eval_only or (eval_due and step != resumed_at):
                losses = {s: float(trainer.eval_step(state.params, *batch(s, step, config.eval_iters)))
                          for s in ("train", "val")}
                log.print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log.write(step, **{"train/loss": losses["train"], "val/loss": losses["val"]})
                if not all(map(math.isfinite, losses.values())):
                    raise FloatingPointError(f"the loss is {losses} at step {step}; nothing was saved over "
                                             f"the checkpoints in {ckpts.directory} (lower learning_rate?)")
                if losses["val"] < best_val_loss or config.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if step > 0 and not config.eval_only:
                        save(step, val_loss=losses["val"])
                t_last, steps_since = time.perf_counter(), 0  # don't count eval time in ms/step
            if config.eval_only or step >= config.max_iters:
                break
            # one process alone must not stop (its peers would wait); orbax syncs preemption across hosts
            if (stop_requested and jax.process_count() == 1) or ckpts.manager.reached_preemption(step):
                log.print(f"preempted at step {step}: saving a checkpoint")
                save(step)
                break
            state, metrics = trainer.train_step(state, *batch("train", step, A))
            step += 1
            steps_since += 1
            if step % config.log_interval == 0:
                loss = float(metrics["loss"])  # waits for the step
                lr = float(schedule(step - 1))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss} at step {step}; nothing was saved "
                                             f"over the checkpoints in {ckpts.directory} (lower learning_rate?)")
                now = time.perf_counter()
                dt = (now - t_last) / steps_since
                t_last, steps_since = now, 0
                tokens_per_s = A * B * T / dt
                utilisation = mfu.mfu(flops, tokens_per_s, jax.device_count(), peak)
                log.print(f"iter {step}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms,"
                          f" {tokens_per_s:,.0f} tok/s, mfu {utilisation * 100:.2f}%")
                log.write(step, loss=loss, lr=lr, ms_per_step=dt * 1000,
                          tokens_per_s=tokens_per_s, mfu=utilisation, grad_norm=float(metrics["grad_norm"]))
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        ckpts.wait()
        ckpts.close()
        log.close()
    return {**losses, "step": step}
