"""Learning-rate schedules: thin, validated wrappers over Optax's.

Each schedule built here is remembered (weakly) with a short description, so that
`describe_optimizer` can say "lr=3e-4 warmup 100 -> cosine to 0 over 2000" rather
than "a schedule".
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable

import optax

from .._errors import TrainerError

__all__ = ["constant", "warmup_constant", "warmup_cosine"]

# Schedule -> description. Schedules are plain functions, so weak keys work and the
# table never keeps a schedule alive.
_DESCRIPTIONS: weakref.WeakKeyDictionary[Callable, str] = weakref.WeakKeyDictionary()


def format_number(x: float) -> str:
    """`3e-4`, `0.1`, `2000`: short, and scientific only for small or big numbers."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if 1e-2 <= abs(x) < 1e5:
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def schedule_description(schedule: object) -> str | None:
    """The description a Titanax schedule was built with, or `None`."""
    try:
        return _DESCRIPTIONS.get(schedule)  # pyright: ignore[reportArgumentType]
    except TypeError:  # not weak-referenceable, so not ours
        return None


def _remember(schedule: optax.Schedule, description: str) -> optax.Schedule:
    try:
        _DESCRIPTIONS[schedule] = description
    except TypeError:
        pass
    return schedule


def _check_lr(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrainerError(
            f"Expected `{name}` to be a float, got {type(value).__name__} "
            f"({value!r}) instead.",
            suggestion=f"Pass a number such as `{name}=3e-4`.",
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise TrainerError(
            f"Expected `{name}` to be a finite number >= 0, got {value!r} instead.",
            suggestion=f"Pass a non-negative learning rate such as `{name}=3e-4`.",
        )
    return value


def _check_steps(value: object, name: str, *, minimum: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise TrainerError(
            f"Expected `{name}` to be an integer >= {minimum}, got {value!r} instead.",
            suggestion=f"Pass a whole number of optimizer steps, e.g. `{name}=1000`.",
        )
    return int(value)


def warmup_cosine(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `end_lr`.

    The value is `0` at step 0, `peak_lr` at step `warmup_steps`, `end_lr` at step
    `total_steps` and stays there afterwards. Built on
    `optax.warmup_cosine_decay_schedule`.

    **Arguments:**

    - `peak_lr`: the learning rate at the end of the warmup.
    - `warmup_steps`: the number of optimizer steps of the linear warmup (may be 0).
    - `total_steps`: the step at which the decay ends, counting the warmup; must be
        larger than `warmup_steps`.
    - `end_lr`: the learning rate at and after `total_steps`.

    **Returns:**

    An `optax.Schedule`: a function from the step count to the learning rate.

    !!! Example

        ```python
        schedule = tx.optim.warmup_cosine(3e-4, warmup_steps=100, total_steps=2000)
        schedule(100)  # 3e-4
        ```
    """
    peak_lr = _check_lr(peak_lr, "peak_lr")
    end_lr = _check_lr(end_lr, "end_lr")
    warmup_steps = _check_steps(warmup_steps, "warmup_steps", minimum=0)
    total_steps = _check_steps(total_steps, "total_steps", minimum=1)
    if total_steps <= warmup_steps:
        raise TrainerError(
            f"Expected `total_steps` to be larger than `warmup_steps`, got "
            f"total_steps={total_steps} and warmup_steps={warmup_steps}.",
            suggestion="`total_steps` counts the warmup; use a larger `total_steps` "
            "or a shorter warmup.",
        )
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_lr,
    )
    warmup = f" warmup {warmup_steps} ->" if warmup_steps else ""
    description = (
        f"{format_number(peak_lr)}{warmup} cosine to {format_number(end_lr)} "
        f"over {total_steps}"
    )
    return _remember(schedule, description)


def warmup_constant(peak_lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then constant.

    **Arguments:**

    - `peak_lr`: the learning rate at and after step `warmup_steps`.
    - `warmup_steps`: the number of optimizer steps of the warmup (at least 1).

    **Returns:**

    An `optax.Schedule`: a function from the step count to the learning rate.
    """
    peak_lr = _check_lr(peak_lr, "peak_lr")
    warmup_steps = _check_steps(warmup_steps, "warmup_steps", minimum=1)
    schedule = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return _remember(schedule, f"{format_number(peak_lr)} warmup {warmup_steps}")


def constant(lr: float) -> optax.Schedule:
    """A constant learning rate.

    **Arguments:**

    - `lr`: the learning rate at every step.

    **Returns:**

    An `optax.Schedule` that returns `lr` whatever the step.
    """
    lr = _check_lr(lr, "lr")
    return _remember(optax.constant_schedule(lr), format_number(lr))
