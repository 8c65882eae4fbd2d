"""Streaming DiLoCo inside megatron-core: fragments, overlap, merge, quantized wire, byte counts."""
import torch

from megatron_edit.quantized_collectives import predicted_bytes_sent
from mp_harness import TINY_MODEL, losses, run_training

BASE = TINY_MODEL + ["--global-batch-size", "16", "--train-iters", "8", "--lr", "3e-3",
                     "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4", "--local-sgd-warmup-iters", "1",
                     "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                     "--ddp-bucket-size", "3000"]


def test_one_fragment_no_overlap_no_mixing_fp32_equals_diloco():
    """SPEC 2.4: P = 1, tau = 0, alpha = 0 and an fp32 wire is DiLoCo, bit for bit, over three syncs
    (5, 9, 13: the outer momentum of one sync enters the next)."""
    long = ["--train-iters", "13"]
    diloco = run_training(BASE + long + ["--local-sgd", "diloco"], 4)
    streaming = run_training(BASE + long + ["--local-sgd", "streaming", "--streaming-fragments", "1",
                                            "--streaming-overlap-steps", "0", "--streaming-mix-alpha", "0",
                                            "--outer-grad-dtype", "fp32"], 4)
    assert len(losses(diloco)) == 13
    assert losses(streaming) == losses(diloco)
    for a, b in zip(streaming, diloco):
        assert a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        assert a["sync_bytes"] == b["sync_bytes"]


def test_overlapped_fragment_merges_to_the_average_at_launch():
    """P=2, tau=1, alpha=0, outer 'average' (anchor' = mean of the workers' params when the fragment's
    collective was launched): one step after launch, every worker's fragment equals the mean of the
    workers' fragment at launch time, although both trained one more step in between; the other
    fragment keeps its own per-worker values."""
    argv = TINY_MODEL + ["--global-batch-size", "8", "--train-iters", "7", "--lr", "1e-2",
                         "--local-sgd", "streaming", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4",
                         "--streaming-fragments", "2", "--streaming-overlap-steps", "1",
                         "--streaming-mix-alpha", "0", "--outer-grad-dtype", "fp32", "--outer-optimizer", "average",
                         "--no-local-sgd-final-sync"]  # the merge at 7 is the run's last step (test_final_sync.py)
    r0, r1 = run_training(argv, 2, keep_snapshots=True)
    fragment_of_key = r0["fragment_of_key"]
    frag = [fragment_of_key[k] for k in r0["shard_keys"]]
    # fragment 0: t0 = 0 -> first sync at iteration 4; fragment 1: t1 = 2 -> first sync at iteration 6.
    for launch, fragment in ((4, 0), (6, 1)):
        at_launch = [r["snapshots"][launch - 1] for r in (r0, r1)]
        after = [r["snapshots"][launch] for r in (r0, r1)]
        for i, f in enumerate(frag):
            if f == fragment:
                mean = (at_launch[0][i] + at_launch[1][i]) / 2
                torch.testing.assert_close(after[0][i], mean, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(after[1][i], mean, rtol=1e-6, atol=1e-7)
            else:
                assert not torch.equal(after[0][i], after[1][i])


def test_mixing_factor_merges_toward_the_workers_own_params():
    """alpha = 0.25, tau = 0, outer 'average': at fragment 0's first sync (iteration 4) every worker's
    fragment becomes anchor' + alpha (theta_w - anchor'), anchor' the workers' mean: a quarter of the way
    back towards its own params (swapped lerp arguments would give three quarters). theta_w, the
    params the merge starts from, come from the same run with alpha = 1 (the merge keeps them); up to
    iteration 4 both runs are the same computation."""
    argv = TINY_MODEL + ["--global-batch-size", "8", "--train-iters", "4", "--lr", "1e-2",
                         "--local-sgd", "streaming", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4",
                         "--streaming-fragments", "2", "--streaming-overlap-steps", "0", "--outer-grad-dtype", "fp32",
                         "--outer-optimizer", "average", "--no-local-sgd-final-sync"]  # the sync at 4 ends the run
    mixed = run_training(argv + ["--streaming-mix-alpha", "0.25"], 2, keep_snapshots=True)
    kept = run_training(argv + ["--streaming-mix-alpha", "1"], 2, keep_snapshots=True)
    frag = [mixed[0]["fragment_of_key"][k] for k in mixed[0]["shard_keys"]]
    for i, f in enumerate(frag):
        theta = [r["snapshots"][3][i] for r in kept]
        got = [r["snapshots"][3][i] for r in mixed]
        if f == 0:
            mean = (theta[0] + theta[1]) / 2
            for w in range(2):
                torch.testing.assert_close(got[w], mean + 0.25 * (theta[w] - mean), rtol=1e-5, atol=1e-6)
            assert (theta[0] - theta[1]).abs().max() > 1e-3  # the workers did differ
        else:
            assert torch.equal(got[0], theta[0]) and torch.equal(got[1], theta[1])


def test_fp4_layerwise_edit_equals_a_reference_sync():
    """One layer-wise EDiT sync over an fp4 (E3M0) wire, recomputed in the test from the workers' params:
    each worker sends 0.5 (anchor - theta_w) (uniform weights), quantized per 128-value block; each rank
    sums its chunk of the decoded contributions in fp32, requantizes it and gathers the rest; the outer
    step ('average') subtracts the result from the anchor. The params after the sync must equal that
    bit for bit (one bucket: the unit is the whole shard, whose layout the test knows)."""
    from megatron_edit.quantized_collectives import chunk_bounds
    from megatron_edit.wire_codecs import decode, encode

    def roundtrip(x):
        return decode(encode(x, "fp4-e3m0", 128), "fp4-e3m0", 128)

    argv = TINY_MODEL + ["--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
                         "--local-sgd", "edit", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "2",
                         "--local-sgd-warmup-iters", "1", "--outer-grad-dtype", "fp4-e3m0", "--outer-optimizer",
                         "average", "--pseudo-grad-weighting", "uniform", "--pseudo-grad-anomaly-threshold", "0",
                         "--pseudo-grad-clip", "1e30", "--use-distributed-optimizer", "--overlap-grad-reduce",
                         "--overlap-param-gather", "--ddp-bucket-size", "100000000"]
    results = run_training(argv, 2, keep_snapshots=True)
    assert all(r["sync_units"] == 1 for r in results)
    anchor = torch.cat([t.reshape(-1) for t in results[0]["snapshots"][0]])  # end of the synchronous warmup
    thetas = [torch.cat([t.reshape(-1) for t in r["snapshots"][2]]) for r in results]  # before the sync at 3
    contributions = [torch.sub(anchor, theta).mul_(0.5) for theta in thetas]
    total = roundtrip(contributions[0]).clone()
    total += roundtrip(contributions[1])
    reduced = torch.cat([roundtrip(total[a:b]) for a, b in chunk_bounds(total.numel(), 2, "fp4-e3m0", 128)])
    expected = anchor - reduced
    assert not torch.equal(reduced, contributions[0] + contributions[1])  # the wire did quantize
    for r in results:
        assert torch.equal(torch.cat([t.reshape(-1) for t in r["final_shards"]]), expected)

    # --outer-grad-stochastic-rounding reaches the wire: other values than round-to-nearest, the same on
    # every rank (one all-gathered result), and no further from the exact sum than one E3M0 step (x2).
    rounded = run_training(argv + ["--outer-grad-stochastic-rounding"], 2, keep_snapshots=True)
    got = [torch.cat([t.reshape(-1) for t in r["final_shards"]]) for r in rounded]
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], expected)
    exact = contributions[0] + contributions[1]
    assert ((anchor - got[0]) - exact).abs().max() <= 2 * exact.abs().max()

    # --outer-grad-reduction all-gather: one quantization, the fp32 sum of the decoded contributions in
    # worker order, not requantized; its bytes are what the log predicted, (W - 1) whole encoded vectors.
    from megatron_edit.quantized_collectives import ALL_GATHER

    gathered = run_training(argv + ["--outer-grad-reduction", "all-gather"], 2, keep_snapshots=True)
    single = anchor - total
    assert not torch.equal(single, expected)  # the second quantization is gone
    for r in gathered:
        assert torch.equal(torch.cat([t.reshape(-1) for t in r["final_shards"]]), single)
        assert r["sync_bytes_measured"] == predicted_bytes_sent(total.numel(), 2, r["worker"], "fp4-e3m0", 128,
                                                                ALL_GATHER)


def test_fp4_edit_layerwise_trains_and_counts_bytes():
    """EDiT with a 4-bit wire, layer-wise: it trains; the bytes the log reports (predicted at sync time)
    equal what the collectives reported; and they are ~1/7 of an fp32 wire (4 bits + one fp32 scale per
    128 values, vs 32 bits)."""
    results = run_training(BASE + ["--local-sgd", "edit", "--outer-grad-dtype", "fp4-e3m0", "--train-iters", "9"], 4)
    curve = losses(results)
    assert curve[-1] < curve[0] - 0.1
    syncs = 2  # warmup 1, H 4: iterations 5 and 9
    for r in results:
        norm_bytes = syncs * (2 - 1) * (4 + 3) * 4  # the per-layer norm all-gather to the other worker
        assert r["sync_bytes"] - norm_bytes == r["sync_bytes_measured"] > 0
        fp32_bytes = syncs * predicted_bytes_sent(r["main_shard_bytes"] // 4, 2, r["worker"], "fp32")
        assert 0.12 < r["sync_bytes_measured"] / fp32_bytes < 0.16


def test_predicted_bytes_match_formula():
    n, block = 1000, 128
    for fmt, bits in (("fp4-e3m0", 4), ("int8", 8), ("bf16", 16)):
        total = predicted_bytes_sent(n, 2, 0, fmt, block) + predicted_bytes_sent(n, 2, 1, fmt, block)
        scales = 0 if fmt == "bf16" else 4 * ((n + block - 1) // block)
        # two ranks: each sends the other half once in each phase -> the whole vector crosses twice
        assert total == 2 * (n * bits // 8 + scales)
