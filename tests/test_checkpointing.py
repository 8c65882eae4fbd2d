"""Checkpoints: bit-exact resume, resharding, atomic saves, verified loads, conversion (SPEC 7, issue 6).

Resume: a run of 10 iterations that saves at iteration N and a run that loads iteration N and trains to
10 print the same losses bit for bit. N = 6 is mid sync interval for DiLoCo (H = 4: two inner steps after
the sync at 4) and has streaming fragment 1 in flight; for EDiT N = 8 is a sync iteration, so the save
itself must land the pending layer-wise updates (which the resumed run then never applies again). Every worker's params and Adam moments, the outer state,
penalty statistics, the streaming fragment in flight and error-feedback residuals all have to come back
exactly for that; a single missing piece (e.g. worker 1 resuming from worker 0's params, the anchor
re-taken at load, Adam's step shared between params) changes the 7th loss at the 1e-3 level.
"""
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from megatron_edit.checkpoint import files
from megatron_edit.training.launch import redirect_fds, rendezvous_store, run_processes, set_rank_environment
from mp_harness import TINY_MODEL, losses, run_training

BASE = TINY_MODEL + ["--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "10"]  # runs may override
DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--ddp-bucket-size", "4000"]
METHODS = {
    # synchronous, TP 2, plain DDP + megatron-core's fp32 optimizer (no distributed optimizer)
    "none": (["--tensor-model-parallel-size", "2"], 2),
    # DiLoCo over PP 2 x DP 2 (one rank per worker and stage), distributed optimizer, sync warmup
    "diloco": (["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--local-sgd", "diloco",
                "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4", "--local-sgd-warmup-iters", "1"], 4),
    # EDiT layer-wise with the penalty, DP 4 = 2 workers x 2 ranks (sharded outer state), saved mid-interval
    "edit": (DIST_OPT + ["--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4"], 4),
    # the same saved at a sync, with the layer-wise updates still pending (the save lands them)
    "edit-at-sync": (DIST_OPT + ["--local-sgd", "edit", "--local-sgd-workers", "2",
                                 "--local-sgd-sync-interval", "4"], 4),
    # streaming in bf16: 2 fragments, overlap 1, fp4 wire with error feedback; fragment 1 in flight at 6
    "streaming": (["--bf16", "--use-distributed-optimizer", "--local-sgd", "streaming", "--local-sgd-workers", "2",
                   "--local-sgd-sync-interval", "4", "--streaming-fragments", "2", "--streaming-overlap-steps", "1",
                   "--outer-grad-error-feedback"], 2),
}
# Saved at SAVE_AT, trained on to ITERS: every local-SGD resume crosses at least two syncs after the load
# (diloco: 9, 13; edit: 8, 12; streaming: fragment 0 at 8, 12 and fragment 1 at 10, 14), so the anchor,
# outer momentum, penalty statistics and fragments in flight that the checkpoint holds are all read.
SAVE_AT = {"none": 6, "diloco": 6, "edit": 6, "edit-at-sync": 4, "streaming": 6}
ITERS = {"none": 10, "diloco": 14, "edit": 14, "edit-at-sync": 14, "streaming": 14}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Per method: (losses of the run that saved at SAVE_AT and went on to ITERS, its checkpoint root)."""
    out = {}
    for method, (extra, world) in METHODS.items():
        root = str(tmp_path_factory.mktemp(f"ckpt-{method}"))
        curve = losses(run_training(BASE + extra + ["--train-iters", str(ITERS[method]), "--save", root,
                                                    "--save-interval", str(SAVE_AT[method])],
                                    world, keep_params=False))
        out[method] = (curve, root)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bit_exact(saved_runs, method):
    extra, world = METHODS[method]
    straight, root = saved_runs[method]
    n, iters = SAVE_AT[method], ITERS[method]
    saves = sorted({i for i in range(n, iters + 1, n)} | {iters})
    assert sorted(os.listdir(root)) == sorted([files.TRACKER] + [f"iter_{i:07d}" for i in saves])
    resumed = losses(run_training(BASE + extra + ["--train-iters", str(iters), "--load", root, "--ckpt-step",
                                                  str(n)], world, keep_params=False))
    assert len(straight) == iters and len(resumed) == iters - n
    assert resumed == straight[n:], f"{method}: {resumed} vs {straight[n:]}"


def test_resume_with_padded_buckets_is_bit_exact(tmp_path):
    """Linear biases and buckets of ~1000 elements: buckets end on small params, so the distributed
    optimizer pads their ends. megatron-core 0.16.1 to 0.19.2 saved a multi-bucket fully_reshardable
    state at the padded offsets (every param after the first bucket shifted: the resumed run diverged
    at its first step); mcore_adapter.fix_fully_reshardable_bucket_offsets. EDiT, 2 workers, saved at 4,
    resumed across the syncs at 6 and 8."""
    argv = [a for a in TINY_MODEL if a != "--disable-bias-linear"] + [
        "--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "8", "--ddp-bucket-size", "1000",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "2"]
    root = str(tmp_path)
    straight = losses(run_training(argv + ["--save", root, "--save-interval", "4"], 2, keep_params=False))
    resumed = losses(run_training(argv + ["--load", root, "--ckpt-step", "4"], 2, keep_params=False))
    assert resumed == straight[4:], (resumed, straight[4:])


def test_resume_mid_interval_keeps_the_loss_test_totals(tmp_path):
    """EDiT, 4 workers, H 4: worker 2 trains on random tokens at iterations 9 and 10, the run is saved at
    11. The loss test flags worker 2 at the sync of 12 on its mean loss over 9-12, half of it corrupted
    (5.344 vs a median of 5.142: 1.039x; this tiny model is still near chance, so Q is 1.015 here, and
    nobody is flagged at the other syncs). The resumed run trains only 12 itself before that sync:
    it flags worker 2, and so continues bit-exactly, only if the checkpoint carried the interval's totals."""
    root = str(tmp_path / "ckpt")
    argv = TINY_MODEL + ["--global-batch-size", "16", "--lr", "3e-3", "--clip-grad", "0", "--train-iters", "16",
                         *DIST_OPT, "--local-sgd", "edit", "--local-sgd-workers", "4", "--local-sgd-sync-interval",
                         "4", "--local-sgd-debug-fault", "2:random-tokens:9:2", "--pseudo-grad-loss-ratio", "1.015"]
    straight = run_training(argv + ["--save", root, "--save-interval", "11"], 4, keep_params=False)
    events = dict(straight[0]["sync_anomalous"])
    assert events[4] == events[8] == events[16] == [], events
    assert len(events[12]) == 1 and events[12][0].startswith("w2[loss "), events
    resumed = run_training(argv + ["--load", root, "--ckpt-step", "11"], 4, keep_params=False)
    assert dict(resumed[0]["sync_anomalous"])[12] == events[12]
    assert losses(resumed) == losses(straight)[11:], (losses(resumed), losses(straight)[11:])


def test_resharding_tp_and_data_parallel(saved_runs):
    """EDiT saved with DP 4 (2 workers x 2 ranks) loads under TP 2 x DP 2 (2 workers x 1 rank): every
    piece reshards (per-worker params and Adam moments, anchor, momentum), so the continued run matches
    the same-layout resume up to the layout's reduction order (see test_layout_invariance)."""
    straight, root = saved_runs["edit"]
    extra = ["--tensor-model-parallel-size", "2"] + DIST_OPT + [
        "--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4"]
    curve = losses(run_training(BASE + extra + ["--train-iters", str(ITERS["edit"]), "--load", root,
                                                "--ckpt-step", str(SAVE_AT["edit"])], 4, keep_params=False))
    assert len(curve) == ITERS["edit"] - SAVE_AT["edit"]  # across the syncs at 8 and 12
    assert curve == pytest.approx(straight[SAVE_AT["edit"]:], rel=2e-5)


@pytest.mark.parametrize("name,extra", [
    # 2 saved workers -> 4: new worker w continues from saved worker w mod 2; the outer state carries over
    ("4-workers", DIST_OPT + ["--local-sgd", "edit", "--local-sgd-workers", "4", "--local-sgd-sync-interval", "4"]),
    # a run without --local-sgd (and on 2 ranks) loads worker 0's params and Adam state
    ("synchronous", ["--use-distributed-optimizer"]),
])
def test_resharding_number_of_workers(saved_runs, name, extra):
    """Saved mid-interval (6) by 2 workers; loaded by 4 workers (2 ranks each -> 1), or by a synchronous
    run. What the load starts from is exact: new worker w's params are saved worker (w mod 2)'s, and the
    two saved workers differ. Then it trains across two syncs (8, 12) and keeps close to the saved run's
    curve (another number of workers is another run: the same global batch, split differently)."""
    straight, root = saved_runs["edit"]
    results = run_training(BASE + extra + ["--train-iters", str(ITERS["edit"]), "--load", root, "--ckpt-step",
                                           str(SAVE_AT["edit"])], 2 if name == "synchronous" else 4,
                           keep_params=False)
    curve = losses(results)
    assert len(curve) == ITERS["edit"] - SAVE_AT["edit"]
    if name == "4-workers":
        start = {r["worker"]: r["initial_digest"] for r in results}
        assert start[2] == start[0] and start[3] == start[1] and start[0] != start[1]
    # Continues where the saved run was (not from the initial 5.56), and keeps training.
    expected = straight[SAVE_AT["edit"]:]
    assert all(abs(a - b) < 0.15 for a, b in zip(curve, expected)), (curve, expected)
    assert curve[-1] < straight[0] - 0.5


def test_a_edit_saves_at_a_sync_and_resumes(tmp_path):
    """A-EDiT: workers are at different iterations between syncs, so saves happen at syncs; the directory
    is named by the agreed step count and the resumed run continues from the agreed samples."""
    root = str(tmp_path / "ckpt")
    argv = TINY_MODEL + ["--global-batch-size", "4", "--lr", "1e-2", "--use-distributed-optimizer",
                         "--local-sgd", "a-edit", "--local-sgd-workers", "2", "--local-sgd-sync-time", "0.3",
                         "--no-local-sgd-layerwise", "--local-sgd-debug-slow-worker", "1:2"]
    first = run_training(argv + ["--train-iters", "12", "--save", root, "--save-interval", "4"], 2,
                         keep_params=False)
    iteration = files.read_tracker(root)
    # Agreed samples count each worker's steps (2 samples each), so they need not be a multiple of 4.
    agreed = {r["consumed_samples"] for r in first}
    assert len(agreed) == 1 and agreed.pop() // 4 == iteration >= 12
    # A new peak LR with --override-opt-param-scheduler (megatron-core 0.19 matches saved param groups by
    # their max_lr / min_lr too: mcore_adapter.align_saved_param_groups).
    second = run_training(argv + ["--train-iters", "20", "--load", root, "--save", root,
                                  "--override-opt-param-scheduler", "--lr", "5e-3"], 2,
                          keep_params=False)
    agreed = {r["consumed_samples"] for r in second}
    assert len(agreed) == 1 and agreed.pop() // 4 == files.read_tracker(root) >= 20
    assert len(losses(second)) >= 1
    assert all(x == x for x in losses(second))


# ------------------------------------------------------------------ atomic saves
def _killed_during_publish(rank, world, port, argv, kill_at):
    """A rank that dies (as if killed) after its second save's files are written, before publishing."""
    set_rank_environment(rank, world, port)
    torch.set_num_threads(1)
    from megatron_edit.training.launch import keep_transformers_out

    keep_transformers_out()
    from megatron_edit.checkpoint import files as files_module
    from megatron_edit.training.pretrain_gpt import build_trainer

    original = files_module.publish

    def publish(root, iteration):
        if iteration == kill_at:
            os._exit(17)
        return original(root, iteration)

    files_module.publish = publish
    build_trainer(argv).train()


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    """The protocol does not depend on the method: one rank, synchronous training."""
    root = str(tmp_path / "ckpt")
    argv = BASE[:-1] + ["4", "--save", root, "--save-interval", "2"]
    with redirect_fds(str(tmp_path / "killed.log")):
        with pytest.raises(mp.ProcessExitedException, match="exit code 17"), rendezvous_store() as port:
            run_processes(_killed_during_publish, (1, port, argv, 4), 1, timeout=600)
    assert files.read_tracker(root) == 2
    assert not os.path.exists(files.iteration_dir(root, 4))
    assert os.listdir(files.partial_dir(root, 4)), "the killed save had written files"
    # Resume from the marker (iteration 2); the next save of iteration 4 replaces the stale partial.
    curve = losses(run_training(argv + ["--load", root], 1, keep_params=False))
    assert len(curve) == 2
    assert files.read_tracker(root) == 4
    assert not os.path.exists(files.partial_dir(root, 4))
    files.verify_checkpoint(files.iteration_dir(root, 4))


def _copy(root, tmp_path, name):
    target = str(tmp_path / name)
    shutil.copytree(root, target)
    return target


def _distcp(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".distcp"))[0]


def test_truncated_or_corrupted_files_are_named(saved_runs, tmp_path):
    _, root = saved_runs["diloco"]
    files.verify_checkpoint(files.iteration_dir(root, 6))

    truncated = _copy(root, tmp_path, "truncated")
    directory = files.iteration_dir(truncated, 6)
    victim = os.path.join(directory, _distcp(directory))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(files.CheckpointError, match=f"{victim}: truncated"):
        files.verify_checkpoint(directory)

    corrupted = _copy(root, tmp_path, "corrupted")
    directory = files.iteration_dir(corrupted, 6)
    victim = os.path.join(directory, ".metadata")  # every release writes it (0.19+ has no common.pt)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(files.CheckpointError, match=f"{victim}: corrupted"):
        files.verify_checkpoint(directory)

    bad_marker = _copy(root, tmp_path, "bad-marker")
    open(os.path.join(bad_marker, files.TRACKER), "w").write("1O\n")
    with pytest.raises(files.CheckpointError, match=f"{files.TRACKER}: expected an iteration number"):
        files.read_tracker(bad_marker)
    open(os.path.join(bad_marker, files.TRACKER), "w").write("8")
    with pytest.raises(files.CheckpointError, match="names iteration 8 but .*iter_0000008 does not exist"):
        files.read_tracker(bad_marker)


def test_training_refuses_a_truncated_checkpoint_with_one_line(saved_runs, tmp_path):
    """A one-rank synchronous run loading the TP 2 checkpoint: the manifest check comes first."""
    extra, world = [], 1
    _, root = saved_runs["none"]
    broken = _copy(root, tmp_path, "broken")
    directory = files.iteration_dir(broken, 10)
    victim = os.path.join(directory, _distcp(directory))
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(10)
    log = str(tmp_path / "load.log")
    with redirect_fds(log):
        with pytest.raises(mp.ProcessExitedException, match="exit code 2"):
            run_training(BASE + extra + ["--load", broken], world, keep_params=False)
    errors = [line for line in open(log).read().splitlines() if line.startswith("error: ")]
    expected = f"error: {victim}: truncated or overwritten: 10 bytes, expected {size}"
    assert errors and all(line == expected for line in errors), errors


def test_publish_protocol(tmp_path):
    root = str(tmp_path)
    for iteration in (2, 4):
        partial = files.prepare_partial(root, iteration)
        open(os.path.join(partial, "data"), "w").write(str(iteration))
        files.write_manifest(partial, {"data": files.digest(os.path.join(partial, "data"))})
        files.publish(root, iteration)
    assert files.read_tracker(root) == 4
    # A stale partial of a killed save is invisible to loading and replaced by the next save.
    stale = files.prepare_partial(root, 6)
    open(os.path.join(stale, "half"), "w").write("x")
    assert files.read_tracker(root) == 4
    partial = files.prepare_partial(root, 6)
    assert os.listdir(partial) == []
    # Re-saving an existing iteration swaps it in; the marker moves last.
    open(os.path.join(partial, "data"), "w").write("new")
    files.publish(root, 6)
    partial = files.prepare_partial(root, 4)
    open(os.path.join(partial, "data"), "w").write("again")
    files.publish(root, 4)
    assert open(os.path.join(files.iteration_dir(root, 4), "data")).read() == "again"
    assert files.read_tracker(root) == 4
    assert not any(name.endswith((".old", ".partial", ".tmp")) for name in os.listdir(root))
    assert files.read_tracker(str(tmp_path / "iter_0000002")) is None  # a directory without a marker
    with pytest.raises(files.CheckpointError, match="no such directory"):
        files.read_tracker(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ conversion and inspection
_RUN_TOOLS = """
import json, runpy, sys
convert = runpy.run_path("tools/convert_checkpoint.py")["main"]
inspect = runpy.run_path("tools/inspect_checkpoint.py")["main"]
for tool, argv in json.loads(sys.argv[1]):
    print("RC", tool, (convert if tool == "convert" else inspect)(argv), flush=True)
"""


def _run_tools(calls):
    """Several tool invocations in one fresh process (each tool initialises a one-rank process group)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _RUN_TOOLS, json.dumps(calls)], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = [int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("RC ")]
    return proc.stdout, proc.stderr, codes


def test_convert_to_torch_hf_and_plain_megatron_core(saved_runs, tmp_path):
    """From DiLoCo saved on PP 2 x DP 2 mid interval (workers and anchor all differ)."""
    _, root = saved_runs["diloco"]
    step = ["--load", root, "--ckpt-step", "6"]
    out = {name: str(tmp_path / name) for name in ("anchor.pt", "w0.pt", "w1.pt", "avg.pt", "hf", "plain")}
    stdout, stderr, codes = _run_tools([
        ("convert", step + ["--to", "torch", "--output", out["anchor.pt"]]),
        ("convert", step + ["--to", "torch", "--params", "worker", "--worker", "0", "--output", out["w0.pt"]]),
        ("convert", step + ["--to", "torch", "--params", "worker", "--worker", "1", "--output", out["w1.pt"]]),
        ("convert", step + ["--to", "torch", "--params", "average", "--output", out["avg.pt"]]),
        ("convert", step + ["--to", "hf", "--output", out["hf"]]),
        ("convert", step + ["--to", "mcore", "--output", out["plain"], "--target-tensor-parallel-size", "2"]),
        ("convert", step + ["--to", "torch", "--params", "worker", "--worker", "2", "--output", out["w0.pt"]]),
        ("convert", step + ["--to", "mcore", "--output", out["plain"], "--target-tensor-parallel-size", "3"]),
        ("inspect", [root, "--ckpt-step", "6", "--verify"]),
    ])
    assert codes == [0, 0, 0, 0, 0, 0, 2, 2, 0], stdout + stderr[-2000:]
    assert "--worker 2: the checkpoint has workers 0..1" in stderr
    assert "attention heads 4 is not divisible by --target-tensor-parallel-size 3" in stderr

    anchor, w0, w1, avg = (torch.load(out[n], weights_only=False)["model"] for n in ("anchor.pt", "w0.pt", "w1.pt", "avg.pt"))
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    # Saved two steps after a sync: the workers and the anchor all differ; the average is their mean.
    assert not torch.equal(w0[name], w1[name]) and not torch.equal(anchor[name], w0[name])
    for key in anchor:
        torch.testing.assert_close(avg[key], (w0[key] + w1[key]) / 2, rtol=0, atol=1e-6)

    # Hugging Face: GPT-2 layout, loaded back by transformers with matching logits (checked by the tool).
    assert sorted(os.listdir(out["hf"])) == ["config.json", "model.safetensors"]
    logits_line = next(line for line in stdout.splitlines() if line.startswith("logits check (gpt2)"))
    assert float(logits_line.split("=")[-1]) < 1e-5

    # Inspection: metadata and grouped tensors of a verified checkpoint.
    assert "local SGD: method diloco; workers 2; outer state yes (+ momentum); inner optimizer yes" in stdout
    assert "worker 1 optimizer: 36 tensors" in stdout and "outer: anchor: 12 tensors, 58944 elements" in stdout
    assert "verified: " in stdout

    # The plain checkpoint: a run without --local-sgd (TP 2 here) loads the anchor as its model.
    results = run_training(BASE[:-1] + ["6", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
                                        "--load", out["plain"]], 2)
    assert results[0]["consumed_samples"] == 48
    embedding = torch.cat([r["params"]["embedding.word_embeddings.weight"] for r in results])
    assert torch.equal(embedding, anchor["embedding.word_embeddings.weight"])
    assert torch.equal(results[0]["params"]["decoder.final_layernorm.weight"],
                       anchor["decoder.final_layernorm.weight"])


def test_llama_style_model_exports_to_hugging_face(tmp_path):
    root = str(tmp_path / "llama")
    run_training(TINY_MODEL + ["--global-batch-size", "2", "--lr", "1e-2", "--train-iters", "1", "--normalization",
                               "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
                               "--untie-embeddings-and-output-weights", "--num-query-groups", "2", "--save", root], 1,
                 keep_params=False)
    stdout, stderr, codes = _run_tools([
        ("convert", ["--load", root, "--to", "hf", "--output", str(tmp_path / "hf")]),
        ("convert", ["--load", root, "--to", "hf", "--hf-architecture", "gpt2", "--output", str(tmp_path / "x")]),
    ])
    assert codes == [0, 2], stdout + stderr[-2000:]
    logits_line = next(line for line in stdout.splitlines() if line.startswith("logits check (llama)"))
    assert float(logits_line.split("=")[-1]) < 1e-5
    assert "--hf-architecture gpt2 needs LayerNorm" in stderr
