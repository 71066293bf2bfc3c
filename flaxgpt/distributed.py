"""Several processes as one run: joining them (`initialize`), deciding things together, and stopping
together; and jax's CPU backend alone on a machine without accelerators
(`use_cpu_without_accelerators`).

A pod slice runs one process per host. They must take every decision alike (which checkpoint to
resume, whether the out_dir and dataset are usable), or they would run different collectives and
wait for each other forever. Two kinds of agreement, both through the key-value store of JAX's
coordination service (no device collectives, each with a time-out): `decided_by_main` (process 0
decides, every process uses its answer or raises its error) and `all_values` (every process's
answer, e.g. "I can read this"). `stop_together` makes an exception on one process stop every
process within a second instead of leaving them waiting in the next collective.
"""

import builtins
import glob
import itertools
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


def is_multiprocess_launch(coordinator_address: str | None = None) -> bool:
    """Whether this process is one of several: a coordinator is named, or a cluster launched it.

    Cloud TPU VMs and SLURM jobs are detected here and then joined by jax's own cluster detection.
    Having libtpu installed is not a TPU VM: CPU machines install it to compile for TPU topologies.
    """
    return bool(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                or on_cloud_tpu_vm()
                or int(os.environ.get("SLURM_NTASKS", "1")) > 1)


# Environment variables that Cloud TPU (GKE pods, multislice) set for the runtime.
TPU_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
GOOGLE_PCI_VENDOR = "0x1ae0"
NVIDIA_PCI_VENDOR = "0x10de"
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver, AMD's ROCm driver
PCI_DEVICES = "/sys/bus/pci/devices"


def on_cloud_tpu_vm() -> bool:
    """Whether TPU chips are attached to this machine (Google PCI devices) or a TPU cluster set its
    variables. A CPU machine setting TPU_SKIP_MDS_QUERY to compile for TPU topologies is not one."""
    if any(os.environ.get(name) for name in TPU_CLUSTER_ENV):
        return True
    if os.environ.get("TPU_SKIP_MDS_QUERY"):
        return False
    return tpu_chips_attached() > 0


def tpu_chips_attached(pci_root: str = PCI_DEVICES) -> int:
    """Number of Google accelerator PCI devices (TPU chips) on this machine."""
    return _pci_devices(GOOGLE_PCI_VENDOR, pci_root)


def _pci_devices(vendor: str, pci_root: str) -> int:
    vendors = glob.glob(f"{pci_root}/*/vendor")
    return sum(Path(path).read_text().strip() == vendor for path in vendors)


def accelerators_attached(pci_root: str = PCI_DEVICES, driver_files=GPU_DRIVER_FILES) -> bool:
    """Whether jax could find an accelerator here: TPU chips or a TPU cluster's variables, NVIDIA
    devices, or a GPU driver's device file."""
    return (tpu_chips_attached(pci_root) > 0 or any(map(os.environ.get, TPU_CLUSTER_ENV))
            or _pci_devices(NVIDIA_PCI_VENDOR, pci_root) > 0
            or any(map(os.path.exists, driver_files)))


def use_cpu_without_accelerators() -> None:
    """Start jax on its CPU backend alone where no accelerator is attached and no platform was
    chosen (JAX_PLATFORMS). Otherwise jax starts every installed plugin, and a CPU machine that
    installed libtpu or the CUDA plugin (to compile for TPUs or GPUs) logs their failed start-ups,
    a traceback among them, on every run. Call before touching devices."""
    chosen = "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms
    if not chosen and not accelerators_attached():
        jax.config.update("jax_platforms", "cpu")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> None:
    """Join the other processes of the run (no-op for one process). Call before touching devices.

    Unset values come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or jax's
    cluster auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes). On several TPU slices (Cloud
    TPU's MEGASCALE_* variables, from the environment or the VM's metadata), that detection joins
    every host of every slice: host i of slice s is process s x hosts-per-slice + i, and the
    coordinator is MEGASCALE_COORDINATOR_ADDRESS.
    """
    if not is_multiprocess_launch(coordinator_address):
        return
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    slices = os.environ.get("MEGASCALE_NUM_SLICES")
    in_slice = (f" (slice {os.environ.get('MEGASCALE_SLICE_ID', '?')} of {slices})"
                if slices and int(slices) > 1 else "")
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this host"
    where = (f"{who}{in_slice} through the coordinator at "
             f"{address or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS') or 'auto-detected'}")
    advice = ("Start every process with the same coordinator address and process count, process 0 "
              "reachable from the others.")
    if address and process_id not in (None, 0) and not _reachable(address, timeout):
        raise RuntimeError(f"jax.distributed could not connect {where} within {timeout}s: nothing "
                           f"listens there. {advice}")
    # jax's client aborts (SIGABRT) when the others do not join in time: say why beforehand.
    print(f"flaxgpt: joining {where}; waiting up to {timeout}s for all processes (if this process "
          "then aborts with DEADLINE_EXCEEDED, a peer never joined). "
          f"{advice}", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout)


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


AGREEMENT_TIMEOUT_S = 30 * 60  # process 0 may download a model or list a bucket meanwhile
_FAILED = "flaxgpt/failed/"
_EXITING = "flaxgpt/exiting/"
PEER_EXIT_WAIT_S = 10  # how long process 0 waits for the others to exit after a failure
_agreements = itertools.count()  # every process makes the same agreements in the same order


def _client():
    """The coordination service's client (jax has no public accessor; orbax reads it so too)."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def _key(name: str) -> str:
    return f"flaxgpt/{next(_agreements)}/{name}"


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
    raises an error of the same kind and message, so that all of them stop with the same line."""
    if jax.process_count() == 1:
        return decide()
    client, key = _client(), _key(name)
    if is_main_process():
        try:
            result = decide()
        except Exception as e:
            kinds = [k.__name__ for k in type(e).__mro__]
            client.key_value_set(key, json.dumps({"error": kinds, "message": str(e)}))
            raise
        client.key_value_set(key, json.dumps({"value": result}))
        return result
    answer = json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
    if "error" in answer:
        kind = next(k for k in (getattr(builtins, name, None) for name in answer["error"])
                    if isinstance(k, type) and issubclass(k, Exception))
        raise kind(answer["message"])
    return answer["value"]


def check_shared_directory(directory, what: str) -> None:
    """Raise the same one-line OSError on every process unless `directory` is the same storage for
    all of them (a bucket, or a folder every host mounts): process 0 writes a file there, the others
    read it."""
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
    seen = all_values(f"sees {probe.name}", "1" if _readable(probe) else "0")
    if is_main_process():
        probe.unlink()
    blind = [i for i, ok in enumerate(seen) if ok != "1"]
    if blind:
        raise OSError(f"{what}={directory} is not the same storage on every host: process(es) "
                      f"{', '.join(map(str, blind))} cannot see the file process 0 wrote there. "
                      "Every host of a pod needs to see the same files: use a gs:// bucket (or a "
                      "folder all hosts mount)")


def _readable(probe) -> bool:
    try:
        return probe.read_text() == "written by process 0"
    except OSError:
        return False


class stop_together:
    """A context for the body of a multi-process run: an exception in one process is published to
    the others, whose watcher thread prints it and ends them at once (`exit_program`) rather than
    letting them wait in a collective for a peer that will never come; the coordinator going away
    ends them too. A single process runs the body as it is."""

    def __enter__(self):
        self._done = threading.Event()
        if jax.process_count() > 1:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="flaxgpt-peer-watch")
            self._thread.start()
        return self

    def __exit__(self, kind, error, _tb):
        self._done.set()
        if jax.process_count() == 1:
            return
        self._thread.join()
        if error is not None:
            message = str(error).strip().splitlines()[0] if str(error).strip() else kind.__name__
            _client().key_value_set(f"{_FAILED}{jax.process_index()}", message)

    def _watch(self):
        client, me = _client(), jax.process_index()
        while not self._done.wait(0.5):
            try:
                failed = [(int(k.rsplit("/", 1)[1]), v)
                          for k, v in client.key_value_dir_get(_FAILED)]
            except Exception:  # the coordination service (process 0) is gone
                if not self._done.is_set():
                    _exit_now("flaxgpt: lost the coordinator (process 0): stopping this process", 1)
                return
            failed = [(i, message) for i, message in failed if i != me]
            if failed:
                exit_program(f"flaxgpt: stopping: process {failed[0][0]} failed: {failed[0][1]}")


def exit_program(message: str | None, code: int = 1) -> None:
    """End the program with `message` on stderr. With several processes it exits at once (os._exit),
    without JAX's shutdown barrier, at which peers that stopped would never arrive. Process 0 holds
    the coordination service, whose end aborts every process still attached: it exits last."""
    client = _client()
    if client is None:  # a single process
        sys.exit(message if message else code)
    if message:
        print(message, file=sys.stderr, flush=True)
    if is_main_process():
        deadline = time.monotonic() + PEER_EXIT_WAIT_S
        peers = jax.process_count() - 1
        while time.monotonic() < deadline and len(_keys(client, _EXITING)) < peers:
            time.sleep(0.1)
    else:
        client.key_value_set(f"{_EXITING}{jax.process_index()}", "1")
    _exit_now(None, code)


def _keys(client, prefix: str) -> list:
    try:
        return client.key_value_dir_get(prefix)
    except Exception:
        return []


def _exit_now(message: str | None, code: int) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
