"""Pipeline parallelism: schedules as data, `Stage`, and the pipelined step.

- `pipeline_schedule(kind, stages, microbatches)`: the per-tick table of forward and
  backward actions (`Schedule`, `Action`) that the executor follows.
- `Stage`: a mesh-free description of a model's stacked layers and their boundaries.
- `pipeline_value_and_grad`: loss, metrics and gradients of one batch under a plan
  with `pp`, GPipe (autodiff of the tick loop) or 1F1B (explicit schedule).
"""

from ._executor import pipeline_value_and_grad as pipeline_value_and_grad
from ._executor import ring_sizes as ring_sizes
from ._executor import send_patterns as send_patterns
from ._schedule import Action as Action
from ._schedule import Schedule as Schedule
from ._schedule import pipeline_schedule as pipeline_schedule
from ._stage import Stage as Stage
