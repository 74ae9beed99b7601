"""The human-readable JSON saved beside every checkpoint, and directory scans.

A step directory written by `OrbaxCheckpoint` looks like this (Orbax's layout):

```
<path>/<step>/state/...     the arrays (Orbax PyTree format, OCDBT)
<path>/<step>/meta/metadata this module's JSON: versions, mesh, plan, leaves
```

A save in progress lives in `<path>/<step>.orbax-checkpoint-tmp-*` and is renamed
when complete, so only all-digit directory names are finished steps. Reading
validates the document against its versioned schema (`_schema.py`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .._axes import path_str
from .._errors import CheckpointError
from .._versions import versions
from ._schema import FORMAT, validate_metadata

__all__ = [
    "META_FILE",
    "build_metadata",
    "check_config",
    "format_spec",
    "leaf_key",
    "leaf_records",
    "read_metadata",
    "scan",
]

STATE_ITEM = "state"
META_ITEM = "meta"
META_FILE = f"{META_ITEM}/metadata"
_TMP_MARK = ".orbax-checkpoint-tmp"


def leaf_key(keypath: Any) -> tuple[str, ...]:
    """A PyTree key path as the names Orbax stores it under (`model.layers.0.weight`).

    Attribute names, dict keys and sequence indices all become strings, so a
    `TrainState` and the nested dicts/lists Orbax reads back give equal keys.
    """
    names = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def _spec_list(sharding: Any) -> list[Any] | None:
    if not isinstance(sharding, NamedSharding):
        return None
    return [list(p) if isinstance(p, tuple) else p for p in sharding.spec]


def format_spec(spec: list[Any] | None) -> str:
    """`[None, "model"]` → `P(None, 'model')`; `None` (unknown) → `-`."""
    if spec is None:
        return "-"
    parts = [repr(tuple(p)) if isinstance(p, list) else repr(p) for p in spec]
    return f"P({', '.join(parts)})"


def leaf_records(tree: Any) -> list[dict[str, Any]]:
    """One record per array of `tree`: path, key, shape, dtype, spec, bytes.

    **Raises:** `CheckpointError` for a typed PRNG key array (save its
    `jax.random.key_data`, as `TrainState.rng` does).
    """
    records = []
    for keypath, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(x):
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            where = path_str(tree, keypath)
            raise CheckpointError(
                f"Expected arrays of numbers, got a typed PRNG key array "
                f"({x.dtype}) at `{where}`.",
                path=where,
                suggestion=(
                    "Store `jax.random.key_data(key)` and rebuild the key with "
                    "`jax.random.wrap_key_data` after restoring."
                ),
            )
        dtype = np.dtype(x.dtype)
        records.append(
            {
                "path": path_str(tree, keypath),
                "key": list(leaf_key(keypath)),
                "shape": list(x.shape),
                "dtype": dtype.name,
                "spec": _spec_list(getattr(x, "sharding", None)),
                "bytes": math.prod(x.shape) * dtype.itemsize,
            }
        )
    return records


def _find_mesh(tree: Any) -> Mesh | None:
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def _mesh_record(mesh: Mesh | None) -> dict[str, Any] | None:
    if mesh is None:
        return None
    devices = list(mesh.devices.flat)
    return {
        "axis_names": list(mesh.axis_names),
        "shape": {str(name): int(size) for name, size in mesh.shape.items()},
        "devices": len(devices),
        "platform": devices[0].platform if devices else None,
        "processes": len({d.process_index for d in devices}),
    }


def _scalar(tree: Any, name: str) -> int | None:
    value = getattr(tree, name, None)
    if value is None or not eqx.is_array(value) or np.ndim(value) != 0:
        return None
    return int(value)


def check_config(config: Any) -> None:
    """Raise `CheckpointError` unless `config` is JSON-serialisable."""
    if config is None:
        return
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"`OrbaxCheckpoint(config=...)` must be JSON-serialisable; json.dumps "
            f"failed with: {e}.",
            suggestion=(
                "Pass plain dicts, lists, strings and numbers (e.g. "
                "`dataclasses.asdict(cfg)`); arbitrary Python objects are not stored."
            ),
        ) from None


def build_metadata(
    state: Any,
    *,
    step: int,
    plan: Any = None,
    mesh: Mesh | None = None,
    config: Any = None,
    data: Any = None,
    fingerprints: list[str],
) -> dict[str, Any]:
    """The JSON document saved beside the arrays of `state` at `step`.

    `fingerprints` holds one value per array of `state`, in leaf order
    (`_fingerprint.fingerprints`).

    `data` describes the input pipeline whose `data_position` the state holds
    (`titanax.data.Pipeline.metadata()`), so a resume can check it reads the same
    sample order.

    **Raises:** `CheckpointError` if `config` or `data` is not JSON-serialisable.
    """
    check_config(config)
    check_config(data)
    leaves = leaf_records(state)
    if len(leaves) != len(fingerprints):
        raise ValueError(f"{len(leaves)} leaves but {len(fingerprints)} fingerprints")
    for leaf, value in zip(leaves, fingerprints, strict=True):
        leaf["fingerprint"] = value
    now = time.time()
    return {
        "format": FORMAT,
        "step": int(step),
        "data_position": _scalar(state, "data_position"),
        "time": now,
        "time_utc": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "versions": versions(),
        "mesh": _mesh_record(mesh if mesh is not None else _find_mesh(state)),
        "plan": plan.describe() if plan is not None else None,
        "state_type": type(state).__name__,
        "config": config,
        "data": data,
        "leaves": leaves,
    }


def read_metadata(path: str | os.PathLike[str], step: int) -> dict[str, Any]:
    """The JSON metadata of `step` under checkpoint directory `path`, validated.

    Reads only the JSON: no JAX devices, no Orbax.

    **Arguments:**

    - `path`: the checkpoint directory (as given to `OrbaxCheckpoint`).
    - `step`: the step.

    **Returns:** the document (see `docs/checkpoints.md` for its fields).

    **Raises:** `CheckpointError` naming the file if it is missing, not JSON, or
    fails its format's schema (naming the field, what was expected and found).
    """
    file = Path(path) / str(step) / META_FILE
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise CheckpointError(
            f"Checkpoint step {step} has no metadata file: `{file}` is missing.",
            path=str(file),
            suggestion=(
                "The step is damaged or was not written by Titanax. Restore another "
                "step (`titanax checkpoint ls PATH` lists them)."
            ),
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"Checkpoint step {step}: `{file}` cannot be read as UTF-8 text "
            f"({type(e).__name__}: {e}).",
            path=str(file),
            suggestion="Restore another step, or delete this step's directory.",
        ) from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"Checkpoint step {step}: `{file}` is not valid JSON ({e}); the file "
            "is truncated or damaged.",
            path=str(file),
            suggestion="Restore another step, or delete this step's directory.",
        ) from None
    return validate_metadata(meta, step=step, file=file)


def dir_size(path: Path) -> int:
    """Bytes in the files under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def scan(path: str | os.PathLike[str]) -> tuple[list[int], list[str]]:
    """Finished steps (sorted) and the names of unfinished (interrupted) saves.

    **Raises:** `CheckpointError` if `path` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"Expected a checkpoint directory at `{root}`, found "
            f"{'a file' if root.exists() else 'nothing'}.",
            suggestion="Pass the `path` given to `tx.OrbaxCheckpoint(path)`.",
        )
    steps, unfinished = [], []
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        if entry.name.isdigit():
            steps.append(int(entry.name))
        elif _TMP_MARK in entry.name:
            unfinished.append(entry.name)
    return sorted(steps), sorted(unfinished)
