"""Reference models for Titanax, written as plain Equinox modules.

Each weight names its logical axes (`embed`, `mlp`, `heads`, `vocab`, ...); plans map
those to mesh axes. Nothing here knows of meshes or names a mesh axis.
"""

from .cnn import CNN as CNN
from .gpt import GPT as GPT
from .gpt import Block as Block
from .gpt import GPTConfig as GPTConfig
from .mlp import MLP as MLP
