"""Per-layer norms of a model-shaped tree (parameters or gradients), for
`Logger.histograms`."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .._axes import logical_axes, path_str

__all__ = ["layer_norms"]


def layer_norms(tree: Any, rules: Any = ()) -> dict[str, jax.Array]:
    """The L2 norm of every array of a model (or of its gradients), per layer.

    An array whose leading logical axis is `layers` (a stacked block, see
    `eqx.filter_vmap`) gets one norm per layer; any other array, one norm. Works
    under `jax.jit`, so a training step can return it with its metrics.

    **Arguments:**

    - `tree`: an `eqx.Module`, or a tree of the same structure (its gradients).
    - `rules`: the plan's path rules (`plan.rules`), if the model needs them to
        name its axes.

    **Returns:** `{path: norm}`, e.g. `{"GPT.wte": (), "GPT.blocks.mlp.w_in":
    (n_layer,)}`, float32.

    !!! Example

        ```python
        norms = tx.loggers.layer_norms(state.model)
        logger.histograms(step, {"param_norm": jax.device_get(norms)})
        ```
    """
    specs = logical_axes(tree, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    out: dict[str, jax.Array] = {}
    for (path, leaf), spec in zip(flat, spec_leaves, strict=True):
        x = jnp.asarray(leaf, jnp.float32)
        names = tuple(spec)
        if x.ndim >= 1 and names and names[0] == "layers":
            norm = jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))
        else:
            norm = jnp.sqrt(jnp.sum(jnp.square(x)))
        out[path_str(tree, path)] = norm
    return out
