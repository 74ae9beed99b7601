"""Data parallelism written by hand, per device, next to the same model under `jax.jit`.

    python examples/spmd_dp.py

Eight simulated CPU devices. Two copies of one small MLP train on the same batches with
plain SGD (where an N× gradient error would show at once):

- **spmd**: a per-device step under `tx.spmd` (a `jax.shard_map`). Each device sees
  1/8 of the batch, takes its local gradient with `tx.value_and_grad`, and averages it
  with one explicit `tx.tx.collectives.pmean(grads, "data")`.
- **jit**: the whole-batch step under `jax.jit`, the batch sharded over `data`; XLA
  inserts the gradient all-reduce itself.

Both print their loss each step, and the script asserts they agree.
"""

import os

# Before JAX is imported: simulate 8 devices on the CPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import titanax as tx  # noqa: E402

LR = 0.5
STEPS = 10
BATCH = 128  # 16 examples per device


def loss_fn(model: eqx.nn.MLP, batch: dict) -> jax.Array:
    logits = jax.vmap(model)(batch["x"])  # (B, 4)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def sgd(model: eqx.nn.MLP, grads: eqx.nn.MLP) -> eqx.nn.MLP:
    return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))


# --- the per-device program --------------------------------------------------------


def spmd_step(model: eqx.nn.MLP, batch: dict) -> tuple[eqx.nn.MLP, jax.Array]:
    # Runs on every device with its own 16 examples; `model` is replicated.
    loss, grads = tx.value_and_grad(loss_fn)(model, batch)  # local gradient
    grads = tx.collectives.pmean(grads, "data")  # the one gradient all-reduce
    return sgd(model, grads), tx.collectives.pmean(loss, "data")


# --- the default mode: one program, XLA partitions it --------------------------------


def jit_step(params, batch, static):
    model = eqx.combine(params, static)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    return eqx.filter(sgd(model, grads), eqx.is_array), loss


def main() -> None:
    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(dp=tx.DP("data"))
    model = eqx.nn.MLP(8, 4, width_size=32, depth=2, key=jax.random.key(0))

    # The spmd step: specs come from the plan (params replicated, batch split on
    # "data"); the MLP's activation functions are split off before shard_map.
    step_a = tx.spmd(spmd_step, plan, mesh)

    params, static = eqx.partition(model, eqx.is_array)
    step_b = jax.jit(
        lambda p, b: jit_step(p, b, static),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
    )

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)).astype(np.float32)
    model_a, params_b = model, params
    for step in range(STEPS):
        y = rng.integers(0, 4, BATCH)
        x = centers[y] + 0.5 * rng.standard_normal((BATCH, 8)).astype(np.float32)
        batch = {"x": x, "y": y.astype(np.int32)}
        model_a, loss_a = step_a(model_a, batch)
        params_b, loss_b = step_b(params_b, batch)
        la, lb = float(loss_a), float(loss_b)
        print(f"step {step}: spmd loss {la:.6f}   jit loss {lb:.6f}")
        assert abs(la - lb) < 1e-5, (la, lb)

    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(eqx.filter(model_a, eqx.is_array)),
            jax.tree.leaves(params_b),
            strict=True,
        )
    )
    print(f"max parameter difference after {STEPS} steps: {diff:.2e}")
    assert diff < 1e-5, diff
    assert float(loss_a) < 1.0, "the classifier should be learning"


if __name__ == "__main__":
    main()
