"""FLOPs for MFU (titanax/_flops.py): the traced matmul count, exact on known
shapes, and XLA's count where it counts everything."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from titanax._flops import matmul_flops, step_flops


def test_a_matmul_counts_two_flops_per_multiply_add():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert matmul_flops(jnp.matmul, a, b) == 2 * 8 * 16 * 4


def test_batched_dots_scans_and_gradients_count_every_matmul():
    x, w = jnp.ones((3, 8, 16)), jnp.ones((16, 4))

    def layer(x, w):
        return jnp.einsum("bti,io->bto", x, w)  # (3*8) rows

    assert matmul_flops(layer, x, w) == 2 * 24 * 16 * 4

    def scanned(x, ws):  # 5 iterations of an (8,16)@(16,16)
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    assert matmul_flops(scanned, x[0], jnp.ones((5, 16, 16))) == 5 * 2 * 8 * 16 * 16

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    # Forward, and the weight gradient (x is not differentiated): 2 matmuls.
    assert matmul_flops(jax.grad(loss), w, x[0]) == 2 * (2 * 8 * 16 * 4)


def test_a_shard_map_body_counts_once_per_device():
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    f = jax.shard_map(
        lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")
    )
    assert matmul_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4


def test_step_flops_is_xla_count_where_it_counts_everything():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))

    def f(a, b):
        return jnp.tanh(a @ b)

    compiled = jax.jit(f).lower(a, b).compile()
    xla = compiled.cost_analysis()["flops"]
    assert xla >= 2 * 64 * 32 * 16  # CPU: the matmul and the elementwise work
    assert step_flops(compiled, f, (a, b), devices=1) == xla
