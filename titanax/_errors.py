"""Titanax's typed errors.

Every error says what was expected, what was found, where (a PyTree path such as
`GPT.blocks.mlp.w_in`) and what to do. The "what to do" part is kept separately on
`.suggestion` so that tools and tests can read it.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "BatchError",
    "CheckpointError",
    "CollectiveError",
    "ConfigError",
    "DataError",
    "DataExhaustedError",
    "DataExhaustedWarning",
    "MeshError",
    "ModelError",
    "NonFiniteError",
    "PipelineError",
    "PlanError",
    "Preempted",
    "ShardingError",
    "SkippedStepsWarning",
    "StepFailedError",
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


# --- the training loop -------------------------------------------------------------


class ArgumentError(TitanaxError, TypeError, ValueError):
    """An argument of a Titanax function has the wrong type or value (`steps=2.5`,
    `log_every=True`, `precision="bf16"`, a model class where a `key -> Module`
    function is expected). Raised before anything is placed or compiled."""


class BatchError(TrainerError, ValueError):
    """A batch does not fit the run: its structure, a leaf's shape or dtype, or its
    row count differs from the first batch's, or its rows do not split over the data
    axes. Raised before the step runs, so the state is intact."""


class StepFailedError(TrainerError):
    """A training step raised, or `continue_on_error` met too many consecutive
    failures. Chained (`__cause__`) to the first failure."""


class NonFiniteError(TrainerError):
    """The loss or the gradients were not finite (`on_nonfinite="raise"`), or too
    many consecutive steps were skipped for it (`on_nonfinite="skip"`)."""


class DataExhaustedError(TrainerError):
    """`fit(..., strict=True)`: the data ended before `steps` was reached."""


class DataExhaustedWarning(UserWarning):
    """The data ended before `fit` reached `steps` (see `DataExhaustedError`)."""


class SkippedStepsWarning(UserWarning):
    """Steps were skipped on device because their loss or gradients were not
    finite (`on_nonfinite="skip"`)."""


class Preempted(SystemExit):
    """`Trainer.fit` stopped on a preemption signal (SIGTERM) after saving a
    checkpoint of `step`.

    A `SystemExit`: left uncaught, the script ends with exit code `exit_code` (75,
    `EX_TEMPFAIL`: "try again later"), which a scheduler reads as "requeue me", not
    as success; `except Exception` does not swallow it. Re-running the same command
    with `fit(..., resume=True)` continues from the checkpoint.

    **Attributes:** `step` (the last step taken and saved), `exit_code` (75).
    """

    exit_code = 75

    def __init__(self, step: int):
        self.step = step
        super().__init__(self.exit_code)

    def __str__(self) -> str:
        return (
            f"Preempted after step {self.step}; a checkpoint of it was saved. "
            f"Exit code {self.exit_code}: rerun with `resume=True` to continue."
        )


# --- plan/axes/sharding errors (the `plan` branch) -----------------------------------


class ModelError(ShardingError, TypeError):
    """The model, or the `key -> Module` function that builds it, is not what Titanax
    expects: not an `eqx.Module`, a class that needs arguments besides the key, a
    function taking no key, or a key that is not a PRNG key.

    A `ShardingError` (and so a `ValueError`) for code that caught the earlier error,
    and a `TypeError`, which is what it is.
    """


class DataError(TitanaxError, ValueError):
    """A data source or pipeline is wrong: a token file, a window, a batch size the
    data axes do not divide, an empty or non-random-access source."""


class ConfigError(TitanaxError, ValueError):
    """A run config is wrong: a bad type, an unknown key, a missing environment
    variable, or a model, plan, mesh or data section that do not fit together.

    `path` is the config key (`optimizer.lr`, `plan.tp.axis`); raised before any
    compilation."""
