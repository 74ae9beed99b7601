"""Which files of a step hold what: Orbax's on-disk layout, read without Orbax.

A step written by `OrbaxCheckpoint` looks like this:

```
<step>/meta/metadata                      Titanax's JSON
<step>/state/_METADATA                    Orbax's tree metadata (JSON)
<step>/state/manifest.ocdbt               the OCDBT database's manifest
<step>/state/d/<hash>                     B+tree nodes
<step>/state/ocdbt.process_<i>/d/<hash>   array chunks, written by process i
```

The arrays live in an OCDBT key-value database (TensorStore): key
`model.layers.0.weight/0.0` is chunk `(0, 0)` of that array, its bytes at an offset
in a data file. `tensorstore.ocdbt.dump` (public TensorStore API) lists every key
and where its bytes are, so a damaged array can be traced to its file, and a
truncated or missing file found before Orbax reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._metadata import META_FILE, STATE_ITEM

__all__ = ["Extent", "FileProblem", "LayoutError", "array_extents", "check_files"]

# Files a step cannot be read without: (path in the step directory, is JSON).
_REQUIRED = (
    (f"{STATE_ITEM}/_METADATA", True),
    (f"{STATE_ITEM}/manifest.ocdbt", False),
    (META_FILE, True),
)


@dataclass(frozen=True)
class Extent:
    """Bytes `[offset, offset + length)` of `file` hold a chunk of an array."""

    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class FileProblem:
    """`file` is damaged: `what` says how (`is missing`, `is truncated`, ...)."""

    file: Path
    what: str
    array: str | None = None  # the Orbax key of an array it holds, if known


class LayoutError(Exception):
    """The OCDBT manifest or a B+tree node cannot be read: `file`, `detail`."""

    def __init__(self, file: Path, detail: str):
        super().__init__(f"{file}: {detail}")
        self.file = file
        self.detail = detail


def _tensorstore_detail(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else ""


def _location(state_dir: Path, location: str) -> Extent:
    """`value:<prefix>:<file>:<offset>:<length>` → an `Extent` under `state_dir`."""
    _, prefix, name, offset, length = location.split(":")
    return Extent(state_dir / (prefix + name), int(offset), int(length))


def _dump(store: Any, node: str | None = None) -> Any:
    import tensorstore as ts

    return ts.ocdbt.dump(store, node).result()


def _text(key: Any) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


def _walk(
    store: Any,
    state_dir: Path,
    location: str,
    out: dict[str, list[Extent]],
    prefix: str = "",
) -> None:
    """Record the extents of every key under the B+tree node at `location`.

    Keys below an interior entry are stored without that entry's
    `subtree_common_prefix`; `prefix` carries what the path so far stripped.
    """
    node_extent = _location(state_dir, location)
    try:
        node = _dump(store, location)
    except (ValueError, OSError) as e:
        raise LayoutError(node_extent.file, _tensorstore_detail(e)) from None
    for entry in node.get("entries", []):
        child = entry.get("location")
        if isinstance(child, str) and child.startswith("btreenode:"):
            common = _text(entry.get("subtree_common_prefix", b""))
            _walk(store, state_dir, child, out, prefix + common)
            continue
        key = prefix + _text(entry.get("key", b""))
        if "/" not in key:
            continue
        array, chunk = key.rsplit("/", 1)
        extents = out.setdefault(array, [])
        if "indirect_value" in entry:
            extents.append(_location(state_dir, entry["indirect_value"]))
        elif not chunk.startswith(".") and node_extent not in extents:
            extents.append(node_extent)  # a small chunk, inline in the node


def array_extents(step_dir: Path) -> dict[str, list[Extent]]:
    """Where each array's chunks are, keyed like Orbax (`model.layers.0.weight`).

    **Raises:** `LayoutError` naming the file if the database's manifest or a B+tree
    node is missing or damaged (TensorStore checks their checksums).
    """
    import tensorstore as ts

    state_dir = step_dir / STATE_ITEM
    try:
        store = ts.KvStore.open(
            {"driver": "file", "path": str(state_dir) + "/"}
        ).result()
        manifest = _dump(store)
    except (ValueError, OSError) as e:
        raise LayoutError(
            state_dir / "manifest.ocdbt", _tensorstore_detail(e)
        ) from None
    versions = manifest.get("versions") or []
    out: dict[str, list[Extent]] = {}
    if versions:
        root = versions[-1].get("root", {}).get("location")
        if isinstance(root, str):
            _walk(store, state_dir, root, out)
    return out


def check_files(step_dir: Path) -> FileProblem | None:
    """The first missing, empty, truncated or unreadable file of a step, or None.

    Cheap (no array data is read): the required files exist and parse, the OCDBT
    manifest and B+tree nodes read back (TensorStore checks their checksums), and
    every data file is at least as long as the chunks it should hold. Bit flips
    inside array data are not seen here; fingerprints catch those.
    """
    for name, is_json in _REQUIRED:
        file = step_dir / name
        if not file.is_file():
            return FileProblem(file, "is missing")
        if file.stat().st_size == 0:
            return FileProblem(file, "is empty")
        if is_json:
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError, OSError):
                return FileProblem(file, "is truncated or not valid JSON")
    try:
        extents = array_extents(step_dir)
    except LayoutError as e:
        if not e.file.is_file():
            return FileProblem(e.file, "is missing")
        return FileProblem(e.file, f"is truncated or damaged ({e.detail})")
    sizes: dict[Path, int | None] = {}
    for array, chunks in sorted(extents.items()):
        for extent in chunks:
            if extent.file not in sizes:
                try:
                    sizes[extent.file] = extent.file.stat().st_size
                except OSError:
                    sizes[extent.file] = None
            size = sizes[extent.file]
            if size is None:
                return FileProblem(extent.file, "is missing", array)
            if size < extent.offset + extent.length:
                return FileProblem(
                    extent.file,
                    f"is truncated ({size} bytes, but a chunk ends at byte "
                    f"{extent.offset + extent.length})",
                    array,
                )
    return None
