"""The largest per-device arrays of a compiled train step: where its temporaries go (docs/scaling).

    python benchmarks/hlo_buffers.py --target v5e-8 --batch_size 64 --remat full [--fsdp]

Compiles configs/owt.py's train step (GPT-2 124M, one micro-batch) for the target on this CPU, as
`train.py --compile_for` does, prints its memory analysis, then every array shape that an
instruction of the optimized HLO produces, largest first, with its size per device and how many
instructions produce one. A shape's size is not what is alive at once (XLA reuses buffers and fuses
instructions), but the large shapes say which tensors the step builds.
"""

import argparse
import collections
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs it uninstalled

from configs import owt  # noqa: E402
from flaxgpt import compile_for  # noqa: E402

BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
RESULT = re.compile(r"= (" + "|".join(BYTES) + r")\[([\d,]*)\]")


def largest_shapes(hlo_text: str, top: int) -> list[tuple[int, str, int]]:
    """[(bytes, "dtype[dims]", instructions producing that shape)], largest first."""
    counts = collections.Counter(RESULT.findall(hlo_text))
    rows = []
    for (dtype, dims), n in counts.items():
        size = BYTES[dtype]
        for d in filter(None, dims.split(",")):
            size *= int(d)
        rows.append((size, f"{dtype}[{dims}]", n))
    return sorted(rows, reverse=True)[:top]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="v5e-8")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per step, all devices")
    p.add_argument("--remat", default="full")
    p.add_argument("--fsdp", action="store_true", help="mesh fsdp=-1, data=1 (else data parallel)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    c = owt.get_config()
    c.batch_size, c.remat = args.batch_size, args.remat
    c.gradient_accumulation_steps, c.eval_iters = 1, 1
    if args.fsdp:
        c.mesh.data, c.mesh.fsdp = 1, -1
    devices = compile_for.target_named(args.target).devices
    _, step, _ = compile_for.compile_steps(c, devices, compile_for._vocab_size(c))
    memory = step.memory_analysis()
    print(f"per device: temporaries {memory.temp_size_in_bytes / 2**30:.3f} GiB, arguments "
          f"{memory.argument_size_in_bytes / 2**30:.3f} GiB")
    for size, shape, n in largest_shapes(step.as_text(), args.top):
        print(f"{size / 2**20:9.1f} MiB  {shape}  x{n} instructions")


if __name__ == "__main__":
    main()
