"""inner_state_repair.py: who is repaired, with what, and that nothing else moves."""
import threading

import pytest
import torch

from megatron_edit.inner_state_repair import repair_inner_state, repair_plan


def test_a_worker_flagged_in_any_layer_is_repaired_from_the_workers_flagged_in_none():
    anomalous = torch.tensor([[False, False, False],
                              [True, False, False],
                              [False, False, False],
                              [False, False, True]])
    weights, repaired = repair_plan(anomalous, torch.ones(4, dtype=torch.bool))
    assert repaired.tolist() == [False, True, False, True]
    assert weights.tolist() == [0.5, 0, 0.5, 0]
    nobody = repair_plan(torch.zeros(4, 3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    assert not nobody[0].any() and not nobody[1].any()


def test_no_healthy_worker_or_absent_workers_are_no_donors():
    everyone = torch.tensor([[True, False], [False, True], [True, False]])  # each flagged somewhere
    weights, repaired = repair_plan(everyone, torch.ones(3, dtype=torch.bool))
    assert not weights.any() and not repaired.any()
    anomalous = torch.tensor([[True, False], [False, False], [False, False]])
    present = torch.tensor([True, False, True])  # elastic: worker 1 is not in this sync
    weights, repaired = repair_plan(anomalous, present)
    assert weights.tolist() == [0, 0, 1] and repaired.tolist() == [True, False, False]
    absent_flagged = torch.tensor([[False, False], [True, False], [False, False]])
    weights, repaired = repair_plan(absent_flagged, present)
    assert not repaired.any()  # an absent worker is not repaired


class _Collective:
    """An all-reduce SUM among threads (one per simulated worker), called in the same order by all."""

    def __init__(self, n):
        self.barrier, self.parts, self.lock = threading.Barrier(n), {}, threading.Lock()
        self.calls = [0] * n

    def sum_for(self, rank):
        def reduce_sum(buffer):
            self.calls[rank] += 1
            with self.lock:
                self.parts[rank] = buffer.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in sorted(self.parts))
            self.barrier.wait()
            buffer.copy_(total)
            return buffer
        return reduce_sum


def _run_workers(moments, anomalous, apply=True, chunk_size=3):
    W = len(moments)
    weights, repaired = repair_plan(anomalous, torch.ones(W, dtype=torch.bool))
    collective, out = _Collective(W), [None] * W
    if not repaired.any():
        return out, collective.calls

    def work(w):
        out[w] = repair_inner_state(moments[w], float(weights[w]), bool(repaired[w]), collective.sum_for(w),
                                    chunk_size, apply)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(W)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out, collective.calls


def _worker_moments(w, nan=False):
    """Three moment tensors: two of 7 elements, one of 4."""
    a = torch.full((7,), float(w + 1))
    b = torch.arange(7, dtype=torch.float32) * (w + 1)
    c = torch.full((4,), 10.0 * (w + 1))
    if nan:
        a[2] = float("nan")
        b[0] = float("inf")
    return [a, b, c]


def test_flagged_worker_takes_the_healthy_mean_and_nothing_else_moves():
    """Worker 1 (its moments NaN/Inf in places) is flagged in one layer of 3 workers: all its moments
    become the mean of workers 0 and 2 (no NaN leaks in); the healthy workers' are untouched; chunks of
    3 elements (7 = 3 + 3 + 1, 4 = 3 + 1) make 8 reductions per worker."""
    moments = [_worker_moments(0), _worker_moments(1, nan=True), _worker_moments(2)]
    before = [[t.clone() for t in m] for m in moments]
    anomalous = torch.tensor([[False, False], [False, True], [False, False]])
    _, calls = _run_workers(moments, anomalous)
    assert calls == [8, 8, 8]
    a, b, c = moments[1]
    assert torch.equal(a, torch.full((7,), 2.0))  # (1 + 3) / 2
    assert torch.equal(b, torch.arange(7, dtype=torch.float32) * 2.0)
    assert torch.equal(c, torch.full((4,), 20.0))
    for w in (0, 2):
        assert all(torch.equal(t, o) for t, o in zip(moments[w], before[w]))


def test_elastic_mode_returns_the_copies_and_touches_nothing():
    moments = [_worker_moments(0), _worker_moments(1), _worker_moments(2)]
    before = [t.clone() for t in moments[1]]
    anomalous = torch.tensor([[False, False], [True, False], [False, False]])
    out, _ = _run_workers(moments, anomalous, apply=False)
    assert all(torch.equal(t, o) for t, o in zip(moments[1], before))
    assert out[0] == [] and out[2] == [] and len(out[1]) == 8
    for destination, values in out[1]:
        destination.copy_(values)
    assert torch.equal(moments[1][0], torch.full((7,), 2.0))


def test_nobody_flagged_means_no_collective():
    moments = [_worker_moments(0), _worker_moments(1)]
    _, calls = _run_workers(moments, torch.zeros(2, 2, dtype=torch.bool))
    assert calls == [0, 0]


def test_adapter_finds_the_live_adam_moments_and_refuses_reduced_precision_ones():
    """mcore_adapter.inner_moments: the torch optimizer megatron-core wraps (``opt.optimizer``), its
    live fp32 state of the parameter's shape (not ``step``); none before the first step."""
    from types import SimpleNamespace

    from megatron_edit import mcore_adapter

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.AdamW([p, q], lr=0.1)
    wrapped = SimpleNamespace(optimizer=adam, config=SimpleNamespace(use_precision_aware_optimizer=False))
    assert mcore_adapter.inner_moments(wrapped, [p, q]) == [[], []]
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    adam.step()
    moments = mcore_adapter.inner_moments(SimpleNamespace(chained_optimizers=[wrapped]), [q])
    assert len(moments[0]) == 2 and all(m.data_ptr() in (adam.state[q]["exp_avg"].data_ptr(),
                                                         adam.state[q]["exp_avg_sq"].data_ptr()) for m in moments[0])
    assert mcore_adapter.check_fp32_inner_moments(wrapped) is None
    wrapped.config.use_precision_aware_optimizer = True
    assert "--use-precision-aware-optimizer" in mcore_adapter.check_fp32_inner_moments(wrapped)
