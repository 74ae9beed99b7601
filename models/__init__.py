"""Reference models for Titanax, written as plain Equinox modules.

Each weight names its logical axes (`embed`, `mlp`, `heads`, `vocab`, ...); plans map
those to mesh axes (`gpt_plans.py`, `llama_plans.py`). The model files know nothing of
meshes; `hf.py` loads and saves Hugging Face GPT-2 and Llama checkpoints, straight
into a plan's shardings when given one.
"""

from .cnn import CNN as CNN
from .gpt import GPT as GPT
from .gpt import Block as Block
from .gpt import GPTConfig as GPTConfig
from .llama import Llama as Llama
from .llama import LlamaConfig as LlamaConfig
from .mlp import MLP as MLP
