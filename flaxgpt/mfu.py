"""Model FLOPs utilisation: achieved training FLOP/s over the devices' peak.

nanoGPT divides by an A100's 312 TFLOP/s whatever the device; we look the peak up per device kind
(dense bfloat16, per chip) and, on CPU, measure it with a large float32 matmul.
"""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device, by a substring of jax.Device.device_kind (first match wins).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card peaks at 756e12
    ("A100", 312e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: the table above, or measured on the spot for CPUs and unknown
    kinds."""
    device = device or jax.local_devices()[0]
    return listed_peak_flops(device.device_kind) or measured_matmul_flops(device)


def listed_peak_flops(device_kind: str) -> float | None:
    """The table's peak FLOP/s for a jax.Device.device_kind, or None when no entry matches."""
    return next((flops for kind, flops in PEAK_FLOPS if kind.lower() in device_kind.lower()), None)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device: jax.Device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of a few float32 n x n matmuls on `device`."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak: float) -> float:
    return flops_per_token * tokens_per_second / (num_devices * peak)


def throughput(tokens_per_step: int, seconds_per_step: float, flops_per_token: float,
               num_devices: int, peak: float) -> tuple[float, float]:
    """(tokens/s, MFU) of training steps of `tokens_per_step` tokens taking `seconds_per_step`
    each."""
    tokens_per_second = tokens_per_step / seconds_per_step
    return tokens_per_second, mfu(flops_per_token, tokens_per_second, num_devices, peak)
