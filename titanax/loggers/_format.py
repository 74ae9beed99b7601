"""Number and header formatting shared by the loggers."""

from __future__ import annotations

import math
from collections.abc import Mapping

# Metrics with a fixed place and format at the end of a log line, in this order.
SPECIAL_KEYS = (
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "step_time_s",
    "step_time_median_s",
    "step_time_p90_s",
    "mfu",
    "compile_time_s",
    "memory_gb",
    "memory_peak_gb",
)


def to_float(value: object) -> float | None:
    """`float(value)` for numbers and scalar arrays; `None` for anything else."""
    if isinstance(value, str | bytes):
        return None
    try:
        return float(value)  # pyright: ignore[reportArgumentType]
    except (TypeError, ValueError):
        return None


def format_loss(value: object) -> str:
    """Four decimals (`2.3456`); scientific when that would hide the digits."""
    x = to_float(value)
    if x is None:
        return str(value)
    if x == 0 or not math.isfinite(x) or 1e-3 <= abs(x) < 1e6:
        return f"{x:.4f}"
    return f"{x:.3e}"


def format_metric(name: str, value: object) -> str:
    """Losses as `format_loss`, integers as they are, other numbers to 4 digits."""
    if "loss" in name:
        return format_loss(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    x = to_float(value)
    return str(value) if x is None else f"{x:.4g}"


def format_rate(value: float) -> str:
    """`1234`, `12.3`, `0.5`: whole numbers once there are three digits."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds: `12.3`, or `0.0421` below a millisecond."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.3g}"


def format_value(value: object) -> str:
    """A header value on one line: mappings as `key value | key value`."""
    if isinstance(value, Mapping):
        return " | ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
