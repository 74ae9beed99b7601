"""Mixed precision: compute dtype, master weights, dynamic loss scaling."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import TrainerError

__all__ = ["LossScale", "Precision"]


class LossScale(eqx.Module):
    """Dynamic loss scale state (fp16): the scale and the count of good steps since
    it last changed. Lives in `TrainState.loss_scale`."""

    scale: jax.Array
    good_steps: jax.Array


class Precision(eqx.Module):
    """How a step computes: the dtype the model runs in, and loss scaling.

    Parameters and optimizer state always stay in float32 ("master weights"); the
    step casts floating parameters and floating batch leaves to `compute_dtype` on
    the way into the loss, so gradients come back in float32.

    Build one with `Precision.fp32()`, `Precision.bf16()` or `Precision.fp16()`.

    **Fields:**

    - `compute_dtype`: the dtype the loss function sees parameters and inputs in.
    - `dynamic_loss_scale`: fp16's dynamic loss scaling: the loss is multiplied by the
        scale before differentiation; a step whose gradients are not finite is skipped
        and the scale halves; after `growth_interval` good steps it doubles.
    - `initial_scale`, `growth_interval`: the scale's start and doubling period.
    """

    compute_dtype: Any = eqx.field(static=True, default=jnp.float32)
    dynamic_loss_scale: bool = eqx.field(static=True, default=False)
    initial_scale: float = eqx.field(static=True, default=2.0**15)
    growth_interval: int = eqx.field(static=True, default=2000)

    @classmethod
    def fp32(cls) -> Precision:
        """Everything in float32."""
        return cls()

    @classmethod
    def bf16(cls) -> Precision:
        """bfloat16 compute, float32 master weights and optimizer state."""
        return cls(compute_dtype=jnp.bfloat16)

    @classmethod
    def fp16(cls, initial_scale: float = 2.0**15, growth_interval: int = 2000):
        """float16 compute with dynamic loss scaling, float32 master weights."""
        if initial_scale <= 0 or growth_interval < 1:
            raise TrainerError(
                f"fp16 needs initial_scale > 0 and growth_interval ≥ 1, got "
                f"{initial_scale} and {growth_interval}.",
                suggestion="Use the defaults: `tx.Precision.fp16()`.",
            )
        return cls(
            compute_dtype=jnp.float16,
            dynamic_loss_scale=True,
            initial_scale=initial_scale,
            growth_interval=growth_interval,
        )

    @property
    def name(self) -> str:
        """`fp32`, `bf16` or `fp16`."""
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
            jnp.dtype(self.compute_dtype).name, jnp.dtype(self.compute_dtype).name
        )

    def cast(self, tree: Any) -> Any:
        """Cast the floating arrays of `tree` to `compute_dtype`."""
        if jnp.dtype(self.compute_dtype) == jnp.float32:
            return tree

        def cast_leaf(x: Any) -> Any:
            if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
                return x.astype(self.compute_dtype)
            return x

        return jax.tree.map(cast_leaf, tree)

    def initial_loss_scale(self) -> LossScale | None:
        """The `LossScale` a new `TrainState` starts with (None without scaling)."""
        if not self.dynamic_loss_scale:
            return None
        return LossScale(
            scale=jnp.asarray(self.initial_scale, jnp.float32),
            good_steps=jnp.asarray(0, jnp.int32),
        )

    def next_loss_scale(self, current: LossScale, finite: jax.Array) -> LossScale:
        """Halve on a non-finite step; double after `growth_interval` good ones."""
        grown = current.good_steps + 1 >= self.growth_interval
        scale = jnp.where(
            finite,
            jnp.where(grown, current.scale * 2.0, current.scale),
            jnp.maximum(current.scale / 2.0, 1.0),
        )
        good = jnp.where(finite & ~grown, current.good_steps + 1, 0)
        return LossScale(scale=scale, good_steps=good.astype(jnp.int32))
