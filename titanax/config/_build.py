"""A `Config` → the objects of a run: mesh, plan, model, optimizer, Trainer, data.

Everything here runs before any compilation; each failure is a `ConfigError` naming
the config key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh

from .. import loggers as tlog
from .. import optim
from .._errors import ConfigError, TitanaxError
from .._mesh import make_mesh
from .._plan import CP, DP, FSDP, PP, TP, Plan
from ..data import Pipeline
from ..parallel import Activations
from ..train import Precision, Trainer
from ._data import make_data
from ._imports import resolve
from ._load import config_to_dict
from ._presets import PRESETS
from ._schema import Config, PlanConfig

__all__ = ["Run", "build_run", "make_loggers", "make_mesh_for", "make_plan"]


def _as_config_error(error: TitanaxError, where: str) -> ConfigError:
    return ConfigError(
        f"{error.message} (from `{where}`)",
        path=where,
        suggestion=error.suggestion,
    )


def make_plan(config: PlanConfig) -> Plan:
    """`tx.Plan` from the `plan:` section.

    **Arguments:**

    - `config`: the `plan:` section.

    **Returns:** the `tx.Plan`.

    **Raises:** `ConfigError` naming the key: `plan.cp` with `plan.pp` (context
    parallelism does not compose with pipelining yet), or a section `tx.Plan`
    refuses.
    """
    if config.cp is not None and config.pp is not None:
        raise ConfigError(
            "Expected at most one of `plan.cp` and `plan.pp`, got both: context "
            "parallelism does not compose with pipelining yet.",
            path="plan.cp",
            suggestion="Drop `plan.pp` (CP composes with `plan.dp`, `plan.fsdp` and "
            "`plan.tp`), or set `plan.cp: null`.",
        )
    parts: dict[str, Any] = {}
    try:
        if config.dp is not None:
            parts["dp"] = DP(config.dp.axis, config.dp.accumulate_steps)
        if config.fsdp is not None:
            parts["fsdp"] = FSDP(config.fsdp.axis, config.fsdp.min_size)
        if config.tp is not None:
            parts["tp"] = TP(
                config.tp.axis,
                config.tp.rules,
                sequence_parallel=config.tp.sequence_parallel,
            )
        if config.pp is not None:
            parts["pp"] = PP(config.pp.axis, config.pp.microbatches, config.pp.schedule)
        if config.cp is not None:
            parts["cp"] = CP(config.cp.axis, config.cp.attention)
        rules = [(regex, tuple(axes)) for regex, axes in config.rules]
        return Plan(**parts, rules=rules)
    except TitanaxError as e:
        raise _as_config_error(e, "plan") from None


def make_mesh_for(shape: dict[str, int], plan: Plan) -> Mesh:
    """The mesh of the `mesh:` section, or all devices along the plan's one axis."""
    if not shape:
        axes = plan.mesh_axes
        if len(axes) > 1:
            raise ConfigError(
                f"Expected a `mesh` section for a plan over several axes {axes}, got "
                "none.",
                path="mesh",
                suggestion="Add e.g. `mesh: {"
                + ", ".join(f"{a}: ..." for a in axes)
                + "}`.",
            )
        shape = {axes[0] if axes else "data": -1}
    try:
        mesh = make_mesh(None, **shape)
        plan.check_mesh(mesh)
    except TitanaxError as e:
        raise _as_config_error(e, "mesh") from None
    return mesh


def _splits_sequence(plan: Plan) -> bool:
    """Whether the plan splits activations along `seq` (CP, or TP with sequence
    parallelism): the model must then compute through the plan's layout."""
    return plan.cp is not None or (plan.tp is not None and plan.tp.sequence_parallel)


def _sequence_split(plan: Plan) -> str:
    """What splits the sequence, as config keys, for messages."""
    parts = []
    if plan.cp is not None:
        parts.append(f"`plan.cp` (over `{plan.cp.axis}`)")
    if plan.tp is not None and plan.tp.sequence_parallel:
        parts.append(f"`plan.tp.sequence_parallel` (over `{plan.tp.axis}`)")
    return " and ".join(parts)


def _takes_layout(factory: Callable[..., Any]) -> bool:
    """Whether `factory` accepts a `layout=` keyword (by name or `**kwargs`)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "layout" and p.kind in named)
        for p in params
    )


def _layout_kwargs(
    config: Config, factory: Callable[..., Any], plan: Plan, mesh: Mesh
) -> dict[str, Any]:
    """`{"layout": tx.Activations(plan, mesh)}` for a plan that splits the
    sequence (after checking that the factory takes it), else `{}`."""
    if not _splits_sequence(plan):
        return {}
    model = config.model
    split = _sequence_split(plan)
    if "layout" in model.kwargs:
        raise ConfigError(
            f"Expected no `layout` in `model.kwargs` under {split}: the layout is "
            f"built from the plan and mesh, got {model.kwargs['layout']!r}.",
            path="model.kwargs.layout",
            suggestion="Remove `layout` from `model.kwargs`; `build_run` passes "
            "`layout=tx.Activations(plan, mesh)` to the model factory.",
        )
    dropout = model.kwargs.get("dropout")
    if plan.cp is not None and isinstance(dropout, int | float) and dropout > 0:
        raise ConfigError(
            f"Expected `model.kwargs.dropout` to be 0 under `plan.cp`, got {dropout}: "
            "ring attention has no attention-probability dropout.",
            path="model.kwargs.dropout",
            suggestion="Set `model.kwargs.dropout: 0`, or drop `plan.cp`.",
        )
    if not _takes_layout(factory):
        if model.preset is not None:
            raise ConfigError(
                f"Expected a model that computes through the plan's activation "
                f"layout under {split}, got the preset `{model.preset}`, whose "
                "factory takes no `layout`.",
                path="model.preset",
                suggestion="Use the `gpt` or `llama` preset, or drop "
                "`plan.cp` / `plan.tp.sequence_parallel`.",
            )
        name = getattr(factory, "__name__", type(factory).__name__)
        raise ConfigError(
            f"Expected the factory at `model.factory` to take a `layout` keyword "
            f"under {split} (the plan's `tx.Activations`, through which the model "
            f"splits its activations), got `{name}{inspect.signature(factory)}`.",
            path="model.factory",
            suggestion="Add `layout=None` to the factory and hand it to the model "
            "(e.g. `GPTConfig(..., layout=layout)`: the model calls "
            "`layout.constrain` and `layout.attention` as `models/gpt.py` does), or "
            "drop `plan.cp` / `plan.tp.sequence_parallel`.",
        )
    return {"layout": Activations(plan, mesh)}


def _model_parts(
    config: Config, plan: Plan, mesh: Mesh
) -> tuple[Callable[..., Any], Callable, Any]:
    """`(key -> model, loss, stage or None)` from the `model:` section; under a plan
    that splits the sequence the model is given the plan's activation layout."""
    model = config.model
    if model.preset is not None:
        if model.preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(model.preset, list(PRESETS), n=1)
            raise ConfigError(
                f"Expected a preset name at `model.preset`, got {model.preset!r}; the "
                f"presets are {sorted(PRESETS)}.",
                path="model.preset",
                suggestion=f"Use `{close[0]}`."
                if close
                else "Use one of them, or `model.factory: pkg.mod:fn`.",
            )
        preset = PRESETS[model.preset]
        factory_path, loss_path, stage_path = preset.factory, preset.loss, preset.stage
    else:
        assert model.factory is not None
        factory_path, loss_path, stage_path = model.factory, None, None
    factory = resolve(factory_path, "model.factory")
    loss_path = model.loss or loss_path
    if loss_path is None:
        raise ConfigError(
            "Expected `model.loss` (an import path of `loss(model, batch, key)`) with "
            "`model.factory`, got none.",
            path="model.loss",
            suggestion="Set `model.loss: pkg.mod:loss_fn`.",
        )
    loss = resolve(loss_path, "model.loss")
    stage = None
    if config.plan.pp is not None:
        stage_path = model.stage or stage_path
        if stage_path is None:
            raise ConfigError(
                "Expected `model.stage` (an import path of `() -> tx.Stage`) with "
                "`plan.pp`, got none.",
                path="model.stage",
                suggestion="Set `model.stage: pkg.mod:make_stage`.",
            )
        stage = resolve(stage_path, "model.stage")()
    kwargs = dict(model.kwargs) | _layout_kwargs(config, factory, plan, mesh)

    def make_model(key: Any) -> Any:
        return factory(key=key, **kwargs)

    return make_model, loss, stage


def _check_context_length(
    plan: Plan, mesh: Mesh, length: int | None, seq_len: int | None
) -> None:
    """Under CP the model computes in zigzag order (`2N` chunks of the context);
    with sequence parallelism TP's axis splits it too."""
    if length is None or not _splits_sequence(plan):
        return
    multiple, why = 1, []
    if plan.cp is not None:
        n = int(mesh.shape[plan.cp.axis])
        multiple = 2 * n
        why.append(
            f"2 x `{plan.cp.axis}`={n}: the zigzag split cuts it into {2 * n} chunks"
        )
    if plan.tp is not None and plan.tp.sequence_parallel:
        t = int(mesh.shape[plan.tp.axis])
        cp = int(mesh.shape[plan.cp.axis]) if plan.cp is not None else 1
        multiple = math.lcm(multiple, cp * t)
        why.append(f"sequence parallelism splits it over `{plan.tp.axis}`={t}")
    if length % multiple == 0:
        return
    where = "data.seq_len" if seq_len is not None else "model.kwargs.block_size"
    below = max(multiple, length // multiple * multiple)
    raise ConfigError(
        f"Expected the context length (`{where}`) to be a multiple of {multiple} "
        f"({'; '.join(why)}), got {length}.",
        path=where,
        suggestion=f"Set `{where}: {below}` (or another multiple of {multiple}).",
    )


def _abstract_model(make_model: Callable[..., Any]) -> Any:
    try:
        # The key is made inside the trace too: nothing runs, nothing compiles.
        return eqx.filter_eval_shape(lambda: make_model(jax.random.key(0)))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"Expected `model.kwargs` to build the model, got {type(e).__name__}: {e}",
            path="model.kwargs",
            suggestion="Check the keyword names and values against the model's "
            "constructor.",
        ) from e


def _optimizer(config: Config) -> Any:
    o = config.optimizer
    total = o.total_steps if o.total_steps is not None else config.steps
    schedule: dict[str, Any] = {
        "warmup_steps": o.warmup_steps,
        "total_steps": total if o.schedule == "cosine" else None,
        "end_lr": o.end_lr if o.schedule == "cosine" else None,
    }
    try:
        if o.name == "adamw":
            return optim.adamw(
                o.lr,
                b1=o.b1,
                b2=o.b2,
                eps=o.eps,
                weight_decay=o.weight_decay,
                clip_norm=o.clip_norm,
                **schedule,
            )
        return optim.sgd(
            o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            clip_norm=o.clip_norm,
            **schedule,
        )
    except TitanaxError as e:
        raise _as_config_error(e, "optimizer") from None


def _precision(config: Config) -> Precision:
    p = config.precision
    if p.compute == "bf16":
        return Precision.bf16()
    if p.compute == "fp16":
        try:
            return Precision.fp16(p.initial_scale, p.growth_interval)
        except TitanaxError as e:
            raise _as_config_error(e, "precision") from None
    return Precision.fp32()


def make_loggers(config: Config, stream: Any = None) -> list[Any]:
    """The loggers of the `logging:` section (they write on process 0 only)."""
    log = config.logging
    out: list[Any] = []
    console = log.console
    if console == "auto":
        console = "progress" if tlog.Progress.available(stream) else "basic"
    if console == "basic":
        out.append(tlog.Basic(stream))
    elif console == "compact":
        out.append(tlog.CompactBasic(stream))
    elif console == "progress":
        out.append(tlog.Progress(stream))
    if log.csv:
        out.append(tlog.CSV(log.csv))
    if log.tensorboard:
        out.append(tlog.TensorBoard(log.tensorboard))
    return out


def _profile(config: Config) -> tlog.Profile | None:
    p = config.profile
    if p.start is None:
        return None
    try:
        return tlog.Profile(p.start, p.steps, p.dir)
    except TitanaxError as e:
        raise _as_config_error(e, "profile") from None


@dataclasses.dataclass
class Run:
    """What `build_run` makes: call `trainer.fit(data, steps=config.steps)` (or let
    `titanax train` do it).

    **Fields:** `config`, `trainer`, `data` (a `tx.data.Pipeline`: the Trainer
    reads this process's rows of each global batch from the state's
    `data_position`), `mesh`, `plan`, `make_model` (`key -> model`),
    `abstract_model` (its shapes), `tokens_per_sample`.
    """

    config: Config
    trainer: Trainer
    data: Pipeline
    mesh: Mesh
    plan: Plan
    make_model: Callable[..., Any]
    abstract_model: Any
    tokens_per_sample: int | None


def build_run(
    config: Config,
    *,
    loggers: list[Any] | None = None,
    stream: Any = None,
    hooks: list[Any] | None = None,
) -> Run:
    """Every object of a run, checked against each other before any compilation.

    **Arguments:**

    - `config`: a loaded `Config`.
    - `loggers`: use these instead of the `logging:` section's.
    - `stream`: where console loggers print (default stdout).
    - `hooks`: more Trainer hooks `hook(step, metrics, trainer)`, run at log steps.

    **Returns:** a `Run`.

    **Raises:** `ConfigError` naming the key: a plan that does not fit the mesh or
    the model, a batch the data axes do not divide, an import path that does not
    resolve, model kwargs the model does not take, a missing data file. Under
    `plan.cp` or `plan.tp.sequence_parallel` (the model is then built with
    `layout=tx.Activations(plan, mesh)`): a factory without a `layout` keyword, a
    `model.kwargs.layout`, dropout with CP, `plan.cp` with `plan.pp`, and a context
    length the split does not divide (`2 N` chunks under CP of size `N`).
    """
    plan = make_plan(config.plan)
    mesh = make_mesh_for(dict(config.mesh), plan)
    make_model, loss, stage = _model_parts(config, plan, mesh)
    abstract = _abstract_model(make_model)
    try:
        plan.validate(mesh, abstract)
    except TitanaxError as e:
        raise _as_config_error(e, "plan") from None
    need = plan.data_parallel_size(mesh) * plan.accumulate_steps
    if config.plan.pp is not None:
        need *= config.plan.pp.microbatches
    if config.data.batch_size % need:
        raise ConfigError(
            f"Expected `data.batch_size` to be a multiple of {need} (the data axes "
            f"{plan.data_axes} of mesh {dict(mesh.shape)}, times the microbatches), "
            f"got {config.data.batch_size}.",
            path="data.batch_size",
            suggestion=f"Use a batch size divisible by {need}, e.g. "
            f"{need * max(1, config.data.batch_size // need)}.",
        )
    block = getattr(getattr(abstract, "config", None), "block_size", None)
    block = block if isinstance(block, int) else None
    seq_len = config.data.seq_len
    if block is not None and seq_len is not None and seq_len > block:
        raise ConfigError(
            f"Expected `data.seq_len` <= the model's context length {block} "
            f"(`block_size`), got {seq_len}.",
            path="data.seq_len",
            suggestion=f"Use `data.seq_len: {block}` (or leave it unset), or a "
            f"larger `model.kwargs.block_size`.",
        )
    length = seq_len if seq_len is not None else block
    _check_context_length(plan, mesh, length, seq_len)
    data = make_data(config.data, block)
    # Windows of tokens know their length; other sources have no tokens.
    tokens = getattr(data.source, "window", None)
    checkpoint = None
    if config.checkpoint.path is not None:
        from ..checkpoint import OrbaxCheckpoint

        c = config.checkpoint
        try:
            checkpoint = OrbaxCheckpoint(
                config.checkpoint.path,
                keep=c.keep,
                every=c.every,
                async_=c.async_,
                config=config_to_dict(config),
            )
        except TitanaxError as e:
            raise _as_config_error(e, "checkpoint") from None
    if loggers is None:
        loggers = make_loggers(config, stream)
    trainer = Trainer(
        make_model,
        plan,
        optimizer=_optimizer(config),
        loss=loss,
        mesh=mesh,
        precision=_precision(config),
        checkpoint=checkpoint,
        loggers=loggers,
        log_every=config.logging.every,
        seed=config.seed,
        on_nonfinite=config.on_nonfinite,
        hooks=list(hooks or []),
        tokens_per_sample=tokens,
        peak_flops_per_device=config.logging.peak_flops_per_device,
        stage=stage,
        histograms_every=config.logging.histograms_every,
        profile=_profile(config),
    )
    return Run(
        config=config,
        trainer=trainer,
        data=data,
        mesh=mesh,
        plan=plan,
        make_model=make_model,
        abstract_model=abstract,
        tokens_per_sample=tokens,
    )
