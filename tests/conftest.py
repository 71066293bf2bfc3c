"""Test session set-up: 8 simulated CPU devices (for the sharding tests) and the shared offline data."""

import os
from pathlib import Path

# Must happen before jax initialises its backend; single-device tests run on device 0 as usual.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():  # GPT-2's BPE ranks and tiny Shakespeare without a download
    os.environ.setdefault("FLAXGPT_DATA", str(SHARED_DATA))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_gpt2(tmp_path_factory):
    """A random GPT-2-vocabulary model (2 layers, 32 wide, 64 positions) saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
