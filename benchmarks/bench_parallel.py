"""Train-step time of each parallelism mode on simulated CPU devices.

    python benchmarks/bench_parallel.py [--steps 20] [--repeats 3] [--modes dp8,fsdp8]

Builds the sharded TrainStep (flaxgpt/train_step.py) for each mesh, compiles the step, then times
`--steps` steps (dispatched back to back, `block_until_ready` at the end) `--repeats` times and
prints the median ms/step and tokens/s. The model and AdamW are configs/shakespeare_char.py:cpu's (4
layers, 4 heads, 128 wide, block 64, the prepared dataset's vocabulary) with batch 16 (its 12 does
not divide by 8).

The 8 devices are simulated on the host's CPU cores (XLA's --xla_force_host_platform_device_count),
so these figures show the cost of partitioning and collectives on one CPU, not the speed-up real
chips give: use bench.py on a GPU/TPU for that.
"""

import os
import re

N_DEVICES = 8
# Before jax starts: simulated CPU devices (replacing any device count already in XLA_FLAGS).
os.environ["XLA_FLAGS"] = " ".join([
    re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")),
    f"--xla_force_host_platform_device_count={N_DEVICES}"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import shakespeare_char  # noqa: E402
from benchmarks import benchmarking  # noqa: E402
from flaxgpt import optim, sharding  # noqa: E402
from flaxgpt.model import count_params  # noqa: E402
from flaxgpt.train_step import TrainStep  # noqa: E402

MODES = {  # name -> (mesh, devices used)
    "1 device": ({"data": 1}, 1),
    "DP 8": ({"data": 8}, 8),
    "FSDP 8": ({"fsdp": 8}, 8),
    "TP 2 x DP 4": ({"data": 4, "tensor": 2}, 8),
    "FSDP 4 x TP 2": ({"fsdp": 4, "tensor": 2}, 8),
}
KEYS = {"one": "1 device", "dp8": "DP 8", "fsdp8": "FSDP 8", "tp2_dp4": "TP 2 x DP 4",
        "fsdp4_tp2": "FSDP 4 x TP 2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--modes", default=",".join(KEYS),
                   help=f"comma-separated subset of {','.join(KEYS)}")
    p.add_argument("--batch_size", type=int, default=16,
                   help="global micro-batch (all devices together)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="default: the prepared shakespeare_char's")
    return p.parse_args(argv)


def bench(name, mesh_shape, n_devices, model, optimizer, args):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n_devices])
    train_step = TrainStep(model, optimizer, mesh, seed=0)
    t0 = time.perf_counter()
    state = train_step.init(jax.random.key(0))
    shape = (args.grad_accum, args.batch_size, model.block_size + 1)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, shape).astype(np.int32)
    x = jax.device_put(tokens[..., :-1], train_step.batch_sharding)
    y = jax.device_put(tokens[..., 1:], train_step.batch_sharding)
    state, metrics = train_step.train_fn(state, x, y)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    (state, metrics), times = benchmarking.time_steps(lambda sm: train_step.train_fn(sm[0], x, y),
                                                      (state, metrics), steps=args.steps,
                                                      repeats=args.repeats, warmup=args.warmup)
    dt = statistics.median(times)
    return {"mode": name, "mesh": dict(mesh.shape), "compile_s": compile_s, "ms": dt * 1e3,
            "ms_min": min(times) * 1e3,
            "tok_s": args.grad_accum * args.batch_size * model.block_size / dt,
            "loss": float(metrics["loss"])}


def main(argv=None):
    args = parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m.strip() and m.strip() not in KEYS]
    if unknown:
        sys.exit(f"unknown modes {unknown}: choose from {', '.join(KEYS)}")
    modes = [KEYS[m.strip()] for m in args.modes.split(",") if m.strip()]
    if jax.device_count() < N_DEVICES:
        sys.exit(f"{jax.device_count()} devices: jax started before XLA_FLAGS could be set")
    config = shakespeare_char.get_config("cpu")
    try:
        model = benchmarking.benchmark_model(config, args.vocab_size)
    except (OSError, ValueError) as e:
        sys.exit(f"bench_parallel.py: error: {e}")
    optimizer = optim.make_optimizer(config)
    n_params = count_params(TrainStep(model, optimizer,
                                      sharding.make_mesh({"data": 1}, jax.devices()[:1]))
                            .abstract_state.params)
    print(f"jax {jax.__version__}, {jax.device_count()} simulated {jax.devices()[0].platform} "
          f"devices on {os.cpu_count()} cores; model {n_params / 1e6:.2f}M params, {model.n_layer} "
          f"layers x {model.n_embd} wide, {model.n_head} heads, vocab {model.vocab_size}, block "
          f"{model.block_size}; batch {args.grad_accum} x {args.batch_size}; {args.repeats} x "
          f"{args.steps} steps", flush=True)
    rows = []
    for name in modes:
        mesh_shape, n_devices = MODES[name]
        rows.append(bench(name, mesh_shape, n_devices, model, optimizer, args))
        print(f"  {name}: {rows[-1]['ms']:.1f} ms/step", file=sys.stderr, flush=True)
    base = next((r["ms"] for r in rows if r["mode"] == "1 device"), None)
    header = (f"{'mode':<15} {'mesh (data,fsdp,tensor)':<24} {'ms/step':>8} {'(min)':>8} "
              f"{'tokens/s':>10} {'vs 1 dev':>8} {'compile s':>9} {'loss':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mesh = ",".join(str(v) for v in r["mesh"].values())
        rel = f"{base / r['ms']:.2f}x" if base else "-"
        print(f"{r['mode']:<15} {mesh:<24} {r['ms']:8.1f} {r['ms_min']:8.1f} {r['tok_s']:10,.0f} "
              f"{rel:>8} {r['compile_s']:9.1f} {r['loss']:7.4f}")
    return rows


if __name__ == "__main__":
    main()
