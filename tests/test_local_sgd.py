"""Local SGD inside megatron-core: equivalences that the algebra guarantees, and worker isolation.

Each test runs the real entry (GPTModel, DDP over the worker, megatron-core optimizer and schedules) on
gloo ranks.
"""
import pytest
import torch

from mp_harness import TINY_MODEL, losses, run_training

DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--ddp-bucket-size", "3000"]


def _assert_params_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


SGD_BASE = TINY_MODEL + ["--global-batch-size", "16", "--train-iters", "6", "--lr", "0.5",
                         "--optimizer", "sgd", "--sgd-momentum", "0", "--clip-grad", "0", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def synchronous_sgd():
    return run_training(SGD_BASE, 4)


def test_diloco_sgd_interval_1_equals_synchronous_training(synchronous_sgd):
    """Inner SGD, H=1, outer lr 1, momentum 0: anchor - mean_w(lr g_w) is exactly a data-parallel SGD
    step over the union of the workers' batches (4 ranks = 2 workers x 2 ranks)."""
    base, sync = SGD_BASE, synchronous_sgd
    local = run_training(base + ["--local-sgd", "diloco", "--local-sgd-workers", "2", "--local-sgd-sync-interval",
                                 "1", "--outer-lr", "1", "--outer-momentum", "0"], 4)
    assert losses(local) == pytest.approx(losses(sync), rel=1e-5)
    assert losses(sync)[-1] < losses(sync)[0] - 0.3
    for r_sync, r_local in zip(sync, local):
        _assert_params_close(r_sync["params"], r_local["params"], rtol=1e-5, atol=1e-6)


def test_local_sgd_without_sync_is_not_data_parallel(synchronous_sgd):
    """Control for the test above: with H=3 the workers drift apart between syncs, so the curve must
    differ from synchronous training (the equivalence is not an accident of the harness)."""
    sync = losses(synchronous_sgd)
    local = losses(run_training(SGD_BASE + ["--local-sgd", "diloco", "--local-sgd-workers", "2",
                                        "--local-sgd-sync-interval", "3", "--outer-lr", "1",
                                        "--outer-momentum", "0"], 4))
    assert local[0] == pytest.approx(sync[0], rel=1e-6)
    assert abs(local[4] - sync[4]) > 1e-4


EDIT = TINY_MODEL + ["--global-batch-size", "16", "--train-iters", "8", "--lr", "3e-3",
                     "--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "3",
                     "--local-sgd-warmup-iters", "2", "--pseudo-grad-ewma-warmup", "1"] + DIST_OPT


@pytest.fixture(scope="module")
def edit_all_at_once():
    return run_training(EDIT + ["--no-local-sgd-layerwise"], 4)


def test_edit_layerwise_equals_all_at_once(edit_all_at_once):
    """EDiT's in-forward, per-bucket sync is a re-timing of the same computation: with W=2 (sums of two
    terms are order-free) loss curves and final params are identical."""
    layerwise = run_training(EDIT, 4)
    assert losses(layerwise) == losses(edit_all_at_once)
    for a, b in zip(layerwise, edit_all_at_once):
        _assert_params_close(a["params"], b["params"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", [
    ["--ddp-bucket-size", "3000"],
    ["--pipeline-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
], ids=["dp-layer-split-over-buckets", "pp2", "pp2-vpp2"])
def test_edit_layerwise_equals_all_at_once_with_pipeline_and_an_active_clip(layout):
    """With a clip that bites (phi = 1e-3, below every layer's pseudo-gradient norm) the layer-wise sync
    equals the all-at-once one bit for bit, also when a layer is split over several buckets (3000
    elements): the per-layer sums of squares are added in the same order in both. Under PP 2 (and
    VPP 2) every stage and virtual chunk syncs layer by layer (by default buckets of about one layer
    everywhere; before, pipeline stages > 0 and virtual chunks > 0 were one unit each)."""
    argv = [a for a in EDIT if a not in ("--ddp-bucket-size", "3000")] + layout + ["--pseudo-grad-clip", "1e-3"]
    layerwise = run_training(argv, 4)
    # 4 layers: each stage syncs at least its layers and its embedding / output separately.
    assert all(r["sync_units"] >= 3 for r in layerwise), [(r["pp"], r["sync_units"]) for r in layerwise]
    at_once = run_training(argv + ["--no-local-sgd-layerwise"], 4)
    assert losses(layerwise) == losses(at_once)
    for a, b in zip(layerwise, at_once):
        _assert_params_close(a["params"], b["params"], rtol=0, atol=0)
    unclipped = losses(run_training(argv[:-1] + ["10"], 4))
    assert unclipped != losses(at_once)  # the clip did change the outer steps


def test_offloaded_outer_state_trains_bitwise_like_on_device(edit_all_at_once):
    """--local-sgd-offload-outer-state keeps anchor and momentum in (pinned) host memory and stages each
    unit's a unit ahead of its launch (layer-wise here): on CPU the same code path does plain copies, so
    the run is bit for bit the run without offload (and layer-wise equals all-at-once)."""
    offloaded = run_training(EDIT + ["--local-sgd-offload-outer-state"], 4)
    assert losses(offloaded) == losses(edit_all_at_once)
    for a, b in zip(offloaded, edit_all_at_once):
        _assert_params_close(a["params"], b["params"], rtol=0, atol=0)
        assert a["outer_state_bytes"] == b["outer_state_bytes"] == 2 * a["main_shard_bytes"]


def test_workers_agree_after_sync_and_differ_between(edit_all_at_once):
    """Digests of each rank's fp32 main shard: equal across workers (same shard) at warmup and sync
    iterations, different in between; at the end every rank of a TP/PP slice holds the same params."""
    results = edit_all_at_once
    by_slot = {}
    for r in results:
        by_slot.setdefault((r["tp"], r["pp"], r["intra"]), []).append(r)
    warmup, interval = 2, 3
    for slot, ranks in by_slot.items():
        assert sorted(r["worker"] for r in ranks) == [0, 1]
        a, b = ranks[0]["digests"], ranks[1]["digests"]
        for i, (da, db) in enumerate(zip(a, b)):
            iteration = i + 1
            synced = iteration <= warmup or (iteration - warmup) % interval == 0
            if synced:
                assert da == pytest.approx(db, rel=1e-12), f"{slot} iteration {iteration}"
            else:
                assert da[1] != pytest.approx(db[1], rel=1e-9), f"{slot} iteration {iteration} identical"
    # Iteration 8 is a sync: every rank of every worker ends with the same full params.
    by_model_slot = {}
    for r in results:
        by_model_slot.setdefault((r["tp"], r["pp"]), []).append(r["params"])
    for slot, param_sets in by_model_slot.items():
        assert len(param_sets) == 4
        for other in param_sets[1:]:
            _assert_params_close(param_sets[0], other, rtol=0, atol=0)


def test_ranks_inside_a_worker_agree_between_syncs():
    """Stopped mid-interval (iteration 7, without the final sync): workers differ, the two ranks of each
    worker agree."""
    results = run_training(EDIT[:EDIT.index("--train-iters") + 1] + ["7"] + EDIT[EDIT.index("--train-iters") + 2:]
                           + ["--no-local-sgd-layerwise", "--no-local-sgd-final-sync"], 4)
    by_worker = {}
    for r in results:
        by_worker.setdefault(r["worker"], []).append(r["params"])
    for worker, (a, b) in by_worker.items():
        _assert_params_close(a, b, rtol=0, atol=0)
    differs = [not torch.equal(by_worker[0][0][k], by_worker[1][0][k]) for k in by_worker[0][0]]
    assert all(differs)


def test_worker_curve_is_layout_invariant():
    """The same local-SGD run (W=2, edit, layer-wise) under TP=2 x PP=2 and TP=PP=1."""
    flat = losses(run_training(EDIT, 2))
    sharded = losses(run_training(EDIT + ["--tensor-model-parallel-size", "2",
                                          "--pipeline-model-parallel-size", "2"], 8))
    assert sharded == pytest.approx(flat, rel=2e-5)


CORRUPTION = TINY_MODEL + [
    "--global-batch-size", "16", "--train-iters", "16", "--lr", "0.5", "--optimizer", "sgd", "--sgd-momentum", "0",
    "--clip-grad", "0", "--weight-decay", "0", "--local-sgd-workers", "4", "--local-sgd-sync-interval", "2",
    "--outer-lr", "0.8", "--outer-momentum", "0.5",
]
CORRUPT = ["--local-sgd-debug-corrupt-worker", "1:3:0.3"]  # worker 1: N(0, 9) gradient noise, 30% of steps
EDIT_ALL_AT_ONCE = ["--local-sgd", "edit", "--no-local-sgd-layerwise", "--pseudo-grad-ewma-warmup", "1"]


def test_penalty_protects_against_a_corrupted_worker():
    """Worker 1 of 4 gets gradient-noise bursts (inner SGD, so a burst is a large parameter jump). DiLoCo
    averages the jump in and is clearly hurt; EDiT flags the worker (z-score), down-weights it and clips,
    and ends where the clean run ends."""
    clean = losses(run_training(CORRUPTION + EDIT_ALL_AT_ONCE, 4))
    edit = losses(run_training(CORRUPTION + EDIT_ALL_AT_ONCE + CORRUPT, 4))
    diloco = losses(run_training(CORRUPTION + ["--local-sgd", "diloco"] + CORRUPT, 4))
    assert clean[-1] < clean[0] - 0.5
    assert abs(edit[-1] - clean[-1]) < 0.05, (edit[-1], clean[-1])
    assert diloco[-1] > clean[-1] + 0.5, (diloco[-1], clean[-1])


def test_diloco_leaves_out_a_nonfinite_worker():
    """Worker 2's gradients are Inf every step, so its delta is NaN at every sync. DiLoCo (no penalty)
    averages over the finite workers only: after each sync (H=2) every worker, worker 2 included, holds
    finite params and the loss keeps falling; the run ends on a sync, so all final params are finite."""
    results = run_training(CORRUPTION[:CORRUPTION.index("--train-iters") + 1] + ["8"]
                           + CORRUPTION[CORRUPTION.index("--train-iters") + 2:]
                           + ["--local-sgd", "diloco", "--local-sgd-debug-corrupt-worker", "2:inf:1.0"], 4)
    curve = losses(results)
    after_sync = curve[0::2]  # iterations 1, 3, 5, 7 start from freshly synced params
    assert all(torch.isfinite(torch.tensor(after_sync)))
    assert after_sync[-1] < after_sync[0] - 0.3
    for r in results:
        assert all(torch.isfinite(p).all() for p in r["params"].values())


def test_bf16_edit_with_distributed_optimizer():
    """bf16 model (Float16Module, bf16 param buffer) with fp32 main shards: EDiT trains and every worker
    holds the same params after the final sync (iteration 6, H=3)."""
    results = run_training(TINY_MODEL + ["--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3", "--bf16",
                                         "--local-sgd", "edit", "--local-sgd-workers", "2",
                                         "--local-sgd-sync-interval", "3"] + DIST_OPT, 2)
    curve = losses(results)
    assert curve[-1] < curve[0] - 0.1
    for name in results[0]["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
