"""Sampling speed: flaxgpt's `generate` against Hugging Face transformers' cached `generate` on the
same weights, on the same machine, in one run; and against the memory-bandwidth floor.

    # GPT-2 124M and the CPU shakespeare_char model
    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --models gpt2 --batch_size 1 8 --dtype bfloat16
    # a trained run instead of random init
    python benchmarks/bench_sampling.py --out_dir=out-shakespeare-char-cpu

Each case: an 8-token random prompt per row, --max_new_tokens greedy tokens (both systems must emit
the same ones, so min_new_tokens keeps transformers from stopping early; at most block_size - 8, as
transformers cannot crop its context), the two systems taking turns, medians of
--repeats runs after a warm-up. tokens/s count all rows. GPT-2 124M gets random weights (seed 0);
the shakespeare_char model is the CPU config's size with the prepared dataset's vocabulary (65), or
--out_dir's run. transformers' GPT-2 always has biases: a bias-free model is handed to it with zero
biases (the same function). The floor is batch 1's: every weight read once per new token (wte as the
tied head, the KV cache of the tokens so far), at the bandwidth of the faster of two reads of 512 MB
(a sum, a matrix-vector product; see MemoryRead) taking turns with the two systems; flaxgpt/floor is
how far above it a token takes. flaxgpt samples through one Decoder per model, for every batch
size, as sample.py does (the time to lay its weights out is printed). Prefill: the time to the first
new token of a 512-token prompt (GPT-2, batch 1). Needs torch and transformers (pip install torch
transformers).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import shakespeare_char  # noqa: E402
from flaxgpt import xla_options  # noqa: E402
from benchmarks.benchmarking import benchmark_model, median_seconds_in_turns  # noqa: E402
from flaxgpt.generate import Decoder  # noqa: E402
from flaxgpt.model import GPTConfig, init_params  # noqa: E402
from flaxgpt.pretrained import save_pretrained  # noqa: E402


class MemoryRead:
    """Reads of one large float32 array by two kernels: what reading memory costs on this machine,
    timed in turns with the runs it bounds (this shared machine's bandwidth moved between 24 and 36
    GB/s from one run to the next). Decoding at batch 1 reads its weights; the floor takes the
    faster of a sum (XLA's own reduction: YNNPACK's read 7% slower) and a matrix-vector product over
    the array as [768, N] (XLA:CPU's product reads a wide matrix faster still: 32.4 against 28.7
    GB/s for the sum, the same hour)."""

    def __init__(self, n_bytes: int = 512 * 2**20, width: int = 768):
        self.array = jnp.ones(n_bytes // 4 // width * width, jnp.float32)
        vector = jnp.ones((1, width), jnp.float32)
        sum_ = jax.jit(jnp.sum,
                       compiler_options=xla_options.compiler_options(jax.default_backend()))
        matvec = jax.jit(lambda a: vector @ a.reshape(width, -1))
        self.kernels = {"sum": lambda: sum_(self.array), "matvec": lambda: matvec(self.array)}
        for read in self.kernels.values():
            jax.block_until_ready(read())

    def runs(self, reads: int) -> dict:
        """{"memory sum": fn, "memory matvec": fn}, each reading the array `reads` times."""
        return {f"memory {name}":
                lambda read=read: [jax.block_until_ready(read()) for _ in range(reads)]
                for name, read in self.kernels.items()}

    def bandwidth(self, seconds: dict, reads: int) -> float:
        """Bytes/s of the faster kernel, from median_seconds_in_turns' result (whose memory entries
        it removes)."""
        fastest = min(seconds.pop(name) for name in [k for k in seconds if k.startswith("memory ")])
        return reads * self.array.size * 4 / fastest


def hf_model(params, config: GPTConfig, folder: str, dtype: str):
    """transformers' GPT2LMHeadModel with the same weights (zero biases for a bias-free model)."""
    import torch
    import transformers

    if not config.bias:
        config = config.replace(bias=True)
        params = _fill(init_params(config, jax.random.key(0)), params)
    save_pretrained(params, config, folder, vocab_size=config.vocab_size)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch_dtype).eval()


def _fill(with_bias: dict, params: dict) -> dict:
    """params with zeros where `with_bias` (a biased model's tree) has biases that params lacks."""
    if isinstance(with_bias, dict):
        return {k: _fill(v, params[k]) if k in params else jax.tree.map(jnp.zeros_like, v)
                for k, v in with_bias.items()}
    return params


def floor_tokens_per_s(params, config: GPTConfig, dtype: str, context: float,
                       bandwidth: float) -> float:
    """Batch 1: every weight once per token (wpe: one row; wte as the head) plus the KV cache of
    `context` tokens."""
    itemsize = jnp.dtype(dtype).itemsize
    n_weights = (sum(x.size for x in jax.tree.leaves(params)) - params["wpe"]["embedding"].size
                 + config.n_embd)
    cache = 2 * config.n_layer * context * config.n_embd
    return bandwidth / ((n_weights + cache) * itemsize)


def compare(name, params, config, decoder: Decoder, hf, batch_size, args,
            memory: MemoryRead) -> float:
    """Print one case's line -> flaxgpt's tokens/s / transformers'."""
    import torch

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (batch_size, 8)).astype(np.int32)
    n = min(args.max_new_tokens, config.block_size - 8)  # transformers cannot go past block_size
    ours = lambda: np.asarray(decoder.generate(prompt, max_new_tokens=n, rng=jax.random.key(0),
                                               temperature=0.0))
    prompt_t = torch.tensor(prompt, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)[:, 8:].numpy()

    same = np.mean(ours() == theirs())  # warm-up (compiles) and the check
    # memory: 5 reads per turn, one takes ~20 ms
    runs, reads = {"flaxgpt": ours, "transformers": theirs}, 5
    if batch_size == 1:  # the floor's bandwidth
        runs.update(memory.runs(reads))
    seconds = median_seconds_in_turns(runs, args.repeats)
    bandwidth = memory.bandwidth(seconds, reads) if batch_size == 1 else None
    rate = {k: batch_size * n / v for k, v in seconds.items()}
    line = (f"{name:16s} batch {batch_size:2d}, {n:3d} tokens: "
            f"flaxgpt {rate['flaxgpt']:8.1f} tok/s   transformers "
            f"{rate['transformers']:8.1f} tok/s   flaxgpt/transformers "
            f"{rate['flaxgpt'] / rate['transformers']:5.2f}x")
    if batch_size == 1:
        floor = floor_tokens_per_s(params, config, args.dtype, 8 + n / 2, bandwidth)
        line += (f"   floor {floor:6.1f} tok/s at {bandwidth / 1e9:.1f} GB/s, flaxgpt takes "
                 f"{floor / rate['flaxgpt']:4.2f}x the floor")
    print(line + f"   same tokens {same:.0%}", flush=True)
    return rate["flaxgpt"] / rate["transformers"]


def prefill(config, decoder: Decoder, hf, args):
    import torch

    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, 512)).astype(np.int32)
    ours = lambda: np.asarray(decoder.generate(prompt, max_new_tokens=1, rng=jax.random.key(0),
                                               temperature=0.0))
    prompt_t = torch.tensor(prompt, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=1,
                               do_sample=False, pad_token_id=0)

    ours(), theirs()
    seconds = median_seconds_in_turns({"flaxgpt": ours, "transformers": theirs}, args.repeats)
    ms = {k: 1e3 * v for k, v in seconds.items()}
    print("gpt2 prefill of a 512-token prompt (batch 1, to the first new token): "
          f"flaxgpt {ms['flaxgpt']:.0f} ms, transformers {ms['transformers']:.0f} ms, "
          f"flaxgpt/transformers time {ms['flaxgpt'] / ms['transformers']:.2f}x")


def main(argv=None) -> dict[str, float]:
    """-> {"<model> batch <B>": flaxgpt's tokens/s / transformers'}."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "shakespeare_char"],
                   choices=["gpt2", "shakespeare_char"])
    p.add_argument("--batch_size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype and weights of both systems")
    p.add_argument("--out_dir",
                   help="the shakespeare_char model: a training run instead of random init")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = MemoryRead()
    print(f"{jax.devices()[0].device_kind}, {torch.get_num_threads()} torch threads, "
          f"jax {jax.__version__}, torch {torch.__version__}; {args.dtype}; "
          f"{args.max_new_tokens} greedy new tokens after an 8-token prompt", flush=True)
    ratios = {}
    for model in args.models:
        if model == "gpt2":
            config = GPTConfig.from_preset("gpt2")
            params = init_params(config, jax.random.key(0))
        elif args.out_dir:
            from flaxgpt.loader import load
            config, params, _, _ = load(args.out_dir)
        else:
            config = benchmark_model(shakespeare_char.get_config("cpu"))
            params = init_params(config, jax.random.key(0))
        config = config.replace(dtype=args.dtype)
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_model(params, config, folder, args.dtype)
        start = time.perf_counter()  # once per model, for every batch size, as sample.py does
        decoder = Decoder(params, config)
        jax.block_until_ready(jax.tree.leaves(decoder._weights))
        print(f"{model}: weights laid out in {1e3 * (time.perf_counter() - start):.0f} ms (once)",
              flush=True)
        for batch_size in args.batch_size:
            ratios[f"{model} batch {batch_size}"] = compare(
                model, params, config, decoder, hf, batch_size, args, memory)
        if model == "gpt2":
            prefill(config, decoder, hf, args)
    return ratios


if __name__ == "__main__":
    main()
