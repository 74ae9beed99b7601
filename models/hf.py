"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`, with `safetensors`.

A Hugging Face model directory holds `config.json` and its weights as safetensors,
either one `model.safetensors` or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json`. Two architectures are understood:

- `model_type: "gpt2"` (`GPT2LMHeadModel`, `GPT2Model`) <-> `models.gpt.GPT`
    (see `models/gpt2.py` for the layout),
- `model_type: "llama"` (`LlamaForCausalLM`, `LlamaModel`) <-> `models.llama.Llama`.

No PyTorch is needed: the files are read and written with `safetensors`' numpy API.
Each Titanax array is a view of one Hugging Face tensor per layer (transposed, its
dims split, the layers stacked); `load_hf` with a plan and a mesh builds every array
with `jax.make_array_from_callback`, so each process reads from disk only the slices
its own devices hold, and no device ever holds more than its shard.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

import titanax as tx

from . import gpt2, llama
from .gpt import GPT
from .llama import Llama

__all__ = ["TensorView", "load_hf", "save_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------
# One Titanax array as a view of Hugging Face tensors


@dataclasses.dataclass(frozen=True)
class TensorView:
    """How one Titanax array is made of Hugging Face tensors.

    The Hugging Face tensor `name` (with `{}` standing for the layer index when the
    array is a stack of `layers` tensors) is transposed by `perm`, each of its dims
    is split into the sizes in `split` (a tuple per transposed dim), and the split
    dims are permuted by `order`; stacked arrays gain a leading `layers` dim. E.g.
    GPT-2's `h.{}.attn.c_attn.weight`, `(C, 3C)`, is `blocks.w_qkv`
    `(layers, C, heads, 3, head_dim)` with `perm=(0, 1)`,
    `split=((C,), (3, heads, head_dim))` and `order=(0, 2, 1, 3)`.

    **Arguments:**

    - `path`: the array's attribute path in the Titanax model, e.g. `"blocks.w_qkv"`.
    - `name`: the Hugging Face tensor name (`{}` for the layer).
    - `perm`: the transpose of the Hugging Face tensor's dims.
    - `split`: per transposed dim, the sizes it splits into.
    - `layers`: the number of stacked layers, or `None` for a single tensor.
    - `order`: the permutation of the split dims, or `None` to keep them.
    """

    path: str
    name: str
    perm: tuple[int, ...]
    split: tuple[tuple[int, ...], ...]
    layers: int | None = None
    order: tuple[int, ...] | None = None

    @property
    def _order(self) -> tuple[int, ...]:
        n = sum(len(s) for s in self.split)
        return tuple(range(n)) if self.order is None else self.order

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of each Hugging Face tensor (before the transpose)."""
        transposed = [math.prod(s) for s in self.split]
        shape = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            shape[p] = transposed[i]
        return tuple(shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the Titanax array."""
        split = [d for s in self.split for d in s]
        dims = tuple(split[o] for o in self._order)
        return dims if self.layers is None else (self.layers, *dims)

    def names(self) -> list[str]:
        """The Hugging Face tensor names, one per layer."""
        if self.layers is None:
            return [self.name]
        return [self.name.format(i) for i in range(self.layers)]

    def to_hf(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """The whole Titanax array as Hugging Face tensors by name."""
        parts = [array] if self.layers is None else list(array)
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        unorder = tuple(int(i) for i in np.argsort(self._order))
        transposed = tuple(math.prod(s) for s in self.split)
        return {
            name: np.ascontiguousarray(
                part.transpose(unorder).reshape(transposed).transpose(inverse)
            )
            for name, part in zip(self.names(), parts, strict=True)
        }

    def read(
        self, index: tuple[slice, ...], get: Callable[[str, tuple[slice, ...]], Any]
    ) -> np.ndarray:
        """The block `array[index]` of the Titanax array, reading only what it needs.

        **Arguments:**

        - `index`: a tuple of slices, one per Titanax dim (as
            `jax.make_array_from_callback` passes them).
        - `get`: `(hf_name, hf_slices) -> np.ndarray`, reading a basic slice of a
            Hugging Face tensor.

        **Returns:**

        The block, a numpy array of shape `[len(s) for s in index]`.
        """
        index = _normalize(index, self.shape)
        if self.layers is not None:
            layer_slice, index = index[0], index[1:]
            names = self.names()[layer_slice]
            return np.stack([self._read_one(n, index, get) for n in names])
        return self._read_one(self.name, index, get)

    def _read_one(self, name, index, get) -> np.ndarray:
        # The index in split order (before `order` permutes the dims).
        split_index: list[slice] = [slice(0)] * len(index)
        for i, o in enumerate(self._order):
            split_index[o] = index[i]
        index = tuple(split_index)
        # Per transposed dim: the split dims it becomes and their slices.
        groups, start = [], 0
        for sizes in self.split:
            groups.append((sizes, index[start : start + len(sizes)]))
            start += len(sizes)
        # Contiguous runs of each transposed dim, placed on the Hugging Face dim.
        runs: list[list[slice]] = [[] for _ in self.perm]
        for t, (sizes, slices) in enumerate(groups):
            runs[self.perm[t]] = _runs(sizes, slices)
        blocks = {}
        for combo in itertools.product(*[range(len(r)) for r in runs]):
            sl = tuple(runs[d][i] for d, i in enumerate(combo))
            blocks[combo] = get(name, sl)
        data = _assemble(blocks, [len(r) for r in runs])
        data = data.transpose(self.perm)
        local = tuple(s.stop - s.start for _, slices in groups for s in slices)
        return data.reshape(local).transpose(self._order)


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"Expected unit-step slices, got {s}.")
        out.append(slice(start, stop))
    return tuple(out)


def _runs(sizes: tuple[int, ...], slices: tuple[slice, ...]) -> list[slice]:
    """Contiguous ranges of a flat dim of `prod(sizes)` covering the block
    `slices` of its split view, in row-major order."""
    # The first dim from which every later one is whole: its range is one run per
    # combination of the indices before it.
    j = len(sizes) - 1
    while j > 0 and slices[j] == slice(0, sizes[j]):
        j -= 1
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    outer = [range(s.start, s.stop) for s in slices[:j]]
    runs = []
    for idx in itertools.product(*outer):
        base = sum(i * strides[d] for d, i in enumerate(idx))
        s = slices[j]
        runs.append(slice(base + s.start * strides[j], base + s.stop * strides[j]))
    return runs


def _assemble(blocks: dict[tuple[int, ...], np.ndarray], counts: list[int]) -> Any:
    """Concatenate a grid of blocks (`counts` per dim) into one array."""

    def nest(prefix: tuple[int, ...]) -> Any:
        if len(prefix) == len(counts):
            return blocks[prefix]
        return [nest((*prefix, i)) for i in range(counts[len(prefix)])]

    return np.block(nest(()))


# ----------------------------------------------------------------------------
# Files


class _Files:
    """The safetensors files of a directory, opened lazily, by tensor name."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_FILE).exists():
            with safe_open(directory / SINGLE_FILE, framework="numpy") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118
        else:
            raise tx.CheckpointError(
                f"Expected `{SINGLE_FILE}` or `{INDEX_FILE}` in {directory}, found "
                f"{sorted(p.name for p in directory.iterdir())}.",
                suggestion="Save the model with `save_pretrained(..., "
                "safe_serialization=True)` or `models.hf.save_hf`.",
                path=str(directory),
            )
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}
        self.elements_read = 0  # for tests: what a sharded load really reads

    def _handle(self, name: str) -> Any:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.directory / file, framework="numpy")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        block = np.asarray(self._handle(name).get_slice(name)[index])
        self.elements_read += block.size
        return block


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise tx.CheckpointError(
            f"Expected a Hugging Face `config.json` in {directory}, found none.",
            suggestion="Point `load_hf` at the directory `save_pretrained` wrote.",
            path=str(path),
        )
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------
# Architectures


@dataclasses.dataclass(frozen=True)
class _Architecture:
    model_type: str
    model_class: type
    config_from_hf: Callable[[dict[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    views: Callable[[Any, str], list[TensorView]]
    prefixes: tuple[str, ...]  # tensor-name prefixes of the base model, with a head
    defaults: Callable[[Any], dict[str, np.ndarray]]  # tensors Titanax lacks


_ARCHITECTURES = {
    "gpt2": _Architecture(
        "gpt2",
        GPT,
        gpt2.config_from_hf,
        gpt2.config_to_hf,
        gpt2.tensor_views,
        ("transformer.", ""),
        gpt2.missing_tensors,
    ),
    "llama": _Architecture(
        "llama",
        Llama,
        llama.config_from_hf,
        llama.config_to_hf,
        llama.tensor_views,
        ("model.", ""),
        llama.missing_tensors,
    ),
}


def _architecture_of(config: dict[str, Any], directory: Path) -> _Architecture:
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise tx.CheckpointError(
            f"Expected `model_type` to be one of {sorted(_ARCHITECTURES)}, got "
            f"{model_type!r} in {directory / 'config.json'}.",
            suggestion="Convert the checkpoint to a GPT-2 or Llama layout, or add "
            "its architecture to `models/hf.py`.",
            path=str(directory / "config.json"),
        )
    return _ARCHITECTURES[model_type]


def _to_views(model: Any) -> tuple[_Architecture, list[TensorView]]:
    for arch in _ARCHITECTURES.values():
        if isinstance(model, arch.model_class):
            return arch, arch.views(model.config, arch.prefixes[0])
    raise tx.CheckpointError(
        f"Expected a `models.gpt.GPT` or `models.llama.Llama`, got "
        f"{type(model).__name__}.",
        suggestion="Only these two architectures have a Hugging Face layout here.",
    )


def _get_path(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = getattr(model, part)
    return model


# ----------------------------------------------------------------------------
# Loading


def load_hf(
    directory: str | os.PathLike[str],
    plan: tx.Plan | None = None,
    mesh: Mesh | None = None,
    *,
    dtype: Any = np.float32,
    **overrides: Any,
) -> Any:
    """Load a Hugging Face GPT-2 or Llama checkpoint into a Titanax model.

    **Arguments:**

    - `directory`: a directory with `config.json` and safetensors weights (one file,
        or shards with their index).
    - `plan`, `mesh`: if given, every array is created directly in its sharding
        under `plan` on `mesh`: each process reads only the slices its devices hold,
        and no device holds more than its shard. Without them, the arrays are
        placed whole on the default device.
    - `dtype`: the parameters' dtype (float32: Titanax models keep float32 master
        weights; lower-precision compute is `tx.Precision`'s job).
    - `**overrides`: config fields to replace after conversion, e.g.
        `unroll=False` or `dropout=0.1`.

    **Returns:**

    A `models.gpt.GPT` (for `model_type: "gpt2"`) or a `models.llama.Llama`, whose
    `model(tokens)` maps int tokens `(B, T)` to logits `(B, T, vocab)`.

    **Raises:** `tx.CheckpointError` when the directory, its config or its tensors
    do not match (a missing tensor, a wrong shape, an unknown architecture); plan
    errors as `tx.init` raises them.

    !!! Example

        ```python
        model = load_hf("gpt2-dir")  # config.json + model.safetensors
        mesh = tx.make_mesh(data=2, model=4)
        model = load_hf("gpt2-dir", gpt_plans.dp_tp(), mesh)  # sharded while read
        ```
    """
    if (plan is None) != (mesh is None):
        raise tx.PlanError(
            f"`load_hf` needs both `plan` and `mesh` or neither; got plan={plan!r} "
            f"and mesh={mesh!r}.",
            suggestion="Pass both, e.g. `load_hf(d, tx.Plan(dp=tx.DP()), mesh)`.",
        )
    directory = Path(directory)
    hf_config = _read_config(directory)
    arch = _architecture_of(hf_config, directory)
    config = arch.config_from_hf(hf_config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    files = _Files(directory)
    prefix = next(
        (p for p in arch.prefixes if any(k.startswith(p) for k in files.weight_map)),
        "",
    )
    views = arch.views(config, prefix)
    _check_tensors(views, files, directory)
    abstract = eqx.filter_eval_shape(
        lambda k: arch.model_class(config, key=k), jax.random.key(0)
    )
    shardings = None
    if plan is not None and mesh is not None:
        shardings = tx.shardings(abstract, plan, mesh)
    arrays = []
    for view in views:
        target = _get_path(abstract, view.path)
        if tuple(target.shape) != view.shape:
            raise tx.CheckpointError(  # a bug in a view, never the user's input
                f"Expected {view.path} of shape {tuple(target.shape)} from "
                f"{view.name}, got {view.shape}.",
                path=view.path,
            )
        sharding = None if shardings is None else _get_path(shardings, view.path)
        arrays.append(_make_array(view, files, dtype, sharding))
    return eqx.tree_at(
        lambda m: [_get_path(m, v.path) for v in views], abstract, arrays
    )


def _make_array(view: TensorView, files: _Files, dtype: Any, sharding: Any):
    def block(index: tuple[slice, ...]) -> np.ndarray:
        return view.read(index, files.get).astype(dtype)

    if sharding is None:
        return jax.numpy.asarray(block(tuple(slice(None) for _ in view.shape)))
    cache: dict[Any, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        # Replicas of one shard (e.g. over a data axis) read it once.
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            cache[key] = block(index)
        return cache[key]

    return jax.make_array_from_callback(view.shape, sharding, callback)


def _check_tensors(views: Sequence[TensorView], files: _Files, directory: Path):
    expected = {n: v.hf_shape for v in views for n in v.names()}
    for name, shape in expected.items():
        if name not in files.weight_map:
            raise tx.CheckpointError(
                f"Expected tensor `{name}` of shape {shape} in {directory}, found "
                "none.",
                suggestion="Check that config.json matches the weights (e.g. "
                "`tie_word_embeddings`, `num_hidden_layers`).",
                path=name,
            )
        got = files.shape(name)
        if got != shape:
            raise tx.CheckpointError(
                f"Expected tensor `{name}` of shape {shape} (from config.json), got "
                f"{got}.",
                suggestion="Check that config.json belongs to these weights.",
                path=name,
            )


# ----------------------------------------------------------------------------
# Saving


def save_hf(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 4 << 30,
    dtype: Any = np.float32,
) -> list[Path]:
    """Save a Titanax GPT or Llama as a Hugging Face checkpoint.

    Writes `config.json` (with `architectures` and `model_type`, so
    `GPT2LMHeadModel.from_pretrained` / `LlamaForCausalLM.from_pretrained` load it)
    and the weights: one `model.safetensors`, or shards of at most
    `max_shard_bytes` (`model-00001-of-0000n.safetensors`, ...) with
    `model.safetensors.index.json`. Sharded arrays are gathered one at a time;
    only process 0 writes.

    **Arguments:**

    - `model`: a `models.gpt.GPT` or `models.llama.Llama`, placed anywhere.
    - `directory`: where to write (created if missing).
    - `max_shard_bytes`: the largest file; a tensor is never split.
    - `dtype`: the stored dtype.

    **Returns:**

    The weight files written, in order.
    """
    arch, views = _to_views(model)
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for view in views:
        array = np.asarray(_gather(_get_path(model, view.path))).astype(dtype)
        tensors.update(view.to_hf(array))
    tensors.update({k: v.astype(dtype) for k, v in arch.defaults(model).items()})
    if jax.process_index() != 0:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = arch.config_to_hf(model.config)
    hf_config["dtype"] = np.dtype(dtype).name
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses files without it
    if len(shards) == 1:
        paths = [directory / SINGLE_FILE]
        save_file(shards[0], paths[0], metadata=metadata)
        (directory / INDEX_FILE).unlink(missing_ok=True)
        return paths
    n, paths, weight_map = len(shards), [], {}
    for i, shard in enumerate(shards):
        path = directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / SINGLE_FILE).unlink(missing_ok=True)
    return paths


def _gather(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _plan_shards(
    tensors: dict[str, np.ndarray], max_bytes: int
) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards
