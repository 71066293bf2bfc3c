"""Next-token cross-entropy of the tied lm_head: plain, or a chunk of the sequence at a time.

The float32 logits of a whole batch, [B, T, V], are the largest buffer of a GPT-2 train step (an
[8, 1024, 50304] float32 tensor is 1.5 GiB). Here the head's matmul (in the compute dtype) and the
float32 log-softmax run over chunks of the sequence, [B, t, V] at a time, and the backward pass
recomputes each chunk's logits (a jax.custom_vjp), so that one chunk's logits are alive at a time.
The result equals `cross_entropy_loss(x @ wte.T, targets)` up to the rounding of the compute
dtype. A batch whose logits are small (B*T*V up to CHUNK_LOGITS, e.g. a character model) takes
that plain form instead: one chunk saves no memory, and recomputing it costs time
(docs/performance.md).
Shapes: B batch, T length, C n_embd, V vocab.
"""

import jax
import jax.numpy as jnp

# Logits per sequence in one chunk (t x V): GPT-2's 50304 tokens take chunks of 128 positions, a
# small vocabulary (characters) one chunk of the whole sequence.
CHUNK_LOGITS = 2**23


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32. logits: [B, T, V]; targets: [B, T], -1 ignored."""
    return _nll_sum(logits, targets) / jnp.maximum(jnp.sum(targets >= 0), 1)


def _nll_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits: [..., V] (log-softmax in float32); targets: [...], -1 ignored -> the summed negative
    log-likelihood of the valid targets, a float32 scalar."""
    valid = targets >= 0
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0))


def chunk_length(T: int, V: int, max_logits: int = CHUNK_LOGITS) -> int:
    """Positions per chunk: the largest divisor t of T with t * V <= max_logits (at least 1)."""
    return next((t for t in range(T, 0, -1) if T % t == 0 and t * V <= max_logits), 1)


def chunked(B: int, T: int, V: int) -> bool:
    """Whether head_cross_entropy splits a [B, T] batch over a V-token vocabulary into chunks."""
    return B * T * V > CHUNK_LOGITS


def head_cross_entropy(x: jax.Array, wte: jax.Array, targets: jax.Array, *, dtype=None,
                       chunk: int | None = None) -> jax.Array:
    """Mean next-token cross-entropy of the logits x @ wte.T in float32, never materializing them.

    x: [B, T, C] final hidden states (after ln_f); wte: [V, C] the tied token embedding; targets:
    [B, T] int, -1 ignored. dtype: the head matmul's dtype (default x's); log-softmax in float32.
    chunk: positions per chunk, a divisor of T (default: chunk_length(T, V); the plain form where
    `chunked` says no).
    """
    dtype = jnp.dtype(dtype or x.dtype)
    B, T, C = x.shape
    if chunk is None and not chunked(B, T, wte.shape[0]):
        return cross_entropy_loss(jnp.einsum("btc,vc->btv", x.astype(dtype), wte.astype(dtype)),
                                  targets)
    t = chunk or chunk_length(T, wte.shape[0])
    if T % t:
        raise ValueError(f"chunk={t} does not divide the sequence length {T}")
    # [K, B, t, ...]: chunks of the sequence, each keeping the (data-parallel) batch axis.
    split = lambda a: jnp.moveaxis(a.reshape(B, T // t, t, *a.shape[2:]), 1, 0)
    valid = targets >= 0
    nll_sum = _chunked_nll(split(x.astype(dtype)), wte, split(targets))
    return nll_sum / jnp.maximum(jnp.sum(valid), 1)


def _chunk_logprobs(x, w, targets):
    """x: [B, t, C], w: [V, C] -> float32 log-softmax [B, t, V] and the valid-target mask [B, t]."""
    logits = jnp.einsum("btc,vc->btv", x, w).astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1), targets >= 0


def _chunk_nll(x, w, targets):
    return _nll_sum(jnp.einsum("btc,vc->btv", x, w), targets)


@jax.custom_vjp
def _chunked_nll(xs, w, targets):
    """Summed NLL over chunks. xs: [K, B, t, C]; w: [V, C] (cast to xs' dtype once); targets:
    [K, B, t] -> float32 scalar."""
    w = w.astype(xs.dtype)
    return jax.lax.map(lambda a: _chunk_nll(a[0], w, a[1]), (xs, targets)).sum()


def _chunked_nll_fwd(xs, w, targets):
    return _chunked_nll(xs, w, targets), (xs, w, targets)


def _chunked_nll_bwd(residuals, g):
    xs, w_param, targets = residuals
    w = w_param.astype(xs.dtype)

    def chunk_grads(dw, inputs):
        x, y = inputs
        logprobs, valid = _chunk_logprobs(x, w, y)
        # d(sum nll)/d logits = softmax - onehot(target), on valid positions only
        dlogits = jnp.exp(logprobs) - jax.nn.one_hot(jnp.where(valid, y, 0), w.shape[0])
        dlogits = (jnp.where(valid[..., None], dlogits, 0.0) * g).astype(x.dtype)
        dx = jnp.einsum("btv,vc->btc", dlogits, w)
        dw = dw + jnp.einsum("btv,btc->vc", dlogits, x, preferred_element_type=jnp.float32)
        return dw, dx

    dw, dxs = jax.lax.scan(chunk_grads, jnp.zeros(w.shape, jnp.float32), (xs, targets))
    return dxs, dw.astype(w_param.dtype), None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
