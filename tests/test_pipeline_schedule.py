"""Pipeline schedules as data: invariants of GPipe and 1F1B tables."""

import pytest

from titanax._errors import PipelineError
from titanax.parallel.pipeline import Action, pipeline_schedule, send_patterns

CASES = [(s, m) for s in (1, 2, 3, 4) for m in (s, s + 1, 2 * s, 4 * s)]


def _ticks_of(schedule):
    """(kind, stage, microbatch) -> tick, checking each action runs exactly once."""
    seen = {}
    for t, row in enumerate(schedule.ticks):
        assert len(row) == schedule.stages
        for s, action in enumerate(row):
            if action is None:
                continue
            key = (action.kind, s, action.microbatch)
            assert key not in seen, f"{key} runs twice (ticks {seen[key]} and {t})"
            seen[key] = t
    return seen


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", CASES)
def test_every_microbatch_once_and_dependencies(kind, stages, microbatches):
    schedule = pipeline_schedule(kind, stages, microbatches)
    at = _ticks_of(schedule)
    S, M = stages, microbatches
    assert len(at) == 2 * S * M
    for s in range(S):
        for m in range(M):
            assert at[("F", s, m)] < at[("B", s, m)]
            if s > 0:
                assert at[("F", s - 1, m)] < at[("F", s, m)]
            if s < S - 1:
                assert at[("B", s + 1, m)] < at[("B", s, m)]
    assert schedule.num_ticks == 2 * (M + S - 1)
    assert schedule.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))


@pytest.mark.parametrize("stages,microbatches", CASES)
def test_1f1b_in_flight_bounded_by_stages(stages, microbatches):
    schedule = pipeline_schedule("1f1b", stages, microbatches)
    for s in range(stages):
        assert schedule.max_in_flight(s) == min(microbatches, stages - s)
        assert schedule.max_in_flight(s) <= stages


@pytest.mark.parametrize("stages,microbatches", CASES)
def test_gpipe_keeps_every_microbatch_in_flight(stages, microbatches):
    schedule = pipeline_schedule("gpipe", stages, microbatches)
    assert schedule.max_in_flight(0) == microbatches


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [*CASES, (8, 8), (8, 32)])
def test_one_permute_per_tick_moves_only_real_transfers(kind, stages, microbatches):
    # Each microbatch crosses each of the S - 1 boundaries once forward and once
    # backward: 2 M (S - 1) transfers a step, none in the bubble, and no tick sends
    # two buffers from or to one stage (`send_patterns` checks the latter).
    schedule = pipeline_schedule(kind, stages, microbatches)
    per_tick, patterns = send_patterns(schedule)
    assert len(per_tick) == schedule.num_ticks
    transfers = [pair for t in per_tick for pair in patterns[t]]
    assert len(transfers) == 2 * microbatches * (stages - 1)
    for pairs in patterns:
        assert len({src for src, _ in pairs}) == len(pairs)
        assert all(abs(src - dst) == 1 for src, dst in pairs)


def test_1f1b_two_stages_four_microbatches_table():
    schedule = pipeline_schedule("1f1b", stages=2, microbatches=4)
    assert schedule.num_ticks == 10
    row0 = [str(a) if a else "." for a in schedule.stage_actions(0)]
    assert row0 == ["F0", "F1", ".", "B0", "F2", "B1", "F3", "B2", ".", "B3"]
    assert schedule.table().splitlines() == [
        "stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3",
        "stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 .",
    ]
    assert schedule.ticks[2][1] == Action("B", 0)
    assert "10 ticks" in str(schedule)


def test_1f1b_steady_state_alternates():
    schedule = pipeline_schedule("1f1b", stages=4, microbatches=8)
    # Stage 0: 4 warm-up forwards, then B/F alternation, then cool-down.
    kinds = [a.kind for a in schedule.stage_actions(0) if a is not None]
    assert kinds[:4] == ["F"] * 4
    assert kinds[4:12] == ["B", "F"] * 4
    assert kinds[12:] == ["B"] * 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="zb", stages=2, microbatches=4), "gpipe"),
        (dict(kind="1f1b", stages=0, microbatches=4), "`stages` must be an int"),
        (dict(kind="gpipe", stages=2, microbatches=0), "`microbatches` must be"),
        (dict(kind="1f1b", stages=4, microbatches=2), "at least as many"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(PipelineError, match=match) as info:
        pipeline_schedule(**kwargs)
    assert info.value.suggestion


def test_gpipe_allows_fewer_microbatches_than_stages():
    assert pipeline_schedule("gpipe", 4, 2).num_ticks == 2 * (2 + 4 - 1)
