"""Pipeline schedules as data: which stage runs which microbatch, tick by tick.

A schedule is a table. Each tick (a lock-step time slot) every stage does one unit of
work: the forward (`F`) of one microbatch, its backward (`B`), or nothing (`None`,
the bubble). The executor follows the table; tests check its invariants; users print
it:

```
>>> print(pipeline_schedule("1f1b", stages=2, microbatches=4).table())
stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3
stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 .
```

Both schedules are built by the same greedy lock-step simulation: each stage has an
ordered list of actions and, at every tick, runs its next one if its dependencies ran
at an earlier tick. `F` of microbatch `m` on stage `s` needs `F` of `m` on `s − 1`;
`B` of `m` on `s` needs `F` of `m` on `s` and `B` of `m` on `s + 1`.

- **GPipe**: every stage runs all forwards, then all backwards, the backwards in
  reverse microbatch order (the order autodiff of the forward loop produces).
- **1F1B** (PipeDream-flush): stage `s` runs `min(M, S − s)` warm-up forwards, then
  alternates one backward and one forward, then the remaining backwards. At most `S`
  microbatches are in flight (forward done, backward not yet) on any stage, whatever
  `M` is: that is its point.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..._errors import PipelineError

__all__ = ["Action", "Schedule", "pipeline_schedule"]

ScheduleKind = Literal["gpipe", "1f1b"]
_KINDS = ("gpipe", "1f1b")


@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of pipeline work on one stage.

    **Fields:**

    - `kind`: `"F"` (forward) or `"B"` (backward).
    - `microbatch`: which microbatch, `0 ≤ microbatch < M`.
    """

    kind: Literal["F", "B"]
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: per tick, per stage, an `Action` or `None` (idle).

    Built by `pipeline_schedule`.

    **Fields:**

    - `kind`: `"gpipe"` or `"1f1b"`.
    - `stages`: number of stages `S`.
    - `microbatches`: number of microbatches `M`.
    - `ticks`: `ticks[t][s]` is what stage `s` does at tick `t`.
    """

    kind: str
    stages: int
    microbatches: int
    ticks: tuple[tuple[Action | None, ...], ...]

    @property
    def num_ticks(self) -> int:
        """How many lock-step ticks the schedule takes."""
        return len(self.ticks)

    @property
    def bubble_fraction(self) -> float:
        """The theoretical bubble `(S − 1) / (M + S − 1)` of GPipe and 1F1B."""
        s, m = self.stages, self.microbatches
        return (s - 1) / (m + s - 1)

    def stage_actions(self, stage: int) -> tuple[Action | None, ...]:
        """What `stage` does at each tick (a row of `table`)."""
        return tuple(row[stage] for row in self.ticks)

    def when(self, kind: Literal["F", "B"], stage: int, microbatch: int) -> int:
        """The tick at which `stage` runs `kind` of `microbatch`.

        **Raises:** `PipelineError` if it never does.
        """
        target = Action(kind, microbatch)
        for t, row in enumerate(self.ticks):
            if row[stage] == target:
                return t
        raise PipelineError(
            f"Stage {stage} never runs {target} in this {self.kind} schedule.",
            suggestion="Check `stage` < stages and `microbatch` < microbatches.",
        )

    def in_flight(self, stage: int) -> tuple[int, ...]:
        """Per tick, after that tick: microbatches whose forward ran on `stage` and
        whose backward has not yet."""
        live: set[int] = set()
        counts = []
        for action in self.stage_actions(stage):
            if action is not None:
                if action.kind == "F":
                    live.add(action.microbatch)
                else:
                    live.discard(action.microbatch)
            counts.append(len(live))
        return tuple(counts)

    def max_in_flight(self, stage: int) -> int:
        """The most microbatches in flight at once on `stage` (activations it holds)."""
        return max(self.in_flight(stage), default=0)

    def table(self) -> str:
        """The schedule as text: a row per stage, a column per tick, `.` when idle."""
        width = max(2, len(str(self.microbatches - 1)) + 1)
        lines = []
        for s in range(self.stages):
            cells = [
                (str(a) if a is not None else ".").ljust(width)
                for a in self.stage_actions(s)
            ]
            lines.append(f"stage {s} | " + " ".join(cells).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"{self.kind} schedule: {self.stages} stages, {self.microbatches} "
            f"microbatches, {self.num_ticks} ticks, bubble "
            f"{self.bubble_fraction:.1%}"
        )
        return head + "\n" + self.table()


def _stage_order(kind: str, stages: int, microbatches: int, s: int) -> list[Action]:
    m = microbatches
    if kind == "gpipe":
        return [Action("F", i) for i in range(m)] + [
            Action("B", i) for i in reversed(range(m))
        ]
    warmup = min(m, stages - s)
    order = [Action("F", i) for i in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < m:
        order.append(Action("B", next_b))
        next_b += 1
        if next_f < m:
            order.append(Action("F", next_f))
            next_f += 1
    return order


def _simulate(kind: str, stages: int, microbatches: int) -> Schedule:
    orders = [_stage_order(kind, stages, microbatches, s) for s in range(stages)]
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, microbatch) -> tick
    position = [0] * stages
    ticks: list[tuple[Action | None, ...]] = []
    total = sum(len(o) for o in orders)
    while len(done) < total:
        t = len(ticks)
        row: list[Action | None] = []
        for s in range(stages):
            action = orders[s][position[s]] if position[s] < len(orders[s]) else None
            if action is not None and _ready(action, s, stages, done, t):
                position[s] += 1
                row.append(action)
            else:
                row.append(None)
        for s, action in enumerate(row):
            if action is not None:
                done[(action.kind, s, action.microbatch)] = t
        if all(a is None for a in row):  # pragma: no cover - orders never deadlock
            raise AssertionError(f"{kind} schedule deadlocked at tick {t}")
        ticks.append(tuple(row))
    return Schedule(kind, stages, microbatches, tuple(ticks))


def _ready(
    action: Action, s: int, stages: int, done: dict[tuple[str, int, int], int], t: int
) -> bool:
    m = action.microbatch

    def ran(kind: str, stage: int) -> bool:
        return done.get((kind, stage, m), t) < t

    if action.kind == "F":
        return s == 0 or ran("F", s - 1)
    return ran("F", s) and (s == stages - 1 or ran("B", s + 1))


def pipeline_schedule(kind: ScheduleKind, stages: int, microbatches: int) -> Schedule:
    """Build a pipeline schedule as data.

    **Arguments:**

    - `kind`: `"gpipe"` (all forwards, then all backwards) or `"1f1b"`
        (PipeDream-flush: warm-up forwards, one-forward-one-backward, cool-down).
    - `stages`: number of pipeline stages `S` (the size of the `pipe` mesh axis).
    - `microbatches`: microbatches per step `M`; 1F1B needs `M ≥ S`.

    **Returns:** a `Schedule`; `print(schedule.table())` shows it. Both kinds take
    `2 (M + S − 1)` ticks, with a bubble of `(S − 1) / (M + S − 1)`.

    **Raises:** `PipelineError` on an unknown `kind`, `stages < 1`, `microbatches < 1`,
    or, for 1F1B, `microbatches < stages`.

    !!! Example
        ```python
        schedule = tx.pipeline_schedule("1f1b", stages=2, microbatches=4)
        print(schedule.table())
        schedule.max_in_flight(0)  # 2: at most S microbatches' inputs kept
        ```
    """
    if kind not in _KINDS:
        raise PipelineError(
            f'`kind` must be "gpipe" or "1f1b", got {kind!r}.',
            suggestion='Use kind="gpipe" or kind="1f1b".',
        )
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineError(
                f"`{name}` must be an int ≥ 1, got {value!r}.",
                suggestion=f"Pass a positive `{name}`, e.g. {name}=2.",
            )
    if kind == "1f1b" and microbatches < stages:
        raise PipelineError(
            f"1F1B needs at least as many microbatches as stages, got "
            f"microbatches={microbatches} for stages={stages}.",
            suggestion=(
                f"Use microbatches ≥ {stages} (e.g. {2 * stages}: more microbatches "
                'also shrink the bubble), or schedule="gpipe".'
            ),
        )
    return _simulate(kind, stages, microbatches)
