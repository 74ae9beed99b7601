"""Typed run configs: YAML + `key.sub=value` overrides + `${ENV_VAR}`, decoded and
type-checked by draccus into dataclasses, then built into a run.

`load_config(path, overrides)` gives a `Config`; `build_run(config)` checks it
against the devices and model (before any compilation) and makes the Trainer and
the data (a `titanax.data.Pipeline`); `titanax train CONFIG [key=value ...]` does
both and trains.
"""

from ._build import Run as Run
from ._build import build_run as build_run
from ._build import make_loggers as make_loggers
from ._build import make_mesh_for as make_mesh_for
from ._build import make_plan as make_plan
from ._data import make_data as make_data
from ._data import stdlib_text as stdlib_text
from ._imports import resolve as resolve
from ._load import apply_overrides as apply_overrides
from ._load import config_to_dict as config_to_dict
from ._load import format_config as format_config
from ._load import load_config as load_config
from ._presets import PRESETS as PRESETS
from ._presets import Preset as Preset
from ._schema import CheckpointConfig as CheckpointConfig
from ._schema import Config as Config
from ._schema import CPConfig as CPConfig
from ._schema import DataConfig as DataConfig
from ._schema import DPConfig as DPConfig
from ._schema import FSDPConfig as FSDPConfig
from ._schema import LoggingConfig as LoggingConfig
from ._schema import ModelConfig as ModelConfig
from ._schema import OptimizerConfig as OptimizerConfig
from ._schema import PlanConfig as PlanConfig
from ._schema import PPConfig as PPConfig
from ._schema import PrecisionConfig as PrecisionConfig
from ._schema import ProfileConfig as ProfileConfig
from ._schema import TPConfig as TPConfig
from ._train import compact_config as compact_config
from ._train import train as train
