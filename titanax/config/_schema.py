"""The run config: one dataclass per section, loaded by `load_config`.

Every field has a default, so a YAML file names only what it changes. Types are
checked by draccus when the config is decoded; cross-section checks (the plan against
the mesh, the batch against the data axes) happen in `build_run`, still before any
compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass
class ModelConfig:
    """What to train: a preset from the repository's `models/`, or a factory.

    **Fields:**

    - `preset`: `"gpt"`, `"llama"`, `"mlp"` or `"cnn"` (see
        `titanax.config.PRESETS`); its `kwargs` are the model's own (`size: tiny`
        picks `GPTConfig.preset("tiny")` and the other keys replace its fields).
    - `factory`: instead of a preset, an import path `pkg.mod:fn` (or
        `path/to/file.py:fn`) of `fn(*, key, **kwargs) -> eqx.Module`. Under
        `plan.cp` or `plan.tp.sequence_parallel` it must also take `layout` (the
        plan's `tx.Activations`, passed in by `build_run`), as the `gpt` and
        `llama` presets do.
    - `kwargs`: keyword arguments for the preset or factory.
    - `loss`: import path of `loss(model, batch, key)`; a preset has its own.
    - `stage`: import path of `() -> tx.Stage`, needed with `plan.pp`; the GPT preset
        has its own.
    """

    preset: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss: str | None = None
    stage: str | None = None


@dataclasses.dataclass
class DPConfig:
    """`tx.DP`: the batch split over `axis`, `accumulate_steps` microbatches."""

    axis: str = "data"
    accumulate_steps: int = 1


@dataclasses.dataclass
class FSDPConfig:
    """`tx.FSDP`: parameters sharded over `axis` when they have `min_size` elements."""

    axis: str = "data"
    min_size: int = 1024


@dataclasses.dataclass
class TPConfig:
    """`tx.TP`: logical axes → `axis` (`rules`; default `mlp`, `heads`, `vocab`);
    `sequence_parallel: true` also splits the sequence over `axis` outside attention
    and the MLP (Megatron SP; the model is then given the plan's activation layout)."""

    axis: str = "model"
    rules: dict[str, str | None] | None = None
    sequence_parallel: bool = False


@dataclasses.dataclass
class PPConfig:
    """`tx.PP`: the stacked `layers` dim split over `axis` into stages."""

    axis: str = "pipe"
    microbatches: int = 8
    schedule: Literal["gpipe", "1f1b"] = "1f1b"


@dataclasses.dataclass
class CPConfig:
    """`tx.CP`: the sequence split over `axis`, in zigzag order (the context length
    a multiple of twice its size); `attention` is `ring` (keys and values passed
    around the ring) or `all_gather` (gathered at once, for short rings). The model
    is given the plan's activation layout; no dropout, no `plan.pp`."""

    axis: str = "context"
    attention: Literal["ring", "all_gather"] = "ring"


@dataclasses.dataclass
class PlanConfig:
    """`tx.Plan`: a section per parallelism (absent or `null`: not used), and path
    `rules` as `[regex, [logical axis, ...]]` pairs."""

    dp: DPConfig | None = None
    fsdp: FSDPConfig | None = None
    tp: TPConfig | None = None
    pp: PPConfig | None = None
    cp: CPConfig | None = None
    rules: list[tuple[str, list[str | None]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OptimizerConfig:
    """`tx.optim.adamw` or `tx.optim.sgd` and their learning-rate schedule.

    `schedule: cosine` decays from `lr` after `warmup_steps` to `end_lr` (default 0)
    at `total_steps` (default: the run's `steps`); `constant` keeps `lr` after the
    warmup.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float | None = None
    nesterov: bool = False
    weight_decay: float = 0.0
    clip_norm: float | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    end_lr: float | None = None


@dataclasses.dataclass
class PrecisionConfig:
    """`tx.Precision`: the compute dtype; fp16 adds dynamic loss scaling."""

    compute: Literal["fp32", "bf16", "fp16"] = "fp32"
    initial_scale: float = 2.0**15
    growth_interval: int = 2000


@dataclasses.dataclass
class DataConfig:
    """Where samples come from: a `titanax.data.Pipeline` (see
    `titanax.config.make_data` and docs/data.md).

    Sample `g` of the stream is sample `g % N` of epoch `g // N` of an `N`-sample
    source, shuffled per epoch by `seed`; global batch `b` is samples
    `[b B, (b + 1) B)`. Each process reads only its rows, and a resumed run
    continues at the checkpoint's global sample (`TrainState.data_position`).

    **Fields:**

    - `source`: `"text"` (windows of a text file's bytes: a byte-level tokenizer,
        vocabulary 256; `tx.data.TextWindows`), `"tokens"` (windows of a flat binary
        file of token ids, nanoGPT's `.bin`; `tx.data.TokenWindows`) or
        `"function"` (an import path that returns a random-access source).
    - `path`: the file for `text` and `tokens`. Without one, `text` reads the Python
        standard library's own source (1 MB, on every machine).
    - `dtype`: the token dtype of a `tokens` file (`uint16`, or `uint32` above
        65,536 tokens).
    - `function`, `kwargs`: for `source: function`, `fn(**kwargs)` returning a
        random-access source (`__len__` and `__getitem__(int)`, e.g. a
        `tx.data.ArraySource`) or a dict of numpy arrays with one row per sample.
    - `batch_size`: the global batch size (all processes together).
    - `seq_len`: tokens per sample for `text` and `tokens`; default: the model's
        context length (`block_size`).
    - `stride`: tokens between the starts of consecutive windows; default
        `seq_len` (non-overlapping: each token is a target once per epoch); `1`
        makes every position a window start.
    - `shuffle`: shuffle each epoch (globally, by `seed` and the epoch).
    - `seed`: the shuffle seed, in `[0, 2**32)` (the same on every process).
    - `epochs`: passes over the source; `null` (default) streams forever. A run
        whose data ends before `steps` stops there with a warning.
    - `num_workers`: worker processes reading batches ahead (Grain's
        `mp_prefetch`); 0 reads in threads of the training process.
    """

    source: Literal["text", "tokens", "function"] = "text"
    path: str | None = None
    dtype: str = "uint16"
    function: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 16
    seq_len: int | None = None
    stride: int | None = None
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = None
    num_workers: int = 0


@dataclasses.dataclass
class CheckpointConfig:
    """`tx.OrbaxCheckpoint` (none without `path`); `resume` continues the latest."""

    path: str | None = None
    every: int | None = None
    keep: int | None = 3
    async_: bool = True
    resume: bool = False


@dataclasses.dataclass
class LoggingConfig:
    """Loggers, all writing on process 0 only.

    `console`: `auto` (a progress bar on a terminal, lines otherwise), `basic`,
    `compact`, `progress` or `none`. `csv` and `tensorboard` are paths (none when
    unset). `histograms_every`: per-layer parameter and gradient norm histograms to
    TensorBoard every this many steps. `peak_flops_per_device`: one device's peak
    FLOP/s, for MFU; by default the datasheet rate of known GPUs and TPUs at the
    compute type (`tx.loggers.peak_flops_per_device`; none on CPU: no MFU).
    """

    every: int = 10
    console: Literal["auto", "basic", "compact", "progress", "none"] = "auto"
    csv: str | None = None
    tensorboard: str | None = None
    histograms_every: int | None = None
    peak_flops_per_device: float | None = None


@dataclasses.dataclass
class ProfileConfig:
    """A `jax.profiler` trace of steps `[start, start + steps)` into `dir` (none
    without `start`); open it in TensorBoard's profile tab or Perfetto."""

    start: int | None = None
    steps: int = 3
    dir: str = "profile"


@dataclasses.dataclass
class Config:
    """A whole run: `titanax train CONFIG [key=value ...]`.

    `steps` is the total number of optimizer steps; `mesh` maps axis names to sizes,
    outermost first (`{data: 2, model: 4}`; one size may be -1).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    steps: int = 100
    seed: int = 0
    on_nonfinite: Literal["raise", "skip"] = "raise"
