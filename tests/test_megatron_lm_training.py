"""Local SGD trained inside Megatron-LM's own training loop, on CPU (issue 11).

Megatron-LM's ``pretrain_gpt.py`` runs unchanged through ``python -m megatron_edit.launch`` under
torchrun (the CPU mode of megatron_lm_cpu switches it to gloo). Skipped unless ``MEGATRON_LM_PATH`` points
at a core_v0.16.1 or core_v0.19.x checkout whose megatron-core series is installed (megatron_lm_harness).
What the printed lines and the saved checkpoints show: the loss falls, a sync line at every sync, the
workers' parameters differ between syncs and are bitwise equal after one, and 2N iterations straight
equal N + resume + N line for line with two syncs after the resume.
"""
import os
import subprocess
import sys

import pytest
import torch

from megatron_lm_harness import REPO, needs_megatron_lm, run_megatron_lm

pytestmark = needs_megatron_lm

EDIT = ["--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "2"]


def _worker_tensors(directory: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{model key: (worker 0's tensor, worker 1's)} read from a torch_dist checkpoint in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(directory)
    meta = reader.read_metadata().state_dict_metadata
    prefix = "local_sgd.worker1."
    keys = [k for k, m in meta.items() if isinstance(m, TensorStorageMetadata) and not k.startswith(
        ("optimizer", "local_sgd", "rng_state")) and prefix + k in meta]
    assert keys, sorted(meta)[:20]
    state = {}
    for k in keys:
        for name in (k, prefix + k):
            state[name] = torch.empty(meta[name].size, dtype=meta[name].properties.dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {k: (state[k], state[prefix + k]) for k in keys}


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--pipeline-model-parallel-size", "2"]], ids=["tp2", "pp2"])
def test_edit_layerwise_trains_and_workers_agree_after_each_sync(layout, tmp_path):
    """TP 2 x DP 2 and PP 2 x DP 2 (the p2p path on gloo), 2 workers, layer-wise EDiT with the distributed
    optimizer, overlapped grad reduce and param gather. Saves at iteration 3 (between syncs), 6 (a sync:
    the save lands the pending layer-wise updates) and 7 (the end: the final sync, between two scheduled
    ones) hold both workers' weights."""
    save = str(tmp_path / "ckpt")
    run = run_megatron_lm(4, layout + EDIT + ["--train-iters", "7", "--log-interval", "1", "--save", save,
                                              "--save-interval", "3"])
    assert run.returncode == 0, run.tail()
    losses = {i: float(v) for i, v in run.losses().items()}
    assert sorted(losses) == list(range(1, 8)), run.tail()
    assert losses[7] < losses[1] - 0.05, losses
    syncs = run.syncs()
    assert [s[0] for s in syncs] == [2, 4, 6, 7] and {s[1] for s in syncs} == {2}, syncs
    assert all(s[2] == "all" and s[4] == "fp32" and s[5] > 0 for s in syncs)

    between = _worker_tensors(os.path.join(save, "iter_0000003"))
    assert sum(not torch.equal(a, b) for a, b in between.values()) >= len(between) // 2
    for agreed in ("iter_0000006", "iter_0000007"):
        at_sync = _worker_tensors(os.path.join(save, agreed))
        assert all(torch.equal(a, b) for a, b in at_sync.values()), agreed


def test_a_sample_budget_ends_on_the_final_sync(tmp_path):
    """--train-samples 56 (7 iterations of 8) instead of --train-iters: Megatron-LM works out the last
    iteration only after the optimizer (and the engine) exist. The run still ends on the final sync at 7,
    between scheduled ones, and Megatron-LM's end-of-training save holds equal weights for both workers."""
    save = str(tmp_path / "ckpt")
    run = run_megatron_lm(4, ["--tensor-model-parallel-size", "2"] + EDIT + [
        "--train-samples", "56", "--log-interval", "1", "--save", save, "--save-interval", "100"])
    assert run.returncode == 0, run.tail()
    assert sorted(run.losses()) == list(range(1, 8)), run.tail()
    assert [s[0] for s in run.syncs()] == [2, 4, 6, 7], run.syncs()
    assert all(torch.equal(a, b) for a, b in _worker_tensors(os.path.join(save, "iter_0000007")).values())


def test_streaming_fp4_trains(tmp_path):
    """Streaming DiLoCo with an fp4 (E3M0) wire: 4 layers in 2 fragments, each synced every 4
    iterations on a staggered schedule and merged one iteration later; at the last iteration (9) fragment
    0, launched at 8, lands on its anchor and fragment 1 syncs (the final sync)."""
    run = run_megatron_lm(4, ["--local-sgd", "streaming", "--local-sgd-workers", "2",
                              "--local-sgd-sync-interval", "4", "--streaming-fragments", "2",
                              "--outer-grad-dtype", "fp4-e3m0", "--train-iters", "9", "--log-interval", "1"])
    assert run.returncode == 0, run.tail()
    losses = {i: float(v) for i, v in run.losses().items()}
    assert losses[9] < losses[1] - 0.05, losses
    syncs = run.syncs()
    # fragment p: p*H/P + kH, k >= 1; then the final sync
    assert [(s[0], s[2]) for s in syncs] == [(4, "0"), (6, "1"), (8, "0"), (9, "1")], syncs
    assert all(s[4] == "fp4-e3m0" for s in syncs)


@pytest.mark.parametrize("method", [
    ["--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "3"],
    ["--local-sgd", "streaming", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4",
     "--streaming-fragments", "2", "--outer-grad-dtype", "fp4-e3m0", "--outer-grad-error-feedback"],
], ids=["edit", "streaming-fp4-inflight"])
def test_resume_prints_the_same_lines_as_a_straight_run(method, tmp_path):
    """10 iterations straight vs 4 + resume + 6 (DP 4 = 2 workers of 2 ranks), saved between syncs so
    that nothing can be re-derived from the parameters. EDiT (H = 3): the save holds the anchor and
    momentum of the sync at 3, the penalty statistics and every worker's params and Adam state; syncs
    at 6 and 9 after the resume. Streaming: fragment 0 was launched at 4 and is in flight at the save
    (merged at 5); fragment 1 has never synced (its anchor is the initial model); fragment 1 syncs at
    6 and 10, fragment 0 at 8, with error-feedback residuals. --log-interval 2: Megatron-LM prints the
    first iteration after a resume on a line of its own (without resetting its averages), so the resumed
    run has one extra line, at 5; every line both runs print is identical."""
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    flags = method + ["--log-interval", "2"]
    straight = run_megatron_lm(4, flags + ["--train-iters", "10", "--save", straight_dir, "--save-interval", "4"])
    assert straight.returncode == 0, straight.tail()
    os.makedirs(resumed_dir)
    os.rename(os.path.join(straight_dir, "iter_0000004"), os.path.join(resumed_dir, "iter_0000004"))
    with open(os.path.join(resumed_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4")
    resumed = run_megatron_lm(4, flags + ["--train-iters", "10", "--load", resumed_dir])
    assert resumed.returncode == 0, resumed.tail()

    expected = {i: v for i, v in straight.losses().items() if i > 4}
    got = resumed.losses()
    assert sorted(expected) == [6, 8, 10] and sorted(got) == [5, 6, 8, 10], (straight.losses(), got)
    assert {i: got[i] for i in expected} == expected
    assert {i: resumed.grad_norms()[i] for i in expected} == {i: straight.grad_norms()[i] for i in expected}
    after = [s for s in straight.syncs() if s[0] > 4]
    assert len(after) >= 2
    assert [s[:5] for s in resumed.syncs()] == [s[:5] for s in after]


def test_checkpoints_of_the_other_entry_are_refused_in_one_line(tmp_path):
    """A checkpoint of megatron_edit's own entry cannot be resumed by Megatron-LM's loop (its data
    position, RNG and schedule are laid out per worker), and the other way round: one line each."""
    from megatron_edit.training.launch import spawn_training

    from mp_harness import TINY_MODEL

    ours = str(tmp_path / "ours")
    spawn_training(TINY_MODEL + ["--train-iters", "2", "--global-batch-size", "8", "--lr", "1e-3",
                                 "--local-sgd", "diloco", "--local-sgd-workers", "2",
                                 "--local-sgd-sync-interval", "2", "--save", ours, "--save-interval", "2"],
                   2, keep_params=False)
    run = run_megatron_lm(4, EDIT + ["--train-iters", "4", "--load", ours])
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("megatron_edit.launch:")]
    assert lines and "was written by megatron_edit's own entry" in lines[0], run.tail()

    theirs = str(tmp_path / "theirs")
    assert run_megatron_lm(4, EDIT + ["--train-iters", "2", "--save", theirs, "--save-interval", "2"]).returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         os.path.join(REPO, "examples", "pretrain_gpt.py"), *TINY_MODEL, "--train-iters", "4",
         "--global-batch-size", "8", "--lr", "1e-3", "--load", theirs],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and errors, done.stderr[-3000:]
    assert "was not written by megatron_edit's entry" in errors[0] and "megatron_edit.launch" in errors[0]
