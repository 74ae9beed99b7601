"""benchmarks/gpu.py --smoke: the GPU benchmark's arithmetic, on CPU with a tiny GPT."""

import importlib.util
import math
from pathlib import Path

import pytest

import titanax as tx
from models.gpt import GPTConfig, flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", ROOT / "benchmarks" / "gpu.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_consistent_numbers(capsys, tmp_path):
    bench = _load_benchmark()
    r = bench.main(
        ["--smoke", "--peak-flops", "1e11", "--json", str(tmp_path / "r.json")]
    )
    out = capsys.readouterr().out
    assert "MFU:" in out and "tokens/s:" in out and (tmp_path / "r.json").exists()
    assert (r["batch"], r["seq"], r["precision"]) == (2, 16, "bf16")
    step_s = r["step_ms_median"] / 1e3
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / step_s)
    config = GPTConfig.preset("tiny", vocab_size=64, bias=True, tie_weights=True)
    assert r["flops_per_step_6n"] == flops_per_token(config, 16) * 2 * 16
    # XLA counts every op (norms, softmax, the optimizer) where 6N counts the
    # matmuls: measured 1.15x on this tiny model.
    assert 1.0 < r["flops_per_step_xla"] / r["flops_per_step_6n"] < 1.5
    assert r["mfu_xla"] == pytest.approx(r["flops_per_step_xla"] / step_s / 1e11)
    assert r["mfu_6n"] == pytest.approx(r["flops_per_step_6n"] / step_s / 1e11)
    assert r["xla_temp_bytes"] > 0 and r["peak_bytes_in_use"] is None  # CPU
    assert math.isfinite(r["final_loss"]) and r["final_loss"] < math.log(64) + 0.5


def test_peak_flops_from_the_titanax_table_and_override():
    bench = _load_benchmark()

    class Device:
        platform = "gpu"
        device_kind = "NVIDIA H200"

    bf16 = tx.loggers.peak_flops_per_device(Device(), "bf16")
    assert bf16 is not None and bf16 > 9e14  # H100/H200 SXM: ~989 TFLOP/s dense
    assert bench.peak_flops(Device(), "bf16", None) == bf16
    # float32 matmuls run as TF32 on the tensor cores: half the bf16 rate.
    assert bench.peak_flops(Device(), "fp32", None) == pytest.approx(bf16 / 2, rel=1e-3)
    assert bench.peak_flops(Device(), "bf16", 1.0) == 1.0
    Device.platform, Device.device_kind = "cpu", "cpu"
    assert bench.peak_flops(Device(), "bf16", None) is None
