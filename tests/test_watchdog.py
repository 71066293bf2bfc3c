"""The watchdog (flaxgpt/watchdog.py) of one process: a hang becomes one line and an exit, a first
call (a compilation) is not a hang, and the stacks of every thread land in a file. Each case runs
in a process of its own, since the watchdog ends its process; a pod's hosts are in test_pod.py."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flaxgpt.watchdog import STALL_EXIT_CODE
from simulated_pod import free_port, process_env

# with test_pod.py on one xdist worker, one after another (setup.cfg)
pytestmark = pytest.mark.xdist_group("pods")

# argv: out_dir, then "bucket PATH" (wait in a bucket call) or "collective" (wait elsewhere).
SCRIPT = """
import sys, time
from flaxgpt import storage
from flaxgpt.watchdog import Watchdog
with Watchdog(1.0, storage.path(sys.argv[1])) as watchdog:
    watchdog.progress("step 3")
    with watchdog.first_call("train step"):
        time.sleep(3)  # as long as a compilation takes
    print("compiled", flush=True)
    if sys.argv[2] == "bucket":
        storage._remote_fs(sys.argv[3])  # imports gcsfs, which takes a while on a busy machine
    watchdog.progress("step 4")
    if sys.argv[2] == "bucket":
        storage.size(sys.argv[3])
    else:
        def stuck_in_a_collective():
            time.sleep(60)
        stuck_in_a_collective()
"""


def run(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, args)], cwd=cwd,
                            env=process_env(free_port(), 1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


def test_a_hang_is_one_line_and_an_exit_with_every_threads_stack(tmp_path):
    start = time.monotonic()
    out, err = (proc := run(tmp_path / "out", "collective", cwd=tmp_path)).communicate(timeout=120)
    assert proc.returncode == STALL_EXIT_CODE, err[-3000:]
    assert out == "compiled\n"  # 3 s in a first call with a 1 s time-out: no stall
    line = last_line(err)
    match = re.fullmatch(r"flaxgpt: stalled: nothing completed for \d+ s since step 4 "
                         r"\(stall_timeout_s=1\): no bucket call is waiting: the devices or the "
                         r"program hang \(see the stacks\); stacks of every thread in (\S+)", line)
    assert match, line
    stacks = Path(match.group(1))
    assert stacks.parent == tmp_path / "out" / "stalls", line
    assert "stuck_in_a_collective" in stacks.read_text()
    assert time.monotonic() - start < 60


def test_a_bucket_that_stops_answering_is_named_with_its_path(tmp_path, gcs_dir, frozen_storage):
    target = f"{gcs_dir}/train.bin"
    from flaxgpt import storage
    storage.write_atomically(target, b"tokens")
    with frozen_storage():
        proc = run(gcs_dir, "bucket", target, cwd=tmp_path)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == STALL_EXIT_CODE, err[-3000:]
    line = last_line(err)
    # the out_dir is in the stuck bucket: the stacks stay on this host's disk
    match = re.fullmatch(r"flaxgpt: stalled: nothing completed for \d+ s since step 4 "
                         r"\(stall_timeout_s=1\): process 0 waits for the storage: \w+ "
                         + re.escape(target) + r" has not returned; stacks of every thread in "
                         r"(/\S+)", line)
    assert match, line
    assert "storage.py" in Path(match.group(1)).read_text()


def test_jax_waits_for_a_silent_process_longer_than_the_watchdog():
    """jax aborts every process, naming none, when one is silent for its heartbeat time-out."""
    from flaxgpt.watchdog import coordination_heartbeat_s
    assert coordination_heartbeat_s(0) == coordination_heartbeat_s(5) == 100  # jax's default
    assert coordination_heartbeat_s(600) > 600

