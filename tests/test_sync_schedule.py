"""Hand-checked tables for the warmup, DiLoCo and Streaming DiLoCo schedules, and the A-EDiT timer."""
from __future__ import annotations

import pytest

from megatron_edit.sync_schedule import (
    TimeTrigger,
    assign_layers_to_fragments,
    default_num_fragments,
    fragment_of_embedding,
    fragment_of_output,
    fragment_offset,
    fragments_merging_at,
    fragments_syncing_at,
    is_anchor_iteration,
    is_sync_iteration,
    is_warmup,
    should_check,
    validate_streaming_schedule,
)


def _sync_table(iterations, warmup, interval, fragments):
    """{iteration: fragments} for the iterations where at least one fragment syncs."""
    table = {}
    for it in iterations:
        syncing = fragments_syncing_at(it, warmup, interval, fragments)
        if syncing:
            table[it] = syncing
    return table


def test_warmup_and_anchor():
    assert [is_warmup(i, 3) for i in range(1, 6)] == [True, True, True, False, False]
    assert [is_warmup(i, 0) for i in range(1, 3)] == [False, False]
    assert [i for i in range(0, 6) if is_anchor_iteration(i, 3)] == [3]
    assert is_anchor_iteration(0, 0)
    with pytest.raises(ValueError, match="iteration 0 must be >= 1"):
        is_warmup(0, 3)


def test_diloco_schedule_counts_from_end_of_warmup():
    # K = 10, H = 4: syncs after local steps 4, 8, 12 -> iterations 14, 18, 22. Not at 4/8/12 (the
    # original code's gate compared against the interval, which would sync at 8 and 12).
    assert [i for i in range(1, 23) if is_sync_iteration(i, 10, 4)] == [14, 18, 22]
    assert [i for i in range(1, 10) if is_sync_iteration(i, 0, 3)] == [3, 6, 9]
    assert [i for i in range(1, 6) if is_sync_iteration(i, 0, 1)] == [1, 2, 3, 4, 5]
    # K smaller than H
    assert [i for i in range(1, 16) if is_sync_iteration(i, 2, 5)] == [7, 12]


@pytest.mark.parametrize(
    "warmup,interval,fragments,expected",
    [
        # t = [0, 2]: fragment 0 at s = 4, 8, 12; fragment 1 at s = 6, 10 (+K = 2)
        (2, 4, 2, {6: [0], 8: [1], 10: [0], 12: [1], 14: [0]}),
        # t = [0, 2, 4]
        (0, 6, 3, {6: [0], 8: [1], 10: [2], 12: [0], 14: [1], 16: [2], 18: [0]}),
        # t = [0, 1, 2] (4 * 1 // 3 = 1, 4 * 2 // 3 = 2)
        (0, 4, 3, {4: [0], 5: [1], 6: [2], 8: [0], 9: [1], 10: [2]}),
        # t = [0, 2] with odd H = 5 (5 // 2 = 2), K = 1
        (1, 5, 2, {6: [0], 8: [1], 11: [0], 13: [1], 16: [0]}),
        # P = H: every local step one fragment syncs, t = [0, 1, 2]
        (0, 3, 3, {3: [0], 4: [1], 5: [2], 6: [0], 7: [1], 8: [2], 9: [0]}),
    ],
)
def test_streaming_schedule_tables(warmup, interval, fragments, expected):
    last = max(expected)
    assert _sync_table(range(1, last + 1), warmup, interval, fragments) == expected


def test_offsets_evenly_spaced():
    assert [fragment_offset(p, 128, 4) for p in range(4)] == [0, 32, 64, 96]
    assert [fragment_offset(p, 100, 3) for p in range(3)] == [0, 33, 66]
    assert [fragment_offset(p, 5, 5) for p in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fragment 4 must be in"):
        fragment_offset(4, 8, 4)


@pytest.mark.parametrize("warmup,interval,fragments", [(0, 8, 4), (3, 10, 3), (5, 7, 7), (0, 128, 6), (1, 4, 1)])
def test_each_fragment_syncs_every_interval_and_once_per_step(warmup, interval, fragments):
    total = warmup + 6 * interval
    sync_iters = {p: [] for p in range(fragments)}
    for it in range(1, total + 1):
        syncing = fragments_syncing_at(it, warmup, interval, fragments)
        assert len(syncing) <= 1  # P <= H: staggered, never two fragments at once
        for p in syncing:
            sync_iters[p].append(it)
    for p, iters in sync_iters.items():
        offset = fragment_offset(p, interval, fragments)
        assert iters[0] == warmup + offset + interval
        assert all(b - a == interval for a, b in zip(iters, iters[1:]))
        assert len(iters) == (total - warmup - offset) // interval
    # fragment 0 is DiLoCo
    assert sync_iters[0] == [it for it in range(1, total + 1) if is_sync_iteration(it, warmup, interval)]


@pytest.mark.parametrize("warmup,interval", [(0, 1), (0, 5), (4, 3), (7, 16)])
def test_one_fragment_equals_diloco(warmup, interval):
    for it in range(1, warmup + 5 * interval + 1):
        assert (fragments_syncing_at(it, warmup, interval, 1) == [0]) == is_sync_iteration(it, warmup, interval)
        assert fragments_merging_at(it, warmup, interval, 1, 0) == fragments_syncing_at(it, warmup, interval, 1)


def test_merging_is_launch_shifted_by_overlap():
    # K = 2, H = 4, P = 2: launches {6: [0], 8: [1], 10: [0], 12: [1]}; tau = 1 merges one step later.
    merges = {it: fragments_merging_at(it, 2, 4, 2, 1) for it in range(1, 14)}
    assert {it: f for it, f in merges.items() if f} == {7: [0], 9: [1], 11: [0], 13: [1]}
    # tau = 3 with P = 4, H = 4 (t = 0, 1, 2, 3): several fragments in flight at once.
    launches = {it: fragments_syncing_at(it, 0, 4, 4) for it in range(1, 12)}
    assert {it: f for it, f in launches.items() if f} == {4: [0], 5: [1], 6: [2], 7: [3], 8: [0], 9: [1], 10: [2], 11: [3]}
    merges = {it: fragments_merging_at(it, 0, 4, 4, 3) for it in range(1, 12)}
    assert {it: f for it, f in merges.items() if f} == {7: [0], 8: [1], 9: [2], 10: [3], 11: [0]}


def test_layer_assignment():
    assert assign_layers_to_fragments(7, 3, "strided") == [0, 1, 2, 0, 1, 2, 0]
    assert assign_layers_to_fragments(7, 3, "sequential") == [0, 0, 0, 1, 1, 2, 2]
    assert assign_layers_to_fragments(8, 3, "sequential") == [0, 0, 0, 1, 1, 1, 2, 2]
    assert assign_layers_to_fragments(6, 3, "sequential") == [0, 0, 1, 1, 2, 2]
    assert assign_layers_to_fragments(4, 4, "sequential") == [0, 1, 2, 3]
    assert assign_layers_to_fragments(5, 1, "strided") == [0] * 5


def test_embedding_and_output_fragments():
    assert fragment_of_embedding(3, "strided") == 0
    assert fragment_of_embedding(3, "sequential") == 0
    assert fragment_of_output(7, 3, "strided") == 0  # layer 6 -> 6 % 3
    assert fragment_of_output(8, 3, "strided") == 1  # layer 7 -> 7 % 3
    assert fragment_of_output(8, 3, "sequential") == 2
    assert fragment_of_output(4, 1, "strided") == 0


def test_default_num_fragments():
    assert [default_num_fragments(n) for n in (1, 2, 3, 4, 5, 6, 12, 24, 32)] == [1, 1, 1, 1, 2, 2, 4, 8, 11]


def test_validation_messages_name_the_flag():
    with pytest.raises(ValueError, match=r"^--streaming-fragments 5 exceeds --num-layers 4$"):
        assign_layers_to_fragments(4, 5, "strided")
    with pytest.raises(ValueError, match=r"^--streaming-overlap-steps 8 must be < --local-sgd-sync-interval 8$"):
        fragments_merging_at(10, 0, 8, 2, 8)
    with pytest.raises(ValueError, match="--local-sgd-sync-interval must be >= 1"):
        is_sync_iteration(3, 0, 0)
    with pytest.raises(ValueError, match="--streaming-pattern blocks"):
        assign_layers_to_fragments(4, 2, "blocks")
    with pytest.raises(ValueError, match="--streaming-fragments 5 exceeds --local-sgd-sync-interval 4"):
        fragments_syncing_at(3, 0, 4, 5)
    with pytest.raises(ValueError, match="--local-sgd-warmup-iters -1"):
        is_sync_iteration(3, -1, 4)
    with pytest.raises(ValueError, match="--streaming-overlap-steps -1 must be >= 0"):
        validate_streaming_schedule(8, 2, "strided", 8, -1)
    validate_streaming_schedule(8, 2, "strided", 8, 7, warmup_iters=5)


class _FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_time_trigger_float64_resolution():
    # At Unix-epoch magnitudes float32 cannot tell 1.7e9 from 1.7e9 + 60 s; float64 can.
    start = 1.7e9
    clock = _FakeClock(start)
    trigger = TimeTrigger(600.0, clock=clock)
    clock.now = start + 599.5
    assert not trigger.elapsed()
    clock.now = start + 600.0
    assert trigger.elapsed()
    trigger.reset()
    assert not trigger.elapsed()
    assert trigger.elapsed(now=start + 1200.0)
    assert not trigger.elapsed(now=start + 1199.9)
    trigger.reset(now=start + 2000.0)
    assert trigger.seconds_since_reset(now=start + 2000.25) == 0.25
    with pytest.raises(ValueError, match="--local-sgd-sync-time 0"):
        TimeTrigger(0)


def test_should_check():
    assert [i for i in range(1, 13) if should_check(i, 4)] == [4, 8, 12]
    assert [i for i in range(1, 4) if TimeTrigger.should_check(i, 1)] == [1, 2, 3]
    with pytest.raises(ValueError, match="check_every 0"):
        should_check(1, 0)
