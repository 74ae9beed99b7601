"""Loggers for training runs, a throughput meter and the run header.

Every logger has `header(info)`, `log(step, metrics)` and `close()` (the `Logger`
protocol), and may have `event(name, seconds)` and `histograms(step, groups)`
(called through `emit`); the trainer fetches metrics to the host before calling
`log`. Titanax's loggers write on process 0 only.
"""

from ._base import OPTIONAL_METHODS as OPTIONAL_METHODS
from ._base import Logger as Logger
from ._base import WithHeader as WithHeader
from ._base import emit as emit
from ._base import is_main_process as is_main_process
from ._console import Basic as Basic
from ._console import CompactBasic as CompactBasic
from ._csv import CSV as CSV
from ._header import describe_devices as describe_devices
from ._header import run_header as run_header
from ._header import versions as versions
from ._meter import PEAK_BF16_FLOPS as PEAK_BF16_FLOPS
from ._meter import PEAK_FLOPS as PEAK_FLOPS
from ._meter import Meter as Meter
from ._meter import device_memory as device_memory
from ._meter import peak_flops_per_device as peak_flops_per_device
from ._norms import layer_norms as layer_norms
from ._profile import Profile as Profile
from ._progress import Progress as Progress
from ._tensorboard import TensorBoard as TensorBoard
