"""The two layouts of the blocks' parameters, and the conversion between them.

Scanned (`GPTConfig.scan_layers`): params["h"], every leaf stacked on a leading [L] axis, as one
nn.scan over the blocks reads them. Unscanned: params["h_0"] ... params["h_{L-1}"], one block each
(what GPT-2 checkpoints and nanoGPT hold). Optimizer states and checkpoints convert the same way.
"""

import jax
import jax.numpy as jnp


def stack_layers(params: dict) -> dict:
    """Unscanned params (h_0 ... h_{L-1}) -> scanned (h, every leaf stacked on a leading [L])."""
    names = sorted((k for k in params if k.startswith("h_")), key=lambda k: int(k[2:]))
    if not names:
        return params
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    layers = [params[k] for k in names]
    return {**rest, "h": jax.tree.map(lambda *layer: jnp.stack(layer), *layers)}


def unstack_layers(params: dict) -> dict:
    """Scanned params (h with a leading [L] axis) -> unscanned (h_0 ... h_{L-1})."""
    if "h" not in params:
        return params
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    return {**rest, **{f"h_{i}": jax.tree.map(lambda x: x[i], params["h"]) for i in range(n_layer)}}


def convert_layers(tree, scan_layers: bool):
    """Params, or any pytree holding param-shaped dicts (optimizer state), in that layer layout."""
    if not isinstance(tree, dict):
        return jax.tree.map(lambda x: convert_layers(x, scan_layers) if isinstance(x, dict) else x,
                            tree, is_leaf=lambda x: isinstance(x, dict))
    tree = stack_layers(tree) if scan_layers else unstack_layers(tree)
    return {k: convert_layers(v, scan_layers) for k, v in tree.items()}
