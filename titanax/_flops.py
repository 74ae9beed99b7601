"""FLOPs of a computation, for MFU: XLA's cost analysis, checked against a count of
the matrix multiplications in the traced program.

XLA's CPU backend counts every operation. Its GPU backend does not count the
matmuls it hands to cuBLAS as custom calls (measured on an H200: a GPT-2 step's
analysis gave ~2e11 FLOPs for ~1.4e13 of matmuls), so a count below the program's
own matmul FLOPs is replaced by that count.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from ._compat import compiled_cost, is_jaxpr, shard_map_manual_axes

__all__ = ["matmul_flops", "step_flops", "xla_flops"]


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    contract = math.prod(lhs[d] for d in lhs_contract)
    batch = math.prod(lhs[d] for d in lhs_batch)
    lhs_free = math.prod(lhs) // max(contract * batch, 1)
    rhs_free = math.prod(rhs) // max(contract * batch, 1)
    return 2.0 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn: Any) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    # Each output element is a dot over (in features / groups) x kernel window.
    groups = eqn.params.get("feature_group_count", 1)
    kernel = math.prod(rhs) // max(rhs[0], 1)  # in_features/groups x window
    del lhs, groups
    return 2.0 * math.prod(out) * kernel


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, float]]:
    """The jaxprs inside an equation, with how many times each runs."""
    out = []
    times = float(eqn.params.get("length", 1))  # a scan's iterations
    if eqn.primitive.name == "shard_map":
        # The body sees one device's shards: it runs once per device of the
        # axes it is manual over.
        mesh = eqn.params["mesh"]
        manual = shard_map_manual_axes(eqn.params)
        times = float(math.prod(mesh.shape[a] for a in manual))
    for name, value in eqn.params.items():
        values = value if isinstance(value, tuple | list) else (value,)
        for v in values:
            jaxpr = getattr(v, "jaxpr", v)
            if is_jaxpr(jaxpr):
                out.append((jaxpr, times if name == "jaxpr" else 1.0))
    if eqn.primitive.name == "cond":  # one branch runs: count the largest
        branches = [(b.jaxpr, 1.0) for b in eqn.params["branches"]]
        return [max(branches, key=lambda jt: _count(jt[0]))] if branches else []
    return out


def _count(jaxpr: Any) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        for sub, times in _sub_jaxprs(eqn):
            total += times * _count(sub)
    return total


def matmul_flops(fn: Any, *args: Any) -> float:
    """FLOPs of the matrix multiplications and convolutions `fn(*args)` traces to
    (2 per multiply-add; scans counted per iteration), over the whole (global)
    arrays. `args` may be `jax.ShapeDtypeStruct`s."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program, per device (None if unknown)."""
    flops = compiled_cost(compiled).get("flops")  # {} without a cost analysis
    return flops if flops and flops > 0 else None


def step_flops(
    compiled: Any, fn: Any, args: tuple[Any, ...], devices: int
) -> float | None:
    """FLOPs of one run of a compiled program over all `devices`: XLA's count
    (per device, times the devices), or the traced matmul count where XLA's is
    lower (backends that hide matmuls in library calls)."""
    per_device = xla_flops(compiled)
    counted = per_device * devices if per_device is not None else None
    matmuls = matmul_flops(fn, *args)
    if counted is None or counted < matmuls:
        return matmuls if matmuls > 0 else counted
    return counted
