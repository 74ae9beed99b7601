"""The host allocator: stop glibc from returning XLA:CPU's scratch memory every step.

XLA:CPU allocates each step's temporary buffer (tens of MiB for a small GPT) with
`malloc` and frees it at the end of the step. glibc serves allocations that large
with `mmap` and unmaps them on `free` (or trims them off the heap), so every step
page-faults the whole buffer back in: measured 19k minor faults and ~39 ms of system
time per step of a 4-layer GPT on CPU, more than the matmuls. The step also runs on
a thread of XLA's pool, whose malloc arenas are capped at 64 MiB, so a larger buffer
is mmapped whatever the thresholds are unless every thread shares the main arena.

`configure_allocator` sets glibc's thresholds with `mallopt` from inside the process
(the same settings as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:
glibc.malloc.trim_threshold=...:glibc.malloc.arena_max=1`, which must be set before
the process starts). The memory then stays mapped and is reused step after step;
the process's resident size stays at its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

from ._errors import TitanaxError

__all__ = ["configure_allocator"]

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only (musl has no such function)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def backend_started() -> bool:
    """Whether JAX has started its backends (and with them XLA's threads) in this
    process: after that, `configure_allocator` comes too late to apply fully."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from ._compat import backends_initialized

    return backends_initialized()


def configure_allocator(
    *,
    mmap_threshold: int = 1 << 30,
    trim_threshold: int = _INT_MAX,
    arena_max: int | None = 1,
) -> dict[str, int]:
    """Keep XLA:CPU's per-step scratch memory mapped: no page faults per step.

    Call it first thing in a training script, before JAX computes anything (before
    `tx.simulate_cpu_devices` is fine). It tells glibc's `malloc` (via `mallopt`) to
    serve blocks below `mmap_threshold` from the heap rather than with `mmap`, to
    return free heap memory to the OS only above `trim_threshold`, and to give all
    threads at most `arena_max` arenas (other arenas are capped at 64 MiB, too small
    for a large step's buffer). It only matters on CPU backends; on GPUs the
    device memory is XLA's own.

    Measured on the 4-layer `baby` GPT (2-core CPU, benchmarks/RESULTS.md): minor
    faults per step 18k -> 0. Elsewhere than glibc on Linux (macOS, musl) it does
    nothing and returns `{}`.

    **Arguments:**

    - `mmap_threshold`: bytes; larger blocks are still mmapped (at most 2**31 - 1).
    - `trim_threshold`: bytes of free memory at the heap's top kept before trimming.
    - `arena_max`: the number of malloc arenas, or `None` to leave it alone.

    **Returns:**

    The settings glibc accepted, by `GLIBC_TUNABLES` name (e.g.
    `{"mmap_threshold": 1073741824, ...}`); empty where there is no glibc.

    **Warns:** if JAX's backend has already started (its threads may keep their own
    arenas), or if glibc refuses a setting.

    !!! Example

        ```python
        import titanax as tx

        tx.configure_allocator()  # first: before JAX starts its backend
        tx.simulate_cpu_devices(8)
        ```
    """
    wanted = {
        "mmap_threshold": (_M_MMAP_THRESHOLD, mmap_threshold),
        "trim_threshold": (_M_TRIM_THRESHOLD, trim_threshold),
    }
    if arena_max is not None:
        wanted["arena_max"] = (_M_ARENA_MAX, arena_max)
    for name, (_, value) in wanted.items():
        if not 0 < value <= _INT_MAX:
            raise TitanaxError(
                f"Expected `{name}` in [1, 2**31 - 1] bytes (mallopt takes a C int), "
                f"got {value}.",
                suggestion=f"Pass e.g. `{name}=1 << 30`.",
            )
    libc = _libc()
    if libc is None:
        return {}
    if backend_started():
        warnings.warn(
            "`configure_allocator` was called after JAX started its backend; "
            "threads that already allocated keep their own malloc arenas. Call it "
            "first thing in the script.",
            stacklevel=2,
        )
    applied = {}
    for name, (param, value) in wanted.items():
        if libc.mallopt(param, value) == 1:
            applied[name] = value
        else:
            warnings.warn(f"glibc refused mallopt {name}={value}.", stacklevel=2)
    return applied
