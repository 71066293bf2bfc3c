"""Sampling speed: the KV-cached compiled loop (`generate`) against nanoGPT's algorithm (`generate_naive`).

    python benchmarks/bench_sampling.py                      # random init of the CPU shakespeare_char size
    python benchmarks/bench_sampling.py --out_dir=out-shakespeare-char-cpu   # a trained checkpoint
    python benchmarks/bench_sampling.py --batch_size 8       # only batch 8 (default: batch 1, then 10)

All are compiled and timed after a warm-up run (best of --repeats), from a one-token prompt as sample.py's
default start, at batch 1 and at batch 10 (sample.py's default --num_samples, all rows sampled at once).
The baseline runs, for every new token, one compiled full forward over the context cropped to its last
block_size tokens, as nanoGPT does (always as a block_size-long forward, so one program serves every
length). `generate` writes each new token into the KV cache while it fits in block_size. Past that, with
window_shift=1 (nanoGPT's exact crop) every position shifts each step and it reruns the whole window, as
nanoGPT does; with window_shift=k it drops k tokens at once and reruns the window once per k tokens.
"""

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the flaxgpt package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import shakespeare_char  # noqa: E402
from flaxgpt.benchmarking import benchmark_model, best_time  # noqa: E402
from flaxgpt.generate import generate  # noqa: E402
from flaxgpt.sampling_reference import generate_naive  # noqa: E402
from flaxgpt.model import init_params  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a training run to load (default: random init of configs/shakespeare_char.py:cpu, "
                   "with the prepared dataset's vocabulary)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--batch_size", type=int, nargs="+", default=[1, 10],
                   help="the batch sizes to time, one table each (default 1, and sample.py's num_samples 10)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--window_shift", type=int, default=None, help="the larger shift to time (default block_size // 2)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    if args.out_dir:
        from flaxgpt.checkpoint import load_params
        config, params = load_params(args.out_dir)
    else:
        config = benchmark_model(shakespeare_char.get_config("cpu"))
        params = init_params(config, jax.random.key(0))
    shift = args.window_shift or config.block_size // 2
    n = args.max_new_tokens
    print(f"{jax.devices()[0].platform}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"block_size={config.block_size} vocab={config.vocab_size}, temperature={args.temperature} "
          f"top_k={args.top_k}, {n} new tokens per row from a 1-token prompt; tokens/s count all rows")
    kw = dict(max_new_tokens=n, rng=jax.random.key(0), temperature=args.temperature, top_k=args.top_k)
    for batch_size in args.batch_size:
        print(f"batch {batch_size}:")
        bench(params, config, np.zeros((batch_size, 1), np.int32), shift, args.repeats, kw)


def bench(params, config, prompt, shift, repeats, kw):
    runs = [("generate_naive (nanoGPT crop: full forward per token)",
             lambda: generate_naive(params, config, prompt, **kw)),
            ("generate, window_shift=1 (KV cache, exact nanoGPT crop)", lambda: generate(params, config, prompt, **kw)),
            (f"generate, window_shift={shift} (KV cache)",
             lambda: generate(params, config, prompt, window_shift=shift, **kw))]
    naive = None
    for name, fn in runs:
        rate = prompt.size * kw["max_new_tokens"] / best_time(fn, repeats)
        naive = naive or rate
        print(f"  {name:58s} {rate:10,.0f} tokens/s  {rate / naive:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
