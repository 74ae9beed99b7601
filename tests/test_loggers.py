import csv
import io
import json
import os
import struct
import sys

import jax
import numpy as np
import pytest

import titanax.loggers as tlog
from titanax._errors import TrainerError

INFO = {
    "versions": {"titanax": "0.1.0", "jax": "0.10.2", "equinox": "0.13.8"},
    "devices": "8 x cpu",
    "mesh": "data=8",
    "plan": "DP(axis='data')\n  batch over data",
    "optimizer": "adamw(lr=1e-3)",
}

METRICS = {
    "loss": 2.34561,
    "accuracy": 0.91,
    "lr": 1e-3,
    "samples_per_s": 1234.4,
    "tokens_per_s": 78999.6,
    "step_time_s": 0.01234,
    "mfu": 0.4123,
}


def test_basic_header_and_lines():
    out = io.StringIO()
    logger = tlog.Basic(out)
    logger.header(INFO)
    logger.log(100, METRICS)
    logger.log(101, {"loss": 1e-5, "grad_norm": np.float32(0.5), "tokens": 4096})
    logger.close()
    rule = "=" * 72
    assert out.getvalue().splitlines() == [
        rule,
        "versions:  titanax 0.1.0 | jax 0.10.2 | equinox 0.13.8",
        "devices:   8 x cpu",
        "mesh:      data=8",
        "plan:      DP(axis='data')",
        "             batch over data",
        "optimizer: adamw(lr=1e-3)",
        rule,
        "step 100 | loss 2.3456 | accuracy 0.91 | lr 1.00e-03 | 1234 samples/s | "
        "79000 tokens/s | 12.3 ms/step | mfu 41.2%",
        "step 101 | loss 1.000e-05 | grad_norm 0.5 | tokens 4096",
    ]


def test_basic_every_and_default_stream(capsys):
    logger = tlog.Basic(every=10)
    for step in range(1, 21):
        logger.log(step, {"loss": float(step), "step_time_s": 0.5})
    logger.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 10 | loss 10.0000 | 500.0 ms/step",
        "step 20 | loss 20.0000 | 500.0 ms/step",
    ]
    with pytest.raises(TrainerError, match="`every` to be an integer >= 1"):
        tlog.Basic(every=0)


def test_basic_accepts_device_scalars():
    out = io.StringIO()
    tlog.Basic(out).log(3, {"loss": jax.numpy.float32(0.25), "lr": np.float64(3e-4)})
    assert out.getvalue() == "step 3 | loss 0.2500 | lr 3.00e-04\n"


def test_compact_basic():
    out = io.StringIO()
    logger = tlog.CompactBasic(out)
    logger.header(INFO)
    logger.log(100, METRICS)
    logger.log(123456, {"loss": 0.5})
    assert out.getvalue().splitlines() == [
        "titanax 0.1.0 | jax 0.10.2 | equinox 0.13.8",
        "devices 8 x cpu | mesh data=8 | plan DP(axis='data') batch over data | "
        "optimizer adamw(lr=1e-3)",
        "[  100] loss 2.3456 accuracy 0.91 lr 1.0e-03 12.3ms",
        "[123456] loss 0.5000",
    ]
    out = io.StringIO()
    tlog.CompactBasic(out).header({"devices": "1 x cpu"})
    assert out.getvalue() == "devices 1 x cpu\n"


def test_loggers_follow_the_protocol(tmp_path):
    loggers = [tlog.Basic(io.StringIO()), tlog.CompactBasic(io.StringIO())]
    loggers.append(tlog.CSV(tmp_path / "m.csv"))
    loggers.append(tlog.TensorBoard(tmp_path / "tb"))
    for logger in loggers:
        assert isinstance(logger, tlog.Logger)
        logger.close()
        logger.close()  # twice is harmless


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_rows_header_and_late_keys(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    with tlog.CSV(path) as logger:
        logger.header({**INFO, "mesh_obj": object.__new__(object)})
        logger.log(1, {"loss": 2.5, "lr": 1e-3})
        # Read back after each row: rows are flushed as written.
        assert _read_csv(path) == [
            ["step", "loss", "lr", "extra"],
            ["1", "2.5", "0.001", ""],
        ]
        logger.log(2, {"loss": np.float32(0.1), "eval_loss": 1.75, "tokens": 4096})
        logger.log(3, {"lr": 1 / 3})
    rows = _read_csv(path)
    assert rows[0] == ["step", "loss", "lr", "extra"]
    assert rows[2][:3] == ["2", str(float(np.float32(0.1))), ""]
    assert json.loads(rows[2][3]) == {"eval_loss": 1.75, "tokens": 4096}
    assert rows[3] == ["3", "", repr(1 / 3), ""]
    assert float(rows[3][2]) == 1 / 3  # full precision round trip

    header = json.loads((tmp_path / "run" / "metrics.csv.header.json").read_text())
    assert header["versions"] == INFO["versions"]
    assert header["plan"] == INFO["plan"]
    assert header["mesh_obj"].startswith("<object object")
    assert list(header) == [*INFO, "mesh_obj"]  # order kept

    with pytest.raises(TrainerError, match=r"used after `close\(\)`"):
        logger.log(4, {"loss": 1.0})


def test_csv_append_keeps_columns(tmp_path):
    path = tmp_path / "m.csv"
    with tlog.CSV(path) as logger:
        logger.log(1, {"loss": 1.0, "lr": 0.1})
    with tlog.CSV(path, append=True) as logger:
        logger.log(2, {"lr": 0.2, "loss": 0.5, "new": 7})
    assert _read_csv(path) == [
        ["step", "loss", "lr", "extra"],
        ["1", "1.0", "0.1", ""],
        ["2", "0.5", "0.2", '{"new": 7}'],
    ]
    # Without append the file starts afresh.
    with tlog.CSV(path) as logger:
        logger.log(5, {"acc": 0.5})
    assert _read_csv(path) == [["step", "acc", "extra"], ["5", "0.5", ""]]

    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(TrainerError, match="`step,...,extra` header row"):
        tlog.CSV(other, append=True)


def _read_events(path):
    """Parse a TFRecord event file with tensorboardX's protobuf classes."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        start = offset + 12  # length, then its 4-byte CRC
        events.append(event_pb2.Event.FromString(data[start : start + length]))
        offset = start + length + 4  # data, then its CRC
    return events


def test_tensorboard_writes_scalars_and_header(tmp_path):
    logdir = tmp_path / "tb"
    with tlog.TensorBoard(logdir) as logger:
        logger.header(INFO)
        logger.log(1, {"loss": 2.5, "lr": 1e-3, "note": "skipped"})
        logger.log(2, {"loss": np.float32(1.25)})
    (event_file,) = list(logdir.glob("events.out.tfevents.*"))
    assert event_file.stat().st_size > 0

    scalars, texts = {}, []
    for event in _read_events(event_file):
        for value in event.summary.value:
            if value.HasField("tensor"):
                texts.append(value.tensor.string_val[0].decode())
            else:
                scalars[(value.tag, event.step)] = value.simple_value
    assert scalars == {
        ("loss", 1): 2.5,
        ("lr", 1): pytest.approx(1e-3),
        ("loss", 2): 1.25,
    }
    assert len(texts) == 1 and "    devices:   8 x cpu" in texts[0]


def test_tensorboard_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(TrainerError, match=r"pip install titanax\[tensorboard\]"):
        tlog.TensorBoard(tmp_path)


def test_meter_arithmetic():
    meter = tlog.Meter(
        batch_size=32, tokens_per_sample=64, flops_per_step=1e9, peak_flops=1e10
    )
    rates = meter.update(10, 2.0)
    assert rates == pytest.approx(
        {
            "step_time_s": 0.2,
            "step_time_median_s": 0.2,
            "step_time_p90_s": 0.2,
            "samples_per_s": 160.0,
            "tokens_per_s": 10240.0,
            "mfu": 0.5,
        }
    )
    assert tlog.Meter().update(4, 1.0) == pytest.approx(
        {"step_time_s": 0.25, "step_time_median_s": 0.25, "step_time_p90_s": 0.25}
    )
    # MFU needs both the model FLOPs and the peak.
    assert "mfu" not in tlog.Meter(batch_size=8, flops_per_step=1e9).update(1, 1.0)
    with pytest.raises(TrainerError, match="`n_steps` to be an integer >= 1"):
        meter.update(0, 1.0)
    with pytest.raises(TrainerError, match="`elapsed_s` to be a number > 0"):
        meter.update(1, 0.0)
    with pytest.raises(TrainerError, match="`batch_size` to be a number > 0"):
        tlog.Meter(batch_size=0)


def test_meter_rolling_window_percentiles_and_compile():
    meter = tlog.Meter(batch_size=10, window=4)
    assert meter.record_compile(3.5) == {"compile_time_s": 3.5}
    first = meter.update(2, 2.0)  # 1 s/step
    assert first["compile_time_s"] == 3.5  # reported once, with the next update
    second = meter.update(2, 6.0)  # 3 s/step: the window is [1, 1, 3, 3]
    assert "compile_time_s" not in second
    assert second["step_time_s"] == 3.0
    assert second["step_time_median_s"] == 2.0
    assert second["step_time_p90_s"] == pytest.approx(3.0)
    assert second["samples_per_s"] == pytest.approx(10 * 4 / 8.0)  # rolling, not last
    # A third interval pushes the first out of the 4-step window: [3, 3, 0.5, 0.5].
    third = meter.update(2, 1.0)
    assert third["samples_per_s"] == pytest.approx(10 * 4 / 7.0)
    assert third["step_time_median_s"] == pytest.approx(1.75)
    assert third["step_time_p90_s"] == pytest.approx(3.0)
    # The CPU backend reports no memory: nothing is made up.
    assert tlog.device_memory() == {}
    assert "memory_gb" not in tlog.Meter(memory=True).update(1, 1.0)


class _StatsDevice:
    def __init__(self, used, peak):
        self.stats = {"bytes_in_use": used, "peak_bytes_in_use": peak}

    def memory_stats(self):
        return self.stats


def test_device_memory_takes_the_largest_device():
    devices = [_StatsDevice(2e9, 3e9), _StatsDevice(1e9, 5e9)]
    assert tlog.device_memory(devices) == {"memory_gb": 2.0, "memory_peak_gb": 5.0}


def test_basic_line_shows_percentiles_compile_and_memory():
    line = tlog._console.format_line(
        7,
        {
            "loss": 1.0,
            "step_time_s": 0.012,
            "step_time_median_s": 0.011,
            "step_time_p90_s": 0.015,
            "compile_time_s": 2.5,
            "memory_gb": 1.25,
            "memory_peak_gb": 2.5,
        },
    )
    assert line == (
        "step 7 | loss 1.0000 | 12.0 ms/step (median 11.0, p90 15.0) | compile 2.50 s"
        " | mem 1.25 GB (peak 2.50)"
    )


def test_events_wait_for_the_header():
    out = io.StringIO()
    logger = tlog.WithHeader(tlog.Basic(out), config="steps: 3")
    tlog.emit([logger], "event", "place model", 1.234)
    assert out.getvalue() == ""  # held back until the header
    logger.header({"devices": "8 x cpu"})
    tlog.emit([logger], "event", "compile step", 0.5)
    tlog.emit([logger], "histograms", 1, {})  # Basic has none: skipped
    assert out.getvalue().splitlines()[1:] == [
        "devices: 8 x cpu",
        "config:  steps: 3",
        "=" * 72,
        "[startup] place model: 1.23 s",
        "[startup] compile step: 0.50 s",
    ]


def test_only_process_zero_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    out = io.StringIO()
    loggers = [
        tlog.Basic(out),
        tlog.CSV(tmp_path / "log.csv"),
        tlog.TensorBoard(tmp_path / "tb"),
        tlog.Progress(out, force=True),
    ]
    for logger in loggers:
        logger.header({"total_steps": 3})
        tlog.emit([logger], "event", "place model", 1.0)
        logger.log(1, {"loss": 1.0})
        logger.close()
    assert out.getvalue() == ""
    assert list(tmp_path.iterdir()) == []  # no file, no folder
    # Unless asked to.
    tlog.Basic(out, all_processes=True).log(1, {"loss": 1.0})
    assert out.getvalue() == "step 1 | loss 1.0000\n"


def _read_all(fd):
    import select

    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunks.append(os.read(fd, 1 << 16))
    return b"".join(chunks).decode()


def test_progress_bar_on_a_pty_and_not_piped():
    import fcntl
    import pty
    import termios

    from titanax.config import load_config, make_loggers

    master, slave = pty.openpty()
    # A terminal of 24 rows x 100 columns (a fresh pty has 0 columns).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    terminal = os.fdopen(slave, "w")
    config = load_config({"model": {"preset": "gpt"}})
    # `titanax train`'s console choice: the bar on a terminal, lines when piped.
    (chosen,) = make_loggers(config, terminal)
    assert isinstance(chosen, tlog.Progress)
    chosen.header({"devices": "8 x cpu", "total_steps": 10})
    tlog.emit([chosen], "event", "compile step", 2.0)
    for step in (2, 4):
        chosen.log(step, {"loss": 2.5, "tokens_per_s": 12345.0})
    chosen.close()
    terminal.flush()
    screen = _read_all(master)
    terminal.close()
    os.close(master)
    assert "[startup] compile step: 2.00 s" in screen
    assert "4/10" in screen and "loss 2.5000 | 12345 tok/s" in screen
    assert "\r" in screen  # redrawn in place

    read, write = os.pipe()
    piped = os.fdopen(write, "w")
    (lines,) = make_loggers(config, piped)
    assert isinstance(lines, tlog.Basic)
    bar = tlog.Progress(piped)
    bar.header({"total_steps": 10})
    bar.log(4, {"loss": 2.5})
    bar.close()
    piped.close()
    assert os.read(read, 1 << 16) == b""  # not a terminal: the bar draws nothing
    os.close(read)


def test_layer_norms_and_tensorboard_histograms(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny", n_layer=3), key=jax.random.key(0))
    norms = jax.jit(tlog.layer_norms)(model)
    stacked = np.asarray(model.blocks.w_mlp_in)
    expected = np.sqrt((stacked.reshape(3, -1).astype(np.float64) ** 2).sum(axis=1))
    np.testing.assert_allclose(norms["GPT.blocks.w_mlp_in"], expected, rtol=1e-5)
    assert norms["GPT.wte"].shape == ()  # not stacked: one norm
    np.testing.assert_allclose(
        norms["GPT.wte"], np.linalg.norm(np.asarray(model.wte)), rtol=1e-5
    )
    host = jax.device_get(norms)
    with tlog.TensorBoard(tmp_path) as logger:
        logger.log(7, {"loss": 0.75})
        logger.event("compile step", 2.5)
        logger.histograms(10, {"param_norm": host, "grad_norm": host})
    acc = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={"histograms": 0}
    )
    acc.Reload()
    (scalar,) = acc.Scalars("loss")
    assert (scalar.step, scalar.value) == (7, 0.75)
    assert acc.Scalars("startup/compile_step_s")[0].value == 2.5
    (per_layer,) = acc.Histograms("param_norm/GPT.blocks.w_mlp_in")
    value = per_layer.histogram_value
    assert (per_layer.step, value.num) == (10, 3)
    assert value.sum == pytest.approx(expected.sum(), rel=1e-5)
    assert value.max == pytest.approx(expected.max(), rel=1e-5)
    (everything,) = acc.Histograms("grad_norm")
    total = sum(np.size(v) for v in host.values())
    assert everything.histogram_value.num == total


def test_profile_window_writes_a_trace(tmp_path):
    profile = tlog.Profile(start=2, steps=2, logdir=tmp_path)
    step = jax.jit(lambda x: (x @ x.T).sum() * 0 + x)
    x = jax.numpy.ones((64, 64))
    events = []
    for k in range(6):
        profile.before_step(k)
        events.append(profile.running)
        x = step(x)
        profile.after_step(k + 1, x)
    assert events == [False, False, True, True, False, False]
    assert profile.done and not profile.running
    traces = profile.trace_files()
    assert any(p.name.endswith(".xplane.pb") and p.stat().st_size > 0 for p in traces)
    with pytest.raises(TrainerError, match=r"`Profile\(steps=...\)` to be an integer"):
        tlog.Profile(start=0, steps=0)


class _FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5e12),  # SXM
        ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
        ("NVIDIA H100 PCIe", "bf16", 756.5e12),
        ("NVIDIA H100 PCIe", "fp32", 51e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H200", "bf16", 989.5e12),
        ("NVIDIA H200", np.float32, 67e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
        ("NVIDIA B200", "bf16", 2250e12),
        ("NVIDIA B200", "fp32", 75e12),
        ("TPU v4", "bf16", 275e12),
        ("TPU v5 lite", "bf16", 197e12),
        ("TPU v5", "bf16", 459e12),
        ("TPU v6 lite", "bf16", 918e12),
        ("TPU v5 lite", "fp32", None),  # Google publishes no float32 figure
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_flops_per_device(kind, dtype, expected):
    device = _FakeDevice("tpu" if "TPU" in kind else "gpu", kind)
    assert tlog.peak_flops_per_device(device, dtype=dtype) == expected


def test_peak_flops_per_device_defaults_and_errors():
    h100 = _FakeDevice("gpu", "NVIDIA H100 80GB HBM3")
    assert tlog.peak_flops_per_device(h100) == 989.5e12  # bf16 by default
    assert tlog.peak_flops_per_device(h100, jax.numpy.bfloat16) == 989.5e12
    assert tlog.peak_flops_per_device(jax.devices("cpu")[0]) is None
    assert tlog.peak_flops_per_device() is None  # the test devices are CPUs
    # The bf16-only table kept for older callers.
    assert dict(tlog.PEAK_BF16_FLOPS)["H100 PCIe"] == 756.5e12
    with pytest.raises(TrainerError, match="Expected `dtype` to be one of 'bf16'"):
        tlog.peak_flops_per_device(h100, dtype="fp8")


def test_versions_and_run_header():
    import titanax.optim as topt

    v = tlog.versions()
    assert list(v)[:5] == ["titanax", "jax", "jaxlib", "equinox", "optax"]
    assert v["jax"] == jax.__version__

    class Plan:
        def describe(self):
            return "DP(axis='data')"

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    header = tlog.run_header(
        mesh=mesh, plan=Plan(), optimizer=topt.adamw(1e-3), model="MLP"
    )
    assert list(header) == ["versions", "devices", "mesh", "plan", "optimizer", "model"]
    assert header["devices"] == f"{jax.device_count()} x cpu"
    assert header["mesh"] == "data=2, model=4"
    assert header["plan"] == "DP(axis='data')"
    assert header["optimizer"] == "adamw(lr=1e-3, b1=0.9, b2=0.999)"
    assert list(tlog.run_header()) == ["versions", "devices"]
