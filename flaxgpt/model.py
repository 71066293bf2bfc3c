"""The GPT-2 model in Flax linen: config, attention, MLP, block, GPT, loss.

Shapes: B batch, T query length, S key length, C n_embd, H n_head, D head size (C // H), V vocab.
Every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp"); `sharding.py`
maps them onto a device mesh. With scan_layers the blocks are one `nn.scan`: their parameters are
stacked on a leading axis L named "layers" (params["h"]), else they are params["h_0"] ... ["h_{L-1}"];
`convert_layers` turns one layout into the other.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from flaxgpt.splash import splash_supports, traced_mesh
from flaxgpt.tokenizer import GPT2_PADDED_VOCAB_SIZE, GPT2_VOCAB_SIZE

PRESETS = {  # nanoGPT's sizes for the OpenAI checkpoints (vocab 50257, block 1024, with biases).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# auto: splash on TPU, cuDNN on NVIDIA GPUs in bfloat16/float16, XLA elsewhere (see resolve_attention).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# What a block keeps from its forward pass for the backward pass (jax.checkpoint_policies); the rest is
# recomputed. none: keep everything (no remat, most memory); full: keep only the block's input (least
# memory, one extra forward); dots_saveable: keep matmul outputs, attention's included, recompute
# the cheap elementwise ops; dots_with_no_batch_dims_saveable: keep the projections' outputs but not
# attention's batched q.k / p.v products (the [B, H, T, T] ones) or output, recompute those.
# A fused attention kernel (splash, cuDNN) is a custom call whose matmuls no dots policy sees: its
# output is named ATTENTION_OUTPUT, which dots_saveable keeps.
ATTENTION_OUTPUT = "attention_output"
KERNEL_LAYOUTS = ("in_out", "out_in")  # see GPTConfig.kernel_layout
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
    vocab_size: int = GPT2_PADDED_VOCAB_SIZE  # GPT-2's 50257 padded up to a multiple of 64 for speed.
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2.
    gelu_approximate: bool = True  # GPT-2's tanh "gelu_new"; nanoGPT's own models use exact erf GELU.
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16".
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS; None (older configs) means auto.
    scan_layers: bool = True  # the blocks as one nn.scan: compile time independent of n_layer
    remat: str = "none"  # one of REMAT_POLICIES, applied per block
    # How the blocks' matmul kernels are stored: "in_out" ([in, out], flax's and GPT-2's layout: training,
    # checkpoints, converters) or "out_in" (torch's nn.Linear order), which generate.decoding_layout picks
    # for batch 1 on CPU: XLA:CPU's matrix-vector product reads a weight by rows faster (docs/sampling.md).
    kernel_layout: str = "in_out"

    def __post_init__(self):
        if self.attention is None:
            object.__setattr__(self, "attention", "auto")
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION_IMPLEMENTATIONS}")
        if self.attention == "splash" and not splash_supports(self.block_size, self.head_dim):
            raise ValueError(f"attention='splash' needs block_size ({self.block_size}) a multiple of 128 and "
                             f"head_dim ({self.head_dim}) a multiple of 64: use attention='auto' or 'xla'")
        if self.kernel_layout not in KERNEL_LAYOUTS:
            raise ValueError(f"kernel_layout={self.kernel_layout!r}: choose one of {KERNEL_LAYOUTS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
        for field in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, field))  # raises TypeError on an unknown name
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention computes in bfloat16 or float16, not {self.dtype}: set dtype, "
                             "or use attention='xla'")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{"vocab_size": GPT2_VOCAB_SIZE, "block_size": 1024, "bias": True, **PRESETS[name], **overrides})

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if fields["kernel_layout"] == "in_out":  # a decoding-only setting: checkpoints stay readable by older code
            del fields["kernel_layout"]
        return fields

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5, use_bias=config.bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)))


def _residual_std(config: GPTConfig) -> float:
    return 0.02 / math.sqrt(2 * config.n_layer)  # nanoGPT's scaled init of the residual projections


class LayerCache(NamedTuple):
    """Keys and values of one layer for cached decoding, S slots, each laid out as its attention matmul
    reads it (q.k contracts D, p.v contracts S; batch and heads merged, as XLA batches the matmul), so that
    no decoding step copies the cache: k: [B*H, D, S] (keys transposed), v: [B*H, S, D]."""
    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, index) -> "LayerCache":
        """The cache with k, v: [B, T, H, D] written at slots index ... index + T - 1 (in place under jit)."""
        (B, T, H, D), dtype = k.shape, self.k.dtype
        k = k.transpose(0, 2, 3, 1).reshape(B * H, D, T).astype(dtype)
        v = v.transpose(0, 2, 1, 3).reshape(B * H, T, D).astype(dtype)
        return LayerCache(jax.lax.dynamic_update_slice_in_dim(self.k, k, index, axis=2),
                          jax.lax.dynamic_update_slice_in_dim(self.v, v, index, axis=1))

    @property
    def slots(self) -> int:
        """S, the number of slots (of one layer, or of each layer of a stacked cache)."""
        return self.v.shape[-2]

    def grow(self, slots: int) -> "LayerCache":
        """The cache with empty (zero) slots appended up to `slots`."""
        pad = slots - self.slots
        return LayerCache(jnp.pad(self.k, ((0, 0), (0, 0), (0, pad))), jnp.pad(self.v, ((0, 0), (0, pad), (0, 0))))


def _dense(cfg: GPTConfig, features: tuple[int, ...], n_in: int, std: float, names: tuple, name: str) -> nn.Module:
    """x @ W + b over x's last n_in axes -> [..., *features]; names: W's logical axes in [in..., out...]
    order. The module is flax's Dense (DenseGeneral for more than one axis) or, with kernel_layout "out_in",
    OutInDense: the same params, each kernel stored with its axes in the other order."""
    if cfg.kernel_layout == "out_in":
        return OutInDense(cfg, features, n_in, std, names, name=name)
    kw = dict(use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_init(std, names),
              bias_init=_zeros(names[n_in:]), name=name)
    if n_in == 1 and len(features) == 1:
        return nn.Dense(features[0], **kw)
    return nn.DenseGeneral(features if len(features) > 1 else features[0], axis=tuple(range(-n_in, 0)), **kw)


class OutInDense(nn.Module):
    """flax's DenseGeneral with the kernel stored [*features, *in] (torch's nn.Linear order), read as one
    [out, in] matrix contracted on its rows: XLA:CPU's matrix-vector product streams it faster than
    [in, out] (GPT-2 at batch 1: 11-17% more tokens/s, docs/sampling.md), and a contraction over several
    kernel axes would make XLA transpose the kernel on every call. For one device: the reshape merges the
    heads axis with c_attn's 3, which a tensor-parallel mesh would have to regather every call."""
    config: GPTConfig
    features: tuple[int, ...]
    n_in: int
    std: float
    names: tuple  # the kernel's logical axes in [in..., out...] order, as _dense takes them

    @nn.compact
    def __call__(self, x):
        """x: [..., *in] -> [..., *features]."""
        cfg, lead = self.config, x.shape[:-self.n_in]
        in_shape = x.shape[-self.n_in:]
        names = (*self.names[self.n_in:], *self.names[:self.n_in])
        kernel = self.param("kernel", _init(self.std, names), (*self.features, *in_shape), cfg.param_dtype)
        rows = kernel.reshape(math.prod(self.features), math.prod(in_shape)).astype(cfg.dtype)
        y = jax.lax.dot_general(x.reshape(*lead, -1).astype(cfg.dtype), rows, (((len(lead),), (1,)), ((), ())))
        y = y.reshape(*lead, *self.features)
        if cfg.bias:
            y = y + self.param("bias", _zeros(self.names[self.n_in:]), self.features, cfg.param_dtype).astype(cfg.dtype)
        return y


_KERNEL_INPUT_AXES = {("attn", "c_attn"): 1, ("attn", "c_proj"): 2, ("mlp", "c_fc"): 1, ("mlp", "c_proj"): 1}


def kernel_layout_of(params: dict) -> str:
    """How an unscanned tree's block kernels are stored: the MLP's c_fc is [C, 4C] "in_out", [4C, C] "out_in"."""
    if is_scanned(params) or "h_0" not in params:
        raise ValueError("kernel layouts are for unscanned params (h_0 ... h_{L-1}): convert_layers(params, False)")
    rows, columns = params["h_0"]["mlp"]["c_fc"]["kernel"].shape
    return "in_out" if rows < columns else "out_in"


def kernels_in_layout(params: dict, layout: str) -> dict:
    """Unscanned params with every block's kernel stored as `layout` says (see GPTConfig.kernel_layout):
    c_attn [C, 3, H, D] <-> [3, H, D, C], attn.c_proj [H, D, C] <-> [C, H, D], the MLP's [in, out] <-> [out, in].
    Other params, and kernels already in `layout`, are returned as they are."""
    source = kernel_layout_of(params)

    def move(path, x):
        keys = tuple(getattr(p, "key", None) for p in path)
        if layout == source or keys[-1] != "kernel" or not keys[0].startswith("h_"):
            return x
        n_in = _KERNEL_INPUT_AXES[keys[-3:-1]]
        leading = n_in if source == "in_out" else x.ndim - n_in
        return jnp.transpose(x, (*range(leading, x.ndim), *range(leading)))

    return jax.tree_util.tree_map_with_path(move, params)


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
        qkv = _dense(cfg, (3, cfg.n_head, cfg.head_dim), 1, 0.02, ("embed", None, "heads", "kv"), "c_attn")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, D]
        if cache is not None:
            if mask is None:
                raise ValueError("cached attention needs an explicit mask [B, T, S]")
            cache = cache.write(k, v, cache_index)
            y = _cached_attention(q, cache, mask)
        elif cfg.dropout > 0 and not deterministic:
            y = _attention_with_dropout(q, k, v, mask, nn.Dropout(cfg.dropout, name="attn_dropout"))
        elif (mask is None and resolve_attention(cfg, jax.default_backend()) == "splash"
              and splash_supports(q.shape[1], cfg.head_dim)):  # else (init's 1 token) XLA's attention
            from flaxgpt.splash import splash_causal_attention
            y = checkpoint_name(splash_causal_attention(q, k, v), ATTENTION_OUTPUT)
        else:  # an explicit mask always takes XLA's attention
            implementation = resolve_attention(cfg, jax.default_backend()) if mask is None else "xla"
            implementation = {"auto": None, "splash": "xla"}.get(implementation, implementation)
            y = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=None if mask is None else mask[:, None],
                is_causal=mask is None, implementation=implementation)
            if implementation == "cudnn":
                y = checkpoint_name(y, ATTENTION_OUTPUT)
        y = _dense(cfg, (cfg.n_embd,), 2, _residual_std(cfg), ("heads", "kv", "embed"), "c_proj")(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y, cache


def resolve_attention(config: GPTConfig, platform: str) -> str:
    """The attention implementation `config.attention` means on `platform` ("tpu", "gpu", "cpu").

    auto is splash on TPU when the kernel can take the shapes (splash_supports), cuDNN on GPUs when
    computing in bfloat16/float16 without dropout, else XLA. Explicit choices are returned as they are
    (train() checks that they suit the backend).
    """
    if config.attention != "auto":
        return config.attention
    if platform == "tpu" and splash_supports(config.block_size, config.head_dim):
        return "splash"
    if (platform in ("gpu", "cuda") and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
            and config.dropout == 0):
        return "cudnn"
    return "xla"


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


def _cached_attention(q, cache: LayerCache, mask):
    """q: [B, T, H, D] attending to the slots of the cache that mask [B, T, S] allows -> [B, T, H, D].

    As XLA's dot_product_attention (scores and softmax in float32), on the cache's own layout."""
    B, T, H, D = q.shape
    q = q.transpose(0, 2, 1, 3).reshape(B * H, T, D)
    k, v = cache
    scores = jnp.einsum("ntd,nds->nts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(B, H, T, -1) / math.sqrt(D)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(B * H, T, -1)
    y = jnp.einsum("nts,nsd->ntd", probs, v.astype(q.dtype))
    return y.reshape(B, H, T, D).transpose(0, 2, 1, 3)


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        """x: [B, T, C] -> [B, T, C]."""
        cfg = self.config
        dense = lambda features, std, names, name: _dense(cfg, (features,), 1, std, names, name)
        # The tokens as one [B*T, C] matrix: on [B, T, C] XLA:CPU writes the GELU backward transposed for the
        # c_fc weight gradient, a strided pass per layer (the CPU step is ~18% faster flat, docs/performance.md).
        B, T, C = x.shape
        h = dense(4 * cfg.n_embd, 0.02, ("embed", "mlp"), "c_fc")(x.reshape(B * T, C))
        h = _constrain(h, ("batch", "mlp"))
        h = gelu(h, approximate=cfg.gelu_approximate)
        h = dense(cfg.n_embd, _residual_std(cfg), ("mlp", "embed"), "c_proj")(h).reshape(B, T, C)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


def gelu(x, approximate: bool):
    """GELU of x (any shape): tanh's approximation (GPT-2's) or the exact x/2 (1 + erf(x/sqrt 2)).

    In float32 the exact one is computed as PyTorch's nn.GELU writes it: jax.nn.gelu's erfc form compiles on
    CPU into a piecewise polynomial with selects and an exp, erf into one rational polynomial (the CPU
    step's forward + backward ~5% faster, docs/performance.md); the two agree within 1e-6. In bfloat16,
    1 + erf cancels in the negative tail (errors of 3e-3), so other dtypes keep jax.nn.gelu's form.
    """
    if approximate or x.dtype != jnp.float32:
        return nn.gelu(x, approximate=approximate)
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.float32(math.sqrt(0.5))))


def _constrain(x, names: tuple[str | None, ...]):
    """x constrained to the sharding its logical axis names give on the mesh a TrainStep traces
    under (splash.kernel_mesh); elsewhere x as it is. linen's own constraint needs a global mesh,
    which would also constrain every param as it is unboxed."""
    return nn.with_logical_constraint(x, names, mesh=traced_mesh())


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, cache=None, mask=None, cache_index=0, deterministic=True):
        """Pre-LayerNorm transformer block. x: [B, T, C] -> ([B, T, C], cache).

        Positional arguments, as nn.scan and nn.remat pass them (x is the scan's carry, cache its
        per-layer input and output).
        """
        y, cache = CausalSelfAttention(self.config, name="attn")(
            layer_norm(self.config, "ln_1")(x), deterministic=deterministic, mask=mask, cache=cache,
            cache_index=cache_index)
        x = x + y
        x = x + MLP(self.config, name="mlp")(layer_norm(self.config, "ln_2")(x), deterministic=deterministic)
        return _constrain(x, ("batch", "length", "embed")), cache


class GPT(nn.Module):
    config: GPTConfig

    def __call__(self, idx, *, deterministic=True, positions=None, mask=None):
        """idx: [B, T] int tokens -> logits [B, T, V].

        positions: [B, T] position ids (default 0..T-1); mask: optional [B, T, T] bool, True where a query
        may attend to a key (e.g. causal and not padding); None is plain causal attention.
        """
        return self.forward(idx, deterministic=deterministic, positions=positions, mask=mask)[0]

    def hidden_states(self, idx, *, deterministic=True, positions=None, mask=None):
        """idx: [B, T] -> the final hidden states [B, T, C] (after ln_f), which the tied head turns
        into logits (`loss.head_cross_entropy` does so a chunk at a time). Arguments as in
        __call__."""
        return self.forward(idx, deterministic=deterministic, positions=positions, mask=mask,
                            hidden_only=True)[0]

    def decode(self, idx, cache, *, positions, mask, cache_index, head=None):
        """Cached decoding: idx [B, T] -> (logits of the last position [B, 1, V], the updated cache).

        positions: [B, T] position ids; mask: [B, T, S] bool, True where a query may attend to a cache slot;
        the keys and values of idx are written at cache slots cache_index ... cache_index + T - 1. `cache`
        is one LayerCache stacked over the layers ([L, ...]) with scan_layers, else a list of
        per-layer ones (see `init_cache`). head: optional [C, V], the tied lm_head laid out for x @ head
        (wte transposed once by a decoding loop: at batch 8 XLA:CPU runs the head in 14.5 ms this way and
        24 ms over wte [V, C], docs/sampling.md; at batch 1 the two are within the noise).
        """
        return self.forward(idx, positions=positions, mask=mask, cache=cache, cache_index=cache_index,
                            last_only=True, head=head)

    @nn.compact
    def forward(self, idx, *, deterministic=True, positions=None, mask=None, cache=None, cache_index=0,
                last_only=False, head=None, hidden_only=False):
        """What `__call__` and `decode` share: -> (logits [B, T or 1, V], the updated cache or
        None); hidden_only: the final hidden states [B, T or 1, C] instead of the logits."""
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
        # Gather the rows, then cast them: Embed's own call would cast the whole table every step.
        embed = lambda table, ids: jnp.take(table.embedding, ids, axis=0).astype(cfg.dtype)
        x = nn.Dropout(cfg.dropout)(embed(wte, idx) + embed(wpe, positions),
                                    deterministic=deterministic)
        x = _constrain(x, ("batch", "length", "embed"))
        block = Block
        if cfg.remat != "none":  # inside a scan, CSE cannot merge the recomputation away
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                             static_argnums=(5,))  # deterministic (self counts as 0)
        if cfg.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layer,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            blocks = _kernels_cast_on_entry(blocks, cfg, self.is_initializing())
            x, new_cache = blocks(cfg, name="h")(x, cache, mask, cache_index, deterministic)
        else:
            new_cache = []
            block = _kernels_cast_on_entry(block, cfg, self.is_initializing())
            for i in range(cfg.n_layer):
                x, layer_cache = block(cfg, name=f"h_{i}")(
                    x, None if cache is None else cache[i], mask, cache_index, deterministic)
                new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        x = layer_norm(cfg, "ln_f")(x)
        if hidden_only:
            return x, (None if cache is None else new_cache)
        logits = wte.attend(x) if head is None else x @ head.astype(x.dtype)  # lm_head tied to wte
        logits = _constrain(logits, ("batch", "length", "vocab"))
        return logits, (None if cache is None else new_cache)


def _kernels_cast_on_entry(module_class, config: GPTConfig, initializing: bool):
    """module_class (the scanned blocks, or one block), its matmul kernels and biases (c_attn,
    c_proj, c_fc) read already cast to the compute dtype: one cast of the stacked params per step,
    outside the layer scan and remat, instead of one per block in the forward pass and again in its
    recomputation (the backward pass then keeps those bf16 copies). LayerNorm params keep theirs."""
    if initializing or jnp.dtype(config.dtype) == jnp.dtype(config.param_dtype):
        return module_class

    def cast(variables):
        def leaf(path, x):
            parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
            return x.astype(config.dtype) if parent.startswith("c_") else x
        return jax.tree_util.tree_map_with_path(leaf, variables)

    return nn.map_variables(module_class, "params", trans_in_fn=cast, mutable=False)


def init_cache(config: GPTConfig, batch_size: int, length: int | None = None) -> LayerCache | list[LayerCache]:
    """Zeroed key/value caches with S = length or block_size: with scan_layers one LayerCache stacked over
    the layers (k: [L, B*H, D, S], v: [L, B*H, S, D]), else a list of L LayerCaches (see LayerCache)."""
    S, BH, D = length or config.block_size, batch_size * config.n_head, config.head_dim
    k_shape, v_shape = (BH, D, S), (BH, S, D)
    if config.scan_layers:
        k_shape, v_shape = (config.n_layer, *k_shape), (config.n_layer, *v_shape)
        return LayerCache(jnp.zeros(k_shape, config.dtype), jnp.zeros(v_shape, config.dtype))
    return [LayerCache(jnp.zeros(k_shape, config.dtype), jnp.zeros(v_shape, config.dtype))
            for _ in range(config.n_layer)]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: GPTConfig, rng: jax.Array) -> dict:
    """Unboxed float params of a freshly initialised GPT (see sharding.py for the sharded version)."""
    variables = GPT(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def stack_layers(params: dict) -> dict:
    """Unscanned params (h_0 ... h_{L-1}) -> scanned (h, every leaf stacked on a leading [L] axis)."""
    names = sorted((k for k in params if k.startswith("h_")), key=lambda k: int(k[2:]))
    if not names:
        return params
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return {**rest, "h": jax.tree.map(lambda *layers: jnp.stack(layers), *(params[k] for k in names))}


def unstack_layers(params: dict) -> dict:
    """Scanned params (h with a leading [L] axis) -> unscanned (h_0 ... h_{L-1})."""
    if "h" not in params:
        return params
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    return {**rest, **{f"h_{i}": jax.tree.map(lambda x: x[i], params["h"]) for i in range(n_layer)}}


def convert_layers(tree, scan_layers: bool):
    """Params, or any tree holding param-shaped dicts (optimizer state), in the given layer layout."""
    if isinstance(tree, dict):
        tree = stack_layers(tree) if scan_layers else unstack_layers(tree)
        return {k: convert_layers(v, scan_layers) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple, e.g. optax's ScaleByAdamState
        return type(tree)(*(convert_layers(v, scan_layers) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(convert_layers(v, scan_layers) for v in tree)
    return tree


def is_scanned(params: dict) -> bool:
    return "h" in params


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


def crop_vocab_size(params: dict, config: GPTConfig, vocab_size: int) -> tuple[dict, GPTConfig]:
    """Keep the first vocab_size rows of the (tied) token embedding, e.g. GPT-2's 50304 padded rows back to
    its 50257 tokens, so that padding tokens, which have no text, are never sampled or exported."""
    if vocab_size > config.vocab_size:
        raise ValueError(f"cannot grow vocab_size from {config.vocab_size} to {vocab_size}")
    params = dict(params, wte={"embedding": params["wte"]["embedding"][:vocab_size]})
    return params, config.replace(vocab_size=vocab_size)


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), nanoGPT's 6N + 12*L*H*Q*T (PaLM appendix B)."""
    T = seq_len or config.block_size
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * T
