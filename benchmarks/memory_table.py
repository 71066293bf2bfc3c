"""The per-chip memory table of docs/scaling.md: every GPT-2 size compiled for Cloud TPU slices on this CPU.

    python benchmarks/tpu_memory_table.py [--slices v5e-8,v4-8,v5p-8,v5e-256] [--sizes gpt2,gpt2-xl]

For each size (configs/owt.py with the preset's shape, block 1024, bfloat16, AdamW) and its mesh and remat
policy below, the largest sequences-per-chip micro-batch (1, 2, 4, ... 32) whose train step fits the first
slice is searched; every other slice is then compiled at that per-chip batch. Prints a markdown table of
per-chip memory and the compute-floor step time (FLOPs / peak bf16 FLOP/s; 6N + 12*L*H*Q*T per token).
Needs libtpu (pip install -e ".[tpu]"); nothing runs on a TPU.
"""

import argparse
import io
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from configs import owt  # noqa: E402
from flaxgpt import compile_for  # noqa: E402
from flaxgpt.model import PRESETS  # noqa: E402

# size -> (mesh, remat): data parallel while the replicated state fits, FSDP beyond, full remat for the largest.
SETTINGS = {
    "gpt2": ({"data": -1, "fsdp": 1}, "none"),
    "gpt2-medium": ({"data": 1, "fsdp": -1}, "none"),
    "gpt2-large": ({"data": 1, "fsdp": -1}, "dots_with_no_batch_dims_saveable"),
    "gpt2-xl": ({"data": 1, "fsdp": -1}, "full"),
}
PER_CHIP = (1, 2, 4, 8, 16, 32)


def config_for(size: str, slice_name: str, per_chip: int):
    c = owt.get_config()
    c.n_layer, c.n_head, c.n_embd = (PRESETS[size][k] for k in ("n_layer", "n_head", "n_embd"))
    mesh, c.remat = SETTINGS[size]
    c.mesh.data, c.mesh.fsdp = mesh["data"], mesh["fsdp"]
    c.batch_size = per_chip * len(compile_for.target_named(slice_name).devices)  # v4-8, v5p-8: 4 chips
    c.gradient_accumulation_steps = 1
    c.eval_iters = 1
    return c


def compile_quietly(size, slice_name, per_chip):
    with redirect_stdout(io.StringIO()):
        lines = []
        return compile_for.plan(config_for(size, slice_name, per_chip), slice_name, print_fn=lines.append)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", default="v5e-8,v4-8,v5p-8,v5e-256")
    p.add_argument("--sizes", default=",".join(PRESETS))
    args = p.parse_args(argv)
    slices, sizes = args.slices.split(","), args.sizes.split(",")
    print("| model | slice | mesh | remat | seqs/chip | GiB per chip | fits | compute floor | compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        best, best_plan = None, None
        for per_chip in PER_CHIP:  # the largest that fits the first slice
            result = compile_quietly(size, slices[0], per_chip)
            if not result.fits:
                break
            best, best_plan = per_chip, result
        per_chip = best or 1
        for slice_name in slices:
            result = best_plan if slice_name == slices[0] and best_plan else compile_quietly(size, slice_name, per_chip)
            mesh, remat = SETTINGS[size]
            mesh_text = "data" if mesh["data"] == -1 else "fsdp"
            used = f"{result.total_gib:.2f} of {result.memory_gib:.0f}" if result.total_gib else f"> {result.memory_gib:.0f}"
            floor = f"{result.floor_ms:.1f} ms" if result.floor_ms else "-"
            seconds = f"{result.compile_s:.0f} s" if result.compile_s else "-"
            print(f"| {size} | {slice_name} | {mesh_text} | {remat} | {per_chip} | {used} | "
                  f"{'yes' if result.fits else 'no'} | {floor} | {seconds} |", flush=True)


if __name__ == "__main__":
    main()
