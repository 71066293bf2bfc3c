"""Sampling: KV-cached decoding compiled into one loop (`generate`) and the same steps one at a time
(`generate_stream`); nanoGPT's algorithm, the reference they are tested against, is in sampling_reference.py.

Shapes: B batch, T0 prompt length, S = block_size (cache slots), V vocab, N = max_new_tokens.

The cache holds the last (up to) S tokens of each row's context: `window[b, s]` is the token whose keys
and values sit in slot s, and `valid[b, s]` says whether it is a real one (left padding is not). The
prompt is prefilled in one forward pass; each new token then goes into the next free slot and attends to
the cache. Once all S slots are full, the oldest window_shift (k) tokens are dropped and the rest, with the new
token, are prefilled again as a fresh cache: with learned absolute positions every kept token's position changes.

k = 1 is nanoGPT's crop to the last S tokens: past block_size every token sees exactly S tokens of context, but
costs a full forward over S tokens. A larger k (e.g. S // 2) runs one forward over S - k + 1 tokens, then k - 1
cheap cached steps; the price is that past block_size a token sees between S - k + 1 and S tokens of context.
With left padding the window counts columns, padding included (as sampling_reference.generate_naive with a prompt_mask does).
"""

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxgpt.model import (GPT, GPTConfig, LayerCache, convert_layers, init_cache, is_scanned, kernel_layout_of,
                           kernels_in_layout)


@struct.dataclass
class Sampler:
    """How the next token is picked. temperature is traced (changing it does not recompile); top_k,
    top_p and stop_token change the program and are static."""
    temperature: float | jax.Array = 1.0
    top_k: int | None = struct.field(pytree_node=False, default=None)
    top_p: float | None = struct.field(pytree_node=False, default=None)
    stop_token: int | None = struct.field(pytree_node=False, default=None)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits [B, V] -> tokens [B] int32: divide by temperature, keep the top_k most likely tokens,
        then the fewest most likely ones whose probabilities sum to top_p, and sample; temperature 0 is
        argmax. Ties at a cut-off are kept, as in nanoGPT."""
        logits = logits.astype(jnp.float32)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampling = self.temperature > 0
        # Greedy decoding skips the random draws and filters (a cond, as temperature is traced).
        return jax.lax.cond(jnp.any(sampling), lambda: jnp.where(sampling, self._sample(logits, rng), greedy),
                            lambda: greedy)

    def _sample(self, logits, rng):
        logits = logits / jnp.where(self.temperature > 0, self.temperature, 1.0)
        if self.top_k is not None and self.top_k < logits.shape[-1]:  # else it keeps them all: no filter
            # The k-th largest as the min of the top k: XLA:CPU turns a sliced top_k into a full sort (50x slower).
            kth = jnp.min(jax.lax.top_k(logits, self.top_k)[0], axis=-1, keepdims=True)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None:
            descending = -jnp.sort(-logits, axis=-1)
            probs = jax.nn.softmax(descending, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the more likely tokens
            n_keep = jnp.sum(mass_before < self.top_p, axis=-1, keepdims=True)  # >= 1
            cutoff = jnp.take_along_axis(descending, n_keep - 1, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    cache: LayerCache | list[LayerCache]  # see model.init_cache
    window: jax.Array  # [B, S] int32: the token in each cache slot
    valid: jax.Array  # [B, S] bool: the slot holds a real token (not padding, not yet written)
    length: jax.Array  # () int32: slots written so far (S - window_shift + 1 after a slide)
    token: jax.Array  # [B] int32: the latest new token, not yet in the cache
    position: jax.Array  # [B] int32: the position id `token` will get (the real tokens in the cache before it)
    done: jax.Array  # [B] bool: the row has emitted stop_token
    step: jax.Array  # () int32: index of `token` among the new tokens


def _cache_sizes(config: GPTConfig) -> list[int]:
    """The cache sizes `generate` steps through: block_size // 8, // 4, // 2 (those of 64 slots or more) and
    block_size. A step reads its whole cache, so short contexts keep a short one; each size is one more
    copy of the decoding step in the compiled loop."""
    S = config.block_size
    return sorted({size for size in (S // 8, S // 4, S // 2) if size >= 64} | {S})


def _cache_size(config: GPTConfig, n: int) -> int:
    """The smallest of `_cache_sizes` that holds n tokens."""
    return next(size for size in _cache_sizes(config) if size >= n)


def _run(params, config: GPTConfig, cache, window, valid, index, length: int, positions=None):
    """Forward window[:, index:index+length] into cache slots [index, index+length); each query attends
    to the valid slots up to its own, positions count the valid slots before it (or are given, [B, length]).
    The cache may hold fewer slots (S') than the window: the first S'. -> (logits of the last query [B, V]
    float32, cache)."""
    slots = (cache if isinstance(cache, LayerCache) else cache[0]).slots
    tokens = jax.lax.dynamic_slice_in_dim(window, index, length, axis=1)
    if positions is None:
        positions = jax.lax.dynamic_slice_in_dim(jnp.cumsum(valid, axis=1) - 1, index, length, axis=1)
    query_slots = index + jnp.arange(length)
    mask = valid[:, None, :slots] & (jnp.arange(slots)[None, None, :] <= query_slots[None, :, None])  # [B, T, S']
    params, head = {k: v for k, v in params.items() if k != "lm_head"}, params.get("lm_head")
    logits, cache = GPT(config).apply({"params": params}, tokens, cache, positions=jnp.maximum(positions, 0),
                                      mask=mask, cache_index=index, head=head, method=GPT.decode)
    return logits[:, -1].astype(jnp.float32), cache


def make_sampler(temperature=1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_token: int | None = None) -> Sampler:
    """A Sampler from the user's settings; ValueError (naming the setting) for one that cannot work."""
    if np.any(np.asarray(temperature) < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampler(jnp.asarray(temperature, jnp.float32), top_k, top_p, stop_token)


def _next_token(sampler: Sampler, logits, rng, step, done):
    """The new token of `step` [B] and the updated done mask; a stopped row repeats stop_token."""
    token = sampler(logits, jax.random.fold_in(rng, step))
    if sampler.stop_token is None:
        return token, done
    token = jnp.where(done, sampler.stop_token, token)
    return token, done | (token == sampler.stop_token)


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _start(params, config: GPTConfig, sampler: Sampler, prompt, prompt_mask, rng, slots: int) -> DecodeState:
    """Prefill the prompt [B, T0 <= slots] in one pass into a cache of `slots` slots, sample the first new token."""
    (B, T0), S = prompt.shape, config.block_size
    window = jnp.zeros((B, S), jnp.int32).at[:, :T0].set(prompt)
    valid = jnp.zeros((B, S), bool).at[:, :T0].set(prompt_mask)
    logits, cache = _run(params, config, init_cache(config, B, slots), window, valid, 0, T0)
    step = jnp.int32(0)
    token, done = _next_token(sampler, logits, rng, step, jnp.zeros(B, bool))
    return DecodeState(cache, window, valid, jnp.int32(T0), token, jnp.sum(valid, axis=1, dtype=jnp.int32),
                       done, step)


def _append(params, config: GPTConfig, sampler: Sampler, rng, state: DecodeState) -> DecodeState:
    """A free slot is left in the cache: write the latest token there, attend to the cache, sample the next."""
    window = jax.lax.dynamic_update_slice_in_dim(state.window, state.token[:, None], state.length, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(state.valid, jnp.ones((len(window), 1), bool), state.length,
                                                axis=1)
    logits, cache = _run(params, config, state.cache, window, valid, state.length, 1, state.position[:, None])
    return _after_step(sampler, rng, state, logits, cache, window, valid, state.length + 1, state.position + 1)


def _slide(params, config: GPTConfig, sampler: Sampler, rng, state: DecodeState, window_shift: int,
           slots: int) -> DecodeState:
    """The cache is full: drop the oldest k tokens, prefill the rest and the latest token afresh from slot 0
    of a cache of `slots` slots, sample the next."""
    S, k = config.block_size, window_shift
    kept = S - k + 1  # k = 1: all S slots, nanoGPT's crop; else the next k - 1 steps append to the rest
    shift = lambda x, new: jnp.concatenate([x[:, k:], new, jnp.zeros_like(x[:, 1:k])], axis=1)
    window = shift(state.window, state.token[:, None])
    valid = shift(state.valid, jnp.ones_like(state.valid[:, :1]))
    cache = state.cache if slots == S else init_cache(config, len(window), slots)
    logits, cache = _run(params, config, cache, window, valid, 0, kept)
    return _after_step(sampler, rng, state, logits, cache, window, valid, jnp.int32(kept),
                    jnp.sum(valid, axis=1, dtype=jnp.int32))


def _after_step(sampler: Sampler, rng, state: DecodeState, logits, cache, window, valid, length,
             position) -> DecodeState:
    """The state after a step of `_append` or `_slide`: sample the next token from the logits."""
    step = state.step + 1
    token, done = _next_token(sampler, logits, rng, step, state.done)
    return DecodeState(cache, window, valid, length, token, position, done, step)


@functools.partial(jax.jit, static_argnames=("config", "window_shift"), donate_argnames="state")
def _advance(params, config: GPTConfig, sampler: Sampler, state: DecodeState, rng, window_shift: int):
    """Feed the latest token and sample the next: one step of `generate`, for streaming."""
    return jax.lax.cond(state.length < config.block_size,
                        lambda s: _append(params, config, sampler, rng, s),
                        lambda s: _slide(params, config, sampler, rng, s, window_shift, config.block_size), state)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "window_shift"))
def _generate(params, config: GPTConfig, sampler: Sampler, prompt, prompt_mask, rng, max_new_tokens: int,
              window_shift: int):
    """The steps of `_advance` as nested loops, so that no step branches on the (large) cache: cached
    appends while a slot is free, then one slide, then appends again, ... The cache starts with the
    fewest slots of `_cache_sizes` that hold the prompt and grows to the next size when full, one loop
    of appends per size; every slide starts it again as small as it can."""
    S, T0 = config.block_size, prompt.shape[1]
    state = _start(params, config, sampler, prompt, prompt_mask, rng, _cache_size(config, T0))
    fill = 0 if sampler.stop_token is None else sampler.stop_token
    out = jnp.full((len(prompt), max_new_tokens), fill, jnp.int32).at[:, 0].set(state.token)

    def not_finished(carry):
        state, _ = carry
        return (state.step + 1 < max_new_tokens) & ~jnp.all(state.done)

    def record(state, out):
        return state, jax.lax.dynamic_update_slice_in_dim(out, state.token[:, None], state.step, axis=1)

    def appends(carry, filled: int):  # from `filled` tokens, while a slot is free; ends with the full cache
        for slots in [size for size in _cache_sizes(config) if size >= _cache_size(config, filled)]:
            state, out = carry
            state = state._replace(cache=[layer.grow(slots) for layer in state.cache])
            carry = jax.lax.while_loop(lambda c: (c[0].length < slots) & not_finished(c),
                                       lambda c: record(_append(params, config, sampler, rng, c[0]), c[1]),
                                       (state, out))
        return carry

    kept = S - window_shift + 1

    def slide_then_appends(carry):
        state = _slide(params, config, sampler, rng, carry[0], window_shift, _cache_size(config, kept))
        return appends(record(state, carry[1]), kept)

    return jax.lax.while_loop(not_finished, slide_then_appends, appends((state, out), T0))[1]


def decoding_layout(params, config: GPTConfig, batch_size: int | None = None):
    """Params and config as cached decoding reads them: one block per layer (unscanned), the weights in the
    compute dtype (bfloat16 sampling reads half the bytes per token), params["lm_head"] = wte transposed,
    [C, V] (see GPT.decode), and for batch_size 1 on a CPU the blocks' kernels stored [out, in]
    (kernel_layout "out_in": GPT-2 at batch 1 11-17% more tokens/s, at batch 8 16% fewer; docs/sampling.md).

    `generate` and `generate_stream` call it on the params they get, with their batch size; params already
    laid out (this function's output in config.dtype) are used as they are, whatever batch size they were
    laid out for, so a caller that samples more than once lays the weights out once:
    `params, config = decoding_layout(params, config, batch_size)` first. Laying out copies the weights
    (0.2-0.8 s for a scanned GPT-2 124M on a 2-core CPU, 2-8 ms per token of a 100-token sample, most of it
    the new pages). The copy is a snapshot: lay out again after changing the weights (a head that no
    longer matches wte's shape or dtype is rebuilt; bfloat16 weights laid out again in float32 stay rounded).

    A scanned model would carry its stacked [L, ...] cache through nn.scan, whose stacked output rewrites
    the whole cache every token; per-layer caches are updated in place."""
    config = config.replace(scan_layers=False, param_dtype=config.dtype)
    head, dtype = params.get("lm_head"), jnp.dtype(config.dtype)
    if (head is not None and not is_scanned(params) and head.dtype == params["wte"]["embedding"].dtype == dtype
            and head.shape == params["wte"]["embedding"].shape[::-1]):
        return params, config.replace(kernel_layout=kernel_layout_of(params))
    layout = "out_in" if batch_size == 1 and _platform(params) == "cpu" else "in_out"
    params = convert_layers({k: v for k, v in params.items() if k != "lm_head"}, scan_layers=False)
    params = jax.tree.map(lambda x: jnp.asarray(x, config.dtype), kernels_in_layout(params, layout))
    return {**params, "lm_head": jnp.transpose(params["wte"]["embedding"])}, config.replace(kernel_layout=layout)


def _platform(params) -> str:
    """The platform of the device holding the params ("cpu", "gpu", "tpu"); the default one for host arrays."""
    leaf = jax.tree.leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else ()
    return next(iter(devices)).platform if devices else jax.default_backend()


def checked_prompt(config: GPTConfig, prompt, prompt_mask, window_shift: int):
    """-> (config, prompt [B, T0] int32, mask bool), the prompt cropped to the last block_size columns.

    Decoding always uses XLA's attention: its steps attend through an explicit mask over the cache, where
    cuDNN's fused kernel (made for long causal training sequences) gains little, and which has not been
    run on a GPU here."""
    if not 1 <= window_shift < config.block_size:
        raise ValueError(f"window_shift must be in [1, block_size={config.block_size}), got {window_shift}")
    prompt = np.asarray(prompt, np.int32)
    prompt_mask = np.ones(prompt.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
    if prompt.ndim != 2 or prompt.shape[1] == 0 or prompt_mask.shape != prompt.shape:
        raise ValueError(f"prompt must be [B, T0 > 0] with a mask of its shape, got {prompt.shape} "
                         f"and mask {prompt_mask.shape}")
    prompt, prompt_mask = prompt[:, -config.block_size:], prompt_mask[:, -config.block_size:]
    if not prompt_mask.any(axis=1).all():
        raise ValueError("every prompt row needs at least one real token (prompt_mask True)")
    return config.replace(attention="xla"), prompt, prompt_mask


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")


def generate(params, config: GPTConfig, prompt, *, max_new_tokens: int, rng: jax.Array, temperature=1.0,
             top_k: int | None = None, top_p: float | None = None, prompt_mask=None,
             stop_token: int | None = None, window_shift: int = 1) -> jax.Array:
    """Sample max_new_tokens after each row of prompt [B, T0] -> new tokens [B, N] int32.

    prompt_mask: [B, T0] bool, True on real tokens, for prompts left-padded to one length; each row's
    positions start at 0 on its first real token, and padding is never attended to. A context longer
    than block_size is cropped to its last block_size tokens, as nanoGPT does.
    temperature 0 is greedy; top_k and top_p (nucleus) filter the distribution before sampling.
    stop_token: a row that emits it is done; the rest of that row is stop_token, so the tokens up to the
    first stop_token are its text. The loop ends early once every row is done.
    window_shift: how many of the oldest tokens to drop when the context outgrows block_size, in
    [1, block_size): 1 is nanoGPT's exact crop, larger is faster past block_size (see the module docstring).
    Step t samples with jax.random.fold_in(rng, t), as generate_stream and generate_naive do.
    Sampling more than once from the same weights: pass them through `decoding_layout` first.
    """
    check_max_new_tokens(max_new_tokens)
    sampler = make_sampler(temperature, top_k, top_p, stop_token)
    config, prompt, prompt_mask = checked_prompt(config, prompt, prompt_mask, window_shift)
    params, config = decoding_layout(params, config, len(prompt))
    return _generate(params, config, sampler, prompt, prompt_mask, rng, max_new_tokens, window_shift)


def generate_stream(params, config: GPTConfig, prompt, *, max_new_tokens: int, rng: jax.Array,
                    temperature=1.0, top_k: int | None = None, top_p: float | None = None, prompt_mask=None,
                    stop_token: int | None = None, window_shift: int = 1) -> Iterator[np.ndarray]:
    """`generate`, one step at a time: yields each new token [B] (numpy int32) as soon as it is sampled.

    The same compiled steps and random keys as `generate`, so the same tokens; the stream ends after
    the step on which the last row emits stop_token. Streaming more than once from the same weights: pass
    them through `decoding_layout` first.
    """
    check_max_new_tokens(max_new_tokens)
    sampler = make_sampler(temperature, top_k, top_p, stop_token)
    config, prompt, prompt_mask = checked_prompt(config, prompt, prompt_mask, window_shift)
    params, config = decoding_layout(params, config, len(prompt))
    state = _start(params, config, sampler, prompt, prompt_mask, rng, config.block_size)
    for step in range(max_new_tokens):
        if step:
            state = _advance(params, config, sampler, state, rng, window_shift)
        yield np.array(state.token)  # a copy: the next step donates (reuses) the state's buffers
        if stop_token is not None and np.all(state.done):
            return
