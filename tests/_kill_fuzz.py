"""A kill-9 fuzz of checkpointed training: SIGKILL at random moments, resume, repeat.

`fuzz(kills)` trains `_resume_worker.py` (an MLP whose AdamW state is 3.3 MB, a
save every 3 steps) in a subprocess that is SIGKILLed `kills` times, each time at a
random moment: most often right after an asynchronous save started (so the kill
lands while it is written), otherwise at a random step. After every kill the run
resumes from the latest finished step, which must be the newest step on disk (no
finished step is lost or unreadable). The last run trains to the end; its final
state must equal an uninterrupted run's bit for bit.

Used by `tests/test_checkpoint_resume.py` (8 kills, in CI) and by
`python benchmarks/checkpoint.py --fuzz N` (the long mode). Run directly:
`python tests/_kill_fuzz.py --kills 60`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_resume_worker.py")
EVERY, HIDDEN = 3, (256, 256)
TIMEOUT_S = 120


@dataclass
class Report:
    """What the fuzz did: kills, how many landed while a save was being written,
    the steps resumed from, and whether the final state matched."""

    kills: int = 0
    mid_save: int = 0
    resumed_from: list[int] = field(default_factory=list)
    equal: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.kills} SIGKILLs ({self.mid_save} while a save was written), "
            f"resumed from steps {self.resumed_from}; final state bitwise equal to "
            f"an uninterrupted run: {self.equal}; {self.seconds:.0f} s"
        )


def worker_env(cache: Path) -> dict[str, str]:
    """The environment of a worker: 2 CPU devices, a shared compilation cache."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def steps_for(kills: int) -> int:
    """Steps in a run: room for every kill (each run trains at most 12 more)."""
    return 12 * kills + 20


def _args(directory: Path, steps: int, out: Path | None) -> list[str]:
    args = [
        sys.executable,
        str(WORKER),
        "--dir",
        str(directory),
        "--steps",
        str(steps),
        "--every",
        str(EVERY),
        "--hidden",
        *map(str, HIDDEN),
        "--resume",
    ]
    return args + (["--out", str(out)] if out else [])


def _finished(directory: Path) -> tuple[list[int], list[str]]:
    if not directory.exists():
        return [], []
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    tmp = sorted(
        p.name for p in directory.iterdir() if "orbax-checkpoint-tmp" in p.name
    )
    return steps, tmp


def _run_to_end(env: dict[str, str], directory: Path, steps: int, out: Path) -> str:
    proc = subprocess.run(
        _args(directory, steps, out),
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _run_and_kill(
    env: dict[str, str], directory: Path, steps: int, rng: random.Random
) -> bool:
    """Start a resumed run and SIGKILL it at a random moment; True if the kill left
    the save it had started unfinished (it landed while the save was written)."""
    steps_before, _ = _finished(directory)
    start = steps_before[-1] if steps_before else 0
    target = rng.randrange(start + 1, start + 10)
    if rng.random() < 0.75:  # right after a save started: usually mid-write
        trigger, delay = f"saving {target + EVERY - target % EVERY}", 0.05
    else:
        trigger, delay = f"step {target}", 0.02
    proc = subprocess.Popen(
        _args(directory, steps, None),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)
    watchdog.start()
    resumed, saving = None, None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("resumed "):
                resumed = int(line.split()[1])
            if line.startswith("saving "):
                saving = int(line.split()[1])
            if line == trigger:
                time.sleep(rng.uniform(0.0, delay))
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=30)
        watchdog.cancel()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"worker exited with {proc.returncode} before the kill")
    if steps_before and resumed != steps_before[-1]:
        raise RuntimeError(
            f"resumed from {resumed}, but the latest finished step was "
            f"{steps_before[-1]}: a finished step was skipped"
        )
    finished, unfinished = _finished(directory)
    return (
        saving is not None
        and saving not in finished
        and any(name.startswith(f"{saving}.") for name in unfinished)
    )


def fuzz(kills: int, workdir: Path, seed: int = 0, reference: Path | None = None):
    """Kill a checkpointed run `kills` times, resume it, compare with a clean run.

    **Arguments:**

    - `kills`: how many SIGKILLs.
    - `workdir`: where to put checkpoints and results.
    - `seed`: the moments of the kills.
    - `reference`: an uninterrupted run's final `.npz` for `steps_for(kills)`
        steps (default: run one).

    **Returns:** a `Report`.
    """
    start = time.monotonic()
    env = worker_env(workdir / "jax_cache")
    steps = steps_for(kills)
    if reference is None:
        reference = workdir / "reference.npz"
        _run_to_end(env, workdir / "reference", steps, reference)
    rng = random.Random(seed)
    directory = workdir / "fuzzed"
    report = Report()
    for _ in range(kills):
        report.mid_save += _run_and_kill(env, directory, steps, rng)
        report.kills += 1
        finished, _ = _finished(directory)
        report.resumed_from.append(finished[-1] if finished else 0)
    out = workdir / "final.npz"
    _run_to_end(env, directory, steps, out)
    with np.load(out) as a, np.load(reference) as b:
        report.equal = a.files == b.files and all(
            np.array_equal(a[name], b[name]) for name in a.files
        )
    report.seconds = time.monotonic() - start
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="titanax-fuzz-") as tmp:
        print(fuzz(args.kills, Path(tmp), seed=args.seed))


if __name__ == "__main__":
    main()
