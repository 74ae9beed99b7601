"""The versions of Titanax and the libraries it runs on: one table, shown in run
headers and `titanax info`, and recorded in checkpoint metadata; and the range of
versions the test suite passes on."""

from __future__ import annotations

import importlib.metadata
import re

__all__ = ["DISTRIBUTIONS", "TESTED", "version_rows", "versions"]

# Distributions whose versions are shown and recorded, in this order.
DISTRIBUTIONS = ("titanax", "jax", "jaxlib", "equinox", "optax", "orbax-checkpoint")

# (oldest, newest) release of each runtime dependency the whole test suite passed on.
# The oldest set is `make test-min` (ci/min-versions.txt, pyproject.toml's lower
# bounds); the newest is `make test` when the table was last updated. The README's
# table states the same (tests/test_versions.py keeps the four in step).
TESTED: dict[str, tuple[str, str]] = {
    "jax": ("0.7.2", "0.10.2"),
    "jaxlib": ("0.7.2", "0.10.2"),
    "equinox": ("0.13.1", "0.13.8"),
    "optax": ("0.2.5", "0.2.8"),
    "orbax-checkpoint": ("0.11.17", "0.12.8"),
    "jaxtyping": ("0.3.2", "0.3.11"),
    "grain": ("0.2.18", "0.2.18"),
    "numpy": ("2.0.2", "2.4.6"),
    "tqdm": ("4.66.0", "4.70.1"),
    "pyyaml": ("6.0", "6.0.4"),
    "draccus": ("0.11.6", "0.11.6"),
    "jsonschema": ("4.23.0", "4.26.0"),
    "safetensors": ("0.4.0", "0.8.0"),
}


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


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: `"0.12.8rc1"` -> `(0, 12, 8)`."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def version_rows() -> list[tuple[str, str, str, str]]:
    """One row per package: what is installed against the tested range.

    **Returns:**

    `(package, installed, tested, note)` rows: Titanax and its runtime dependencies
    (`TESTED`), `installed` is `"-"` for a package that is not installed, `tested`
    reads `"0.7.2 - 0.10.2"`, and `note` is `""` inside the range, `"older than
    tested"` or `"newer than tested"` outside it.

    !!! Example

        ```python
        for name, installed, tested, note in version_rows():
            print(f"{name:18} {installed:10} {tested:18} {note}")
        ```
    """
    installed = versions()
    rows = [("titanax", installed["titanax"], "", "")]
    for name, (oldest, newest) in TESTED.items():
        try:
            have = installed.get(name) or importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "-", f"{oldest} - {newest}", "not installed"))
            continue
        rows.append((name, have, f"{oldest} - {newest}", _note(have, oldest, newest)))
    return rows


def _note(have: str, oldest: str, newest: str) -> str:
    if _release(have) < _release(oldest):
        return "older than tested"
    if _release(have) > _release(newest):
        return "newer than tested"
    return ""
