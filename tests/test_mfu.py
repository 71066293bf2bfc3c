"""Model FLOPs utilisation (flaxgpt/mfu.py): the peak table, the measured CPU peak, the sums."""

from types import SimpleNamespace

import jax
import pytest

from flaxgpt import mfu


@pytest.mark.parametrize("kind, peak",
                         [("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v4", 275e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12),
                          ("NVIDIA A100-SXM4-40GB", 312e12),
                                        ("TPU v6 lite", 918e12)])
def test_peak_table_by_device_kind(kind, peak):
    assert mfu.device_peak_flops(SimpleNamespace(device_kind=kind)) == peak


def test_cpu_peak_is_measured_and_plausible():
    peak = mfu.device_peak_flops(jax.devices()[0])
    # a float32 matmul on any CPU: more than a GFLOP/s, less than 100 TFLOP/s
    assert 1e9 < peak < 1e14


def test_throughput_and_mfu_arithmetic():
    tokens_per_s, utilisation = mfu.throughput(tokens_per_step=1000, seconds_per_step=0.5,
                                               flops_per_token=6e6, num_devices=2, peak=1e9)
    assert tokens_per_s == 2000
    assert utilisation == pytest.approx(6e6 * 2000 / 2e9)
