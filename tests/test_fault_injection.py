"""--local-sgd-debug-fault: the faults happen where, when and how megatron_edit/fault_injection.py says."""
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_edit.arguments import FlagError, parse_and_validate
from megatron_edit.fault_injection import (
    FLIPPED_BIT,
    SPIKE_FACTOR,
    FaultInjector,
    FaultSpec,
    SlowWorker,
    corrupt_tokens,
    flip_bit_,
    parse_fault_spec,
)
from mp_harness import TINY_MODEL, losses, run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _GPTLike(torch.nn.Module):
    """GPTModel's calling convention: (input_ids, position_ids, attention_mask, decoder_input, labels)."""

    vocab_size = 50

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None):
        self.seen = (input_ids, labels)
        return input_ids


def _call(model, tokens, labels):
    model(tokens, None, None, labels=labels)
    return model.seen


def _injector(kind, worker=1, start=3, length=2, worker_index=1, data_parallel_rank=0):
    model = _GPTLike()
    spec = FaultSpec(worker, kind, start, length)
    return FaultInjector(spec, worker_index, [model], model.vocab_size, 1234, data_parallel_rank, True), model


def test_parse_fault_spec():
    assert parse_fault_spec("1:random-tokens:10:5") == FaultSpec(1, "random-tokens", 10, 5)
    assert parse_fault_spec("0:bit-flip:7") == FaultSpec(0, "bit-flip", 7, 1)
    for bad, text in [("1:random-tokens", "W:KIND:START"), ("1:nan-tokens:3", "not one of"),
                      ("x:loss-spike:3", "integer"), ("1:loss-spike:0", ">= 1"), ("1:bit-flip:3:2", "once")]:
        with pytest.raises(ValueError, match=text):
            parse_fault_spec(bad)


def test_fault_flag_is_validated_in_one_line():
    base = TINY_MODEL + ["--global-batch-size", "8", "--train-iters", "4", "--lr", "1e-3"]
    with pytest.raises(FlagError, match="--local-sgd-debug-fault.*not one of"):
        parse_and_validate(base + ["--local-sgd", "edit", "--local-sgd-debug-fault", "1:nan:3"], world_size=2)
    with pytest.raises(FlagError, match=r"--local-sgd-debug-fault worker 2 is not in \[0, 2\)"):
        parse_and_validate(base + ["--local-sgd", "edit", "--local-sgd-debug-fault", "2:loss-spike:3"], world_size=2)
    with pytest.raises(FlagError, match="--local-sgd-debug-fault needs --local-sgd"):
        parse_and_validate(base + ["--local-sgd-debug-fault", "1:loss-spike:3"], world_size=2)
    _, cfg = parse_and_validate(base + ["--local-sgd", "diloco", "--local-sgd-debug-fault", "1:bit-flip:3"],
                                world_size=2)
    assert cfg.debug_fault == FaultSpec(1, "bit-flip", 3, 1)


def test_bit_flip_turns_a_weight_huge_and_flipping_again_restores_it():
    values = torch.tensor([0.02, -1.5, 3.0])
    original = values.clone()
    flip_bit_(values, 0)
    assert FLIPPED_BIT == 30 and values[0].item() > 1e36 and values[1:].tolist() == [-1.5, 3.0]
    flip_bit_(values, 0)
    assert torch.equal(values, original)


def test_corrupt_tokens_random_and_repeated():
    """Inputs and labels are one corrupted document shifted by one (not the same tokens: a model would
    learn to copy its input); drawn again with the same seed, the same."""
    tokens = torch.arange(24).view(3, 8)
    generator = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    inputs = corrupt_tokens(tokens, "random-tokens", 50, generator())
    labels = corrupt_tokens(tokens, "random-tokens", 50, generator(), labels=True)
    assert inputs.shape == labels.shape == tokens.shape and inputs.dtype == tokens.dtype
    assert not torch.equal(inputs, tokens) and int(inputs.max()) < 50
    assert torch.equal(inputs[:, 1:], labels[:, :-1]) and not torch.equal(inputs, labels)
    assert torch.equal(inputs, corrupt_tokens(tokens, "random-tokens", 50, generator()))
    repeated = corrupt_tokens(tokens, "repeated-tokens", 50, generator())
    assert all(len(set(row.tolist())) == 1 for row in repeated)
    assert torch.equal(repeated, corrupt_tokens(tokens, "repeated-tokens", 50, generator(), labels=True))
    with pytest.raises(ValueError):
        corrupt_tokens(tokens, "bit-flip", 50, generator())


@pytest.mark.parametrize("kind", ["random-tokens", "repeated-tokens"])
def test_data_faults_replace_inputs_and_labels_only_when_and_where_due(kind):
    """Iterations 3 and 4 of worker 1, in training mode; never in eval, never on another worker; the
    same tokens for the same micro-batch and data-parallel rank (tensor-parallel ranks agree)."""
    tokens, labels = torch.arange(16).view(2, 8), torch.arange(1, 17).view(2, 8)
    injector, model = _injector(kind)
    got = []
    for iteration in range(1, 6):
        seen = _call(model, tokens, labels)
        got.append(not torch.equal(seen[0], tokens) and not torch.equal(seen[1], labels))
        model.eval()
        assert torch.equal(_call(model, tokens, labels)[0], tokens)  # evaluation is never corrupted
        model.train()
        injector.after_optimizer_step(iteration, [])
    assert got == [False, False, True, True, False]
    assert injector.injected == 2
    if kind == "repeated-tokens":
        injector.start_iteration(2)  # a resumed run: its first forward is iteration 3
        seen = _call(model, tokens, labels)
        assert torch.equal(seen[0], seen[1])  # inputs and labels: the same repeated token per row
    else:
        injector.start_iteration(2)
        seen = _call(model, tokens, labels)
        assert torch.equal(seen[0][:, 1:], seen[1][:, :-1])  # labels = inputs shifted by one
    other, other_model = _injector(kind, worker_index=0)
    other.start_iteration(2)
    assert torch.equal(_call(other_model, tokens, labels)[0], tokens)
    a, model_a = _injector(kind)
    b, model_b = _injector(kind)
    a.start_iteration(2), b.start_iteration(2)
    assert torch.equal(_call(model_a, tokens, labels)[0], _call(model_b, tokens, labels)[0])


def test_loss_spike_and_bit_flip_hit_the_worker_once():
    injector, _ = _injector("loss-spike", start=3, length=1)
    grads = [torch.ones(4)]
    for iteration in range(1, 6):
        injector.before_optimizer_step(iteration, grads)
    assert grads[0].tolist() == [SPIKE_FACTOR] * 4 and injector.injected == 1
    injector, _ = _injector("bit-flip", start=3, length=1)
    shards = [torch.zeros(0), torch.full((3,), 0.02)]
    for iteration in range(1, 6):
        injector.after_optimizer_step(iteration, shards)
    assert shards[1][0].item() > 1e36 and shards[1][1:].tolist() == pytest.approx([0.02, 0.02])
    not_first = FaultInjector(FaultSpec(1, "bit-flip", 3), 1, [_GPTLike()], 50, 1234, 1, first_shard_rank=False)
    shards = [torch.full((3,), 0.02)]
    not_first.after_optimizer_step(3, shards)
    assert not_first.injected == 0 and shards[0].tolist() == pytest.approx([0.02] * 3)


PEER_EDIT = TINY_MODEL + ["--global-batch-size", "16", "--train-iters", "24", "--lr", "3e-3", "--clip-grad", "0",
                          "--local-sgd", "edit", "--no-local-sgd-layerwise", "--local-sgd-workers", "4",
                          "--local-sgd-sync-interval", "2", "--pseudo-grad-weighting", "uniform",
                          "--pseudo-grad-peer-ratio", "4"]


def test_loss_spike_freezes_a_worker_and_the_peer_test_leaves_it_out():
    """One bad batch (gradients x1000) on worker 1 at iteration 3, Adam without clipping: its second
    moments jump by 1e6; its first moment carries the spike for ~10 steps, then the worker is nearly
    frozen and its pseudo-gradients collapse. The peer test flags worker 1, and only worker 1, at every
    sync from iteration 14 on (first the output layer, then all of it); nobody before. (The paper's
    one-sided test against the history flags nobody in this run: the norm falls, it does not rise.)
    Without the repair of its inner state, which the next test covers, and without the second-moment
    test, which flags the worker at the first sync after the spike (the test after that)."""
    results = run_training(PEER_EDIT + ["--local-sgd-debug-fault", "1:loss-spike:3", "--pseudo-grad-moment-ratio",
                                        "0", "--no-pseudo-grad-repair-inner-state"], 4)
    by_worker = {r["worker"]: r for r in results}
    assert by_worker[1]["faults_injected"] == 1 and by_worker[0]["faults_injected"] == 0
    events = dict(results[0]["sync_anomalous"])
    assert sorted(events) == list(range(2, 25, 2))
    assert all(events[i] == [] for i in range(2, 13, 2)), events
    for iteration in range(14, 25, 2):
        assert events[iteration] and all(n.startswith("w1[") for n in events[iteration]), (iteration, events)
    assert "layer0" in events[24][0]

    assert all(r["sync_repaired"] == [(i, []) for i in range(2, 25, 2)] for r in results)


def test_a_flagged_workers_inner_state_is_repaired_from_its_healthy_peers():
    """The run above with edit's default repair (inner_state_repair.py). At 14 worker 1 is flagged in
    the output layer; right after that sync all its Adam moments (every layer) are the mean of workers 0,
    2 and 3's, which keep their own, and nobody is flagged at any later sync. Without the repair worker 1
    is flagged at every sync from 14 on (previous test). Without the second-moment test, so that the
    peer test is what flags the worker here."""
    results = run_training(PEER_EDIT + ["--local-sgd-debug-fault", "1:loss-spike:3", "--pseudo-grad-moment-ratio",
                                        "0"], 4, keep_snapshots=True)
    by_worker = {r["worker"]: r for r in results}
    events, repaired = dict(results[0]["sync_anomalous"]), dict(results[0]["sync_repaired"])
    assert all(events[i] == [] for i in range(2, 13, 2)), events
    assert events[14] == ["w1[output]"] and repaired[14] == ["w1"], (events, repaired)
    assert all(events[i] == [] and repaired[i] == [] for i in range(16, 25, 2)), events
    moments = {w: dict(by_worker[w]["sync_moments"]) for w in range(4)}
    checked = 0
    for s in range(len(moments[1][14])):
        for m in range(len(moments[1][14][s])):
            mean = sum(moments[w][14][s][m] for w in (0, 2, 3)) / 3
            # fp32 sums in another order: tolerance relative to the tensor's scale
            torch.testing.assert_close(moments[1][14][s][m], mean, rtol=1e-5, atol=1e-6 * float(mean.abs().max()))
            for w in (0, 2, 3):  # the donors' own moments, not the mean
                assert not torch.allclose(moments[w][14][s][m], mean, rtol=1e-3, atol=0), (w, s, m)
            checked += 1
    assert checked == 2 * len(by_worker[1]["shard_keys"])  # exp_avg and exp_avg_sq of every shard


def test_a_burst_frozen_worker_is_flagged_and_repaired_at_the_next_sync():
    """edit's defaults: the second-moment test (frozen_outliers) and the repair. The spike at 3 raises
    worker 1's Adam second moments by ~1e6 in every layer; at the sync of 4 worker 1 is flagged in every
    layer and repaired, ten iterations before the norm tests noticed it (test above: 14), and nobody is
    flagged at any later sync."""
    results = run_training(PEER_EDIT + ["--local-sgd-debug-fault", "1:loss-spike:3"], 4)
    events, repaired = dict(results[0]["sync_anomalous"]), dict(results[0]["sync_repaired"])
    assert events[2] == [] and repaired[2] == []
    assert events[4] == ["w1[embedding position-embedding layer0 layer1 layer2 layer3 output]"] and repaired[4] == ["w1"], events
    assert all(events[i] == [] and repaired[i] == [] for i in range(6, 25, 2)), events


def test_bad_data_shard_is_left_out_by_the_loss_test():
    """Worker 2 trains on random tokens for iterations 7-12 (--local-sgd edit defaults otherwise: uniform
    weights, peer test). Its norms look ordinary, its loss since the last sync does not: ~ln 255 = 5.56
    against the others' 5.16, 5.05, 4.93 (this tiny model is still near chance; Q = 1.05 here, measured
    healthy spread <= 1.6% with 256 tokens per worker and interval). The loss test flags worker 2, and
    only it, at the syncs of iterations 8, 10 and 12; nobody before or after (the sync at 12 reset it)."""
    argv = PEER_EDIT[:-4]  # without the explicit weighting and peer ratio: edit's defaults
    assert "--pseudo-grad-peer-ratio" not in argv
    results = run_training(argv + ["--local-sgd-debug-fault", "2:random-tokens:7:6", "--pseudo-grad-loss-ratio",
                                   "1.05"], 4)
    events = dict(results[0]["sync_anomalous"])
    assert sorted(events) == list(range(2, 25, 2))
    assert all(events[i] == [] for i in (2, 4, 6, 14, 16, 18, 20, 22, 24)), events
    for iteration in (8, 10, 12):
        assert len(events[iteration]) == 1 and events[iteration][0].startswith("w2[loss "), (iteration, events)


def test_a_bad_stretch_past_the_flagging_sync_is_caught_on_probation_and_after_a_resume(tmp_path):
    """Worker 2 trains on random tokens at iterations 7-9, H = 2, Q = 1.07 (this tiny model is near
    chance: random tokens lift the loss ~7.5%). The sync of 8 flags it (5.562 vs a median of 5.177:
    1.074x). Its next interval holds one more random-token step, 9: 1.048x at 10, under Q, but the
    worker is on probation there (pseudo_grad_penalty.loss_outliers: 1.035) and is flagged again; at 12,
    still on probation, it is healthy and not flagged. A run saved at 9 and resumed flags it at 10 too,
    and continues bit-exactly, only if the checkpoint carried the probation."""
    root = str(tmp_path / "ckpt")
    argv = TINY_MODEL + ["--global-batch-size", "16", "--train-iters", "16", "--lr", "3e-3", "--clip-grad", "0",
                         "--local-sgd", "edit", "--no-local-sgd-layerwise", "--local-sgd-workers", "4",
                         "--local-sgd-sync-interval", "2", "--local-sgd-debug-fault", "2:random-tokens:7:3",
                         "--pseudo-grad-loss-ratio", "1.07"]
    straight = run_training(argv + ["--save", root, "--save-interval", "9"], 4, keep_params=False)
    events = dict(straight[0]["sync_anomalous"])
    assert sorted(events) == list(range(2, 17, 2))
    assert all(events[i] == [] for i in (2, 4, 6, 12, 14, 16)), events
    assert len(events[8]) == 1 and events[8][0].startswith("w2[loss "), events
    assert len(events[10]) == 1 and events[10][0].startswith("w2[loss "), events
    loss, median = (float(x) for x in re.match(r"w2\[loss (\S+) vs median (\S+)\]", events[10][0]).groups())
    assert 1.035 < loss / median < 1.07, events[10]  # caught by the probation alone
    shown = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", root, "--ckpt-step", "9"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert "loss test probation (flagged at the last sync): w2" in shown.stdout, shown.stdout + shown.stderr
    resumed = run_training(argv + ["--load", root, "--ckpt-step", "9"], 4, keep_params=False)
    assert dict(resumed[0]["sync_anomalous"])[10] == events[10]
    assert losses(resumed) == losses(straight)[9:], (losses(resumed), losses(straight)[9:])


def test_slow_worker_sleeps_for_its_own_step_only():
    """FACTOR 3: after a 0.5 s step the worker sleeps 1.0 s; time spent in the sync (waiting for the
    others) is not counted as its step."""
    now, slept = [100.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    slow = SlowWorker(3.0, clock=lambda: now[0], sleep=sleep)
    now[0] += 0.5           # forward, backward, optimizer step
    slow.before_sync()
    now[0] += 7.0           # the sync: waiting for the other workers
    slow.after_sync()
    now[0] += 0.25
    slow.before_sync()
    assert slept == [1.0, 0.5]

