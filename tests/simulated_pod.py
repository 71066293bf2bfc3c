"""A pod slice on one machine, for the multi-host tests: N processes on 127.0.0.1 joined through
jax.distributed (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), each with its own
simulated CPU devices (gloo collectives) and its own working directory, so that nothing local is
shared, as on the hosts of a real slice.

`Pod.train` runs train.py's command line in every process. `host_order` orders the mesh's devices by
host the way a real slice does (a v4-32 interleaves its 4 hosts along the data axis), which the CPU
devices of a simulated pod would not do by themselves; `fail` makes one process raise at one step.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import one_device_env

REPO = Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'shakespeare_char.py'}:cpu"

# Runs train.py's main in this process: argv[1] is JSON
# {"argv": [...], "host_order": [...], "fail": {...}}.
RUNNER = """
import json, runpy, sys
args = json.loads(sys.argv[1])
if args.get("host_order"):
    import jax
    from flaxgpt import sharding
    make_mesh = sharding.make_mesh

    def make_mesh_in_slice_order(shape, devices=None):
        if devices is None:  # position i of the mesh gets a device of process host_order[i]
            by_process = {}
            for device in jax.devices():
                by_process.setdefault(device.process_index, []).append(device)
            devices = [by_process[p].pop(0) for p in args["host_order"]]
        return make_mesh(shape, devices)
    sharding.make_mesh = make_mesh_in_slice_order
if args.get("fail"):
    import jax
    from flaxgpt import data
    read = data.Batches.read

    def failing_read(self, split, step, n):
        fail = args["fail"]
        if jax.process_index() == fail["process"] and split == "train" and step == fail["step"]:
            raise OSError(f"injected failure at step {step}")
        return read(self, split, step, n)
    data.Batches.read = failing_read
sys.argv = [args["script"], *args["argv"]]
runpy.run_path(args["script"], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(port: int, n_devices: int, process_id: int | None = None,
                num_processes: int | None = None, **overrides) -> dict:
    """This environment with `n_devices` simulated CPU devices, the repo importable, the coordinator
    bound to loopback (jax binds [::]:port by default) and, given a process id, the JAX_* variables
    a launcher sets."""
    env = {k: v for k, v in one_device_env().items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                "SLURM_"))}
    devices = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
    if process_id is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id))
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def finish(procs: list[subprocess.Popen], deadline: float,
           read=None) -> list[tuple[int | None, str, str]]:
    """(returncode, stdout, stderr) of every process; all are killed at the deadline or 10 s after
    one fails (its peers would wait for it until jax's own timeouts). `read(i)` gives a process's
    output when it goes to files rather than pipes."""
    outputs = [None] * len(procs)
    try:
        while any(o is None for o in outputs):
            for i, p in enumerate(procs):
                if outputs[i] is None and p.poll() is not None:
                    outputs[i] = (p.returncode, *(read(i) if read else p.communicate()))
                    if p.returncode != 0:
                        deadline = min(deadline, time.monotonic() + 10)
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if outputs[i] is None:
                p.kill()
                p.wait()
                outputs[i] = (None, *(read(i) if read else p.communicate()))  # None: killed
    return outputs


def report(outputs) -> str:
    return "\n".join(f"--- process {i}: exit {rc}\n[stdout]\n{out[-3000:]}\n[stderr]\n{err[-6000:]}"
                     for i, (rc, out, err) in enumerate(outputs))


class Pod:
    """`processes` processes of `devices` CPU devices each, host i working in root/host<i>/ (its
    only local disk) and logging to root/logs/."""

    def __init__(self, root: Path, processes: int, devices: int = 4,
                 host_order: list[int] | None = None, **env):
        self.root, self.processes, self.devices = root, processes, devices
        self.host_order, self.env = host_order, env
        self.hosts = [root / f"host{i}" for i in range(processes)]
        (root / "logs").mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            host.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.runs = 0

    def start(self, *argv: str, script: Path = REPO / "train.py", fail: dict | None = None) -> None:
        """Start `script` (train.py's command line, argv after its name) on every host."""
        port, self.runs = free_port(), self.runs + 1
        self.procs, self.logs = [], []
        for i, host in enumerate(self.hosts):
            log = self.root / "logs" / f"run{self.runs}-host{i}"
            self.logs.append(log)
            args = {"argv": list(argv), "script": str(script), "host_order": self.host_order,
                    "fail": fail}
            with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", RUNNER, json.dumps(args)], cwd=host, stdout=out,
                    stderr=err, env=process_env(port, self.devices, i, self.processes, **self.env)))

    def output(self, i: int) -> tuple[str, str]:
        return Path(f"{self.logs[i]}.out").read_text(), Path(f"{self.logs[i]}.err").read_text()

    def wait_for(self, pattern: str, process: int = 0, timeout: float = 300) -> None:
        """Until process `process` prints a line matching `pattern` (AssertionError if it ends)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output(process)[0], re.MULTILINE):
            if self.procs[process].poll() is not None or time.monotonic() > deadline:
                outputs = finish(self.procs, time.monotonic(), self.output)
                raise AssertionError(f"no line {pattern!r} from process "
                                     f"{process}\n{report(outputs)}")
            time.sleep(0.1)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        for p in self.procs:
            p.send_signal(signum)

    def wait(self, timeout: float = 300) -> list[tuple[int | None, str, str]]:
        return finish(self.procs, time.monotonic() + timeout, self.output)

    def train(self, *argv: str, timeout: float = 300, **start) -> list[tuple[int | None, str, str]]:
        self.start(*argv, **start)
        return self.wait(timeout)

    def local_files(self) -> list[str]:
        """Every file the processes left in their working directories (their hosts' local disks)."""
        return sorted(str(p.relative_to(self.root)) for host in self.hosts for p in host.rglob("*"))
