"""Throughput and model-FLOPs utilisation from step timings."""

from __future__ import annotations

import collections
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .._compat import memory_stats
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


def device_memory(devices: Any = None) -> dict[str, float]:
    """Device memory in use and its peak, in GB (1e9 bytes), where the backend
    reports it (GPUs and TPUs do; the CPU backend does not).

    **Arguments:**

    - `devices`: the devices to read; default `jax.local_devices()`.

    **Returns:** `{"memory_gb": ..., "memory_peak_gb": ...}`, the largest over the
    devices, or `{}` when no device reports memory.
    """
    in_use, peak = [], []
    for device in jax.local_devices() if devices is None else devices:
        stats = memory_stats(device)
        if not stats:
            continue
        if "bytes_in_use" in stats:
            in_use.append(stats["bytes_in_use"])
        if "peak_bytes_in_use" in stats:
            peak.append(stats["peak_bytes_in_use"])
    out = {}
    if in_use:
        out["memory_gb"] = max(in_use) / 1e9
    if peak:
        out["memory_peak_gb"] = max(peak) / 1e9
    return out


class Meter:
    """Turns "`n` steps took `t` seconds" into throughput, MFU and step-time
    statistics over a rolling window.

    The trainer calls `update(n_steps, elapsed_s)` at each log step with the steps
    since the last one (never the compiling first step: report that with
    `record_compile`). Rates are the rolling totals over the last `window` steps,
    not the last interval alone; `step_time_median_s` and `step_time_p90_s` are
    over the same window, each step counted at its interval's mean.

    **Arguments:**

    - `batch_size`: samples per optimizer step, over all devices (the global batch).
    - `tokens_per_sample`: tokens per sample (the sequence length), for `tokens_per_s`.
    - `flops_per_step`: model FLOPs of one optimizer step (forward and backward),
        over all devices, for `mfu`.
    - `peak_flops`: the peak FLOP/s of all the devices that run the step, e.g.
        `peak_flops_per_device() * jax.device_count()`, for `mfu`.
    - `window`: how many recent steps the rolling figures cover.
    - `memory`: add `device_memory()` to each update (a cheap host call).

    !!! Example

        ```python
        meter = tx.loggers.Meter(batch_size=32, tokens_per_sample=64)
        meter.update(10, 2.0)
        # {"step_time_s": 0.2, "step_time_median_s": 0.2, "step_time_p90_s": 0.2,
        #  "samples_per_s": 160.0, "tokens_per_s": 10240.0}
        ```
    """

    def __init__(
        self,
        batch_size: int | None = None,
        tokens_per_sample: int | None = None,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        *,
        window: int = 100,
        memory: bool = False,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("tokens_per_sample", tokens_per_sample),
            ("flops_per_step", flops_per_step),
            ("peak_flops", peak_flops),
            ("window", window),
        ):
            _check_positive(value, name)
        self.batch_size = batch_size
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.window = int(window)
        self.memory = memory
        self.compile_s: float | None = None
        self._intervals: collections.deque[tuple[int, float]] = collections.deque()
        self._steps_in_window = 0

    def record_compile(self, seconds: float) -> dict[str, float]:
        """Record the first step's compile (and run) time, kept out of the rates.

        **Arguments:**

        - `seconds`: wall-clock seconds of the compiling step.

        **Returns:** `{"compile_time_s": seconds}`, also added to the next update.
        """
        _check_positive(seconds, "seconds")
        self.compile_s = float(seconds)
        return {"compile_time_s": self.compile_s}

    def update(self, n_steps: int, elapsed_s: float) -> dict[str, float]:
        """The figures after `n_steps` more steps that took `elapsed_s` seconds.

        **Arguments:**

        - `n_steps`: how many optimizer steps were timed (at least 1).
        - `elapsed_s`: their wall-clock time in seconds (> 0).

        **Returns:**

        A dict with `step_time_s` (this interval's mean), `step_time_median_s` and
        `step_time_p90_s` (over the window), and over the window `samples_per_s`
        (with `batch_size`), `tokens_per_s` (with `tokens_per_sample` too), `mfu`
        (with `flops_per_step` and `peak_flops`, a fraction of 1); `compile_time_s`
        once after `record_compile`; `memory_gb` and `memory_peak_gb` with
        `memory=True` where the backend reports them.
        """
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise TrainerError(
                f"Expected `n_steps` to be an integer >= 1, got {n_steps!r} instead.",
                suggestion="Time at least one step before calling `update`.",
            )
        _check_positive(elapsed_s, "elapsed_s")
        elapsed_s = float(elapsed_s)
        self._intervals.append((n_steps, elapsed_s))
        self._steps_in_window += n_steps
        # Keep the newest intervals that cover `window` steps (at least one).
        while (
            len(self._intervals) > 1
            and self._steps_in_window - self._intervals[0][0] >= self.window
        ):
            self._steps_in_window -= self._intervals.popleft()[0]
        steps = self._steps_in_window
        seconds = sum(t for _, t in self._intervals)
        per_step = np.repeat(
            [t / n for n, t in self._intervals], [n for n, _ in self._intervals]
        )
        out = {
            "step_time_s": elapsed_s / n_steps,
            "step_time_median_s": float(np.median(per_step)),
            "step_time_p90_s": float(np.percentile(per_step, 90)),
        }
        if self.batch_size is not None:
            out["samples_per_s"] = self.batch_size * steps / seconds
            if self.tokens_per_sample is not None:
                out["tokens_per_s"] = out["samples_per_s"] * self.tokens_per_sample
        if self.flops_per_step is not None and self.peak_flops is not None:
            out["mfu"] = self.flops_per_step * steps / seconds / self.peak_flops
        if self.compile_s is not None:
            out["compile_time_s"] = self.compile_s
            self.compile_s = None
        if self.memory:
            out.update(device_memory())
        return out
