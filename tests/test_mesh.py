"""Meshes on 8 simulated CPU devices: sizes, -1 fill, order, axis types, MeshSpec."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

import titanax as tx
from titanax._errors import MeshError


@pytest.mark.parametrize(
    "sizes, shape",
    [
        pytest.param({"data": 8}, {"data": 8}, id="dp8"),
        pytest.param({"data": -1}, {"data": 8}, id="dp-fill"),
        pytest.param({"data": 2, "model": 4}, {"data": 2, "model": 4}, id="dp2_tp4"),
        pytest.param({"data": -1, "model": 4}, {"data": 2, "model": 4}, id="fill-2x4"),
        pytest.param({"data": 4, "model": -1}, {"data": 4, "model": 2}, id="4x-fill"),
        pytest.param(
            {"pipe": 2, "data": -1, "model": 2},
            {"pipe": 2, "data": 2, "model": 2},
            id="pp2_dp2_tp2",
        ),
    ],
)
def test_make_mesh_sizes(sizes, shape):
    mesh = tx.make_mesh(**sizes)
    assert dict(mesh.shape) == shape
    assert tuple(mesh.axis_names) == tuple(shape)  # keyword order is axis order
    assert mesh.devices.size == 8


def test_axis_order_follows_keywords():
    mesh = tx.make_mesh(model=4, data=2)
    assert mesh.axis_names == ("model", "data")
    assert mesh.devices.shape == (4, 2)
    # Row-major: the last axis varies fastest over the sorted devices.
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, np.arange(8).reshape(4, 2))


def test_axis_types_are_auto():
    mesh = tx.make_mesh(data=2, model=4)
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_device_order_is_sorted_by_process_then_id():
    devices = jax.devices()
    shuffled = [devices[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    mesh = tx.make_mesh(shuffled, data=2, model=4)
    flat = list(mesh.devices.flat)
    assert [(d.process_index, d.id) for d in flat] == sorted(
        (d.process_index, d.id) for d in devices
    )
    assert flat == tx.make_mesh(data=2, model=4).devices.flat.copy().tolist()


def test_subset_of_devices():
    mesh = tx.make_mesh(jax.devices()[:4], data=-1)
    assert dict(mesh.shape) == {"data": 4}


def test_meshspec_of_mesh():
    mesh = tx.make_mesh(data=2, model=4)
    spec = tx.MeshSpec.of(mesh)
    assert spec.axis_names == ("data", "model")
    assert spec.axis_sizes == (2, 4)
    assert spec.shape == {"data": 2, "model": 4}
    assert spec.size("data") == 2
    assert spec.size("model") == 4
    # One process holds every device: its first device is at the origin.
    assert spec.coords() == {"data": 0, "model": 0}
    assert spec.rank("data") == 0
    assert spec.rank("model") == 0
    assert (
        spec.describe() == "mesh data=2 x model=4 over 8 cpu device(s) in 1 process(es)"
    )


def test_meshspec_from_sizes_builds():
    spec = tx.MeshSpec.from_sizes(data=-1, model=4)
    assert spec.mesh is None
    assert spec.describe() == "mesh data=-1 x model=4 (not built)"
    built = spec.build()
    assert isinstance(built.mesh, Mesh)
    assert built.shape == {"data": 2, "model": 4}


@pytest.mark.parametrize(
    "batch, axes",
    [
        pytest.param(16, None, id="default-data"),
        pytest.param(2, None, id="exactly-data"),
        pytest.param(8, ("data", "model"), id="both-axes"),
    ],
)
def test_validate_compatibility_accepts(batch, axes):
    tx.MeshSpec.of(tx.make_mesh(data=2, model=4)).validate_compatibility(batch, axes)


def test_validate_compatibility_names_sizes_and_fix():
    spec = tx.MeshSpec.of(tx.make_mesh(data=2, model=4))
    with pytest.raises(
        MeshError, match=r"batch of 12 .* data=2 x model=4 \(8 shards\)"
    ):
        spec.validate_compatibility(12, ("data", "model"))
    with pytest.raises(MeshError) as info:
        spec.validate_compatibility(12, ("data", "model"))
    assert info.value.suggestion == "Use a batch size divisible by 8, e.g. 8 or 16."
    with pytest.raises(MeshError) as info:
        spec.validate_compatibility(3, ("data", "model"))
    assert info.value.suggestion == "Use a batch size divisible by 8, e.g. 8 or 16."


def test_simulate_cpu_devices_same_count_is_a_no_op():
    tx.simulate_cpu_devices(8)
    assert len(jax.devices()) == 8


def test_simulate_cpu_devices_in_a_fresh_process():
    """Before JAX starts, `simulate_cpu_devices(n)` yields n CPU devices."""
    code = (
        "import titanax as tx; tx.simulate_cpu_devices(4); import jax; "
        "print(len(jax.devices()), dict(tx.make_mesh(data=-1).shape))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "4 {'data': 4}"
