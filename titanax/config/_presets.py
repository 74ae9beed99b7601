"""Model presets: the repository's reference models (`models/`) by short name.

A preset is three import paths (factory, loss, pipeline stage); `model.factory`,
`model.loss` and `model.stage` in a config take the same form, so any model (the
GPT-2 and Llama ports too) plugs in the same way. The factories below only adapt
`models/`' constructors to the `fn(*, key, **kwargs)` form; `models/` must be
importable (run from a Titanax checkout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = ["PRESETS", "Preset", "cnn", "gpt", "llama", "mlp"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: `factory(*, key, **kwargs)`, its `loss`, and (for pipelines)
    a `stage()` factory, each an import path."""

    factory: str
    loss: str
    stage: str | None = None


def gpt(*, key: Any, size: str = "baby", **fields: Any) -> Any:
    """`models.gpt.GPT(GPTConfig.preset(size, **fields))`.

    **Arguments:**

    - `key`: the PRNG key.
    - `size`: `tiny`, `baby` or `small` (GPT-2 124M).
    - `**fields`: `GPTConfig` fields to replace (`block_size`, `dropout`, ...,
        and `layout`, which `build_run` passes under context or sequence
        parallelism).

    **Returns:** a `GPT`.
    """
    from models.gpt import GPT, GPTConfig

    return GPT(GPTConfig.preset(size, **fields), key=key)


def llama(*, key: Any, size: str = "tiny", **fields: Any) -> Any:
    """`models.llama.Llama(LlamaConfig.preset(size, **fields))`.

    Under TP, map `kv_heads` too: `plan.tp.rules: {heads: model, kv_heads: model,
    mlp: model, vocab: model}` (`models/llama_plans.py`).

    **Arguments:**

    - `key`: the PRNG key.
    - `size`: `tiny`, `baby` or `llama3-8b` (its shapes, for planning).
    - `**fields`: `LlamaConfig` fields to replace (`block_size`, `n_layer`, ...,
        and `layout`, which `build_run` passes under context or sequence
        parallelism).

    **Returns:** a `Llama`.
    """
    from models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.preset(size, **fields), key=key)


def mlp(
    *,
    key: Any,
    in_size: int = 64,
    out_size: int = 10,
    hidden_sizes: Sequence[int] = (128,),
    activation: str = "gelu",
) -> Any:
    """`models.mlp.MLP(in_size, out_size, hidden_sizes, activation)`."""
    from models.mlp import MLP

    return MLP(in_size, out_size, tuple(hidden_sizes), activation, key=key)


def cnn(*, key: Any, out_size: int = 10, channels: Sequence[int] = (16, 32)) -> Any:
    """`models.cnn.CNN(out_size, channels)`."""
    from models.cnn import CNN

    return CNN(out_size, tuple(channels), key=key)


PRESETS: dict[str, Preset] = {
    "gpt": Preset(
        factory="titanax.config._presets:gpt",
        loss="models.gpt:gpt_loss",
        stage="models.gpt_plans:stage",
    ),
    "llama": Preset(
        factory="titanax.config._presets:llama", loss="models.llama:llama_loss"
    ),
    "mlp": Preset(
        factory="titanax.config._presets:mlp", loss="models.mlp:cross_entropy_loss"
    ),
    "cnn": Preset(
        factory="titanax.config._presets:cnn", loss="models.cnn:cross_entropy_loss"
    ),
}
