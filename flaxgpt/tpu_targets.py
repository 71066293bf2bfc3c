"""Cloud TPU slices read from the names users type: "v5e-8", "v4-32", "v5litepod-16", several
slices joined over the data-center network as "2xv5e-256", and GKE's 4-chip hosts as
"v6e-8:hosts-of-4".

The names follow Google's accelerator types (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
  v5e (v5litepod) and v6e count chips: 1, 4, 8, 16, ... 256, a 2D torus as square as the count
    allows (8: 2x4, 128: 8x16).
  v4 and v5p count TensorCores, 2 per chip: 4, 8, 16 or 32 chips (2x2x1, 2x2x2, 2x2x4, 2x4x4), or
    whole 4x4x4 cubes as the most cubic AxBxC of multiples of 4 (v5p-768: 4x8x12), up to 4096 chips
    (v4) or 6144 (v5p, 16x16x24).
Hosts (one JAX process each) are the VMs a deployment has: v4 and v5p VMs hold 4 chips; v5e and v6e
slices up to 8 chips are one VM, larger ones VMs of 4 chips (Google's tables count 8-chip machines
as hosts, split into two 4-chip VMs). GKE can also run a 2x4 v5e or v6e as two 4-chip VMs
(ct5lp-hightpu-4t, ct6e-standard-4t): ":hosts-of-4" says so.
"""

import math
import re
from typing import NamedTuple


class Generation(NamedTuple):
    topology: str  # libtpu's name, e.g. "v5e"
    chip_config: str  # "megacore": a chip's two TensorCores act as one device
    cores_per_chip: int  # how the accelerator type counts: TensorCores (v4, v5p) or chips
    max_chips: int
    hbm_gib: float  # per chip


GENERATIONS = {
    "v4": Generation("v4", "megacore", 2, 4096, 32),
    "v5p": Generation("v5p", "megacore", 2, 6144, 95),
    "v5e": Generation("v5e", "default", 1, 256, 16),
    "v6e": Generation("v6e", "default", 1, 256, 32),
}
ALIASES = {"v5litepod": "v5e"}
SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
CUBE = 64  # chips in a 4x4x4 cube, the unit larger v4 and v5p slices are built from
HOSTS_OF_4 = ":hosts-of-4"
NAME = re.compile(r"(?:(\d+)x)?(v\d+[a-z]*|v5litepod)-(\d+)(:hosts-of-4)?")


class TpuSlices(NamedTuple):
    """`num_slices` identical slices of `generation`, each a `shape` grid of chips."""
    name: str
    generation: str  # key of GENERATIONS
    shape: tuple[int, ...]  # chips per torus axis, e.g. (2, 4) or (4, 4, 8)
    host_bounds: tuple[int, int, int]  # the chips of one host (VM), as a block of the grid
    num_slices: int

    @property
    def topology(self) -> str:
        return f"{GENERATIONS[self.generation].topology}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.host_bounds)

    def describe(self) -> str:
        """e.g. "2 x v5e:4x4 over DCN, 32 chips, 8 hosts of 4 chips"."""
        hosts = self.num_slices * self.chips // self.chips_per_host
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        dcn = " over DCN" if self.num_slices > 1 else ""
        per_host = self.chips_per_host
        chips = self.num_slices * self.chips
        return (f"{slices}{self.topology}{dcn}, {chips} chip{'s' * (chips > 1)}, {hosts} "
                f"host{'s' * (hosts > 1)} of {per_host} chip{'s' * (per_host > 1)}")


def is_tpu_name(name: str) -> bool:
    """Whether `name` is spelled as a TPU slice (valid or not): a generation we know, a count."""
    match = NAME.fullmatch(name.lower())
    return bool(match) and ALIASES.get(match.group(2), match.group(2)) in GENERATIONS


def parse(name: str) -> TpuSlices:
    """The slices a name describes; ValueError in one line listing the valid sizes otherwise."""
    match = NAME.fullmatch(name.lower())
    if not match or ALIASES.get(match.group(2), match.group(2)) not in GENERATIONS:
        raise ValueError(f"{name!r} is not a TPU slice: [Nx]<generation>-<size>[{HOSTS_OF_4}], "
                         f"generation one of {', '.join(GENERATIONS)} or v5litepod")
    count, generation, size, hosts_of_4 = match.groups()
    generation = ALIASES.get(generation, generation)
    num_slices, size = int(count or 1), int(size)
    gen = GENERATIONS[generation]
    shape = _shape(generation, size)
    if shape is None:
        raise ValueError(f"{name}: {generation}-{size} is not a {generation} slice; sizes: "
                         f"{valid_sizes(generation)}")
    if num_slices < 1:
        raise ValueError(f"{name}: the number of slices must be at least 1")
    if gen.cores_per_chip == 2 or math.prod(shape) > 8:
        bounds = (2, 2, 1)
    else:
        bounds = (*shape, 1) if len(shape) == 2 else shape
        if hosts_of_4 and math.prod(shape) == 8:
            bounds = (2, 2, 1)
    if hosts_of_4 and math.prod(shape) < 4:
        raise ValueError(f"{name}: a {generation}-{size} is smaller than a host of 4 chips")
    return TpuSlices(name, generation, shape, bounds, num_slices)


def _shape(generation: str, size: int) -> tuple[int, ...] | None:
    gen = GENERATIONS[generation]
    if size % gen.cores_per_chip:
        return None
    chips = size // gen.cores_per_chip
    if chips < 1 or chips > gen.max_chips:
        return None
    if gen.cores_per_chip == 1:  # a 2D torus: 1x1, 2x2, 2x4, 4x4, ... 16x16
        if chips & (chips - 1) or chips == 2:
            return None
        short = 2 ** ((chips.bit_length() - 1) // 2)
        return (short, chips // short)
    if chips in SMALL_3D:
        return SMALL_3D[chips]
    if chips % CUBE:
        return None
    # the most cubic A <= B <= C, each a multiple of 4: the smallest C, then the smallest B
    n = chips // CUBE
    a, b, c = min(((a, b, n // (a * b)) for a in range(1, n + 1) for b in range(a, n + 1)
                   if n % (a * b) == 0 and n // (a * b) >= b), key=lambda s: (s[2], s[1]))
    return (4 * a, 4 * b, 4 * c)


def valid_sizes(generation: str) -> str:
    """The accelerator-type sizes of a generation, as a short list."""
    gen = GENERATIONS[generation]
    if gen.cores_per_chip == 1:
        return ", ".join(f"{generation}-{2 ** k}" for k in range(9) if k != 1)
    small = [f"{generation}-{2 * chips}" for chips in SMALL_3D]
    return (f"{', '.join(small)}, then {generation}-{2 * CUBE}, {generation}-{4 * CUBE}, ... "
            f"(multiples of {2 * CUBE}) up to {generation}-{2 * gen.max_chips}")


def topology_devices(slices: TpuSlices) -> list:
    """libtpu's compile-only devices of the slices (no TPU needed): every device knows its host
    (process_index) and, with several slices, its slice (slice_index)."""
    from jax.experimental import topologies
    gen = GENERATIONS[slices.generation]
    return topologies.get_topology_desc(
        platform="tpu", topology_name=slices.topology, chip_config_name=gen.chip_config,
        chips_per_host_bounds=slices.host_bounds, num_slices=slices.num_slices).devices
