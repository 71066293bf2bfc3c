"""Several processes as one run: joining them (`initialize`), deciding alike, stopping together; and
jax's CPU backend alone on a machine without accelerators (`use_cpu_without_accelerators`).

The processes of a pod must decide alike, or they run different collectives and wait for each other
forever: `decided_by_main` and `all_values` agree through the key-value store of JAX's coordination
service (no device collectives, with a time-out), where the watchdog's heartbeats are `published`.
"""

import builtins
import collections
import concurrent.futures
import contextlib
import glob
import json
import os
from pathlib import Path
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax

# Environment variables that Cloud TPU (GKE pods, multislice) set for the runtime.
TPU_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
GOOGLE_PCI_VENDOR, NVIDIA_PCI_VENDOR = "0x1ae0", "0x10de"
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver, AMD's ROCm driver
PCI_DEVICES = "/sys/bus/pci/devices"
AGREEMENT_TIMEOUT_S = 30 * 60  # process 0 may download a model or list a bucket meanwhile
KV_TIMEOUT_S = 5  # for a watcher's call: a frozen coordinator (process 0) must not freeze it
PEER_EXIT_WAIT_S = 10  # how long process 0 waits for the others to exit after a failure


def on_cloud_tpu_vm() -> bool:
    """Whether a TPU cluster set its variables or TPU chips are attached (Google PCI devices); a CPU
    machine setting TPU_SKIP_MDS_QUERY to compile for TPU topologies is not one."""
    return any(os.environ.get(name) for name in TPU_CLUSTER_ENV) or (
        not os.environ.get("TPU_SKIP_MDS_QUERY") and tpu_chips_attached() > 0)


def is_multiprocess_launch(coordinator_address: str | None = None) -> bool:
    """Whether this process is one of several: a coordinator is named, a TPU cluster or SLURM
    launched it, or it runs on a Cloud TPU VM."""
    return bool(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                or on_cloud_tpu_vm() or int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def tpu_chips_attached(pci_root: str = PCI_DEVICES) -> int:
    """Number of Google accelerator PCI devices (TPU chips) on this machine."""
    return _pci_vendors(pci_root).count(GOOGLE_PCI_VENDOR)


def _pci_vendors(pci_root: str) -> list[str]:
    return [Path(p).read_text().strip() for p in glob.glob(f"{pci_root}/*/vendor")]


def accelerators_attached(pci_root: str = PCI_DEVICES, driver_files=GPU_DRIVER_FILES) -> bool:
    """Whether jax could find an accelerator here: TPU chips or a TPU cluster's variables, NVIDIA
    devices, or a GPU driver's device file."""
    return (any(map(os.environ.get, TPU_CLUSTER_ENV)) or any(map(os.path.exists, driver_files))
            or not {GOOGLE_PCI_VENDOR, NVIDIA_PCI_VENDOR}.isdisjoint(_pci_vendors(pci_root)))


def use_cpu_without_accelerators() -> None:
    """Start jax on its CPU backend alone where no accelerator is attached and no platform was
    chosen (JAX_PLATFORMS): else a CPU machine with libtpu or the CUDA plugin installed logs their
    failed start-ups on every run. Call before touching devices."""
    chosen = "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms
    if not chosen and not accelerators_attached():
        jax.config.update("jax_platforms", "cpu")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
    """Join the other processes of the run (no-op for one process). Call before touching devices.

    Unset values come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or jax's
    cluster auto-detection (Cloud TPU incl. multislice, SLURM, Open MPI, Kubernetes).
    heartbeat_timeout_s: how long jax waits for a silent process before it aborts every process.
    """
    if not is_multiprocess_launch(coordinator_address):
        return
    env = os.environ
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    slices = int(env.get("MEGASCALE_NUM_SLICES") or 1)
    in_slice = f" (slice {env.get('MEGASCALE_SLICE_ID', '?')} of {slices})" if slices > 1 else ""
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this host"
    where = (f"{who}{in_slice} through the coordinator at "
             f"{address or env.get('MEGASCALE_COORDINATOR_ADDRESS') or 'auto-detected'}")
    advice = ("Start every process with the same coordinator address and process count, process 0 "
              "reachable from the others.")
    if address and process_id not in (None, 0) and not _reachable(address, timeout):
        raise RuntimeError(f"jax.distributed could not connect {where} within {timeout}s: nothing "
                           f"listens there. {advice}")
    # jax's client aborts (SIGABRT) when the others do not join in time: say why beforehand.
    print(f"flaxgpt: joining {where}; waiting up to {timeout}s for all processes (if this process "
          f"then aborts with DEADLINE_EXCEEDED, a peer never joined). {advice}",
          file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)


def _reachable(address: str, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (retrying)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def is_main_process() -> bool:
    return jax.process_index() == 0


def _client():
    """The coordination service's client (None for one process): jax's private API, as orbax
    reads it."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


_made = collections.Counter()  # agreements made so far, by name


def _key(name: str) -> str:
    """The agreement's key: its name and how many of that name came before, so that an agreement
    one process made alone shifts no other agreement's key."""
    _made[name] += 1
    return f"flaxgpt/agree/{name.replace('/', '|')}/{_made[name]}"


def all_values(name: str, value: str, timeout_s: float = AGREEMENT_TIMEOUT_S) -> list[str]:
    """Every process's `value` (a string) for this agreement, in process order; waits for all."""
    if jax.process_count() == 1:
        return [value]
    client, key = _client(), _key(name)
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    client.wait_at_barrier(key, int(timeout_s * 1000))
    entries = dict(client.key_value_dir_get(f"{key}/"))
    return [entries[f"{key}/{i}"] for i in range(jax.process_count())]


def decided_by_main(name: str, decide: Callable[[], Any],
                    timeout_s: float = AGREEMENT_TIMEOUT_S) -> Any:
    """`decide()` on process 0 and its result (JSON) on every process; if it raises, every process
    raises an error of the same built-in kind and message."""
    if jax.process_count() == 1:
        return decide()
    client, key = _client(), _key(name)
    if is_main_process():
        try:
            result = decide()
        except Exception as e:
            kind = next(k for k in type(e).__mro__ if getattr(builtins, k.__name__, None) is k)
            client.key_value_set(key, json.dumps({"error": kind.__name__, "message": str(e)}))
            raise
        client.key_value_set(key, json.dumps({"value": result}))
        return result
    answer = json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
    if "error" in answer:
        raise getattr(builtins, answer["error"])(answer["message"])
    return answer["value"]


# The watcher's calls run here, so that a frozen coordination service cannot freeze the watcher.
_kv_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flaxgpt-kv")


def publish(kind: str, value: str) -> None:
    """Set this process's entry of `kind` (e.g. "heartbeat") for the others to read; TimeoutError
    if the coordination service does not answer within KV_TIMEOUT_S."""
    key = f"flaxgpt/{kind}/{jax.process_index()}"
    _kv_worker.submit(_client().key_value_set, key, value, allow_overwrite=True).result(
        timeout=KV_TIMEOUT_S)


def published(kind: str) -> dict[int, str]:
    """{process: value} of every process's entry of `kind`; TimeoutError as in `publish`."""
    entries = _kv_worker.submit(_client().key_value_dir_get, f"flaxgpt/{kind}/").result(
        timeout=KV_TIMEOUT_S)
    return {int(key.rsplit("/", 1)[1]): value for key, value in entries}


def check_shared_directory(directory, what: str) -> None:
    """Raise the same one-line OSError on every process unless `directory` is the same storage for
    all of them (a bucket, or a folder every host mounts): process 0 writes a file, the others read
    it."""
    if jax.process_count() == 1:
        return
    from flaxgpt import storage
    directory = storage.path(directory)

    def write_probe() -> str:  # the others learn its name only once it is written
        name = f".flaxgpt-shared-{secrets.token_hex(8)}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("written by process 0")
        return name

    probe = directory / decided_by_main("shared probe", write_probe)
    seen = False
    with contextlib.suppress(OSError):
        seen = probe.read_text() == "written by process 0"
    blind = [str(i) for i, ok in enumerate(all_values(f"sees {probe.name}", str(int(seen))))
             if ok != "1"]
    if is_main_process():
        probe.unlink()
    if blind:
        raise OSError(f"{what}={directory} is not the same storage on every host: process(es) "
                      f"{', '.join(blind)} cannot see the file process 0 wrote there. Every host "
                      "of a pod needs to see the same files: use a gs:// bucket (or a folder all "
                      "hosts mount)")


_exit_lock = threading.Lock()


def exit_program(message: str | None, code: int = 1) -> None:
    """End the program with `message` on stderr, from any thread; the first caller alone (another
    one waits here for the end). With several processes it exits at once (os._exit), without JAX's
    shutdown barrier, at which peers that stopped would never arrive. Process 0 holds the
    coordination service, whose end aborts every process still attached: it exits last, after the
    others or PEER_EXIT_WAIT_S."""
    _exit_lock.acquire()
    if message:
        print(message, file=sys.stderr, flush=True)
    client = _client()
    if client is None and threading.current_thread() is threading.main_thread():
        _exit_lock.release()
        sys.exit(code)
    with contextlib.suppress(Exception):  # a coordination service that does not answer
        if client is not None and is_main_process():
            deadline = time.monotonic() + PEER_EXIT_WAIT_S
            while (time.monotonic() < deadline
                   and len(published("exiting")) < jax.process_count() - 1):
                time.sleep(0.1)
            time.sleep(0.5)  # a peer between its "exiting" and its exit would log our end
        elif client is not None:
            publish("exiting", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
