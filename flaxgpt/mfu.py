"""Model FLOPs utilisation: achieved training FLOP/s over the devices' peak.

nanoGPT divides by an A100's 312 TFLOP/s whatever the device; we look the peak up per device kind
(dense bfloat16, per chip). A CPU has no such figure (its float32 matmul rate depends on the cores
the run shares), so on CPUs, and on unlisted kinds, a run shows tokens/s and no MFU.
"""

import jax

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


def flops_per_token(config, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) of a GPTConfig's model: nanoGPT's
    6N + 12*L*H*Q*T (PaLM, app. B)."""
    T = seq_len or config.block_size
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * T


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device from the table above; None for CPUs and unlisted kinds."""
    device = device or jax.local_devices()[0]
    return listed_peak_flops(device.device_kind)


def listed_peak_flops(device_kind: str) -> float | None:
    """The table's peak FLOP/s for a jax.Device.device_kind, or None when no entry matches."""
    return next((flops for kind, flops in PEAK_FLOPS if kind.lower() in device_kind.lower()), None)


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak: float) -> float:
    return flops_per_token * tokens_per_second / (num_devices * peak)


def throughput(tokens_per_step: int, seconds_per_step: float, flops_per_token: float,
               num_devices: int, peak: float | None) -> tuple[float, float | None]:
    """(tokens/s, MFU or None without a peak) of training steps of `tokens_per_step` tokens taking
    `seconds_per_step` each."""
    tokens_per_second = tokens_per_step / seconds_per_step
    if peak is None:
        return tokens_per_second, None
    return tokens_per_second, mfu(flops_per_token, tokens_per_second, num_devices, peak)


def shown(utilisation: float | None) -> str:
    """", mfu 41.20%" for a log line, or nothing without a peak."""
    return "" if utilisation is None else f", mfu {utilisation * 100:.2f}%"
