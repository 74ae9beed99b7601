"""Throughput and model-FLOPs utilisation from step timings."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .._errors import TrainerError

# Dense peak FLOP/s of ONE device (as JAX counts devices: a GPU, a TPU chip) per
# compute type, from the vendors' datasheets; no structured sparsity (the datasheets'
# starred figures are halved). `fp32` is the plain IEEE rate of the vector units;
# `tf32` is the tensor-core rate that NVIDIA GPUs use for float32 matmuls at JAX's
# default matmul precision. Google publishes only bf16 (and int8) figures for TPUs:
# their float32 matmuls at the default precision run as bf16 passes on the MXU, so
# MFU of a float32 TPU run is measured against the bf16 peak or not at all.
#
# Matched in order as case-insensitive substrings of `device.device_kind`, so the
# specific names come first ("H100 PCIe" before "H100", "v5 lite" before "v5").
#
# Sources (dense columns):
# - H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (2023, "H100 SXM",
#   "H100 NVL" per GPU, "H100 PCIe"): BF16 1,979 / 1,513 / 1,671 TFLOPS sparse;
#   TF32 989 / 756 / 835 sparse; FP32 67 / 51 / 60 TFLOPS.
# - H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet (2024): BF16 1,979 / 1,671
#   sparse; TF32 989 / 835 sparse; FP32 67 / 60.
# - A100 (SXM and PCIe, 40 and 80 GB): NVIDIA A100 datasheet: BF16 312 dense
#   (624 sparse); TF32 156 dense; FP32 19.5.
# - B200: NVIDIA Blackwell datasheet, HGX B200 column, per GPU: FP16/BF16 4.5
#   PFLOPS sparse, TF32 2.2 PFLOPS sparse, FP32 75 TFLOPS.
# - L4: NVIDIA L4 datasheet: BF16 242 sparse, TF32 120 sparse, FP32 30.3.
# - TPU v4 / v5e / v5p / v6e: Google Cloud TPU system architecture pages, "peak
#   compute per chip (bf16)": 275 / 197 / 459 / 918 TFLOPS.
_T = 1e12
PEAK_FLOPS: tuple[tuple[str, Mapping[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T}),
    ("H200", {"bf16": 989.5 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}),
    ("H100 PCIe", {"bf16": 756.5 * _T, "tf32": 378 * _T, "fp32": 51 * _T}),
    ("H100 NVL", {"bf16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T}),
    ("H100", {"bf16": 989.5 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}),  # SXM
    ("B200", {"bf16": 2250 * _T, "tf32": 1100 * _T, "fp32": 75 * _T}),
    ("A100", {"bf16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T}),
    ("L4", {"bf16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T}),
    ("TPU v6 lite", {"bf16": 918 * _T}),  # v6e (Trillium)
    ("TPU v6e", {"bf16": 918 * _T}),
    ("TPU v5 lite", {"bf16": 197 * _T}),  # v5e
    ("TPU v5e", {"bf16": 197 * _T}),
    ("TPU v5", {"bf16": 459 * _T}),  # v5p
    ("TPU v4", {"bf16": 275 * _T}),
)

# The dense bf16 column alone, as before `PEAK_FLOPS` existed (kept for callers).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = tuple(
    (name, peaks["bf16"]) for name, peaks in PEAK_FLOPS
)

# Accepted spellings of each compute type (`jnp.bfloat16` and friends too).
_DTYPE_NAMES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "bf16",  # the same tensor-core rate as bf16 on every GPU listed
    "float16": "bf16",
    "fp32": "fp32",
    "float32": "fp32",
    "tf32": "tf32",
}


def _compute_type(dtype: object) -> str:
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        try:
            name = np.dtype(dtype).name  # pyright: ignore[reportArgumentType,reportCallIssue]
        except TypeError:
            name = repr(dtype)
    if name not in _DTYPE_NAMES:
        raise TrainerError(
            f"Expected `dtype` to be one of 'bf16', 'fp16', 'fp32', 'tf32' (or a "
            f"bfloat16/float16/float32 dtype), got {dtype!r} instead.",
            suggestion="Pass the dtype the step's matmuls run in, e.g. "
            "`dtype='bf16'` for `tx.Precision.bf16()`.",
        )
    return _DTYPE_NAMES[name]


def peak_flops_per_device(device: Any = None, dtype: object = "bf16") -> float | None:
    """The dense peak FLOP/s of one device for one compute type, for MFU.

    **Arguments:**

    - `device`: a `jax.Device`; `None` means `jax.devices()[0]`.
    - `dtype`: the type the matmuls run in: `"bf16"` (default; `"fp16"` is the same
        rate), `"fp32"` (IEEE float32 on the vector units), `"tf32"` (NVIDIA tensor
        cores: what float32 matmuls use at JAX's default precision on A100 and
        newer), or a `jnp.bfloat16` / `jnp.float16` / `jnp.float32` dtype.

    **Returns:**

    FLOP/s (e.g. `989.5e12` for an H100 SXM in bf16), or `None` for CPUs, devices not
    in the table (`PEAK_FLOPS`) and types a vendor publishes no figure for (float32
    on TPUs): pass `peak_flops` to `Meter` yourself then.

    !!! Example

        ```python
        peak = tx.loggers.peak_flops_per_device(dtype="bf16")
        if peak is not None:
            meter = tx.loggers.Meter(flops_per_step=f, peak_flops=peak * n_devices)
        ```
    """
    kind = _compute_type(dtype)
    if device is None:
        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    device_kind = str(getattr(device, "device_kind", "")).lower()
    for name, peaks in PEAK_FLOPS:
        if name.lower() in device_kind:
            return peaks.get(kind)
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
