"""`tx.configure_allocator`: XLA:CPU's per-step buffers stop page-faulting; `titanax
train` calls it first.

Each measurement runs in a fresh process: glibc's malloc settings are per process,
and must be made before JAX's backend starts its threads.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import titanax as tx

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
import json, resource, sys
sys.path.insert(0, {root!r})
import titanax as tx
applied = tx.configure_allocator() if {configure} else {{}}
import jax, jax.numpy as jnp
# 16 MiB temporaries, several live at once, and matmul workspaces: XLA:CPU mallocs
# and frees them on every call.
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x) + jnp.tanh(x) @ jnp.exp(-x)).sum())
x = jnp.full((2048, 2048), 0.01)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def _faults_per_call(configure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["JAX_PLATFORMS"] = "cpu"
    code = PROGRAM.format(root=str(ROOT), configure=configure)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux only)"
)
def test_configure_allocator_removes_page_faults():
    plain = _faults_per_call(False)
    tuned = _faults_per_call(True)
    assert tuned["applied"] == {
        "mmap_threshold": 1 << 30,
        "trim_threshold": 2**31 - 1,
        "arena_max": 1,
    }
    # Measured (2-core x86-64, glibc 2.36): jax 0.10, ~300k faults per call
    # without, ~5k with; jax 0.7.2 (the minimum) faults less to begin with, ~20k
    # without and 8-12k with: its XLA:CPU keeps more of the step's buffers.
    assert plain["faults"] > 2_000, plain
    factor = 10 if jax.__version_info__ >= (0, 10) else 1.5
    assert tuned["faults"] < plain["faults"] / factor, (plain, tuned)


def test_configure_allocator_rejects_values_mallopt_cannot_take():
    with pytest.raises(
        tx.TitanaxError, match=r"Expected `mmap_threshold` in \[1, 2\*\*31 - 1\]"
    ):
        tx.configure_allocator(mmap_threshold=1 << 32)


TRAIN_PROGRAM = """
import ctypes, re, sys
sys.path.insert(0, {root!r})
from titanax._cli import main
assert main(["train", {config!r}, "steps=2", "logging.console=none"]) == 0
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
stream = libc.fopen({xml!r}.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))  # one <heap> per malloc arena
libc.fclose(ctypes.c_void_p(stream))
print(len(re.findall("<heap nr=", open({xml!r}).read())))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux only)"
)
def test_titanax_train_configures_the_allocator_first(tmp_path):
    # `titanax train` in a fresh process calls `configure_allocator` before JAX
    # starts: XLA's threads then share one malloc arena. Measured without the call:
    # 16 arenas after the same 2 steps (2-core x86-64, glibc 2.36).
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["JAX_PLATFORMS"] = "cpu"
    code = TRAIN_PROGRAM.format(
        root=str(ROOT),
        config=str(ROOT / "examples" / "configs" / "mnist_dp.yaml"),
        xml=str(tmp_path / "malloc.xml"),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "configure_allocator" not in out.stderr  # not called too late
    assert int(out.stdout.strip().splitlines()[-1]) == 1
