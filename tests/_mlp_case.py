"""The small MLP classification case the Trainer and step tests share: the model,
host batches, and a host copy of a state (steps donate their input state)."""

import equinox as eqx
import jax
import numpy as np

from models.mlp import MLP

IN, HIDDEN, OUT = 16, 64, 4


def make_model():
    return MLP(IN, OUT, (HIDDEN,), key=jax.random.key(0))


def make_batch(rows=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(rows, IN)).astype(np.float32),
        "y": rng.integers(0, OUT, size=(rows,)).astype(np.int32),
    }


def host(tree):
    """A host copy of `tree`'s arrays."""
    return jax.tree.map(np.asarray, jax.device_get(eqx.filter(tree, eqx.is_array)))
