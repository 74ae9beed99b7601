"""Which saved arrays a restore reads, and into what: pure planning, no Orbax.

A restore target and a checkpoint step are both sets of leaves keyed like Orbax
(`("model", "layers", "0", "weight")`). Planning pairs them up before anything is
read: the leaves to read (with the shape, dtype and sharding each lands in), the
target leaves kept as they are (outside a partial restore's scope, or allowed
missing), the saved leaves ignored (allowed extra), and every mismatch as a
`CheckpointError` naming the leaf.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import CheckpointError

__all__ = ["Allow", "RestorePlan", "SavedLeaf", "TargetLeaf", "allowed", "plan"]

Key = tuple[str, ...]
Allow = bool | str | Sequence[str]
_LIST_AT_MOST = 8


@dataclass(frozen=True)
class SavedLeaf:
    """A saved array: its shape and dtype (from Orbax's metadata) and its path."""

    shape: tuple[int, ...]
    dtype: np.dtype
    path: str


@dataclass(frozen=True)
class TargetLeaf:
    """An array of the restore target.

    `abstract` is its `jax.ShapeDtypeStruct` (shape, dtype, sharding), or None for
    a host numpy array of the saved shape; `real` says whether the target holds an
    actual array there (needed where the value is kept from the target).
    """

    key: Key
    path: str
    abstract: Any
    real: bool


@dataclass
class RestorePlan:
    """What to read: `read` (key → target leaf) from the checkpoint; `kept` keys
    keep the target's value; `ignored` saved keys are not read."""

    read: dict[Key, TargetLeaf] = field(default_factory=dict)
    kept: list[Key] = field(default_factory=list)
    ignored: list[Key] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """Every target leaf is read and every saved leaf used."""
        return not self.kept and not self.ignored


def allowed(allow: Allow, what: str) -> Callable[[str], bool]:
    """A predicate `path -> bool` from `True`/`False`/regex patterns.

    **Raises:** `CheckpointError` naming `what` if a pattern does not compile.
    """
    if isinstance(allow, bool):
        return lambda _: allow
    patterns = [allow] if isinstance(allow, str) else list(allow)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as e:
            raise CheckpointError(
                f"`{what}` expects True or regexes matched against leaf paths, got "
                f"{pattern!r} ({e}).",
                suggestion=f"Write e.g. `{what}=[r'opt_state']` or `{what}=True`.",
            ) from None
    return lambda path: any(p.search(path) for p in compiled)


def _listing(paths: list[str]) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:_LIST_AT_MOST])
    more = len(paths) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _check_shape(step: int, where: str, leaf: TargetLeaf, saved: SavedLeaf) -> None:
    x = leaf.abstract
    if x is None:
        return
    if tuple(x.shape) != saved.shape or np.dtype(x.dtype) != saved.dtype:
        raise CheckpointError(
            f"Checkpoint step {step} holds `{leaf.path}` with shape {saved.shape} "
            f"and dtype {saved.dtype.name}, but the restore target has shape "
            f"{tuple(x.shape)} and dtype {np.dtype(x.dtype).name}.",
            path=leaf.path,
            suggestion=(
                "Build the target from the same model configuration as the saved "
                f"run; `titanax checkpoint show {where} --step {step}` lists the "
                "saved shapes."
            ),
        )


def plan(
    target: Sequence[TargetLeaf] | None,
    saved: Mapping[Key, SavedLeaf],
    *,
    step: int,
    where: str,
    prefix: Key = (),
    scope: Key = (),
    allow_missing: Allow = (),
    allow_extra: Allow = (),
) -> RestorePlan:
    """Pair the target's leaves with a step's saved leaves.

    **Arguments:**

    - `target`: the target's array leaves, keys already carrying `prefix`; None
        reads every saved leaf as a host array.
    - `saved`: the step's leaves by key.
    - `step`, `where`: the step and checkpoint directory, for messages.
    - `prefix`: the saved subtree the target corresponds to (`("model",)` for
        `restore_model`).
    - `scope`: only target leaves under `prefix + scope` are read; the rest are
        kept (`("model",)` for `restore(partial=True)`).
    - `allow_missing`, `allow_extra`: see `OrbaxCheckpoint.restore`.

    **Returns:** a `RestorePlan`.

    **Raises:** `CheckpointError` for the first leaf whose shape or dtype differs,
    for missing or extra leaves not allowed (listing them), and for a kept leaf
    where the target holds no real array.
    """
    result = RestorePlan()
    if target is None:
        for key, leaf in saved.items():
            result.read[key] = TargetLeaf(key, leaf.path, None, False)
        return result
    in_scope = prefix + scope
    missing: list[Key] = []
    for leaf in target:
        if leaf.key[: len(in_scope)] != in_scope:
            result.kept.append(leaf.key)
            continue
        if leaf.key not in saved:
            missing.append(leaf.key)
            continue
        _check_shape(step, where, leaf, saved[leaf.key])  # likeliest mistake first
        result.read[leaf.key] = leaf
    by_key = {leaf.key: leaf for leaf in target}
    missing_ok = allowed(allow_missing, "allow_missing")
    extra_ok = allowed(allow_extra, "allow_extra")
    bad_missing = [by_key[k].path for k in missing if not missing_ok(by_key[k].path)]
    extra = [
        key
        for key in saved
        if key not in by_key
        and key[: len(prefix)] == prefix
        # A partial restore ignores saved leaves outside its scope silently: they
        # are the state a fresh optimizer replaces, by request.
        and key[: len(in_scope)] == in_scope
    ]
    bad_extra = [saved[k].path for k in extra if not extra_ok(saved[k].path)]
    if bad_missing or bad_extra:
        parts = []
        if bad_missing:
            parts.append(
                f"{len(bad_missing)} target leaf(s) missing from the checkpoint: "
                + _listing(bad_missing)
            )
        if bad_extra:
            parts.append(
                f"{len(bad_extra)} saved leaf(s) the target lacks: "
                + _listing(bad_extra)
            )
        raise CheckpointError(
            f"The restore target and checkpoint step {step} hold different leaves: "
            + "; ".join(parts)
            + ".",
            suggestion=(
                "Restore weights only with `restore_model(model)` or "
                "`restore(state, partial=True)`, or name the leaves you expect: "
                "`allow_missing=[regex, ...]` keeps the target's value, "
                "`allow_extra=[regex, ...]` ignores saved leaves (`True` allows all)."
            ),
        )
    result.kept.extend(missing)
    result.ignored = [k for k in saved if k not in result.read]
    for key in result.kept:
        if not by_key[key].real:
            where_leaf = by_key[key].path
            raise CheckpointError(
                f"`{where_leaf}` is not restored from checkpoint step {step}, so its "
                "value must come from the target, but the target holds a "
                "`jax.ShapeDtypeStruct` there, not an array.",
                path=where_leaf,
                suggestion=(
                    "Pass a target with real arrays for the leaves that are not "
                    "restored (e.g. the state from `init`), or restore the model "
                    "alone with `restore_model`."
                ),
            )
    return result
