"""EDiT pseudo-gradient penalty: hand-checked cases and a plain-loop float64 reference over several syncs."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_edit.pseudo_grad_penalty import (
    STD_RELATIVE_FLOOR,
    PenaltyConfig,
    PenaltyStats,
    clip_coefficient,
    frozen_outliers,
    init_stats,
    loss_outliers,
    probation_ratio,
    peer_outliers,
    penalty_weights,
    weighted_sum_contribution,
)

NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------------------------------
# Independent reference: plain Python loops and floats (float64), written from SPEC 2.2.


def reference_penalized_average(deltas, stats, cfg, step_weights=None):
    """deltas: worker -> layer -> tensor. Returns (combined per layer, weights[w][l], skip[l], stats dict)."""
    num_workers, num_layers = len(deltas), len(deltas[0])
    alpha = cfg.ewma_alpha
    mean = [float(x) for x in stats.mean.tolist()]
    var = [float(x) for x in stats.var.tolist()]
    count = [int(x) for x in stats.count.tolist()]
    # total weight of the variance's EWMA: every later observation adds alpha * (1 - alpha), the old decays
    var_weight = [float(x) for x in stats.var_weight.tolist()]
    combined, weights_out, skip_out = [], [[0.0] * num_layers for _ in range(num_workers)], []
    for layer in range(num_layers):
        norms = []
        for w in range(num_workers):
            values = [float(x) for x in deltas[w][layer].flatten().tolist()]
            if any(math.isnan(x) or math.isinf(x) for x in values):
                norms.append(NAN)
            else:
                norms.append(math.sqrt(sum(x * x for x in values)))
        good = []
        for w in range(num_workers):
            g = norms[w]
            if math.isnan(g) or math.isinf(g):
                continue
            if cfg.anomaly_threshold > 0 and count[layer] >= cfg.ewma_warmup:
                # bias correction: rescale the variance to the steady-state weight (1 - alpha)
                if var_weight[layer] > 0.0:
                    corrected = var[layer] * (1.0 - alpha) / var_weight[layer]
                else:
                    corrected = var[layer]
                std = max(math.sqrt(corrected), STD_RELATIVE_FLOOR * abs(mean[layer]))
                if std == 0.0:
                    if g > mean[layer]:
                        continue
                elif (g - mean[layer]) / std > cfg.anomaly_threshold:
                    continue
            good.append(w)
        if not good:
            skip_out.append(True)
            combined.append(torch.zeros_like(deltas[0][layer], dtype=torch.float64))
            continue
        skip_out.append(False)
        if cfg.weighting == "uniform":
            raw = {w: 1.0 / len(good) for w in good}
        else:
            temperature = cfg.temperature * sum(norms[w] for w in good) / len(good)
            if temperature == 0.0:
                temperature = 1.0
            exps = {w: math.exp(-norms[w] / temperature) for w in good}
            raw = {w: exps[w] / sum(exps.values()) for w in good}
        if step_weights is not None:
            scaled = {w: raw[w] * step_weights[w] for w in good}
            if sum(scaled.values()) > 0:
                raw = {w: scaled[w] / sum(scaled.values()) for w in good}
        total = torch.zeros_like(deltas[0][layer], dtype=torch.float64)
        for w in good:
            weights_out[w][layer] = raw[w]
            total = total + raw[w] * deltas[w][layer].double()
        if cfg.clip is not None:
            norm = math.sqrt(sum(x * x for x in total.flatten().tolist()))
            if norm > cfg.clip:
                total = total * (cfg.clip / norm)
        combined.append(total)
        # statistics: good workers in order; count counts syncs
        for w in good:
            g = norms[w]
            if count[layer] == 0 and w == good[0]:
                mean[layer], var[layer] = g, 0.0
            else:
                diff = g - mean[layer]
                incr = alpha * diff
                mean[layer] += incr
                var[layer] = (1 - alpha) * (var[layer] + diff * incr)
                var_weight[layer] = (1 - alpha) * var_weight[layer] + alpha * (1 - alpha)
        count[layer] += 1
    return combined, weights_out, skip_out, {"mean": mean, "var": var, "count": count, "var_weight": var_weight}


def torch_penalized_average(deltas, stats, cfg, step_weights=None):
    """What the distributed combine does, on one process: norms, weights, masked sum, clip."""
    num_workers, num_layers = len(deltas), len(deltas[0])
    norms = torch.stack(
        [torch.stack([torch.linalg.vector_norm(deltas[w][l]) for l in range(num_layers)]) for w in range(num_workers)]
    )
    weights, skip, anomalous, new_stats = penalty_weights(norms, stats, cfg, step_weights)
    combined = []
    for layer in range(num_layers):
        total = torch.zeros_like(deltas[0][layer])
        for w in range(num_workers):
            total = total + weighted_sum_contribution(deltas[w][layer], weights[w, layer])
        total = total * clip_coefficient(torch.linalg.vector_norm(total), cfg.clip)
        combined.append(total)
    return combined, weights, skip, anomalous, new_stats


# --------------------------------------------------------------------------------------------------
# Hand-checked cases.


def _stats(mean, var, count, var_weight=None):
    """Statistics by hand. var_weight defaults to its steady state 1 - alpha (alpha = 0.02, the default of
    PenaltyConfig), where the bias correction is the identity: std = sqrt(var) exactly as written."""
    if var_weight is None:
        var_weight = [1.0 - 0.02] * len(mean)
    return PenaltyStats(
        mean=torch.tensor(mean, dtype=torch.float32),
        var=torch.tensor(var, dtype=torch.float32),
        count=torch.tensor(count, dtype=torch.int64),
        var_weight=torch.tensor(var_weight, dtype=torch.float32),
    )


def test_uniform_weights_exclude_anomalous_worker():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)
    stats = _stats([1.0], [0.01], [5])  # std 0.1: anomalous above 1.3
    norms = torch.tensor([[1.0], [1.2], [5.0], [0.9]])
    weights, skip, anomalous, _ = penalty_weights(norms, stats, cfg)
    assert anomalous[:, 0].tolist() == [False, False, True, False]
    torch.testing.assert_close(weights[:, 0], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]), rtol=1e-7, atol=0)
    assert weights[2, 0].item() == 0.0
    assert skip.tolist() == [False]


def test_z_threshold_boundary():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)
    stats = _stats([1.0, 1.0], [0.01, 0.01], [3, 3])
    norms = torch.tensor([[1.29, 1.31]])  # z = 2.9 and 3.1
    _, skip, anomalous, _ = penalty_weights(norms, stats, cfg)
    assert anomalous.tolist() == [[False, True]]
    assert skip.tolist() == [False, True]
    # one-sided: a norm far below the mean is never anomalous
    _, _, anomalous, _ = penalty_weights(torch.tensor([[0.01, 0.0]]), stats, cfg)
    assert anomalous.tolist() == [[False, False]]


def test_z_test_uses_bias_corrected_variance():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)  # alpha 0.02
    # layer 0: one later observation so far, weight alpha (1 - alpha) = 0.0196: corrected
    #   var = 0.01 * 0.98 / 0.0196 = 0.5, std = 0.70711, anomalous above 1 + 2.1213 = 3.1213.
    # layer 1: the same var with weight 0 (no later observation): used as is, std 0.1, limit 1.3.
    # layer 2: steady state (weight 1 - alpha): the correction is the identity, limit 1.3.
    stats = _stats([1.0, 1.0, 1.0], [0.01, 0.01, 0.01], [3, 3, 3], var_weight=[0.0196, 0.0, 0.98])
    norms = torch.tensor([[1.31, 1.29, 1.29], [3.10, 1.31, 1.31], [3.15, 1.0, 1.0]])
    _, skip, anomalous, _ = penalty_weights(norms, stats, cfg)
    assert anomalous.tolist() == [[False, False, False], [False, True, True], [True, False, False]]
    # 1.31 is z = 3.1 against the uncorrected std 0.1: the correction is what accepts it on layer 0
    assert skip.tolist() == [False, False, False]


def test_anomaly_detection_waits_for_warmup_but_nan_does_not():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=3)
    stats = _stats([1.0], [0.01], [2])  # two syncs observed: still warming up
    norms = torch.tensor([[1.0], [100.0], [NAN], [INF]])
    weights, _, anomalous, new_stats = penalty_weights(norms, stats, cfg)
    assert anomalous[:, 0].tolist() == [False, False, True, True]
    assert weights[:, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert new_stats.count.tolist() == [3]
    # the same norms once count reaches the warmup: 100 is now anomalous
    _, _, anomalous, _ = penalty_weights(norms, new_stats, cfg)
    assert anomalous[:, 0].tolist() == [False, True, True, True]


def test_threshold_zero_disables_z_test():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, ewma_warmup=1)
    stats = _stats([1.0], [0.0], [10])
    _, _, anomalous, _ = penalty_weights(torch.tensor([[1e6], [NAN]]), stats, cfg)
    assert anomalous[:, 0].tolist() == [False, True]


def test_zero_variance_equal_norm_is_not_anomalous():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)
    stats = _stats([2.0, 0.0], [0.0, 0.0], [1, 1])
    assert STD_RELATIVE_FLOOR == 0.1
    norms = torch.tensor([[2.0, 0.0], [2.0 * (1 + 0.2), 1e-3], [2.0 * (1 + 0.5), 0.0]])
    _, _, anomalous, _ = penalty_weights(norms, stats, cfg)
    # std floor = 0.1 * 2: +20% is z = 2, +50% is z = 5; a frozen layer (mean 0) flags any growth
    assert anomalous.tolist() == [[False, False], [False, True], [True, False]]


def test_norm_weights_softmax_values_and_scale_invariance():
    cfg = PenaltyConfig(weighting="norm", temperature=1.0, anomaly_threshold=0.0)
    norms = torch.tensor([[1.0], [2.0], [3.0]])
    weights, _, _, _ = penalty_weights(norms, init_stats(1), cfg)
    # T = 1 * mean(1, 2, 3) = 2 -> softmax(-[0.5, 1.0, 1.5])
    exps = [math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]
    expected = torch.tensor([e / sum(exps) for e in exps])
    torch.testing.assert_close(weights[:, 0], expected, rtol=1e-6, atol=0)
    assert abs(weights[0, 0].item() - 0.506480) < 1e-5
    scaled, _, _, _ = penalty_weights(norms * 1000.0, init_stats(1), cfg)
    torch.testing.assert_close(scaled, weights, rtol=1e-6, atol=0)
    hot, _, _, _ = penalty_weights(norms, init_stats(1), PenaltyConfig(weighting="norm", temperature=0.5))
    exps = [math.exp(-1.0), math.exp(-2.0), math.exp(-3.0)]
    torch.testing.assert_close(hot[:, 0], torch.tensor([e / sum(exps) for e in exps]), rtol=1e-6, atol=0)


def test_norm_weights_skip_anomalous_and_zero_norms():
    cfg = PenaltyConfig(weighting="norm", anomaly_threshold=0.0)
    norms = torch.tensor([[1.0, 0.0], [NAN, 0.0], [3.0, 0.0]])
    weights, skip, _, _ = penalty_weights(norms, init_stats(2), cfg)
    # layer 0: T = 2, softmax over workers 0 and 2 of -[0.5, 1.5]; layer 1: all norms 0 -> uniform
    w0 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(weights[:, 0], torch.tensor([w0, 0.0, 1 - w0]), rtol=1e-6, atol=0)
    assert weights[1, 0].item() == 0.0
    torch.testing.assert_close(weights[:, 1], torch.full((3,), 1 / 3), rtol=1e-6, atol=0)
    assert skip.tolist() == [False, False]


def test_step_weights_uniform_and_norm():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0)
    norms = torch.tensor([[1.0], [1.0], [1.0], [INF]])
    steps = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights, _, _, _ = penalty_weights(norms, init_stats(1), cfg, step_weights=steps)
    torch.testing.assert_close(weights[:, 0], torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]), rtol=1e-6, atol=0)
    cfg = PenaltyConfig(weighting="norm", anomaly_threshold=0.0)
    norms = torch.tensor([[1.0], [3.0]])
    weights, _, _, _ = penalty_weights(norms, init_stats(1), cfg, step_weights=torch.tensor([3.0, 1.0]))
    # softmax(-[0.5, 1.5]) * [3, 1], renormalised
    a, b = 3 * math.exp(-0.5), math.exp(-1.5)
    torch.testing.assert_close(weights[:, 0], torch.tensor([a / (a + b), b / (a + b)]), rtol=1e-6, atol=0)
    # all step weights zero: keep the unscaled weights rather than divide by zero
    weights, _, _, _ = penalty_weights(norms, init_stats(1), cfg, step_weights=torch.zeros(2))
    w0 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(weights[:, 0], torch.tensor([w0, 1 - w0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["uniform", "norm"])
def test_all_anomalous_layer_skips_and_keeps_stats(weighting):
    cfg = PenaltyConfig(weighting=weighting, anomaly_threshold=3.0, ewma_warmup=1)
    stats = _stats([1.0, 1.0], [0.01, 0.01], [4, 4])
    norms = torch.tensor([[9.0, 1.0], [NAN, 1.1]])
    weights, skip, anomalous, new_stats = penalty_weights(norms, stats, cfg)
    assert skip.tolist() == [True, False]
    assert anomalous[:, 0].tolist() == [True, True]
    assert weights[:, 0].tolist() == [0.0, 0.0]
    assert not torch.isnan(weights).any()
    assert new_stats.mean[0].item() == 1.0 and new_stats.var[0].item() == pytest.approx(0.01)
    assert new_stats.count.tolist() == [4, 5]
    # the skipped layer's variance weight is untouched; the other layer saw two observations (steady state)
    assert new_stats.var_weight[0].item() == stats.var_weight[0].item()
    assert new_stats.var_weight[1].item() == pytest.approx(0.98, rel=1e-6)


def test_ewma_update_by_hand():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_alpha=0.5, ewma_warmup=5)
    stats = init_stats(1)
    # sync 1, first observation ever sets mean = 2, var = 0; then G = 4: diff 2, incr 1 -> mean 3,
    # var = 0.5 * (0 + 2 * 1) = 1. The NaN worker contributes nothing.
    assert stats.var_weight.tolist() == [0.0] and stats.var_weight.dtype == torch.float32
    _, _, _, stats = penalty_weights(torch.tensor([[2.0], [NAN], [4.0]]), stats, cfg)
    assert stats.mean.tolist() == [3.0] and stats.var.tolist() == [1.0] and stats.count.tolist() == [1]
    # the first observation adds no variance weight, G = 4 adds alpha (1 - alpha) = 0.25
    assert stats.var_weight.tolist() == [0.25]
    # sync 2, G = 1: diff -2, incr -1 -> mean 2, var = 0.5 * (1 + 2) = 1.5; weight 0.5 * 0.25 + 0.25
    _, _, _, stats = penalty_weights(torch.tensor([[1.0], [INF], [NAN]]), stats, cfg)
    assert stats.mean.tolist() == [2.0] and stats.var.tolist() == [1.5] and stats.count.tolist() == [2]
    assert stats.var_weight.tolist() == [0.375]


def test_anomalous_norm_never_enters_statistics():
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)
    stats = _stats([1.0], [0.01], [3], var_weight=[0.5])  # corrected var 0.0196, std 0.14
    _, _, anomalous, new_stats = penalty_weights(torch.tensor([[1.0], [1e6]]), stats, cfg)
    assert anomalous[:, 0].tolist() == [False, True]
    # only G = 1.0 (= mean) observed: mean unchanged, var shrinks by (1 - alpha)
    assert new_stats.mean.tolist() == [1.0]
    assert new_stats.var[0].item() == pytest.approx(0.98 * 0.01, rel=1e-6)
    # one observation's weight (0.98 * 0.5 + 0.0196 = 0.5096), not two (0.51941)
    assert new_stats.var_weight[0].item() == pytest.approx(0.5096, rel=1e-6)
    assert torch.equal(stats.mean, torch.tensor([1.0]))  # input not mutated


def test_nan_worker_would_poison_naive_sum():
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([NAN, INF]), torch.tensor([3.0, 4.0])]
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, clip=None)
    norms = torch.stack([torch.linalg.vector_norm(d) for d in deltas]).unsqueeze(1)
    weights, _, anomalous, new_stats = penalty_weights(norms, init_stats(1), cfg)
    assert anomalous[:, 0].tolist() == [False, True, False]
    assert weights[1, 0].item() == 0.0
    assert new_stats.mean.tolist() == [pytest.approx((5**0.5) + 0.02 * (5 - 5**0.5), rel=1e-6)]
    naive = sum(weights[w, 0] * deltas[w] for w in range(3))
    assert torch.isnan(naive).all()  # 0 * NaN = NaN and 0 * Inf = NaN
    masked = sum(weighted_sum_contribution(deltas[w], weights[w, 0]) for w in range(3))
    assert masked.tolist() == [2.0, 3.0]


def test_weighted_sum_contribution():
    assert weighted_sum_contribution(torch.tensor([NAN, INF, -INF]), torch.tensor(0.0)).tolist() == [0.0, 0.0, 0.0]
    assert weighted_sum_contribution(torch.tensor([2.0, -4.0]), torch.tensor(0.25)).tolist() == [0.5, -1.0]
    out = weighted_sum_contribution(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor(0.5))
    assert out.dtype == torch.float32


def test_clip_coefficient():
    norms = torch.tensor([20.0, 10.0, 5.0, 0.0, INF, NAN])
    assert clip_coefficient(norms, 10.0).tolist() == [0.5, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert clip_coefficient(norms, None).tolist() == [1.0] * 6


# --------------------------------------------------------------------------------------------------
# The cross-worker test (--pseudo-grad-peer-ratio).

PEER = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=3, peer_ratio=4.0)


def test_peer_test_flags_a_frozen_and_an_exploding_worker_from_the_first_sync():
    """4 workers, no history yet (the z-test is still warming up): layer 0 has a frozen worker (1/10 of
    the others), layer 1 an exploding one (6x); healthy norms spread by +-3%. Only the two faulty
    workers are flagged and the others are averaged uniformly, as DiLoCo would."""
    norms = torch.tensor([[1.00, 2.00], [0.10, 2.06], [1.03, 12.0], [0.97, 1.94]])
    weights, skip, anomalous, new_stats = penalty_weights(norms, init_stats(2), PEER)
    assert anomalous.tolist() == [[False, False], [True, False], [False, True], [False, False]]
    torch.testing.assert_close(weights[:, 0], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]), rtol=1e-7, atol=0)
    torch.testing.assert_close(weights[:, 1], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]), rtol=1e-7, atol=0)
    assert skip.tolist() == [False, False]
    # the flagged norms do not enter the statistics
    torch.testing.assert_close(new_stats.mean[0], torch.tensor(1.0 + 0.02 * 0.03 + 0.02 * (0.97 - 1.0006)),
                               rtol=1e-5, atol=0)
    # without the peer test (the paper's rule) nobody is flagged before the warmup
    _, _, paper, _ = penalty_weights(norms, init_stats(2), PenaltyConfig(weighting="uniform", ewma_warmup=3))
    assert not paper.any()


def test_peer_test_leaves_healthy_spread_and_a_shared_drift_alone():
    """Healthy workers within 2x of each other are never flagged (R = 4), and a drift that all workers
    share (here every norm at 1/10 of the history's mean) is not a fault either: the peer test does
    not look at the history with three or more workers, and the one-sided z-test only looks up."""
    norms = torch.tensor([[1.0], [0.6], [1.3], [1.9]])
    _, _, anomalous, _ = penalty_weights(norms, init_stats(1), PEER)
    assert not anomalous.any()
    history = _stats([10.0], [0.01], [50])
    _, skip, anomalous, _ = penalty_weights(norms, history, PEER)
    assert not anomalous.any() and skip.tolist() == [False]


def test_peer_test_with_two_workers_needs_the_history_to_agree():
    """Two workers: the pair cannot say which one is wrong. Before the warmup nobody is flagged; after
    it, the one that also left the history's band (in the same direction) is."""
    low = torch.tensor([[1.0], [0.1]])  # worker 1 below 1 / (2R - 1) = 1/7 of worker 0
    high = torch.tensor([[1.0], [8.0]])  # worker 1 above 2R - 1 = 7 times worker 0
    for norms in (low, high):
        _, _, anomalous, _ = penalty_weights(norms, init_stats(1), PEER)
        assert not anomalous.any()
    history = _stats([1.0], [0.0025], [10])  # std 0.1 (floor): band 0.7 .. 1.3
    _, _, anomalous, _ = penalty_weights(low, history, PEER)
    assert anomalous[:, 0].tolist() == [False, True]
    _, _, anomalous, _ = penalty_weights(high, history, PEER)
    assert anomalous[:, 0].tolist() == [False, True]  # (the z-test alone flags 8.0 too)
    # the low one is flagged by neither test alone: not by the one-sided z-test ...
    _, _, anomalous, _ = penalty_weights(low, history, PenaltyConfig(weighting="uniform", ewma_warmup=3))
    assert not anomalous.any()
    # ... and not by the peers when the history has both inside its band (no direction agrees)
    _, _, anomalous, _ = penalty_weights(low, _stats([0.5], [1.0], [10]), PEER)
    assert not anomalous.any()


def test_peer_median_with_half_of_the_workers_frozen():
    """2 of 4 frozen: the median is the mean of the two middle norms, so the healthy pair is not made
    the outlier (a lower median would be a frozen norm, and 1.0 > 4 x 0.05 would flag the healthy)."""
    norms = torch.tensor([[1.0], [0.05], [0.04], [1.02]])
    anomalous = peer_outliers(norms, 4.0, torch.zeros(4, 1, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.bool))
    assert anomalous[:, 0].tolist() == [False, True, True, False]


def test_peer_test_ignores_nonfinite_peers_and_zero_ratio_is_the_paper():
    """NaN/Inf norms are anomalous (the caller's rule) and stay out of the median; peer_ratio 0 gives
    exactly the paper's weights."""
    norms = torch.tensor([[1.0], [NAN], [INF], [0.1], [1.05]])
    _, _, anomalous, _ = penalty_weights(norms, init_stats(1), PEER)
    assert anomalous[:, 0].tolist() == [False, True, True, True, False]
    torch.manual_seed(0)
    norms = torch.rand(5, 7) * torch.tensor([1.0, 1.0, 20.0, 1.0, 0.01]).unsqueeze(1)
    stats = _stats([0.5] * 7, [0.01] * 7, [4] * 7)
    paper = penalty_weights(norms, stats, PenaltyConfig())
    zero = penalty_weights(norms, stats, PenaltyConfig(peer_ratio=0.0))
    for a, b in zip(paper[:3], zero[:3]):
        assert torch.equal(a, b)
    with_peers = penalty_weights(norms, stats, PenaltyConfig(peer_ratio=4.0))
    assert with_peers[2][4].any()  # the worker at 1/100 is flagged somewhere


def test_loss_test_flags_a_bad_shard_both_ways_in_every_layer():
    """Losses since the last sync: random tokens (ln 1024 = 6.93) and a degenerate shard (0.4) against
    healthy workers at 4.3-4.5 (Q = 1.25). Flagged in every layer although their norms are ordinary;
    healthy spread, unknown (NaN) losses and fewer than 3 finite losses flag nobody."""
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, loss_ratio=1.25)
    norms = torch.ones(5, 3)
    losses = torch.tensor([4.3, 6.93, 4.5, 0.4, 4.4])
    weights, skip, anomalous, _ = penalty_weights(norms, init_stats(3), cfg, losses=losses)
    assert anomalous.tolist() == [[False] * 3, [True] * 3, [False] * 3, [True] * 3, [False] * 3]
    torch.testing.assert_close(weights[:, 0], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3]), rtol=1e-7, atol=0)
    assert not skip.any()
    assert loss_outliers(torch.tensor([4.0, 4.9, 4.2, 3.3]), 1.25).tolist() == [False] * 4  # within 1.25x
    assert loss_outliers(torch.tensor([4.0, 9.0, NAN]), 1.25).tolist() == [False] * 3  # 2 finite: undecided
    assert loss_outliers(torch.tensor([4.0, 9.0, NAN, 4.1]), 1.25).tolist() == [False, True, False, False]
    # even count: the median is the mean of the two middle ones (4.15 here)
    assert loss_outliers(torch.tensor([4.0, 4.1, 6.9, 4.2]), 1.25).tolist() == [False, False, True, False]
    # ratio 0 (off) or no losses given: the norms alone decide
    off = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, loss_ratio=0.0)
    assert not penalty_weights(norms, init_stats(3), off, losses=losses)[2].any()
    assert not penalty_weights(norms, init_stats(3), cfg)[2].any()


def test_a_worker_the_loss_test_just_flagged_is_held_to_half_the_ratio():
    """The sync after a bad stretch: its rest (2 of 16 steps) lifts the worker's interval loss to 1.052x
    and 1.089x the median (norvig-big, repeated and random tokens), under Q = 1.1. On probation (flagged
    at the previous sync) the worker is held to 1.05 both ways; a healthy worker at the same loss, or one
    at 1.04x on probation (its next interval is an ordinary one), is not flagged."""
    assert probation_ratio(1.1) == pytest.approx(1.05) and probation_ratio(1.25) == pytest.approx(1.125)
    losses = torch.tensor([5.5676, 5.8689, 5.5837, 5.5722])  # median 5.578: worker 1 at 1.052x
    nobody, worker1 = torch.zeros(4, dtype=torch.bool), torch.tensor([False, True, False, False])
    assert loss_outliers(losses, 1.1).tolist() == [False] * 4
    assert loss_outliers(losses, 1.1, nobody).tolist() == [False] * 4
    assert loss_outliers(losses, 1.1, worker1).tolist() == [False, True, False, False]
    low = torch.tensor([5.5676, 5.30, 5.5837, 5.5722])  # 1.052x below
    assert loss_outliers(low, 1.1, worker1).tolist() == [False, True, False, False]
    assert loss_outliers(torch.tensor([5.5676, 5.80, 5.5837, 5.5722]), 1.1, worker1).tolist() == [False] * 4
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, loss_ratio=1.1)
    norms = torch.ones(4, 3)
    assert not penalty_weights(norms, init_stats(3), cfg, losses=losses)[2].any()
    anomalous = penalty_weights(norms, init_stats(3), cfg, losses=losses, loss_probation=worker1)[2]
    assert anomalous.tolist() == [[False] * 3, [True] * 3, [False] * 3, [False] * 3]
    with pytest.raises(ValueError, match="probation"):
        loss_outliers(losses, 1.1, torch.zeros(3, dtype=torch.bool))


def test_moment_test_flags_a_frozen_worker_in_the_layers_its_burst_hit():
    """Second-moment RMS per layer: worker 1's v is ~1000x its peers' in layers 0 and 2 after a gradient
    burst (RMS ~30x), worker 3 sits at 1.3x (healthy spread). With M = 4, worker 1 is flagged in those two
    layers only, although its norms are ordinary; M = 0 or no moments given: the norms alone decide."""
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, moment_ratio=4.0)
    norms = torch.ones(4, 3)
    rms = torch.tensor([[1e-3, 2e-3, 5e-4], [3e-2, 2e-3, 1.6e-2], [1e-3, 2e-3, 5e-4], [1.3e-3, 2.5e-3, 6e-4]])
    weights, skip, anomalous, _ = penalty_weights(norms, init_stats(3), cfg, second_moment_rms=rms)
    assert anomalous.tolist() == [[False] * 3, [True, False, True], [False] * 3, [False] * 3]
    torch.testing.assert_close(weights[:, 0], torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]), rtol=1e-7, atol=0)
    assert not skip.any()
    off = PenaltyConfig(weighting="uniform", anomaly_threshold=0.0, moment_ratio=0.0)
    assert not penalty_weights(norms, init_stats(3), off, second_moment_rms=rms)[2].any()
    assert not penalty_weights(norms, init_stats(3), cfg)[2].any()
    with pytest.raises(ValueError, match="second_moment_rms"):
        penalty_weights(norms, init_stats(3), cfg, second_moment_rms=rms[:, :2])


def test_moment_test_only_above_needs_three_and_ignores_unknown():
    column = lambda *v: torch.tensor(v).unsqueeze(1)  # noqa: E731  [W, 1]
    # a smaller v is not "frozen" (it takes larger steps: the norm tests' business)
    assert frozen_outliers(column(1.0, 0.01, 1.1, 0.9), 4.0).flatten().tolist() == [False] * 4
    assert frozen_outliers(column(1.0, 100.0), 4.0).flatten().tolist() == [False] * 2  # two cannot say
    assert frozen_outliers(column(1.0, 100.0, NAN), 4.0).flatten().tolist() == [False] * 3  # NaN: unknown
    assert frozen_outliers(column(1.0, 100.0, NAN, 1.2), 4.0).flatten().tolist() == [False, True, False, False]
    # boundary: exactly M times the median is not above it; even count: mean of the two middle ones (1.5)
    assert frozen_outliers(column(1.0, 4.0, 1.0), 4.0).flatten().tolist() == [False] * 3
    assert frozen_outliers(column(1.0, 2.0, 6.01, 1.0), 4.0).flatten().tolist() == [False, False, True, False]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ewma_alpha"):
        PenaltyConfig(ewma_alpha=0.0)
    with pytest.raises(ValueError, match="weighting"):
        PenaltyConfig(weighting="softmax")
    with pytest.raises(ValueError, match="temperature"):
        PenaltyConfig(temperature=0.0)
    with pytest.raises(ValueError, match="clip"):
        PenaltyConfig(clip=-1.0)
    with pytest.raises(ValueError, match="anomaly_threshold"):
        PenaltyConfig(anomaly_threshold=-1.0)
    with pytest.raises(ValueError, match="ewma_warmup"):
        PenaltyConfig(ewma_warmup=0)
    assert PenaltyConfig(clip=None).clip is None
    for bad in (1.0, 0.5, -1.0, INF, NAN):
        with pytest.raises(ValueError, match="peer_ratio"):
            PenaltyConfig(peer_ratio=bad)
        with pytest.raises(ValueError, match="moment_ratio"):
            PenaltyConfig(moment_ratio=bad)


def test_stats_state_dict_roundtrip():
    stats = _stats([1.0, 2.0], [0.5, 0.25], [3, 7], var_weight=[0.125, 0.75])
    assert set(stats.state_dict()) == {"mean", "var", "count", "var_weight"}
    restored = init_stats(2)
    assert restored.var_weight.tolist() == [0.0, 0.0] and restored.var_weight.dtype == torch.float32
    restored.load_state_dict({k: v.clone() for k, v in stats.state_dict().items()})
    assert restored.mean.tolist() == [1.0, 2.0] and restored.var.tolist() == [0.5, 0.25]
    assert restored.count.tolist() == [3, 7] and restored.count.dtype == torch.int64
    assert restored.var_weight.tolist() == [0.125, 0.75] and restored.var_weight.dtype == torch.float32
    # the restored statistics decide exactly like the originals (var_weight matters to the z-test)
    cfg = PenaltyConfig(weighting="uniform", anomaly_threshold=3.0, ewma_warmup=1)
    norms = torch.tensor([[1.0, 2.0], [3.5, 3.2], [4.5, 4.0]])
    for a, b in zip(penalty_weights(norms, stats, cfg)[:3], penalty_weights(norms, restored, cfg)[:3]):
        assert torch.equal(a, b)
    # layer 0: corrected std sqrt(0.5 * 0.98 / 0.125) = 1.98 accepts 3.5 and 4.5 (sqrt(0.5) would not)
    assert penalty_weights(norms, restored, cfg)[2].tolist() == [[False, False], [False, False], [False, True]]
    with pytest.raises(ValueError, match="shape"):
        init_stats(3).load_state_dict(stats.state_dict())
    bad = {k: v.clone() for k, v in stats.state_dict().items()}
    bad["var_weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="var_weight"):
        init_stats(2).load_state_dict(bad)


# --------------------------------------------------------------------------------------------------
# Against the reference, over several syncs.


@pytest.mark.parametrize("weighting", ["uniform", "norm"])
@pytest.mark.parametrize("use_steps", [False, True])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_matches_reference_over_syncs(weighting, use_steps, clip):
    cfg = PenaltyConfig(
        weighting=weighting, anomaly_threshold=2.5, ewma_alpha=0.2, ewma_warmup=2, temperature=0.7, clip=clip
    )
    gen = torch.Generator().manual_seed(3)
    num_workers, sizes = 4, [5, 7, 3]
    stats = init_stats(len(sizes))
    ref_stats = init_stats(len(sizes))
    saw = {"anomalous": 0, "skip": 0, "clipped": 0, "correction_accepted": 0}
    later_observations = [0] * len(sizes)
    for sync in range(8):
        deltas = [[torch.randn(n, generator=gen) * 0.3 for n in sizes] for _ in range(num_workers)]
        if sync >= 3:
            deltas[1][0] = deltas[1][0] * 50.0  # a spike, caught by the z-test after warmup
        if sync == 4:
            deltas[2][1][0] = NAN
        if sync == 5:
            for w in range(num_workers):  # every worker spikes on layer 2: the layer skips
                deltas[w][2] = deltas[w][2] * 100.0
        steps = torch.tensor([3.0, 1.0, 2.0, 5.0]) if use_steps else None
        before = stats
        combined, weights, skip, anomalous, stats = torch_penalized_average(deltas, stats, cfg, steps)
        # decisions the uncorrected std sqrt(var) would have flagged but the corrected one accepted
        for layer in range(len(sizes)):
            if before.count[layer].item() >= cfg.ewma_warmup:
                for w in range(num_workers):
                    g = torch.linalg.vector_norm(deltas[w][layer]).item()
                    raw_limit = before.mean[layer].item() + cfg.anomaly_threshold * _old_std(before, layer)
                    if g > raw_limit and not anomalous[w, layer]:
                        saw["correction_accepted"] += 1
        ref_combined, ref_weights, ref_skip, ref_stats_dict = reference_penalized_average(
            deltas, ref_stats, cfg, steps.tolist() if steps is not None else None
        )
        assert skip.tolist() == ref_skip
        torch.testing.assert_close(weights.double(), torch.tensor(ref_weights, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        for layer in range(len(sizes)):
            torch.testing.assert_close(combined[layer].double(), ref_combined[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.mean.double(), torch.tensor(ref_stats_dict["mean"], dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(stats.var.double(), torch.tensor(ref_stats_dict["var"], dtype=torch.float64), rtol=1e-4, atol=1e-9)
        assert stats.count.tolist() == ref_stats_dict["count"]
        torch.testing.assert_close(
            stats.var_weight.double(), torch.tensor(ref_stats_dict["var_weight"], dtype=torch.float64), rtol=1e-5, atol=0
        )
        # closed form: after n observations that were not a layer's first, the weight is (1-a) (1 - (1-a)^n)
        for layer in range(len(sizes)):
            later_observations[layer] += int((~anomalous[:, layer]).sum()) - (1 if sync == 0 else 0)
            expected = (1 - cfg.ewma_alpha) * (1 - (1 - cfg.ewma_alpha) ** later_observations[layer])
            assert stats.var_weight[layer].item() == pytest.approx(expected, rel=1e-5)
            assert 0.0 < stats.var_weight[layer].item() < 1 - cfg.ewma_alpha
        ref_stats = _stats(
            ref_stats_dict["mean"], ref_stats_dict["var"], ref_stats_dict["count"], ref_stats_dict["var_weight"]
        )
        saw["anomalous"] += int(anomalous.sum())
        saw["skip"] += int(skip.sum())
        if clip is not None:
            saw["clipped"] += sum(int(torch.linalg.vector_norm(c) > clip - 1e-4) for c in combined)
    # the scenario really exercised the branches
    assert saw["anomalous"] >= 5 + 1 + 4 and saw["skip"] == 1
    assert saw["correction_accepted"] >= 1  # the reference's bias correction decided something
    if clip is not None:
        assert saw["clipped"] > 0


# --------------------------------------------------------------------------------------------------
# The bias correction in whole runs (default alpha 0.02).


def _old_std(stats, layer):
    """The z-test's std before the fixes: sqrt of the raw EWMA variance, with the original 1e-6 relative
    floor (today's 10% floor would hide what the bias correction alone fixes)."""
    return max(math.sqrt(stats.var[layer].item()), 1e-6 * abs(stats.mean[layer].item()))


def _corrected_std(stats, layer, alpha):
    var, weight = stats.var[layer].item(), stats.var_weight[layer].item()
    corrected = var * (1.0 - alpha) / weight if weight > 0.0 else var
    return max(math.sqrt(corrected), STD_RELATIVE_FLOOR * abs(stats.mean[layer].item()))


@pytest.mark.parametrize(
    "factor, uncorrected_flags",
    [
        (1.05, True),  # norms growing 5% per sync: the mean lags, sqrt(var) is far too small early on
        (1.00, True),  # constant norms: even the spread 1.00..1.03 alone exceeds 3 * sqrt(var) at sync 3
        (0.95, False),  # decaying 5% per sync: every norm is below the lagging mean, one-sided test flags none
    ],
)
def test_drifting_norms_are_not_flagged(factor, uncorrected_flags):
    cfg = PenaltyConfig(anomaly_threshold=3.0, ewma_warmup=3)  # alpha 0.02, as in the failing run
    alpha = cfg.ewma_alpha
    stats = init_stats(1)
    old_flagged = []  # (sync, worker) the uncorrected z-test would have flagged
    max_corrected_z = -math.inf
    for sync in range(10):
        norms = torch.tensor([[1.00], [1.01], [1.02], [1.03]]) * factor**sync
        weights, skip, anomalous, new_stats = penalty_weights(norms, stats, cfg)
        assert not anomalous.any(), f"sync {sync}: {anomalous[:, 0].tolist()}"
        assert skip.tolist() == [False]
        assert weights[:, 0].sum().item() == pytest.approx(1.0, rel=1e-6) and (weights > 0).all()
        if stats.count[0].item() >= cfg.ewma_warmup:
            mean = stats.mean[0].item()
            for w, g in enumerate(norms[:, 0].tolist()):
                if g - mean > cfg.anomaly_threshold * _old_std(stats, 0):
                    old_flagged.append((sync, w))
                max_corrected_z = max(max_corrected_z, (g - mean) / _corrected_std(stats, 0, alpha))
        stats = new_stats
    assert stats.count.tolist() == [10]
    # every one of the 40 norms was observed: 39 later observations, weight (1-a)(1 - (1-a)^39)
    assert stats.var_weight[0].item() == pytest.approx((1 - alpha) * (1 - (1 - alpha) ** 39), rel=1e-5)
    assert max_corrected_z < cfg.anomaly_threshold  # the hand-corrected std agrees with the code
    if uncorrected_flags:
        # without the correction the same run would have dropped workers (in the real run: all of them)
        assert old_flagged, "the uncorrected z-test would not have flagged anything: the test proves nothing"
        assert any(sync == cfg.ewma_warmup for sync, _ in old_flagged)  # already at the first tested sync
    else:
        assert not old_flagged


@pytest.mark.parametrize("weighting", ["uniform", "norm"])
def test_tenfold_outlier_after_warmup_is_flagged(weighting):
    cfg = PenaltyConfig(anomaly_threshold=3.0, ewma_warmup=3, weighting=weighting)
    gen = torch.Generator().manual_seed(0)
    stats, clean_stats = init_stats(2), init_stats(2)
    for sync in range(10):
        base = 1.0 + 0.03 * torch.rand(4, 2, generator=gen)  # layer 0 and 1 ordinary fluctuations
        norms = base.clone()
        if sync >= cfg.ewma_warmup:
            norms[2, 0] = 10.0 * base[2, 0]  # worker 2 on layer 0, from the first tested sync on
        weights, skip, anomalous, stats = penalty_weights(norms, stats, cfg)
        # the same sync without worker 2's layer 0 norm (marked NaN, hence anomalous): reference statistics
        clean = base.clone()
        if sync >= cfg.ewma_warmup:
            clean[2, 0] = NAN
        clean_weights, _, clean_anomalous, clean_stats = penalty_weights(clean, clean_stats, cfg)
        if sync < cfg.ewma_warmup:
            assert not anomalous.any()
            continue
        assert anomalous.tolist() == [[False, False], [False, False], [True, False], [False, False]], sync
        assert weights[2, 0].item() == 0.0
        assert (weights[[0, 1, 3], 0] > 0).all() and skip.tolist() == [False, False]
        assert weights[:, 0].sum().item() == pytest.approx(1.0, rel=1e-6)
        # the outlier is dropped exactly as a NaN worker is, and never enters the statistics
        assert torch.equal(anomalous, clean_anomalous) and torch.equal(weights, clean_weights)
        for name in ("mean", "var", "count", "var_weight"):
            assert torch.equal(getattr(stats, name), getattr(clean_stats, name)), name
        assert stats.mean[0].item() < 1.03
