"""YAML → `Config`: safe loading, `key.sub=value` overrides, `${ENV_VAR}`
substitution, unknown-key and type checks (draccus decodes and type-checks)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import draccus
import yaml
from draccus.utils import DecodingError, ParsingError

from .._errors import ConfigError
from ._schema import Config

__all__ = ["apply_overrides", "config_to_dict", "format_config", "load_config"]

# `${NAME}` or `${NAME:-default}`; `$${...}` is a literal `${...}`.
_ENV = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"Expected a YAML config file at `{file}`, found none.",
            suggestion="Check the path, e.g. `titanax train examples/configs/"
            "mnist_dp.yaml`.",
        )
    try:
        raw = yaml.safe_load(file.read_text())  # safe: plain data, no Python tags
    except yaml.YAMLError as e:
        raise ConfigError(
            f"Expected valid YAML in `{file}`, got a parse error: {e}",
            suggestion="Fix the YAML syntax at the line shown.",
        ) from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"Expected `{file}` to hold a mapping of sections (model:, plan:, ...), "
            f"got a {type(raw).__name__}.",
            suggestion="Start the file with `model:` or another section name.",
        )
    return raw


def _parse_value(text: str) -> Any:
    """An override's value as YAML (`20`, `null`, `[1, 2]`, `{a: 1}`), else text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set `key.sub=value` overrides on a raw config mapping (a new mapping).

    **Arguments:**

    - `raw`: the mapping read from YAML.
    - `overrides`: `"optimizer.lr=3e-4"`, `"plan.tp=null"`, ...; values are YAML.

    **Returns:** the updated mapping (`raw` is not changed).

    **Raises:** `ConfigError` for an override without `=`.
    """
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"Expected an override of the form `key.sub=value`, got {item!r}.",
                suggestion="Write e.g. `steps=20` or `optimizer.lr=3e-4`.",
            )
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    raise ConfigError(
                        f"Expected `{'.'.join(parts[: i + 1])}` to be a section for "
                        f"the override `{item}`, got the value {child!r}.",
                        path=".".join(parts[: i + 1]),
                        suggestion="Override the whole value instead.",
                    )
                child = node[part] = {}
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _substitute(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; a whole-string
    reference is re-read as YAML, so `steps: ${STEPS}` gives an int."""
    if isinstance(value, dict):
        return {
            k: _substitute(v, env, f"{path}.{k}" if path else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"Expected the environment variable `{name}` to be set for `{path}`, "
            "found it unset.",
            path=path,
            suggestion=f"Export {name}=..., or give a default: `${{{name}:-value}}`.",
        )

    whole = _ENV.fullmatch(value)
    text = _ENV.sub(replace, value)
    return _parse_value(text) if whole and not whole.group(1) else text


def _dataclass_of(tp: Any) -> Any:
    """The dataclass inside `tp` (`X`, `X | None`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _check_keys(raw: Any, cls: Any, path: str) -> None:
    """Raise `ConfigError` for the first key `cls` does not have, naming the
    closest valid key."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            prefix = f"{path}." if path else ""
            hint = (
                f"Did you mean `{prefix}{close[0]}`?"
                if close
                else f"Valid keys: {', '.join(names)}."
            )
            raise ConfigError(
                f"Expected a key of `{cls.__name__}` at `{where}`, got the unknown "
                f"key `{key}`. {hint}",
                path=where,
                suggestion=f"Rename it to `{prefix}{close[0]}`."
                if close
                else f"Use one of: {', '.join(names)}.",
            )
        inner = _dataclass_of(hints[key])
        if inner is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"Expected a section (a mapping) at `{where}`, got {value!r}.",
                    path=where,
                    suggestion=f"Write `{key}:` followed by indented keys, or `null`.",
                )
            _check_keys(value, inner, where)


def _decode(raw: dict[str, Any]) -> Config:
    try:
        return draccus.decode(Config, raw)
    except DecodingError as e:
        where = ".".join(str(p) for p in e.key_path) or "config"
        detail = str(e.message).splitlines()[0]
        raise ConfigError(
            f"Expected a value of the declared type at `{where}`: {detail}",
            path=where,
            suggestion=f"Fix `{where}` (see `titanax.config.Config` for the types).",
        ) from None
    except ParsingError as e:  # pragma: no cover - draccus's other failures
        raise ConfigError(f"Could not decode the config: {e}") from None


def _check_values(config: Config) -> None:
    positive = {
        "steps": config.steps,
        "data.batch_size": config.data.batch_size,
        "logging.every": config.logging.every,
        "profile.steps": config.profile.steps,
    }
    for key in ("seq_len", "stride", "epochs"):
        if (value := getattr(config.data, key)) is not None:
            positive[f"data.{key}"] = value
    if config.checkpoint.every is not None:
        positive["checkpoint.every"] = config.checkpoint.every
    if config.logging.histograms_every is not None:
        positive["logging.histograms_every"] = config.logging.histograms_every
    for where, value in positive.items():
        if isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"Expected `{where}` to be an integer >= 1, got {value!r}.",
                path=where,
                suggestion=f"Set `{where}` to a positive integer.",
            )
    ranges = {
        "data.seed": (config.data.seed, 2**32, "a seed in [0, 2**32), e.g. 0"),
        "data.num_workers": (config.data.num_workers, None, "0 (read in threads)"),
    }
    for where, (value, stop, fix) in ranges.items():
        if value < 0 or (stop is not None and value >= stop):
            bound = f"in [0, {stop})" if stop is not None else ">= 0"
            raise ConfigError(
                f"Expected `{where}` {bound}, got {value!r}.",
                path=where,
                suggestion=f"Set `{where}` to {fix}.",
            )
    peak = config.logging.peak_flops_per_device
    if peak is not None and not peak > 0:
        raise ConfigError(
            f"Expected `logging.peak_flops_per_device` > 0 (FLOP/s), got {peak!r}.",
            path="logging.peak_flops_per_device",
            suggestion="Set it to one device's peak, e.g. `989e12` (H100 bf16), or "
            "`null` for the datasheet rate.",
        )
    if config.checkpoint.resume and not config.checkpoint.path:
        raise ConfigError(
            "Expected `checkpoint.path` (where to resume from) with "
            "`checkpoint.resume: true`, got none.",
            path="checkpoint.path",
            suggestion="Set `checkpoint.path: runs/my_run` (the interrupted run's).",
        )
    model = config.model
    if (model.preset is None) == (model.factory is None):
        got = "both" if model.preset else "neither"
        raise ConfigError(
            f"Expected exactly one of `model.preset` and `model.factory`, got {got}.",
            path="model",
            suggestion="Set `model.preset: gpt` (or mlp, cnn), or `model.factory: "
            "pkg.mod:fn`.",
        )
    data = config.data
    if data.source == "function" and not data.function:
        raise ConfigError(
            "Expected `data.function` (an import path) with `data.source: "
            "function`, got none.",
            path="data.function",
            suggestion="Set `data.function: pkg.mod:load` (it returns the samples).",
        )
    if data.source == "tokens" and not data.path:
        raise ConfigError(
            "Expected `data.path` (a token file) with `data.source: tokens`, got none.",
            path="data.path",
            suggestion="Set `data.path: train.bin` (token ids, `data.dtype`).",
        )


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load, override, substitute and check a run config.

    **Arguments:**

    - `source`: a YAML file path, a mapping of the same shape, or `None` (defaults).
    - `overrides`: `key.sub=value` strings, applied in order after the file.
    - `env`: the variables `${NAME}` reads; default `os.environ`.

    **Returns:** a `Config`.

    **Raises:** `ConfigError` (with `.path`, the key) for YAML errors, unknown keys
    (naming the closest valid key), wrong types, unset environment variables and
    out-of-range values.

    !!! Example

        ```python
        config = tx.config.load_config("run.yaml", ["steps=20", "optimizer.lr=3e-4"])
        ```
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = _deep_copy(dict(source))
    else:
        raw = _read_yaml(source)
    raw = apply_overrides(raw, overrides)
    raw = _substitute(raw, os.environ if env is None else env, "")
    _check_keys(raw, Config, "")
    config = _decode(raw)
    _check_values(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (every field, defaults included)."""
    return draccus.encode(config)


def format_config(config: Config) -> str:
    """The resolved config as YAML text, for the run header."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()
