"""Sharded training state, the jitted train step (with gradient accumulation) and the eval step:
`TrainStep` holds them for one model, optimizer and mesh; `loop.py` drives them."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxgpt import sharding, xla_options
from flaxgpt.loss import head_cross_entropy
from flaxgpt.model import GPT, GPTConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


class TrainStep:
    """The model, optimizer and mesh of a run, with its jitted, sharded functions: `init`,
    `state_from_params`, `train_fn(state, x, y) -> (state, metrics)` and `eval_fn(params, x, y) ->
    loss`, and `abstract_state` (shapes, dtypes and shardings, e.g. to restore a checkpoint into).
    Batches are [A, B, T] int32 (A gradient-accumulation micro-steps of B sequences), split over the
    mesh's data-parallel axes on B. The RNG for dropout is derived from (seed, step), so a resumed
    run draws the same masks.
    """

    def __init__(self, model_config: GPTConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                 seed: int = 0, rules=sharding.LOGICAL_AXIS_RULES):
        self.model_config, self.optimizer, self.mesh, self.rules = (model_config, optimizer, mesh,
                                                                    rules)
        self.model, self.seed = GPT(model_config), seed
        boxed = jax.eval_shape(self._boxed_state, jax.random.key(0))
        self.state_sharding = sharding.logical_shardings(boxed, mesh, rules)
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(boxed), self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1, rules=rules)
        replicated = NamedSharding(mesh, P())
        options = xla_options.compiler_options(mesh.devices.flat[0].platform)
        # init(rng) -> a fresh state, created directly in its shards (never gathered on one device)
        self.init = jax.jit(lambda rng: nn.meta.unbox(self._boxed_state(rng)),
                            out_shardings=self.state_sharding)
        self._from_params = jax.jit(self._state_from_params, out_shardings=self.state_sharding)
        self.train_fn = jax.jit(self._train_step, donate_argnums=0,
                                in_shardings=(self.state_sharding, self.batch_sharding,
                                              self.batch_sharding),
                                out_shardings=(self.state_sharding, replicated),
                                compiler_options=options)
        self.eval_fn = jax.jit(self._eval_step,
                               in_shardings=(self.state_sharding.params, self.batch_sharding,
                                             self.batch_sharding),
                               out_shardings=replicated, compiler_options=options)

    def state_from_params(self, params) -> TrainState:
        """A state around given (e.g. pretrained) params, resharded to this mesh, with a fresh
        optimizer."""
        return self._from_params(jax.device_put(params, self.state_sharding.params))

    def _boxed_state(self, rng) -> TrainState:
        """A fresh state whose params (and Adam moments) are boxed with their logical axis names."""
        with nn.logical_axis_rules(self.rules):
            params = self.model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return self._state_from_params(params)

    def _state_from_params(self, params) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    def loss_fn(self, params, x, y, rng=None):
        """x, y: [B, T] -> scalar mean loss; dropout is on when an rng is given. The logits are
        never whole: the head and cross-entropy run a chunk of the sequence at a time (loss.py)."""
        with nn.logical_axis_rules(self.rules), sharding.tracing_under(self.mesh):
            hidden = self.model.apply({"params": params}, x, deterministic=rng is None,
                                      rngs=None if rng is None else {"dropout": rng},
                                      method=GPT.hidden_states)
        return head_cross_entropy(hidden, params["wte"]["embedding"], y,
                                  dtype=self.model_config.dtype)

    def _train_step(self, state: TrainState, x, y):
        """One optimizer step over A micro-batches x, y: [A, B, T] -> (state, metrics)."""
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
        grad_fn = jax.value_and_grad(self.loss_fn)
        dropout = self.model_config.dropout > 0

        def micro_step(grads, inputs):
            i, xi, yi = inputs
            loss, g = grad_fn(state.params, xi, yi, jax.random.fold_in(rng, i) if dropout else None)
            return jax.tree.map(jnp.add, grads, g), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, (jnp.arange(x.shape[0]), x, y))
        grads = jax.tree.map(lambda g: g / x.shape[0], grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.mean(losses), "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params, x, y):
        """Mean loss over A batches x, y: [A, B, T], without dropout."""
        return jnp.mean(jax.lax.map(lambda xy: self.loss_fn(params, *xy), (x, y)))
