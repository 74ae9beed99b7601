"""Training: the TrainState, the compiled step, and the Trainer loop above it."""

from ._abstract import abstract_state as abstract_state
from ._batch import put_batch as put_batch
from ._precision import LossScale as LossScale
from ._precision import Precision as Precision
from ._state import TrainState as TrainState
from ._step import CompiledStep as CompiledStep
from ._step import TrainStep as TrainStep
from ._step import make_train_step as make_train_step
from ._step import trainable_mask as trainable_mask
from ._trainer import Trainer as Trainer
