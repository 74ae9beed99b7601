"""What a loss function returns: a scalar, or `(scalar, {"name": scalar, ...})`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._errors import TitanaxError, TrainerError

__all__ = ["split_loss_output"]


def split_loss_output(
    out: Any, where: str, error: type[TitanaxError] = TrainerError
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(loss, metrics)` from a loss function's output, both float32 scalars.

    **Arguments:**

    - `out`: a scalar loss, or `(loss, metrics_dict)`.
    - `where`: what returned it, for messages (e.g. "`loss`").
    - `error`: the `TitanaxError` subclass to raise.

    **Raises:** `error` if the loss or a metric is not a scalar.
    """
    loss: Any
    metrics: Any
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if _shape(loss) != ():
        raise error(
            f"Expected {where} to return a scalar loss (or `(loss, metrics_dict)`), "
            f"got {type(loss).__name__} of shape {_shape(loss)}.",
            suggestion="Reduce the loss over the batch, e.g. `jnp.mean(per_example)`.",
        )
    for name, value in metrics.items():
        if _shape(value) != ():
            raise error(
                f"Expected {where}'s metrics to be scalars, got `{name}`: "
                f"{type(value).__name__} of shape {_shape(value)}.",
                suggestion=f"Reduce `{name}` to a scalar (e.g. its batch mean).",
            )
    loss = jnp.asarray(loss).astype(jnp.float32)
    metrics = {str(k): jnp.asarray(v).astype(jnp.float32) for k, v in metrics.items()}
    return loss, metrics


def _shape(x: Any) -> tuple[int, ...] | None:
    """An array's shape, `()` for a Python number, `None` for anything else."""
    if isinstance(x, bool | int | float):
        return ()
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else None
