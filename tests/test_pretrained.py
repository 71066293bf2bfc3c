"""Import/export of GPT-2 weights against PyTorch: transformers' GPT2LMHeadModel and nanoGPT
checkpoints."""

import functools
import json
import logging
import os
import subprocess
import sys
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from flaxgpt import pretrained  # noqa: E402
from flaxgpt.loss import cross_entropy_loss  # noqa: E402
from flaxgpt.model import GPT, GPTConfig, init_params  # noqa: E402

# Small GPT-2s with awkward sizes: vocab not a multiple of 64, 3 heads, block not a power of two,
# erf GELU.
HF_CONFIGS = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=128),
    "odd": dict(n_layer=3, n_head=3, n_embd=24, n_positions=48, vocab_size=101),
    "erf_gelu": dict(n_layer=1, n_head=2, n_embd=16, n_positions=40, vocab_size=77,
                     activation_function="gelu"),
}
ODD = GPTConfig(block_size=48, vocab_size=101, n_layer=3, n_head=3, n_embd=24)  # HF_CONFIGS["odd"]
NANO_CHAR = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=32, bias=False,
                      gelu_approximate=False, dropout=0.2)  # shakespeare_char-like, much smaller


def hf_model(**kwargs) -> "transformers.GPT2LMHeadModel":
    """A random GPT2LMHeadModel in eval mode, every parameter perturbed (so biases and LayerNorms
    matter)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**kwargs, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(config: GPTConfig, seed=0):
    """Full-length tokens and targets [2, block_size], a few targets ignored (-1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (2, config.block_size))
    targets = np.where(rng.random(tokens.shape) < 0.1, -1, np.roll(tokens, -1, axis=1))
    return tokens, targets


@functools.partial(jax.jit, static_argnums=0)
def flax_logits(config, params, tokens):
    return GPT(config).apply({"params": params}, tokens)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def openai_bin_state(model):
    """The state dict as OpenAI's original pytorch_model.bin: no `transformer.` prefix, mask
    buffers, no lm_head."""
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    T = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T, dtype=torch.uint8)).view(1, 1, T, T)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_loss_match_transformers(tmp_path, name, weights):
    model = hf_model(**HF_CONFIGS[name])
    if weights == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        model.config.to_json_file(tmp_path / "config.json")
        torch.save(openai_bin_state(model), tmp_path / "pytorch_model.bin")
    config, params = pretrained.load_pretrained(tmp_path)

    hf = HF_CONFIGS[name]
    assert config == GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
        gelu_approximate=hf.get("activation_function", "gelu_new") == "gelu_new")
    tokens, targets = batch(config)
    expected = torch_logits(model, tokens)
    logits = flax_logits(config, params, tokens)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-5)
    expected_loss = torch.nn.functional.cross_entropy(
        torch.as_tensor(expected).flatten(0, 1), torch.as_tensor(targets).flatten(),
        ignore_index=-1)
    np.testing.assert_allclose(cross_entropy_loss(logits, jnp.asarray(targets)), expected_loss,
                               rtol=1e-5)


def test_dtypes(tmp_path):
    hf_model(**HF_CONFIGS["odd"]).save_pretrained(tmp_path)
    config, params = pretrained.load_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert (config.dtype, config.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def random_params(config, seed=0):
    """Random params of the model's shapes (noisy LayerNorm scales around 1, nonzero biases), drawn
    by numpy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((path[-1].key == "scale") + rng.normal(0, 0.1, x.shape),
                                    x.dtype),
        shapes)


@pytest.mark.parametrize("gelu_approximate", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, gelu_approximate, caplog, monkeypatch):
    config = ODD.replace(gelu_approximate=gelu_approximate)
    params = random_params(config)
    pretrained.save_pretrained(params, config, tmp_path)

    # let caplog see its warnings
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path,
                                                                   output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    model.eval()
    assert model.config.activation_function == ("gelu_new" if gelu_approximate else "gelu")
    tokens, _ = batch(config)
    np.testing.assert_allclose(torch_logits(model, tokens), flax_logits(config, params, tokens),
                               rtol=0, atol=2e-5)

    loaded_config, loaded = pretrained.load_pretrained(tmp_path)
    assert loaded_config == config
    chex.assert_trees_all_equal(loaded, params)


def test_save_pretrained_cuts_padded_vocab(tmp_path):
    config = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    params = random_params(config)
    pretrained.save_pretrained(params, config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 50257
    loaded_config, loaded = pretrained.load_pretrained(tmp_path)
    assert loaded_config == config.replace(vocab_size=50257)
    chex.assert_trees_all_equal(
        loaded, {**params, "wte": {"embedding": params["wte"]["embedding"][:50257]}})


def test_save_pretrained_refuses_bias_free_models(tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        pretrained.save_pretrained(random_params(NANO_CHAR), NANO_CHAR, tmp_path)


@pytest.mark.parametrize("config", [NANO_CHAR, ODD.replace(gelu_approximate=False)],
                         ids=["bias_free", "bias"])
def test_nanogpt_round_trip(tmp_path, config):
    params = random_params(config)
    pretrained.save_nanogpt(params, config, tmp_path / "out" / "ckpt.pt")
    loaded_config, loaded = pretrained.load_nanogpt(tmp_path / "out" / "ckpt.pt")
    assert loaded_config == config
    chex.assert_trees_all_equal(loaded, params)


def test_both_formats_save_into_a_bucket(tmp_path, gcs_dir, monkeypatch):
    """Through storage, not pathlib: nothing named gs: appears in the working directory."""
    monkeypatch.chdir(tmp_path)
    config = ODD.replace(gelu_approximate=False)
    params = random_params(config)
    pretrained.save_nanogpt(params, config, f"{gcs_dir}/nanogpt/ckpt.pt")
    pretrained.save_pretrained(params, config, f"{gcs_dir}/hf")
    for loaded_config, loaded in (pretrained.load_nanogpt(f"{gcs_dir}/nanogpt/ckpt.pt"),
                                  pretrained.load_pretrained(f"{gcs_dir}/hf")):
        assert loaded_config == config
        chex.assert_trees_all_equal(loaded, params)
    assert os.listdir(tmp_path) == []


def test_nanogpt_checkpoint_of_compiled_model(tmp_path):
    """A nanoGPT ckpt.pt as train.py writes it after torch.compile: `_orig_mod.` keys, (out, in)
    Linear weights."""
    model = hf_model(**HF_CONFIGS["odd"], activation_function="gelu")
    model.save_pretrained(tmp_path / "hf")
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF's Conv1D stores (in, out)
    state = {f"_orig_mod.{k}": v.t().contiguous() if k.endswith(conv1d) else v
             for k, v in model.state_dict().items()}
    hf = HF_CONFIGS["odd"]
    # the causal mask nanoGPT registers when it has no flash attention
    for i in range(hf["n_layer"]):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = (
            torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48))
    model_args = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                      block_size=hf["n_positions"], bias=True, vocab_size=hf["vocab_size"],
                      dropout=0.0)
    torch.save({"model": state, "model_args": model_args, "iter_num": 5000,
                "best_val_loss": torch.tensor(1.47), "config": {"dataset": "shakespeare_char"}},
               tmp_path / "ckpt.pt")

    config, params = pretrained.load_nanogpt(tmp_path / "ckpt.pt")
    assert not config.gelu_approximate
    hf_config, hf_params = pretrained.load_pretrained(tmp_path / "hf")
    assert config == hf_config
    chex.assert_trees_all_equal(params, hf_params)


# --- Errors ---

def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl.*folder"):
        pretrained.load_pretrained("gpt3")


def test_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks config.json and model.safetensors"):
        pretrained.load_pretrained(tmp_path)
    hf_model(**HF_CONFIGS["tiny"]).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError,
                       match="lacks model.safetensors \\(or pytorch_model.bin\\)"):
        pretrained.load_pretrained(tmp_path)


@pytest.fixture
def hf_folder(tmp_path):
    hf_model(**HF_CONFIGS["tiny"]).save_pretrained(tmp_path)
    return tmp_path


def edit_weights(folder, edit):
    state = safetensors_numpy.load_file(folder / "model.safetensors")
    edit(state)
    safetensors_numpy.save_file(state, folder / "model.safetensors")


def test_wrong_shape_names_key_and_shapes(hf_folder):
    edit_weights(hf_folder, lambda s: s.update(
        {"transformer.h.1.mlp.c_fc.weight": np.zeros((32, 100), np.float32)}))
    with pytest.raises(pretrained.CheckpointError,
                       match=r"h\.1\.mlp\.c_fc\.weight has shape \[32, 100\], "
                             r"the model expects \[32, 128\]"):
        pretrained.load_pretrained(hf_folder)


def test_missing_and_unexpected_keys(hf_folder):
    def edit(state):
        del state["transformer.ln_f.bias"]
        state["transformer.h.0.attn.q_proj.weight"] = np.zeros((32, 32), np.float32)

    edit_weights(hf_folder, edit)
    with pytest.raises(pretrained.CheckpointError,
                       match=r"missing ln_f\.bias \[32\].*"
                             r"unexpected h\.0\.attn\.q_proj\.weight \[32, 32\]"):
        pretrained.load_pretrained(hf_folder)


def test_untied_lm_head_is_refused(hf_folder):
    edit_weights(hf_folder, lambda s: s.update({"lm_head.weight": np.zeros((128, 32), np.float32)}))
    with pytest.raises(pretrained.CheckpointError, match="untied"):
        pretrained.load_pretrained(hf_folder)


def test_unsupported_config(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    with pytest.raises(ValueError, match="layer_norm_epsilon=1e-06"):
        pretrained.load_pretrained(hf_folder)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty HF cache and an unreachable Hub, offline mode off; returns the cache folder.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when it is imported, so setting the environment
    variables here would change nothing: patch its constants instead.
    """
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # refused at once, even with a network
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    # skip huggingface_hub's retry back-off
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    return tmp_path / "hub"


@pytest.mark.parametrize("offline", [True, False])
def test_no_network_says_how_to_work_offline(no_hub, monkeypatch, offline):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(RuntimeError) as error:
        pretrained.load_pretrained("gpt2")
    message = str(error.value)
    assert ("HF_HUB_OFFLINE is set" if offline
            else "the Hugging Face Hub is unreachable") in message
    assert "pass that folder's path" in message and "HF cache" in message and "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hub_name_from_the_hf_cache(no_hub, monkeypatch, offline, weights):
    """`load_pretrained("gpt2")` without a network finds a (here: tiny) gpt2 in the HF cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    commit = "0" * 40
    snapshot = no_hub / "models--gpt2" / "snapshots" / commit
    model = hf_model(**HF_CONFIGS["tiny"])
    model.save_pretrained(snapshot)
    if weights == "pytorch_model.bin":
        (snapshot / "model.safetensors").unlink()
        torch.save(openai_bin_state(model), snapshot / weights)
    (no_hub / "models--gpt2" / "refs").mkdir()
    (no_hub / "models--gpt2" / "refs" / "main").write_text(commit)
    config, params = pretrained.load_pretrained("gpt2")
    expected_config, expected_params = pretrained.load_pretrained(snapshot)
    assert config == expected_config
    chex.assert_trees_all_equal(params, expected_params)


def test_optional_dependencies_are_imported_lazily(monkeypatch):
    """`import flaxgpt` works without the [hf] extras; using them without says what to install."""
    optional = "{'torch', 'transformers', 'huggingface_hub', 'safetensors'}"
    code = f"import sys, flaxgpt; print(sorted({optional} & set(sys.modules)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True)
    assert run.stdout == "[]\n"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'flaxgpt\[hf\]'"):
        pretrained.load_pretrained("gpt2")
