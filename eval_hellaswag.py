"""HellaSwag accuracy of a model: python eval_hellaswag.py --init_from=gpt2 [--limit=N]
[--batch_examples=16]

--init_from: a GPT-2 model (gpt2 ... gpt2-xl), a Hugging Face folder, a training run's out_dir or a
nanoGPT ckpt.pt, as in sample.py; the model must read GPT-2 BPE. See flaxgpt/hellaswag.py for the
scoring.
"""

import sys

from flaxgpt import distributed, faults, hellaswag  # first: jax without plugin noise
from flaxgpt.loader import load
from flaxgpt.tokenizer import GPT2Tokenizer


def main(argv=None) -> dict:
    p = faults.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init_from", default="gpt2",
                   help="gpt2 ... gpt2-xl, a Hugging Face folder, an out_dir or a ckpt.pt")
    p.add_argument("--file",
                   help="a HellaSwag jsonl (default: the validation set, downloaded once)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--batch_examples", type=int, default=16,
                   help="examples per batch (4 rows each)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    with faults.errors_reported("eval_hellaswag.py"):
        args = p.parse_args(argv)
        distributed.use_cpu_without_accelerators()
        config, params, tokenizer, loaded = load(args.init_from, dtype=args.dtype)
        if not isinstance(tokenizer, GPT2Tokenizer):
            raise faults.UserError(f"{args.init_from} reads {type(tokenizer).__name__} tokens: "
                                   "HellaSwag needs a GPT-2 BPE model")
        examples = hellaswag.read_examples(args.file or hellaswag.validation_file(), args.limit)
        print(f"hellaswag: {len(examples):,} examples, {loaded}", file=sys.stderr)
        result = hellaswag.evaluate(params, config, examples, tokenizer,
                                    batch_examples=args.batch_examples)
    print(f"hellaswag {args.init_from}: {result['examples']:,} examples, acc {result['acc']:.4f}, "
          f"acc_norm {result['acc_norm']:.4f}")
    return result


if __name__ == "__main__":
    main()
