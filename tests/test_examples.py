"""The examples run, learn, and read their data correctly.

The scripts run as subprocesses (as a user runs them), each with a timeout; the
numbers they print are parsed and checked. The MNIST reader is checked on a small
IDX file written here and, when `../shared/data/mnist` exists, on the real files.
"""

import gzip
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
TIMEOUT_S = 120

# md5 of the gzip files, from ../shared/data/README.md.
MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Images per digit 0..9 in the MNIST test set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _load_example(relative_path: str, module_name: str):
    """An example file imported by path (`data`, `train` are generic names)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / relative_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data = _load_example("mnist_dp/data.py", "_mnist_dp_data")


def _run(*args: str) -> str:
    """Run a Python script with args; its stdout, after asserting exit status 0."""
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(args)}` did not finish in {TIMEOUT_S} s: {e}")
    assert proc.returncode == 0, (
        f"`{' '.join(args)}` exited with {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _logged_losses(out: str) -> list[float]:
    """The losses of the `tx.loggers.Basic` lines: `step 10 | loss 0.1234 | ...`."""
    losses = [float(m) for m in re.findall(r"^step \d+ \| loss ([\d.]+)", out, re.M)]
    assert len(losses) >= 2, f"expected at least two log lines in:\n{out}"
    return losses


def test_minimal_dp():
    out = _run(str(EXAMPLES / "minimal_dp.py"))
    assert re.search(r"devices: +8 x cpu", out), out
    assert re.search(r"mesh: +data=8", out), out
    losses = _logged_losses(out)
    assert len(losses) == 10  # 100 steps, logged every 10
    assert losses[-1] < 0.5 * losses[0], losses
    assert re.search(r"^loss [\d.]+ -> [\d.]+: OK$", out, re.M)


def test_mnist_dp_mlp_on_sklearn_digits():
    # 100 steps: measured 93.6-94.7% test accuracy over seeds 0-2 (97.5% at the
    # default 300 steps); chance is 10%.
    out = _run(
        str(EXAMPLES / "mnist_dp" / "train.py"), "--model", "mlp", "--steps", "100"
    )
    assert "1437 train, 360 test, 8x8" in out
    losses = _logged_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    before = float(re.search(r"^before training: .*accuracy ([\d.]+)", out, re.M)[1])
    match = re.search(r"^test accuracy ([\d.]+) \((\d+) of (\d+) images\)", out, re.M)
    assert match, out
    accuracy, evaluated, total = float(match[1]), int(match[2]), int(match[3])
    assert evaluated == total == 360
    assert before < 0.3
    assert accuracy > 0.85, out


def _write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_read_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), images)

    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    _write_idx(tmp_path / "b.gz", floats, 0x0D)
    got = data.read_idx(tmp_path / "b.gz")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, floats)

    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # says 5 bytes, holds 3
    with pytest.raises(ValueError, match="header says shape"):
        data.read_idx(tmp_path / "bad.gz")


def test_read_mnist_from_shared():
    if not MNIST_DIR.is_dir():
        pytest.skip(
            f"{MNIST_DIR} is absent: the MNIST IDX files live in the sibling "
            "`shared/` checkout, which this clone does not have."
        )
    for name, md5 in MNIST_MD5.items():
        digest = hashlib.md5((MNIST_DIR / name).read_bytes()).hexdigest()
        assert digest == md5, f"{name}: md5 {digest}, expected {md5}"

    raw = data.read_mnist_pair(MNIST_DIR, data.MNIST_TEST)
    assert raw.x.shape == (10000, 28, 28) and raw.x.dtype == np.uint8
    assert raw.y.shape == (10000,)
    assert raw.x.max() == 255 and raw.x.min() == 0
    assert np.bincount(raw.y, minlength=10).tolist() == MNIST_TEST_COUNTS

    train, test = data.load_mnist(MNIST_DIR)  # the test set split 8,000 / 2,000
    assert train.x.shape == (8000, 28, 28) and test.x.shape == (2000, 28, 28)
    np.testing.assert_array_equal(np.concatenate([train.y, test.y]), raw.y)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    assert abs(float(train.x.mean())) < 1e-4
    assert abs(float(train.x.std()) - 1) < 1e-4


def test_sklearn_digits_split_and_batches():
    train, test = data.load_sklearn_digits()
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape[1:] == (8, 8)
    assert set(np.unique(test.y)) == set(range(10))

    batches = data.pipeline(train, 40, seed=0)  # a titanax.data.Pipeline
    stream = batches.batches(0)
    first = [next(stream) for _ in range(1437 // 40)]
    assert all(b["x"].shape == (40, 8, 8) and b["y"].shape == (40,) for b in first)
    labels = np.concatenate([b["y"] for b in first])  # 1,400 of the first epoch
    assert np.abs(np.bincount(labels) - np.bincount(train.y)).max() <= 37
    second = batches.global_batch(1437)  # the first batch of epoch 1
    assert not np.array_equal(first[0]["y"], second["y"])  # reshuffled per pass
    evals = data.pipeline(test, 40, train=False)
    assert evals.num_batches() == 9  # 40 divides 360: every image
    np.testing.assert_array_equal(
        np.concatenate([b["y"] for b in evals]), test.y
    )  # in order, one pass


def _eval_losses(out: str) -> list[tuple[int, float, float]]:
    """`(step, train, val)` of each `eval step N | train X | val Y` line."""
    lines = re.findall(
        r"^eval step (\d+) \| train ([\d.]+) \| val ([\d.]+)$", out, re.M
    )
    return [(int(s), float(t), float(v)) for s, t, v in lines]


def test_gpt_dp_x_tp_x_pp_1f1b_learns():
    # 8 devices: DP=2 x TP=2 x PP=2 (1F1B, 4 microbatches of 2 rows per data shard).
    # Measured: val 5.548 -> 3.449 (train 5.545 -> 3.582), the same to 4 digits as
    # the unpipelined run (--dp 2 --tp 2) and as --pp 2 --schedule gpipe.
    out = _run(
        str(EXAMPLES / "gpt" / "train.py"),
        *("--preset", "tiny", "--dp", "2", "--tp", "2", "--pp", "2"),
        *("--schedule", "1f1b", "--batch", "16", "--steps", "40", "--lr", "3e-3"),
        *("--eval-every", "20", "--log-every", "10", "--sample-tokens", "40"),
    )
    assert re.search(r"^mesh:\s+data=2, model=2, pipe=2$", out, re.M), out
    assert "PP over `pipe` (1f1b, 4 microbatches)" in out
    losses = _logged_losses(out)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    evals = _eval_losses(out)
    assert [step for step, _, _ in evals] == [0, 20, 40], out
    (_, train0, val0), (_, train1, val1) = evals[0], evals[-1]
    assert abs(val0 - 5.545) < 0.05  # ln 256: an untrained byte model
    assert val1 < val0 - 1.5 and train1 < train0 - 1.5, evals
    sample = out.split("sample:\n")[1].splitlines()
    assert sample[0] == "-" * 72 and len(sample[1]) >= 16, out


def test_gpt_example_checks_pipeline_arguments(capsys):
    example = _load_example("gpt/train.py", "_gpt_train")  # for its argument parser
    args = example.parse_args(["--pp", "2", "--dp", "2", "--batch", "16"])
    assert (args.microbatches, args.schedule) == (4, "1f1b")  # default 2 x pp
    for argv, message in [
        (["--pp", "2", "--dp", "2"], "multiple of the data size 2 x 4 microbatches"),
        (["--microbatches", "4"], "needs a pipeline"),
        (["--pp", "2", "--fsdp", "2", "--batch", "16"], "does not compose"),
        (["--pp", "2", "--schedule", "zb"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit):
            example.parse_args(argv)
        assert message in capsys.readouterr().err, argv


# --- the small single-file examples ---------------------------------------------------


def test_minimal_sharding():
    out = _run(str(EXAMPLES / "minimal_sharding.py"))
    assert "matches the single-device forward: OK" in out
    assert re.search(r"forward: x \(16, 128\) P\('data', None\)", out), out


def test_tp_minimal_mlp():
    out = _run(str(EXAMPLES / "tp_minimal_mlp.py"))
    losses = [float(v) for v in re.search(r"loss per step: (.*)", out)[1].split()]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses
    assert "all-reduce', ('model',)" in out  # the Megatron pair's one reduction


def test_spmd_dp_matches_jit():
    out = _run(str(EXAMPLES / "spmd_dp.py"))
    pairs = re.findall(r"spmd loss ([\d.]+)\s+jit loss ([\d.]+)", out)
    assert len(pairs) == 10
    assert all(a == b for a, b in pairs), pairs
    assert float(pairs[-1][0]) < float(pairs[0][0])
    diff = float(re.search(r"max parameter difference after \d+ steps: (\S+)", out)[1])
    assert diff <= 1e-6


def test_pp_minimal_two_stage():
    out = _run(str(EXAMPLES / "pp_minimal_two_stage.py"))
    assert "stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3" in out
    # One permute per tick with only its real transfers: 2 M (S - 1) = 8 a step.
    sends = re.search(r"stage>stage sends per tick: (.*)", out)[1].split(" | ")
    assert len(sends) == 10
    assert sum(len(s.split()) for s in sends if s != "-") == 8
    permutes = re.findall(r"collective-permute over pipe\s+(\d+) B  in the tick", out)
    assert permutes and set(permutes) == {"512"}  # 4 rows x 32 fp32
    losses = [float(v) for v in re.findall(r"^step \d: loss ([\d.]+)", out, re.M)]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
