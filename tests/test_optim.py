"""The optimizer: nanoGPT's learning-rate schedule, decay mask, clipping, AdamW =
torch.optim.AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt.config import base_config
from flaxgpt.model import GPTConfig, init_params
from flaxgpt.optim import decay_mask, learning_rate_schedule, make_optimizer


def nanogpt_lr(it, c):
    """nanoGPT's get_lr, verbatim in logic."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


@pytest.mark.parametrize("warmup", [0, 1, 100])
def test_schedule_matches_nanogpt(warmup):
    c = base_config()
    c.warmup_iters, c.lr_decay_iters, c.learning_rate, c.min_lr = warmup, 1000, 1e-3, 1e-4
    schedule = learning_rate_schedule(c)
    for it in [0, 1, warmup - 1, warmup, warmup + 1, 500, 999, 1000, 1001, 5000]:
        if it >= 0:
            assert float(schedule(it)) == pytest.approx(nanogpt_lr(it, c), rel=1e-5, abs=1e-12), it


def test_constant_schedule_without_decay():
    c = base_config()
    c.decay_lr = False
    assert float(learning_rate_schedule(c)(12345)) == pytest.approx(c.learning_rate)


def test_weight_decay_only_on_matrices_and_embeddings():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11,
                       scan_layers=False)
    params = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
    mask = decay_mask(params)
    scanned = decay_mask(jax.eval_shape(lambda r: init_params(config.replace(scan_layers=True), r),
                                        jax.random.key(0)))
    assert scanned["h"]["attn"]["c_attn"]["kernel"] and not scanned["h"]["ln_1"]["scale"]
    assert mask["wte"]["embedding"] and mask["wpe"]["embedding"]
    assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["h_0"]["mlp"]["c_proj"]["kernel"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"]  # 3-D, but a bias
    assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_matches_torch_adamw_with_clipping():
    """A few steps on a decayed matrix and an undecayed bias equal torch's AdamW after
    clip_grad_norm_."""
    torch = pytest.importorskip("torch")
    c = base_config()
    c.learning_rate, c.warmup_iters, c.lr_decay_iters = 1e-2, 2, 10
    c.min_lr, c.grad_clip = 1e-3, 0.5
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32))
             for _ in range(5)]

    params = {"dense": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
    optimizer = make_optimizer(c)
    state = optimizer.init(params)
    for gw, gb in grads:
        updates, state = optimizer.update({"dense": {"kernel": gw, "bias": gb}}, state, params)
        params = optax.apply_updates(params, updates)

    tw, tb = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": c.weight_decay},
                              {"params": [tb], "weight_decay": 0.0}],
                             lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=1e-8)
    for it, (gw, gb) in enumerate(grads):
        for group in topt.param_groups:
            group["lr"] = nanogpt_lr(it, c)
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        torch.nn.utils.clip_grad_norm_([tw, tb], c.grad_clip)
        topt.step()
    np.testing.assert_allclose(params["dense"]["kernel"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["dense"]["bias"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)
