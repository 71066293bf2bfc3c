"""The GPT-2 model in Flax linen: config, attention, MLP, block, GPT, loss.

Shapes: B batch, T query length, S key length, C n_embd, H n_head, D head size (C // H), V vocab.
Every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp"); `sharding.py`
maps them onto a device mesh.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

PRESETS = {  # nanoGPT's sizes for the OpenAI checkpoints (vocab 50257, block 1024, with biases).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed.
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2.
    gelu_approximate: bool = True  # GPT-2's tanh "gelu_new"; nanoGPT's own models use exact erf GELU.
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16".
    param_dtype: str = "float32"
    attention: str | None = None  # jax.nn.dot_product_attention implementation: None, "xla", "cudnn".

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION_IMPLEMENTATIONS}")
        for field in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, field))  # raises TypeError on an unknown name
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention computes in bfloat16 or float16, not {self.dtype}: set dtype, "
                             "or use attention='xla'")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{"vocab_size": 50257, "block_size": 1024, "bias": True, **PRESETS[name], **overrides})

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5, use_bias=config.bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)))


def _residual_std(config: GPTConfig) -> float:
    return 0.02 / math.sqrt(2 * config.n_layer)  # nanoGPT's scaled init of the residual projections


class LayerCache(NamedTuple):
    """Keys and values of one layer for cached decoding: k, v: [B, S, H, D]."""
    k: jax.Array
    v: jax.Array


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True, mask=None, cache=None, cache_index=0):
        """x: [B, T, C] -> ([B, T, C], cache).

        mask: optional [B, T, S] bool (True = may attend); None means plain causal attention.
        cache: optional LayerCache; x's keys/values are written at slot `cache_index` and the
        queries attend over the whole cache under `mask`, which is then required.
        """
        cfg = self.config
        # Fused qkv projection; kernel [C, 3, H, D] is GPT-2's [C, 3C] c_attn, reshaped per head.
        qkv = nn.DenseGeneral(
            (3, cfg.n_head, cfg.head_dim), use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(0.02, ("embed", None, "heads", "kv")), bias_init=_zeros((None, "heads", "kv")),
            name="c_attn")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, D]
        if cache is not None:
            if mask is None:
                raise ValueError("cached attention needs an explicit mask [B, T, S]")
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache_index, axis=1)
            cache = LayerCache(k, v)
        if cfg.dropout > 0 and not deterministic:
            y = _attention_with_dropout(q, k, v, mask, nn.Dropout(cfg.dropout, name="attn_dropout"))
        else:
            y = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=None if mask is None else mask[:, None],
                is_causal=mask is None, implementation=cfg.attention)
        y = nn.DenseGeneral(
            cfg.n_embd, axis=(-2, -1), use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(_residual_std(cfg), ("heads", "kv", "embed")), bias_init=_zeros(("embed",)),
            name="c_proj")(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y, cache



def _attention_with_dropout(q, k, v, mask, dropout: nn.Dropout):
    """Masked-softmax attention with dropout on the weights (dot_product_attention has none).

    q: [B, T, H, D]; k, v: [B, S, H, D]; mask: [B, T, S] or None for causal -> [B, T, H, D].
    """
    T, S = q.shape[1], k.shape[1]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), dtype=bool))[None]
    scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype)) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype), deterministic=False)
    return jnp.einsum("bhts,bshd->bthd", weights, v.astype(q.dtype))


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        """x: [B, T, C] -> [B, T, C]."""
        cfg = self.config
        dense = lambda features, std, names, name: nn.Dense(
            features, use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(std, names), bias_init=_zeros(names[-1:]), name=name)
        h = dense(4 * cfg.n_embd, 0.02, ("embed", "mlp"), "c_fc")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=cfg.gelu_approximate)
        h = dense(cfg.n_embd, _residual_std(cfg), ("mlp", "embed"), "c_proj")(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True, mask=None, cache=None, cache_index=0):
        """Pre-LayerNorm transformer block. x: [B, T, C] -> ([B, T, C], cache)."""
        y, cache = CausalSelfAttention(self.config, name="attn")(
            _layer_norm(self.config, "ln_1")(x), deterministic=deterministic, mask=mask, cache=cache,
            cache_index=cache_index)
        x = x + y
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x), deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class GPT(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, idx, *, deterministic=True, positions=None, mask=None, cache=None, cache_index=0,
                 last_only=False):
        """idx: [B, T] int tokens -> logits [B, T, V] (and the updated cache when one is given).

        positions: [B, T] position ids (default 0..T-1; pass cache_index + 0..T-1 when decoding).
        mask, cache, cache_index: see CausalSelfAttention; `cache` is a list with one LayerCache per
        layer (see `init_cache`). last_only: logits of the last position only, [B, 1, V] (sampling).
        """
        cfg = self.config
        T = idx.shape[1]
        if T > cfg.block_size:
            raise ValueError(f"cannot forward a sequence of length {T}: block_size is only {cfg.block_size}")
        if positions is None:
            positions = jnp.arange(T)[None]
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_init(0.02, ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_init(0.02, (None, "embed")), name="wpe")
        x = nn.Dropout(cfg.dropout)(wte(idx) + wpe(positions), deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_cache = []
        for i in range(cfg.n_layer):
            x, layer_cache = Block(cfg, name=f"h_{i}")(
                x, deterministic=deterministic, mask=mask, cache=None if cache is None else cache[i],
                cache_index=cache_index)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        x = _layer_norm(cfg, "ln_f")(x)
        logits = wte.attend(x)  # lm_head tied to wte
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)


def init_cache(config: GPTConfig, batch_size: int, length: int | None = None) -> list[LayerCache]:
    """Zeroed per-layer key/value caches, each k, v: [B, S, H, D] with S = length or block_size."""
    shape = (batch_size, length or config.block_size, config.n_head, config.head_dim)
    return [LayerCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
            for _ in range(config.n_layer)]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: GPTConfig, rng: jax.Array) -> dict:
    """Unboxed float params of a freshly initialised GPT (see sharding.py for the sharded version)."""
    variables = GPT(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32. logits: [B, T, V]; targets: [B, T], -1 ignored."""
    logits = logits.astype(jnp.float32)
    valid = targets >= 0
    safe_targets = jnp.where(valid, targets, 0)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logprobs, safe_targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def count_params(params, *, non_embedding: bool = True) -> int:
    """Number of parameters (the tied lm_head counts once). nanoGPT reports it without wpe."""
    n = sum(x.size for x in jax.tree.leaves(params))
    if non_embedding:
        n -= params["wpe"]["embedding"].size
    return int(n)


def crop_block_size(params: dict, config: GPTConfig, block_size: int) -> tuple[dict, GPTConfig]:
    """Shrink the context length of a (pretrained) model by cutting its position embeddings."""
    if block_size > config.block_size:
        raise ValueError(f"cannot grow block_size from {config.block_size} to {block_size}")
    params = dict(params, wpe={"embedding": params["wpe"]["embedding"][:block_size]})
    return params, config.replace(block_size=block_size)


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), nanoGPT's 6N + 12*L*H*Q*T (PaLM appendix B)."""
    T = seq_len or config.block_size
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * T
