"""HellaSwag: pick the most likely of four endings for each context, as build-nanogpt scores GPT-2.

Each example becomes 4 rows, context + ending, in GPT-2 BPE. An ending's score is the loss of its
tokens given everything before them: `acc` picks the ending with the lowest total loss, `acc_norm`
the lowest mean loss per token (build-nanogpt reports acc_norm 0.2955 for gpt2 and 0.4893 for
gpt2-xl on the 10,042 validation examples). Rows are padded to one length for the whole file, so the
scoring compiles once.

The validation file downloads once into ~/.cache/flaxgpt (or FLAXGPT_CACHE); offline machines put it
in $FLAXGPT_DATA/hellaswag/hellaswag_val.jsonl.
"""

import functools
import json
import os
import urllib.request
from pathlib import Path
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.model import GPT, GPTConfig
from flaxgpt.tokenizer import GPT2Tokenizer, local_data_file, user_cache_dir

HELLASWAG_VAL_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                     "hellaswag_val.jsonl")
VAL_FILE = "hellaswag/hellaswag_val.jsonl"


def validation_file() -> Path:
    """The HellaSwag validation jsonl: $FLAXGPT_DATA's copy, else the cached download (fetched
    once)."""
    local = local_data_file(VAL_FILE)
    if local:
        return local
    cache = user_cache_dir() / VAL_FILE
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part")
        try:
            urllib.request.urlretrieve(HELLASWAG_VAL_URL, tmp)
        except OSError as e:
            raise ConnectionError(f"could not download {HELLASWAG_VAL_URL} ({e}): "
                                  "offline, put the file at "
                                  f"$FLAXGPT_DATA/{VAL_FILE}") from None
        tmp.rename(cache)
    return cache


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag jsonl file: {"ctx", "endings" (4), "label"} each."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                example = json.loads(line)
                if len(example["endings"]) != 4 or example["label"] not in range(4):
                    raise ValueError("needs 4 endings and a label 0-3")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n} is not a HellaSwag example ({e})") from None
            examples.append(example)
    return examples


class Rows(NamedTuple):
    """Four rows per example, padded: tokens [4N, L] int32, ending [4N, L] bool (the ending's
    tokens), labels [N]."""
    tokens: np.ndarray
    ending: np.ndarray
    labels: np.ndarray


def render(examples: Iterable[dict], tokenizer: GPT2Tokenizer, block_size: int,
           multiple: int = 32) -> Rows:
    """Token rows of context + " " + ending; L is the longest row rounded up to `multiple`, at most
    block_size (a longer row keeps its last block_size tokens, as nanoGPT crops a context)."""
    rows, endings, labels = [], [], []
    for example in examples:
        context = tokenizer.encode_ordinary(example["ctx"])
        for ending in example["endings"]:
            ending_tokens = tokenizer.encode_ordinary(" " + ending)
            rows.append((context + ending_tokens)[-block_size:])
            # the first token is never a target
            endings.append(min(len(ending_tokens), block_size - 1))
        labels.append(int(example["label"]))
    length = min(block_size, -(-max(map(len, rows)) // multiple) * multiple)
    tokens = np.zeros((len(rows), length), np.int32)
    ending = np.zeros((len(rows), length), bool)
    for i, (row, n_ending) in enumerate(zip(rows, endings)):
        tokens[i, :len(row)] = row
        ending[i, len(row) - n_ending:len(row)] = True
    return Rows(tokens, ending, np.asarray(labels, np.int32))


@functools.partial(jax.jit, static_argnames="config")
def ending_losses(params, config: GPTConfig, tokens, ending):
    """tokens, ending: [R, L] -> (total, mean) loss of each row's ending tokens, [R] each,
    float32."""
    logits = GPT(config).apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    targets = ending[:, 1:]
    total = jnp.sum(jnp.where(targets, nll, 0.0), axis=1)
    return total, total / jnp.maximum(jnp.sum(targets, axis=1), 1)


def evaluate(params, config: GPTConfig, examples: list[dict], tokenizer: GPT2Tokenizer, *,
             batch_examples: int = 16, progress: bool = True) -> dict:
    """{"examples", "acc", "acc_norm", "total_loss" [N, 4], "mean_loss" [N, 4]} of the model on
    `examples`.

    Batches of batch_examples examples (4 * batch_examples rows); the last batch is padded to the
    same shape with copies of its first rows, whose scores are dropped.
    """
    rows = render(examples, tokenizer, config.block_size)
    R = 4 * batch_examples
    totals, means = [], []
    batches = range(0, len(rows.tokens), R)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="hellaswag", unit="batch")
    for start in batches:
        tokens, ending = rows.tokens[start:start + R], rows.ending[start:start + R]
        n = len(tokens)
        if n < R:  # one shape for every batch
            tokens = np.concatenate([tokens, np.resize(tokens, (R - n, tokens.shape[1]))])
            ending = np.concatenate([ending, np.resize(ending, (R - n, ending.shape[1]))])
        total, mean = ending_losses(params, config, tokens, ending)
        totals.append(np.asarray(total)[:n])
        means.append(np.asarray(mean)[:n])
    total_loss = np.concatenate(totals).reshape(-1, 4)
    mean_loss = np.concatenate(means).reshape(-1, 4)
    return {"examples": len(rows.labels),
            "acc": float(np.mean(np.argmin(total_loss, axis=1) == rows.labels)),
            "acc_norm": float(np.mean(np.argmin(mean_loss, axis=1) == rows.labels)),
            "total_loss": total_loss, "mean_loss": mean_loss}
