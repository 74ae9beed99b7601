"""The job examples run, short: mixed precision (the fp16 loss-scale trace) and
checkpoint resharding (TP=2 saved, TP=4 resumed: equal arrays and losses)."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / script), run_name="__main__")


@pytest.mark.slow
def test_mixed_precision_example(monkeypatch, capsys):
    _run("examples/mixed_precision/train.py", "--steps", "12", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    # fp16 starts at a loss scale of 2^20: the first step overflows and is skipped.
    first = next(line for line in out.splitlines() if line.startswith("   1 "))
    assert "524288  overflow: skipped, scale halved" in first
    assert "fp16 skipped steps [1," in out


@pytest.mark.slow
def test_checkpoint_reshard_example(monkeypatch, capsys):
    _run(
        "examples/checkpoint_reshard/reshard.py",
        "--steps",
        "4",
        "--more",
        "2",
        monkeypatch=monkeypatch,
    )
    out = capsys.readouterr().out
    assert "restored step 4: every array equal" in out
    assert "-> shards (2, 64, 64)" in out  # w_mlp_in's 256 columns over 4 devices
    assert "step 6: TP=4 resumed" in out
