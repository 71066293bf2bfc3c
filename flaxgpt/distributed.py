"""Multi-host start-up: `jax.distributed.initialize` when the run spans several processes."""

import importlib.util
import os

import jax


def is_multiprocess_launch(coordinator_address: str | None = None) -> bool:
    """Whether this process is one of several: a coordinator is named, or a cluster launched it.

    Cloud TPU VMs (libtpu installed) and SLURM jobs are detected by jax itself from their environment.
    """
    return bool(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                or importlib.util.find_spec("libtpu") is not None
                or int(os.environ.get("SLURM_NTASKS", "1")) > 1)


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
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout)
    except Exception as e:  # the coordination service raises bare XlaRuntimeErrors
        address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected")
        raise RuntimeError(
            f"jax.distributed could not connect process {process_id} of {num_processes} through the "
            f"coordinator at {address} within {timeout}s ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Start every process with the same coordinator address and process count, process 0 "
            "reachable from the others.") from None


def is_main_process() -> bool:
    return jax.process_index() == 0
