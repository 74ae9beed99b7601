"""Import paths in configs: `pkg.mod:name` or `path/to/file.py:name`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import ConfigError

__all__ = ["resolve"]


def _module_from_file(file: Path) -> Any:
    name = f"_titanax_config_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def resolve(path: str, where: str) -> Any:
    """The object an import path names.

    Like `python -m`, the current directory is importable, so `models.gpt:GPT`
    resolves in a Titanax checkout.

    **Arguments:**

    - `path`: `pkg.mod:attr.sub` or `file.py:attr`.
    - `where`: the config key it came from, for errors.

    **Returns:** the object.

    **Raises:** `ConfigError` naming `where` if the module or name is missing.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"Expected an import path `module:name` at `{where}`, got {path!r}.",
            path=where,
            suggestion="Write e.g. `models.gpt:gpt_loss` or `my_file.py:make_model`.",
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ImportError(f"no file {file}")
            module = _module_from_file(file)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"Expected `{module_name}` at `{where}` to be importable, got "
            f"{type(e).__name__}: {e}",
            path=where,
            suggestion="Run from the folder that holds the module (or install it), "
            "or give a file path `path/to/file.py:name`.",
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"Expected `{module_name}` to define `{attr}` (from `{where}`), found "
                f"no `{part}`.",
                path=where,
                suggestion=f"Check the name after the colon in {path!r}.",
            )
        obj = getattr(obj, part)
    return obj
