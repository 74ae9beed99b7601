"""Titanax's typed errors.

Every error says what was expected, what was found, where (a PyTree path such as
`GPT.blocks.mlp.w_in`) and what to do. The "what to do" part is kept separately on
`.suggestion` so that tools and tests can read it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "ConfigError",
    "MeshError",
    "PipelineError",
    "PlanError",
    "ShardingError",
    "TitanaxError",
    "TrainerError",
]


class TitanaxError(Exception):
    """Base class of every error Titanax raises on bad input.

    **Arguments:**

    - `message`: what was expected and what was found.
    - `suggestion`: what to do about it (shown after the message as `Fix: ...`).
    - `path`: where, as a PyTree path string (`GPT.blocks.mlp.w_in`), if any.

    **Attributes:** `message`, `suggestion`, `path`, as given.
    """

    def __init__(
        self, message: str, *, suggestion: str | None = None, path: str | None = None
    ):
        self.message = message
        self.suggestion = suggestion
        self.path = path
        text = message
        if path is not None and path not in message:
            text = f"{text} (at `{path}`)"
        if suggestion:
            text = f"{text}\nFix: {suggestion}"
        super().__init__(text)


class MeshError(TitanaxError, ValueError):
    """A mesh does not fit the devices, or an axis name or size is wrong."""


class PlanError(TitanaxError, ValueError):
    """A plan is inconsistent in itself or with the mesh or model it is used with."""


class ShardingError(TitanaxError, ValueError):
    """Logical axes or shardings cannot be derived for a PyTree leaf."""


class CollectiveError(TitanaxError, ValueError):
    """A collective names an axis that the active mesh lacks, or gets bad input."""


class CheckpointError(TitanaxError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the restore target."""


class TrainerError(TitanaxError, RuntimeError):
    """A training step or its input is wrong (batch, loss, trainable set, ...)."""


class PipelineError(PlanError):
    """A pipeline plan does not fit the model, mesh or microbatch count."""


class ConfigError(TitanaxError, ValueError):
    """A run config is wrong: a bad type, an unknown key, a missing environment
    variable, or a model, plan, mesh or data section that do not fit together.

    `path` is the config key (`optimizer.lr`, `plan.tp.axis`); raised before any
    compilation."""
