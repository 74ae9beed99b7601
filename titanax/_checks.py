"""Argument checks shared by every entry point: one phrasing for every mistake.

Each check raises `ArgumentError` saying what was expected, what was got (value and
type), where (`Trainer(log_every=...)`), and what to do. Checks run before anything is
placed or compiled.
"""

from __future__ import annotations

import inspect
import numbers
import operator
import os
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

from jax.sharding import Mesh

from ._errors import ArgumentError, PlanError

__all__ = [
    "expect_bool",
    "expect_callable",
    "expect_choice",
    "expect_int",
    "expect_mesh",
    "expect_number",
    "expect_path_or_bool",
    "expect_plan",
    "expect_sequence_of",
    "describe_value",
]


def describe_value(x: Any) -> str:
    """`x` as error messages say what they got: `the class MLP`, `int 3`, ..."""
    if isinstance(x, type):
        return f"the class `{x.__qualname__}`"
    if inspect.isfunction(x) or inspect.ismethod(x):
        return (
            "a lambda" if x.__name__ == "<lambda>" else f"the function `{x.__name__}`"
        )
    if isinstance(x, tuple | list) and x:
        inner = ", ".join(type(item).__name__ for item in x)
        return f"{type(x).__name__} of ({inner})"
    if isinstance(x, dict):
        return f"dict with keys {list(x)[:5]}"
    text = " ".join(repr(x).split())  # one line, even for an Equinox module
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(x).__name__} {text}"


@overload
def expect_int(
    value: Any,
    where: str,
    *,
    minimum: int | None = None,
    optional: Literal[False] = ...,
) -> int: ...


@overload
def expect_int(
    value: Any, where: str, *, minimum: int | None = None, optional: bool
) -> int | None: ...


def expect_int(
    value: Any, where: str, *, minimum: int | None = None, optional: bool = False
) -> int | None:
    """An `int` (not a bool, not a float) ≥ `minimum`; `None` if `optional`."""
    if value is None and optional:
        return None
    value = typing.cast(Any, value)
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or (minimum is not None and operator.index(value) < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        none = " or None" if optional else ""
        raise ArgumentError(
            f"`{where}` expected an int{bound}{none}, got {describe_value(value)}.",
            suggestion=(
                f"Pass a whole number{bound}, e.g. `{_example(where, minimum)}`."
            ),
        )
    return operator.index(value)


def _name(where: str) -> str:
    """`log_every` from `Trainer(log_every=...)`."""
    return where.rsplit("(", 1)[-1].split("=")[0]


def _example(where: str, minimum: int | None) -> str:
    return f"{_name(where)}={max(minimum or 0, 1) * 10}"


def expect_number(
    value: Any, where: str, *, positive: bool = True, optional: bool = True
) -> float | None:
    """A real number (not a bool), > 0 if `positive`; `None` if `optional`."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or (positive and not typing.cast(float, value) > 0):
        raise ArgumentError(
            f"`{where}` expected a number{' > 0' if positive else ''}"
            f"{' or None' if optional else ''}, got {describe_value(value)}.",
            suggestion="Pass e.g. `1e12`, or leave it out.",
        )
    return float(typing.cast(float, value))


def expect_bool(value: Any, where: str) -> bool:
    """Exactly `True` or `False` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ArgumentError(
            f"`{where}` expected True or False, got {describe_value(value)}.",
            suggestion=f"Pass `{_name(where)}=True` or False.",
        )
    return value


def expect_choice(value: Any, where: str, choices: Sequence[str]) -> str:
    """One of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ArgumentError(
            f"`{where}` expected {options}, got {describe_value(value)}.",
            suggestion=f"Use one of {options}.",
        )
    return value


def expect_callable(value: Any, where: str, form: str, *, optional: bool = False):
    """A callable; `form` shows the expected signature in the message."""
    if value is None and optional:
        return None
    if not callable(value):
        raise ArgumentError(
            f"`{where}` expected a function `{form}`, got {describe_value(value)}.",
            suggestion=f"Pass a function of the form `{form}`.",
        )
    return value


def expect_sequence_of(
    values: Any,
    where: str,
    check: Callable[[Any], bool],
    what: str,
    example: str,
) -> tuple[Any, ...]:
    """A list or tuple whose items all pass `check` (`what` names them)."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ArgumentError(
            f"`{where}` expected a list of {what}, got {describe_value(values)}.",
            suggestion=f"Pass e.g. `{example}`.",
        )
    items = tuple(values)
    for i, item in enumerate(items):
        if not check(item):
            raise ArgumentError(
                f"`{where}` expected a list of {what}, got {describe_value(item)} "
                f"at index {i}.",
                suggestion=f"Pass e.g. `{example}`.",
            )
    return items


def expect_path_or_bool(value: Any, where: str) -> bool | str:
    """`True`, `False`, or a path (`str` or `os.PathLike`)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    raise ArgumentError(
        f"`{where}` expected True, False or a checkpoint path, got "
        f"{describe_value(value)}.",
        suggestion="Pass `resume=True` (the Trainer's checkpoint) or a path.",
    )


def expect_plan(plan: Any, where: str) -> Any:
    """A `tx.Plan`."""
    from ._plan import Plan

    if not isinstance(plan, Plan):
        raise PlanError(
            f"`{where}` expected a `tx.Plan`, got {describe_value(plan)}.",
            suggestion="Build one, e.g. `tx.Plan(dp=tx.DP())`.",
        )
    return plan


def expect_mesh(mesh: Any, where: str, *, optional: bool = False) -> Mesh | None:
    """A `jax.sharding.Mesh`."""
    if mesh is None and optional:
        return None
    if not isinstance(mesh, Mesh):
        raise ArgumentError(
            f"`{where}` expected a `jax.sharding.Mesh`, got {describe_value(mesh)}.",
            suggestion="Build one with `tx.make_mesh(data=-1)`.",
        )
    return mesh
