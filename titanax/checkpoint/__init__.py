"""Checkpoints: Orbax save/restore of the TrainState, resharding, preemption.

- `OrbaxCheckpoint`: asynchronous, atomic, retained checkpoints of the arrays of a
    `TrainState` plus human-readable JSON metadata; restore onto any plan and mesh.
- `PreemptionGuard`: SIGTERM as a flag the training loop polls.
- `read_metadata`: a step's JSON metadata, without JAX devices or Orbax.
"""

from ._metadata import read_metadata as read_metadata
from ._orbax import OrbaxCheckpoint as OrbaxCheckpoint
from ._preemption import PreemptionGuard as PreemptionGuard
