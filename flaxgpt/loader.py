"""`flaxgpt.load`: any model a user can name, with its tokenizer: a training run's out_dir (local or
gs://), a GPT-2 name, a Hugging Face folder, or a nanoGPT ckpt.pt (or the nanoGPT out_dir holding
it). The formats' readers are checkpoint.load_run and pretrained.load_pretrained / load_nanogpt.

    config, params, tokenizer, description = flaxgpt.load("gpt2")
"""

import os
from typing import Any, NamedTuple

from flaxgpt import storage, tokenizer as tokenizers
from flaxgpt.model import PRESETS, GPTConfig


class LoadedModel(NamedTuple):
    config: GPTConfig
    params: Any
    tokenizer: tokenizers.Tokenizer
    description: str  # e.g. "run 20261122-093512-4f2a9c at step 2000 (out/checkpoints/2000)"


def load(source: str | os.PathLike, *, dtype: str | None = None) -> LoadedModel:
    """The model `source` names, its params on the default device; dtype: the config's compute
    dtype (None: float32). FileNotFoundError / ValueError (one line each) when it names none."""
    storage.check_reachable(source, "the model's location")
    path = storage.path(source)
    if str(source) in PRESETS or (path / "config.json").is_file():
        from flaxgpt.pretrained import load_pretrained
        name = str(source) if str(source) in PRESETS else path
        return LoadedModel(*load_pretrained(name, dtype=dtype), tokenizers.GPT2Tokenizer(),
                           f"pretrained {name}")
    if path.is_dir() and (path / "ckpt.pt").is_file() and not (path / "checkpoints").is_dir():
        path = path / "ckpt.pt"  # a nanoGPT out_dir
    if path.is_file() and path.suffix == ".pt":
        from flaxgpt.pretrained import load_nanogpt
        return LoadedModel(*load_nanogpt(path, dtype=dtype), tokenizers.from_dir(path.parent),
                           f"nanoGPT {path}")
    if path.is_dir():
        from flaxgpt.checkpoint import load_run
        config, params, meta = load_run(path, dtype=dtype)
        description = (f"run {meta.get('run_id', '(unnamed)')} at step {meta['step']} "
                       f"({path / 'checkpoints' / str(meta['step'])})")
        return LoadedModel(config, params, tokenizers.from_dir(path), description)
    if path.exists():
        raise ValueError(f"{source} is a file, but not a nanoGPT ckpt.pt: name a training run's "
                         "out_dir, a GPT-2 model, a Hugging Face folder or a ckpt.pt")
    raise FileNotFoundError(f"{source}: not a GPT-2 model ({', '.join(PRESETS)}), nor an existing "
                            "out_dir, Hugging Face folder or ckpt.pt file")
