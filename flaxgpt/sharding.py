"""The device mesh, the logical axis rules, and sharded arrays built from per-process data.

The model names every parameter axis ("vocab", "embed", "heads", "kv", "mlp") and every activation
axis ("batch", "length", ...). One table below maps those names onto the mesh axes:
  data   - pure data parallel: the batch is split, parameters are replicated.
  fsdp   - ZeRO-3: the batch is split and parameters/optimizer state are split on their embed axis,
           gathered layer by layer as the step needs them.
  tensor - Megatron tensor parallel: attention heads, MLP hidden units and the vocabulary are split.
The scanned blocks' leading "layers" axis is never split.
"""

import contextlib
import contextvars
import math
from typing import Mapping

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("kv", None),
    # the stacked blocks' leading axis (scan_layers): every device holds all layers
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) from e.g. {"data": -1, "fsdp": 1, "tensor": 1}.

    One size may be -1: it takes the devices the others leave. The axes are Auto, as linen's logical
    partitioning needs (jax.make_mesh defaults to Explicit axes).
    """
    devices = jax.devices() if devices is None else devices
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}: the mesh axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by "
                             f"{known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are "
                         f"{len(devices)}; set one axis to -1 to take the rest")
    axis_shapes = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


_TRACED_MESH = contextvars.ContextVar("flaxgpt_traced_mesh", default=None)


@contextlib.contextmanager
def tracing_under(mesh: Mesh):
    """The mesh a model traced inside this context constrains its activations to and splash
    attention shard_maps over (TrainStep traces its steps so)."""
    token = _TRACED_MESH.set(mesh)
    try:
        yield
    finally:
        _TRACED_MESH.reset(token)


def traced_mesh() -> Mesh | None:
    """The mesh set by `tracing_under`, else None."""
    return _TRACED_MESH.get()


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree whose leaves may be boxed with logical axis names (unboxed result).

    A dimension that its mesh axes do not divide (a 65-token vocabulary over tensor=2, gpt2-xl's 25
    heads) is replicated instead of split.
    """
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)

    def fit(leaf, sharding: NamedSharding) -> NamedSharding:
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        divides = lambda dim, axes: axes is None or dim % math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)) == 0
        fitted = (axes if divides(dim, axes) else None for dim, axes in zip(leaf.shape, spec))
        return NamedSharding(mesh, P(*fitted))

    return jax.tree.map(fit, nn.meta.unbox(abstract_tree), shardings)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0,
                   rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a batch array, its `batch_axis` split over the mesh axes `rules` give "batch"."""
    spec = [None] * ndim
    spec[batch_axis] = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return NamedSharding(mesh, P(*spec))


def divisible_batch(batch_size: int, accumulation: int, data_parallel: int) -> tuple[int, int]:
    """(batch_size, gradient_accumulation_steps) whose batch divides over `data_parallel` devices
    and whose sequences per optimizer step come closest to batch_size x accumulation (then: the
    batch closest to batch_size), e.g. 48 x 10 over 256 devices -> 256 x 2."""
    sequences = batch_size * accumulation
    choices = [(k * data_parallel, max(1, round(sequences / (k * data_parallel))))
               for k in range(1, max(1, sequences // data_parallel) + 1)]
    return min(choices, key=lambda c: (abs(c[0] * c[1] - sequences), abs(c[0] - batch_size)))


def rows_by_process(sharding: NamedSharding, global_shape: tuple[int, ...],
                    batch_axis: int = 0) -> dict[int, np.ndarray]:
    """{process index: the sorted rows of the batch axis its devices hold}, for every process.

    A TPU slice orders its devices by physical position, so a process's rows need not be one block
    (v4-32 interleaves its 4 hosts along the data axis); `global_batch` takes them as they come.
    Works for compile-only topology devices too, which know their host."""
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map(global_shape).items():
        start, stop, step = index[batch_axis].indices(global_shape[batch_axis])
        rows.setdefault(device.process_index, set()).update(range(start, stop, step))
    return {process: np.array(sorted(r), dtype=np.int64) for process, r in sorted(rows.items())}


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...],
                 batch_axis: int = 0) -> np.ndarray:
    """The sorted rows of the batch axis that this process's devices hold (what it must read)."""
    return rows_by_process(sharding, global_shape, batch_axis)[jax.process_index()]


def global_batch(local: np.ndarray, rows: np.ndarray, sharding: NamedSharding,
                 global_shape: tuple[int, ...], batch_axis: int = 0) -> jax.Array:
    """The global array from this process's `rows` of it (`local` holds them, in that order, on
    batch_axis): each local device gets its own rows, wherever they sit in the batch. All processes
    call this together."""
    def device_piece(index):
        wanted = np.arange(*index[batch_axis].indices(global_shape[batch_axis]))
        piece = np.take(local, np.searchsorted(rows, wanted), axis=batch_axis)
        return piece[tuple(slice(None) if axis == batch_axis else i
                           for axis, i in enumerate(index))]
    return jax.make_array_from_callback(global_shape, sharding, device_piece)
