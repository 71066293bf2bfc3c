"""Sampling speed: the KV-cached compiled loop (`generate`) against nanoGPT's algorithm (`generate_naive`).

    python benchmarks/bench_sampling.py                      # random init of the CPU shakespeare_char size
    python benchmarks/bench_sampling.py --out_dir=out-shakespeare-char-cpu   # a trained checkpoint

Both are compiled and timed after a warm-up run (best of --repeats), from a one-token prompt as
sample.py's default start. The baseline runs, for every new token, one compiled full forward over the
context cropped to its last block_size tokens, as nanoGPT does (always as a block_size-long forward, so
one program serves every length). `generate` writes each new token into the KV cache while it fits in
block_size; past that, every position shifts each step, and it reruns the whole window just as nanoGPT
does. The figures are shown both for a sample that fits in the block and for --max_new_tokens.
"""

import argparse
import time

import jax
import numpy as np

from flaxgpt.generate import generate, generate_naive, generate_stream
from flaxgpt.model import GPTConfig, init_params

# configs/shakespeare_char.py:cpu, nanoGPT's laptop baby GPT (0.8M parameters).
SHAKESPEARE_CHAR_CPU = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                                 gelu_approximate=False)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs of fn(), after one warm-up (compiling) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a training run to load (default: random init of the CPU shakespeare_char size)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    if args.out_dir:
        from flaxgpt.checkpoint import load_params
        config, params = load_params(args.out_dir)
    else:
        config = SHAKESPEARE_CHAR_CPU
        params = init_params(config, jax.random.key(0))
    prompt = np.zeros((args.batch_size, 1), np.int32)
    print(f"{jax.devices()[0].platform}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"block_size={config.block_size} vocab={config.vocab_size}, batch {args.batch_size}, "
          f"temperature={args.temperature} top_k={args.top_k}")

    for n in sorted({config.block_size - 1, args.max_new_tokens}):
        kw = dict(max_new_tokens=n, rng=jax.random.key(0), temperature=args.temperature, top_k=args.top_k)
        rates = {}
        for name, fn in [("generate (KV cache, compiled loop)", lambda: generate(params, config, prompt, **kw)),
                         ("generate_stream (KV cache, a step per call)",
                          lambda: list(generate_stream(params, config, prompt, **kw))),
                         ("generate_naive (nanoGPT: full forward per token)",
                          lambda: generate_naive(params, config, prompt, **kw))]:
            rates[name] = args.batch_size * n / best_time(fn, args.repeats)
        print(f"\n{n} new tokens:")
        naive = rates[name]
        for name, rate in rates.items():
            print(f"  {name:50s} {rate:10,.0f} tokens/s  {rate / naive:5.1f}x")


if __name__ == "__main__":
    main()
