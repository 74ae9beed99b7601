"""Throughput and model-FLOPs utilisation from step timings."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax

from .._errors import TrainerError

# Dense bf16 peak FLOP/s per device, from vendor datasheets. Matched in order as
# case-insensitive substrings of `device.device_kind`, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device: Any = None) -> float | None:
    """The dense bf16 peak FLOP/s of one device, for MFU.

    **Arguments:**

    - `device`: a `jax.Device`; `None` means `jax.devices()[0]`.

    **Returns:**

    FLOP/s (e.g. `989e12` for an H100 SXM), or `None` for CPUs and devices not in
    the table (`PEAK_BF16_FLOPS`): pass `peak_flops` to `Meter` yourself then.
    """
    if device is None:
        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind:
            return flops
    return None


def _check_positive(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise TrainerError(
            f"Expected `{name}` to be a number > 0 or None, got {value!r} instead.",
            suggestion=f"Pass a positive `{name}`, or leave it out.",
        )


@dataclasses.dataclass(frozen=True)
class Meter:
    """Turns "`n` steps took `t` seconds" into throughput and MFU.

    **Arguments:**

    - `batch_size`: samples per optimizer step, over all devices (the global batch).
    - `tokens_per_sample`: tokens per sample (the sequence length), for `tokens_per_s`.
    - `flops_per_step`: model FLOPs of one optimizer step (forward and backward),
        over all devices, for `mfu`.
    - `peak_flops`: the peak FLOP/s of all the devices that run the step, e.g.
        `peak_flops_per_device() * jax.device_count()`, for `mfu`.

    !!! Example

        ```python
        meter = tx.loggers.Meter(batch_size=32, tokens_per_sample=64)
        meter.update(10, 2.0)
        # {"step_time_s": 0.2, "samples_per_s": 160.0, "tokens_per_s": 10240.0}
        ```
    """

    batch_size: int | None = None
    tokens_per_sample: int | None = None
    flops_per_step: float | None = None
    peak_flops: float | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_positive(getattr(self, field.name), field.name)

    def update(self, n_steps: int, elapsed_s: float) -> dict[str, float]:
        """The rates over `n_steps` steps that took `elapsed_s` seconds.

        **Arguments:**

        - `n_steps`: how many optimizer steps were timed (at least 1).
        - `elapsed_s`: their wall-clock time in seconds (> 0).

        **Returns:**

        A dict with `step_time_s`, and `samples_per_s` (with `batch_size`),
        `tokens_per_s` (with `batch_size` and `tokens_per_sample`) and `mfu` (with
        `flops_per_step` and `peak_flops`, as a fraction of 1).
        """
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise TrainerError(
                f"Expected `n_steps` to be an integer >= 1, got {n_steps!r} instead.",
                suggestion="Time at least one step before calling `update`.",
            )
        _check_positive(elapsed_s, "elapsed_s")
        elapsed_s = float(elapsed_s)
        out = {"step_time_s": elapsed_s / n_steps}
        if self.batch_size is not None:
            out["samples_per_s"] = self.batch_size * n_steps / elapsed_s
            if self.tokens_per_sample is not None:
                out["tokens_per_s"] = out["samples_per_s"] * self.tokens_per_sample
        if self.flops_per_step is not None and self.peak_flops is not None:
            achieved = self.flops_per_step * n_steps / elapsed_s
            out["mfu"] = achieved / self.peak_flops
        return out
