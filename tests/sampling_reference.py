"""nanoGPT's sampling algorithm, the reference that flaxgpt's `generate` is tested against (a helper
of the tests, not part of the package): for every new token, a full causal forward over the context
cropped to its last block_size tokens (no cache)."""

import functools

import jax
import jax.numpy as jnp

from flaxgpt.generate import Sampler, checked_prompt, make_sampler
from flaxgpt.model import GPT, GPTConfig


@functools.partial(jax.jit, static_argnames="config", donate_argnames="tokens")
def _naive_step(params, config: GPTConfig, sampler: Sampler, tokens, valid, start, length, step,
                rng):
    """tokens [B, W] holds `length` columns; append new token `step` after a full forward over its
    context, columns [start, length). One shape for every step: the forward covers the S columns
    from `start`; causal attention never looks past the last one, so the columns after it do not
    matter. valid [B, W] marks the real columns (left padding is not), or is None for nanoGPT's
    plain causal forward."""
    S = config.block_size
    context = jax.lax.dynamic_slice_in_dim(tokens, start, S, axis=1)
    padding = {}
    if valid is not None:  # never attended to; positions count the real columns from `start`
        real = jax.lax.dynamic_slice_in_dim(valid, start, S, axis=1)
        padding = dict(mask=real[:, None, :] & jnp.tril(jnp.ones((S, S), bool)),
                       positions=jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0))
    logits = GPT(config).apply({"params": params}, context, **padding)
    token = sampler(jnp.take(logits, length - start - 1, axis=1), jax.random.fold_in(rng, step))
    return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], length, axis=1)


def generate_naive(params, config: GPTConfig, prompt, *, max_new_tokens: int, rng: jax.Array,
                   temperature=1.0, top_k: int | None = None, top_p: float | None = None,
                   prompt_mask=None, window_shift: int = 1) -> jax.Array:
    """nanoGPT's GPT.generate, the reference: for every new token a full causal forward over its
    context (compiled once, as a forward of block_size tokens). prompt [B, T0] -> new tokens [B, N],
    sampled with the same random keys as `generate`, under its window_shift policy: the context runs
    from a window start that jumps window_shift columns ahead whenever the context would exceed
    block_size (1: nanoGPT's crop). prompt_mask: as in `generate` (the window counts the padding
    columns too); None runs nanoGPT's forward."""
    sampler = make_sampler(temperature, top_k, top_p)
    padded = prompt_mask is not None
    prompt, prompt_mask = checked_prompt(config, prompt, prompt_mask, window_shift)
    (B, T0), S = prompt.shape, config.block_size  # one buffer shape for every prompt length T0 <= S
    tokens = jnp.zeros((B, 2 * S + max_new_tokens), jnp.int32).at[:, :T0].set(prompt)
    valid = jnp.ones(tokens.shape, bool).at[:, :T0].set(prompt_mask) if padded else None
    start = 0  # the context of new token `step` is columns [start, T0 + step)
    for step in range(max_new_tokens):
        if T0 + step - start > S:
            start += window_shift
        tokens = _naive_step(params, config, sampler, tokens, valid, start, T0 + step, step, rng)
    return tokens[:, T0:T0 + max_new_tokens]
