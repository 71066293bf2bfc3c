"""The chunked head + cross-entropy equals the plain one (whole-batch logits): values and grads;
which of the two head_cross_entropy takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt import loss as loss_lib
from flaxgpt.loss import chunk_length, chunked, head_cross_entropy
from flaxgpt.loss import cross_entropy_loss


def plain(x, wte, targets, dtype):
    logits = jnp.einsum("btc,vc->btv", x.astype(dtype), wte.astype(dtype))
    return cross_entropy_loss(logits, targets)


def inputs(B=3, T=12, C=16, V=37, seed=0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (B, T, C))
    wte = 0.3 * jax.random.normal(kw, (V, C))
    targets = jax.random.randint(ky, (B, T), 0, V).at[0, :5].set(-1).at[2, -1].set(-1)
    return x, wte, targets


@pytest.mark.parametrize("dtype, chunk, tolerance", [
    ("float32", 4, 1e-5), ("float32", 1, 1e-5), (None, None, 1e-5), ("bfloat16", 4, 2e-2)])
def test_chunked_loss_and_grads_equal_the_plain_ones(dtype, chunk, tolerance):
    x, wte, targets = inputs()
    dtype = dtype or "float32"
    x = x.astype(dtype)
    chunked = lambda x, w: head_cross_entropy(x, w, targets, dtype=dtype, chunk=chunk)
    expected = lambda x, w: plain(x, w, targets, dtype)
    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(x, wte)
    want, want_grads = jax.jit(jax.value_and_grad(expected, argnums=(0, 1)))(x, wte)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-6 if dtype == "float32" else 1e-3)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = np.abs(np.asarray(w, np.float32)).max()
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=tolerance * scale)
    assert float(jnp.abs(grads[1]).max()) > 0


def test_all_ignored_targets_give_zero_loss_and_grads():
    x, wte, targets = inputs()
    loss_fn = lambda x, w: head_cross_entropy(x, w, jnp.full_like(targets, -1), chunk=4)
    loss, (gx, gw) = jax.value_and_grad(loss_fn, argnums=(0, 1))(x, wte)
    assert loss == 0 and not jnp.any(gx) and not jnp.any(gw)


def test_chunks_divide_the_sequence_and_bound_the_logits():
    assert chunk_length(1024, 50304) == 128 and chunk_length(256, 65) == 256
    assert [chunk_length(T, 1000, 10_000) for T in (1, 7, 10, 24, 1000)] == [1, 7, 10, 8, 10]
    x, wte, targets = inputs()
    with pytest.raises(ValueError, match="does not divide"):
        head_cross_entropy(x, wte, targets, chunk=5)


def test_small_logits_take_the_plain_form_and_large_ones_chunks(monkeypatch):
    assert not chunked(12, 64, 65) and chunked(8, 1024, 50304)  # the README CPU model; GPT-2
    x, wte, targets = inputs()
    loss_fn = jax.jit(jax.value_and_grad(lambda x, w: head_cross_entropy(x, w, targets),
                                         argnums=(0, 1)))
    jaxpr = lambda: str(jax.make_jaxpr(lambda *a: head_cross_entropy(*a))(x, wte, targets))
    assert "custom_vjp" not in jaxpr()
    loss, grads = loss_fn(x, wte)
    monkeypatch.setattr(loss_lib, "CHUNK_LOGITS", wte.shape[0])
    assert chunked(*targets.shape, wte.shape[0]) and "custom_vjp" in jaxpr()
    loss_fn = jax.jit(jax.value_and_grad(lambda x, w: head_cross_entropy(x, w, targets),
                                         argnums=(0, 1)))
    chunked_loss, chunked_grads = loss_fn(x, wte)
    np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
    for g, want in zip(chunked_grads, grads):
        np.testing.assert_allclose(g, want, atol=1e-5 * float(jnp.abs(want).max()))
