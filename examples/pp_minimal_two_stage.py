"""Minimal pipeline: a stack of 8 residual MLP layers in 2 stages, 1F1B, DP on top.

8 simulated CPU devices form a `data=4 x pipe=2` mesh: each stage holds 4 of the 8
layers, each data shard a quarter of the batch. A step runs the 1F1B schedule printed
below (per tick, per stage: forward `F`/backward `B` of a microbatch, `.` idle) with
activations and cotangents moved between the stages by `ppermute` (one per tick,
carrying only that tick's real transfers), then one gradient mean over `data`.
Four SGD steps; the loss goes down.

Run it with `python examples/pp_minimal_two_stage.py` (a few seconds).
"""

import os

# Before JAX is imported: JAX fixes its device count when its backends start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jaxtyping import Array, Float  # noqa: E402

from titanax._hlo import collectives  # noqa: E402
from titanax._mesh import make_mesh  # noqa: E402
from titanax._plan import DP, PP, Plan  # noqa: E402
from titanax._sharding import shard  # noqa: E402
from titanax.parallel.pipeline import (  # noqa: E402
    Stage,
    pipeline_schedule,
    pipeline_value_and_grad,
    send_patterns,
)

LAYERS, WIDTH, BATCH, MICROBATCHES, LR = 8, 32, 64, 4, 0.05


class Layer(eqx.Module):
    """One residual MLP layer; stacked, every array gains a leading `layers` dim."""

    w_in: Float[Array, "embed mlp"]
    w_out: Float[Array, "mlp embed"]

    def __init__(self, key):
        k_in, k_out = jax.random.split(key)
        self.w_in = 0.3 * jax.random.normal(k_in, (WIDTH, 2 * WIDTH)) / WIDTH**0.5
        self.w_out = 0.3 * jax.random.normal(k_out, (2 * WIDTH, WIDTH)) / WIDTH**0.5

    def __call__(self, h, key=None):
        return h + jnp.tanh(h @ self.w_in) @ self.w_out  # (b, embed)


class Model(eqx.Module):
    """Input projection, the stacked layers, a linear head: plain, mesh-free."""

    w_embed: Float[Array, "din embed"]
    layers: Layer
    w_head: Float[Array, "embed dout"]

    def __init__(self, key):
        k_embed, k_layers, k_head = jax.random.split(key, 3)
        self.w_embed = jax.random.normal(k_embed, (8, WIDTH)) / 8**0.5
        self.layers = eqx.filter_vmap(Layer)(jax.random.split(k_layers, LAYERS))
        self.w_head = jax.random.normal(k_head, (WIDTH, 1)) / WIDTH**0.5


# What runs before, in and after the stack; the pipeline splits `layers`.
stage = Stage(
    where=lambda m: m.layers,
    pre=lambda m, batch, key: batch["x"] @ m.w_embed,
    post=lambda m, h, batch, key: jnp.mean((h @ m.w_head - batch["y"]) ** 2),
)

mesh = make_mesh(data=4, pipe=2)
plan = Plan(dp=DP("data"), pp=PP("pipe", microbatches=MICROBATCHES, schedule="1f1b"))
schedule = pipeline_schedule("1f1b", stages=2, microbatches=MICROBATCHES)
print(schedule)

key_x, key_model = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (BATCH, 8))
batch = {"x": x, "y": jnp.sin(x.sum(axis=1, keepdims=True))}
model = shard(Model(key_model), plan, mesh)


@jax.jit
def sgd_step(model, batch):
    loss, _, grads = pipeline_value_and_grad(
        stage, model, batch, None, plan=plan, mesh=mesh
    )
    return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads)), loss


hlo = sgd_step.lower(model, batch).compile().as_text()
for c in collectives(hlo, mesh):
    where = "in the tick loop" if c.in_loop else "once"
    print(f"  {c.kind:<18} over {','.join(c.axes):<5} {c.bytes:>6} B  {where}")
# Each tick runs the one permute whose pairs are that tick's real transfers.
per_tick, patterns = send_patterns(schedule)
sends = [" ".join(f"{a}>{b}" for a, b in patterns[i]) or "-" for i in per_tick]
print("stage>stage sends per tick: " + " | ".join(sends))
assert sum(len(patterns[i]) for i in per_tick) == 2 * MICROBATCHES  # 2 M (S - 1)

losses = []
for step in range(4):
    model, loss = sgd_step(model, batch)
    losses.append(float(loss))
    print(f"step {step}: loss {losses[-1]:.4f}")
assert losses[-1] < losses[0], losses
