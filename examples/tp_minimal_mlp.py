"""Tensor parallelism, minimal: an MLP whose hidden dim is split over `model`.

Eight simulated CPU devices form one `model` axis. The MLP names its hidden dim
`mlp`; the plan maps `mlp` to `model`, and that is all: `w_in` becomes
column-parallel (each device holds 1/8 of its columns and computes 1/8 of the
hidden activations) and `w_out` row-parallel (each device multiplies its slice, and
XLA adds one all-reduce over `model` to sum the partial outputs). Gradients come
out sharded like the weights.

The script asserts those shard shapes, checks the compiled step holds exactly the
Megatron all-reduces, and trains 5 steps (the loss falls). Run it with
`python examples/tp_minimal_mlp.py` (a few seconds).
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
from jax.sharding import PartitionSpec as P  # noqa: E402
from jaxtyping import Array, Float, PRNGKeyArray  # noqa: E402

from titanax._hlo import collectives  # noqa: E402

EMBED, HIDDEN, BATCH, TP = 32, 256, 64, 8


class MLP(eqx.Module):
    """`y = gelu(x @ w_in) @ w_out`; the annotations name each dim."""

    w_in: Float[Array, "embed mlp"]  # column-parallel: `mlp` split over `model`
    w_out: Float[Array, "mlp embed"]  # row-parallel: `mlp` split over `model`

    def __init__(self, key: PRNGKeyArray):
        k_in, k_out = jax.random.split(key)
        self.w_in = jax.random.normal(k_in, (EMBED, HIDDEN)) / np.sqrt(EMBED)
        self.w_out = jax.random.normal(k_out, (HIDDEN, EMBED)) / np.sqrt(HIDDEN)

    def hidden(self, x: Float[Array, "B embed"]) -> Float[Array, "B mlp"]:
        return jax.nn.gelu(x @ self.w_in)

    def __call__(self, x: Float[Array, "B embed"]) -> Float[Array, "B embed"]:
        return self.hidden(x) @ self.w_out


def loss(model: MLP, batch: dict, key=None) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def main() -> None:
    mesh = tx.make_mesh(model=TP)
    plan = tx.Plan(tp=tx.TP("model", rules={"mlp": "model"}))
    model = tx.init(MLP, jax.random.key(0), plan, mesh)
    print(tx.explain(model, plan, mesh))

    # A regression target from a fixed random teacher.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, EMBED)).astype(np.float32)
    teacher = rng.standard_normal((EMBED, EMBED)).astype(np.float32) / np.sqrt(EMBED)
    batch = {"x": x, "y": np.tanh(x @ teacher)}

    # Weights: each device holds HIDDEN / 8 = 32 of the hidden units.
    assert model.w_in.sharding.spec == P(None, "model")
    assert model.w_out.sharding.spec == P("model", None)
    for shard in model.w_in.addressable_shards:
        assert shard.data.shape == (EMBED, HIDDEN // TP)
    for shard in model.w_out.addressable_shards:
        assert shard.data.shape == (HIDDEN // TP, EMBED)

    # Activations: the hidden layer is computed sharded, never whole on a device.
    h = jax.jit(lambda m, x: m.hidden(x))(model, x)
    print(f"hidden activation {h.shape}, spec {h.sharding.spec}")
    assert {s.data.shape for s in h.addressable_shards} == {(BATCH, HIDDEN // TP)}
    y = jax.jit(lambda m, x: m(x))(model, x)  # after the all-reduce: replicated
    assert {s.data.shape for s in y.addressable_shards} == {(BATCH, EMBED)}

    # Gradients: sharded exactly like the weights they belong to.
    grads = jax.jit(jax.grad(loss))(model, batch)
    for name in ("w_in", "w_out"):
        g, w = getattr(grads, name), getattr(model, name)
        print(f"grad {name} {g.shape}, spec {g.sharding.spec}")
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
        assert {s.data.shape for s in g.addressable_shards} == {
            s.data.shape for s in w.addressable_shards
        }

    # The compiled training step: Megatron's one all-reduce over `model` in the
    # forward (after w_out) and one in the backward (before w_in's input gradient,
    # which this model does not need, so XLA drops it), and no all-gather.
    step = tx.make_train_step(loss, tx.optim.adamw(1e-2), plan, mesh)
    state = step.init(model)
    ops = collectives(step.lower(state, batch).compile().as_text(), mesh)
    big = [c for c in ops if c.bytes >= BATCH * EMBED * 4]
    print("collectives per step:", [(c.kind, c.axes, c.bytes) for c in ops])
    assert [(c.kind, c.axes) for c in big] == [("all-reduce", ("model",))]
    assert not [c for c in ops if c.kind == "all-gather"]

    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    print("loss per step:", " ".join(f"{v:.4f}" for v in losses))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}: OK")


if __name__ == "__main__":
    main()
