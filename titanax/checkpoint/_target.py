"""Restore targets: each array of a PyTree as a `jax.ShapeDtypeStruct` with its
sharding, so Orbax reads every array straight into its place."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from .._errors import CheckpointError

__all__ = ["to_abstract"]


def to_abstract(tree: Any, where: str = "target") -> Any:
    """Each array of `tree` as a `jax.ShapeDtypeStruct` with its sharding.

    **Raises:** `CheckpointError` if a `ShapeDtypeStruct` leaf has no sharding.
    """

    def one(path: Any, x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is None:
                raise CheckpointError(
                    f"The restore {where} has a `jax.ShapeDtypeStruct` without a "
                    f"sharding at `{jax.tree_util.keystr(path)}`: Titanax cannot "
                    "tell which devices it belongs on.",
                    suggestion=(
                        "Build the target with `tx.abstract_state(model, plan, mesh, "
                        "optimizer)`, or give every ShapeDtypeStruct a `sharding=`."
                    ),
                )
            return x
        if eqx.is_array(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding_of(x))
        return x

    return jax.tree_util.tree_map_with_path(one, tree)


def _sharding_of(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # a numpy array: restore onto the default device
        device = jax.devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
    return sharding
