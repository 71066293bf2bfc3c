"""Import and export of GPT-2 weights: Hugging Face (`transformers`) folders and nanoGPT `ckpt.pt`
files. `flaxgpt.load` (loader.py) picks the reader for any name or path.

Both formats name tensors alike (`transformer.h.0.attn.c_attn.weight`); they differ in layout. HF's
Conv1D weights are (in, out) and reshape straight into our kernels (c_attn [C, 3C] -> [C, 3, H, D],
attn.c_proj [C, C] -> [H, D, C]); nanoGPT's nn.Linear weights are (out, in) and are transposed
first. The lm_head is tied to wte in both and is never stored separately here.

torch, huggingface_hub and safetensors are optional (`pip install "flaxgpt[hf]"`), imported lazily.
"""

import importlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxgpt import storage
from flaxgpt.layer_stacking import convert_layers
from flaxgpt.model import PRESETS, GPTConfig, crop_vocab_size, init_params
from flaxgpt.tokenizer import GPT2_EOT, GPT2_PADDED_VOCAB_SIZE, GPT2_VOCAB_SIZE

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# HF's activation_function -> GPTConfig.gelu_approximate
_TANH_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of attention


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs {module}, an optional dependency: "
                          "pip install 'flaxgpt[hf]'") from None


# --- The one mapping between torch state dicts and our parameter tree, shared by both formats. ---

class _Tensor(NamedTuple):
    path: tuple[str, ...]  # in our params, e.g. ("h_0", "attn", "c_attn", "kernel")
    shape: tuple[int, ...]  # ours, e.g. [C, 3, H, D]
    torch_shape: tuple[int, ...]  # in the file: [C, 3C] as HF's Conv1D (in, out), [3C, C] Linear
    transposed: bool  # an nn.Linear (out, in) weight


def _torch_layout(config: GPTConfig, *, linear: bool) -> dict[str, _Tensor]:
    """{torch name without prefix: _Tensor}, derived from the unscanned model (one entry per layer,
    as torch names them); linear: kernels are nn.Linear's."""
    config = config.replace(scan_layers=False)
    expected = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
    layout = {}
    for path, leaf in traverse_util.flatten_dict(expected).items():
        *modules, kind = path
        name = ".".join(f"h.{m[2:]}" if m.startswith("h_") else m for m in modules)
        name += ".bias" if kind == "bias" else ".weight"  # kernel, scale, embedding: all `weight`
        torch_shape, transposed = leaf.shape, linear and kind == "kernel"
        if kind == "kernel":  # attn.c_proj contracts two axes (H, D), the other kernels one
            n_in = 2 if modules[-2:] == ["attn", "c_proj"] else 1
            torch_shape = (math.prod(leaf.shape[:n_in]), math.prod(leaf.shape[n_in:]))
            torch_shape = torch_shape[::-1] if transposed else torch_shape
        elif kind in ("bias", "scale"):  # c_attn's bias [3, H, D] is [3C]
            torch_shape = (math.prod(leaf.shape),)
        layout[name] = _Tensor(path, leaf.shape, torch_shape, transposed)
    return layout


def _from_torch(state: dict[str, np.ndarray], config: GPTConfig, *, linear: bool,
                source: str) -> dict:
    """A torch state dict (prefixes and buffers allowed) -> our params, in config.param_dtype."""
    state = {re.sub(r"^(_orig_mod\.)?(transformer\.)?", "", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _BUFFER.search(k)}
    lm_head = state.pop("lm_head.weight", None)
    wte = state.get("wte.weight")
    if lm_head is not None and wte is not None and not np.array_equal(lm_head, wte):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; untied heads are "
                              "not supported")
    layout = _torch_layout(config, linear=linear)
    problems = [f"missing {k} {list(t.torch_shape)}" for k, t in layout.items() if k not in state]
    problems += [f"unexpected {k} {list(v.shape)}" for k, v in state.items() if k not in layout]
    problems += [f"{k} has shape {list(state[k].shape)}, the model expects {list(t.torch_shape)}"
                 for k, t in layout.items() if k in state and state[k].shape != t.torch_shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{source} does not fit a GPT with n_layer={config.n_layer}, "
                              f"n_head={config.n_head}, n_embd={config.n_embd}: "
                              f"{'; '.join(problems[:5])}{more}")
    flat = {t.path: jnp.asarray((state[k].T if t.transposed else state[k]).reshape(t.shape),
                                config.param_dtype)
            for k, t in layout.items()}
    return convert_layers(traverse_util.unflatten_dict(flat), config.scan_layers)


def _to_torch(params, config: GPTConfig, *, linear: bool) -> dict[str, np.ndarray]:
    """Our params -> float32 numpy state dict, names without prefix."""
    flat = traverse_util.flatten_dict(jax.device_get(convert_layers(nn.meta.unbox(params), False)))
    layout = _torch_layout(config, linear=linear)
    got, want = {p: v.shape for p, v in flat.items()}, {t.path: t.shape for t in layout.values()}
    if got != want:
        diff = sorted("/".join(p) for p in got.keys() ^ want.keys()) or [
            f"{'/'.join(p)} {list(got[p])} vs {list(want[p])}" for p in want if got[p] != want[p]]
        raise CheckpointError(f"params do not match the config {config}: {', '.join(diff[:5])}")
    state = {}
    for name, t in layout.items():
        value = np.array(flat[t.path], np.float32)  # a writable copy, as torch.from_numpy wants
        state[name] = np.ascontiguousarray(value.reshape(t.torch_shape[::-1]).T if t.transposed
                                           else value.reshape(t.torch_shape))
    return state


# --- Hugging Face ---

def load_pretrained(name_or_path: str | Path, *, dtype: str | None = None,
                    param_dtype: str = "float32") -> tuple[GPTConfig, dict]:
    """GPT-2 weights from the Hugging Face Hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a folder
    (local or in a bucket) holding config.json and model.safetensors (or pytorch_model.bin).
    Returns (config, params).

    dtype is the compute dtype of the returned config; params are cast to param_dtype. The
    vocabulary stays as in the file (50257 for GPT-2).
    """
    folder = storage.path(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in PRESETS:  # a Path("gpt2") means the folder
        folder = storage.path(_download(name_or_path))
    elif not folder.is_dir():
        raise ValueError(f"unknown model {str(name_or_path)!r} and no such folder: choose one of "
                         f"{', '.join(PRESETS)}, or pass a folder holding config.json and "
                         "model.safetensors")
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    missing += [] if weights else ["model.safetensors (or pytorch_model.bin)"]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {' and '.join(missing)}: a GPT-2 folder holds "
                                "config.json and model.safetensors or pytorch_model.bin")
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e}): download it "
                              "again") from None
    config = _config_from_hf(hf_config, folder).replace(dtype=dtype or GPTConfig.dtype,
                                                        param_dtype=param_dtype)
    if weights.suffix == ".safetensors":
        safetensors = _require("safetensors.numpy")
        try:
            state = safetensors.load(weights.read_bytes()) if storage.is_remote(weights) else \
                safetensors.load_file(weights)
        except Exception as e:  # the Rust reader's SafetensorError is not an OSError or ValueError
            raise CheckpointError(f"{weights} is not a readable safetensors file "
                                  f"({str(e).splitlines()[0]}): it is damaged or incomplete; "
                                  "download or save it again") from None
    else:
        state = _numpy_state(_torch_load(weights))
    return config, _from_torch(state, config, linear=False, source=str(weights))


def _download(name: str) -> Path:
    """The HF cache folder of a hub model, after downloading config.json and its weights into it."""
    hub = _require("huggingface_hub")
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        config_file = hub.hf_hub_download(name, "config.json")
        for filename in WEIGHT_FILES:  # safetensors, else the older pytorch_model.bin
            try:
                hub.hf_hub_download(name, filename)
                break
            except EntryNotFoundError as e:  # not on the Hub, or (offline) not in the cache
                error = e
        else:
            raise error
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub is unreachable")
        raise RuntimeError(
            f"cannot download {name!r}: {why} and it is not in the HF cache "
            f"({hub.constants.HF_HUB_CACHE}). To work offline, download it elsewhere (`hf "
            f"download {name} config.json model.safetensors --local-dir {name}`) and pass that "
            "folder's path, or copy a populated HF cache here.") from None
    except HfHubHTTPError as e:
        raise RuntimeError(f"cannot download {name!r} from the Hugging Face Hub: "
                           f"{str(e).splitlines()[0]}") from None
    return Path(config_file).parent


def _config_from_hf(hf: dict, folder: Path) -> GPTConfig:
    """GPTConfig of an HF GPT-2 config.json; settings our model cannot express raise."""
    eps, act = hf.get("layer_norm_epsilon", 1e-5), hf.get("activation_function", "gelu_new")
    unsupported = []
    if eps != 1e-5:
        unsupported.append(f"layer_norm_epsilon={eps} (only 1e-5)")
    if act not in _TANH_GELU:
        unsupported.append(f"activation_function={act!r} (only {', '.join(_TANH_GELU)})")
    if hf.get("model_type", "gpt2") != "gpt2":
        unsupported.append(f"model_type={hf['model_type']!r} (only gpt2)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']} (only 4 * n_embd)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        unsupported.append("non-standard attention scaling")
    if unsupported:
        raise ValueError(f"{folder / 'config.json'}: unsupported {', '.join(unsupported)}")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                     gelu_approximate=_TANH_GELU[act])


def save_pretrained(params, config: GPTConfig, folder: str | Path, *,
                    vocab_size: int | None = None) -> storage.Path:
    """Write config.json and model.safetensors (float32) that transformers.GPT2LMHeadModel loads.

    vocab_size: rows of wte to keep; by default config.vocab_size, except 50304 (GPT-2's padded
    vocabulary) which is cut back to 50257.
    """
    if not config.bias:
        raise ValueError("HF GPT-2 always has biases: a bias=False model cannot be saved as one "
                         "(use save_nanogpt)")
    if vocab_size is None:
        padded = config.vocab_size == GPT2_PADDED_VOCAB_SIZE
        vocab_size = GPT2_VOCAB_SIZE if padded else config.vocab_size
    if vocab_size > config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} exceeds the model's {config.vocab_size}")
    params = nn.meta.unbox(params)
    params, config = crop_vocab_size(params, config, vocab_size)
    state = {f"transformer.{k}": v for k, v in _to_torch(params, config, linear=False).items()}
    act = "gelu_new" if config.gelu_approximate else "gelu"
    hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab_size,
              n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
              n_layer=config.n_layer, n_head=config.n_head, n_inner=None, activation_function=act,
              layer_norm_epsilon=1e-5, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
              attn_pdrop=config.dropout, tie_word_embeddings=True, dtype="float32")
    eot = GPT2_EOT if vocab_size > GPT2_EOT else None  # GPT-2's <|endoftext|>; smaller ones lack it
    hf.update(bos_token_id=eot, eos_token_id=eot)
    with storage.local_folder(folder, upload_on_error=False) as local:  # a bucket: uploaded
        Path(local, "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        _require("safetensors.numpy").save_file(state, os.path.join(local, "model.safetensors"),
                                                metadata={"format": "pt"})
    return storage.path(folder)


# --- nanoGPT ---

def _torch_load(path: Path):
    """torch.load that only unpickles tensors and plain containers, so it runs no code."""
    torch = _require("torch")
    try:
        source = io.BytesIO(path.read_bytes()) if storage.is_remote(path) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = ("it holds Python objects other than tensors, which are not loaded because "
                      "unpickling them could run code")
        raise CheckpointError(f"refusing or unable to load {path}: {reason}") from None


def _numpy_state(state: dict) -> dict[str, np.ndarray]:
    """A torch state dict as float32 numpy arrays, without the attention-mask buffers."""
    return {k: v.float().numpy() for k, v in state.items() if not _BUFFER.search(k)}


def load_nanogpt(ckpt_path: str | Path, *, dtype: str | None = None,
                 param_dtype: str = "float32") -> tuple[GPTConfig, dict]:
    """A nanoGPT `ckpt.pt` ({"model_args": ..., "model": state dict}) -> (config, params).

    nanoGPT's MLP uses exact erf GELU, hence gelu_approximate=False.
    """
    ckpt_path = storage.path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no nanoGPT checkpoint at {ckpt_path}")
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not {"model_args", "model"} <= ckpt.keys():
        raise CheckpointError(f"{ckpt_path} is not a nanoGPT checkpoint: it lacks 'model_args' or "
                              "'model'")
    args = ckpt["model_args"]
    config = GPTConfig(block_size=args["block_size"], vocab_size=args["vocab_size"],
                       n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                       dropout=args.get("dropout", 0.0), bias=args["bias"], gelu_approximate=False,
                       dtype=dtype or GPTConfig.dtype, param_dtype=param_dtype)
    return config, _from_torch(_numpy_state(ckpt["model"]), config, linear=True,
                               source=str(ckpt_path))


def save_nanogpt(params, config: GPTConfig, path: str | Path) -> storage.Path:
    """Write a nanoGPT `ckpt.pt` ({"model_args", "model"}, float32) that nanoGPT's sample.py
    loads."""
    torch = _require("torch")
    if config.gelu_approximate:
        warnings.warn("nanoGPT computes exact erf GELU; this model was trained with the tanh "
                      "approximation")
    state = {f"transformer.{k}": torch.from_numpy(v)
             for k, v in _to_torch(params, config, linear=True).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as in nanoGPT's state_dict()
    model_args = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                      block_size=config.block_size, bias=config.bias, vocab_size=config.vocab_size,
                      dropout=config.dropout)
    path = storage.path(path)
    if not storage.is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_output(path) as f:
        torch.save({"model": state, "model_args": model_args}, f)
    return path
