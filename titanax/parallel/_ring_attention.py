"""Causal ring attention over a mesh axis, per device, with the zigzag split.

The functions here run *inside* `jax.shard_map` (one device's view); the
`tx.Activations` hook (`_activations.py`) maps them over a plan's mesh.

**The zigzag split.** The sequence is cut into `2N` chunks of `c` positions (`N` the
size of the context axis); device `d` holds chunks `d` and `2N-1-d`, in that order.
Under a causal mask a contiguous split would give the last device N times the work
of the first; with the zigzag split every device does the same work. The data
arrives contiguous (device `d` holds chunks `2d` and `2d+1`); `to_zigzag` and
`from_zigzag` move half-chunks with two `ppermute`s each.

**The ring.** Each device keeps its queries; keys and values go around the ring, one
neighbour exchange per step. At step `s` device `d` holds the keys and values of
device `src = d - s (mod N)`:

- `s = 0` (its own): causal attention within its `2c` positions (both chunks
  increase in position, so the local causal mask is the global one).
- `src < d` (`s <= d`): every local query is after the first chunk `src` and before
  the second `2N-1-src`: all `2c` queries see the first `c` keys, unmasked.
- `src > d`: only the second query chunk `2N-1-d` is after both key chunks: the last
  `c` queries see all `2c` keys, unmasked.

So each step after the first is a `2c x c` block of scores on every device: equal
work. Partial results are combined with the online softmax (running max `m`, sum
`l`, unnormalised output `o`, all float32).

**The backward pass** is written out (`jax.custom_vjp`), flash-attention style: the
forward saves only its inputs, its output and the log-sum-exp per query; the backward
runs the ring again, recomputing each block's probabilities, with the gradients of
the keys and values travelling with them and sent home by one last exchange.
Autodiff of the forward loop would instead keep every step's keys, values and
probabilities: the whole sequence's keys and values and `2c x T` probabilities per
device, which is what context parallelism exists to avoid.

**Traffic per call**, with `S` the bytes of one device's keys *and* values and `S32`
the same in float32: forward `(N-1) S` (keys and values once around the ring),
backward `(N-1) S + N S32` (once more around, plus their gradients all the way home).
The all-gather variant moves the same bytes in one all-gather (forward and backward)
and one reduce-scatter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "context_attention",
    "from_zigzag",
    "ring_traffic_bytes",
    "to_zigzag",
    "zigzag_positions",
]

_F32 = jnp.float32


# --- the zigzag order -------------------------------------------------------------


def zigzag_positions(length: int, n: int) -> np.ndarray:
    """The position of each element of a zigzag-ordered sequence.

    **Arguments:**

    - `length`: the sequence length `T`, a multiple of `2n`.
    - `n`: the number of devices along the context axis.

    **Returns:** an int32 numpy array `(T,)`: for device `d` (in order), the
    positions of chunks `d` and `2n-1-d`.
    """
    chunks = np.arange(length, dtype=np.int32).reshape(2 * n, length // (2 * n))
    order = [c for d in range(n) for c in (d, 2 * n - 1 - d)]
    return chunks[order].reshape(length)


def _chunk_home(j: int, n: int) -> int:
    """The device that holds chunk `j` of `2n` in zigzag order."""
    return j if j < n else 2 * n - 1 - j


def _halves(x: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    c = x.shape[dim] // 2
    return (
        jax.lax.slice_in_dim(x, 0, c, axis=dim),
        jax.lax.slice_in_dim(x, c, 2 * c, axis=dim),
    )


def to_zigzag(x: jax.Array, axis: str, n: int, dim: int) -> jax.Array:
    """Contiguous → zigzag, per device: chunks `(2d, 2d+1)` → `(d, 2n-1-d)`.

    Two `ppermute`s of half the local block: even chunks to their zigzag home, odd
    chunks to theirs. Chunks `d` and `2n-1-d` have opposite parities, so each device
    receives one of each and puts the one numbered `d` first.
    """
    if n == 1:
        return x
    even, odd = _halves(x, dim)
    got_even = jax.lax.ppermute(
        even, axis, [(i, _chunk_home(2 * i, n)) for i in range(n)]
    )
    got_odd = jax.lax.ppermute(
        odd, axis, [(i, _chunk_home(2 * i + 1, n)) for i in range(n)]
    )
    d_even = jax.lax.axis_index(axis) % 2 == 0
    first = jnp.where(d_even, got_even, got_odd)
    second = jnp.where(d_even, got_odd, got_even)
    return jnp.concatenate([first, second], axis=dim)


def from_zigzag(x: jax.Array, axis: str, n: int, dim: int) -> jax.Array:
    """Zigzag → contiguous, per device: the inverse of `to_zigzag`."""
    if n == 1:
        return x
    first, second = _halves(x, dim)
    d_even = jax.lax.axis_index(axis) % 2 == 0
    even = jnp.where(d_even, first, second)
    odd = jnp.where(d_even, second, first)
    got_even = jax.lax.ppermute(
        even, axis, [(_chunk_home(2 * i, n), i) for i in range(n)]
    )
    got_odd = jax.lax.ppermute(
        odd, axis, [(_chunk_home(2 * i + 1, n), i) for i in range(n)]
    )
    return jnp.concatenate([got_even, got_odd], axis=dim)


# --- one block of attention -----------------------------------------------------------
#
# Layout inside the kernel: queries (B, Sq, K, G, D) with K key/value heads and G
# query heads per key/value head (grouped-query attention; G = 1 for multi-head),
# keys and values (B, Sk, K, D); statistics (B, K, G, Sq).


class _Partial(NamedTuple):
    """Online-softmax state for some queries: unnormalised output `o`
    (B, Sq, K, G, D), running max `m` and sum `l` (B, K, G, Sq); float32."""

    o: jax.Array
    m: jax.Array
    l: jax.Array  # noqa: E741


def _scores(q: jax.Array, k: jax.Array, scale: float, causal: bool) -> jax.Array:
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=_F32) * scale
    if causal:
        mask = jnp.tril(jnp.ones((s.shape[-2], s.shape[-1]), bool))
        s = jnp.where(mask, s, -jnp.inf)
    return s  # (B, K, G, Sq, Sk)


def _rows(stat: jax.Array) -> jax.Array:
    """(B, K, G, Sq) → (B, Sq, K, G, 1), to scale outputs per query."""
    return jnp.moveaxis(stat, -1, 1)[..., None]


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, causal: bool
) -> _Partial:
    s = _scores(q, k, scale, causal)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=_F32)
    return _Partial(o, m, jnp.sum(p, axis=-1))


def _merge(a: _Partial, b: _Partial) -> _Partial:
    m = jnp.maximum(a.m, b.m)
    wa, wb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return _Partial(a.o * _rows(wa) + b.o * _rows(wb), m, wa * a.l + wb * b.l)


def _query_slice(p: _Partial, start: int, stop: int) -> _Partial:
    return _Partial(p.o[:, start:stop], p.m[..., start:stop], p.l[..., start:stop])


def _query_concat(a: _Partial, b: _Partial) -> _Partial:
    return _Partial(
        jnp.concatenate([a.o, b.o], axis=1),
        jnp.concatenate([a.m, b.m], axis=-1),
        jnp.concatenate([a.l, b.l], axis=-1),
    )


class _Grads(NamedTuple):
    dq: jax.Array
    dk: jax.Array
    dv: jax.Array


def _block_grads(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    scale: float,
    causal: bool,
) -> _Grads:
    """Gradients of one block, its probabilities recomputed from the saved
    log-sum-exp `lse` (B, K, G, Sq); `delta` = rowsum(dO * O), float32."""
    p = jnp.exp(_scores(q, k, scale, causal) - lse[..., None])  # (B, K, G, Sq, Sk)
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p, do, preferred_element_type=_F32)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do, v, preferred_element_type=_F32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k, preferred_element_type=_F32) * scale
    dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q, preferred_element_type=_F32) * scale
    return _Grads(dq, dk, dv)


# --- the ring -------------------------------------------------------------------------


def _shift(x: Any, axis: str, n: int) -> Any:
    """Device i sends to device i + 1 (mod n): one ring step."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


class _Ring(NamedTuple):
    """Static parameters of one kernel."""

    axis: str
    n: int
    scale: float
    gather: bool  # all-gather the keys and values instead of passing them round


def _source_block(kv: Any, gathered: Any, step: int, ring: _Ring, d: jax.Array) -> Any:
    """The keys/values (or their gradients' slots) of device `d - step` at `step`:
    passed one step on (ring), or sliced out of the gathered whole (all-gather)."""
    if not ring.gather:
        return _shift(kv, ring.axis, ring.n)
    size = jax.tree.leaves(kv)[0].shape[1]
    start = ((d - step) % ring.n) * size
    return jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), gathered
    )


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, ring: _Ring
) -> tuple[jax.Array, jax.Array]:
    """Per device: output (B, S, K, G, D) in float32 and log-sum-exp (B, K, G, S)."""
    c = q.shape[1] // 2
    d = jax.lax.axis_index(ring.axis)
    gathered = None
    if ring.gather and ring.n > 1:
        gathered = jax.lax.all_gather((k, v), ring.axis, axis=1, tiled=True)
    acc = _attend(q, k, v, ring.scale, causal=True)
    kv = (k, v)
    for step in range(1, ring.n):
        kv = _source_block(kv, gathered, step, ring, d)

        def earlier(acc: _Partial, kk: jax.Array, vv: jax.Array) -> _Partial:
            # An earlier device's keys: all queries see their first chunk.
            return _merge(acc, _attend(q, kk[:, :c], vv[:, :c], ring.scale, False))

        def later(acc: _Partial, kk: jax.Array, vv: jax.Array) -> _Partial:
            # A later device's keys: only the last chunk of queries, all keys.
            part = _attend(q[:, c:], kk, vv, ring.scale, False)
            second = _merge(_query_slice(acc, c, 2 * c), part)
            return _query_concat(_query_slice(acc, 0, c), second)

        acc = jax.lax.cond(step <= d, earlier, later, acc, *kv)
    out = acc.o / _rows(acc.l)
    return out, acc.m + jnp.log(acc.l)


def _pad_seq(x: jax.Array, before: int, after: int) -> jax.Array:
    """Zeros before and after along the sequence dim (1)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (before, after)
    return jnp.pad(x, pad)


def _backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    ring: _Ring,
) -> _Grads:
    """Per device: float32 gradients of the local queries, keys and values."""
    c = q.shape[1] // 2
    d = jax.lax.axis_index(ring.axis)
    do = do.astype(_F32)
    delta = jnp.moveaxis(jnp.sum(do * out, axis=-1), 1, -1)  # (B, K, G, S)
    dq, dk, dv = _block_grads(q, k, v, do, lse, delta, ring.scale, causal=True)
    if ring.n == 1:
        return _Grads(dq, dk, dv)
    gathered = None
    if ring.gather:
        gathered = jax.lax.all_gather((k, v), ring.axis, axis=1, tiled=True)
    # All-gather: each step's key/value gradients, summed over devices at the end.
    dk_steps, dv_steps = [dk], [dv]
    kv = (k, v)
    for step in range(1, ring.n):
        if ring.gather:
            kv = _source_block(kv, gathered, step, ring, d)
        else:  # the gradients travel with their keys and values
            kv, dk, dv = _shift((kv, dk, dv), ring.axis, ring.n)

        def earlier(dq, kk, vv):
            g = _block_grads(q, kk[:, :c], vv[:, :c], do, lse, delta, ring.scale, False)
            return dq + g.dq, _pad_seq(g.dk, 0, c), _pad_seq(g.dv, 0, c)

        def later(dq, kk, vv):
            g = _block_grads(
                q[:, c:], kk, vv, do[:, c:], lse[..., c:], delta[..., c:],
                ring.scale, False,
            )  # fmt: skip
            return dq + _pad_seq(g.dq, c, 0), g.dk, g.dv

        dq, gk, gv = jax.lax.cond(step <= d, earlier, later, dq, *kv)
        if ring.gather:
            dk_steps.append(gk)
            dv_steps.append(gv)
        else:
            dk, dv = dk + gk, dv + gv
    if not ring.gather:
        dk, dv = _shift((dk, dv), ring.axis, ring.n)  # home
        return _Grads(dq, dk, dv)
    # Slot j of the gathered order holds device j's keys: step (d - j) mod n.
    order = (d - jnp.arange(ring.n)) % ring.n

    def by_device(steps: list[jax.Array]) -> jax.Array:
        stacked = jnp.stack(steps)[order]  # (n, B, S, K, D), device order
        whole = jnp.concatenate(list(stacked), axis=1)  # (B, n*S, K, D)
        return jax.lax.psum_scatter(whole, ring.axis, scatter_dimension=1, tiled=True)

    return _Grads(dq, by_device(dk_steps), by_device(dv_steps))


@functools.cache
def _kernel(ring: _Ring) -> Callable[..., jax.Array]:
    """The per-device attention for `ring`, with its hand-written backward pass."""

    @jax.custom_vjp
    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return _forward(q, k, v, ring)[0].astype(q.dtype)

    def fwd(q, k, v):
        out, lse = _forward(q, k, v, ring)
        return out.astype(q.dtype), (q, k, v, out, lse)

    def bwd(res, do):
        q, k, v, out, lse = res
        g = _backward(q, k, v, out, lse, do, ring)
        return g.dq.astype(q.dtype), g.dk.astype(k.dtype), g.dv.astype(v.dtype)

    attend.defvjp(fwd, bwd)
    return attend


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: str,
    n: int,
    gather: bool = False,
) -> jax.Array:
    """Causal attention of zigzag-ordered sequence shards, per device.

    Call inside `jax.shard_map` with `axis` manual.

    **Arguments:**

    - `q`: this device's queries `(B, S, H, D)`, `S = 2c` positions in zigzag order.
    - `k`, `v`: its keys and values `(B, S, K, D)`, `K` dividing `H`.
    - `axis`, `n`: the context mesh axis and its size.
    - `gather`: all-gather the keys and values instead of passing them round.

    **Returns:** the attended values `(B, S, H, D)`, in `q`'s dtype.
    """
    B, S, H, D = q.shape
    K = k.shape[2]
    ring = _Ring(axis, n, 1.0 / math.sqrt(D), gather)
    q5 = q.reshape(B, S, K, H // K, D)  # (B, S, K, G, D): heads grouped by kv head
    return _kernel(ring)(q5, k, v).reshape(B, S, H, D)


def ring_traffic_bytes(kv_bytes: int, n: int, float32_bytes: int | None = None) -> int:
    """Bytes one device sends per attention call, forward and backward, with the
    ring: `(N-1) S` forward, `(N-1) S + N S32` backward (see the module docstring).

    **Arguments:**

    - `kv_bytes`: `S`, one device's keys and values together, in bytes.
    - `n`: the ring size `N`.
    - `float32_bytes`: `S32`, the same in float32 (default: `kv_bytes`).

    **Returns:** the bytes, an int.
    """
    s32 = kv_bytes if float32_bytes is None else float32_bytes
    return 2 * (n - 1) * kv_bytes + (n * s32 if n > 1 else 0)
