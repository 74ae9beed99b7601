"""Checkpoints: Orbax save/restore of the TrainState, resharding, integrity,
failures, preemption.

- `OrbaxCheckpoint`: asynchronous, atomic, retained checkpoints of the arrays of a
    `TrainState` plus human-readable JSON metadata with a fingerprint per array;
    restore onto any plan and mesh; `verify` without restoring.
- `PreemptionGuard`: SIGTERM as a stop step every process agrees on.
- `read_metadata`: a step's JSON metadata, validated, without JAX devices or Orbax.
- `DamagedStep`: the `CheckpointError` of a step that does not read back intact.
- `fingerprints`: the sharding-independent fingerprints saved with every array.
"""

from ._damage import DamagedStep as DamagedStep
from ._fingerprint import fingerprint_host as fingerprint_host
from ._fingerprint import fingerprints as fingerprints
from ._metadata import read_metadata as read_metadata
from ._orbax import OrbaxCheckpoint as OrbaxCheckpoint
from ._preemption import PreemptionGuard as PreemptionGuard
