"""Titanax: explicit data, FSDP, tensor and pipeline parallel training for JAX.

Models name the logical axes of their arrays; a `Plan` maps logical axes to mesh axes.
Nothing is guessed: every sharding comes from the model's PyTree and the plan.
"""

# First: `_compat` checks the JAX version before any module uses newer JAX names.
from . import _compat as _compat  # noqa: F401
from . import _distributed as distributed  # noqa: F401  (tx.distributed)
from . import config as config
from . import data as data
from . import loggers as loggers
from . import optim as optim
from . import quickstart as quickstart
from ._axes import field as field
from ._axes import logical_axes as logical_axes
from ._errors import ArgumentError as ArgumentError
from ._errors import BatchError as BatchError
from ._errors import CheckpointError as CheckpointError
from ._errors import CollectiveError as CollectiveError
from ._errors import ConfigError as ConfigError
from ._errors import DataError as DataError
from ._errors import DataExhaustedError as DataExhaustedError
from ._errors import DataExhaustedWarning as DataExhaustedWarning
from ._errors import MeshError as MeshError
from ._errors import ModelError as ModelError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import PipelineError as PipelineError
from ._errors import PlanError as PlanError
from ._errors import Preempted as Preempted
from ._errors import ShardingError as ShardingError
from ._errors import SkippedStepsWarning as SkippedStepsWarning
from ._errors import StepFailedError as StepFailedError
from ._errors import TitanaxError as TitanaxError
from ._errors import TrainerError as TrainerError
from ._explain import Explanation as Explanation
from ._explain import explain as explain
from ._malloc import configure_allocator as configure_allocator
from ._mesh import MeshSpec as MeshSpec
from ._mesh import make_mesh as make_mesh
from ._mesh import simulate_cpu_devices as simulate_cpu_devices
from ._plan import CP as CP
from ._plan import DP as DP
from ._plan import FSDP as FSDP
from ._plan import PP as PP
from ._plan import TP as TP
from ._plan import Plan as Plan
from ._sharding import init as init
from ._sharding import shard as shard
from ._sharding import shardings as shardings
from .checkpoint import OrbaxCheckpoint as OrbaxCheckpoint
from .checkpoint import PreemptionGuard as PreemptionGuard
from .parallel import Activations as Activations
from .parallel import collectives as collectives
from .parallel import grad as grad
from .parallel import spmd as spmd
from .parallel import spmd_specs as spmd_specs
from .parallel import value_and_grad as value_and_grad
from .parallel.pipeline import Schedule as Schedule
from .parallel.pipeline import Stage as Stage
from .parallel.pipeline import pipeline_schedule as pipeline_schedule
from .train import CompiledStep as CompiledStep
from .train import LossScale as LossScale
from .train import Precision as Precision
from .train import Trainer as Trainer
from .train import TrainState as TrainState
from .train import TrainStep as TrainStep
from .train import abstract_state as abstract_state
from .train import make_train_step as make_train_step
from .train import put_batch as put_batch

__version__ = "0.1.0"
