"""`titanax._compat`: version-sensitive APIs stay in one module, and each shim works.

The first half reads every module of `titanax/` (its syntax tree, so docstrings and
comments may name anything) and fails if a version-sensitive JAX or Orbax API is used
outside `titanax/_compat.py`. The second half checks each shim with numbers under the
JAX that is running; CI runs this file under the newest and the minimum versions
(`make test` and `make test-min`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from titanax import TitanaxError, _compat
from titanax._flops import matmul_flops
from titanax._mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "titanax"
COMPAT = PACKAGE / "_compat.py"

# Fully qualified names (import aliases resolved) whose spelling or behaviour differs
# across the supported versions; a use of the name or of anything under it counts.
SENSITIVE_NAMES = {
    "jax.shard_map": "check_vma since 0.6.1; jax.experimental's check_rep before",
    "jax.experimental.shard_map": "deprecated 0.8, a different object",
    "jax.lax.pcast": "jax >= 0.9 only",
    "jax.lax.pvary": "deprecated in 0.9, removed in 0.10",
    "jax.lax.pbroadcast": "lowers on GPU only",
    "jax.lax.all_gather_invariant": "removed in 0.9",
    "jax.typeof": "its `vma` field became `mat` in 0.10",
    "jax.set_mesh": "jax >= 0.7 (jax.sharding.use_mesh before)",
    "jax.sharding.set_mesh": "jax >= 0.7",
    "jax.sharding.use_mesh": "jax 0.6 only",
    "jax.sharding.get_abstract_mesh": "the trace's mesh; see trace_mesh_axes",
    "jax.sharding.AxisType": "mesh axis types: see auto_mesh",
    "jax.make_mesh": "default axis types: Auto before 0.9, Explicit from 0.9",
    "jax.reshard": "jax >= 0.7",
    "jax.sharding.reshard": "jax >= 0.7",
    "jax.sharding.auto_axes": "jax >= 0.7",
    "jax.sharding.explicit_axes": "jax >= 0.7",
    "jax._src": "JAX's private modules",
    "jax.extend": "outside JAX's compatibility policy",
    "jax.experimental": "experimental modules move and change",
    "jax.distributed.initialize": "heartbeat_timeout_seconds from 0.7, more from 0.10",
    "orbax.checkpoint._src": "Orbax's private modules",
    "orbax.checkpoint.type_handlers": "ArrayHandler's arguments differ by release",
}
# Attribute names (on any object) whose presence depends on the version.
SENSITIVE_ATTRIBUTES = {
    "vma": "jax.typeof(x).vma: jax 0.6.1-0.9",
    "mat": "jax.typeof(x).mat: jax >= 0.10",
    "manual_axis_type": "an aval field of some jax 0.10 builds",
    "memory_analysis": "fields differ (peak_memory_in_bytes from 0.7)",
    "cost_analysis": "a list of dicts in old jax, a dict now",
    "peak_memory_in_bytes": "jax >= 0.7",
    "backends_are_initialized": "private (jax._src.xla_bridge)",
    "jax_enable_preemption_service": "a config option from jax 0.9",
    "memory_stats": "None on CPU, missing on some PjRt plugins",
}
# Keyword arguments that exist only in some versions.
SENSITIVE_KEYWORDS = {
    "check_rep": "jax.experimental.shard_map only",
    "heartbeat_timeout_seconds": "jax.distributed.initialize from 0.7",
    "shutdown_timeout_seconds": "jax.distributed.initialize from 0.10",
}
# String constants (equation parameter names) that differ by version.
SENSITIVE_STRINGS = {
    "manual_axes": "a shard_map equation's parameter in jax 0.7.2-0.9",
    "newly_manual_axes": "a shard_map equation's parameter from jax 0.10",
}


# --- the checker ----------------------------------------------------------------------


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> fully qualified name, from the module's imports."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    out[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _getattr_name(call: ast.Call) -> str | None:
    """The attribute name of a `getattr(obj, "name", ...)`/`hasattr` call, if any."""
    func = call.func
    if (
        isinstance(func, ast.Name)
        and func.id in ("getattr", "hasattr")
        and len(call.args) >= 2
        and isinstance(call.args[1], ast.Constant)
        and isinstance(call.args[1].value, str)
    ):
        return call.args[1].value
    return None


def _sensitive(name: str) -> str | None:
    for banned in SENSITIVE_NAMES:
        if name == banned or name.startswith(banned + "."):
            return banned
    return None


def version_sensitive_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each version-sensitive API `source` uses in code."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            if node.attr in SENSITIVE_ATTRIBUTES:
                found.add((node.lineno, f".{node.attr}"))
            parts = _dotted(node)
            if parts and parts[0] in aliases:
                names = [".".join([aliases[parts[0]], *parts[1:]])]
        elif isinstance(node, ast.Name) and node.id in aliases:
            names = [aliases[node.id]]
        elif isinstance(node, ast.Constant) and node.value in SENSITIVE_STRINGS:
            found.add((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Call):
            attr = _getattr_name(node)
            if attr in SENSITIVE_ATTRIBUTES:
                found.add((node.lineno, f".{attr}"))
            parts = _dotted(node.args[0]) if attr else None
            if parts and parts[0] in aliases:  # getattr(jax.lax, "pvary", None)
                names = [".".join([aliases[parts[0]], *parts[1:], str(attr)])]
            for kw in node.keywords:
                if kw.arg in SENSITIVE_KEYWORDS:
                    found.add((node.lineno, f"{kw.arg}="))
        for name in names:
            banned = _sensitive(name)
            if banned:
                found.add((getattr(node, "lineno", 0), banned))
    return sorted(found)


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import jax\njax.shard_map(f, mesh=m)", "jax.shard_map"),
        ("from jax import lax\nlax.pvary(x, 'data')", "jax.lax.pvary"),
        ("import jax.lax as L\nL.pcast(x, 'a', to='varying')", "jax.lax.pcast"),
        ("from jax.sharding import AxisType", "jax.sharding.AxisType"),
        ("from jax._src import xla_bridge", "jax._src"),
        (
            "import orbax.checkpoint as ocp\nocp.type_handlers.ArrayHandler()",
            "orbax.checkpoint.type_handlers",
        ),
        ("compiled.memory_analysis().temp_size_in_bytes", ".memory_analysis"),
        ("getattr(jax.typeof(x), 'vma', None)", ".vma"),
        ("import jax\nsetter = getattr(jax, 'set_mesh', None)", "jax.set_mesh"),
        ("shard_map(f, check_rep=False)", "check_rep="),
        ("eqn.params.get('newly_manual_axes')", "'newly_manual_axes'"),
        ("from jax.extend import core", "jax.extend"),
        (
            "from jax.experimental import multihost_utils\n"
            "multihost_utils.reached_preemption_sync_point(3)",
            "jax.experimental",
        ),
        ("jax.config.jax_enable_preemption_service", ".jax_enable_preemption_service"),
        ("import jax\njax.distributed.initialize('h:1')", "jax.distributed.initialize"),
        ("init(heartbeat_timeout_seconds=10)", "heartbeat_timeout_seconds="),
        ("device.memory_stats()", ".memory_stats"),
    ],
    ids=[
        "shard_map",
        "lax-alias",
        "module-alias",
        "from-import",
        "private-jax",
        "orbax-handlers",
        "compiled-memory",
        "getattr-vma",
        "getattr-module",
        "check_rep",
        "shard_map-param",
        "extend",
        "experimental",
        "preemption-option",
        "distributed",
        "heartbeat",
        "memory-stats",
    ],
)
def test_checker_finds_sensitive_uses(snippet, expected):
    found = {what for _, what in version_sensitive_uses(snippet)}
    assert expected in found, found


def test_checker_ignores_docstrings_comments_and_stable_apis():
    source = textwrap.dedent(
        '''
        """Wraps `jax.shard_map`; `jax.lax.pvary` is the old name."""
        import jax
        from jax.sharding import Mesh, NamedSharding
        # jax.typeof(x).vma
        y = jax.jit(f)(jax.tree.map(g, x))
        '''
    )
    assert version_sensitive_uses(source) == []


def test_version_sensitive_apis_are_used_only_in_compat():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == COMPAT:
            continue
        for line, what in version_sensitive_uses(path.read_text()):
            why = SENSITIVE_NAMES.get(what) or SENSITIVE_ATTRIBUTES.get(
                what.lstrip(".")
            )
            why = why or SENSITIVE_KEYWORDS.get(what.rstrip("="))
            why = why or SENSITIVE_STRINGS.get(what.strip("'"), "")
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what} ({why})")
    assert not offenders, (
        "version-sensitive APIs outside titanax/_compat.py; add a shim there and "
        "import it instead:\n" + "\n".join(offenders)
    )


def test_compat_uses_what_it_guards():
    # The guard list is about the APIs `_compat` wraps: each shim's API appears there.
    found = {what for _, what in version_sensitive_uses(COMPAT.read_text())}
    for name in (
        "jax.shard_map",
        "jax.lax.pvary",
        "jax.typeof",
        "jax.set_mesh",
        "jax.sharding.get_abstract_mesh",
        "jax.sharding.AxisType",
        "jax._src",
        "jax.extend",
        "jax.experimental",
        "jax.distributed.initialize",
        ".vma",
        ".mat",
        ".memory_analysis",
        ".cost_analysis",
        ".peak_memory_in_bytes",
        ".backends_are_initialized",
        ".jax_enable_preemption_service",
        ".memory_stats",
        "heartbeat_timeout_seconds=",
        "'manual_axes'",
        "'newly_manual_axes'",
        "orbax.checkpoint.type_handlers",
    ):
        assert name in found, name


# --- the shims, under the running JAX ---------------------------------------------


def _seen_inside(mesh, specs, body, *args, axis_names=None):
    """Run `body` in a jitted shard_map and return what it recorded while tracing."""
    seen: dict[str, object] = {}

    def wrapped(*xs):
        body(seen, *xs)
        return jnp.zeros(())

    fn = _compat.shard_map(
        wrapped, mesh=mesh, in_specs=specs, out_specs=P(), axis_names=axis_names
    )
    jax.jit(fn)(*args)
    return seen


def test_varying_axes_and_mark_varying_inside_shard_map():
    mesh = make_mesh(data=8)

    def body(seen, w, x):
        seen["replicated"] = _compat.varying_axes(w)
        seen["sharded"] = _compat.varying_axes(x)
        seen["marked"] = _compat.varying_axes(_compat.mark_varying(w, ("data",)))
        seen["mesh"] = _compat.trace_mesh_axes()

    seen = _seen_inside(mesh, (P(), P("data")), body, jnp.ones(3), jnp.ones(8))
    assert seen == {
        "replicated": frozenset(),
        "sharded": frozenset({"data"}),
        "marked": frozenset({"data"}),
        "mesh": (("data",), ("data",)),
    }


def test_varying_axes_outside_shard_map():
    assert _compat.varying_axes(jnp.ones(3)) == frozenset()
    assert _compat.varying_axes(np.float32(1.0)) == frozenset()
    assert _compat.varying_axes("not an array") is None


def test_partial_shard_map_has_manual_and_automatic_axes():
    mesh = make_mesh(data=2, model=4)

    def body(seen, x):
        seen["mesh"] = _compat.trace_mesh_axes()
        seen["local"] = x.shape

    seen = _seen_inside(
        mesh, (P("data"),), body, jnp.ones((8, 4)), axis_names=frozenset({"data"})
    )
    assert seen == {"mesh": (("data", "model"), ("data",)), "local": (4, 4)}


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "unchecked"])
def test_gradient_of_a_replicated_input(check_vma):
    """check_vma sums a replicated input's gradient over the axis; pvary undoes it."""
    mesh = make_mesh(data=8)
    x = jnp.arange(16.0)  # device i holds x[2i:2i+2]
    w = jnp.ones(())

    def implicit(w, x):  # no marking: check_vma decides
        return jax.grad(lambda w: jnp.sum(w * x))(w)[None]

    def marked(w, x):  # local gradient, then the mean over devices
        g = jax.grad(lambda w: jnp.sum(w * x))(_compat.mark_varying(w, ("data",)))
        return jax.lax.pmean(g, "data")[None]

    def run(body):
        fn = _compat.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
            check_vma=check_vma,
        )
        return np.asarray(jax.jit(fn)(w, x))

    local = np.asarray(x).reshape(8, 2).sum(axis=1)  # each device's own gradient
    if check_vma:
        np.testing.assert_array_equal(run(implicit), np.full(8, local.sum()))
        np.testing.assert_array_equal(run(marked), np.full(8, local.mean()))
    else:
        np.testing.assert_array_equal(run(implicit), local)


def test_auto_mesh_axis_types():
    devices = np.array(jax.devices()).reshape(2, 4)
    mesh = _compat.auto_mesh(devices, ["data", "model"])
    assert mesh.axis_names == ("data", "model")
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.shape == (2, 4)


def test_set_mesh_makes_bare_specs_resolve():
    mesh = make_mesh(data=2, model=4)
    assert _compat.trace_mesh_axes() == ((), ())
    with _compat.set_mesh(mesh):
        assert _compat.trace_mesh_axes() == (("data", "model"), ())
        y = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, P("data")))(
            jnp.arange(8.0)
        )
    assert _compat.trace_mesh_axes() == ((), ())
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
    np.testing.assert_array_equal(y, 2 * np.arange(8.0))


def test_backends_initialized_in_a_fresh_process():
    code = textwrap.dedent(
        """
        from titanax import _compat
        before = _compat.backends_initialized()
        import jax
        jax.devices()
        print(before, _compat.backends_initialized())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.split() == ["False", "True"]
    assert _compat.backends_initialized()


def test_compiled_memory_counts_bytes():
    x, y = jnp.ones((64, 32)), jnp.ones((32, 16))
    mem = _compat.compiled_memory(jax.jit(jnp.matmul).lower(x, y).compile())
    assert (mem.argument, mem.output, mem.alias) == (
        (64 * 32 + 32 * 16) * 4,
        64 * 16 * 4,
        0,
    )
    assert mem.peak >= mem.argument + mem.output
    donated = jax.jit(lambda a: a + 1, donate_argnums=0).lower(x).compile()
    assert _compat.compiled_memory(donated).alias == 64 * 32 * 4


def test_compiled_cost_counts_matmul_flops():
    x, y = jnp.ones((64, 32)), jnp.ones((32, 16))
    cost = _compat.compiled_cost(jax.jit(jnp.matmul).lower(x, y).compile())
    assert cost["flops"] == 2 * 64 * 32 * 16


def test_orbax_type_handlers_save_and_restore_resharded(tmp_path):
    import orbax.checkpoint as ocp

    mesh = make_mesh(data=8)
    other = make_mesh(data=2, model=4)
    tree = {
        "sharded": jax.device_put(
            jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data"))
        ),
        "replicated": jax.device_put(jnp.arange(3), NamedSharding(mesh, P())),
    }
    registry = _compat.orbax_type_handler_registry(use_replica_parallel=False)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "ckpt", args=ocp.args.PyTreeSave(tree))
        targets = {
            "sharded": NamedSharding(other, P("model", "data")),
            "replicated": NamedSharding(other, P()),
        }
        restore_args = {
            k: ocp.ArrayRestoreArgs(
                sharding=s, global_shape=tree[k].shape, dtype=tree[k].dtype
            )
            for k, s in targets.items()
        }
        got = ckptr.restore(
            tmp_path / "ckpt", args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    for k, s in targets.items():
        np.testing.assert_array_equal(got[k], tree[k])
        assert got[k].sharding == s
    assert got["sharded"].addressable_shards[0].data.shape == (2, 2)


def test_an_older_jax_is_refused_with_the_version_it_needs():
    # What jax 0.6.2 offers: shard_map and typeof, but no jax.set_mesh.
    jax_062 = types.SimpleNamespace(
        __version__="0.6.2", shard_map=jax.shard_map, typeof=jax.typeof
    )
    with pytest.raises(
        TitanaxError,
        match=r"Expected jax >= 0\.7\.2, got jax 0\.6\.2, which lacks `jax\.set_mesh`",
    ):
        _compat._check_jax(jax_062)
    _compat._check_jax(jax)  # the running one is supported


@pytest.mark.parametrize(
    "axis_names, manual, local_rows",
    [(None, {"data", "model"}, 1), (frozenset({"data"}), {"data"}, 4)],
    ids=["all-manual", "data-manual"],
)
def test_shard_map_equation_names_its_manual_axes(axis_names, manual, local_rows):
    mesh = make_mesh(data=2, model=4)
    spec = P(("data", "model")) if axis_names is None else P("data")
    f = _compat.shard_map(
        lambda a, b: a @ b,
        mesh=mesh,
        in_specs=(spec, P()),
        out_specs=spec,
        axis_names=axis_names,
    )
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    (eqn,) = jax.make_jaxpr(f)(a, b).jaxpr.eqns
    assert eqn.primitive.name == "shard_map"
    assert _compat.shard_map_manual_axes(eqn.params) == manual
    body = eqn.params["jaxpr"]
    assert _compat.is_jaxpr(body) and not _compat.is_jaxpr(jax.make_jaxpr(f)(a, b))
    assert body.invars[0].aval.shape == (local_rows, 16)
    # The body runs once per device of its manual axes: the global matmul's FLOPs
    # (jax 0.7.2-0.9 name the parameter differently; a miss counted 4x here).
    assert matmul_flops(f, a, b) == 2 * 8 * 16 * 4


def test_distributed_initialize_refuses_arguments_jax_lacks():
    with pytest.raises(
        TitanaxError,
        match=r"got `no_such_timeout`, which jax .* does not know",
    ):
        _compat.distributed_initialize(heartbeat_timeout_s=5, no_such_timeout=1)
    assert not jax.distributed.is_initialized()


def test_preemption_service_option():
    if not hasattr(jax.config, "jax_enable_preemption_service"):
        # jax 0.7.2-0.8.x: no option, `jax.distributed.initialize` always starts it.
        assert _compat.preemption_service_enabled() is True
        return
    assert _compat.preemption_service_enabled() is True  # JAX's default
    jax.config.update("jax_enable_preemption_service", False)
    try:
        assert _compat.preemption_service_enabled() is False
    finally:
        jax.config.update("jax_enable_preemption_service", True)


def test_memory_stats_of_cpu_devices_is_none():
    # The CPU backend keeps no allocator statistics (GPUs and TPUs do).
    assert [_compat.memory_stats(d) for d in jax.devices()] == [None] * 8
