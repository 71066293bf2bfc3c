"""Start-up: jax's CPU backend alone on a machine without accelerators, and
`jax.distributed.initialize` when the run spans several processes."""

import glob
import os
from pathlib import Path
import socket
import sys
import time

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
    variables. A CPU machine that sets TPU_SKIP_MDS_QUERY to compile for TPU topologies is not one."""
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
    """Join the other processes of the run (no-op for a single process). Call before touching devices.

    Unset values come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or jax's
    cluster auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes).
    """
    if not is_multiprocess_launch(coordinator_address):
        return
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    where = f"process {process_id} of {num_processes} through the coordinator at {address or 'auto-detected'}"
    advice = ("Start every process with the same coordinator address and process count, process 0 "
              "reachable from the others.")
    if address and process_id not in (None, 0) and not _reachable(address, timeout):
        raise RuntimeError(f"jax.distributed could not connect {where} within {timeout}s: nothing listens "
                           f"there. {advice}")
    # jax's client aborts the process (SIGABRT) when the others do not join in time: say why beforehand.
    print(f"flaxgpt: joining {where}; waiting up to {timeout}s for all processes (if this process then "
          f"aborts with DEADLINE_EXCEEDED, a peer never joined). {advice}", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout)


def _reachable(address: str, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (retrying until then)."""
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
