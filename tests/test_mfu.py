"""Model FLOPs utilisation (flaxgpt/mfu.py): the peak table, none on CPUs, the sums."""

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


def test_a_cpu_has_no_peak_so_no_mfu_is_shown():
    assert jax.devices()[0].platform == "cpu" and mfu.device_peak_flops() is None
    tokens_per_s, utilisation = mfu.throughput(tokens_per_step=1000, seconds_per_step=0.5,
                                               flops_per_token=6e6, num_devices=1, peak=None)
    assert tokens_per_s == 2000 and utilisation is None and mfu.shown(utilisation) == ""
    assert mfu.shown(0.4123) == ", mfu 41.23%"


def test_throughput_and_mfu_arithmetic():
    tokens_per_s, utilisation = mfu.throughput(tokens_per_step=1000, seconds_per_step=0.5,
                                               flops_per_token=6e6, num_devices=2, peak=1e9)
    assert tokens_per_s == 2000
    assert utilisation == pytest.approx(6e6 * 2000 / 2e9)
