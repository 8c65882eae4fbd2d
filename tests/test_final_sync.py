"""--local-sgd-final-sync: the iteration that reaches --train-iters leaves every worker on the same model,
whatever the sync schedule says there (local_sgd.LocalSGD._final_sync)."""
import pytest
import torch

from mp_harness import TINY_MODEL, losses, run_training

# 2 workers of 1 rank, H = 4 after 1 warmup iteration: scheduled syncs at 5 and 9, the run ends at 11.
BASE = TINY_MODEL + ["--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "11",
                     "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4", "--local-sgd-warmup-iters", "1"]
# Streaming, 2 fragments, tau 2, alpha 0.5, fp4 wire: fragment 0 syncs at 5 and 9 (merged at 7 and 11),
# fragment 1 at 7 (merged at 9). Ending at 10: fragment 0 is in flight (launched at 9), fragment 1 is
# mid-interval (3 steps since its merge).
STREAMING = TINY_MODEL + ["--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "10",
                          "--local-sgd", "streaming", "--local-sgd-workers", "2", "--local-sgd-sync-interval", "4",
                          "--local-sgd-warmup-iters", "1", "--streaming-fragments", "2",
                          "--streaming-overlap-steps", "2", "--streaming-mix-alpha", "0.5",
                          "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                          "--ddp-bucket-size", "3000"]


def _same_params(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("method", [
    ["--local-sgd", "diloco"],
    # layer-wise: the final sync's updates are pending after the step, and land before the params are read
    ["--local-sgd", "edit", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
     "--ddp-bucket-size", "3000"],
])
def test_a_run_ending_mid_interval_ends_on_one_model(method):
    r0, r1 = run_training(BASE + method, 2)
    assert [s for s in r0["sync_steps"]] == [5, 9, 11]  # the schedule's two, and the final one
    assert _same_params(r0["params"], r1["params"])


def test_streaming_ends_with_every_fragment_agreed():
    """Without the final sync both fragments differ between the workers at the end (one in flight, one
    mid-interval); with it, all params are equal. Up to the last step both runs are the same run."""
    ended = run_training(STREAMING, 2)
    plain = run_training(STREAMING + ["--no-local-sgd-final-sync"], 2)
    assert losses(ended) == losses(plain) and len(losses(ended)) == 10
    assert ended[0]["sync_steps"] == [5, 7, 9, 10] and plain[0]["sync_steps"] == [5, 7, 9]
    assert _same_params(ended[0]["params"], ended[1]["params"])
    differing = [n for n in plain[0]["params"] if not torch.equal(plain[0]["params"][n], plain[1]["params"][n])]
    assert any("layers.0." in n for n in differing) and any("layers.1." in n for n in differing), differing
    # The final sync's bytes are counted: fragment 1 (all of it) goes out once more, fragment 0 does not.
    assert ended[0]["sync_bytes"] > plain[0]["sync_bytes"]
