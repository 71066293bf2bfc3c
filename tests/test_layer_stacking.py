"""The blocks' two parameter layouts (flaxgpt/layer_stacking.py): scanned [L, ...] and
h_0 ... h_{L-1}."""

import chex
import jax
import numpy as np
import optax

from flaxgpt.layer_stacking import convert_layers, stack_layers, unstack_layers


def layers(n: int) -> dict:
    return {"wte": {"embedding": np.zeros((5, 2))},
            **{f"h_{i}": {"attn": {"kernel": np.full((2, 3), float(i))}} for i in range(n)}}


def test_stacking_puts_layer_i_at_index_i_and_unstacking_undoes_it():
    stacked = stack_layers(layers(11))  # h_10 sorts before h_2 by name, not by number
    kernel = stacked["h"]["attn"]["kernel"]
    assert kernel.shape == (11, 2, 3) and [float(k[0, 0]) for k in kernel] == list(range(11))
    chex.assert_trees_all_equal(unstack_layers(stacked), layers(11))
    assert stack_layers(stacked) is stacked
    one_layout = layers(2)
    assert unstack_layers(one_layout) is one_layout


def test_an_optimizer_state_converts_with_its_params():
    params = layers(3)
    state = optax.adamw(1e-3).init(params)
    stacked = convert_layers(state, scan_layers=True)
    adam = stacked[0]
    assert type(adam) is type(state[0]) and adam.mu["h"]["attn"]["kernel"].shape == (3, 2, 3)
    back = convert_layers(stacked, scan_layers=False)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, state))
