"""The GPT-2 model in Flax linen. Shapes: B batch, T query length, S key length, C n_embd,
H n_head, D head size (C // H), V vocab.

Parameters carry logical axis names ("vocab", "embed", "heads", "kv", "mlp") that sharding.py maps
onto a mesh. With scan_layers the blocks are one nn.scan (params["h"], stacked on a leading
"layers" axis), else params["h_0"] ... ["h_{L-1}"] (layer_stacking.py).
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from flaxgpt.kv_cache import cached_attention
from flaxgpt.sharding import traced_mesh
from flaxgpt.splash import splash_causal_attention, splash_supports
from flaxgpt.tokenizer import GPT2_PADDED_VOCAB_SIZE, GPT2_VOCAB_SIZE

PRESETS = {  # nanoGPT's sizes for the OpenAI checkpoints (vocab 50257, block 1024, with biases).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")  # auto: see resolve_attention
# What a block keeps for the backward pass: none: everything; full: its input; dots_saveable:
# matmul outputs and a fused attention kernel's (a custom call no dots policy sees), named
# ATTENTION_OUTPUT; dots_with_no_batch_dims_saveable: not attention's [B, H, T, T].
ATTENTION_OUTPUT = "attention_output"
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT)),
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = GPT2_PADDED_VOCAB_SIZE  # GPT-2's 50257 padded to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2.
    gelu_approximate: bool = True  # GPT-2's tanh "gelu_new"; nanoGPT's own models: exact erf
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16".
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS; None (older configs) means auto.
    scan_layers: bool = True  # the blocks as one nn.scan: compile time independent of n_layer
    remat: str = "none"  # one of REMAT_POLICIES, applied per block

    def __post_init__(self):
        if self.attention is None:  # older configs
            object.__setattr__(self, "attention", "auto")
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        if self.attention == "splash" and not splash_supports(self.block_size, self.head_dim):
            raise ValueError(f"attention='splash' needs block_size ({self.block_size}) a multiple "
                             f"of 128 and head_dim ({self.head_dim}) a multiple of 64: use "
                             "attention='auto' or 'xla'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # TypeError for an unknown name
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention computes in bfloat16 or float16, not {self.dtype}: "
                             "set dtype, or use attention='xla'")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{"vocab_size": GPT2_VOCAB_SIZE, **PRESETS[name], **overrides})

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    head_dim = property(lambda self: self.n_embd // self.n_head)
    residual_std = property(lambda self: 0.02 / math.sqrt(2 * self.n_layer))  # nanoGPT's init


_init = lambda std, names: nn.with_logical_partitioning(nn.initializers.normal(std), names)
_zeros = lambda names: nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=config.dtype, name=name,
                        param_dtype=config.param_dtype, bias_init=_zeros(("embed",)),
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("embed",)))


def _dense(cfg: GPTConfig, features, n_in: int, std: float, names: tuple, name: str) -> nn.Module:
    """x @ W + b over x's last n_in axes -> [..., *features]; names: W's logical axes, in first."""
    return nn.DenseGeneral(features, axis=tuple(range(-n_in, 0)), use_bias=cfg.bias,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           kernel_init=_init(std, names), bias_init=_zeros(names[n_in:]), name=name)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True, mask=None, cache=None, cache_index=0):
        """x: [B, T, C] -> ([B, T, C], cache). mask: [B, T, S] bool (True: may attend) or None
        (causal); cache: a kv_cache.LayerCache to write x's keys/values into at cache_index."""
        cfg = self.config
        # Fused qkv projection; kernel [C, 3, H, D] is GPT-2's [C, 3C] c_attn, reshaped per head.
        qkv = _dense(cfg, (3, cfg.n_head, cfg.head_dim), 1, 0.02, ("embed", None, "heads", "kv"),
                     "c_attn")(x)
        # split: its gradient is one concatenation, not three padded copies summed
        q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))  # each [B, T, H, D]
        if cache is not None:
            if mask is None:
                raise ValueError("cached attention needs an explicit mask [B, T, S]")
            cache = cache.write(k, v, cache_index)
            y = cached_attention(q, cache, mask)
        elif cfg.dropout > 0 and not deterministic:
            y = _attention_with_dropout(q, k, v, mask, nn.Dropout(cfg.dropout, name="attn_dropout"))
        else:
            y = _attention(cfg, q, k, v, mask)
        y = _dense(cfg, cfg.n_embd, 2, cfg.residual_std, ("heads", "kv", "embed"), "c_proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic), cache


def resolve_attention(config: GPTConfig, platform: str) -> str:
    """What config.attention means on `platform` ("tpu", "gpu", "cpu"): auto is splash on TPU when
    the kernel takes the shapes, cuDNN on GPUs in bfloat16/float16 without dropout, else XLA."""
    if config.attention != "auto":
        return config.attention
    if platform == "tpu" and splash_supports(config.block_size, config.head_dim):
        return "splash"
    if (platform in ("gpu", "cuda") and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
            and config.dropout == 0):
        return "cudnn"
    return "xla"


def _attention(cfg: GPTConfig, q, k, v, mask):
    """q, k, v: [B, T, H, D] -> [B, T, H, D] by the kernel resolve_attention picks; an explicit
    mask [B, T, S] (or init's one token under splash) takes XLA's."""
    kind = resolve_attention(cfg, jax.default_backend()) if mask is None else "xla"
    if kind == "splash" and splash_supports(q.shape[1], cfg.head_dim):
        return checkpoint_name(splash_causal_attention(q, k, v), ATTENTION_OUTPUT)
    kind = "xla" if kind == "splash" else kind
    y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), implementation=kind,
                                     mask=None if mask is None else mask[:, None],
                                     is_causal=mask is None)
    return checkpoint_name(y, ATTENTION_OUTPUT) if kind == "cudnn" else y


def _attention_with_dropout(q, k, v, mask, dropout: nn.Dropout):
    """Masked-softmax attention with dropout on the weights (dot_product_attention has none);
    q: [B, T, H, D], k, v: [B, S, H, D], mask: [B, T, S] or None (causal) -> [B, T, H, D]."""
    if mask is None:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))[None]
    scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype)) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype), deterministic=False)
    return jnp.einsum("bhts,bshd->bthd", weights, v.astype(q.dtype))


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        """x: [B, T, C] -> [B, T, C], computed on [B*T, C]: on [B, T, C] XLA:CPU transposes the
        GELU backward (docs/performance.md)."""
        cfg, (B, T, C) = self.config, x.shape
        h = _dense(cfg, 4 * C, 1, 0.02, ("embed", "mlp"), "c_fc")(x.reshape(B * T, C))
        h = gelu(_constrain(h, ("batch", "mlp")), approximate=cfg.gelu_approximate)
        h = _dense(cfg, C, 1, cfg.residual_std, ("mlp", "embed"), "c_proj")(h).reshape(B, T, C)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


def gelu(x, approximate: bool):
    """GELU of x: tanh's approximation (GPT-2's), or exact as x/2 (1 + erf(x/sqrt 2)) in float32
    (faster on XLA:CPU than jax.nn.gelu's erfc form), jax.nn.gelu's in bfloat16 (no cancelling)."""
    if approximate or x.dtype != jnp.float32:
        return nn.gelu(x, approximate=approximate)
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.float32(math.sqrt(0.5))))


def _constrain(x, names: tuple[str | None, ...]):
    """x constrained to its logical axes' sharding on the mesh a TrainStep traces under, else as it
    is (linen's own constraint needs a global mesh, which would constrain every param too)."""
    return nn.with_logical_constraint(x, names, mesh=traced_mesh())


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, cache=None, mask=None, cache_index=0, deterministic=True):
        """Pre-LayerNorm block, x: [B, T, C] -> ([B, T, C], cache); positional arguments as nn.scan
        and nn.remat pass them (x the scan's carry, cache its per-layer input and output)."""
        y, cache = CausalSelfAttention(self.config, name="attn")(
            layer_norm(self.config, "ln_1")(x), deterministic=deterministic, mask=mask, cache=cache,
            cache_index=cache_index)
        x = x + y
        x = x + MLP(self.config, name="mlp")(layer_norm(self.config, "ln_2")(x),
                                             deterministic=deterministic)
        return _constrain(x, ("batch", "length", "embed")), cache


class GPT(nn.Module):
    config: GPTConfig

    def __call__(self, idx, *, deterministic=True, positions=None, mask=None):
        """idx: [B, T] int tokens -> logits [B, T, V]. positions: [B, T] (default 0..T-1); mask:
        optional [B, T, T] bool, True where a query may attend to a key; None is causal."""
        return self.forward(idx, deterministic=deterministic, positions=positions, mask=mask)[0]

    def hidden_states(self, idx, *, deterministic=True, positions=None, mask=None):
        """As __call__, but the final hidden states [B, T, C] (after ln_f), which the tied head
        turns into logits (loss.head_cross_entropy)."""
        return self.forward(idx, deterministic=deterministic, positions=positions, mask=mask,
                            hidden_only=True)[0]

    def decode(self, idx, cache, *, positions, mask, cache_index, head=None):
        """Cached decoding: idx [B, T] -> (the last position's logits [B, 1, V], the cache with
        idx's keys and values written at slots cache_index ...). positions: [B, T]; mask: [B, T, S]
        bool, True where a query may see a slot; head: optional [C, V] (wte.T)."""
        return self.forward(idx, positions=positions, mask=mask, cache=cache,
                            cache_index=cache_index, last_only=True, head=head)

    @nn.compact
    def forward(self, idx, *, deterministic=True, positions=None, mask=None, cache=None,
                cache_index=0, last_only=False, head=None, hidden_only=False):
        """-> (logits [B, T or 1, V], or hidden states [B, T or 1, C] if hidden_only; the updated
        cache or None)."""
        cfg, T = self.config, idx.shape[1]
        if T > cfg.block_size:
            raise ValueError(f"cannot forward a sequence of length {T}: "
                             f"block_size is only {cfg.block_size}")
        positions = jnp.arange(T)[None] if positions is None else positions
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_init(0.02, ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_init(0.02, (None, "embed")), name="wpe")
        # Gather the rows, then cast them: Embed's own call would cast the whole table every step.
        embed = lambda table, ids: jnp.take(table.embedding, ids, axis=0).astype(cfg.dtype)
        x = nn.Dropout(cfg.dropout)(embed(wte, idx) + embed(wpe, positions),
                                    deterministic=deterministic)
        x = _constrain(x, ("batch", "length", "embed"))
        block = Block
        if cfg.remat != "none":  # inside a scan, CSE cannot merge the recomputation away
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers,
                             static_argnums=(5,))  # deterministic (self counts as 0)
        if cfg.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0},
                             split_rngs={"params": True, "dropout": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                             length=cfg.n_layer, metadata_params={nn.PARTITION_NAME: "layers"})
            blocks = _kernels_cast_on_entry(blocks, cfg, self.is_initializing())
            x, cache = blocks(cfg, name="h")(x, cache, mask, cache_index, deterministic)
        else:
            block = _kernels_cast_on_entry(block, cfg, self.is_initializing())
            layer_caches = [None] * cfg.n_layer if cache is None else list(cache)
            for i in range(cfg.n_layer):
                x, layer_caches[i] = block(cfg, name=f"h_{i}")(
                    x, layer_caches[i], mask, cache_index, deterministic)
            cache = None if cache is None else layer_caches
        if last_only:
            x = x[:, -1:]
        x = layer_norm(cfg, "ln_f")(x)
        if not hidden_only:  # the lm_head is wte, tied
            x = _constrain(wte.attend(x) if head is None else x @ head.astype(x.dtype),
                           ("batch", "length", "vocab"))
        return x, cache


def _kernels_cast_on_entry(module_class, config: GPTConfig, initializing: bool):
    """module_class (the scanned blocks, or one block) reading its matmul kernels and biases (c_*)
    already cast to the compute dtype: one cast per step outside the layer scan and remat, not one
    per block and again in its recomputation. LayerNorm params keep theirs."""
    if initializing or jnp.dtype(config.dtype) == jnp.dtype(config.param_dtype):
        return module_class

    def cast(path, x):
        parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        return x.astype(config.dtype) if parent.startswith("c_") else x

    return nn.map_variables(module_class, "params", mutable=False,
                            trans_in_fn=lambda tree: jax.tree_util.tree_map_with_path(cast, tree))


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: GPTConfig, rng: jax.Array) -> dict:
    """Unboxed float params of a freshly initialised GPT (TrainStep.init: the sharded version)."""
    return nn.meta.unbox(GPT(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def count_params(params, *, non_embedding: bool = True) -> int:
    """Number of parameters (the head is wte, tied). nanoGPT reports it without wpe."""
    n = sum(x.size for x in jax.tree.leaves(params))
    return int(n - params["wpe"]["embedding"].size * non_embedding)


def crop_block_size(params: dict, config: GPTConfig, block_size: int) -> tuple[dict, GPTConfig]:
    """Shrink the context length of a (pretrained) model by cutting its position embeddings."""
    return _crop(params, config, "wpe", "block_size", block_size)


def crop_vocab_size(params: dict, config: GPTConfig, vocab_size: int) -> tuple[dict, GPTConfig]:
    """Keep the first vocab_size rows of the (tied) token embedding, e.g. GPT-2's 50304 padded rows
    back to its 50257 tokens, so that padding tokens (no text) are never sampled or exported."""
    return _crop(params, config, "wte", "vocab_size", vocab_size)


def _crop(params: dict, config: GPTConfig, table: str, field: str, size: int):
    if size > getattr(config, field):
        raise ValueError(f"cannot grow {field} from {getattr(config, field)} to {size}")
    return (dict(params, **{table: {"embedding": params[table]["embedding"][:size]}}),
            config.replace(**{field: size}))
