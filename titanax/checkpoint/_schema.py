"""The versioned JSON Schema of a step's metadata, and its validation on read.

A checkpoint directory may come from another machine, another Titanax version or a
hand edit, so nothing in `meta/metadata` is trusted before it is checked: types and
ranges by JSON Schema (the `jsonschema` library), then what a schema cannot say
(the step matches its directory, byte counts match shapes and dtypes, leaf keys are
unique, dtypes exist). Format 1 had no fingerprints; format 2 requires one per leaf.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CheckpointError

__all__ = ["FORMAT", "FORMATS", "validate_metadata"]

FORMAT = "titanax-checkpoint/2"
FORMATS = ("titanax-checkpoint/1", FORMAT)

_INT_GE_0 = {"type": "integer", "minimum": 0}
_STRING = {"type": "string"}


def _described(schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {**schema, "description": text}


def _leaf(version: int) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "path": _described(_STRING, "a string (the leaf's PyTree path)"),
        "key": _described(
            {"type": "array", "items": _STRING, "minItems": 1},
            "a non-empty list of strings (the leaf's Orbax key)",
        ),
        "shape": _described(
            {"type": "array", "items": _INT_GE_0}, "a list of integers ≥ 0"
        ),
        "dtype": _described(_STRING, "a dtype name such as 'float32'"),
        "spec": _described(
            {
                "type": ["array", "null"],
                "items": {
                    "type": ["string", "array", "null"],
                    "items": _STRING,
                },
            },
            "null or a PartitionSpec as a list of null, axis names or lists of them",
        ),
        "bytes": _described(_INT_GE_0, "an integer ≥ 0"),
    }
    required = ["path", "key", "shape", "dtype", "bytes"]
    if version >= 2:
        properties["fingerprint"] = _described(
            {"type": "string", "pattern": "^[0-9a-f]{16}$"}, "16 lowercase hex digits"
        )
        required.append("fingerprint")
    return {"type": "object", "properties": properties, "required": required}


def _schema(version: int) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"titanax-checkpoint/{version} step metadata",
        "type": "object",
        "properties": {
            "format": {"const": f"titanax-checkpoint/{version}"},
            "step": _described(_INT_GE_0, "an integer ≥ 0"),
            "data_position": _described(
                {"type": ["integer", "null"], "minimum": 0},
                "an integer ≥ 0 (global samples consumed) or null",
            ),
            "time": _described({"type": "number", "minimum": 0}, "a number ≥ 0"),
            "time_utc": _described(_STRING, "an ISO 8601 string"),
            "versions": _described(
                {"type": "object", "additionalProperties": _STRING},
                "an object of package name to version string",
            ),
            "mesh": _described(
                {
                    "type": ["object", "null"],
                    "properties": {
                        "axis_names": {"type": "array", "items": _STRING},
                        "shape": {
                            "type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 1},
                        },
                        "devices": {"type": "integer", "minimum": 1},
                        "platform": {"type": ["string", "null"]},
                        "processes": {"type": "integer", "minimum": 1},
                    },
                },
                "null or an object with axis_names, shape (sizes ≥ 1), devices, "
                "platform and processes",
            ),
            "plan": _described({"type": ["string", "null"]}, "a string or null"),
            "data": _described(
                {"type": ["object", "null"]},
                "null or an object describing the data pipeline",
            ),
            "state_type": _described(_STRING, "a string"),
            "leaves": _described(
                {"type": "array", "items": _leaf(version)}, "a list of leaf records"
            ),
        },
        "required": ["format", "step", "leaves"]
        + (["data_position"] if version >= 2 else []),
    }


_SCHEMAS = {name: _schema(n) for n, name in enumerate(FORMATS, start=1)}


def _field(path: Any) -> str:
    """`deque(['leaves', 3, 'shape'])` → `leaves[3].shape`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(the document)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Any) -> tuple[str, str, Any]:
    """A jsonschema error as (field, what was expected, what was found)."""
    path = list(error.absolute_path)
    if error.validator == "required":
        name = next(p for p in error.validator_value if p not in error.instance)
        properties = error.schema.get("properties", {})
        expected = properties.get(name, {}).get("description", "a value")
        return _field([*path, name]), expected, _Missing()
    expected = (
        error.schema.get("description") if isinstance(error.schema, dict) else None
    )
    return _field(path), expected or error.message, error.instance


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


def _invalid(file: Path, step: int, field: str, expected: str, got: Any) -> Any:
    return CheckpointError(
        f"Checkpoint step {step}: `{file}` has an invalid field `{field}`: expected "
        f"{expected}, got {_short(got)}.",
        path=str(file),
        suggestion=(
            "The metadata was damaged or edited. Restore another step "
            "(`titanax checkpoint ls PATH` lists them), or delete this step."
        ),
    )


def _dtype(name: str) -> np.dtype:
    import jax.numpy as jnp  # bfloat16 and the other ml_dtypes names

    dtype = np.dtype(jnp.dtype(name))
    if dtype.kind in "OUSMm":  # objects, strings, dates: never saved arrays
        raise TypeError(name)
    return dtype


def validate_metadata(meta: Any, *, step: int, file: Path) -> dict[str, Any]:
    """Check a step's metadata against the schema of its `format`.

    **Arguments:**

    - `meta`: the parsed JSON document.
    - `step`: the step directory it was read from (the document must agree).
    - `file`: the file, for messages.

    **Returns:** `meta`, unchanged.

    **Raises:** `CheckpointError` naming the file and the first invalid field, what
    was expected and what was found.
    """
    import jsonschema
    import jsonschema.exceptions

    if not isinstance(meta, dict):
        raise _invalid(file, step, "(the document)", "a JSON object", meta)
    form = meta.get("format")
    if form not in _SCHEMAS:
        newer = isinstance(form, str) and form.startswith("titanax-checkpoint/")
        raise CheckpointError(
            f"Checkpoint step {step}: `{file}` has format {_short(form)}; this "
            f"Titanax reads {', '.join(FORMATS)}.",
            path=str(file),
            suggestion=(
                "Upgrade Titanax to read this checkpoint."
                if newer
                else "This is not a Titanax checkpoint's metadata, or it is damaged."
            ),
        )
    validator = jsonschema.Draft202012Validator(_SCHEMAS[form])
    error = jsonschema.exceptions.best_match(validator.iter_errors(meta))
    if error is not None:
        raise _invalid(file, step, *_describe(error))
    if meta["step"] != step:
        raise _invalid(file, step, "step", f"{step} (its directory)", meta["step"])
    seen = set()
    for n, leaf in enumerate(meta["leaves"]):
        key = tuple(leaf["key"])
        if key in seen:
            raise _invalid(file, step, f"leaves[{n}].key", "a key not seen before", key)
        seen.add(key)
        try:
            itemsize = _dtype(leaf["dtype"]).itemsize
        except TypeError:
            raise _invalid(
                file, step, f"leaves[{n}].dtype", "a dtype name", leaf["dtype"]
            ) from None
        size = math.prod(leaf["shape"]) * itemsize
        if leaf["bytes"] != size:
            expected = f"{size} (shape x itemsize)"
            raise _invalid(file, step, f"leaves[{n}].bytes", expected, leaf["bytes"])
    return meta
