"""`tx.OrbaxCheckpoint`: save and restore the arrays of a TrainState with Orbax.

What is saved is `eqx.partition(state, eqx.is_array)[0]` (the model's weights, the
optimizer state, step, RNG, data position), as Orbax's PyTree format, plus a JSON
document (`_metadata.py`); no Python objects are serialised. A restore reads into a
*target*: a state (or model) whose arrays, or `jax.ShapeDtypeStruct`s, say the
shape, dtype and sharding each saved array should land in, so restoring onto another
plan or mesh is the same call as restoring onto the same one.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import re
import sys
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from .._axes import is_arraylike, path_str
from .._errors import CheckpointError
from ._metadata import (
    META_FILE,
    META_ITEM,
    STATE_ITEM,
    build_metadata,
    check_config,
    leaf_key,
    read_metadata,
)
from ._target import to_abstract

__all__ = ["OrbaxCheckpoint"]

Allow = bool | str | Sequence[str]
_LIST_AT_MOST = 8
# Files Orbax needs to read a step: (path in the step directory, must parse as JSON).
_REQUIRED_FILES = (
    (f"{STATE_ITEM}/_METADATA", True),
    (f"{STATE_ITEM}/manifest.ocdbt", False),
    (META_FILE, True),
)


class _DamagedStep(CheckpointError):
    """A step that cannot be read (missing, truncated or undecodable files)."""


def _allowed(allow: Allow, what: str) -> Any:
    """A predicate `path -> bool` from `True`/`False`/regex patterns."""
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


class OrbaxCheckpoint:
    """Checkpoints of a `TrainState` in a directory, one sub-directory per step.

    Built on Orbax's `CheckpointManager`: saves are asynchronous (the training loop
    is blocked only while arrays are copied to host memory), written to a temporary
    directory and renamed when complete, so an interrupted save never becomes the
    latest step. Retention keeps the newest `keep` steps.

    **Arguments:**

    - `path`: the checkpoint directory (created if missing).
    - `keep`: how many steps to keep (`None`: all).
    - `every`: `save` writes when the step is a multiple of `every` (`None`: only
        when forced).
    - `async_`: write in a background thread (default). `wait()` blocks until done.
    - `config`: a JSON-serialisable run configuration stored in every step's
        metadata (`titanax checkpoint show` prints it).

    !!! Example
        ```python
        ckpt = tx.OrbaxCheckpoint("/tmp/run", keep=3, every=100)
        ckpt.save(state)                  # writes when state.step % 100 == 0
        target = tx.abstract_state(make_model, plan, mesh, optimizer)
        state = ckpt.restore(target)      # the newest intact step, resharded
        ```
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keep: int | None = 3,
        every: int | None = None,
        async_: bool = True,
        config: Any = None,
    ):
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise CheckpointError(
                f"`OrbaxCheckpoint(keep=...)` expects an int ≥ 1 or None, got "
                f"{keep!r}.",
                suggestion="Use e.g. `keep=3`, or `keep=None` to keep every step.",
            )
        if every is not None and (not isinstance(every, int) or every < 1):
            raise CheckpointError(
                f"`OrbaxCheckpoint(every=...)` expects an int ≥ 1 or None, got "
                f"{every!r}.",
                suggestion="Use e.g. `every=1000` (steps), or None to save on demand.",
            )
        self.path = Path(path).absolute()
        self.keep = keep
        self.every = every
        self.async_ = bool(async_)
        self.config = config
        check_config(config)  # fail now, not at the first save
        self._manager = ocp.CheckpointManager(
            self.path,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=self.async_
            ),
            item_handlers={
                STATE_ITEM: ocp.PyTreeCheckpointHandler(
                    type_handler_registry=_type_handlers()
                ),
                META_ITEM: ocp.JsonCheckpointHandler(),
            },
        )
        # A script that forgets `wait()` must not exit with a save half-written.
        self._at_exit = _waiter(weakref.ref(self))
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return (
            f"OrbaxCheckpoint({str(self.path)!r}, keep={self.keep}, "
            f"every={self.every}, async_={self.async_})"
        )

    def __enter__(self) -> OrbaxCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- steps ----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Every finished step, oldest first (interrupted saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or `None`.

        A step whose files were damaged after it was written is still listed; see
        `restore(step=None)`, which skips it.
        """
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether `save` would write at `step` without `force`."""
        return self.every is not None and step % self.every == 0

    def wait(self) -> None:
        """Block until every asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
        atexit.unregister(self._at_exit)

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default: the latest step)."""
        if step is None:
            step = self._require_latest()
        self.wait()
        return read_metadata(self.path, step)

    # --- save -----------------------------------------------------------------------

    def save(
        self,
        state: Any,
        *,
        force: bool = False,
        step: int | None = None,
        plan: Any = None,
        mesh: Mesh | None = None,
    ) -> bool:
        """Save the arrays of `state` if `force` or `every` divides the step.

        Returns as soon as the arrays are copied to host memory; the write goes on in
        the background (call `wait()` before reading the files). Donating `state` to
        the next training step right after `save` returns is safe.

        **Arguments:**

        - `state`: a `TrainState` (or any `eqx.Module`/PyTree of arrays).
        - `force`: save whatever the step.
        - `step`: the step number; default `int(state.step)`. A training loop that
            knows its step on the host should pass it: reading `state.step` waits for
            the device to finish that step.
        - `plan`, `mesh`: recorded in the metadata (`titanax checkpoint ls`). The mesh
            defaults to that of the state's first sharded array.

        **Returns:** whether a save was started. A step already saved is not saved
        again (returns False).
        """
        if step is None:
            value = getattr(state, "step", None)
            if value is None:
                raise CheckpointError(
                    f"Cannot tell the step of a {type(state).__name__}: it has no "
                    "`step` field.",
                    suggestion="Pass it: `ckpt.save(tree, step=n)`.",
                )
            step = int(value)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        arrays = eqx.filter(state, eqx.is_array)
        meta = build_metadata(
            state, step=step, plan=plan, mesh=mesh, config=self.config
        )
        return bool(
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.PyTreeSave(arrays),
                        META_ITEM: ocp.args.JsonSave(meta),
                    }
                ),
                force=True,
            )
        )

    # --- restore --------------------------------------------------------------------

    def restore(
        self,
        target: Any = None,
        step: int | None = None,
        *,
        partial: bool = False,
        allow_missing: Allow = (),
        allow_extra: Allow = (),
    ) -> Any:
        """Read a saved state into `target`'s structure, shapes and shardings.

        **Arguments:**

        - `target`: a `TrainState` of arrays (their shardings are used), an abstract
            one from `tx.abstract_state` (`jax.ShapeDtypeStruct`s with shardings:
            nothing is allocated twice), or `None` to get Orbax's nested dicts of
            host numpy arrays.
        - `step`: the step to read. `None`: the newest step that reads back intact;
            damaged steps are skipped with a warning.
        - `partial`: restore only `target.model` (the weights), keeping every other
            leaf of `target` as it is (they must be real arrays): fine-tuning with a
            new optimizer. See also `restore_model`.
        - `allow_missing`: target leaves the checkpoint may lack (kept from
            `target`, which must hold real arrays there): `True`, or regexes searched
            in paths like `TrainState.opt_state[0].mu.layers[0].weight`.
        - `allow_extra`: saved leaves the target may lack (ignored): `True` or
            regexes, as above.

        **Returns:** the target with every array read from the checkpoint, in the
        target's sharding. Leaves that are not restored (`partial`,
        `allow_missing`) are the target's own arrays, not copies.

        **Raises:** `CheckpointError` if there is no checkpoint, a shape or dtype
        differs (naming the first such leaf), leaves are missing or extra and not
        allowed (listing them), or the requested step is damaged (naming the file).
        """
        _allowed(allow_missing, "allow_missing")  # check the patterns first
        _allowed(allow_extra, "allow_extra")
        scope: tuple[str, ...] = ()
        if partial:
            if not hasattr(target, "model"):
                raise CheckpointError(
                    f"`partial=True` restores `target.model`, but the target is a "
                    f"{type(target).__name__} without a `model` field.",
                    suggestion="Pass a TrainState, or use `restore_model(model)`.",
                )
            scope = ("model",)
        return self._restore_any(
            target,
            step,
            prefix=(),
            scope=scope,
            allow_missing=allow_missing,
            allow_extra=allow_extra,
        )

    def restore_model(
        self,
        model: Any,
        step: int | None = None,
        *,
        allow_missing: Allow = (),
        allow_extra: Allow = (),
    ) -> Any:
        """Read only the saved model weights into `model`'s shapes and shardings.

        For fine-tuning with a new optimizer or a new frozen set: restore the
        weights, then build a fresh state with `init(model, key)`.

        **Arguments:**

        - `model`: the model, sharded (e.g. `tx.shard(make_model(key), plan, mesh)`)
            or abstract (`tx.abstract_state(...).model`).
        - `step`, `allow_missing`, `allow_extra`: as for `restore`; paths read like
            `MLP.layers[0].weight`.

        **Returns:** `model` with the checkpoint's weights.
        """
        _allowed(allow_missing, "allow_missing")
        _allowed(allow_extra, "allow_extra")
        return self._restore_any(
            model,
            step,
            prefix=("model",),
            scope=(),
            allow_missing=allow_missing,
            allow_extra=allow_extra,
        )

    # --- internals ------------------------------------------------------------------

    def _require_latest(self) -> int:
        latest = self.latest_step()
        if latest is None:
            raise CheckpointError(
                f"Expected a checkpoint in `{self.path}`, found no finished step.",
                suggestion="Save one first, or check the path.",
            )
        return latest

    def _restore_any(
        self,
        target: Any,
        step: int | None,
        **how: Any,
    ) -> Any:
        self.wait()  # a save in flight must not be read half-written
        if step is not None:
            if step not in self.steps():
                raise CheckpointError(
                    f"Expected step {step} in `{self.path}`; the finished steps are "
                    f"{self.steps()}.",
                    suggestion="Pass one of those, or `step=None` for the latest.",
                )
            return self._restore_step(target, step, **how)
        self._require_latest()
        damaged: list[str] = []
        for candidate in reversed(self.steps()):
            try:
                return self._restore_step(target, candidate, **how)
            except _DamagedStep as e:
                damaged.append(f"step {candidate}: {e.message}")
                warnings.warn(
                    f"Skipping damaged checkpoint step {candidate} in "
                    f"`{self.path}`: {e.message}",
                    stacklevel=3,
                )
        raise CheckpointError(
            f"Every checkpoint step in `{self.path}` is damaged:\n  "
            + "\n  ".join(damaged),
            suggestion="Restore from another copy, or start the run afresh.",
        )

    def _saved_leaves(self, step: int) -> Any:
        """Orbax's on-disk tree of `step` (nested dicts/lists of ArrayMetadata)."""
        try:
            meta = self._manager.item_metadata(step)
            tree = meta[STATE_ITEM]
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, dict):
                raise ValueError(f"no PyTree metadata (found {type(tree).__name__})")
            return tree
        except Exception as e:  # noqa: BLE001 -- any failure here is damage
            raise self._damaged(step, e) from None

    def _restore_step(
        self,
        target: Any,
        step: int,
        *,
        prefix: tuple[str, ...],
        scope: tuple[str, ...],
        allow_missing: Allow,
        allow_extra: Allow,
    ) -> Any:
        saved_meta = self._read_json(step)
        saved_paths = _saved_paths(saved_meta)
        # Shapes and dtypes of the saved leaves: from the JSON when it lists them
        # (cheap), else from Orbax's metadata (which reads every array's header).
        saved_tree = None
        flat_saved = _json_leaves(saved_meta)
        if flat_saved is None or target is None:
            saved_tree = self._saved_leaves(step)
            flat_saved = _flat_saved(saved_tree)

        # What the target asks for, keyed like the checkpoint.
        wanted: dict[tuple[str, ...], tuple[str, Any]] = {}
        kept: dict[tuple[str, ...], str] = {}
        abstract = to_abstract(target) if target is not None else None
        if target is not None:
            for keypath, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
                if not isinstance(x, jax.ShapeDtypeStruct):
                    continue
                key = prefix + leaf_key(keypath)
                where = path_str(target, keypath)
                if scope and key[: len(scope)] != scope:
                    kept[key] = where
                    continue
                wanted[key] = (where, x)
        else:
            wanted = {
                key: (saved_paths.get(key, ".".join(key)), None) for key in flat_saved
            }

        # Shapes and dtypes first: a mismatch is the likeliest mistake.
        for key, (where, x) in wanted.items():
            saved = flat_saved.get(key)
            if saved is None or x is None:
                continue
            saved_shape = tuple(saved.shape)
            saved_dtype = np.dtype(saved.dtype)
            if tuple(x.shape) != saved_shape or np.dtype(x.dtype) != saved_dtype:
                raise CheckpointError(
                    f"Checkpoint step {step} holds `{where}` with shape {saved_shape} "
                    f"and dtype {saved_dtype.name}, but the restore target has shape "
                    f"{tuple(x.shape)} and dtype {np.dtype(x.dtype).name}.",
                    path=where,
                    suggestion=(
                        "Build the target from the same model configuration as the "
                        "saved run; `titanax checkpoint show "
                        f"{self.path} --step {step}` lists the saved shapes."
                    ),
                )

        missing_ok = _allowed(allow_missing, "allow_missing")
        extra_ok = _allowed(allow_extra, "allow_extra")
        missing = [key for key in wanted if key not in flat_saved]
        bad_missing = [wanted[k][0] for k in missing if not missing_ok(wanted[k][0])]
        in_scope = prefix + scope
        extra = [
            saved_paths.get(key, ".".join(key))
            for key in flat_saved
            if key not in wanted
            and key not in kept
            and key[: len(in_scope)] == in_scope
        ]
        bad_extra = [p for p in extra if not extra_ok(p)]
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
                f"The restore target and checkpoint step {step} hold different "
                "leaves: " + "; ".join(parts) + ".",
                suggestion=(
                    "Restore weights only with `restore_model(model)` or "
                    "`restore(state, partial=True)`, or name the leaves you expect: "
                    "`allow_missing=[regex, ...]` keeps the target's value, "
                    "`allow_extra=[regex, ...]` ignores saved leaves (`True` allows "
                    "all)."
                ),
            )
        target_leaves = {
            prefix + leaf_key(k): x
            for k, x in jax.tree_util.tree_flatten_with_path(target)[0]
        }
        for key in [*missing, *kept]:
            if not eqx.is_array(target_leaves.get(key)):
                where = wanted[key][0] if key in wanted else kept[key]
                raise CheckpointError(
                    f"`{where}` is not restored from checkpoint step {step}, so its "
                    "value must come from the target, but the target holds a "
                    "`jax.ShapeDtypeStruct` there, not an array.",
                    path=where,
                    suggestion=(
                        "Pass a target with real arrays for the leaves that are not "
                        "restored (e.g. the state from `init`), or restore the model "
                        "alone with `restore_model`."
                    ),
                )

        restored = None
        if target is not None and not prefix and not kept and not missing:
            if len(wanted) == len(flat_saved):
                # Same leaves: restore into the target's own structure, as plain
                # Orbax would. On any failure the general path below decides.
                item = eqx.filter(
                    abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct)
                )
                restored = self._read_arrays(step, item, quiet=True)
        if restored is None:
            if saved_tree is None:
                saved_tree = self._saved_leaves(step)
            item = jax.tree_util.tree_map_with_path(
                lambda k, x: _restore_leaf(wanted, leaf_key(k), x),
                saved_tree,
                is_leaf=_is_value_metadata,
            )
            restored = self._read_arrays(step, item)
        flat_restored = {
            leaf_key(k): x for k, x in jax.tree_util.tree_flatten_with_path(restored)[0]
        }
        if target is None:
            return restored

        def fill(keypath: Any, x: Any) -> Any:
            if not is_arraylike(x):
                return x
            key = prefix + leaf_key(keypath)
            value = flat_restored.get(key)
            if value is None or value is ocp.PLACEHOLDER:
                return x  # kept from the target (checked to be an array above)
            return value

        return jax.tree_util.tree_map_with_path(fill, target)

    def _read_json(self, step: int) -> dict[str, Any]:
        try:
            return read_metadata(self.path, step)
        except CheckpointError as e:
            raise _DamagedStep(
                e.message, path=e.path, suggestion=e.suggestion
            ) from None

    def _read_arrays(self, step: int, item: Any, quiet: bool = False) -> Any:
        """Orbax's restore of `item` (None, if `quiet`, when it fails)."""
        leaves = jax.tree.leaves(item)
        if all(x is ocp.PLACEHOLDER for x in leaves):
            return item
        restore_args = jax.tree.map(_restore_args, item)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.PyTreeRestore(
                            item, restore_args=restore_args
                        )
                    }
                ),
            )
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore failures
            if quiet:
                _drain_orphaned_reads()
                return None
            raise self._damaged(step, e) from None
        return out[STATE_ITEM]

    def _damaged(self, step: int, error: BaseException) -> _DamagedStep:
        _drain_orphaned_reads()
        step_dir = self.path / str(step)
        file, what = _diagnose(step_dir, error)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {detail}"[:300]
        return _DamagedStep(
            f"checkpoint step {step} cannot be read: `{file}` {what} ({detail})",
            path=str(file),
            suggestion=(
                "Restore another step (`ckpt.steps()` lists them; `step=None` takes "
                "the newest intact one), or delete the damaged step directory."
            ),
        )


def _is_orbax_read_noise(unraisable: Any) -> bool:
    text = f"{unraisable.exc_value!r} {unraisable.object!r}"
    return "Event loop is closed" in text or "_read_array_index" in text


def _drain_orphaned_reads(quiet_s: float = 0.2, limit_s: float = 3.0) -> None:
    """Let the reads a failed Orbax restore left running finish, quietly.

    When one read of a restore fails, Orbax closes its event loop while the other
    reads are in flight; as they finish, each reports "Event loop is closed" (or an
    exception in a dropped coroutine) through `sys.unraisablehook`: a wall of
    tracebacks after the `CheckpointError` that already says what is wrong, and
    errors under `pytest -W error`. Those reports, and only those, are dropped
    until none has come for `quiet_s` seconds (at most `limit_s`).
    """
    previous = sys.unraisablehook
    start = time.monotonic()
    last = [start]

    def hook(unraisable: Any) -> None:
        if _is_orbax_read_noise(unraisable):
            last[0] = time.monotonic()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        while True:
            gc.collect()
            now = time.monotonic()
            if now - last[0] >= quiet_s or now - start >= limit_s:
                break
            time.sleep(0.02)
    finally:
        sys.unraisablehook = previous


def _waiter(ref: weakref.ref[OrbaxCheckpoint]) -> Any:
    def wait() -> None:
        ckpt = ref()
        if ckpt is not None:
            ckpt.wait()

    return wait


def _type_handlers() -> Any:
    """Orbax's default type handlers, with replica-parallel writes only on many hosts.

    Replica-parallel saving splits each replicated array into per-replica slices so
    that hosts share the writing; in one process it only adds a compiled slice per
    array shape and device (measured: 48 compilations, ~4 s on a 2-core CPU for the
    first save of a small MLP state on 8 devices) and no parallelism.
    """
    array_handler_args: dict[str, Any] = {
        "use_replica_parallel": jax.process_count() > 1
    }
    try:  # the per-host array metadata store Orbax's default handler uses
        from orbax.checkpoint._src.metadata import array_metadata_store

        array_handler_args["array_metadata_store"] = array_metadata_store.Store()
    except (ImportError, AttributeError):  # pragma: no cover - other Orbax versions
        pass
    handlers = ocp.type_handlers
    pairs = [
        (ty, handlers.get_type_handler(ty))
        for ty in handlers.supported_types()
        if ty is not jax.Array
    ]
    pairs.insert(0, (jax.Array, handlers.ArrayHandler(**array_handler_args)))
    return handlers.create_type_handler_registry(*pairs)


def _is_value_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not eqx.is_array(x)


def _flat_saved(saved_tree: Any) -> dict[tuple[str, ...], Any]:
    return {
        leaf_key(k): x
        for k, x in jax.tree_util.tree_flatten_with_path(
            saved_tree, is_leaf=_is_value_metadata
        )[0]
        if _is_value_metadata(x)
    }


def _json_leaves(meta: dict[str, Any]) -> dict[tuple[str, ...], Any] | None:
    """Saved leaves' shapes and dtypes from the JSON metadata, or None if absent."""
    leaves = meta.get("leaves")
    if not isinstance(leaves, list):
        return None
    out = {}
    try:
        for leaf in leaves:
            key = tuple(str(k) for k in leaf["key"])
            out[key] = jax.ShapeDtypeStruct(
                tuple(int(n) for n in leaf["shape"]), np.dtype(leaf["dtype"])
            )
    except (KeyError, TypeError, ValueError):
        return None
    return out


def _saved_paths(meta: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """Readable paths of saved leaves from the JSON metadata, by Orbax key."""
    out = {}
    for leaf in meta.get("leaves") or []:
        if isinstance(leaf, dict) and "key" in leaf and "path" in leaf:
            out[tuple(str(k) for k in leaf["key"])] = str(leaf["path"])
    return out


def _restore_leaf(wanted: dict[tuple[str, ...], Any], key: Any, saved: Any) -> Any:
    if not _is_value_metadata(saved):
        return saved
    if key not in wanted:
        return ocp.PLACEHOLDER
    x = wanted[key][1]
    if x is None:  # no target: a host numpy array
        return jax.ShapeDtypeStruct(tuple(saved.shape), np.dtype(saved.dtype))
    return x


def _restore_args(x: Any) -> Any:
    if x is ocp.PLACEHOLDER:
        return x
    if x.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return ocp.ArrayRestoreArgs(
        sharding=x.sharding, global_shape=tuple(x.shape), dtype=x.dtype
    )


# Paths quoted in TensorStore errors, sometimes inside escaped JSON (`\\"/a/b\\"`).
_QUOTED_PATH = re.compile(r'"(/[^"\\]+)')


def _diagnose(step_dir: Path, error: BaseException) -> tuple[Path, str]:
    """Which file of a step is damaged, and how; best effort."""
    for name, is_json in _REQUIRED_FILES:
        file = step_dir / name
        if name.endswith("manifest.ocdbt") and not (step_dir / STATE_ITEM).is_dir():
            continue
        if not file.exists():
            return file, "is missing"
        if file.stat().st_size == 0:
            return file, "is empty"
        if is_json:
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError):
                return file, "is truncated or not valid JSON"
    for found in _QUOTED_PATH.findall(str(error)):
        file = Path(found)
        if step_dir in file.parents and not file.is_dir():
            state = "is missing" if not file.exists() else "is truncated or damaged"
            return file, state
    return step_dir, "could not be read"
