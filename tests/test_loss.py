"""The chunked head + cross-entropy equals the plain one (logits of the whole batch), values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.loss import chunk_length, head_cross_entropy
from flaxgpt.model import cross_entropy_loss


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
    ("float32", 4, 1e-5), ("float32", 5, 1e-5), ("float32", 128, 1e-5), ("bfloat16", 4, 2e-2)])
def test_chunked_loss_and_grads_equal_the_plain_ones(dtype, chunk, tolerance):
    x, wte, targets = inputs()
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


def test_chunk_length_divides_the_sequence():
    assert [chunk_length(T, 128) for T in (1, 64, 128, 1024, 1000, 257)] == [1, 64, 128, 128, 125, 1]
