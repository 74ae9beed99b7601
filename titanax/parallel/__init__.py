"""Explicit SPMD: per-device programs (`spmd`) and axis-checked `collectives`."""

from . import collectives as collectives
from ._activations import Activations as Activations
from ._spmd import grad as grad
from ._spmd import spmd as spmd
from ._spmd import spmd_specs as spmd_specs
from ._spmd import value_and_grad as value_and_grad
