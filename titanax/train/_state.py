"""The TrainState: everything a step reads and writes, as one `eqx.Module`."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from ._precision import LossScale

__all__ = ["TrainState"]


class TrainState(eqx.Module):
    """Everything training needs to continue: an `eqx.Module` PyTree.

    Its arrays are what a checkpoint saves; its non-array leaves (the model's
    activation functions, ...) come back from the model skeleton.

    **Fields:**

    - `model`: the model, float32 master weights, sharded as the plan says.
    - `opt_state`: the Optax state of the trainable part of the model, sharded like
        the parameters it belongs to (`None` leaves where frozen).
    - `step`: int32 scalar, optimizer steps taken.
    - `rng`: uint32 key data (`jax.random.key_data`), the run's base key; the step key
        is `fold_in(rng, step)`, so resuming continues the same random stream.
    - `data_position`: int32 scalar, samples (global batch rows) consumed from the
        data stream: each step adds its global batch size; `tx.Trainer` also adds
        the rows of batches it skipped (failed steps under `continue_on_error`), so
        a resumed run reads on from exactly where this one stopped, whatever its
        process count or data-parallel size. (int32: up to 2^31 - 1 samples.)
    - `loss_scale`: fp16's `LossScale`, or `None`.
    - `bad_steps`: int32 scalar, steps whose loss or gradients were not finite.
    - `first_bad_step`: int32 scalar, the step index (from 0) of the first such
        step, or -1.
    - `bad_streak`: int32 scalar, how many steps in a row, up to now, were not
        finite (0 after a finite step).
    """

    model: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    data_position: jax.Array
    loss_scale: LossScale | None
    bad_steps: jax.Array
    first_bad_step: jax.Array
    bad_streak: jax.Array

    @property
    def key(self) -> jax.Array:
        """The base PRNG key (a typed key array)."""
        return jax.random.wrap_key_data(self.rng)
