"""A flagged worker's inner optimizer state is replaced by the mean of its healthy peers'.

Why: the penalty leaves an anomalous worker's pseudo-gradient out of a sync, and the sync resets its
parameters to the new anchor, but its inner Adam moments survive the sync and carry the fault into the
next intervals:
  - one bad batch (a loss spike) or a burst of gradient noise inflates ``exp_avg_sq`` by g^2, and the
    worker stays nearly frozen for ~1/(1 - beta2) steps (1000 with beta2 = 0.999); the peer test then
    flags its frozen layers at later syncs, and the run goes on with W - 1 workers;
  - a stretch of bad data leaves ``exp_avg`` pointing along the bad data's gradient for ~1/(1 - beta1)
    steps after the data are clean again.
So at a sync that flags a worker in any layer, that worker's moments (every state tensor of a
parameter's shape: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), in every layer, become the mean of
the moments of the workers flagged in no layer. The whole worker, not only its flagged layers: the faults
that matter hit a worker's whole gradient (a bad batch, a bad shard, noise), while the per-layer tests
notice its layers one by one as each drifts past its threshold. Measured (tools/bench_convergence.py,
norvig-big, loss spike, seed 1): loss excess over the clean run 0.054 without a repair, 0.034 repairing the
flagged layers only, 0.018 repairing the whole worker (DiLoCo: 0.068). Healthy workers keep their own
moments. Not zeros: Adam's step count is far past its bias correction, so fresh moments make the next
update about lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr per element in the sign of one gradient, an
outlier interval of its own. ``--no-pseudo-grad-repair-inner-state`` turns it off.

Cost: nothing at a sync that flags nobody (the decision comes from the anomaly matrix every rank already
holds: no collective, no host sync). Otherwise one blocking fp32 all-reduce over the workers of 2 x the
rank's shard, in chunks of ``--local-sgd-sync-chunk-size`` elements through one buffer: twice an fp32
pseudo-gradient reduction. At 70B parameters with TP 8 x PP 8 and the distributed optimizer over 8 ranks
that is 2 x 137M fp32 = 1.1 GB per rank, at the (rare) syncs that flag somebody.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


def repair_plan(anomalous: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(donor weight [W] fp32, repaired [W] bool) from the sync's anomaly matrix [W, L].

    Repaired: members flagged in any layer. Donors: members flagged in none, each weighing 1/n_donors.
    Nothing is repaired when nobody is flagged or nobody is healthy; absent workers (elastic) are
    neither donors nor repaired."""
    member = present.bool().to(anomalous.device)
    flagged = anomalous.bool().any(dim=1) & member
    donors = member & ~flagged
    if not bool(flagged.any()) or not bool(donors.any()):
        return torch.zeros(member.numel()), torch.zeros(member.numel(), dtype=torch.bool)
    return donors.float().cpu() / float(donors.sum()), flagged.cpu()


def repair_inner_state(
    moments: Iterable[torch.Tensor],
    donor_weight: float,
    replace: bool,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    apply: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of a repair: every worker calls it with its moment tensors in the same order
    (the engine's global shard order); ``reduce_sum`` sums a buffer over the workers (a collective).
    A donor contributes weight x its moment, anyone else zeros (not 0 x a moment that may be NaN); a
    repaired worker (``replace``) takes the sum. With ``apply=False`` (elastic workers, before the commit
    vote) the copies are returned as (destination, reduced values) instead of made."""
    pending = []
    buffer: Optional[torch.Tensor] = None
    for t in moments:
        flat = t.view(-1)
        for lo in range(0, flat.numel(), chunk_size):
            hi = min(flat.numel(), lo + chunk_size)
            if not apply or buffer is None or buffer.numel() < hi - lo:
                buffer = torch.empty(hi - lo if not apply else min(chunk_size, flat.numel()),
                                     dtype=torch.float32, device=flat.device)
            part = buffer[:hi - lo]
            if donor_weight > 0:
                part.copy_(flat[lo:hi]).mul_(donor_weight)
            else:
                part.zero_()
            reduced = reduce_sum(part)
            if replace and apply:
                flat[lo:hi].copy_(reduced)
            elif replace:
                pending.append((flat[lo:hi], reduced))
    return pending
