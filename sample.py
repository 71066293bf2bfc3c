"""Sample from a trained model or from GPT-2, as nanoGPT's sample.py does.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl \
        --start="What is the answer to life, the universe, and everything?" \
        --num_samples=5 --max_new_tokens=100
    python sample.py --init_from=path/to/hf_folder --start=FILE:prompt.txt --no-stream

--init_from: "resume" (the training run in --out_dir), another training run's out_dir, a GPT-2
model (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face folder holding config.json, or a
nanoGPT ckpt.pt (or its out_dir), as flaxgpt.load reads them. The tokenizer is the one in the run's
meta.json (meta.pkl beside a ckpt.pt), else GPT-2's.

It says up front how many tokens it will generate; a sample that takes longer than a few seconds
shows a progress bar on stderr (tokens, tokens/s, time left), except while the streamed text and
the bar share one terminal. --no-stream samples each sample whole in one compiled loop (faster),
and its bar counts whole samples.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

from flaxgpt import distributed, faults, storage, xla_options  # first: jax without plugin noise
from flaxgpt.config import resolve_dtype
from flaxgpt.faults import UsageError, UserError
from flaxgpt.generate import Decoder, check_max_new_tokens, checked_prompt, make_sampler
from flaxgpt.loader import LoadedModel, load as load_model
from flaxgpt.model import crop_vocab_size
from flaxgpt.tokenizer import StreamDecoder

import jax
import numpy as np
from tqdm import tqdm

SEPARATOR = "---------------"
PROGRESS_DELAY_S = 2.0  # a sample that takes longer shows a progress bar on stderr
# stderr not a terminal (a log, a pipe): a progress line only after this long, and then this often
LOG_PROGRESS_DELAY_S = 60.0


def parse_args(argv=None) -> argparse.Namespace:
    p = faults.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="resume", help="resume (from --out_dir), an out_dir, a "
                   "GPT-2 name, a Hugging Face folder or a nanoGPT ckpt.pt")
    p.add_argument("--out_dir", default="out",
                   help="the training run to sample from with --init_from=resume")
    p.add_argument("--start", default="\n", help='the prompt, or FILE:path to read it from a file')
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy; < 1 less random, > 1 more")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the top_k most likely tokens only")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the most likely "
                   "tokens whose probabilities add up to top_p")
    p.add_argument("--window_shift", type=int, default=1, help="once the context outgrows "
                   "block_size, drop this many of its oldest tokens at once: 1 is nanoGPT's exact "
                   "crop; more (e.g. block_size // 2) is much faster past block_size, but each "
                   "token then sees block_size - window_shift + 1 to block_size tokens of context")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype and the weights' while sampling; auto: bfloat16 on GPUs "
                   "and TPUs, float32 on CPUs")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print the text as it is generated")
    p.add_argument("--verbose", action="store_true", help="print the libraries' own reports of a "
                   "failure too (the same as FLAXGPT_VERBOSE=1)")
    p.add_argument("--compilation_cache_dir", default=None, help="compiled sampling loops kept "
                   "here for the next call (default $FLAXGPT_CACHE/xla or ~/.cache/flaxgpt/xla; '' "
                   "for none)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be positive, got {args.num_samples}")
    with library_checks():  # before loading a model: the sampling settings alone
        make_sampler(args.temperature, args.top_k, args.top_p)
        check_max_new_tokens(args.max_new_tokens)
    return args


@contextlib.contextmanager
def library_checks():
    """flaxgpt's ValueErrors name the setting ("top_p must be ..."): report them as the option."""
    try:
        yield
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def load(init_from: str, out_dir: str, dtype: str) -> LoadedModel:
    """The model --init_from names (--out_dir's run for "resume"), or a UserError of one line."""
    source = out_dir if init_from == "resume" else init_from
    try:
        return load_model(source, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - flaxgpt's checks say what is wrong; others go on
        if not faults.is_users_mistake(e):
            raise
        message = faults.explain(e)
        local = not storage.is_remote(source)  # a bucket's own message is already about the bucket
        if init_from == "resume" and local and not Path(out_dir).exists():
            message = (f"--out_dir={out_dir}: no such directory (train a model there first, or "
                       "pass --init_from)")
        elif init_from == "resume" and local and Path(out_dir).is_file():
            message = f"--out_dir={out_dir} is a file, not a training run's out_dir"
        elif (isinstance(e, FileNotFoundError) and init_from != "resume" and local
              and not Path(init_from).exists()):
            message = f"--init_from={init_from}: {message.split(': ', 1)[-1]}"
        raise UserError(message) from None


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        try:
            start = Path(start[len("FILE:"):]).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--start={start}: {faults.explain(e)}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--start={start}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
    if not start:
        raise UsageError("--start is empty: the model needs at least one token to continue")
    return start


def run(args: argparse.Namespace) -> None:
    xla_options.use_compilation_cache(args.compilation_cache_dir)
    start = read_prompt(args.start)
    config, params, tokenizer, loaded = load(args.init_from, args.out_dir,
                                             resolve_dtype(args.dtype))
    if tokenizer.vocab_size < config.vocab_size:  # GPT-2's padding rows have no text: never sampled
        params, config = crop_vocab_size(params, config, tokenizer.vocab_size)
    try:
        start_ids = tokenizer.encode(start)
    except ValueError as e:  # a character outside a character-level vocabulary
        raise UsageError(f"--start: {e}") from None
    if max(start_ids, default=0) >= config.vocab_size:
        raise UsageError(f"--start: token {max(start_ids)} is outside the model's vocabulary of "
                         f"{config.vocab_size}: is the tokenizer right? (a nanoGPT ckpt.pt needs "
                         "its meta.pkl beside it)")
    if len(start_ids) > config.block_size:
        print(f"warning: the prompt has {len(start_ids)} tokens but the model sees at most "
              f"{config.block_size}; only its last {config.block_size} are used", file=sys.stderr)
    prompt = np.asarray([start_ids], np.int32)
    with library_checks():
        checked_prompt(config, prompt, None, args.window_shift)
    print(f"sampling {loaded} in {config.dtype}", file=sys.stderr, flush=True)
    n, total = args.num_samples, args.num_samples * args.max_new_tokens
    print(f"generating {n} sample{'s' if n > 1 else ''} x {args.max_new_tokens:,} tokens = "
          f"{total:,} new tokens", file=sys.stderr, flush=True)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, window_shift=args.window_shift)
    decoder = Decoder(params, config)  # the weights laid out once for all samples
    # Streamed text on the terminal is its own progress; a bar on the same terminal would garble it.
    show_progress = not (args.stream and sys.stdout.isatty() and sys.stderr.isatty())
    bar = dict(unit="tok", file=sys.stderr, leave=False, disable=not show_progress,
               **(dict(delay=PROGRESS_DELAY_S) if sys.stderr.isatty() else
                  dict(delay=LOG_PROGRESS_DELAY_S, mininterval=LOG_PROGRESS_DELAY_S)))
    key = jax.random.key(args.seed)  # sample k draws from fold_in(key, k)
    if not args.stream:  # each sample whole from the compiled loop; the bar counts whole samples
        with tqdm(total=total, desc=f"{n} sample{'s' if n > 1 else ''}", **bar) as progress:
            for k in range(n):
                tokens = np.asarray(decoder.generate(prompt, rng=jax.random.fold_in(key, k), **kw))
                progress.clear()  # the bar, if shown; the next update draws it again
                print(start + tokenizer.decode(tokens[0].tolist()))
                print(SEPARATOR, flush=True)
                progress.update(args.max_new_tokens)
        return
    for k in range(n):  # one after another, as nanoGPT
        print(start, end="", flush=True)
        text = StreamDecoder(tokenizer)
        steps = decoder.stream(prompt, rng=jax.random.fold_in(key, k), **kw)
        with tqdm(steps, total=args.max_new_tokens, desc=f"sample {k + 1}/{n}", **bar) as progress:
            for token in progress:
                print(text.push(int(token[0])), end="", flush=True)
        print(text.flush())
        print(SEPARATOR, flush=True)


def main(argv=None) -> None:
    distributed.use_cpu_without_accelerators()  # parse_args builds the sampler's arrays
    with faults.errors_reported("sample.py"):
        args = parse_args(argv)
        if args.verbose:
            os.environ[faults.VERBOSE_VARIABLE] = "1"
        faults.quiet_until_exit()
        run(args)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if stop.code != 130:
            raise
        # Interrupted mid-step: the step's arrays and the stream are still alive, and tearing the
        # runtime down under them can crash the interpreter; there is nothing left to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
