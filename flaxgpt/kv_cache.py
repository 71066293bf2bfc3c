"""The key/value cache of cached decoding: its layout, its zeroed start, and attention over it.
Shapes: B batch, T query length, H heads, D head size, S cache slots, L layers."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    """Keys and values of one layer, S slots, each laid out as its attention matmul reads it (q.k
    contracts D, p.v contracts S; batch and heads merged, as XLA batches the matmul), so that no
    decoding step copies the cache: k: [B*H, D, S] (keys transposed), v: [B*H, S, D]."""
    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, index) -> LayerCache:
        """k, v: [B, T, H, D] written at slots index ... index + T - 1 (in place under jit)."""
        (B, T, H, D), dtype = k.shape, self.k.dtype
        k = k.transpose(0, 2, 3, 1).reshape(B * H, D, T).astype(dtype)
        v = v.transpose(0, 2, 1, 3).reshape(B * H, T, D).astype(dtype)
        return LayerCache(jax.lax.dynamic_update_slice_in_dim(self.k, k, index, axis=2),
                          jax.lax.dynamic_update_slice_in_dim(self.v, v, index, axis=1))

    @property
    def slots(self) -> int:
        """S, the number of slots (of one layer, or of each layer of a stacked cache)."""
        return self.v.shape[-2]

    def grow(self, slots: int) -> LayerCache:
        """The cache with empty (zero) slots appended up to `slots`."""
        pad = slots - self.slots
        return LayerCache(jnp.pad(self.k, ((0, 0), (0, 0), (0, pad))),
                          jnp.pad(self.v, ((0, 0), (0, pad), (0, 0))))


def init_cache(config, batch_size: int, length: int | None = None) -> LayerCache | list[LayerCache]:
    """Zeroed caches of S = length or block_size slots for a model.GPTConfig (not imported: the
    model imports this module): with scan_layers one LayerCache stacked over the layers
    (k: [L, B*H, D, S], v: [L, B*H, S, D]), else a list of L LayerCaches."""
    S, BH, D = length or config.block_size, batch_size * config.n_head, config.head_dim
    new = lambda *layers: LayerCache(jnp.zeros((*layers, BH, D, S), config.dtype),
                                     jnp.zeros((*layers, BH, S, D), config.dtype))
    return new(config.n_layer) if config.scan_layers else [new() for _ in range(config.n_layer)]


def cached_attention(q: jax.Array, cache: LayerCache, mask: jax.Array) -> jax.Array:
    """q: [B, T, H, D] attending to the slots that mask [B, T, S] allows -> [B, T, H, D]: XLA's
    dot_product_attention (scores and softmax in float32) on the cache's own layout."""
    B, T, H, D = q.shape
    q = q.transpose(0, 2, 1, 3).reshape(B * H, T, D)
    k, v = cache
    scores = jnp.einsum("ntd,nds->nts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(B, H, T, -1) / math.sqrt(D)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(B * H, T, -1)
    y = jnp.einsum("nts,nsd->ntd", probs, v.astype(q.dtype))
    return y.reshape(B, H, T, D).transpose(0, 2, 1, 3)
