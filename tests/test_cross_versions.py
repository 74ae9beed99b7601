"""The supported range end to end: a checkpoint written under the minimum versions
resumes under the newest, and the reverse, with the losses of an uninterrupted run.

Two virtual environments take part: this test's own, and the other one of `.venv`
(the newest versions, `make dev`) and `.venv-min` (the tested minimum,
`ci/min-versions.txt`, `make venv-min`), or `TITANAX_OTHER_PYTHON`. `.ci/run`
creates both, so CI runs these tests (in `make test-min`); without the second one
they skip and say why.

Each direction: the writer trains a small GPT under DP=2 x TP=4 for 4 steps and
keeps the checkpoint of step 2; the reader, under the other versions, resumes that
checkpoint on one device and trains steps 3-4. Its losses equal the writer's
uninterrupted ones (fp32, 1e-5 relative): the checkpoint carries every array, the
optimizer state, the RNG and the data position across the versions, onto another
layout, and DP=2 x TP=4 under one JAX computes what one device computes under the
other.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_cross_worker.py"
VENVS = (ROOT / ".venv", ROOT / ".venv-min")


def _jax_version(python: str) -> str | None:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('jax'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="module")
def other_python() -> str:
    """A Python whose JAX differs from this one's (the other end of the range)."""
    here = importlib.metadata.version("jax")
    named = os.environ.get("TITANAX_OTHER_PYTHON")
    candidates = [named] if named else [str(v / "bin" / "python") for v in VENVS]
    for python in candidates:
        if Path(python).exists() and _jax_version(python) not in (None, here):
            return python
    pytest.skip(
        f"needs a second virtual environment with another jax than {here}: "
        "`.venv-min` (`make venv-min`) beside `.venv`, or TITANAX_OTHER_PYTHON; "
        "`.ci/run` creates both"
    )


def _run(python: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    out = subprocess.run(
        # Titanax's warnings (a version mismatch on restore, ...) fail the run.
        [python, "-W", "error::UserWarning", str(WORKER), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "writer_is_this", [True, False], ids=["this-to-other", "other-to-this"]
)
def test_checkpoint_resumes_under_the_other_versions(
    other_python, writer_is_this, tmp_path
):
    this = sys.executable
    writer, reader = (this, other_python) if writer_is_this else (other_python, this)
    wrote = _run(writer, "write", str(tmp_path / "run"))
    read = _run(reader, "read", str(tmp_path / "run"), "single")
    assert wrote["versions"]["jax"] != read["versions"]["jax"]
    assert len(wrote["losses"]) == 4 and len(read["resumed"]) == 2
    assert wrote["losses"][3] < wrote["losses"][0]  # it trains
    np.testing.assert_allclose(read["resumed"], wrote["losses"][2:], rtol=1e-5)
