"""A-EDiT: time-triggered syncs for workers of different speeds."""
import pytest
import torch

from megatron_edit.async_trigger import AsyncSyncController
from megatron_edit.pseudo_grad_penalty import PenaltyConfig, init_stats, penalty_weights
from mp_harness import TINY_MODEL, run_training


class FakeClock:
    def __init__(self):
        self.now = 1.7e9  # epoch-sized: float32 would have ~2 minutes of resolution here

    def __call__(self):
        return self.now


@pytest.mark.parametrize("step_seconds", [0.3, 0.7, 1.1])
def test_sync_fires_on_the_first_step_that_crosses_the_threshold(step_seconds):
    clock = FakeClock()
    ctl = AsyncSyncController(sync_time_s=2.0, num_workers=1, worker_index=0, global_batch_size=8,
                              budget_samples=10**9, worker_group=None, inter_worker_group=None,
                              device=torch.device("cpu"), clock=clock)
    ctl.start(consumed_samples=0)
    fired = []
    for step in range(1, 20):
        clock.now += step_seconds
        if ctl.after_inner_step():
            fired.append(step)
            ctl.exchange()
            ctl.restart_clock()
    # each interval ends at the first step whose cumulative time reaches 2 s
    per_interval = int(-(-2.0 // step_seconds))  # ceil
    expected = list(range(per_interval, 20, per_interval))
    assert fired == expected
    assert ctl.agreed_samples == len(fired) * per_interval * 8


@pytest.mark.parametrize("sync_time,step,expected", [(600.0, 0.5, 60), (600.0, 0.1, 64), (100.0, 1.0, 5),
                                                      (2.0, 0.3, 1), (10.0, 0.0, 1)])
def test_vote_interval_bounds_how_late_a_sync_starts(sync_time, step, expected):
    from megatron_edit.async_trigger import sync_check_every

    assert sync_check_every(sync_time, step) == expected
    if step > 0:
        assert expected == 1 or expected * step <= 0.05 * sync_time  # at most 5% late (capped at 64 votes)


@pytest.mark.parametrize("fixed", [None, 10])
def test_votes_happen_every_k_steps_not_every_step(fixed):
    """100 s between syncs, 1 s steps: the derived interval is 5 steps (a sync at most 5 s late), so
    about 20 votes per interval instead of 100; a fixed --local-sgd-sync-check-interval is kept."""
    clock = FakeClock()
    ctl = AsyncSyncController(100.0, 1, 0, 8, 10**9, None, None, torch.device("cpu"), clock=clock,
                              check_interval=fixed)
    ctl.start(0)
    fired = None
    for step in range(1, 200):
        clock.now += 1.0
        if ctl.after_inner_step():
            fired = step
            break
    k = fixed or 5
    assert ctl.check_interval == k
    assert 100 <= fired < 100 + k and fired % k in (0, 1 % k)
    assert ctl.votes <= fired // k + 2


def test_budget_ends_the_interval_without_a_vote():
    clock = FakeClock()
    ctl = AsyncSyncController(1e6, 1, 0, 8, budget_samples=8 * 7, worker_group=None, inter_worker_group=None,
                              device=torch.device("cpu"), clock=clock, check_interval=50)
    ctl.start(0)
    steps = 0
    while not ctl.after_inner_step():
        clock.now += 1.0
        steps += 1
    assert steps + 1 == 7 and ctl.votes == 0


def test_fast_worker_does_more_steps_between_syncs():
    """Two simulated workers on one clock: the 3x slower one syncs after a third of the steps."""
    clock = FakeClock()
    workers = [AsyncSyncController(3.0, 1, 0, 8, 10**9, None, None, torch.device("cpu"), clock=clock)
               for _ in range(2)]
    for w in workers:
        w.start(0)
    durations, next_done = [0.25, 0.75], [0.25, 0.75]
    steps_at_sync = [None, None]
    while None in steps_at_sync:
        w = min((i for i in range(2) if steps_at_sync[i] is None), key=lambda i: next_done[i])
        clock.now = 1.7e9 + next_done[w]
        if workers[w].after_inner_step():
            steps_at_sync[w] = workers[w].steps_since_sync
        next_done[w] += durations[w]
    assert steps_at_sync == [12, 4]


def test_step_weighted_averaging_matches_hand_computation():
    cfg = PenaltyConfig(anomaly_threshold=0.0, weighting="uniform", clip=None)
    norms = torch.tensor([[1.0, 2.0], [1.5, 1.0]])
    weights, skip, _, _ = penalty_weights(norms, init_stats(2), cfg, step_weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.75], [0.25, 0.25]]))
    assert not skip.any()
    cfg = PenaltyConfig(anomaly_threshold=0.0, weighting="norm", temperature=1.0, clip=None)
    weights, _, _, _ = penalty_weights(norms, init_stats(2), cfg, step_weights=torch.tensor([3.0, 1.0]))
    # layer 0: T = mean(1, 1.5) = 1.25; softmax(-G/T) = [e^-0.8, e^-1.2] / sum, then x [3, 1], renormalised
    a, b = 3 * torch.exp(torch.tensor(-0.8)), torch.exp(torch.tensor(-1.2))
    torch.testing.assert_close(weights[:, 0], torch.stack([a, b]) / (a + b))


A_EDIT = TINY_MODEL + ["--global-batch-size", "8", "--lr", "3e-3", "--local-sgd", "a-edit",
                       "--local-sgd-workers", "2", "--no-local-sgd-layerwise"]


LAYERWISE = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


@pytest.mark.parametrize("mode", [[], LAYERWISE], ids=["all-at-once", "layer-wise"])
def test_straggler_run_finishes_with_identical_params(mode):
    """Worker 1 is 3x slower. A-EDiT in its default layer-wise mode (the outer update lands bucket by
    bucket in each worker's next forward, at that worker's own pace) and all at once."""
    argv = [a for a in A_EDIT if a != "--no-local-sgd-layerwise" or not mode] + mode
    results = run_training(argv + ["--train-iters", "30", "--local-sgd-sync-time", "0.5",
                                   "--local-sgd-debug-slow-worker", "1:3", "--pseudo-grad-step-weighted",
                                   "--eval-interval", "8", "--eval-iters", "1"], 2)
    by_worker = {r["worker"]: r for r in results}
    fast, slow = len(by_worker[0]["losses"]), len(by_worker[1]["losses"])
    assert fast > 1.5 * slow, (fast, slow)
    assert results[0]["consumed_samples"] == results[1]["consumed_samples"] >= 30 * 8
    for name in results[0]["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
    for r in results:
        assert r["losses"][-1] < r["losses"][0] - 0.5
    # Validation at the first sync after every 8 agreed steps, on both workers at the same agreed step.
    # How many agreed steps a sync covers depends on the machine's speed, so the expected validation
    # steps are derived from the syncs this run made (the last one, forced by the budget, ends the run).
    syncs = results[0]["sync_steps"]
    assert syncs == results[1]["sync_steps"] and len(syncs) >= 2 and syncs[-1] >= 30, syncs
    expected, last = [], 0
    for step in syncs[:-1]:
        if step // 8 > last // 8:
            expected.append(step)
            last = step
    steps = [step for step, _ in results[0]["validation"]]
    assert results[0]["validation"] == results[1]["validation"]
    assert steps == expected + [syncs[-1]] and len(steps) >= 2, (steps, syncs)


def test_budget_reached_mid_interval_every_rank_exits():
    """The time interval (1000 s) never elapses: the budget forces the one sync, on every rank of both
    workers (2 ranks each), and the run ends there."""
    results = run_training(A_EDIT + ["--train-iters", "6", "--local-sgd-sync-time", "1000"], 4)
    assert all(r["consumed_samples"] == 48 for r in results)
    assert all(len(r["losses"]) == 6 for r in results if r["last_stage"])
    syncs = [sum(1 for b in r["sync_event_bytes"] if b > 0) for r in results]
    assert syncs == [1, 1, 1, 1]
