"""Parallel plans for `models/gpt.py`, kept beside the model and outside it.

The GPT names its logical axes (`embed`, `heads`, `head_dim`, `mlp`, `vocab`, and
`layers` for the stacked blocks); these plans say which mesh axis each one uses.
For pipeline parallelism, `stage()` (or `STAGE`) says where the stacked blocks are
and what runs before and after them. The model file never mentions a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import titanax as tx

from .gpt import apply_block, loss_from_logits

__all__ = [
    "PLANS",
    "STAGE",
    "dp",
    "dp_tp",
    "fsdp",
    "fsdp_tp",
    "plan_for",
    "pp",
    "stage",
    "tp",
]


def dp(axis: str = "data") -> tx.Plan:
    """Data parallel: the batch split over `axis`, the model replicated."""
    return tx.Plan(dp=tx.DP(axis))


def fsdp(axis: str = "data", min_size: int = 1024) -> tx.Plan:
    """ZeRO-3: parameters and optimizer state sharded over `axis`, gathered per use."""
    return tx.Plan(fsdp=tx.FSDP(axis, min_size=min_size))


def tp(axis: str = "model") -> tx.Plan:
    """Megatron tensor parallelism: QKV and MLP-up column-parallel (`heads`, `mlp`),
    attention-out and MLP-down row-parallel, vocabulary-parallel embedding and head
    (`vocab`), so the cross-entropy never gathers full-vocabulary logits."""
    return tx.Plan(tp=tx.TP(axis, rules={"heads": axis, "mlp": axis, "vocab": axis}))


def dp_tp(data: str = "data", model: str = "model") -> tx.Plan:
    """DP over `data` × Megatron TP over `model` (a 2-D mesh)."""
    return tx.Plan(dp=tx.DP(data), tp=tp(model).tp)


def fsdp_tp(data: str = "data", model: str = "model") -> tx.Plan:
    """FSDP over `data` × Megatron TP over `model`."""
    return tx.Plan(fsdp=tx.FSDP(data), tp=tp(model).tp)


def pp(
    stages: int,
    microbatches: int | None = None,
    schedule: Literal["gpipe", "1f1b"] = "1f1b",
    axis: str = "pipe",
) -> tx.Plan:
    """Pipeline parallelism: the stacked blocks' `layers` dim split over `axis` into
    `stages` stages of `n_layer / stages` blocks; run it with `stage()`.

    **Arguments:**

    - `stages`: the size of the `axis` mesh axis (the number of stages `S`); it must
        divide `n_layer`.
    - `microbatches`: microbatches per step `M`; default `2 * stages` (bubble
        `(S - 1) / (3S - 1)`, under a third). The global batch must be a multiple of
        the data size times `M`.
    - `schedule`: `"1f1b"` (activation memory flat in `M`) or `"gpipe"`.
    - `axis`: the mesh axis the stages lie along.
    """
    m = 2 * stages if microbatches is None else microbatches
    return tx.Plan(pp=tx.PP(axis, microbatches=m, schedule=schedule))


def stage(*, remat: bool | Callable[..., bool] = False) -> tx.Stage:
    """The GPT's pipeline stage: the stacked `blocks`, the embedding before them
    (stage 0) and the final LayerNorm, head and loss after them (the last stage).

    The loss is `loss_from_logits` (mean cross-entropy, with `accuracy` as a metric),
    so a pipelined step trains what `gpt_loss` trains. With dropout, each layer's key
    is `fold_in(key, layer)` rather than `run_blocks`' split, so the masks differ from
    an unpipelined run's (the distribution does not).

    **Arguments:**

    - `remat`: `tx.Stage`'s rematerialisation policy per block: `False`, `True`
        (recompute each block), or a `jax.checkpoint_policies` policy.

    **Returns:** a `tx.Stage`, to pass as `tx.Trainer(..., stage=...)` or
    `tx.make_train_step(..., stage=...)` with a plan that has `pp`.
    """
    return tx.Stage(
        where=lambda m: m.blocks,
        pre=lambda m, b, key: m.embed(b["x"], key=key),
        post=lambda m, h, b, key: loss_from_logits(m.head(h), b["y"]),
        layer_fn=apply_block,
        remat=remat,
    )


STAGE = stage()
"""`stage()`: the GPT's pipeline stage without rematerialisation."""

PLANS = {"dp": dp, "fsdp": fsdp, "tp": tp, "dp_tp": dp_tp, "fsdp_tp": fsdp_tp}


def plan_for(
    *,
    dp_size: int = 1,
    tp_size: int = 1,
    fsdp_size: int = 1,
    pp_size: int = 1,
    microbatches: int | None = None,
    schedule: Literal["gpipe", "1f1b"] = "1f1b",
) -> tx.Plan:
    """The plan for a mesh of `data` (DP or FSDP) × `model` (TP) × `pipe` (PP) sizes.

    **Arguments:**

    - `dp_size`, `tp_size`, `fsdp_size`, `pp_size`: the parallel degrees; DP and
        FSDP share the `data` axis, so at most one of them may exceed 1, and PP does
        not compose with FSDP yet.
    - `microbatches`, `schedule`: the pipeline's, when `pp_size > 1` (see `pp`;
        default `2 * pp_size` microbatches, 1F1B).

    With `pp_size > 1` the step needs `stage()`: pass it as `stage=` to `tx.Trainer`
    or `tx.make_train_step`.
    """
    if dp_size > 1 and fsdp_size > 1:
        raise tx.PlanError(
            f"`plan_for` puts DP and FSDP on one `data` axis; got dp={dp_size} and "
            f"fsdp={fsdp_size}.",
            suggestion="Use one of them, or build a `tx.Plan` with two data axes.",
        )
    if pp_size > 1 and fsdp_size > 1:
        raise tx.PlanError(
            f"Pipelining does not compose with FSDP yet; got fsdp={fsdp_size} and "
            f"pp={pp_size}.",
            suggestion="Use DP with PP (`dp_size=...`), or drop `pp_size`.",
        )
    if pp_size <= 1 and microbatches is not None:
        raise tx.PlanError(
            f"`microbatches={microbatches}` needs a pipeline, but pp_size={pp_size}.",
            suggestion="Pass `pp_size` > 1, or drop `microbatches`.",
        )
    return tx.Plan(
        dp=tx.DP() if dp_size > 1 else None,
        fsdp=tx.FSDP() if fsdp_size > 1 else None,
        tp=tx.TP() if tp_size > 1 else None,
        pp=pp(pp_size, microbatches, schedule).pp if pp_size > 1 else None,
    )
