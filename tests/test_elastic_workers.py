"""Elastic workers on torchft (--local-sgd-fault-tolerance): 3 worker jobs plus a lighthouse per test."""
import os
import signal

import pytest
import torch

pytest.importorskip("torchft")

from elastic_harness import ELASTIC, ElasticRun, iteration_losses, rank_pids, sync_lines  # noqa: E402
from mp_harness import TINY_MODEL, run_training  # noqa: E402

DILOCO = ["--local-sgd", "diloco", "--local-sgd-sync-interval", "4"]
EDIT = ["--local-sgd", "edit", "--no-local-sgd-layerwise", "--local-sgd-sync-interval", "4"]


def _params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STREAMING = ["--local-sgd", "streaming", "--streaming-fragments", "2", "--local-sgd-sync-interval", "2",
             "--streaming-overlap-steps", "0", "--outer-grad-dtype", "fp32"]
DP2 = ["--use-distributed-optimizer", "--global-batch-size", "24"]  # 2 ranks per worker: its own distopt


# A loss spike on worker 1 at 3, no gradient clipping: the second-moment test flags it at the sync of 4 and
# its inner state is repaired; elastic workers reduce the moments inside the attempt and copy them after the
# commit (LocalSGD._sync_fault_tolerant), in-job workers in place.
SPIKE = ["--local-sgd-debug-fault", "1:loss-spike:3", "--clip-grad", "0"]


@pytest.mark.parametrize("method,ranks", [(DILOCO, 1), (EDIT, 1), (STREAMING, 1), (EDIT + DP2, 2), (EDIT + SPIKE, 1)],
                         ids=["diloco", "edit", "streaming", "edit-2-ranks-distopt", "edit-repairs-a-spiked-worker"])
def test_elastic_run_without_failures_equals_the_in_job_run(tmp_path, method, ranks):
    """3 worker jobs through torchft == 3 workers in one job, bitwise, over 3 syncs (streaming: 6
    fragment syncs): the transport is the only difference. The lighthouse waits for all 3, so every
    sync has every worker. With SPIKE both runs flag and repair worker 1 at the sync of 4."""
    flags = method + ["--train-iters", "12"]
    with ElasticRun(tmp_path, min_replicas=3) as run:
        workers = [run.start(w, ELASTIC + flags, nproc=ranks) for w in range(3)]
        run.wait_all_succeed(workers)
        elastic = [r for p in workers for r in run.results(p)]
        logs = [run.log(p) for p in workers]
        logged = [sync_lines(log) for log in logs]
    in_job = run_training(TINY_MODEL + ["--global-batch-size", "12", "--lr", "3e-3", "--local-sgd-workers", "3"]
                          + flags, 3 * ranks)
    expected = [(it, 3) for it in in_job[0]["sync_steps"]]
    assert len(expected) >= 3 and all(lines == expected for lines in logged), (logged[0], expected)
    # An elastic worker logs its own loss; the in-job run logs the mean over all workers.
    for step, reference in enumerate(in_job[0]["losses"]):
        assert abs(sum(r["losses"][step] for r in elastic[::ranks]) / 3 - reference) < 1e-5
    for mine, reference in zip(elastic, in_job):  # worker-major rank order in both
        assert _params_equal(mine["params"], reference["params"])
    if method[-4:] == SPIKE:
        assert dict(in_job[0]["sync_repaired"])[4] == ["w1"]
        assert all(" inner state repaired: w1 |" in log for log in logs)


def _digest_at(result: dict, iteration: int):
    """The main-shard digest a worker recorded after ``iteration`` (its first recorded iteration may be
    later than 1: a worker that healed starts at the peers' iteration)."""
    position = [it for it, _, _ in result["step_times"]].index(iteration)
    return result["digests"][position]


def test_worker_killed_mid_interval_others_go_on_and_restart_rejoins(tmp_path):
    """Worker 2 dies (SIGKILL) at iteration 10, between the syncs of 8 and 12. Workers 0 and 1 commit the
    following syncs without it and keep training; worker 2, started again with the same command, heals
    from a live peer inside one of their syncs and is bitwise equal to them after its first own sync."""
    # Worker 0 steps 4x slower (everyone waits for it at the syncs), so the survivors are still training
    # when the restarted worker has imported megatron-core.
    flags = ELASTIC + EDIT + ["--train-iters", "320", "--log-interval", "1", "--local-sgd-debug-fault", "2:kill:10",
                              "--local-sgd-debug-slow-worker", "0:4"]
    with ElasticRun(tmp_path, min_replicas=2) as run:
        first = [run.start(w, flags) for w in range(3)]
        assert run.wait(first[2], timeout=300) != 0  # killed
        run.wait_for_line(first[0], r"workers \[2\] left")
        run.wait_for_line(first[0], r"iteration\s+40/")  # further progress without worker 2
        restarted = run.start(2, flags, name="worker2-again")
        run.wait_all_succeed([first[0], first[1], restarted])
        logs = [run.log(p) for p in (first[0], first[1], restarted)]
        results = [run.results(p)[0] for p in (first[0], first[1], restarted)]
    survivor = sync_lines(logs[0])
    alone = [it for it, workers in survivor if workers == 2]
    assert len(alone) >= 2 and alone[0] == 12, survivor  # the first sync after the kill is without it
    losses = iteration_losses(logs[0])
    assert sum(losses[it] for it in range(37, 41)) < sum(losses[it] for it in range(7, 11)) - 0.2
    healed = int(__import__("re").search(r"joined the sync at iteration (\d+)", logs[2]).group(1))
    assert healed > 40 and healed % 4 == 0
    assert (healed + 4, 3) in survivor  # its first own sync has all three
    first_own = _digest_at(results[0], healed + 4)
    assert _digest_at(results[1], healed + 4) == first_own == _digest_at(results[2], healed + 4)
    assert all(r["consumed_samples"] == 320 * 12 for r in results)
    assert _params_equal(results[0]["params"], results[2]["params"])


def test_worker_killed_inside_a_sync_is_left_out_of_that_sync(tmp_path):
    """Worker 2 dies in the sync of iteration 8, after the norms' exchange, before the pseudo-gradient
    reduction. The survivors' attempt fails, is retried without it, and ends exactly as in a run where
    worker 2 died at iteration 6 (absent from the sync of 8 on): no hang, nothing of it in the anchor.
    EDiT, so the penalty statistics the failed attempt updated must be restored too."""
    base = ELASTIC + EDIT + ["--train-iters", "16"]
    outcomes = {}
    for kind, at in (("kill-in-sync", 8), ("kill", 6)):
        with ElasticRun(tmp_path / kind, min_replicas=2) as run:
            workers = [run.start(w, base + ["--local-sgd-debug-fault", f"2:{kind}:{at}"]) for w in range(3)]
            assert run.wait(workers[2], timeout=300) != 0
            run.wait_all_succeed(workers[:2], timeout=300)
            outcomes[kind] = [run.results(p)[0] for p in workers[:2]], run.log(workers[0])
    (in_sync, log), (before, _) = outcomes["kill-in-sync"], outcomes["kill"]
    assert "sync attempts 2" in log and sync_lines(log) == [(4, 3), (8, 2), (12, 2), (16, 2)]
    for a, b in zip(in_sync, before):
        assert _params_equal(a["params"], b["params"])
        assert a["losses"] == b["losses"]
        assert _params_equal(a["penalty_stats"], b["penalty_stats"])  # the EWMA saw each sync once


def test_bad_input_gives_one_clear_error_and_the_running_workers_go_on(tmp_path):
    """An unreachable lighthouse; a worker whose flags differ from the running ones'; a second worker
    claiming a running worker's index. Each exits with its one line; workers 0 and 1 (worker 2 died at
    iteration 2) never count them in a sync and finish in agreement."""
    flags = ELASTIC + DILOCO + ["--train-iters", "300", "--log-interval", "1", "--local-sgd-debug-slow-worker", "0:3",
                                "--local-sgd-debug-fault", "2:kill:2"]
    with ElasticRun(tmp_path, min_replicas=1) as run:
        nowhere = run.start(2, flags, name="no-lighthouse", lighthouse="localhost:9")
        assert run.wait(nowhere, timeout=300) != 0
        assert "error: cannot reach the torchft lighthouse at localhost:9" in run.log(nowhere)
        good = [run.start(w, flags) for w in range(3)]
        assert run.wait(good[2], timeout=300) != 0
        other_shape = run.start(2, _replace(flags, "--hidden-size", "64"), name="other-shape")
        assert run.wait(other_shape, timeout=300) != 0
        assert "flags that differ from the running workers': hidden_size 64 (running workers: 32)" in run.log(other_shape)
        twin = run.start(1, flags, name="twin")
        assert run.wait(twin, timeout=300) != 0
        assert "worker index 1 (--replica-group-id) is held by a worker running since" in run.log(twin)
        run.wait_all_succeed(good[:2])
        logs = [run.log(p) for p in good[:2]]
        results = [run.results(p)[0] for p in good[:2]]
    assert all(workers == 2 for it, workers in sync_lines(logs[0])), sync_lines(logs[0])
    assert sync_lines(logs[0])[-1] == (300, 2)
    assert _params_equal(results[0]["params"], results[1]["params"])
    losses = iteration_losses(logs[0])
    assert losses[300] < losses[1] - 0.5


def _replace(argv, flag, value):
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def test_elastic_checkpoints_resume_bit_exactly_and_a_restart_from_mixed_ages_heals(tmp_path):
    """Each worker saves in <save>/worker<I>/ (at 6: mid interval, theta != anchor). A whole-run restart
    from step 6 continues bit-exactly. A restart where worker 2 finds only an older checkpoint (its
    newer one was lost) heals it from a live peer at startup, and the run ends in agreement."""
    root = str(tmp_path / "ckpt")
    flags = ELASTIC + EDIT + ["--train-iters", "16", "--log-interval", "1", "--save", root, "--save-interval", "6"]
    with ElasticRun(tmp_path / "straight", min_replicas=3) as run:
        workers = [run.start(w, flags) for w in range(3)]
        run.wait_all_succeed(workers)
        straight = [run.results(p)[0] for p in workers]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "worker0").iterdir()) == [
        "iter_0000006", "iter_0000012", "iter_0000016", "latest_checkpointed_iteration.txt"]
    with ElasticRun(tmp_path / "resumed", min_replicas=3) as run:
        workers = [run.start(w, flags + ["--load", root, "--ckpt-step", "6"]) for w in range(3)]
        run.wait_all_succeed(workers)
        resumed = [run.results(p)[0] for p in workers]
    for a, b in zip(resumed, straight):
        assert a["losses"] == b["losses"][6:]
        assert _params_equal(a["params"], b["params"])
    # Worker 2 lost its checkpoints after 6; the others resume from 16 and train to 24.
    more = _replace(flags, "--train-iters", "24")
    with ElasticRun(tmp_path / "mixed", min_replicas=3) as run:
        workers = [run.start(w, more + ["--load", root] + (["--ckpt-step", "6"] if w == 2 else [])) for w in range(3)]
        run.wait_all_succeed(workers)
        mixed = [run.results(p)[0] for p in workers]
        assert "healed from a live peer and starts at iteration 16" in run.log(workers[2])
    assert all(r["consumed_samples"] == 24 * 12 for r in mixed)
    assert _params_equal(mixed[0]["params"], mixed[2]["params"])


def test_kill_minus_nine_of_one_rank_takes_its_worker_out_not_the_run(tmp_path):
    """Workers of 2 ranks (distributed optimizer inside each). SIGKILL of one rank of worker 2: its job
    goes down (its launcher reaps the other rank, as torchrun's agent does), workers 0 and 1 go on
    without it and finish in agreement."""
    flags = ELASTIC + EDIT + DP2 + ["--train-iters", "40", "--log-interval", "1", "--local-sgd-debug-slow-worker", "0:3"]
    with ElasticRun(tmp_path, min_replicas=2) as run:
        workers = [run.start(w, flags, nproc=2) for w in range(3)]
        run.wait_for_line(workers[2], r"iteration\s+5/")
        victim = rank_pids(workers[2])
        assert len(victim) == 2
        os.kill(victim[1], signal.SIGKILL)
        assert run.wait(workers[2], timeout=120) != 0
        run.wait_all_succeed(workers[:2])
        log = run.log(workers[0])
        results = [r for p in workers[:2] for r in run.results(p)]
    assert "workers [2] left" in log
    lines = sync_lines(log)
    assert lines[-1] == (40, 2) and sum(1 for _, w in lines if w == 2) >= 2, lines
    assert _params_equal(results[0]["params"], results[2]["params"])
    assert _params_equal(results[1]["params"], results[3]["params"])
