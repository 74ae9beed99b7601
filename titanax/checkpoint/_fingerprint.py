"""Fingerprints of array values that do not depend on how the array is sharded.

Orbax 0.12.8 stores array chunks without a checksum (its zarr3 layout checksums only
the shard index, and exposes no option to add TensorStore's `crc32c` codec to the
chunks), so flipped bits in a data file restore as wrong numbers without an error.
Titanax therefore records a fingerprint of every array in the step's JSON metadata
when it saves, and compares it with the values read back.

A fingerprint is two 32-bit sums over the array's elements, taken as unsigned words
(`float32` as `uint32`, `bfloat16` as `uint16`, ...), each mixed with its flat
C-order index `i`:

    m_i = 0x9E3779B1 * i + 0x7F4A7C15     mod 2**32 (a Weyl sequence)
    a   = sum_i word_i * (m_i | 1)        mod 2**32
    b   = sum_i fmix32(word_i ^ m_i)      mod 2**32 (MurmurHash3's finaliser)

Sums commute, so each device reduces its own shard and the partial sums add up:
the value is the same whatever the sharding (on the devices, with `jax.jit`) or the
chunking (on the host, with numpy). `a` catches any change to a single element for
certain (an odd multiplier is invertible mod 2**32); `b` makes a coincidence of
several changes a ~2**-64 event. It is not a cryptographic hash: it guards against
bit rot and truncation, not against someone forging a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["fingerprint", "fingerprint_host", "fingerprints"]

_WEYL = (0x9E3779B1, 0x7F4A7C15)  # odd multiplier, offset
_HOST_BLOCK = 1 << 20  # words per numpy block: bounds the host's temporary memory
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _format(a: int, b: int) -> str:
    return f"{a & 0xFFFFFFFF:08x}{b & 0xFFFFFFFF:08x}"


# --- on the devices -----------------------------------------------------------------


def _fmix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """`x` as unsigned 32-bit words: same shape, or a trailing 2 for 8-byte items."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2): low word first
    return lax.bitcast_convert_type(x, jnp.dtype(_UINT[size])).astype(jnp.uint32)


def _device_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    words = _words(x)
    # m_i from one iota per dim (the multiplier folded into the strides): no
    # reshape to a flat index, so no resharding.
    mixed = jnp.full(words.shape, _WEYL[1], jnp.uint32)
    stride = 1
    for dim in reversed(range(words.ndim)):
        iota = lax.broadcasted_iota(jnp.uint32, words.shape, dim)
        mixed = mixed + iota * jnp.uint32((stride * _WEYL[0]) & 0xFFFFFFFF)
        stride *= words.shape[dim]
    a = jnp.sum(words * (mixed | jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_fmix(words ^ mixed), dtype=jnp.uint32)
    return a, b


# One compiled program per array shape, dtype and sharding (a model repeats a few
# shapes many times), not one per state: a program reducing every leaf of a large
# state at once took seconds to compile, and again for each new leaf order.
_device_fingerprint_jit = jax.jit(_device_fingerprint)


def fingerprints(arrays: Sequence[Any]) -> list[str]:
    """The fingerprint of each array, as 16 hex digits, computed where it lives.

    `jax.Array`s are reduced on their own devices (all dispatched, then one
    transfer of the sums); anything else goes through numpy. Waits for the
    arrays' values.

    **Arguments:**

    - `arrays`: `jax.Array`s (sharded or not) and/or numpy arrays.

    **Returns:** one string per array, in order; equal to `fingerprint_host` of
    the same values.
    """
    pending = {
        n: _device_fingerprint_jit(x)
        for n, x in enumerate(arrays)
        if isinstance(x, jax.Array)
    }
    sums = jax.device_get(pending)
    return [
        _format(int(sums[n][0]), int(sums[n][1]))
        if n in sums
        else fingerprint_host(np.asarray(x))
        for n, x in enumerate(arrays)
    ]


def fingerprint(x: Any) -> str:
    """The fingerprint of one array (see `fingerprints`)."""
    return fingerprints([x])[0]


# --- on the host --------------------------------------------------------------------


def _host_fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _host_words(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if np.iscomplexobj(x):
        x = np.stack([np.real(x), np.imag(x)], axis=-1)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    size = x.dtype.itemsize
    if size == 8:
        return x.reshape(-1).view(np.uint32)  # little-endian: low word first
    return x.reshape(-1).view(_UINT[size])


def fingerprint_host(x: np.ndarray) -> str:
    """The fingerprint of a host array, in blocks of 2**20 words (bounded memory).

    **Arguments:**

    - `x`: a numpy array (any shape; numeric, bool or complex dtype).

    **Returns:** 16 hex digits, equal to `fingerprints([x])` on any devices.
    """
    words = _host_words(np.asarray(x))
    a = b = 0
    for start in range(0, words.size, _HOST_BLOCK):
        block = words[start : start + _HOST_BLOCK].astype(np.uint32)
        # (start + k) mod 2**32: the index wraps exactly like uint32 on the device.
        index = (np.arange(block.size, dtype=np.uint64) + start) & 0xFFFFFFFF
        mixed = index.astype(np.uint32) * np.uint32(_WEYL[0]) + np.uint32(_WEYL[1])
        a += int(np.add.reduce(block * (mixed | np.uint32(1)), dtype=np.uint32))
        b += int(np.add.reduce(_host_fmix(block ^ mixed), dtype=np.uint32))
    return _format(a, b)
