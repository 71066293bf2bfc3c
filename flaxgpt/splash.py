"""Causal attention through JAX's Pallas splash-attention kernel for TPUs. Shapes: B batch,
T length, H heads, D head size.

The kernel works on one sequence, [H, T, D], and does not scale the queries. Under a mesh it runs
inside shard_map: each device gets its rows of the batch (mesh data x fsdp) and, when the heads
divide by it, its heads (mesh tensor), as MaxText does; a sequence is never split.
"""

import contextvars
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from flaxgpt.sharding import traced_mesh

BLOCK = 128  # the kernel's tiles are multiples of the TPU's 128 lanes
# Run the kernel in Pallas interpret mode (any backend, slowly): for numerics checks on CPU.
INTERPRET = contextvars.ContextVar("flaxgpt_splash_interpret", default=False)


def splash_supports(seq_len: int, head_dim: int) -> bool:
    """Whether the kernel takes these shapes: the sequence must tile into 128-token blocks, and the
    head size be a multiple of 64 (GPT-2's 64 is padded to the 128 lanes by the kernel itself)."""
    return seq_len % BLOCK == 0 and head_dim % 64 == 0


def _kernel(seq_len: int, n_heads: int, interpret: bool):
    block = math.gcd(seq_len, 512)  # the largest of 128, 256, 512 that tiles the sequence
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * n_heads)
    with jax.ensure_compile_time_eval():  # the mask's block tables are constants, not traced values
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def splash_causal_attention(q, k, v):
    """Causal softmax attention. q, k, v: [B, T, H, D] -> [B, T, H, D]. The mesh is
    `sharding.traced_mesh` (which TrainStep sets), else jax's abstract mesh."""
    T, D = q.shape[1], q.shape[3]
    if not splash_supports(T, D):
        raise ValueError(f"splash attention needs the sequence length ({T}) to be a multiple of "
                         f"{BLOCK} and the head size ({D}) of 64: use attention='xla', or 'auto' "
                         "which falls back to it")
    k, v, interpret = k.astype(q.dtype), v.astype(q.dtype), INTERPRET.get()

    def attend(q, k, v):  # one device's share: [b, T, h, D] -> [b, T, h, D]
        kernel = jax.vmap(_kernel(q.shape[1], q.shape[2], interpret))
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b, h, T, D]
        out = kernel(heads_first(q / math.sqrt(D)), heads_first(k), heads_first(v))
        return jnp.swapaxes(out, 1, 2).astype(q.dtype)

    mesh = traced_mesh() or jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q, k, v)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if q.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()
    heads_divide = "tensor" in mesh.axis_names and q.shape[2] % mesh.shape["tensor"] == 0
    spec = P(batch_axes or None, None, "tensor" if heads_divide else None, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
