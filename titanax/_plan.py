"""Plans: which mesh axis each kind of parallelism uses, and how logical axes map.

A plan never guesses. DP splits the batch; FSDP shards parameters (and so optimizer
state) along a dim its axis divides; TP maps logical axes (`mlp`, `heads`, `vocab`) to
its axis; PP splits the stacked `layers` dim over its axis; CP splits the sequence.

Parameters and activations are mapped separately (as Levanter's parameter and compute
mappings are): `logical_rules` maps the parameters' logical axes, `activation_rules`
the activations' (`batch`, `seq`, `embed`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import GetAttrKey

from ._axes import (
    AxisNames,
    as_path_rules,
    axes_problem,
    describe_value,
    is_arraylike,
    iter_modules,
    logical_axes,
    path_rule_use,
    path_str,
)
from ._errors import PipelineError, PlanError

__all__ = ["CP", "DP", "FSDP", "PP", "TP", "Plan"]

_DEFAULT_TP_AXES = ("mlp", "heads", "vocab")


def _check_axis_name(axis: Any, who: str) -> None:
    if not isinstance(axis, str) or not axis:
        raise PlanError(
            f"`{who}(axis=...)` expects a mesh axis name (a non-empty str), "
            f"got {axis!r}.",
            suggestion=f'Write e.g. `{who}(axis="data")`.',
        )


def _is_int(value: object) -> bool:
    """An int that is not a bool (`accumulate_steps=True` is a mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        if not _is_int(self.accumulate_steps) or self.accumulate_steps < 1:
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
        if not _is_int(self.min_size) or self.min_size < 0:
            raise PlanError(
                f"`FSDP(min_size=...)` expects an int ≥ 0, got {self.min_size!r}.",
                suggestion="Use e.g. `min_size=1024` (elements).",
            )


# Characters of a regex or a PyTree path, never of a logical axis name.
_PATH_CHARS = frozenset(".*[]()\\^$|+?{}/")


def _tp_rules_example(axis: str) -> str:
    return f'TP(rules={{"mlp": "{axis}", "heads": "{axis}"}})'


def _as_rule_items(rules: Any, axis: str) -> tuple[tuple[str, str | None], ...]:
    """Check and normalise `TP(rules=...)`: logical axis name -> mesh axis or None."""
    example = _tp_rules_example(axis)
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, str | bytes) or not isinstance(rules, Iterable):
        raise PlanError(
            "`TP(rules=...)` expects a dict of logical axis name -> mesh axis, got "
            f"{describe_value(rules)}.",
            path="TP.rules",
            suggestion=f"Write e.g. `{example}`.",
        )
    else:
        items = list(rules)
    if not items:
        raise PlanError(
            "Expected at least one TP rule, got none at `TP.rules`: TP would shard "
            "nothing.",
            path="TP.rules",
            suggestion=f"Write e.g. `{example}`, or leave `tp` out of the plan.",
        )
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        where = f"TP.rules[{i}]"
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise PlanError(
                f"Expected a (logical axis, mesh axis) pair, got {item!r} at "
                f"`{where}`.",
                path=where,
                suggestion=f"Write e.g. `{example}`.",
            )
        name, mesh_axis = item
        if isinstance(name, str) and (
            _PATH_CHARS.intersection(name) or isinstance(mesh_axis, tuple | list)
        ):
            axes = tuple(mesh_axis) if isinstance(mesh_axis, tuple | list) else None
            axes = axes if axes_problem(axes) is None else ("mlp", None)
            raise PlanError(
                "Expected a logical axis name (`mlp`, `heads`, ...) as a TP rule, got "
                f"the path rule {name!r} -> {mesh_axis!r} at `{where}`. TP rules map "
                "logical axes to the TP mesh axis; path rules belong to the plan.",
                path=where,
                suggestion=(
                    "Name the arrays' axes with the plan's path rules and let TP map "
                    f'the names: `tx.Plan(tp=tx.TP("{axis}"), rules=[(r"{name}", '
                    f"{axes!r})])`."
                ),
            )
        if not isinstance(name, str) or not name:
            raise PlanError(
                "Expected a logical axis name (a non-empty str) as a TP rule key, got "
                f"{describe_value(name)} at `{where}`.",
                path=where,
                suggestion=f"Write e.g. `{example}`.",
            )
        if mesh_axis is not None and not isinstance(mesh_axis, str):
            raise PlanError(
                f"Expected the mesh axis `{axis}` or None for TP rule `{name}`, got "
                f"{describe_value(mesh_axis)} at `{where}`.",
                path=where,
                suggestion=f'Write `"{name}": "{axis}"` (shard) or `"{name}": None`.',
            )
        if any(name == seen for seen, _ in out):
            raise PlanError(
                f"Expected each logical axis once in TP rules, got `{name}` again at "
                f"`{where}`.",
                path=where,
                suggestion=f"Keep one rule for `{name}`.",
            )
        out.append((name, mesh_axis))
    return tuple(out)


class TP(eqx.Module):
    """Megatron-style tensor parallelism from logical-axis rules.

    **Arguments:**

    - `axis`: the mesh axis to shard over.
    - `rules`: logical axis → mesh axis (`axis` or `None`). By default `mlp`, `heads`
        and `vocab` map to `axis`: column-parallel QKV and MLP-up, row-parallel
        attention-out and MLP-down, and a vocabulary-parallel embedding and head.
    - `sequence_parallel`: Megatron sequence parallelism. Outside attention and the
        MLP (norms, dropout, residuals) activations are split along `seq` over
        `axis` too, so each layer's all-reduces become a reduce-scatter and an
        all-gather of 1/TP the size, and those activations take 1/TP the memory.
        It acts through the activation layout the model is given
        (`tx.Activations`), which constrains the residual stream.
    """

    axis: str = eqx.field(static=True, default="model")
    rules: tuple[tuple[str, str | None], ...] = eqx.field(static=True, default=())
    sequence_parallel: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        axis: str = "model",
        rules: Mapping[str, str | None]
        | Sequence[tuple[str, str | None]]
        | None = None,
        *,
        sequence_parallel: bool = False,
    ):
        self.axis = axis
        if rules is None:
            rules = {name: axis for name in _DEFAULT_TP_AXES}
        # A bad axis is reported by `__check_init__`; examples need a str here.
        self.rules = _as_rule_items(rules, axis if isinstance(axis, str) else "model")
        self.sequence_parallel = sequence_parallel

    def __check_init__(self):
        _check_axis_name(self.axis, "TP")
        if not isinstance(self.sequence_parallel, bool):
            raise PlanError(
                "`TP(sequence_parallel=...)` expects True or False, got "
                f"{describe_value(self.sequence_parallel)}.",
                path="TP.sequence_parallel",
                suggestion="Write `TP(sequence_parallel=True)`.",
            )
        for logical, mesh_axis in self.rules:
            if mesh_axis not in (self.axis, None):
                raise PlanError(
                    f"Expected the TP axis `{self.axis}` or None for TP rule "
                    f"`{logical}`, got `{mesh_axis}` at `TP.rules`.",
                    path="TP.rules",
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
        if not _is_int(self.microbatches) or self.microbatches < 1:
            raise PipelineError(
                f"`PP(microbatches=...)` expects an int ≥ 1, got "
                f"{self.microbatches!r}.",
                suggestion="Use at least as many microbatches as pipeline stages.",
            )


_CP_ATTENTION = ("ring", "all_gather")


class CP(eqx.Module):
    """Context parallelism: the sequence (logical axis `seq`) split over `axis`.

    Every activation is split along `seq`, so each device holds `1/N` of the context
    (N the size of `axis`). Attention is the one place where positions meet: it runs
    as causal ring attention, keys and values passed around the ring with `ppermute`
    and combined with an online softmax, never materialising more than one block of
    scores. The sequence is *zigzag* ordered inside the model (device `i` holds
    chunks `i` and `2N-1-i` of `2N`), so every device does the same causal work.
    The model reaches this through the activation layout it is given
    (`tx.Activations(plan, mesh)`), see `docs/long_context.md`.

    **Arguments:**

    - `axis`: the mesh axis the sequence is split over.
    - `attention`: `"ring"` (keys and values sent around the ring, one neighbour
        exchange per step, overlappable with compute), or `"all_gather"` (all keys
        and values gathered at once, for short rings where a ring step's latency
        dominates; needs the whole sequence's keys and values per device).
    """

    axis: str = eqx.field(static=True, default="context")
    attention: Literal["ring", "all_gather"] = eqx.field(static=True, default="ring")

    def __check_init__(self):
        _check_axis_name(self.axis, "CP")
        if self.attention not in _CP_ATTENTION:
            raise PlanError(
                f'`CP(attention=...)` expects "ring" or "all_gather", got '
                f"{self.attention!r}.",
                path="CP.attention",
                suggestion='Use attention="ring" (long rings) or "all_gather".',
            )


# The plan's parts in order, with their types.
_PARTS: tuple[tuple[str, type], ...] = (
    ("dp", DP),
    ("fsdp", FSDP),
    ("tp", TP),
    ("pp", PP),
    ("cp", CP),
)


def _as_allow_unused(value: Any) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PlanError(
            "`Plan(allow_unused=...)` expects True, False or a tuple of rule names, "
            f"got {describe_value(value)}.",
            path="Plan.allow_unused",
            suggestion=(
                f"Write `allow_unused=({value!r},)`."
                if isinstance(value, str)
                else "Write `allow_unused=True`, or name the rules: "
                '`allow_unused=("vocab", r"head\\.weight$")`.'
            ),
        )
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise PlanError(
                "`Plan(allow_unused=...)` expects rule names (str), got "
                f"{describe_value(name)} in {names!r}.",
                path="Plan.allow_unused",
                suggestion="Name TP logical axes or path-rule regexes, as written.",
            )
    return names


def _describe_cp(cp: CP | None) -> str:
    return "None" if cp is None else f"CP({cp.axis!r}, attention={cp.attention!r})"


def _activation_layouts(model: Any) -> list[tuple[str, Any]]:
    """(path, layout) of every activation layout a model holds, in a field or as a
    field's `layout` (a config's). Duck-typed: `tx.Activations` sits above plans."""
    found = []
    for keypath, module in iter_modules(model):
        if not dataclasses.is_dataclass(module):
            continue
        for f in dataclasses.fields(module):
            value = getattr(module, f.name, None)
            where = path_str(model, (*keypath, GetAttrKey(f.name)))
            for suffix, candidate in (
                ("", value),
                (".layout", getattr(value, "layout", None)),
            ):
                if hasattr(candidate, "to_compute_order") and hasattr(
                    candidate, "plan"
                ):
                    found.append((where + suffix, candidate))
    return found


class Plan(eqx.Module):
    """A parallel layout: which parallelism uses which mesh axis.

    **Arguments:**

    - `dp`: a `DP`, or `None`.
    - `fsdp`: an `FSDP`, or `None`. Sharing an axis with `dp` is allowed (the batch is
        split once over it).
    - `tp`: a `TP`, or `None`.
    - `pp`: a `PP`, or `None`.
    - `cp`: a `CP`, or `None`: the sequence split over its own mesh axis.
    - `rules`: path rules `[(regex, axes), ...]` naming the logical axes of arrays whose
        paths match (`re.search` on paths like `GPT.blocks.mlp.w_in`; the first
        matching rule wins); they take priority over every other source.
    - `allow_unused`: which rules may match nothing. By default (`False`) every path
        rule must decide the axes of at least one array, every explicit TP rule must
        name a logical axis some array has, and with TP's default rules at least one
        of `mlp`, `heads`, `vocab` must appear (and no near-miss of a missing one, such
        as `mpl`): otherwise using the plan with a model raises `PlanError`. `True`
        allows every unused rule; a tuple allows the ones it names, as written (a TP
        logical axis such as `"vocab"`, or a path-rule regex). Useful for one plan
        shared by models that differ in some arrays.

    !!! Example
        ```python
        plan = tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))
        plan.validate(mesh, model)
        print(plan.describe())

        # A foreign model: name its arrays' axes by path; TP maps the names.
        plan = tx.Plan(
            tp=tx.TP("model"),
            rules=[(r"head\\.weight$", ("vocab", "embed"))],
        )
        ```
    """

    dp: DP | None = eqx.field(static=True, default=None)
    fsdp: FSDP | None = eqx.field(static=True, default=None)
    tp: TP | None = eqx.field(static=True, default=None)
    pp: PP | None = eqx.field(static=True, default=None)
    cp: CP | None = eqx.field(static=True, default=None)
    rules: tuple[tuple[str, AxisNames], ...] = eqx.field(
        static=True, default=(), converter=as_path_rules
    )
    allow_unused: bool | tuple[str, ...] = eqx.field(
        static=True, default=False, converter=_as_allow_unused
    )

    def __check_init__(self):
        for name, kind in _PARTS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise PlanError(
                    f"`Plan({name}=...)` expects a `tx.{kind.__name__}` or None, got "
                    f"{type(value).__name__}.",
                    suggestion=f"Write e.g. `Plan({name}=tx.{kind.__name__}())`.",
                )
        owners: dict[str, str] = {}
        for name, _ in _PARTS:
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
        if self.cp is not None and self.pp is not None:
            raise PlanError(
                "Expected at most one of `cp` and `pp` in a plan, got both: context "
                "parallelism does not compose with pipelining yet.",
                path="Plan.cp",
                suggestion="Drop `pp` (use DP, FSDP or TP with CP), or drop `cp`.",
            )
        if isinstance(self.allow_unused, tuple):
            known = [k for k, _ in self.tp.rules] if self.tp is not None else []
            known += [pattern for pattern, _ in self.rules]
            for name in self.allow_unused:
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise PlanError(
                        "Expected `allow_unused` to name this plan's TP logical axes "
                        f"or path-rule regexes {known}, got {name!r} at "
                        f"`Plan.allow_unused`.{hint}",
                        path="Plan.allow_unused",
                        suggestion="Name a rule exactly as written in the plan.",
                    )

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
        parts = (getattr(self, name) for name, _ in _PARTS)
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

    def activation_rules(self, *, sequence_parallel: bool = True) -> dict[str, Any]:
        """Logical axis → mesh axes for activations, separate from the parameters'.

        - `batch`: the data axes (DP, then FSDP).
        - `seq`: the CP axis; with `TP(sequence_parallel=True)` also the TP axis
            (after the CP axis), unless `sequence_parallel=False`: the rule inside
            attention and the MLP, where Megatron gathers the sequence back.
        - TP's logical axes (`heads`, `mlp`, `vocab`, ...): the TP axis, as for the
            parameters (a column-parallel output is split like its weight).
        - anything else (`embed`, `head_dim`, ...): not split.

        **Arguments:**

        - `sequence_parallel`: `False` for activations inside attention and the MLP.

        **Returns:** a dict of logical axis → a mesh axis name or a tuple of names.
        """
        rules: dict[str, Any] = {}
        if self.tp is not None:
            rules.update({k: v for k, v in self.tp.rules if v is not None})
        if self.data_axes:
            axes = self.data_axes
            rules["batch"] = axes[0] if len(axes) == 1 else axes
        seq = [self.cp.axis] if self.cp is not None else []
        if sequence_parallel and self.tp is not None and self.tp.sequence_parallel:
            seq.append(self.tp.axis)
        if seq:
            rules["seq"] = seq[0] if len(seq) == 1 else tuple(seq)
        return rules

    def activation_spec(
        self, names: Sequence[str | None], *, sequence_parallel: bool = True
    ) -> PartitionSpec:
        """The `PartitionSpec` of an activation whose dims have logical axes `names`.

        **Arguments:**

        - `names`: one logical axis name (or `None`) per dim, e.g. `("batch", "seq",
            "embed")`.
        - `sequence_parallel`: as in `activation_rules`.

        **Returns:** the mesh `PartitionSpec` (`activation_rules` applied per dim).

        **Raises:** `PlanError` if two dims would use one mesh axis.
        """
        rules = self.activation_rules(sequence_parallel=sequence_parallel)
        entries = [rules.get(n) if n is not None else None for n in names]
        used: dict[str, str | None] = {}
        for name, entry in zip(names, entries, strict=True):
            for axis in entry if isinstance(entry, tuple) else (entry,):
                if axis is None:
                    continue
                if axis in used:
                    raise PlanError(
                        f"Expected each mesh axis on at most one dim of an activation, "
                        f"got `{axis}` for both `{used[axis]}` and `{name}` in "
                        f"{tuple(names)}.",
                        path=f"activation {tuple(names)}",
                        suggestion="Name the dims differently, or pass "
                        "`sequence_parallel=False` inside attention and the MLP.",
                    )
                used[axis] = name
        return PartitionSpec(*entries)

    def batch_spec(self, ndim: int = 1) -> PartitionSpec:
        """The `PartitionSpec` of a batch leaf with `ndim` dims: the leading dim
        (`batch`) on the data axes; with CP the second (`seq`) on the CP axis, as
        it lies in the data (contiguous chunks); the rest replicated."""
        if not ndim:
            return PartitionSpec()
        names: list[str | None] = ["batch"] + [None] * (ndim - 1)
        if self.cp is not None and ndim > 1:
            names[1] = "seq"
        return self.activation_spec(names, sequence_parallel=False)

    def data_parallel_size(self, mesh: Mesh) -> int:
        """How many shards the batch is split into on `mesh`."""
        return math.prod(mesh.shape[a] for a in self.data_axes)

    # --- validation -----------------------------------------------------------------

    def check_mesh(self, mesh: Mesh) -> None:
        """Raise `PlanError` if a mesh axis this plan uses is missing from `mesh`."""
        names = tuple(mesh.axis_names)
        for part_name, _ in _PARTS:
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
        self._check_context_layout(model, mesh)
        logical = logical_axes(model, self.rules)
        mapping = self.logical_rules()
        leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
        logical_leaves = treedef.flatten_up_to(logical)
        # (path, leaf, logical names) of every array, in leaf order.
        arrays = [
            (path_str(model, keypath), leaf, names)
            for (keypath, leaf), names in zip(leaves, logical_leaves, strict=True)
            if is_arraylike(leaf)
        ]
        paths = [path for path, _, _ in arrays]
        self._check_path_rules_used(type(model).__name__, paths)
        names_at: dict[str, str] = {}  # each logical axis name -> its first array
        for path, _, names in arrays:
            for name in tuple(names):
                if name is not None:
                    names_at.setdefault(name, path)
        self._check_tp_names_used(names_at, paths)
        specs = iter(
            self._leaf_spec(path, leaf, names, mapping, mesh)
            for path, leaf, names in arrays
        )
        return jax.tree_util.tree_unflatten(
            treedef, [next(specs) if is_arraylike(leaf) else None for _, leaf in leaves]
        )

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

        `partition_specs`, `shardings`, `tx.init`, `tx.shard`, `tx.explain` and the
        Trainer all run these checks; `validate` adds the pipeline's.

        **Raises:** `PlanError` for a mesh axis the mesh lacks or a mapped dim the mesh
        axis size does not divide (naming the path, dim size, axis size and a fix); for
        a path rule that decides no array's axes (with the closest paths); for an
        explicit TP rule naming a logical axis no array has, TP's default rules
        matching no array, or a model axis that is a near-miss of a missing default
        (`mpl` for `mlp`), each with the closest names (all of these unless
        `allow_unused` allows the rule). `PipelineError` when PP is used on a model
        without a stacked `layers` dim or with layers not divisible by the stages.
        `ModelError` if `model` is not an `eqx.Module`.
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
        for keypath, module in iter_modules(model):
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

    def _check_context_layout(self, model: Any, mesh: Mesh) -> None:
        """Under CP the model must compute through this plan's activation layout:
        without one, attention would run on whole sequences (XLA gathering the
        context onto every device), silently not context parallel."""
        layouts = _activation_layouts(model)
        name = type(model).__name__
        if self.cp is not None and not layouts:
            raise PlanError(
                f"`plan.cp` splits the sequence over mesh axis `{self.cp.axis}`, but "
                f"the model {name} was given no activation layout: its attention "
                "would gather the whole context onto every device.",
                path=f"{name}.config.layout",
                suggestion=(
                    "Build the model with the layout, e.g. `GPTConfig(..., layout="
                    "tx.Activations(plan, mesh))`; a model of your own must call "
                    "`tx.Activations` as `models/gpt.py` does."
                ),
            )
        sizes = dict(mesh.shape)
        for where, layout in layouts:
            theirs = layout.plan.cp
            if theirs != self.cp or dict(layout.mesh.shape) != sizes:
                raise PlanError(
                    f"Expected the model's activation layout to be built from this "
                    f"plan and mesh (cp={_describe_cp(self.cp)}, mesh {sizes}), got "
                    f"cp={_describe_cp(theirs)}, "
                    f"mesh {dict(layout.mesh.shape)} at `{where}`.",
                    path=where,
                    suggestion="Build the layout as `tx.Activations(plan, mesh)` "
                    "with the plan and mesh the model is trained with.",
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

    def _allows(self, name: str) -> bool:
        allowed = self.allow_unused
        return allowed is True or (isinstance(allowed, tuple) and name in allowed)

    def _check_path_rules_used(self, model_name: str, paths: Sequence[str]) -> None:
        """Each path rule must decide the axes of at least one of the model's arrays
        (`paths`)."""
        if not self.rules:
            return
        use = path_rule_use(paths, self.rules)
        for i, (pattern, axes) in enumerate(self.rules):
            if use.decided[i] or self._allows(pattern):
                continue
            where = f"Plan.rules[{i}]"
            fix_allow = (
                f"or pass `Plan(..., allow_unused=({_raw(pattern)},))` to keep it"
            )
            if use.matched[i]:
                first = use.matched[i][0]
                winner = next(
                    j for j, paths in enumerate(use.decided) if first in paths
                )
                raise PlanError(
                    f"Expected path rule {_raw(pattern)} to decide the axes of an "
                    f"array, got none at `{where}`: the arrays it matches ("
                    f"{_listing(use.matched[i])}) are decided by the earlier rule "
                    f"{_raw(self.rules[winner][0])} (`Plan.rules[{winner}]`), and the "
                    "first matching rule wins.",
                    path=where,
                    suggestion=(
                        "Put the more specific rule first, or make the earlier regex "
                        f"narrower; {fix_allow}."
                    ),
                )
            close = _closest_paths(pattern, use.paths)
            raise PlanError(
                f"Expected path rule {_raw(pattern)} to match an array of "
                f"`{model_name}`, got no match among its {len(use.paths)} "
                f"array paths at `{where}`; the closest: {_listing(close)}.",
                path=where,
                suggestion=(
                    "Fix the regex (matched with `re.search` against paths as shown, "
                    f"e.g. `({_raw(_escaped_tail(close[0]) if close else 'w$')}, "
                    f"{axes!r})`), {fix_allow}."
                ),
            )

    def _check_tp_names_used(
        self, names_at: Mapping[str, str], paths: Sequence[str]
    ) -> None:
        """TP rules must name logical axes the model has (see `allow_unused`).

        `names_at` maps each logical axis name of the model to its first array path;
        `paths` are all the model's array paths.
        Explicit rules must each match; TP's default rules (`mlp`, `heads`, `vocab`)
        are a menu, so at least one must match and none may be missing while a
        near-miss of it (`mpl` for `mlp`) is present and unmapped: that is a typo, and
        TP would leave those arrays replicated.
        """
        if self.tp is None or self.allow_unused is True:
            return
        names = sorted(names_at)
        rule_names = [k for k, _ in self.tp.rules]
        unused = [k for k in rule_names if k not in names_at]
        mapped = set(self.logical_rules())
        # Near-miss candidates: names no rule maps, and not stacking dims.
        free = [n for n in names if n not in mapped and not n.startswith("layers")]
        allow = 'or pass `Plan(..., allow_unused=("{name}",))` to keep the rule'
        if self.tp.rules != TP(self.tp.axis).rules:
            for name in unused:
                if self._allows(name):
                    continue
                raise PlanError(
                    f"Expected TP rule `{name}` to name a logical axis of the model, "
                    f"got none at `Plan.tp.rules`: the model's logical axes are "
                    f"{names}.{_did_you_mean(name, names, names_at, paths)}",
                    path="Plan.tp.rules",
                    suggestion=(
                        f"Rename the rule, or name the model's dims `{name}` "
                        "(`tx.field(axes=...)`, a jaxtyping annotation or a plan path "
                        f"rule), {allow.format(name=name)}."
                    ),
                )
            return
        if len(unused) == len(rule_names) and not all(map(self._allows, unused)):
            hints = "".join(
                f" Did you mean `{n}` where the model says `{close[0]}` (at "
                f"`{names_at[close[0]]}`)?"
                for n in rule_names
                if (close := difflib.get_close_matches(n, free, n=1))
            )
            raise PlanError(
                "Expected the model to name at least one of TP's default logical axes "
                "(`mlp`, `heads`, `vocab`) at `Plan.tp.rules`, got none (its logical "
                f"axes are {names}), so TP would shard nothing.{hints}",
                path="Plan.tp.rules",
                suggestion=(
                    "Name the dims TP should split (`tx.field(axes=...)`, a jaxtyping "
                    'annotation, or `Plan(rules=[(regex, ("mlp", None))])`), or give '
                    "TP explicit rules for the model's own names, e.g. "
                    f'`TP(rules={{"{names[0] if names else "mlp"}": '
                    f'"{self.tp.axis}"}})`; or pass `allow_unused=True`.'
                ),
            )
        for name in unused:
            # A near-miss is difflib-close and within one character in length: `mpl`
            # or `head` for `heads`, but not `head_dim`, a different axis.
            near = [n for n in free if abs(len(n) - len(name)) <= 1]
            close = difflib.get_close_matches(name, near, n=1)
            if close and not self._allows(name):
                raise PlanError(
                    f"Expected TP's default logical axis `{name}`, got the near-miss "
                    f"`{close[0]}` at `{names_at[close[0]]}`, which no rule maps, so "
                    f"it stays replicated. Did you mean `{name}`?",
                    path=names_at[close[0]],
                    suggestion=(
                        f"Rename `{close[0]}` to `{name}` in the model (or the plan's "
                        f'path rules), or map it: `TP(rules={{"{close[0]}": '
                        f'"{self.tp.axis}", ...}})`; {allow.format(name=name)}.'
                    ),
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
            sp = ", sequence parallel" if self.tp.sequence_parallel else ""
            parts.append(f"TP over `{self.tp.axis}` ({mapped}{sp})")
        if self.pp is not None:
            parts.append(
                f"PP over `{self.pp.axis}` ({self.pp.schedule}, "
                f"{self.pp.microbatches} microbatches)"
            )
        if self.cp is not None:
            kind = "ring" if self.cp.attention == "ring" else "all-gather"
            parts.append(f"CP over `{self.cp.axis}` ({kind} attention, zigzag)")
        if self.rules:
            parts.append(f"{len(self.rules)} path rule(s)")
        return " | ".join(parts) if parts else "single device (no parallelism)"


# --- error text helpers -------------------------------------------------------------


def _listing(items: Sequence[str], limit: int = 3) -> str:
    """`a`, `b`, `c` (+ 4 more)."""
    shown = ", ".join(f"`{x}`" for x in items[:limit])
    more = len(items) - limit
    return shown + (f" (+ {more} more)" if more > 0 else "") if items else "none"


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _closest_paths(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    """The `n` array paths most like a regex that matched none of them.

    Compared as text with the regex's escapes and anchors removed, against the whole
    path and against its last components (rules usually name a path's tail).
    """
    text = re.sub(r"\\(.)", r"\1", pattern).strip("^$")
    depth = text.count(".") + 1

    def score(path: str) -> float:
        tail = ".".join(path.split(".")[-depth:])
        return max(_similarity(text, path), _similarity(text, tail))

    return sorted(paths, key=score, reverse=True)[:n]


def _raw(pattern: str) -> str:
    """A regex as Python source, raw when that reads better: `r"head\\.weight$"`."""
    return f'r"{pattern}"' if '"' not in pattern and "\\" in pattern else repr(pattern)


def _escaped_tail(path: str) -> str:
    """A regex for the last two components of `path`: `head\\.weight$`."""
    return re.escape(".".join(path.split(".")[-2:])) + "$"


def _did_you_mean(
    name: str, candidates: Sequence[str], at: Mapping[str, str], paths: Sequence[str]
) -> str:
    """ " Did you mean `mlp` (at `MLP.w_in`)?", or a note that `name` names an array."""
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return f" Did you mean `{close[0]}` (at `{at[close[0]]}`)?"
    arrays = [path for path in paths if path.rsplit(".", 1)[-1] == name]
    if arrays:
        return (
            f" `{name}` is the name of an array (`{arrays[0]}`), not a logical axis: "
            f'name its dims with a path rule, e.g. `Plan(rules=[(r"\\.{name}$", '
            '("mlp", None))])`.'
        )
    return ""
