"""Plans: which mesh axis each kind of parallelism uses, and how logical axes map.

A plan never guesses. DP splits the batch; FSDP shards parameters (and so optimizer
state) along a dim its axis divides; TP maps logical axes (`mlp`, `heads`, `vocab`) to
its axis; PP splits the stacked `layers` dim over its axis.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._axes import AxisNames, _iter_modules, is_arraylike, logical_axes, path_str
from ._errors import PipelineError, PlanError

__all__ = ["DP", "FSDP", "PP", "TP", "Plan"]

_DEFAULT_TP_AXES = ("mlp", "heads", "vocab")


def _check_axis_name(axis: Any, who: str) -> None:
    if not isinstance(axis, str) or not axis:
        raise PlanError(
            f"`{who}(axis=...)` expects a mesh axis name (a non-empty str), "
            f"got {axis!r}.",
            suggestion=f'Write e.g. `{who}(axis="data")`.',
        )


class DP(eqx.Module):
    """Data parallelism: the batch is split over `axis`, parameters replicated.

    **Arguments:**

    - `axis`: the mesh axis the batch's leading dim is split over.
    - `accumulate_steps`: microbatches per optimizer step (gradient accumulation).
        Gradients are reduced over `axis` once per step, whatever this is.
    """

    axis: str = eqx.field(static=True, default="data")
    accumulate_steps: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        _check_axis_name(self.axis, "DP")
        if not isinstance(self.accumulate_steps, int) or self.accumulate_steps < 1:
            raise PlanError(
                "`DP(accumulate_steps=...)` expects an int ≥ 1, got "
                f"{self.accumulate_steps!r}.",
                suggestion="Use 1 for no accumulation, or the number of microbatches.",
            )


class FSDP(eqx.Module):
    """Fully sharded data parallelism (ZeRO-3) over `axis`.

    Each parameter with at least `min_size` elements is sharded along the largest dim
    that `axis` divides and that no other axis shards (never a stacked `layers` dim);
    optimizer state follows. The batch is split over `axis` too. Parameters are gathered
    per use inside the compiled step.

    **Arguments:**

    - `axis`: the mesh axis to shard over.
    - `min_size`: parameters with fewer elements stay replicated.
    """

    axis: str = eqx.field(static=True, default="data")
    min_size: int = eqx.field(static=True, default=1024)

    def __check_init__(self):
        _check_axis_name(self.axis, "FSDP")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise PlanError(
                f"`FSDP(min_size=...)` expects an int ≥ 0, got {self.min_size!r}.",
                suggestion="Use e.g. `min_size=1024` (elements).",
            )


def _as_rule_items(rules: Any) -> tuple[tuple[str, str | None], ...]:
    if isinstance(rules, Mapping):
        items = tuple(rules.items())
    else:
        items = tuple(tuple(item) for item in rules)
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise PlanError(
                f"TP rules map logical axis names to a mesh axis; got {item!r}.",
                suggestion='Write e.g. `TP(rules={"mlp": "model", "heads": "model"})`.',
            )
    return items


class TP(eqx.Module):
    """Megatron-style tensor parallelism from logical-axis rules.

    **Arguments:**

    - `axis`: the mesh axis to shard over.
    - `rules`: logical axis → mesh axis (`axis` or `None`). By default `mlp`, `heads`
        and `vocab` map to `axis`: column-parallel QKV and MLP-up, row-parallel
        attention-out and MLP-down, and a vocabulary-parallel embedding and head.
    """

    axis: str = eqx.field(static=True, default="model")
    rules: tuple[tuple[str, str | None], ...] = eqx.field(static=True, default=())

    def __init__(
        self,
        axis: str = "model",
        rules: Mapping[str, str | None]
        | Sequence[tuple[str, str | None]]
        | None = None,
    ):
        self.axis = axis
        if rules is None:
            rules = {name: axis for name in _DEFAULT_TP_AXES}
        self.rules = _as_rule_items(rules)

    def __check_init__(self):
        _check_axis_name(self.axis, "TP")
        for logical, mesh_axis in self.rules:
            if mesh_axis not in (self.axis, None):
                raise PlanError(
                    f"TP rule `{logical}` → `{mesh_axis}` names a mesh axis other "
                    f"than the TP axis `{self.axis}`.",
                    suggestion=f'Map `{logical}` to "{self.axis}" or None.',
                )


class PP(eqx.Module):
    """Pipeline parallelism over the stacked `layers` dim.

    **Arguments:**

    - `axis`: the mesh axis stages are placed along.
    - `microbatches`: microbatches per step (M); at least the number of stages.
    - `schedule`: `"gpipe"` (all forwards, then all backwards) or `"1f1b"`.
    """

    axis: str = eqx.field(static=True, default="pipe")
    microbatches: int = eqx.field(static=True, default=8)
    schedule: Literal["gpipe", "1f1b"] = eqx.field(static=True, default="gpipe")

    def __check_init__(self):
        _check_axis_name(self.axis, "PP")
        if self.schedule not in ("gpipe", "1f1b"):
            raise PipelineError(
                f'`PP(schedule=...)` expects "gpipe" or "1f1b", got {self.schedule!r}.',
                suggestion='Use schedule="gpipe" or schedule="1f1b".',
            )
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise PipelineError(
                f"`PP(microbatches=...)` expects an int ≥ 1, got "
                f"{self.microbatches!r}.",
                suggestion="Use at least as many microbatches as pipeline stages.",
            )


def _as_path_rules(rules: Any) -> tuple[tuple[str, AxisNames], ...]:
    out = []
    for item in rules:
        if (
            not isinstance(item, tuple | list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or isinstance(item[1], str)
        ):
            raise PlanError(
                f"Plan path rules are (regex, axes) pairs; got {item!r}.",
                suggestion='Write e.g. `rules=[(r"head.weight", ("vocab", "embed"))]`.',
            )
        try:
            re.compile(item[0])
        except re.error as e:
            raise PlanError(
                f"Plan path rule {item[0]!r} is not a valid regex: {e}.",
                suggestion="Fix the pattern; it is matched with `re.search` on paths.",
            ) from None
        out.append((item[0], tuple(item[1])))
    return tuple(out)


class Plan(eqx.Module):
    """A parallel layout: which parallelism uses which mesh axis.

    **Arguments:**

    - `dp`: a `DP`, or `None`.
    - `fsdp`: an `FSDP`, or `None`. Sharing an axis with `dp` is allowed (the batch is
        split once over it).
    - `tp`: a `TP`, or `None`.
    - `pp`: a `PP`, or `None`.
    - `rules`: path rules `[(regex, axes), ...]` naming the logical axes of arrays whose
        paths match; they take priority over every other source.

    !!! Example
        ```python
        plan = tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))
        plan.validate(mesh, model)
        print(plan.describe())
        ```
    """

    dp: DP | None = eqx.field(static=True, default=None)
    fsdp: FSDP | None = eqx.field(static=True, default=None)
    tp: TP | None = eqx.field(static=True, default=None)
    pp: PP | None = eqx.field(static=True, default=None)
    rules: tuple[tuple[str, AxisNames], ...] = eqx.field(
        static=True, default=(), converter=_as_path_rules
    )

    def __check_init__(self):
        for name, kind in (("dp", DP), ("fsdp", FSDP), ("tp", TP), ("pp", PP)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise PlanError(
                    f"`Plan({name}=...)` expects a `tx.{kind.__name__}` or None, got "
                    f"{type(value).__name__}.",
                    suggestion=f"Write e.g. `Plan({name}=tx.{kind.__name__}())`.",
                )
        owners: dict[str, str] = {}
        for name in ("dp", "fsdp", "tp", "pp"):
            part = getattr(self, name)
            if part is None:
                continue
            other = owners.get(part.axis)
            if other is not None and {other, name} != {"dp", "fsdp"}:
                raise PlanError(
                    f"Mesh axis `{part.axis}` is used by both `{other}` and `{name}`.",
                    suggestion=(
                        "Give each parallelism its own mesh axis, e.g. "
                        '`tx.make_mesh(data=2, model=4)` with `DP("data")` and '
                        '`TP("model")`. Only DP and FSDP may share an axis.'
                    ),
                )
            owners.setdefault(part.axis, name)

    # --- what the plan maps ---------------------------------------------------------

    @property
    def data_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch's leading dim is split over (DP, then FSDP)."""
        axes: list[str] = []
        for part in (self.dp, self.fsdp):
            if part is not None and part.axis not in axes:
                axes.append(part.axis)
        return tuple(axes)

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        """Every mesh axis this plan uses."""
        parts = (self.dp, self.fsdp, self.tp, self.pp)
        return tuple(dict.fromkeys(p.axis for p in parts if p is not None))

    @property
    def accumulate_steps(self) -> int:
        """Microbatches per optimizer step from `dp.accumulate_steps` (1 without DP)."""
        return self.dp.accumulate_steps if self.dp is not None else 1

    def logical_rules(self) -> dict[str, str]:
        """Logical axis → mesh axis, for parameters (TP rules and PP's `layers`)."""
        mapping: dict[str, str] = {}
        if self.tp is not None:
            mapping.update({k: v for k, v in self.tp.rules if v is not None})
        if self.pp is not None:
            mapping["layers"] = self.pp.axis
        return mapping

    def batch_spec(self, ndim: int = 1) -> PartitionSpec:
        """The `PartitionSpec` of a batch leaf with `ndim` dims: leading dim on the
        data axes, the rest replicated."""
        axes = self.data_axes
        lead = None if not axes else axes[0] if len(axes) == 1 else axes
        return PartitionSpec(lead, *([None] * (ndim - 1))) if ndim else PartitionSpec()

    def data_parallel_size(self, mesh: Mesh) -> int:
        """How many shards the batch is split into on `mesh`."""
        return math.prod(mesh.shape[a] for a in self.data_axes)

    # --- validation -----------------------------------------------------------------

    def check_mesh(self, mesh: Mesh) -> None:
        """Raise `PlanError` if a mesh axis this plan uses is missing from `mesh`."""
        names = tuple(mesh.axis_names)
        for part_name in ("dp", "fsdp", "tp", "pp"):
            part = getattr(self, part_name)
            if part is not None and part.axis not in names:
                close = difflib.get_close_matches(part.axis, names, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise PlanError(
                    f"`plan.{part_name}` uses mesh axis `{part.axis}`, but the mesh "
                    f"has axes {names}.{hint}",
                    suggestion=(
                        f"Add `{part.axis}` to the mesh (e.g. `tx.make_mesh("
                        f"{part.axis}=...)`) or point `{part_name}` at one of {names}."
                    ),
                )

    def partition_specs(self, model: Any, mesh: Mesh) -> Any:
        """Mesh `PartitionSpec`s for every array of `model` (`None` for non-arrays).

        Validates the plan against `mesh` and `model` first; see `validate`.
        """
        self.check_mesh(mesh)
        self._check_attention_heads(model, mesh)
        logical = logical_axes(model, self.rules)
        mapping = self.logical_rules()
        self._warn_unused(logical, mapping)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
        logical_leaves = treedef.flatten_up_to(logical)
        specs = [
            self._leaf_spec(path_str(model, path), leaf, names, mapping, mesh)
            if is_arraylike(leaf)
            else None
            for (path, leaf), names in zip(leaves, logical_leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, specs)

    def shardings(self, model: Any, mesh: Mesh) -> Any:
        """`NamedSharding`s for every array of `model` (`None` for non-arrays)."""
        specs = self.partition_specs(model, mesh)
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s),
            specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    def validate(self, mesh: Mesh, model: Any) -> None:
        """Check this plan against a mesh and a model; raise before any compilation.

        **Raises:** `PlanError` for a mesh axis the mesh lacks or a mapped dim the mesh
        axis size does not divide (naming the path, dim size, axis size and a fix);
        `PipelineError` when PP is used on a model without a stacked `layers` dim or
        with layers not divisible by the stages. **Warns** (`UserWarning`) for TP rules
        or path rules that match nothing in the model.
        """
        self.partition_specs(model, mesh)
        if self.pp is not None:
            self._check_pipeline(model, mesh)

    def _check_attention_heads(self, model: Any, mesh: Mesh) -> None:
        """`eqx.nn.MultiheadAttention` merges heads and head size into one dim, so the
        per-dim check cannot see a split inside a head: check `num_heads` itself."""
        axis = dict(self.logical_rules()).get("heads")
        if axis is None:
            return
        size = mesh.shape[axis]
        for keypath, module in _iter_modules(model):
            if (
                isinstance(module, eqx.nn.MultiheadAttention)
                and module.num_heads % size
            ):
                path = path_str(model, keypath)
                raise PlanError(
                    f"The plan maps `heads` to mesh axis `{axis}` (size {size}), but "
                    f"the attention at `{path}` has {module.num_heads} heads.",
                    path=path,
                    suggestion=(
                        f"Use a `{axis}` size that divides {module.num_heads}, or map "
                        "`heads` to None."
                    ),
                )

    def _check_pipeline(self, model: Any, mesh: Mesh) -> None:
        assert self.pp is not None
        logical = jax.tree.leaves(
            logical_axes(model, self.rules),
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        if not any("layers" in tuple(spec) for spec in logical):
            raise PipelineError(
                "`plan.pp` splits the stacked `layers` dim, but no array of the model "
                "has one.",
                suggestion=(
                    "Stack the repeated blocks with `eqx.filter_vmap` (a leading "
                    "`layers` dim) and run them with `jax.lax.scan`."
                ),
            )

    def _warn_unused(self, logical: Any, mapping: Mapping[str, str]) -> None:
        """Warn for TP rules naming logical axes that no parameter has.

        The default rules name `mlp`, `heads` and `vocab` together, so with them a
        warning comes only when none matches (TP would shard nothing).
        """
        del mapping
        if self.tp is None:
            return
        names = {
            name
            for spec in jax.tree.leaves(
                logical, is_leaf=lambda x: isinstance(x, PartitionSpec)
            )
            for name in tuple(spec)
            if name is not None
        }
        rule_names = [k for k, _ in self.tp.rules]
        unused = [k for k in rule_names if k not in names]
        if self.tp.rules == TP(self.tp.axis).rules and len(unused) < len(rule_names):
            return
        for logical_name in unused:
            close = difflib.get_close_matches(logical_name, sorted(names), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            warnings.warn(
                f"TP rule `{logical_name}` names a logical axis no parameter has; "
                f"the model's logical axes are {sorted(names)}.{hint}",
                UserWarning,
                stacklevel=4,
            )

    def _leaf_spec(
        self,
        path: str,
        leaf: Any,
        names: PartitionSpec,
        mapping: Mapping[str, str],
        mesh: Mesh,
    ) -> PartitionSpec:
        shape = tuple(leaf.shape)
        mesh_axes: list[str | None] = [
            mapping.get(n) if n is not None else None for n in tuple(names)
        ]
        for dim, axis in enumerate(mesh_axes):
            if axis is None:
                continue
            if mesh_axes.index(axis) != dim:
                raise PlanError(
                    f"`{path}` would use mesh axis `{axis}` for two dims "
                    f"({tuple(names)} → {tuple(mesh_axes)}).",
                    path=path,
                    suggestion="Map at most one of this array's logical axes to it.",
                )
            size = mesh.shape[axis]
            if shape[dim] % size:
                # Layers not divisible by the pipeline stages is a pipeline error.
                is_pp = self.pp is not None and axis == self.pp.axis
                raise (PipelineError if is_pp else PlanError)(
                    f"The plan maps `{names[dim]}` to mesh axis `{axis}` (size "
                    f"{size}), but `{names[dim]}` has size {shape[dim]} at `{path}`.",
                    path=path,
                    suggestion=(
                        f"Use a `{axis}` size that divides {shape[dim]}, or map "
                        f"`{names[dim]}` to None."
                    ),
                )
        if self.fsdp is not None:
            self._place_fsdp(shape, tuple(names), mesh_axes, mesh)
        return PartitionSpec(*mesh_axes)

    def _place_fsdp(
        self,
        shape: tuple[int, ...],
        names: tuple[str | None, ...],
        mesh_axes: list[str | None],
        mesh: Mesh,
    ) -> None:
        assert self.fsdp is not None
        axis = self.fsdp.axis
        if axis in mesh_axes or math.prod(shape) < self.fsdp.min_size:
            return
        size = mesh.shape[axis]
        candidates = [
            dim
            for dim, n in enumerate(shape)
            if mesh_axes[dim] is None
            and n % size == 0
            and not (names[dim] or "").startswith("layers")
        ]
        if candidates:
            # The largest dim gives the most even, most contiguous shards.
            best = max(candidates, key=lambda d: (shape[d], -d))
            mesh_axes[best] = axis

    def describe(self) -> str:
        """A short human-readable description, one part per parallelism."""
        parts = []
        if self.dp is not None:
            acc = self.dp.accumulate_steps
            parts.append(
                f"DP over `{self.dp.axis}`"
                + (f" (accumulate {acc} microbatches)" if acc > 1 else "")
            )
        if self.fsdp is not None:
            parts.append(
                f"FSDP over `{self.fsdp.axis}` (params ≥ {self.fsdp.min_size} elements)"
            )
        if self.tp is not None:
            mapped = ", ".join(f"{k}→{v}" for k, v in self.tp.rules)
            parts.append(f"TP over `{self.tp.axis}` ({mapped})")
        if self.pp is not None:
            parts.append(
                f"PP over `{self.pp.axis}` ({self.pp.schedule}, "
                f"{self.pp.microbatches} microbatches)"
            )
        if self.rules:
            parts.append(f"{len(self.rules)} path rule(s)")
        return " | ".join(parts) if parts else "single device (no parallelism)"
