"""Minimal sharding: a small MLP, a 2x4 mesh on 8 simulated CPU devices, DP + TP.

The model names the logical axes of its arrays (`embed`, `mlp`); the plan maps them to
mesh axes (`mlp` → `model` for tensor parallelism, the batch over `data`). Nothing else
says how anything is sharded.

Run it with `make demo` or `python examples/minimal_sharding.py` (a few seconds).
"""

import os

# This example simulates its devices on the CPU, even where a GPU is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import titanax as tx  # noqa: E402

# Before any JAX computation: JAX fixes its device count when its backends start.
tx.simulate_cpu_devices(8)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jaxtyping import Array, Float, PRNGKeyArray  # noqa: E402

EMBED, MLP_SIZE, BATCH = 128, 512, 16


class MLP(eqx.Module):
    """A two-layer MLP whose fields name their logical axes."""

    # The jaxtyping annotations name the dims: source 4 of the five.
    w_in: Float[Array, "embed mlp"]  # column-parallel under TP: `mlp` split
    b_in: Float[Array, "mlp"]
    w_out: Float[Array, "mlp embed"]  # row-parallel under TP: `mlp` split
    b_out: Float[Array, "embed"]
    # A plain `Array` annotation names nothing; `tx.field` does (source 3).
    scale: Array = tx.field(axes=("embed",))

    def __init__(self, key: PRNGKeyArray, embed: int = EMBED, mlp: int = MLP_SIZE):
        k_in, k_out = jax.random.split(key)
        self.w_in = jax.random.normal(k_in, (embed, mlp)) / np.sqrt(embed)
        self.b_in = jnp.zeros((mlp,))
        self.w_out = jax.random.normal(k_out, (mlp, embed)) / np.sqrt(mlp)
        self.b_out = jnp.zeros((embed,))
        self.scale = jnp.ones((embed,))

    def __call__(self, x: Float[Array, "batch embed"]) -> Float[Array, "batch embed"]:
        h = jax.nn.gelu(x @ self.w_in + self.b_in)  # (B, mlp), sharded over `model`
        # XLA inserts the all-reduce over `model` that row-parallel needs here.
        return (h @ self.w_out + self.b_out) * self.scale  # (B, embed)


def main() -> None:
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))

    # `tx.init` compiles the constructor with the plan's out_shardings: each device
    # creates only its own shards, so the whole model never sits on one device.
    model = tx.init(MLP, jax.random.key(0), plan, mesh)
    print(tx.explain(model, plan, mesh))
    print()

    expected = {
        "w_in": (EMBED, MLP_SIZE // 4),  # `mlp` over model=4
        "b_in": (MLP_SIZE // 4,),
        "w_out": (MLP_SIZE // 4, EMBED),
        "b_out": (EMBED,),  # replicated
        "scale": (EMBED,),  # replicated
    }
    print("shard shape per device:")
    for name, want in expected.items():
        leaf = getattr(model, name)
        got = leaf.addressable_shards[0].data.shape
        shape, spec = str(leaf.shape), leaf.sharding.spec
        print(f"  MLP.{name:<6} {shape:<11} -> {str(got):<11} {spec}")
        assert got == want, f"MLP.{name}: shard shape {got}, expected {want}"
        assert all(s.data.shape == want for s in leaf.addressable_shards)

    # The batch's leading dim is split over `data`: (16, 128) → (8, 128) per device.
    x = jax.random.normal(jax.random.key(1), (BATCH, EMBED))
    x = jax.device_put(x, NamedSharding(mesh, plan.batch_spec(2)))
    assert x.addressable_shards[0].data.shape == (BATCH // 2, EMBED)

    y = jax.jit(lambda m, x: m(x))(model, x)
    print(f"\nforward: x {x.shape} {x.sharding.spec} -> y {y.shape} {y.sharding.spec}")

    # The same numbers as the unsharded model on one device.
    reference = MLP(jax.random.key(0))
    want_y = reference(jnp.asarray(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    print("matches the single-device forward: OK")


if __name__ == "__main__":
    main()
