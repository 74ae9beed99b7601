"""Minimal data parallelism: train a small MLP on 8 simulated CPU devices.

The batch is split over the `data` mesh axis; parameters and optimizer state are
replicated; gradients are averaged across devices inside the compiled step. The data
is synthetic but learnable: a fixed random linear "teacher" labels random inputs.

Run it with `python examples/minimal_dp.py` (a few seconds).
"""

import os
import sys
from pathlib import Path

# This example simulates its devices on the CPU, even where a GPU is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Let `python examples/minimal_dp.py` import the reference models in `models/`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import titanax as tx  # noqa: E402

tx.simulate_cpu_devices(8)  # before JAX computes anything

import numpy as np  # noqa: E402

from models.mlp import MLP, cross_entropy_loss  # noqa: E402

rng = np.random.default_rng(0)
teacher = rng.normal(size=(32, 4))  # a fixed linear teacher: 32 features, 4 classes
x = rng.normal(size=(2048, 32)).astype(np.float32)
data = {"x": x, "y": np.argmax(x @ teacher, axis=1).astype(np.int32)}
batches = [{k: v[i : i + 64] for k, v in data.items()} for i in range(0, 2048, 64)]

losses = []  # the logged losses, recorded by a hook, to check that training worked
trainer = tx.Trainer(
    # A `key -> model` function: the model is created directly on the devices.
    lambda key: MLP(32, 4, hidden_sizes=(64,), key=key),
    tx.Plan(dp=tx.DP()),  # the batch of 64 over all 8 devices: 8 rows each
    optimizer=tx.optim.adamw(1e-2),
    loss=cross_entropy_loss,  # returns (loss, {"accuracy": ...})
    loggers=[tx.loggers.Basic()],
    log_every=10,
    hooks=[lambda step, metrics, trainer: losses.append(metrics["loss"])],
)
trainer.fit(batches, steps=100)

assert losses[-1] < losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}: OK")
