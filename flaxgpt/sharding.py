"""The device mesh, the logical axis rules, and sharded arrays built from per-process data.

The model names every parameter axis ("vocab", "embed", "heads", "kv", "mlp") and every activation
axis ("batch", "length", ...). One table below maps those names onto the mesh axes:
  data   - pure data parallel: the batch is split, parameters are replicated.
  fsdp   - ZeRO-3: the batch is split and parameters/optimizer state are split on their embed axis,
           gathered layer by layer as the step needs them.
  tensor - Megatron tensor parallel: attention heads, MLP hidden units and the vocabulary are split.
The scanned blocks' leading "layers" axis is never split.
"""

import collections
import contextlib
import contextvars
import itertools
import math
import warnings
from typing import Mapping

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
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

    One size may be -1: it takes the devices the others leave; fsdp=-1 takes the largest part that
    divides the model width (shape["n_embd"], which config.mesh carries) and data the rest, so no
    weight is replicated. Devices of several TPU slices form a hybrid mesh: data spans the slices,
    fsdp and tensor stay inside one. The axes are Auto, as linen's logical partitioning needs.
    """
    devices = jax.devices() if devices is None else list(devices)
    unknown = set(shape) - set(MESH_AXES) - {"n_embd"}
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}: the mesh axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    n, slices = len(devices), num_slices(devices)
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % known:
            raise ValueError(f"mesh {dict(shape)}: {n} devices are not divisible by {known}")
        sizes[free[0]] = n // known
        if free == ["fsdp"] and (n // slices) % sizes["tensor"] == 0:
            # as many as divide the model width and fit in a slice; data takes the rest
            fsdp = math.gcd(sizes["fsdp"], int(shape.get("n_embd") or sizes["fsdp"]),
                            n // slices // sizes["tensor"])
            sizes["data"] *= sizes["fsdp"] // fsdp
            sizes["fsdp"] = fsdp
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are "
                         f"{n}; set one axis to -1 to take the rest")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types,
                             devices=devices)
    inner = sizes["fsdp"] * sizes["tensor"]
    if sizes["data"] % slices or (n // slices) % inner:
        raise ValueError(f"mesh {sizes} over {slices} slices of {n // slices} devices: data must "
                         f"be a multiple of {slices} (it spans the slices) and fsdp x tensor "
                         f"({inner}) must divide {n // slices} (they stay inside a slice)")
    array = mesh_utils.create_hybrid_device_mesh(
        (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"]), (slices, 1, 1), devices,
        allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def num_slices(devices) -> int:
    """How many TPU slices the devices span (1 for devices that know no slice)."""
    return len({getattr(device, "slice_index", 0) for device in devices})


_TRACED_MESH = contextvars.ContextVar("flaxgpt_traced_mesh", default=None)


@contextlib.contextmanager
def tracing_under(mesh: Mesh):
    """The mesh a model traced inside this context constrains its activations to and splash
    attention shard_maps over (`traced_mesh()`; TrainStep traces its steps so)."""
    token = _TRACED_MESH.set(mesh)
    try:
        yield
    finally:
        _TRACED_MESH.reset(token)


traced_mesh = _TRACED_MESH.get  # the mesh set by `tracing_under`, else None


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree whose leaves may be boxed with logical axis names (unboxed result).
    A dimension that its mesh axes do not divide (a 65-token vocabulary over tensor=2, gpt2-xl's 25
    heads) is replicated instead of split, with a warning that names the dimension and the fix."""
    names = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(names, mesh, rules)
    replicated = collections.Counter()  # (logical name, dim, mesh axes) -> arrays

    def fit(leaf, logical, sharding: NamedSharding) -> NamedSharding:
        fitted = []  # spec and names may be shorter than the shape: the rest is not split
        for dim, axes, name in itertools.zip_longest(leaf.shape, sharding.spec, logical or ()):
            axes_tuple = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if dim % math.prod(mesh.shape[a] for a in axes_tuple):
                replicated[name, dim, axes_tuple] += 1
                axes = None
            fitted.append(axes)
        return NamedSharding(mesh, P(*fitted))

    result = jax.tree.map(fit, nn.meta.unbox(abstract_tree), names, shardings)
    for (name, dim, axes), count in replicated.items():
        split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        fix = (f"set --config.mesh.fsdp to a divisor of {dim} (fsdp=-1 takes the largest) and "
               "give the other devices to --config.mesh.data" if axes == ("fsdp",) else
               f"set --config.mesh.{axes[-1]} so that {split.replace(' x ', ' * ')} divides {dim}")
        warnings.warn(f"weights replicated, not split: the {name} dimension ({dim}) of {count} "
                      f"arrays does not divide by {split}, so every device of that axis holds "
                      f"them whole: {fix}", stacklevel=2)
    return result


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
    """{process index: the sorted rows of the batch axis its devices hold}, for every process (also
    of compile-only topology devices). A TPU slice orders its devices by physical position, so a
    process's rows need not be one block (v4-32 interleaves its 4 hosts along the data axis)."""
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
