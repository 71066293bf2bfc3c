"""Next-token cross-entropy of the tied lm_head: plain, or a chunk of the sequence at a time.

The float32 logits [B, T, V] are a GPT-2 train step's largest buffer (1.5 GiB at [8, 1024, 50304]).
The chunked form runs the head's matmul and the float32 log-softmax over [B, t, V] at a time, and
its backward pass recomputes each chunk's logits (a jax.custom_vjp), so one chunk's logits are
alive at a time. Small logits (B*T*V up to CHUNK_LOGITS, e.g. a character model) take the plain
form: one chunk saves no memory, and recomputing it costs time (docs/performance.md).
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
    """logits: [..., V]; targets: [...], -1 ignored -> the summed NLL, a float32 scalar."""
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
    """Mean float32 cross-entropy of the logits x @ wte.T without materializing them.

    x: [B, T, C] hidden states after ln_f; wte: [V, C]; targets: [B, T] int, -1 ignored. dtype: the
    head matmul's (default x's). chunk: positions per chunk, a divisor of T (default
    chunk_length(T, V); the plain form where `chunked` says no).
    """
    B, T, C = x.shape
    x = x.astype(dtype or x.dtype)
    if chunk is None and not chunked(B, T, wte.shape[0]):
        nll = _nll_sum(jnp.einsum("btc,vc->btv", x, wte.astype(x.dtype)), targets)
    else:
        t = chunk or chunk_length(T, wte.shape[0])
        if T % t:
            raise ValueError(f"chunk={t} does not divide the sequence length {T}")
        # [K, B, t, ...]: chunks of the sequence, each keeping the (data-parallel) batch axis.
        split = lambda a: jnp.moveaxis(a.reshape(B, T // t, t, *a.shape[2:]), 1, 0)
        nll = _chunked_nll(split(x), wte, split(targets))
    return nll / jnp.maximum(jnp.sum(targets >= 0), 1)


@jax.custom_vjp
def _chunked_nll(xs, w, targets):
    """Summed NLL over chunks. xs: [K, B, t, C]; w: [V, C] (cast to xs' dtype once); targets:
    [K, B, t] -> float32 scalar."""
    w = w.astype(xs.dtype)
    return jax.lax.map(lambda a: _nll_sum(jnp.einsum("btc,vc->btv", a[0], w), a[1]),
                       (xs, targets)).sum()


def _chunked_nll_bwd(residuals, g):
    xs, w_param, targets = residuals
    w = w_param.astype(xs.dtype)

    def chunk_grads(dw, inputs):
        x, y = inputs
        logprobs = jax.nn.log_softmax(jnp.einsum("btc,vc->btv", x, w).astype(jnp.float32), axis=-1)
        valid = y >= 0
        # d(sum nll)/d logits = softmax - onehot(target), on valid positions only
        dlogits = jnp.exp(logprobs) - jax.nn.one_hot(jnp.where(valid, y, 0), w.shape[0])
        dlogits = (jnp.where(valid[..., None], dlogits, 0.0) * g).astype(x.dtype)
        dw = dw + jnp.einsum("btv,btc->vc", dlogits, x, preferred_element_type=jnp.float32)
        return dw, jnp.einsum("btv,vc->btc", dlogits, w)

    dw, dxs = jax.lax.scan(chunk_grads, jnp.zeros(w.shape, jnp.float32), (xs, targets))
    return dxs, dw.astype(w_param.dtype), None


_chunked_nll.defvjp(lambda xs, w, targets: (_chunked_nll(xs, w, targets), (xs, w, targets)),
                    _chunked_nll_bwd)
