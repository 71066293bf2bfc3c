"""The per-device memory tables of docs/scaling.md: every GPT-2 size compiled for TPU slices or GPUs
on this CPU (flaxgpt/compile_for.py).

    python benchmarks/memory_table.py [--targets v5e-8,v5e-256,v5p-128,v6e-8,2xv5e-256]
                                      [--sizes gpt2,gpt2-xl] [--no_search]
    python benchmarks/memory_table.py --targets h100-8 --grid

Each size is configs/owt.py with the preset's shape, block 1024, bfloat16, AdamW and one micro-batch
per step. Without --grid, each size takes its mesh, remat policy and first per-device batch from
SETTINGS below; with --grid, every mesh (data parallel, FSDP) and remat policy (none, full);
--remats overrides the policies. "fsdp" is --config.mesh.data=1 --config.mesh.fsdp=-1: FSDP as
large as the model width allows, the other devices data parallel (the "mesh" column shows the
result). For each target, the largest sequences-per-device micro-batch of 1, 2, 4, ... 64 whose
train step fits is searched, starting at --start (else SETTINGS') and doubling or halving from
there; --no_search compiles that first batch only. Prints a markdown table of per-device memory at
that batch and the compute-floor step time (FLOPs / peak bf16 FLOP/s; 6N + 12*L*H*Q*T per token).
Needs libtpu for TPU slices (pip install -e ".[tpu]"), the CUDA plugin for GPUs
(".[gpu-compile]"); nothing runs on an accelerator.
"""

import argparse
import ast
import io
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs it uninstalled

from configs import owt  # noqa: E402
from flaxgpt import compile_for  # noqa: E402
from flaxgpt.model import PRESETS  # noqa: E402

MESHES = {"data": {"data": -1, "fsdp": 1}, "fsdp": {"data": 1, "fsdp": -1}}
# size -> (mesh, remat, first per-device batch): data parallel while the replicated state fits,
# FSDP beyond, full remat for the largest.
SETTINGS = {
    "gpt2": ("data", "none", 16),
    "gpt2-medium": ("fsdp", "none", 4),
    "gpt2-large": ("fsdp", "dots_with_no_batch_dims_saveable", 8),
    "gpt2-xl": ("fsdp", "full", 16),
}
GRID = [(mesh, remat) for mesh in MESHES for remat in ("none", "full")]
PER_DEVICE = (1, 2, 4, 8, 16, 32, 64)


def config_for(size: str, target_name: str, per_device: int, mesh: str, remat: str):
    c = owt.get_config()
    c.n_layer, c.n_head, c.n_embd = (PRESETS[size][k] for k in ("n_layer", "n_head", "n_embd"))
    c.mesh.data, c.mesh.fsdp = MESHES[mesh]["data"], MESHES[mesh]["fsdp"]
    c.remat = remat
    c.batch_size = per_device * len(compile_for.target_named(target_name).devices)  # v4-8: 4 chips
    c.gradient_accumulation_steps = 1
    c.eval_iters = 1
    return c


def compile_quietly(size, target_name, per_device, mesh, remat) -> tuple[compile_for.Plan, str]:
    """The plan and the mesh it compiled, e.g. "data 4 x fsdp 64"."""
    lines = []
    with redirect_stdout(io.StringIO()):
        config = config_for(size, target_name, per_device, mesh, remat)
        result = compile_for.plan(config, target_name, print_fn=lines.append)
    sizes = re.search(r"mesh (\{[^}]*\})", " ".join(lines))
    shape = ast.literal_eval(sizes.group(1)) if sizes else {}
    return result, " x ".join(f"{axis} {n}" for axis, n in shape.items() if n > 1) or "1 device"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", "--slices", default="v5e-8,v5e-256,v5p-128,v6e-8,2xv5e-256")
    p.add_argument("--sizes", default=",".join(PRESETS))
    p.add_argument("--grid", action="store_true", help="every mesh and remat policy, not SETTINGS'")
    p.add_argument("--remats", help="remat policies, comma-separated (not SETTINGS', --grid's)")
    p.add_argument("--start", type=int, help="the per-device batch the search starts at "
                   "(default: SETTINGS')")
    p.add_argument("--no_search", action="store_true", help="compile the first batch only")
    args = p.parse_args(argv)
    targets, sizes = args.targets.split(","), args.sizes.split(",")
    unit = compile_for.target_named(targets[0]).unit
    column = "slice" if unit == "chip" else "GPUs"
    print(f"| model | {column} | mesh | remat | seqs/{unit} | GiB per {unit} | fits | "
          "compute floor | compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        settings = GRID if args.grid else [SETTINGS[size][:2]]
        if args.remats:
            remats = args.remats.split(",")
            settings = [(mesh, remat) for mesh in dict(settings) for remat in remats]
        start = args.start or SETTINGS[size][2]
        for mesh, remat in settings:
            for target_name in targets:
                per_device, (result, shape) = largest_fitting(size, target_name, mesh, remat,
                                                              start, not args.no_search)
                used = (f"{result.total_gib:.2f} of {result.memory_gib:.0f}" if result.total_gib
                        else f"> {result.memory_gib:.0f}")
                floor = f"{result.floor_ms:.1f} ms" if result.floor_ms else "-"
                seconds = f"{result.compile_s:.0f} s" if result.compile_s else "-"
                print(f"| {size} | {target_name} | {shape} | {remat} | {per_device} | {used} | "
                      f"{'yes' if result.fits else 'no'} | {floor} | {seconds} |", flush=True)


def largest_fitting(size, target_name, mesh, remat, start, search=True):
    """The largest per-device batch in PER_DEVICE that fits the target, and its (plan, mesh) (those
    of the smallest batch when none fits): from `start`, doubling while it fits, else halving until
    it does; without `search`, `start` and its plan."""
    i = PER_DEVICE.index(start)
    plans = {i: compile_quietly(size, target_name, PER_DEVICE[i], mesh, remat)}
    step = 1 if plans[i][0].fits else -1
    while search and 0 <= i + step < len(PER_DEVICE) and plans[i][0].fits == (step == 1):
        i += step
        plans[i] = compile_quietly(size, target_name, PER_DEVICE[i], mesh, remat)
    best = max((j for j, (result, _) in plans.items() if result.fits), default=min(plans))
    return PER_DEVICE[best], plans[best]


if __name__ == "__main__":
    main()
