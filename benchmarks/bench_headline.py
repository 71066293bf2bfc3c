"""The README's two speed ratios, each against its reference on the same machine, in one run:

    python benchmarks/bench_headline.py

1. the train step of the README's CPU model (configs/shakespeare_char.py:cpu) against nanoGPT's
   step in PyTorch, each system in its own process, in turns (bench_vs_torch.py);
2. sampling GPT-2 124M (random weights, greedy, 50 new tokens after an 8-token prompt) at batch 1
   and 8 against transformers' cached `generate`, in turns in one process (bench_sampling.py).

Both scripts print their full tables first; the last lines hold each ratio (flaxgpt's speed over
the reference's, above 1: flaxgpt faster), beside its target where it has one. Needs torch and
transformers.
"""

import sys
from pathlib import Path

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_sampling, bench_vs_torch  # noqa: E402

TARGETS = {"train step against nanoGPT": 1.1, "sampling gpt2 batch 8 against transformers": 1.8}


def main() -> dict[str, float]:
    """-> {what: flaxgpt's speed / the reference's}, printed beside TARGETS."""
    print("== train step: python benchmarks/bench_vs_torch.py", flush=True)
    step = bench_vs_torch.main([bench_vs_torch.__file__])
    print("== sampling: python benchmarks/bench_sampling.py --models gpt2 --batch_size 1 8 "
          "--max_new_tokens 50", flush=True)
    sampling = bench_sampling.main(["--models", "gpt2", "--batch_size", "1", "8",
                                    "--max_new_tokens", "50"])
    ratios = {"train step against nanoGPT": step["train step"],
              **{f"sampling {case} against transformers": ratio
                 for case, ratio in sampling.items()}}
    print("== flaxgpt's speed / the reference's")
    for what, ratio in ratios.items():
        target = f"   (target {TARGETS[what]:.1f}x)" if what in TARGETS else ""
        print(f"{what:>44}: {ratio:5.2f}x{target}")
    return ratios


if __name__ == "__main__":
    main()
