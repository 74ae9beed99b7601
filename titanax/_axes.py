"""Logical axes: the names a model gives the dims of its arrays.

A leaf's logical axes come from the first of these sources that names it:

1. the plan's path rules (`Plan(rules=[(regex, axes)])`), for models you do not own;
2. a per-use dict on a parent field: `up: eqx.nn.Linear = tx.field(axes={"weight":
   ("mlp", "embed")})` (per use, because column- and row-parallel layers share a type);
3. the field's own metadata: `scale: Array = tx.field(axes=("embed",))`;
4. the jaxtyping annotation: `w: Float[Array, "embed mlp"]`;
5. built-in defaults for `eqx.nn` layers (`Linear.weight` is `("out", "in")`, ...).

An array with more dims than its source names was stacked (`eqx.filter_vmap` over
layers): its extra leading dims are named `layers` (outermost), then `layers_1`, ....
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
from jax.sharding import PartitionSpec
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from ._checks import describe_value
from ._errors import ModelError, PlanError, ShardingError

__all__ = [
    "AxisNames",
    "RuleUse",
    "as_path_rules",
    "axes_problem",
    "describe_value",
    "field",
    "is_arraylike",
    "logical_axes",
    "path_rule_use",
    "path_str",
]

AxisNames = tuple[str | None, ...]
PathRules = Sequence[tuple[str, Sequence[str | None]]]

_AXES_KEY = "titanax_axes"
_LAYERS = "layers"


def field(
    *,
    axes: Sequence[str | None] | Mapping[str, Sequence[str | None]] | None = None,
    **kwargs: Any,
) -> Any:
    """An `eqx.field` that names the logical axes of an array or of a submodule.

    **Arguments:**

    - `axes`: for an array field, a tuple naming each dim (`None` for an unnamed dim);
        for a submodule field, a dict from the submodule's leaf paths (`"weight"`,
        `"layers[0].bias"`) to such tuples. The dict form is per use: the same
        `eqx.nn.Linear` type can be column-parallel in one field and row-parallel in
        another.
    - `**kwargs`: passed to `eqx.field` (`static`, `converter`, `default`, ...).

    !!! Example
        ```python
        class MLPBlock(eqx.Module):
            up: eqx.nn.Linear = tx.field(axes={"weight": ("mlp", "embed"),
                                              "bias": ("mlp",)})
            scale: jax.Array = tx.field(axes=("embed",))
        ```
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    if axes is not None:
        if isinstance(axes, Mapping):
            axes = {str(k): _as_names(v, f"axes[{k!r}]") for k, v in axes.items()}
        else:
            axes = _as_names(axes, "axes")
        metadata[_AXES_KEY] = axes
    return eqx.field(metadata=metadata, **kwargs)


def axes_problem(axes: Any) -> str | None:
    """What is wrong with `axes` as a tuple of logical axis names, or None if nothing.

    Names are non-empty `str`s, or `None` for an unnamed dim; the tuple itself is a
    `tuple` or `list` (not a bare string, which would name one dim per character).
    """
    if axes is None:
        return "None"
    if isinstance(axes, str):
        return f"the str {axes!r}"
    if not isinstance(axes, tuple | list):
        return f"{type(axes).__name__} {axes!r}"
    for i, name in enumerate(axes):
        if name is not None and not isinstance(name, str):
            return f"{tuple(axes)!r}, whose entry {i} is {type(name).__name__} {name!r}"
        if name == "":
            return f"{tuple(axes)!r}, whose entry {i} is an empty name"
    return None


def _as_names(axes: Any, where: str) -> AxisNames:
    problem = axes_problem(axes)
    if problem is not None:
        raise ShardingError(
            f"`tx.field({where}=...)` expects a tuple of axis names (str, or None for "
            f"an unnamed dim), got {problem}.",
            suggestion='Write e.g. `axes=("embed", "mlp")`; None for unnamed dims.',
        )
    return tuple(axes)


# --- path rules ---------------------------------------------------------------------

_RULE_EXAMPLE = 'rules=[(r"head\\.weight$", ("vocab", "embed"))]'


def as_path_rules(rules: Any) -> tuple[tuple[str, AxisNames], ...]:
    """Check and normalise path rules `[(regex, axes), ...]` (`Plan(rules=...)`).

    **Returns:** a tuple of `(regex, axes tuple)` pairs; `None` gives `()`.

    **Raises:** `PlanError` naming the rule (`Plan.rules[i]`) for anything else: a bare
    string, a dict, a single unwrapped pair, an item that is not a pair, a regex that
    is not a non-empty valid `str`, axes that are not a tuple of names (`None` is not
    "replicated": write one `None` per dim), or a regex listed twice.
    """
    if rules is None:
        return ()
    if isinstance(rules, Mapping):
        values = list(rules.values())
        tp_like = all(v is None or isinstance(v, str) for v in values)
        raise PlanError(
            "`Plan(rules=...)` expects a list of (regex, axes) pairs, got a dict"
            + (" of logical axis -> mesh axis (TP rules)" if tp_like else "")
            + ".",
            path="Plan.rules",
            suggestion=(
                f"Map logical axes with `tx.TP(rules={dict(rules)!r})`."
                if tp_like and values
                else f"Write a list: `rules={list(rules.items())!r}`."
            ),
        )
    if isinstance(rules, str | bytes) or not isinstance(rules, Iterable):
        raise PlanError(
            "`Plan(rules=...)` expects a list of (regex, axes) pairs, got "
            f"{type(rules).__name__} {rules!r}.",
            path="Plan.rules",
            suggestion=f"Write e.g. `{_RULE_EXAMPLE}`.",
        )
    items = list(rules)
    if (
        len(items) == 2
        and isinstance(items[0], str)
        and (items[1] is None or isinstance(items[1], tuple | list))
    ):
        raise PlanError(
            "`Plan(rules=...)` expects a list of (regex, axes) pairs, got a single "
            f"pair {tuple(items)!r}.",
            path="Plan.rules",
            suggestion=f"Wrap it in a list: `rules=[{tuple(items)!r}]`.",
        )
    out: list[tuple[str, AxisNames]] = []
    for i, item in enumerate(items):
        where = f"Plan.rules[{i}]"
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise PlanError(
                f"Expected a (regex, axes) pair, got {item!r} at `{where}`.",
                path=where,
                suggestion=f"Write e.g. `{_RULE_EXAMPLE}`.",
            )
        pattern, axes = item
        if not isinstance(pattern, str) or not pattern:
            raise PlanError(
                "Expected a non-empty regex str as the first item, got "
                f"{type(pattern).__name__} {pattern!r} at `{where}`.",
                path=where,
                suggestion=(
                    "Write the pattern as a str matched with `re.search` against "
                    'paths such as `GPT.blocks.w_qkv`, e.g. `r"blocks\\.w_qkv$"`.'
                ),
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise PlanError(
                f"Expected a valid regex, got {pattern!r} ({e}) at `{where}`.",
                path=where,
                suggestion="Fix the pattern; it is matched with `re.search` on paths.",
            ) from None
        problem = axes_problem(axes)
        if problem is not None:
            raise PlanError(
                "Expected a tuple of logical axis names (str, or None for an unnamed "
                f"dim) as the second item, got {problem} at `{where}` ({pattern!r}).",
                path=where,
                suggestion=(
                    'Name each dim, e.g. `("vocab", "embed")`; to leave a 2-D '
                    "array replicated, write `(None, None)`."
                ),
            )
        if any(pattern == seen for seen, _ in out):
            raise PlanError(
                f"Expected each regex once, got {pattern!r} again at `{where}`; only "
                "its first rule could ever apply.",
                path=where,
                suggestion="Remove the repeated rule.",
            )
        out.append((pattern, tuple(axes)))
    return tuple(out)


def _first_rule(path: str, rules: PathRules) -> int | None:
    """The index of the first rule whose regex is found in `path`: it decides."""
    for i, (pattern, _) in enumerate(rules):
        if re.search(pattern, path):
            return i
    return None


@dataclasses.dataclass(frozen=True)
class RuleUse:
    """Which arrays path rules reach, for the plan's check that each rule is used.

    **Fields:**

    - `paths`: every array path of the model, in leaf order.
    - `decided`: per rule, the paths whose axes it decides (it matches first).
    - `matched`: per rule, every path it matches (decided or not).
    """

    paths: tuple[str, ...]
    decided: tuple[tuple[str, ...], ...]
    matched: tuple[tuple[str, ...], ...]


def path_rule_use(paths: Sequence[str], rules: PathRules) -> RuleUse:
    """Which of `paths` (a model's array paths) each path rule matches and decides."""
    decided: list[list[str]] = [[] for _ in rules]
    matched: list[list[str]] = [[] for _ in rules]
    for path in paths:
        first = _first_rule(path, rules)
        if first is not None:
            decided[first].append(path)
        for i, (pattern, _) in enumerate(rules):
            if re.search(pattern, path):
                matched[i].append(path)
    return RuleUse(
        paths=tuple(paths),
        decided=tuple(tuple(d) for d in decided),
        matched=tuple(tuple(m) for m in matched),
    )


def is_arraylike(x: Any) -> bool:
    """True for arrays and for `jax.ShapeDtypeStruct`s (abstract arrays)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def path_str(root: Any, keypath: Sequence[Any]) -> str:
    """A readable PyTree path: `GPT.blocks.mlp.w_in`, `MLP.layers[0].weight`."""
    parts = [type(root).__name__]
    for key in keypath:
        if isinstance(key, GetAttrKey):
            parts.append(f".{key.name}")
        elif isinstance(key, SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, DictKey):
            parts.append(f"[{key.key!r}]")
        else:
            parts.append(str(key))
    return "".join(parts)


def _relative_str(keypath: Sequence[Any]) -> str:
    return path_str(None, keypath).removeprefix("NoneType").lstrip(".")


# --- built-in defaults for eqx.nn layers --------------------------------------------


def _conv_axes(layer: Any, name: str) -> AxisNames | None:
    spatial = (None,) * layer.num_spatial_dims
    if name == "weight":
        return ("out", "in", *spatial)
    if name == "bias":
        return ("out", *spatial)
    return None


_DEFAULTS: list[tuple[type, Callable[[Any, str], AxisNames | None]]] = [
    (eqx.nn.Linear, lambda m, n: {"weight": ("out", "in"), "bias": ("out",)}.get(n)),
    (eqx.nn.Embedding, lambda m, n: ("vocab", "embed") if n == "weight" else None),
    (eqx.nn.LayerNorm, lambda m, n: ("embed",) if n in ("weight", "bias") else None),
    (eqx.nn.RMSNorm, lambda m, n: ("embed",) if n in ("weight", "bias") else None),
    (eqx.nn.GroupNorm, lambda m, n: ("out",) if n in ("weight", "bias") else None),
    (eqx.nn.Conv, _conv_axes),
    (eqx.nn.ConvTranspose, _conv_axes),
]

# MultiheadAttention's projections: heads*head_size is one merged dim whose contiguous
# chunks are whole heads, so naming it `heads` shards attention Megatron-style.
_ATTENTION_PROJ: dict[str, dict[str, AxisNames]] = {
    "query_proj": {"weight": ("heads", "embed"), "bias": ("heads",)},
    "key_proj": {"weight": ("heads", "embed"), "bias": ("heads",)},
    "value_proj": {"weight": ("heads", "embed"), "bias": ("heads",)},
    "output_proj": {"weight": ("embed", "heads"), "bias": ("embed",)},
}


def _default_axes(parent: Any, name: str) -> AxisNames | None:
    for cls, rule in _DEFAULTS:
        if isinstance(parent, cls):
            return rule(parent, name)
    return None


# --- jaxtyping annotations ----------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        module = sys.modules.get(cls.__module__)
        return typing.get_type_hints(
            cls, globalns=getattr(module, "__dict__", None), include_extras=True
        )
    except Exception:
        # Unresolvable annotations (e.g. names only imported under TYPE_CHECKING):
        # fall back to the raw objects, which are still jaxtyping types when evaluated.
        return {
            k: v
            for c in reversed(cls.__mro__)
            for k, v in getattr(c, "__annotations__", {}).items()
            if not isinstance(v, str)
        }


def _jaxtyping_dims(hint: Any) -> str | None:
    """The dim string of a jaxtyping array type, looking inside `X | None`."""
    dim_str = getattr(hint, "dim_str", None)
    if isinstance(dim_str, str):
        return dim_str
    for arg in typing.get_args(hint):
        found = _jaxtyping_dims(arg)
        if found is not None:
            return found
    return None


def _parse_dim_str(dim_str: str) -> tuple[AxisNames, AxisNames] | AxisNames:
    """Logical names of a jaxtyping dim string.

    Returns a tuple of names, or, when a variadic dim (`*batch`, `...`) is present, a
    pair (names before it, names after it): the variadic part is unnamed.
    """
    before: list[str | None] = []
    after: list[str | None] = []
    current = before
    variadic = False
    for token in dim_str.split():
        token = token.lstrip("#?")
        if token.startswith("*") or token == "...":
            variadic = True
            current = after
            continue
        is_name = re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", token) is not None
        current.append(token if is_name else None)
    if variadic:
        return tuple(before), tuple(after)
    return tuple(before)


# --- resolution ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Declared:
    """What one source says about a leaf: names, and where they came from."""

    names: AxisNames | tuple[AxisNames, AxisNames]
    source: str


def _field_metadata(module: Any, name: str) -> Any:
    for f in dataclasses.fields(module):
        if f.name == name:
            return f.metadata.get(_AXES_KEY)
    return None


def _declared_for_leaf(
    root: Any,
    keypath: Sequence[Any],
    rules: PathRules,
) -> _Declared | None:
    first = _first_rule(path_str(root, keypath), rules)
    if first is not None:
        pattern, axes = rules[first]
        return _Declared(tuple(axes), f"plan rule {pattern!r}")

    # Walk down the key path; `hops` records each (module, field) step taken.
    node = root
    hops: list[tuple[Any, str]] = []
    per_use: _Declared | None = None  # the outermost per-use dict wins
    for depth, key in enumerate(keypath):
        if isinstance(node, eqx.Module) and isinstance(key, GetAttrKey):
            meta = _field_metadata(node, key.name)
            rel = _relative_str(keypath[depth + 1 :])
            if per_use is None and isinstance(meta, Mapping) and rel in meta:
                owner = path_str(root, keypath[: depth + 1])
                per_use = _Declared(meta[rel], f"per-use axes on `{owner}`")
            hops.append((node, key.name))
        else:
            hops.append((None, ""))
        node = _child(node, key)
    if per_use is not None:
        return per_use
    parent, name = hops[-1] if hops else (None, "")
    if parent is None:
        return None
    meta = _field_metadata(parent, name)
    if meta is not None and not isinstance(meta, Mapping):
        return _Declared(meta, f"tx.field on `{type(parent).__name__}.{name}`")
    hint = _type_hints(type(parent)).get(name)
    dim_str = _jaxtyping_dims(hint) if hint is not None else None
    if dim_str is not None and _names_any(parsed := _parse_dim_str(dim_str)):
        # An annotation naming no dim (`Float[Array, "*shape"]`, as eqx.nn.LayerNorm
        # has) says nothing about sharding: fall through to the built-in defaults.
        return _Declared(parsed, f"annotation {dim_str!r}")
    grandparent, proj = hops[-2] if len(hops) >= 2 else (None, "")
    if isinstance(grandparent, eqx.nn.MultiheadAttention) and proj in _ATTENTION_PROJ:
        return _Declared(_ATTENTION_PROJ[proj][name], "MultiheadAttention default")
    default = _default_axes(parent, name)
    if default is not None:
        return _Declared(default, f"{type(parent).__name__} default")
    return None


def _names_any(names: AxisNames | tuple[AxisNames, AxisNames]) -> bool:
    flat = [n for part in names for n in (part if isinstance(part, tuple) else (part,))]
    return any(n is not None for n in flat)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, SequenceKey):
        return node[key.idx]
    if isinstance(key, DictKey):
        return node[key.key]
    if isinstance(key, GetAttrKey):
        return getattr(node, key.name)
    return None


def _fit_to_rank(declared: _Declared, ndim: int, path: str) -> AxisNames:
    names = declared.names
    if len(names) == 2 and all(isinstance(part, tuple) for part in names):
        before, after = typing.cast(tuple[AxisNames, AxisNames], names)
        fill = ndim - len(before) - len(after)
        if fill < 0:
            _raise_rank(declared, before + after, ndim, path)
        return before + (None,) * fill + after
    names = typing.cast(AxisNames, names)
    extra = ndim - len(names)
    if extra < 0:
        _raise_rank(declared, names, ndim, path)
    stacked = tuple(_LAYERS if i == 0 else f"{_LAYERS}_{i}" for i in range(extra))
    return stacked + names


def _raise_rank(declared: _Declared, names: AxisNames, ndim: int, path: str) -> None:
    raise ShardingError(
        f"{declared.source} names {len(names)} dims {names}, but the array at "
        f"`{path}` has only {ndim}.",
        path=path,
        suggestion="Name exactly one axis (or None) per dim of the array.",
    )


def logical_axes(model: Any, rules: PathRules = ()) -> Any:
    """The logical axes of every array in `model`.

    **Arguments:**

    - `model`: an `eqx.Module` (or its `eqx.filter_eval_shape` output).
    - `rules`: path rules `[(regex, axes), ...]`, matched with `re.search` against
        paths like `GPT.blocks.w_qkv`; the first match wins over every other source.

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)`: each
    array becomes a `PartitionSpec` of logical names (`None` for unnamed dims), each
    non-array `None`.

    **Raises:** `ModelError` if `model` is not an `eqx.Module`; `PlanError` for
    malformed `rules` (see `Plan`); `ShardingError` if a source names more dims than
    an array has, or if a per-use axes dict names no existing leaf.
    """
    if not isinstance(model, eqx.Module):
        raise ModelError(
            f"Expected an `eqx.Module` as the model, got {describe_value(model)}.",
            suggestion=(
                "Pass a built model (for a class or a `key -> Module` function, build "
                "it sharded with `tx.init(make_model, key, plan, mesh)`); wrap foreign "
                "PyTrees in an `eqx.Module` and name their axes with "
                "`Plan(rules=[(regex, axes)])`."
            ),
        )
    rules = as_path_rules(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    specs = []
    for keypath, leaf in leaves:
        if not is_arraylike(leaf):
            specs.append(None)
            continue
        declared = _declared_for_leaf(model, keypath, rules)
        if declared is None:
            specs.append(PartitionSpec(*([None] * len(leaf.shape))))
            continue
        path = path_str(model, keypath)
        specs.append(PartitionSpec(*_fit_to_rank(declared, len(leaf.shape), path)))
    _check_per_use_dicts(model)
    return jax.tree_util.tree_unflatten(treedef, specs)


def iter_modules(node: Any, prefix: tuple[Any, ...] = ()) -> Any:
    """Every `eqx.Module` inside `node` (itself included), with its key path."""
    yield prefix, node
    children = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module)
    )[0]
    for keypath, child in children:
        if isinstance(child, eqx.Module):
            yield from iter_modules(child, (*prefix, *keypath))


def _check_per_use_dicts(model: Any) -> None:
    """Every key of every per-use axes dict must name an array that exists.

    Existence, not use: a key overridden by a plan rule or by an outer dict is fine.
    """
    for keypath, module in iter_modules(model):
        for f in dataclasses.fields(module):
            meta = f.metadata.get(_AXES_KEY)
            if not isinstance(meta, Mapping):
                continue
            owner = path_str(model, (*keypath, GetAttrKey(f.name)))
            known = _leaf_names(getattr(module, f.name))
            for rel in meta:
                if rel not in known:
                    raise ShardingError(
                        f"The axes dict on `{owner}` names `{rel}`, but that field "
                        f"holds no array there; its arrays are {known}.",
                        path=owner,
                        suggestion=f"Use one of {known} as the key.",
                    )


def _leaf_names(sub: Any) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(sub)[0]
    return [_relative_str(path) for path, leaf in leaves if is_arraylike(leaf)]
