"""Optimizer recipes and learning-rate schedules, built on Optax.

`adamw` and `sgd` return ordinary `optax.GradientTransformation`s whose schedule is
inside the chain; `current_lr` reads the learning rate back from the optimizer
state and `describe_optimizer` gives a one-line summary for run headers.
"""

from ._recipes import OptimizerInfo as OptimizerInfo
from ._recipes import adamw as adamw
from ._recipes import current_lr as current_lr
from ._recipes import default_weight_decay_mask as default_weight_decay_mask
from ._recipes import describe_optimizer as describe_optimizer
from ._recipes import optimizer_info as optimizer_info
from ._recipes import sgd as sgd
from ._schedules import constant as constant
from ._schedules import warmup_constant as warmup_constant
from ._schedules import warmup_cosine as warmup_cosine
