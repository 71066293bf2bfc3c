"""The GPT-2 model: shapes, causality, attention paths, init, parameter count, loss, FLOPs."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.layer_stacking import convert_layers
from flaxgpt.loss import cross_entropy_loss
from flaxgpt.model import (GPT, GPTConfig, count_params, crop_block_size, gelu,
                           init_params, resolve_attention)
from flaxgpt.kv_cache import init_cache

TINY = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32)


def forward(config, params, x, **kwargs):
    """Jitted GPT(config).apply (eager linen is slow); kwargs: deterministic, rngs, cache, mask,
    ..."""
    return _forward(config, params, x, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("deterministic", "last_only"))
def _forward(config, params, x, deterministic=True, **kwargs):
    return GPT(config).apply({"params": params}, x, deterministic=deterministic, **kwargs)


def tokens(shape, vocab=TINY.vocab_size, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def test_logits_shape_and_dtype(params):
    logits = forward(TINY, params, tokens((3, 11)))
    chex.assert_shape(logits, (3, 11, TINY.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


def test_jit_matches_eager(params):
    x = tokens((1, 4))
    eager = GPT(TINY).apply({"params": params}, x)
    chex.assert_trees_all_close(forward(TINY, params, x), eager, atol=1e-5)


def test_causality(params):
    """Changing a future token never changes an earlier position's logits."""
    x = np.array(tokens((1, TINY.block_size)))
    base = forward(TINY, params, x)
    for t in (0, 5, TINY.block_size - 1):
        changed = x.copy()
        changed[0, t] = (changed[0, t] + 1) % TINY.vocab_size
        out = forward(TINY, params, changed)
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def test_sequence_longer_than_block_size_is_an_error(params):
    with pytest.raises(ValueError, match="block_size is only 16"):
        forward(TINY, params, tokens((1, TINY.block_size + 1)))


def test_dropout_path_matches_fused_attention_when_dropout_is_off():
    """The masked-softmax path (used for attention dropout) equals jax.nn.dot_product_attention."""
    config = TINY.replace(dropout=0.5)
    p = init_params(config, jax.random.key(1))
    x = tokens((2, 12))
    fused = forward(config, p, x, deterministic=True)
    masked = forward(config.replace(dropout=1e-9), p, x, deterministic=False,
                                                     rngs={"dropout": jax.random.key(0)})
    chex.assert_trees_all_close(masked, fused, atol=1e-5)


def test_dropout_is_random_in_training_and_off_in_eval():
    config = TINY.replace(dropout=0.2)
    p = init_params(config, jax.random.key(1))
    x = tokens((2, 12))
    run = lambda seed: forward(config, p, x, deterministic=False,
                               rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(run(0), run(1))
    chex.assert_trees_all_close(run(3), run(3))
    chex.assert_trees_all_close(forward(config, p, x), forward(TINY, p, x))


@functools.partial(jax.jit, static_argnums=0)
def decode(config, params, x, cache, positions, mask, cache_index):
    return GPT(config).apply({"params": params}, x, cache, positions=positions, mask=mask,
                             cache_index=cache_index, method=GPT.decode)


def test_exact_gelu_is_jax_and_torch_gelu_and_so_is_its_gradient():
    """The erf form (PyTorch's) agrees with jax.nn.gelu's erfc form, value and gradient, far into
    both tails (absolutely: far below 0 erf rounds to -1 in float32 and the erf form gives 0 where
    the erfc form keeps values under 6e-7), and PyTorch's nn.GELU to the same tolerance."""
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    reference = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(gelu(x, approximate=False), reference(x), rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(lambda v: gelu(v, approximate=False)))
    np.testing.assert_allclose(grad(x), jax.vmap(jax.grad(reference))(x), rtol=1e-6, atol=1e-6)
    exact_bf16 = gelu(x.astype(jnp.bfloat16), approximate=False).astype(jnp.float32)
    # no cancellation in the tail
    np.testing.assert_allclose(exact_bf16, reference(x), atol=2e-3, rtol=1e-2)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(gelu(x, approximate=False),
                               torch.nn.functional.gelu(torch.from_numpy(np.array(x))),
                               rtol=1e-6, atol=1e-6)


def test_cached_forward_matches_full_forward(params):
    """Prefill 5 tokens, then one token at a time through the cache: same logits as one full
    pass."""
    x = tokens((2, 9))
    full = forward(TINY, params, x)
    cache = init_cache(TINY, 2)
    slots = jnp.arange(TINY.block_size)
    mask = lambda start, n: (slots[None, :] <= start + jnp.arange(n)[:, None])[None].repeat(2, 0)
    logits, cache = decode(TINY, params, x[:, :5], cache, jnp.arange(5)[None].repeat(2, 0),
                           mask(0, 5), 0)
    pieces = [logits]  # decode returns the last position's logits
    for t in range(5, 9):
        logits, cache = decode(TINY, params, x[:, t:t + 1], cache, jnp.full((2, 1), t),
                               mask(t, 1), t)
        pieces.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full[:, 4:], atol=1e-5)


def test_gpt2_parameter_count():
    """GPT-2 124M at its vocabulary of 50257: 124,439,808 parameters, the tied lm_head counted
    once."""
    config = GPTConfig.from_preset("gpt2")
    shapes = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
    assert count_params(shapes, non_embedding=False) == 124_439_808
    assert count_params(shapes) == 124_439_808 - 1024 * 768


def test_presets_and_config_errors():
    assert GPTConfig.from_preset("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="cudnn"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        GPTConfig(attention="cudnn")
    assert GPTConfig(attention="cudnn", dtype="bfloat16").attention == "cudnn"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_nanogpt_initialisation(scan_layers):
    """normal(0.02) weights, zero biases, unit LayerNorm scales, residual projections
    0.02/sqrt(2L)."""
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=128,
                       scan_layers=scan_layers)
    p = convert_layers(init_params(config, jax.random.key(0)), scan_layers=False)
    std = lambda a: float(np.std(np.asarray(a)))
    assert std(p["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert std(p["h_0"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / np.sqrt(2 * config.n_layer)
    assert std(p["h_0"]["attn"]["c_proj"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert std(p["h_3"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert not np.any(p["h_1"]["attn"]["c_attn"]["bias"])
    np.testing.assert_array_equal(p["ln_f"]["scale"], 1.0)


def test_no_bias_model_has_no_bias_parameters():
    p = init_params(TINY.replace(bias=False), jax.random.key(0))
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)]
    assert not [path for path in paths if "bias" in path]


def test_bfloat16_compute_keeps_float32_params_and_loss():
    config = TINY.replace(dtype="bfloat16")
    p = init_params(config, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
    x = tokens((2, 8))
    logits = forward(config, p, x)
    assert logits.dtype == jnp.bfloat16
    loss = cross_entropy_loss(logits, x)
    assert loss.dtype == jnp.float32
    full = cross_entropy_loss(forward(TINY, p, x), x)
    assert float(loss) == pytest.approx(float(full), rel=2e-2)


def test_cross_entropy_ignores_minus_one():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, -1, 4], [-1, -1, 0]])
    logp = jax.nn.log_softmax(logits)
    expected = -(logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 2, 0]) / 3
    assert float(cross_entropy_loss(logits, targets)) == pytest.approx(float(expected), rel=1e-6)


def test_uniform_logits_give_log_vocab_loss():
    logits = jnp.zeros((1, 4, 50))
    assert (float(cross_entropy_loss(logits, jnp.array([[1, 2, 3, 4]])))
            == pytest.approx(np.log(50), rel=1e-6))


def test_crop_block_size(params):
    cropped, config = crop_block_size(params, TINY, 8)
    assert config.block_size == 8 and cropped["wpe"]["embedding"].shape == (8, TINY.n_embd)
    x = tokens((1, 8))
    chex.assert_trees_all_close(forward(config, cropped, x), forward(TINY, params, x))
    with pytest.raises(ValueError):
        crop_block_size(params, TINY, 32)


def test_flops_per_token_is_nanogpts_formula():
    from flaxgpt.mfu import flops_per_token
    config = GPTConfig.from_preset("gpt2")
    n = 85_000_000
    assert flops_per_token(config, n) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_last_only_logits_equal_the_last_row(params):
    x = tokens((2, 9))
    last, no_cache = GPT(TINY).apply({"params": params}, x, last_only=True, method=GPT.forward)
    assert no_cache is None
    chex.assert_shape(last, (2, 1, TINY.vocab_size))
    chex.assert_trees_all_close(last, forward(TINY, params, x)[:, -1:], atol=1e-6)


# ------------------------------------------------------------------ scanned layers, remat, splash

def test_scanned_and_unscanned_layouts_convert_both_ways_and_give_the_same_logits():
    params = init_params(TINY, jax.random.key(0))
    assert params["h"]["attn"]["c_attn"]["kernel"].shape == (TINY.n_layer, 32, 3, 4, 8)
    unscanned = convert_layers(params, scan_layers=False)
    assert sorted(k for k in unscanned if k.startswith("h")) == ["h_0", "h_1"]
    chex.assert_trees_all_equal(convert_layers(unscanned, scan_layers=True), params)
    assert count_params(unscanned) == count_params(params)
    x = tokens((2, TINY.block_size))
    np.testing.assert_allclose(GPT(TINY.replace(scan_layers=False)).apply({"params": unscanned}, x),
                               GPT(TINY).apply({"params": params}, x), atol=1e-5, rtol=0)


def test_scanned_and_unscanned_training_give_the_same_losses():
    """Three AdamW steps (2 micro-batches each) on both layouts from the same weights."""
    import optax
    from flaxgpt import sharding
    from flaxgpt.train_step import TrainStep
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    params = init_params(TINY, jax.random.key(0))
    data = [tokens((2, 4, TINY.block_size), seed=s) for s in range(3)]
    losses = {}
    for scan_layers in (True, False):
        train_step = TrainStep(TINY.replace(scan_layers=scan_layers), optax.adamw(1e-2), mesh)
        state = train_step.state_from_params(convert_layers(params, scan_layers))
        losses[scan_layers] = []
        for x in data:
            state, metrics = train_step.train_fn(state, x, x)
            losses[scan_layers].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[False], losses[True], rtol=1e-5)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_gradients_as_none(remat, scan_layers):
    config = TINY.replace(scan_layers=scan_layers)
    params = convert_layers(init_params(TINY, jax.random.key(0)), scan_layers)
    x = tokens((2, TINY.block_size))
    grad = lambda c: jax.jit(jax.grad(
        lambda p: cross_entropy_loss(GPT(c).apply({"params": p}, x), x)))(params)
    chex.assert_trees_all_close(grad(config.replace(remat=remat)), grad(config),
                                atol=1e-6, rtol=1e-5)


def test_unknown_remat_and_unsupported_splash_shapes_are_errors():
    with pytest.raises(ValueError, match="remat='some'"):
        GPTConfig(remat="some")
    with pytest.raises(ValueError, match="multiple of 128"):
        GPTConfig(block_size=100, attention="splash")


def test_auto_attention_resolves_per_platform():
    config = GPTConfig(n_head=12, n_embd=768, block_size=1024)
    assert resolve_attention(config, "tpu") == "splash"
    # the kernel's 128-token tiles
    assert resolve_attention(config.replace(block_size=100), "tpu") == "xla"
    assert resolve_attention(config, "gpu") == "xla"  # float32: cuDNN needs bfloat16/float16
    assert resolve_attention(config.replace(dtype="bfloat16"), "gpu") == "cudnn"
    assert resolve_attention(config, "cpu") == "xla"
    assert resolve_attention(config.replace(attention="xla"), "tpu") == "xla"


def test_splash_attention_matches_xla_in_interpret_mode():
    """The Pallas kernel, interpreted on CPU: logits and gradients equal XLA attention's."""
    from flaxgpt import splash
    config = GPTConfig(block_size=128, vocab_size=37, n_layer=1, n_head=2, n_embd=128)
    params = init_params(config, jax.random.key(0))
    x = tokens((2, 128))
    loss = lambda c: lambda p: cross_entropy_loss(GPT(c).apply({"params": p}, x), x)
    token = splash.INTERPRET.set(True)
    try:
        splash_loss, splash_grads = jax.value_and_grad(
            loss(config.replace(attention="splash")))(params)
    finally:
        splash.INTERPRET.reset(token)
    xla_loss, xla_grads = jax.value_and_grad(loss(config.replace(attention="xla")))(params)
    np.testing.assert_allclose(splash_loss, xla_loss, rtol=1e-5)
    chex.assert_trees_all_close(splash_grads, xla_grads, atol=1e-6, rtol=1e-4)


def test_config_is_the_model_alone_and_round_trips_through_its_dict():
    config = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=32,
                       dtype="bfloat16")
    assert (config.to_dict() == dataclasses.asdict(config)
            and GPTConfig(**config.to_dict()) == config)
    assert not {"kernel_layout", "decoding"} & config.to_dict().keys()
