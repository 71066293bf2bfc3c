"""The jitted train and eval steps (flaxgpt/train_step.py) on one device: accumulation, dropout,
eval.

Mesh-by-mesh equivalence of the same steps lives in tests/test_sharding.py.
"""

import jax
import numpy as np
import optax
import pytest

from flaxgpt import sharding
from flaxgpt.loss import cross_entropy_loss
from flaxgpt.model import GPT, GPTConfig
from flaxgpt.train_step import TrainStep

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def one_device_mesh():
    return sharding.make_mesh({"data": 1}, jax.devices()[:1])


def tokens(shape, seed=0):
    t = np.random.default_rng(seed).integers(0, TINY.vocab_size,
                                             (*shape[:-1], shape[-1] + 1)).astype(np.int32)
    return t[..., :-1], t[..., 1:]


def adamw():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def sgd():
    # Adam divides by the gradient's own magnitude, so float32 summation-order noise on near-zero
    # gradients becomes a full-size update; SGD keeps parameter differences proportional to gradient
    # differences.
    return optax.chain(optax.clip_by_global_norm(0.2), optax.sgd(0.5, momentum=0.9))


def test_a_micro_batches_of_b_equal_one_batch_of_a_times_b():
    """Gradient accumulation: A micro-batches of B sequences give the step of one batch of A*B
    (mean loss)."""
    A, B, T = 4, 2, TINY.block_size
    x, y = tokens((A, B, T))
    accumulated = TrainStep(TINY, sgd(), one_device_mesh(), seed=0)
    state = accumulated.init(jax.random.key(0))
    init = jax.tree.map(np.asarray, state)
    state_acc, metrics_acc = accumulated.train_fn(state, x, y)
    whole = TrainStep(TINY, sgd(), one_device_mesh(), seed=0)
    state_whole, metrics_whole = whole.train_fn(jax.device_put(init), x.reshape(1, A * B, T),
                                                y.reshape(1, A * B, T))
    np.testing.assert_allclose(metrics_acc["loss"], metrics_whole["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_whole["grad_norm"], rtol=1e-5)
    for a, w in zip(jax.tree.leaves(state_acc.params), jax.tree.leaves(state_whole.params)):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
    assert int(state_acc.step) == int(state_whole.step) == 1


def test_loss_is_the_models_cross_entropy_and_eval_matches_it():
    train_step = TrainStep(TINY, adamw(), one_device_mesh())
    state = train_step.init(jax.random.key(1))
    x, y = tokens((3, 2, TINY.block_size), seed=1)
    loss = jax.jit(lambda p, xi, yi: cross_entropy_loss(GPT(TINY).apply({"params": p}, xi), yi))
    expected = np.mean([loss(state.params, xi, yi) for xi, yi in zip(x, y)])
    np.testing.assert_allclose(train_step.eval_fn(state.params, x, y), expected, rtol=1e-5)
    _, metrics = train_step.train_fn(state, x, y)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_dropout_masks_follow_seed_and_step():
    config = TINY.replace(dropout=0.5)
    x, y = tokens((1, 2, TINY.block_size))
    steps = {seed: TrainStep(config, adamw(), one_device_mesh(), seed=seed) for seed in (0, 1)}

    def first_loss(seed):
        train_step = steps[seed]
        return float(train_step.train_fn(train_step.init(jax.random.key(0)), x, y)[1]["loss"])

    assert first_loss(0) == first_loss(0)
    assert first_loss(0) != first_loss(1)
    state = steps[0].init(jax.random.key(0))  # evaluation never drops out
    assert float(steps[0].eval_fn(state.params, x, y)) != pytest.approx(first_loss(0))


def test_abstract_state_matches_the_real_state():
    train_step = TrainStep(TINY, adamw(), one_device_mesh())
    state = train_step.init(jax.random.key(0))
    abstract = train_step.abstract_state
    for real, shape in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert ((real.shape, real.dtype) == (shape.shape, shape.dtype)
                and real.sharding == shape.sharding)
