"""Sampling: a `Decoder` lays a model's weights out for KV-cached decoding once, then samples from
them in one compiled loop (`Decoder.generate`) or one step at a time (`Decoder.stream`); `generate`
and `generate_stream` are one-shot forms. Tested against nanoGPT's (tests/sampling_reference.py).
Shapes: B batch, T0 prompt length, S = block_size (cache slots), V vocab, N = max_new_tokens.

The cache (kv_cache.py) holds the last (up to) S tokens of each row's context: `window[b, s]` is
the token in slot s, `valid[b, s]` whether it is a real one (left padding is not). Once all S slots
are full, the oldest window_shift tokens are dropped and the rest prefilled again as a fresh cache;
1 is nanoGPT's crop (docs/sampling.md, "The context window").
"""

import contextlib
import functools
import math
from typing import Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxgpt.kv_cache import LayerCache, init_cache
from flaxgpt import xla_options
from flaxgpt.layer_stacking import convert_layers
from flaxgpt.model import GPT, GPTConfig


@struct.dataclass
class Sampler:
    """How the next token is picked. temperature is traced (no recompile); the others are static."""
    temperature: float | jax.Array = 1.0
    top_k: int | None = struct.field(pytree_node=False, default=None)
    top_p: float | None = struct.field(pytree_node=False, default=None)
    stop_token: int | None = struct.field(pytree_node=False, default=None)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits [B, V] -> tokens [B] int32: divide by temperature, keep the top_k most likely
        tokens, then the fewest most likely ones whose probabilities sum to top_p, and sample;
        temperature 0 is argmax. Ties at a cut-off are kept, as in nanoGPT."""
        logits = logits.astype(jnp.float32)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampling = self.temperature > 0
        # Greedy decoding skips the random draws and filters (a cond, as temperature is traced).
        return jax.lax.cond(jnp.any(sampling),
                            lambda: jnp.where(sampling, self._sample(logits, rng), greedy),
                            lambda: greedy)

    def _sample(self, logits, rng):
        logits = logits / jnp.where(self.temperature > 0, self.temperature, 1.0)
        if self.top_k is not None and self.top_k < logits.shape[-1]:  # else it keeps them all
            # The k-th largest as the min of the top k: XLA:CPU makes a sliced top_k a full sort.
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
    cache: LayerCache | list[LayerCache]  # see kv_cache.init_cache
    window: jax.Array  # [B, S] int32: the token in each cache slot
    valid: jax.Array  # [B, S] bool: the slot holds a real token (not padding, not yet written)
    length: jax.Array  # () int32: slots written so far (S - window_shift + 1 after a slide)
    token: jax.Array  # [B] int32: the latest new token, not yet in the cache
    done: jax.Array  # [B] bool: the row has emitted stop_token
    step: jax.Array  # () int32: index of `token` among the new tokens


@struct.dataclass
class _Weights:
    """The weights as Decoder lays them out: unscanned, in the compute dtype; head: wte.T [C, V]
    (faster for one row; on a CPU several rows use wte itself); out_in: the blocks' kernels stored
    [*out, *in] (torch's nn.Linear order), see _out_in_dense."""
    params: dict
    head: jax.Array
    out_in: bool = struct.field(pytree_node=False)


def _lay_out(params, config: GPTConfig, out_in: bool) -> _Weights:
    """Copy params (scanned or not, [in, out] kernels) into the layout _Weights describes."""
    params = convert_layers(nn.meta.unbox(params), scan_layers=False)  # as model.init boxes them

    def move(path, x):
        x = jnp.asarray(x, config.dtype)
        keys = tuple(getattr(p, "key", None) for p in path)
        if out_in and keys[-1] == "kernel" and keys[0].startswith("h_"):
            n_in = 2 if keys[-3:-1] == ("attn", "c_proj") else 1  # its input: [H, D]
            x = jnp.transpose(x, (*range(n_in, x.ndim), *range(n_in)))
        return x

    params = jax.tree_util.tree_map_with_path(move, params)
    return _Weights(params, jnp.transpose(params["wte"]["embedding"]), out_in)


WEIGHT_FIRST_ROWS = range(2, 128)  # how many rows _out_in_dense multiplies weight first


def _out_in_dense(next_fun, args, kwargs, context):
    """A flax method interceptor: the model's DenseGeneral layers on a kernel stored [*out, *in],
    read as one [out, in] matrix contracted on its rows (XLA:CPU streams a weight faster by rows);
    a few rows of x (WEIGHT_FIRST_ROWS) as kernel @ x.T, the weight first, transposed back (faster
    with YNNPACK; the barrier keeps XLA from swapping the operands back). One device only: merging
    c_attn's 3 with the heads would regather on a mesh."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.DenseGeneral):
        return next_fun(*args, **kwargs)
    (x,) = args
    n_in = len(module.axis)
    kernel = module.get_variable("params", "kernel")
    features, lead = kernel.shape[:kernel.ndim - n_in], x.shape[:-n_in]
    rows = kernel.reshape(math.prod(features), -1).astype(module.dtype)
    x = x.reshape(-1, rows.shape[1]).astype(module.dtype)  # [M, in]
    contract = (((1,), (1,)), ((), ()))
    y = (jax.lax.optimization_barrier(jax.lax.dot_general(rows, x, contract)).T
         if len(x) in WEIGHT_FIRST_ROWS else jax.lax.dot_general(x, rows, contract))
    y = y.reshape(*lead, *features)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(module.dtype)
    return y


def _cache_sizes(config: GPTConfig, n: int = 1) -> list[int]:
    """The cache sizes that hold n tokens: block_size // 2**k for k = 1, 2, ... (of 64 slots or
    more) and block_size. A step reads its whole cache, so short contexts keep a short one."""
    S = config.block_size
    return sorted({S >> k for k in range(1, S.bit_length()) if S >> k >= max(n, 64)} | {S})


def _forward_window(weights: _Weights, config: GPTConfig, cache, window, valid, index,
                    length: int):
    """Forward window[:, index:index+length] into cache slots [index, index+length), each query
    attending to the valid slots up to its own; the cache may hold only the first S' slots.
    -> (logits of the last query [B, V] float32, cache)."""
    slots = (cache if isinstance(cache, LayerCache) else cache[0]).slots
    tokens = jax.lax.dynamic_slice_in_dim(window, index, length, axis=1)
    positions = jax.lax.dynamic_slice_in_dim(jnp.cumsum(valid, axis=1) - 1, index, length, axis=1)
    causal = jnp.arange(slots)[None, None, :] <= (index + jnp.arange(length))[None, :, None]
    mask = valid[:, None, :slots] & causal  # [B, T, S']
    head = None if weights.out_in and len(window) > 1 else weights.head
    with nn.intercept_methods(_out_in_dense) if weights.out_in else contextlib.nullcontext():
        logits, cache = GPT(config).apply(
            {"params": weights.params}, tokens, cache, positions=jnp.maximum(positions, 0),
            mask=mask, cache_index=index, head=head, method=GPT.decode)
    return logits[:, -1].astype(jnp.float32), cache


def make_sampler(temperature=1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_token: int | None = None) -> Sampler:
    """A Sampler from the user's settings; ValueError (naming the setting) for one that fails."""
    if np.any(np.asarray(temperature) < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampler(jnp.asarray(temperature, jnp.float32), top_k, top_p, stop_token)


def _feed(weights: _Weights, config: GPTConfig, sampler: Sampler, rng, cache, window, valid, index,
          length: int, step, done) -> DecodeState:
    """_forward_window, then sample the token of `step`; a stopped row repeats stop_token."""
    logits, cache = _forward_window(weights, config, cache, window, valid, index, length)
    token = sampler(logits, jax.random.fold_in(rng, step))
    if sampler.stop_token is not None:
        token = jnp.where(done, sampler.stop_token, token)
        done = done | (token == sampler.stop_token)
    return DecodeState(cache, window, valid, jnp.asarray(index + length, jnp.int32), token, done,
                       step)


def _start(weights: _Weights, config: GPTConfig, sampler: Sampler, prompt, prompt_mask, rng,
           slots: int) -> DecodeState:
    """Prefill prompt [B, T0 <= slots] in one pass into a cache of `slots` slots; sample a token."""
    (B, T0), S = prompt.shape, config.block_size
    window = jnp.zeros((B, S), jnp.int32).at[:, :T0].set(prompt)
    valid = jnp.zeros((B, S), bool).at[:, :T0].set(prompt_mask)
    return _feed(weights, config, sampler, rng, init_cache(config, B, slots), window, valid, 0, T0,
                 jnp.int32(0), jnp.zeros(B, bool))


def _step(weights: _Weights, config: GPTConfig, sampler: Sampler, rng, state: DecodeState,
          window_shift: int | None = None, slots: int = 0) -> DecodeState:
    """Feed the latest token and sample the next. window_shift None: write it into the next free
    slot. Else the cache is full: drop the oldest window_shift tokens and prefill the rest and the
    token afresh from slot 0 of a cache of `slots` slots."""
    if window_shift is None:
        index, length, cache = state.length, 1, state.cache
        put = lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, index, axis=1)
    else:  # window_shift 1: all S slots, nanoGPT's crop; else the next steps append
        index, length, k = 0, config.block_size - window_shift + 1, window_shift
        cache = (state.cache if slots == config.block_size
                 else init_cache(config, len(state.window), slots))
        put = lambda x, new: jnp.concatenate([x[:, k:], new, jnp.zeros_like(x[:, 1:k])], axis=1)
    window = put(state.window, state.token[:, None])
    valid = put(state.valid, jnp.ones_like(state.valid[:, :1]))
    return _feed(weights, config, sampler, rng, cache, window, valid, index, length, state.step + 1,
                 state.done)


def _generate(weights: _Weights, config: GPTConfig, sampler: Sampler, prompt, prompt_mask, rng,
              max_new_tokens: int, window_shift: int):
    """The steps of `_step` as nested loops, so that no step branches on the (large) cache: appends
    while a slot is free, one loop per size of `_cache_sizes` (growing when full), then one slide
    (which restarts the cache as small as it can), then appends again, ..."""
    kept = config.block_size - window_shift + 1
    state = _start(weights, config, sampler, prompt, prompt_mask, rng,
                   _cache_sizes(config, prompt.shape[1])[0])
    fill = 0 if sampler.stop_token is None else sampler.stop_token
    out = jnp.full((len(prompt), max_new_tokens), fill, jnp.int32).at[:, 0].set(state.token)

    def not_finished(carry):
        return (carry[0].step + 1 < max_new_tokens) & ~jnp.all(carry[0].done)

    def step(carry, *slide):  # one _step (a slide: given window_shift, slots), its token recorded
        state = _step(weights, config, sampler, rng, carry[0], *slide)
        return state, jax.lax.dynamic_update_slice_in_dim(carry[1], state.token[:, None],
                                                          state.step, axis=1)

    def appends(carry, filled: int, held: int):  # from `filled` tokens while a slot is free;
        for slots in _cache_sizes(config, filled):  # ends full, or with room for `held` tokens
            grown = [layer.grow(slots) for layer in carry[0].cache]
            carry = jax.lax.while_loop(lambda c: (c[0].length < slots) & not_finished(c), step,
                                       (carry[0]._replace(cache=grown), carry[1]))
            if slots >= held:
                break
        return carry

    # the tokens the cache ever holds: a run that needs no slide grows its cache no further
    held = prompt.shape[1] + max_new_tokens - 1
    appended = appends((state, out), prompt.shape[1], held)
    if held <= config.block_size:
        return appended[1]
    slide = (window_shift, _cache_sizes(config, kept)[0])
    return jax.lax.while_loop(
        not_finished, lambda carry: appends(step(carry, *slide), kept, config.block_size),
        appended)[1]


@functools.cache
def _programs(platform: str) -> dict:
    """The compiled `_generate`, and `_start` and `_step` for streaming, with xla_options' options
    for `platform`."""
    jit = functools.partial(jax.jit,
                            compiler_options=xla_options.compiler_options(platform, ynnpack=True))
    return dict(generate=jit(_generate, static_argnames=("config", "max_new_tokens",
                                                         "window_shift")),
                start=jit(_start, static_argnames=("config", "slots")),
                step=jit(_step, static_argnames=("config", "window_shift", "slots"),
                         donate_argnames="state"))


def checked_prompt(config: GPTConfig, prompt, prompt_mask, window_shift: int):
    """-> (prompt [B, T0] int32, mask bool), the prompt cropped to the last block_size columns."""
    if not 1 <= window_shift < config.block_size:
        raise ValueError(f"window_shift must be in [1, block_size={config.block_size}), "
                         f"got {window_shift}")
    prompt = np.asarray(prompt, np.int32)
    prompt_mask = np.asarray(np.ones(prompt.shape) if prompt_mask is None else prompt_mask, bool)
    if prompt.ndim != 2 or prompt.shape[1] == 0 or prompt_mask.shape != prompt.shape:
        raise ValueError(f"prompt must be [B, T0 > 0] with a mask of its shape, got {prompt.shape} "
                         f"and mask {prompt_mask.shape}")
    prompt, prompt_mask = prompt[:, -config.block_size:], prompt_mask[:, -config.block_size:]
    if not prompt_mask.any(axis=1).all():
        raise ValueError("every prompt row needs at least one real token (prompt_mask True)")
    return prompt, prompt_mask


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")


class Decoder:
    """A model's weights laid out once for KV-cached sampling, to sample from any number of times.

        dec = Decoder(params, config)
        tokens = dec.generate(prompt, max_new_tokens=100, rng=jax.random.key(0))  # [B, 100]
        for token in dec.stream(prompt, max_new_tokens=100, rng=jax.random.key(1)): ...  # [B] each

    params: scanned or not, boxed or not, copied into the layout of _Weights (on a CPU, kernels
    [out, in]) for prompts of any batch size (batch_size, which once chose it, is still accepted
    and changes nothing). The copy is a snapshot: make a new Decoder after changing the weights."""

    def __init__(self, params, config: GPTConfig, *, batch_size: int | None = None):
        # Unscanned: nn.scan's stacked output would rewrite the whole cache every token.
        self.config = config.replace(scan_layers=False, param_dtype=config.dtype, attention="xla")
        leaf = jax.tree.leaves(params)[0]  # on a device, or a host array for the default one
        platform = (next(iter(leaf.devices())).platform if isinstance(leaf, jax.Array)
                    else jax.default_backend())
        self._weights = _lay_out(params, self.config, out_in=platform == "cpu")
        self._programs = _programs(platform)

    def generate(self, prompt, *, max_new_tokens: int, rng: jax.Array, prompt_mask=None,
                 window_shift: int = 1, **sampling) -> jax.Array:
        """Sample max_new_tokens after each row of prompt [B, T0] -> new tokens [B, N] int32.

        prompt_mask: [B, T0] bool, True on real tokens of left-padded prompts (positions start at
        each row's first real token). A context longer than block_size is cropped to its last
        block_size tokens, as nanoGPT does. window_shift: how many of the oldest tokens to drop when
        the context outgrows block_size, in [1, block_size) (1: nanoGPT's crop; larger is faster).
        sampling: make_sampler's temperature (0 is greedy), top_k, top_p and stop_token (a row that
        emits it is done and repeats it; the loop ends once every row is). Step t samples with
        jax.random.fold_in(rng, t), as `stream` does."""
        args = self._checked(prompt, max_new_tokens, rng, prompt_mask, window_shift, sampling)
        return self._programs["generate"](self._weights, self.config, *args, max_new_tokens,
                                          window_shift)

    def stream(self, prompt, *, max_new_tokens: int, rng: jax.Array, prompt_mask=None,
               window_shift: int = 1, **sampling) -> Iterator[np.ndarray]:
        """`generate`'s tokens one step at a time, each [B] numpy int32: up to max_new_tokens of
        them, ending early once every row has emitted stop_token. The arguments are checked before
        the first token."""
        args = self._checked(prompt, max_new_tokens, rng, prompt_mask, window_shift, sampling)
        return self._steps(*args, max_new_tokens, window_shift)

    def _checked(self, prompt, max_new_tokens, rng, prompt_mask, window_shift, sampling):
        """-> (sampler, prompt, prompt_mask, rng), or a ValueError naming the setting."""
        check_max_new_tokens(max_new_tokens)
        sampler = make_sampler(**sampling)
        return sampler, *checked_prompt(self.config, prompt, prompt_mask, window_shift), rng

    def _steps(self, sampler, prompt, prompt_mask, rng, max_new_tokens, window_shift):
        S, length, step = self.config.block_size, prompt.shape[1], self._programs["step"]
        state = self._programs["start"](self._weights, self.config, sampler, prompt, prompt_mask,
                                        rng, S)
        for i in range(max_new_tokens):
            if i:  # a slide once the cache is full, else an append
                shift = window_shift if length == S else None
                state = step(self._weights, self.config, sampler, rng, state, shift, S)
                length = S - window_shift + 1 if shift else length + 1
            yield np.array(state.token)  # a copy: the next step donates the state's buffers
            if sampler.stop_token is not None and np.all(state.done):
                return


def generate(params, config: GPTConfig, prompt, **kw) -> jax.Array:
    """One-shot `Decoder(params, config).generate(prompt, **kw)`: lays the
    weights out on every call; sampling more than once from the same weights, make a Decoder."""
    return Decoder(params, config).generate(prompt, **kw)


def generate_stream(params, config: GPTConfig, prompt, **kw) -> Iterator[np.ndarray]:
    """One-shot `Decoder(params, config).stream(prompt, **kw)`."""
    return Decoder(params, config).stream(prompt, **kw)
