"""The `titanax` command: train (profile, TensorBoard, histograms, the config beside
the checkpoints, the run header), resume at the same global sample, explain (memory
against the arrays the Trainer places; 64 simulated devices, nothing placed), info."""

import csv
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from titanax._cli import main
from titanax._jobs import parse_bytes
from titanax.config import build_run, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
GPT_TP = str(ROOT / "examples" / "configs" / "gpt_small_tp.yaml")
MNIST_DP = str(ROOT / "examples" / "configs" / "mnist_dp.yaml")
GOLDEN = Path(__file__).with_name("golden") / "train_header.txt"


def _header_shape(text: str) -> str:
    """The header block with values masked: labels, line count, config sections."""
    block = text.split("=" * 72)[1].strip("\n").splitlines()
    out = []
    for line in block:
        if line.startswith(" "):  # a continued value: keep config section names
            section = re.match(r"\s+(\w+): ", line)
            out.append(f"  | {section.group(1)}" if section else "  |")
        else:
            out.append(line.split(":")[0] + ":")
    return "\n".join(out) + "\n"


def test_train_profile_tensorboard_checkpoint_config_header(tmp_path, capsys):
    from tensorboard.backend.event_processing import event_accumulator

    ckpt, tb, prof = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "prof"
    argv = [
        "train",
        MNIST_DP,  # the CNN on the digits: the cheapest example config to compile
        "steps=6",
        "logging.every=2",
        "logging.console=basic",
        f"logging.tensorboard={tb}",
        f"logging.csv={tmp_path / 'log.csv'}",
        "logging.histograms_every=2",
        f"checkpoint.path={ckpt}",
        "checkpoint.async_=false",
        "profile.start=2",
        "profile.steps=2",
        f"profile.dir={prof}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out

    # The run header: its shape is pinned (values masked), and it holds the config.
    shape = _header_shape(out)
    if os.environ.get("TITANAX_UPDATE_GOLDEN"):
        GOLDEN.write_text(shape)
    assert shape == GOLDEN.read_text()
    assert "optimizer: {name: adamw, lr: 0.003, b1: 0.9, b2: 0.999" in out
    assert "data:        function (examples/configs/digits.py:load), global " in out
    assert "1,797 samples per epoch shuffled (seed 0)" in out
    assert re.search(r"\[startup\] place model: \d+\.\d\d s", out)
    assert out.index("[startup] place model") > out.index("=" * 72)  # below it
    losses = [float(m) for m in re.findall(r"^step \d+ \| loss ([\d.]+)", out, re.M)]
    assert len(losses) == 3 and all(np.isfinite(losses))

    # The resolved config beside the checkpoints, and in `checkpoint show`.
    expected = config_to_dict(load_config(MNIST_DP, argv[2:]))
    assert json.loads((ckpt / "config.json").read_text()) == expected
    assert main(["checkpoint", "show", str(ckpt)]) == 0
    shown = capsys.readouterr().out
    config_line = next(x for x in shown.splitlines() if "config:" in x)
    assert json.loads(config_line.split("config:", 1)[1]) == expected
    assert "step:          6 of [" in shown

    # A profiler trace of the window.
    traces = list(prof.glob("plugins/profile/*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 1000

    # TensorBoard's own reader: scalars and per-layer histograms.
    acc = event_accumulator.EventAccumulator(str(tb), size_guidance={"histograms": 0})
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss")] == [2, 4, 6]
    read = [s.value for s in acc.Scalars("loss")]
    assert read == pytest.approx(losses, abs=1e-4)
    tags = acc.Tags()["histograms"]
    for kind in ("param_norm", "grad_norm"):
        assert kind in tags and f"{kind}/CNN.convs_1_.weight" in tags
        hist = acc.Histograms(f"{kind}/CNN.convs_1_.weight")
        assert [h.step for h in hist] == [2, 4, 6]
        assert hist[0].histogram_value.num == 1  # one norm: the layer is not stacked
        assert hist[0].histogram_value.min > 0
        # The summary histogram holds every layer's norm: 2 convolutions + head.
        assert acc.Histograms(kind)[0].histogram_value.num == 6
    assert "startup/place_model_s" in acc.Tags()["scalars"]


def test_explain_memory_matches_the_placed_arrays(capsys):
    overrides = ["data.batch_size=8"]
    assert main(["explain", GPT_TP, *overrides, "--json", "--device-memory=1MB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "abstract"  # compiled for shapes: nothing placed

    # What the Trainer really places: its state and one batch, on device 0.
    run = build_run(load_config(GPT_TP, overrides), loggers=[])
    state = run.trainer.init_state()
    with run.data.batches(0, run.plan, run.mesh) as batches:
        host_batch = next(batches)
    program = run.trainer.train_step.compile(state, host_batch)
    batch = program.place(host_batch)
    device = jax.devices()[0]

    def on_device(arrays):
        return sum(
            s.data.nbytes
            for x in arrays
            for s in x.addressable_shards
            if s.device == device
        )

    state_bytes = on_device(program.flatten(state))
    batch_bytes = on_device(batch)
    assert report["state_bytes_per_device"] == state_bytes
    assert report["batch_bytes_per_device"] == batch_bytes
    memory = report["memory"]
    # jax.jit drops arguments the step never reads (`keep_unused=False`): at most a
    # few int32 scalars of the state's bookkeeping.
    unused = state_bytes + batch_bytes - memory["arguments"]
    assert 0 <= unused <= 16, (memory, state_bytes, batch_bytes)
    assert unused % 4 == 0
    # The new state is written over the donated old one (less what was dropped).
    assert memory["aliased"] == state_bytes - unused
    # Outputs: the new state, one float32 scalar per metric, and (XLA's CPU backend)
    # the result tuple's table of 8-byte buffer pointers.
    n_out = report["output_arrays"]
    n_metrics = n_out - len(program.flatten(state))
    assert n_metrics == 4  # loss, accuracy, grad_norm, lr
    assert memory["outputs"] == state_bytes + 4 * n_metrics + 8 * n_out
    assert report["fits"] is (memory["peak"] <= 1_000_000)
    assert report["flops_per_step"] == report["flops_per_device"] * 8


@pytest.mark.slow
def test_explain_on_64_simulated_devices_places_nothing(tmp_path):
    # 16M parameters: placed on 64 devices (16 replicas x TP=4) the state would take
    # 64 x 48 MB = 3 GB of this host's memory; explained, it takes none of it.
    model = ["model.kwargs.n_embd=256", "model.kwargs.n_layer=20"]
    cmd = [sys.executable, "-m", "titanax", "explain", GPT_TP, *model]
    cmd += ["mesh={data: 16, model: 4}", "--devices", "64", "--device-memory", "80GB"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    timer = threading.Timer(400, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    text = out.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, err.read_text()[-3000:]
    assert "Mesh: data=16 x model=4" in text
    assert re.search(
        r"FLOPs per step: [\d.e+]+ per device, [\d.e+]+ over 64 devices", text
    )
    assert "Device memory: the step fits in 74.51 GiB per device" in text  # 80e9 B
    assert re.search(
        r"Compiled step \([\d.]+ s, abstract state: nothing placed\)", text
    )
    arguments = re.search(r"^ +arguments: +([\d.]+) ([MG])iB$", text, re.M)
    assert arguments is not None, text
    number, unit = arguments.groups()
    placed = 64 * float(number) * (2**30 if unit == "G" else 2**20)
    assert placed > 3e9
    peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
    assert peak_rss < placed / 2, (peak_rss, placed)


# 40 samples, a learnable rule: with batches of 8 an epoch is 5 steps, so a run
# stopped after step 6 resumes inside the second epoch (its own shuffle).
SAMPLES = """
import numpy as np


def load(n):
    x = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32)}
"""


def test_train_resumes_at_the_same_global_sample(tmp_path, capsys):
    (tmp_path / "samples.py").write_text(SAMPLES)
    config = {
        "model": {"preset": "mlp", "kwargs": {"in_size": 16, "out_size": 2}},
        "plan": {"dp": {"axis": "data"}},
        "optimizer": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 2},
        "data": {
            "source": "function",
            "function": f"{tmp_path / 'samples.py'}:load",
            "kwargs": {"n": 40},
            "batch_size": 8,
        },
    }
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config))
    # The schedule's length is pinned: a run of `steps=6` decays like the others.
    common = ["logging.every=1", "logging.console=none", "optimizer.total_steps=10"]
    ckpt = tmp_path / "ckpt"
    saved = [f"checkpoint.path={ckpt}", "checkpoint.every=2", "checkpoint.async_=false"]

    def train(name, *overrides):
        csv_log = f"logging.csv={tmp_path / name}.csv"
        assert main(["train", str(file), *common, csv_log, *overrides]) == 0
        with (tmp_path / f"{name}.csv").open() as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}

    first = train("first", *saved, "steps=6")  # stops after step 6, saved
    resumed = train("resumed", *saved, "steps=10", "checkpoint.resume=true")
    whole = train("whole", "steps=10")  # uninterrupted, no checkpoint
    assert sorted(first) == list(range(1, 7))
    assert sorted(resumed) == list(range(7, 11))
    for step, loss in {**first, **resumed}.items():
        assert loss == pytest.approx(whole[step], abs=1e-6), step
    # The checkpoints hold the global sample of the next batch.
    capsys.readouterr()
    assert main(["checkpoint", "ls", str(ckpt)]) == 0
    listing = capsys.readouterr().out
    rows = re.finditer(r"^(\d+)\s+\S+\s+[\d.]+ \w+\s+(\d+)\s", listing, re.M)
    positions = {int(m.group(1)): int(m.group(2)) for m in rows}
    assert positions == {6: 48, 8: 64, 10: 80}, listing  # keep=3


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(Exception, match="memory size such as `80GB`"):
        parse_bytes("lots")


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "devices:   8 x cpu" in out
    assert "processes: 1 (this is process 0)" in out
    assert "cluster:   single: process 0 of 1" in out


def test_bad_config_exits_1_with_the_key(tmp_path, capsys):
    assert main(["train", GPT_TP, "optimiser.lr=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key `optimiser`. Did you mean `optimizer`?" in err
    assert "Fix: Rename it to `optimizer`." in err
