"""Parallel plans for `models/llama.py`, kept beside the model and outside it.

The Llama names its logical axes (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, and `layers` for the stacked blocks); these plans say which mesh axis each
one uses. They differ from `gpt_plans` only in TP's rules, which also map `kv_heads`:
under grouped-query attention the key/value heads are split like the query heads, so
`n_kv_head` must be a multiple of the `model` axis size.
"""

import titanax as tx

__all__ = ["PLANS", "TP_RULES", "dp", "dp_tp", "fsdp", "fsdp_tp", "plan_for", "tp"]

TP_RULES = ("heads", "kv_heads", "mlp", "vocab")
"""The logical axes Megatron TP splits over the `model` axis."""


def dp(axis: str = "data") -> tx.Plan:
    """Data parallel: the batch split over `axis`, the model replicated."""
    return tx.Plan(dp=tx.DP(axis))


def fsdp(axis: str = "data", min_size: int = 1024) -> tx.Plan:
    """ZeRO-3: parameters and optimizer state sharded over `axis`, gathered per use."""
    return tx.Plan(fsdp=tx.FSDP(axis, min_size=min_size))


def tp(axis: str = "model") -> tx.Plan:
    """Megatron tensor parallelism: q, k, v, gate and up column-parallel (`heads`,
    `kv_heads`, `mlp`), attention-out and down row-parallel, a vocabulary-parallel
    embedding and head (`vocab`)."""
    return tx.Plan(tp=tx.TP(axis, rules={name: axis for name in TP_RULES}))


def dp_tp(data: str = "data", model: str = "model") -> tx.Plan:
    """DP over `data` x Megatron TP over `model` (a 2-D mesh)."""
    return tx.Plan(dp=tx.DP(data), tp=tp(model).tp)


def fsdp_tp(data: str = "data", model: str = "model") -> tx.Plan:
    """FSDP over `data` x Megatron TP over `model`."""
    return tx.Plan(fsdp=tx.FSDP(data), tp=tp(model).tp)


PLANS = {"dp": dp, "fsdp": fsdp, "tp": tp, "dp_tp": dp_tp, "fsdp_tp": fsdp_tp}


def plan_for(*, dp_size: int = 1, tp_size: int = 1, fsdp_size: int = 1) -> tx.Plan:
    """The plan for a mesh of `data` (DP or FSDP) x `model` (TP) sizes.

    **Arguments:**

    - `dp_size`, `tp_size`, `fsdp_size`: the parallel degrees; DP and FSDP share the
        `data` axis, so at most one of them may exceed 1.

    **Returns:**

    A `tx.Plan` for a mesh `tx.make_mesh(data=..., model=...)`.
    """
    if dp_size > 1 and fsdp_size > 1:
        raise tx.PlanError(
            f"`plan_for` puts DP and FSDP on one `data` axis; got dp={dp_size} and "
            f"fsdp={fsdp_size}.",
            suggestion="Use one of them, or build a `tx.Plan` with two data axes.",
        )
    return tx.Plan(
        dp=tx.DP() if dp_size > 1 else None,
        fsdp=tx.FSDP() if fsdp_size > 1 else None,
        tp=tp().tp if tp_size > 1 else None,
    )
