"""The versions of Titanax and the libraries it runs on: one table, shown in run
headers and `titanax info`, and recorded in checkpoint metadata."""

from __future__ import annotations

import importlib.metadata

__all__ = ["DISTRIBUTIONS", "versions"]

# Distributions whose versions are shown and recorded, in this order.
DISTRIBUTIONS = ("titanax", "jax", "jaxlib", "equinox", "optax", "orbax-checkpoint")


def versions() -> dict[str, str]:
    """The installed versions of Titanax and the libraries it runs on.

    **Returns:**

    `{"titanax": "0.1.0", "jax": "0.10.2", ...}` for titanax, jax, jaxlib, equinox,
    optax and orbax-checkpoint. Titanax run from a source tree that is not installed
    shows `"dev"`; other packages that are not installed are left out.
    """
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "titanax":
                out[name] = "dev"
    return out
