"""Compile a config's train and eval steps for accelerators this machine does not have: memory per
device, FLOPs, the compute floor and a one-line verdict.

Targets are named as users say them:
  Cloud TPU slices, "v5e-8", "v4-32" (gcloud's accelerator types), several of them joined over the
    data-center network as "2xv5e-256", GKE's 4-chip hosts as "v6e-8:hosts-of-4"
    (flaxgpt/tpu_targets.py): libtpu describes their topologies without TPUs (pip install
    "flaxgpt[tpu]").
  NVIDIA GPUs, "h100-8", "a100-1", "h200-16": <gpu>-<count>, 8 GPUs to a host. JAX's CUDA plugin
    compiles for a GpuTargetConfigProto from flaxgpt/gpu_targets/ (each file says where its values
    come from) without a GPU (pip install "flaxgpt[gpu-compile]").
A step jitted over a mesh of those compile-only devices compiles as on the machine, and XLA's memory
analysis gives what each device needs. The state and steps come from the same pieces training uses
(`compile_steps`); only the devices differ.
"""

import functools
import importlib.util
import os
import re
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flaxgpt import tpu_targets
from flaxgpt.quiet_import import start_up_lines_dropped

GiB = 2**30


# The GPUs users name -> the GpuTargetConfigProto (text format) in gpu_targets/ that describes one.
GPU_TARGETS = Path(__file__).resolve().parent / "gpu_targets"
GPUS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
GPUS_PER_HOST = 8
CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
GPU_MEMORY_FRACTION = 0.75  # of each GPU's memory: what JAX's allocator takes unless told otherwise


class Target(NamedTuple):
    """A machine to compile for: its compile-only devices and the memory a step may use on each."""
    name: str  # as the user typed it, e.g. "v5e-8" or "h100-8"
    description: str  # e.g. "v5e:2x4, 8 chips" or "8 x NVIDIA H100 80GB HBM3, 1 host"
    devices: list
    memory_gib: float  # per device
    memory_note: str  # where memory_gib comes from
    unit: str  # what a device is called: "chip" or "GPU"


def target_named(name: str) -> Target:
    """The compile-only devices of TPU slices or a GPU machine, by name. Call before jax picks a
    backend; without a GPU here, GPU targets need JAX_PLATFORMS without CUDA (e.g. cpu)."""
    if tpu_targets.is_tpu_name(name):
        return _tpu_target(name)
    match = re.fullmatch(r"([a-z]\d+)-(\d+)", name.lower())
    if match and match.group(1) in GPUS:
        return _gpu_target(name, match.group(1), int(match.group(2)))
    raise ValueError(f"unknown target {name!r}: Cloud TPU slices as [Nx]<tpu>-<size> (tpu one of "
                     f"{', '.join(tpu_targets.GENERATIONS)}, v5litepod; e.g. v5e-8, 2xv5p-128) or "
                     f"NVIDIA GPUs as <gpu>-<count>, gpu one of {', '.join(GPUS)} (e.g. h100-8; "
                     f"more than {GPUS_PER_HOST} are hosts of {GPUS_PER_HOST})")


def _tpu_target(name: str) -> Target:
    slices = tpu_targets.parse(name)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to lock
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('compiling for TPUs needs libtpu: pip install "flaxgpt[tpu]"')
    with start_up_lines_dropped():  # libtpu's lines that it has no TPU
        devices = tpu_targets.topology_devices(slices)
    hbm_gib = tpu_targets.GENERATIONS[slices.generation].hbm_gib
    return Target(name, slices.describe(), devices, hbm_gib, "HBM", "chip")


def _gpu_target(name: str, gpu: str, count: int) -> Target:
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ValueError(f"{name}: count 1 to {GPUS_PER_HOST} GPUs, or a multiple of "
                         f"{GPUS_PER_HOST} (hosts of {GPUS_PER_HOST})")
    if not any(importlib.util.find_spec(plugin) for plugin in CUDA_PLUGINS):
        raise RuntimeError("compiling for GPUs needs the CUDA plugin: "
                           'pip install "flaxgpt[gpu-compile]"')
    text = (GPU_TARGETS / GPUS[gpu]).read_text()
    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    from jax.experimental import topologies
    try:
        with start_up_lines_dropped():  # the CUDA plugin's lines that it has no GPU
            devices = topologies.get_topology_desc(platform="cuda", target_config=text,
                                                   topology=f"1x{hosts}x{per_host}").devices
    except Exception as e:  # the plugin's errors (JaxRuntimeError, ValueError) share no class
        raise RuntimeError(f"the CUDA plugin could not describe {name}: {str(e).splitlines()[0]} "
                           "(without a GPU here, start python with JAX_PLATFORMS=cpu)") from e
    memory_gib = int(re.search(r"device_memory_size: (\d+)", text).group(1)) / GiB
    fraction = gpu_memory_fraction()
    note = (f"JAX's allocator pool: {fraction:.0%} of the GPU's {memory_gib:.2f} GiB; "
            "XLA_CLIENT_MEM_FRACTION sets the share")
    description = f"{count} x {devices[0].device_kind}, {hosts} host{'s' * (hosts > 1)}"
    return Target(name, description, devices, fraction * memory_gib, note, "GPU")


def gpu_memory_fraction() -> float:
    """The share of each GPU's memory that JAX's allocator takes: XLA_CLIENT_MEM_FRACTION (or its
    old name XLA_PYTHON_CLIENT_MEM_FRACTION) as set in this environment, else JAX's default."""
    value = (os.environ.get("XLA_CLIENT_MEM_FRACTION")
             or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    return float(value) if value else GPU_MEMORY_FRACTION


@functools.cache
def cudnn_attention_unavailable() -> str | None:
    """Why jax cannot lower cuDNN's fused attention here, or None if it can. jax picks the kernel
    from the local cuDNN library's version, so the library (not a GPU) must be present."""
    import jax
    q = jax.ShapeDtypeStruct((1, 128, 1, 64), jax.numpy.bfloat16)  # [B, T, H, D]
    attention = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                  implementation="cudnn")
    try:
        jax.eval_shape(attention, q, q, q)
    except RuntimeError as e:
        return str(e)
    return None


def compile_steps(config, devices, vocab_size: int, print_fn=print, eval_step: bool = True):
    """The TrainStep, compiled train step and compiled eval step (None without eval_step) that
    `train(config)` would run on `devices`.

    The run is built as train() builds it (run.make_mesh, run.build); "auto" choices (dtype,
    attention) resolve for the target platform instead of this machine's. Where jax cannot lower
    cuDNN attention here, it is compiled as XLA attention, with a line saying so.
    """
    from flaxgpt import run
    from flaxgpt.config import model_config
    from flaxgpt.model import resolve_attention
    import jax

    platform = devices[0].platform
    model = model_config(config, vocab_size, dtype="bfloat16" if config.dtype == "auto" else None)
    model = model.replace(attention=resolve_attention(model, platform))
    if model.attention == "cudnn" and (reason := cudnn_attention_unavailable()):
        print_fn(f"attention: compiled as xla, not cudnn, as jax cannot lower cuDNN attention here "
                 f"({reason.rstrip('.')}: pip install nvidia-cudnn-cu12); XLA attention keeps "
                 "[B, H, T, T] scores, so the memory below is more than the GPU run needs")
        model = model.replace(attention="xla")
    train_step = run.build(config, model, run.make_mesh(config, devices))

    def batch(n):
        return jax.ShapeDtypeStruct((n, config.batch_size, config.block_size), jax.numpy.int32,
                                    sharding=train_step.batch_sharding)

    state = train_step.abstract_state
    x, x_eval = batch(config.gradient_accumulation_steps), batch(config.eval_iters)
    compiled_train = train_step.train_fn.lower(state, x, x).compile()
    compiled_eval = (train_step.eval_fn.lower(state.params, x_eval, x_eval).compile()
                     if eval_step else None)
    return train_step, compiled_train, compiled_eval


def _gib(text: str, unit: str) -> float:
    return float(text) * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[unit.upper()]


def parse_out_of_memory(message: str) -> float | None:
    """GiB needed per chip from XLA's RESOURCE_EXHAUSTED message, or None if it does not say."""
    used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    if used:
        return _gib(*used.groups()[:2])
    temporaries = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return _gib(*temporaries.groups()) if temporaries else None


def suggest(config, arguments_gib: float, memory_gib: float) -> str:
    """The knob to try first when a config does not fit."""
    if config.mesh.fsdp == 1 and config.mesh.tensor == 1 and arguments_gib > memory_gib / 4:
        return "--config.mesh.fsdp=-1 --config.mesh.data=1 (shard params and optimizer state)"
    if config.remat != "full":
        return "--config.remat=full (recompute each block's activations in the backward pass)"
    if config.batch_size > 1:
        return (f"--config.batch_size={max(1, config.batch_size // 2)} "
                f"--config.gradient_accumulation_steps={2 * config.gradient_accumulation_steps} "
                "(same tokens per step)")
    return "more devices, or tensor parallelism (--config.mesh.tensor)"


def _replicated_state_gib(config) -> float:
    """Float32 params, gradients and Adam moments (16 bytes a parameter) of the model, in GiB."""
    C = config.n_embd
    n_params = 12 * config.n_layer * C * C + (_vocab_size(config) + config.block_size) * C
    return 16 * n_params / GiB


def _vocab_size(config) -> int:
    """The dataset's vocabulary if its folder is here, else GPT-2's padded one (as in train());
    data_dir's bucket must be reachable."""
    from flaxgpt import data
    return data.model_vocab_size(config, unprepared_is_gpt2=True)


def batch_for_target(config, devices, print_fn=print):
    """The config, with batch_size and gradient_accumulation_steps changed (and a line saying so)
    when its batch does not divide over the target's data-parallel devices."""
    from flaxgpt import sharding
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    A, B = config.gradient_accumulation_steps, config.batch_size
    if B % data_parallel == 0:
        return config
    batch, accumulation = sharding.divisible_batch(B, A, data_parallel)
    sequences = (f"the same {A * B} sequences per step" if batch * accumulation == A * B else
                 f"{batch * accumulation} sequences per step instead of {A * B}")
    print_fn(f"batch: batch_size={B} does not divide over the {data_parallel} data-parallel "
             f"devices, so this compiles --config.batch_size={batch} "
             f"--config.gradient_accumulation_steps={accumulation} "
             f"({sequences}); set both to choose another split")
    config = config.copy_and_resolve_references()
    config.batch_size, config.gradient_accumulation_steps = batch, accumulation
    return config


def host_rows(train_step, batch_size: int) -> str:
    """The per-host row plan of the target's batch, as training reads it
    (`sharding.rows_by_process`), checked: every row of the batch is read by some host. -> a line
    describing it."""
    from flaxgpt import sharding
    rows = sharding.rows_by_process(train_step.batch_sharding, (1, batch_size, 1), batch_axis=1)
    read = np.concatenate(list(rows.values()))
    if set(read.tolist()) != set(range(batch_size)):
        raise AssertionError(f"the hosts' rows {rows} do not cover the batch of {batch_size}")
    first, last = rows[min(rows)], rows[max(rows)]
    shared = ("; rows read by several hosts (a mesh axis that does not split the batch spans hosts)"
              if len(read) > batch_size else "")
    slices = sharding.num_slices(train_step.mesh.devices.flat)
    where = f" in {slices} slices" if slices > 1 else ""
    layout = "one block" if len(_blocks(first)) == 1 else "interleaved"
    shown = f"host {min(rows)}: rows {_shown(first)}"
    if len(rows) > 1:
        shown += f"; host {max(rows)}: rows {_shown(last)}"
    return (f"per-host rows: {len(rows)} host{'s' * (len(rows) > 1)}{where}, each reads "
            f"{len(first)} of the {batch_size} rows of a micro-batch ({layout}; {shown})"
            f"{shared}: ok")


def _blocks(rows: np.ndarray) -> list[np.ndarray]:
    return np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)


def _shown(rows: np.ndarray) -> str:
    """e.g. "0-3, 16-19, ..." (at most 4 runs of consecutive rows)."""
    blocks = _blocks(rows)
    shown = ", ".join(f"{b[0]}-{b[-1]}" if len(b) > 1 else f"{b[0]}" for b in blocks[:4])
    return shown + (", ..." if len(blocks) > 4 else "")


def _report_replicated(caught: list, print_fn) -> str | None:
    """Print the replicated-weights warnings (warn the others again); -> the first one's fix."""
    messages = [str(w.message) for w in caught if "weights replicated" in str(w.message)]
    for message in messages:
        print_fn(message)
    for w in caught:
        if "weights replicated" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return messages[0].rsplit(": ", 1)[1] if messages else None


class Plan(NamedTuple):
    """What compiling for a target found: fits, total GiB per device (needed, when it did not
    compile), the memory a device offers, the compute-floor step time (None when it did not
    compile) and the compile seconds."""
    fits: bool
    total_gib: float | None
    memory_gib: float
    floor_ms: float | None
    compile_s: float | None


def plan(config, target_name: str, print_fn=print) -> Plan:
    """Compile for the target and print the per-device report and the verdict line."""
    target = target_named(target_name)
    unit, limit = target.unit, target.memory_gib
    from flaxgpt import mfu
    from flaxgpt.model import count_params

    config = batch_for_target(config, target.devices, print_fn)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as replicated:
            warnings.simplefilter("always")
            train_step, compiled_train, _ = compile_steps(config, target.devices,
                                                          _vocab_size(config), print_fn)
    except Exception as e:  # XlaRuntimeError; its class moves between jaxlib versions
        if "libdevice not found" in str(e):  # XLA links CUDA's math library into GPU kernels
            raise RuntimeError("compiling for GPUs needs CUDA's libdevice: pip install "
                               'nvidia-cuda-nvcc-cu12 (in "flaxgpt[gpu-compile]")') from e
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = parse_out_of_memory(str(e))
        amount = f"{needed:.2f} GiB" if needed is not None else "more than"
        knob = _report_replicated(replicated, print_fn) or suggest(
            config, _replicated_state_gib(config), limit)
        print_fn(f"does not fit: {amount} of {limit:.2f} GiB per {unit}: try {knob}")
        return Plan(False, needed, limit, None, None)
    fix = _report_replicated(replicated, print_fn)
    seconds = time.perf_counter() - start
    memory = compiled_train.memory_analysis()
    arguments = memory.argument_size_in_bytes / GiB
    outputs = memory.output_size_in_bytes / GiB
    aliased = memory.alias_size_in_bytes / GiB  # donated state: outputs written over the arguments
    temporaries = memory.temp_size_in_bytes / GiB
    code = memory.generated_code_size_in_bytes / GiB
    total = arguments + outputs - aliased + temporaries + code
    model, mesh = train_step.model_config, train_step.mesh
    A, B, T = config.gradient_accumulation_steps, config.batch_size, config.block_size
    n_devices = len(target.devices)
    cost = compiled_train.cost_analysis()  # None for GPUs
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = count_params(train_step.abstract_state.params)
    estimate = mfu.flops_per_token(model, n_params, T) * A * B * T
    peak = mfu.listed_peak_flops(target.devices[0].device_kind)
    floor_ms = estimate / (n_devices * peak) * 1e3
    attention = model.attention
    if attention == "cudnn":
        attention += " (its workspace, sized by cuDNN on the GPU, is not counted)"
    per_device = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    print_fn(f"{target.name} ({target.description}): train step compiled in {seconds:.1f} s; mesh "
             f"{dict(mesh.shape)}, {n_params / 1e6:.0f}M params, {A} x {B} sequences x {T} tokens "
             f"per step ({per_device} per {unit} per micro-step), remat {model.remat}, attention "
             f"{attention}, {model.dtype}")
    print_fn(f"memory per {unit}: arguments {arguments:.2f} GiB, outputs {outputs:.2f} GiB "
             f"({aliased:.2f} GiB of them donated), temporaries {temporaries:.2f} GiB, code "
             f"{code:.2f} GiB; total {total:.2f} GiB of {limit:.2f} GiB ({target.memory_note})")
    if cost and cost.get("flops"):
        flops = float(cost["flops"])
        from_xla = (f"{flops * n_devices:.3e} from XLA's cost analysis ({n_devices} x {flops:.3e}; "
                    "it counts a loop body once and Pallas kernels not at all), ")
    else:
        from_xla = "XLA's cost analysis gives none for this target; "
    print_fn(host_rows(train_step, B))
    print_fn(f"FLOPs per step: {from_xla}{estimate:.3e} from 6N + 12*L*H*Q*T")
    print_fn(f"compute floor: {floor_ms:.1f} ms per step at {peak / 1e12:.0f} TFLOP/s bf16 per "
             f"{unit}: a step that takes t ms runs at {floor_ms:.1f}/t MFU at most")
    fits = total <= limit
    if fits:
        print_fn(f"fits: {total:.2f} GiB of {limit:.2f} GiB per {unit}")
    else:
        print_fn(f"does not fit: {total:.2f} GiB of {limit:.2f} GiB per {unit}: try "
                 f"{fix or suggest(config, arguments, limit)}")
    return Plan(fits, total, limit, floor_ms, seconds)
