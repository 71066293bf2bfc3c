"""Compile a config's train step for a Cloud TPU slice on any machine: memory per chip, FLOPs, a verdict.

libtpu (pip install "flaxgpt[tpu]") describes TPU topologies without TPUs. A step jitted over a mesh
of those compile-only devices compiles exactly as on the slice, and XLA's memory and cost analyses
give what each chip needs. The state and steps come from the same pieces training uses
(`compile_steps`); only the devices differ.
"""

import os
import re
import time
from pathlib import Path
from typing import NamedTuple

GiB = 2**30


class Slice(NamedTuple):
    """A Cloud TPU slice as libtpu names it."""
    topology: str  # e.g. "v5e:2x4": chip generation and chip grid
    chip_config: str  # "megacore" where a chip's two TensorCores act as one device (v4, v5p)
    chips_per_host_bounds: tuple[int, int, int]
    hbm_gib: float  # per chip
    device_kind: str  # a key of mfu.PEAK_FLOPS (dense bfloat16 peak per chip)


# The accelerator names users type (gcloud's --accelerator-type) -> topology. v4 and v5p count
# TensorCores (2 per chip), v5e and v6e count chips.
SLICES = {
    "v4-8": Slice("v4:2x2x1", "megacore", (2, 2, 1), 32, "TPU v4"),
    "v4-32": Slice("v4:2x2x4", "megacore", (2, 2, 1), 32, "TPU v4"),
    "v4-128": Slice("v4:4x4x4", "megacore", (2, 2, 1), 32, "TPU v4"),
    "v5e-8": Slice("v5e:2x4", "default", (2, 2, 1), 16, "TPU v5 lite"),
    "v5e-16": Slice("v5e:4x4", "default", (2, 2, 1), 16, "TPU v5 lite"),
    "v5e-256": Slice("v5e:16x16", "default", (2, 2, 1), 16, "TPU v5 lite"),
    "v5p-8": Slice("v5p:2x2x1", "megacore", (2, 2, 1), 95, "TPU v5p"),
    "v5p-128": Slice("v5p:4x4x4", "megacore", (2, 2, 1), 95, "TPU v5p"),
    "v6e-8": Slice("v6e:2x4", "default", (2, 2, 1), 32, "TPU v6 lite"),
    "v6e-256": Slice("v6e:16x16", "default", (2, 2, 1), 32, "TPU v6 lite"),
}


class OutOfMemory(Exception):
    """Compilation ran out of HBM; `needed_gib` as XLA reported it, when it did."""

    def __init__(self, needed_gib: float | None, message: str):
        super().__init__(message)
        self.needed_gib = needed_gib


def topology_devices(name: str):
    """The compile-only devices of a named slice. Needs libtpu; call before jax picks a backend."""
    if name not in SLICES:
        raise ValueError(f"unknown TPU slice {name!r}: choose one of {', '.join(SLICES)}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard with a lock
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('compiling for TPUs needs libtpu: pip install "flaxgpt[tpu]"')
    from jax.experimental import topologies
    spec = SLICES[name]
    return topologies.get_topology_desc(platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config,
                                        chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=1).devices


def compile_steps(config, devices, vocab_size: int):
    """The TrainStep, compiled train step and compiled eval step that `train(config)` would run on `devices`.

    The glue mirrors loop.train(): the same model config, optimizer, mesh and TrainStep; "auto" choices
    (dtype, attention) resolve for the target platform instead of this machine's.
    """
    from flaxgpt import optim, sharding
    from flaxgpt.config import model_config
    from flaxgpt.model import resolve_attention
    from flaxgpt.train_step import TrainStep
    import jax

    platform = devices[0].platform
    model = model_config(config, vocab_size, dtype="bfloat16" if config.dtype == "auto" else None)
    model = model.replace(attention=resolve_attention(model, platform))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % data_parallel:
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {data_parallel} "
                         "data-parallel devices (mesh data x fsdp)")
    step_fns = TrainStep(model, optim.make_optimizer(config), mesh, seed=config.seed)
    batch = lambda n: jax.ShapeDtypeStruct((n, config.batch_size, config.block_size), jax.numpy.int32,
                                           sharding=step_fns.batch_sharding)
    state = step_fns.abstract_state
    x = batch(config.gradient_accumulation_steps)
    train_step = step_fns.train_fn.lower(state, x, x).compile()
    eval_step = step_fns.eval_fn.lower(state.params, batch(config.eval_iters), batch(config.eval_iters)).compile()
    return step_fns, train_step, eval_step


def _gib(text: str, unit: str) -> float:
    return float(text) * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[unit.upper()]


def parse_out_of_memory(message: str) -> float | None:
    """GiB needed per chip from XLA's RESOURCE_EXHAUSTED message, or None if it does not say."""
    used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    if used:
        return _gib(*used.groups()[:2])
    temporaries = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return _gib(*temporaries.groups()) if temporaries else None


def suggest(config, arguments_gib: float, hbm_gib: float) -> str:
    """The knob to try first when a config does not fit."""
    if config.mesh.fsdp == 1 and config.mesh.tensor == 1 and arguments_gib > hbm_gib / 4:
        return "--config.mesh.fsdp=-1 --config.mesh.data=1 (shard params and optimizer state)"
    if config.remat != "full":
        return "--config.remat=full (recompute each block's activations in the backward pass)"
    if config.batch_size > 1:
        return (f"--config.batch_size={max(1, config.batch_size // 2)} --config.gradient_accumulation_steps="
                f"{2 * config.gradient_accumulation_steps} (same tokens per step)")
    return "a larger slice, or tensor parallelism (--config.mesh.tensor)"


def _replicated_state_gib(config) -> float:
    """Float32 params, gradients and Adam moments (16 bytes a parameter) of the whole model, in GiB."""
    C = config.n_embd
    n_params = 12 * config.n_layer * C * C + (_vocab_size(config) + config.block_size) * C
    return 16 * n_params / GiB


def _vocab_size(config) -> int:
    """The dataset's vocabulary if its folder is here, else GPT-2's padded one (as train() decides)."""
    from flaxgpt import data, tokenizer
    data_dir = Path(config.data_dir or Path("data") / config.dataset)
    return tokenizer.model_vocab_size(data.load_meta(data_dir) if data_dir.is_dir() else tokenizer.GPT2_META)


class Plan(NamedTuple):
    """What compiling for a slice found: fits, total GiB per chip (needed, when it did not compile), the
    chip's HBM, the compute-floor step time (None when it did not compile) and the compile seconds."""
    fits: bool
    total_gib: float | None
    hbm_gib: float
    floor_ms: float | None
    compile_s: float | None


def plan(config, slice_name: str, print_fn=print) -> Plan:
    """Compile for the slice and print the per-chip report and the verdict line."""
    devices = topology_devices(slice_name)
    spec = SLICES[slice_name]
    from flaxgpt import mfu
    from flaxgpt.model import count_params, flops_per_token

    start = time.perf_counter()
    try:
        step_fns, train_step, _ = compile_steps(config, devices, _vocab_size(config))
    except Exception as e:  # XlaRuntimeError; its class moves between jaxlib versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = parse_out_of_memory(str(e))
        amount = f"{needed:.2f} GiB" if needed is not None else "more than"
        print_fn(f"does not fit: {amount} of {spec.hbm_gib:.2f} GiB per chip: try "
                 f"{suggest(config, _replicated_state_gib(config), spec.hbm_gib)}")
        return Plan(False, needed, spec.hbm_gib, None, None)
    seconds = time.perf_counter() - start
    memory = train_step.memory_analysis()
    arguments = memory.argument_size_in_bytes / GiB
    outputs = memory.output_size_in_bytes / GiB
    aliased = memory.alias_size_in_bytes / GiB  # donated state: outputs written over the arguments
    temporaries = memory.temp_size_in_bytes / GiB
    code = memory.generated_code_size_in_bytes / GiB
    total = arguments + outputs - aliased + temporaries + code
    model, mesh = step_fns.model_config, step_fns.mesh
    A, B, T = config.gradient_accumulation_steps, config.batch_size, config.block_size
    n_chips = len(devices)
    cost = train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_chip = float(cost.get("flops", 0.0))
    n_params = count_params(step_fns.abstract_state.params)
    estimate = flops_per_token(model, n_params, T) * A * B * T
    peak = next(f for kind, f in mfu.PEAK_FLOPS if kind == spec.device_kind)
    floor_ms = estimate / (n_chips * peak) * 1e3
    print_fn(f"{slice_name} ({spec.topology}, {n_chips} chips): train step compiled in {seconds:.1f} s; mesh "
             f"{dict(mesh.shape)}, {n_params / 1e6:.0f}M params, {A} x {B} sequences x {T} tokens per step "
             f"({B // (mesh.shape['data'] * mesh.shape['fsdp'])} per chip per micro-step), remat {model.remat}, "
             f"attention {model.attention}, {model.dtype}")
    print_fn(f"memory per chip: arguments {arguments:.2f} GiB, outputs {outputs:.2f} GiB ({aliased:.2f} GiB of "
             f"them donated), temporaries {temporaries:.2f} GiB, code {code:.2f} GiB; total {total:.2f} GiB "
             f"of {spec.hbm_gib:.2f} GiB HBM")
    print_fn(f"FLOPs per step: {flops_per_chip * n_chips:.3e} from XLA's cost analysis ({n_chips} x "
             f"{flops_per_chip:.3e}; it counts a loop body once and Pallas kernels not at all), "
             f"{estimate:.3e} from 6N + 12*L*H*Q*T")
    print_fn(f"compute floor: {floor_ms:.1f} ms per step at {peak / 1e12:.0f} TFLOP/s bf16 per chip: a "
             f"step that takes t ms runs at {floor_ms:.1f}/t MFU at most")
    fits = total <= spec.hbm_gib
    if fits:
        print_fn(f"fits: {total:.2f} GiB of {spec.hbm_gib:.2f} GiB per chip")
    else:
        print_fn(f"does not fit: {total:.2f} GiB of {spec.hbm_gib:.2f} GiB per chip: try "
                 f"{suggest(config, arguments, spec.hbm_gib)}")
    return Plan(fits, total, spec.hbm_gib, floor_ms, seconds)
