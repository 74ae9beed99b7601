"""Optimizer recipes: AdamW and SGD as Optax chains, with their schedules inside.

A recipe is `clip -> direction (Adam / momentum) -> weight decay -> learning rate`,
in one `optax.chain`. The learning rate goes through `optax.inject_hyperparams`, so
the value used by the last update sits in the optimizer state (`current_lr`).
Schedules stay inside Optax: nothing scales the gradients from outside.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from .._errors import TrainerError
from ._schedules import (
    _check_lr,
    format_number,
    schedule_description,
    warmup_constant,
    warmup_cosine,
)

__all__ = [
    "OptimizerInfo",
    "adamw",
    "current_lr",
    "default_weight_decay_mask",
    "describe_optimizer",
    "optimizer_info",
    "sgd",
]

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """What a Titanax recipe was built with; see `optimizer_info`.

    **Arguments:**

    - `name`: the recipe, `"adamw"` or `"sgd"`.
    - `learning_rate`: the peak (or constant) learning rate, or `None` when a
        schedule was passed in.
    - `schedule`: the learning rate as text, e.g. `"3e-4 warmup 100 -> cosine to 0
        over 2000"`.
    - `hyperparams`: the other settings, in display order (`None` values are unset).
    """

    name: str
    learning_rate: float | None
    schedule: str
    hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One line, e.g. `adamw(lr=1e-3, b1=0.9, b2=0.95, wd=0.1, clip=1)`.

        **Returns:**

        The description as a string.
        """
        parts = [f"lr={self.schedule}"]
        for key, value in self.hyperparams.items():
            if value is None or value is False:
                continue
            if value is True:
                parts.append(key)
            elif isinstance(value, numbers.Real):
                parts.append(f"{key}={format_number(float(value))}")
            else:
                parts.append(f"{key}={value}")
        return f"{self.name}({', '.join(parts)})"


# id(tx) -> (tx, info). Optax transformations are NamedTuples, which cannot be
# weakly referenced, so the table holds the transformation itself: that keeps
# `id(tx)` from being reused by another object while the entry exists.
_REGISTRY: dict[int, tuple[optax.GradientTransformation, OptimizerInfo]] = {}


def _register(
    tx: optax.GradientTransformation, info: OptimizerInfo
) -> optax.GradientTransformation:
    _REGISTRY[id(tx)] = (tx, info)
    return tx


def optimizer_info(tx: object) -> OptimizerInfo | None:
    """The settings a `tx.optim` recipe was built with.

    **Arguments:**

    - `tx`: an optimizer, as returned by `adamw` or `sgd` (or any other object).

    **Returns:**

    An `OptimizerInfo`, or `None` if `tx` was not built by a Titanax recipe (for
    example an `optax.adamw`, or a recipe wrapped in `optax.MultiSteps`).
    """
    entry = _REGISTRY.get(id(tx))
    if entry is None or entry[0] is not tx:
        return None
    return entry[1]


def describe_optimizer(tx: object) -> str:
    """A one-line description of an optimizer, for run headers and logs.

    **Arguments:**

    - `tx`: an optimizer.

    **Returns:**

    For a Titanax recipe, e.g. `"adamw(lr=1e-3 warmup 100 -> cosine to 1e-4 over
    2000, b1=0.9, b2=0.99, wd=0.1, clip=1)"`; for anything else,
    `"custom optax transformation"`.
    """
    info = optimizer_info(tx)
    return "custom optax transformation" if info is None else info.describe()


def default_weight_decay_mask(params: Any) -> Any:
    """The default weight-decay mask: decay arrays with 2 or more dims only.

    Biases and norm scales (1-D) and scalars are not decayed.

    **Arguments:**

    - `params`: a PyTree of arrays.

    **Returns:**

    A PyTree of bools with the structure of `params`.
    """
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def current_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate of a recipe's optimizer state.

    This is the value the most recent update used (before any update: the value
    the first update will use), read from the `optax.inject_hyperparams` state. With
    a schedule `s`, after `k >= 1` updates it is `s(k - 1)`.

    **Arguments:**

    - `opt_state`: an optimizer state, or any PyTree holding one (a `TrainState`
        works). The first injected `learning_rate` found is returned.

    **Returns:**

    The learning rate as a scalar array, or `None` if the state has no injected
    `learning_rate` (e.g. a plain `optax.adamw` state).
    """
    for node in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, _INJECT_STATES)
    ):
        if isinstance(node, _INJECT_STATES) and "learning_rate" in node.hyperparams:
            return jax.numpy.asarray(node.hyperparams["learning_rate"])
    return None


def _learning_rate(
    learning_rate: float | optax.Schedule,
    warmup_steps: int,
    total_steps: int | None,
    end_lr: float | None,
) -> tuple[float | optax.Schedule, float | None, str]:
    """The learning rate (number or schedule), its peak and its description."""
    if callable(learning_rate):
        if warmup_steps or total_steps is not None or end_lr is not None:
            raise TrainerError(
                "Got a schedule as `learning_rate` and also `warmup_steps`, "
                "`total_steps` or `end_lr`; expected one or the other.",
                suggestion="Pass a float `learning_rate` with `warmup_steps`/"
                "`total_steps`/`end_lr`, or a schedule alone, e.g. "
                "`learning_rate=tx.optim.warmup_cosine(3e-4, 100, 2000)`.",
            )
        return learning_rate, None, schedule_description(learning_rate) or "schedule"
    peak = _check_lr(learning_rate, "learning_rate")
    if total_steps is not None:
        schedule = warmup_cosine(peak, warmup_steps, total_steps, end_lr or 0.0)
        return schedule, peak, schedule_description(schedule) or "schedule"
    if end_lr is not None:
        raise TrainerError(
            f"Got `end_lr={end_lr}` without `total_steps`; expected both or neither.",
            suggestion="Pass `total_steps` (the step at which the decay ends) too.",
        )
    if warmup_steps:
        schedule = warmup_constant(peak, warmup_steps)
        return schedule, peak, schedule_description(schedule) or "schedule"
    return peak, peak, format_number(peak)


def _check_range(value: object, name: str, low: float, high: float) -> float:
    """`low <= value < high`, else a TrainerError naming the argument."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (low <= float(value) < high)
    ):
        bound = "inf" if math.isinf(high) else f"{high:g}"
        raise TrainerError(
            f"Expected `{name}` to be a number in [{low:g}, {bound}), got "
            f"{value!r} instead.",
            suggestion=f"Pass `{name}` in that range.",
        )
    return float(value)


def _clip(clip_norm: float | None) -> list[optax.GradientTransformation]:
    if clip_norm is None:
        return []
    if (
        isinstance(clip_norm, bool)
        or not isinstance(clip_norm, numbers.Real)
        or not clip_norm > 0
    ):
        raise TrainerError(
            f"Expected `clip_norm` to be a number > 0 or None, got {clip_norm!r} "
            "instead.",
            suggestion="Pass e.g. `clip_norm=1.0`, or `None` for no clipping.",
        )
    return [optax.clip_by_global_norm(float(clip_norm))]


def _decay(weight_decay: float, mask: Any) -> list[optax.GradientTransformation]:
    if weight_decay == 0:
        return []
    return [optax.add_decayed_weights(weight_decay, mask)]


def _scale_by_lr(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    return optax.inject_hyperparams(optax.scale_by_learning_rate)(
        learning_rate=learning_rate
    )


def _mask_note(weight_decay: float, mask: Any) -> str | None:
    if weight_decay == 0 or mask is default_weight_decay_mask:
        return None
    return "all params" if mask is None else "custom"


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Callable[[Any], Any] | Any | None = default_weight_decay_mask,
    clip_norm: float | None = None,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_lr: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping and a warmup + cosine schedule.

    The chain is `clip_by_global_norm -> scale_by_adam -> add_decayed_weights ->
    learning rate`, which equals `optax.adamw` after the clipping. The learning rate
    is injected, so `current_lr(opt_state)` reads it.

    With a float `learning_rate`: `total_steps` turns on `warmup_cosine(learning_rate,
    warmup_steps, total_steps, end_lr or 0)`; `warmup_steps` alone gives a linear
    warmup then a constant; neither gives a constant.

    **Arguments:**

    - `learning_rate`: the peak learning rate, or an `optax.Schedule`.
    - `b1`: the decay rate of the first moment.
    - `b2`: the decay rate of the second moment (0.95 is common for transformers).
    - `eps`: added to the denominator for numerical stability.
    - `weight_decay`: the decoupled weight-decay coefficient.
    - `weight_decay_mask`: which parameters are decayed: a PyTree of bools or a
        function from the parameters to one. The default decays arrays with 2 or
        more dims (not biases or norm scales); `None` decays everything.
    - `clip_norm`: clip the gradients to this global norm first; `None` to not clip.
    - `warmup_steps`: steps of linear warmup from 0 (float `learning_rate` only).
    - `total_steps`: the step at which the cosine decay ends, counting the warmup.
    - `end_lr`: the learning rate at the end of the decay (needs `total_steps`).

    **Returns:**

    An `optax.GradientTransformation`. `describe_optimizer` describes it.

    !!! Example

        ```python
        optimizer = tx.optim.adamw(
            3e-4, b2=0.95, weight_decay=0.1, clip_norm=1.0,
            warmup_steps=100, total_steps=2000,
        )
        ```
    """
    lr, peak, schedule = _learning_rate(
        learning_rate, warmup_steps, total_steps, end_lr
    )
    b1 = _check_range(b1, "b1", 0.0, 1.0)
    b2 = _check_range(b2, "b2", 0.0, 1.0)
    eps = _check_range(eps, "eps", 0.0, math.inf)
    weight_decay = _check_range(weight_decay, "weight_decay", 0.0, math.inf)
    tx = optax.chain(
        *_clip(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        *_decay(weight_decay, weight_decay_mask),
        _scale_by_lr(lr),
    )
    info = OptimizerInfo(
        name="adamw",
        learning_rate=peak,
        schedule=schedule,
        hyperparams={
            "b1": b1,
            "b2": b2,
            "eps": None if eps == 1e-8 else eps,
            "wd": weight_decay or None,
            "wd_mask": _mask_note(weight_decay, weight_decay_mask),
            "clip": clip_norm,
        },
    )
    return _register(tx, info)


def sgd(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Callable[[Any], Any] | Any | None = default_weight_decay_mask,
    clip_norm: float | None = None,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_lr: float | None = None,
) -> optax.GradientTransformation:
    """SGD with optional momentum, weight decay, clipping and schedule.

    The chain is `clip_by_global_norm -> add_decayed_weights -> trace (momentum) ->
    learning rate`: weight decay is added to the gradient before the momentum, as in
    PyTorch's `SGD`. With `momentum=m`, the buffer is `v = g + m * v` and the update
    is `-lr * v` (`-lr * (g + m * v)` with `nesterov=True`).

    **Arguments:**

    - `learning_rate`: the peak learning rate, or an `optax.Schedule`.
    - `momentum`: the momentum coefficient in [0, 1), or `None` for plain SGD.
    - `nesterov`: use Nesterov momentum (needs `momentum`).
    - `weight_decay`: the L2 coefficient added to the gradient (`g + wd * p`).
    - `weight_decay_mask`: which parameters are decayed, as in `adamw`.
    - `clip_norm`: clip the gradients to this global norm first; `None` to not clip.
    - `warmup_steps`: steps of linear warmup from 0 (float `learning_rate` only).
    - `total_steps`: the step at which the cosine decay ends, counting the warmup.
    - `end_lr`: the learning rate at the end of the decay (needs `total_steps`).

    **Returns:**

    An `optax.GradientTransformation`. `describe_optimizer` describes it.
    """
    lr, peak, schedule = _learning_rate(
        learning_rate, warmup_steps, total_steps, end_lr
    )
    if momentum is not None:
        momentum = _check_range(momentum, "momentum", 0.0, 1.0)
    elif nesterov:
        raise TrainerError(
            "Got `nesterov=True` with `momentum=None`; Nesterov needs a momentum.",
            suggestion="Pass e.g. `momentum=0.9` too, or `nesterov=False`.",
        )
    weight_decay = _check_range(weight_decay, "weight_decay", 0.0, math.inf)
    direction = (
        [] if momentum is None else [optax.trace(decay=momentum, nesterov=nesterov)]
    )
    tx = optax.chain(
        *_clip(clip_norm),
        *_decay(weight_decay, weight_decay_mask),
        *direction,
        _scale_by_lr(lr),
    )
    info = OptimizerInfo(
        name="sgd",
        learning_rate=peak,
        schedule=schedule,
        hyperparams={
            "momentum": momentum,
            "nesterov": bool(nesterov),
            "wd": weight_decay or None,
            "wd_mask": _mask_note(weight_decay, weight_decay_mask),
            "clip": clip_norm,
        },
    )
    return _register(tx, info)
