"""A flagged worker's inner optimizer state is replaced by the mean of its healthy peers'.

Why: the penalty leaves an anomalous worker's pseudo-gradient out of a sync, and the sync resets its
parameters to the new anchor, but its inner Adam moments survive the sync and carry the fault into the
next intervals:
  - one bad batch (a loss spike) or a burst of gradient noise inflates ``exp_avg_sq`` by g^2, and the
    worker stays nearly frozen for ~1/(1 - beta2) steps (1000 with beta2 = 0.999); the peer test then
    flags its frozen layers at every later sync, and the run goes on with W - 1 workers;
  - a stretch of bad data leaves ``exp_avg`` pointing along the bad data's gradient for ~1/(1 - beta1)
    steps after the data are clean again.
So at a sync that flags anybody, in every layer where some member is anomalous and at least one is
healthy, the anomalous workers' moments (every state tensor of the parameter's shape: ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) become the mean over the healthy workers' moments of that layer.
Healthy workers keep their own. Not zeros: Adam's step count is far past its bias correction, so fresh
moments make the next update about lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr per element in the sign of
one gradient, an outlier interval of its own. ``--no-pseudo-grad-repair-inner-state`` turns it off.

Cost: nothing at a sync that flags nobody (the decision comes from the anomaly matrix every rank already
holds: no collective, no host sync). Otherwise one blocking fp32 all-reduce over the workers of
2 x (the flagged layers' shard) per rank, in chunks of ``--local-sgd-sync-chunk-size`` elements through one
buffer. At 70B parameters with TP 8 x PP 8 and the distributed optimizer over 8 ranks, a worker flagged in
every layer moves 2 x 137M fp32 = 1.1 GB per rank once, about one pseudo-gradient reduction's worth twice.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


def repair_weights(anomalous: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[W, L] fp32: per layer, 1/n_healthy for each healthy member where the layer needs a repair (some
    member anomalous and at least one healthy), 0 elsewhere; absent workers (elastic) are neither."""
    anomalous = anomalous.bool()
    member = present.bool().to(anomalous.device).view(-1, 1)
    healthy = member & ~anomalous
    needed = (member & anomalous).any(dim=0) & healthy.any(dim=0)
    counts = healthy.sum(dim=0).clamp(min=1).float()
    return torch.where(healthy & needed, 1.0 / counts, torch.zeros_like(counts)).float()


def repaired_names(anomalous: torch.Tensor, weights: torch.Tensor, name_of_layer: Callable[[int], str]) -> list[str]:
    """Log names of the (worker, layers) pairs whose inner state a repair replaces, e.g. ``w1[layer0 layer3]``."""
    needed = weights.sum(dim=0) > 0
    out = []
    for w in range(anomalous.shape[0]):
        layers = (anomalous[w].bool() & needed).nonzero().flatten().tolist()
        if layers:
            out.append(f"w{w}[{' '.join(name_of_layer(k) for k in layers)}]")
    return out


def repair_inner_state(
    moments: Iterable[tuple[int, list[torch.Tensor]]],
    weights: torch.Tensor,
    anomalous: torch.Tensor,
    worker_index: int,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    apply: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace this worker's moments in the layers it is anomalous in by the healthy mean.

    ``moments``: (layer key, this rank's moment tensors of one shard), in the same order on every worker
    (the engine's global shard order). ``reduce_sum`` sums a buffer over the workers (a collective every
    worker calls in the same order). Every rank takes part in the layers that need a repair, whether or
    not it is anomalous in them: a healthy worker contributes weight x its moment, an anomalous one zeros
    (not weight 0 x a moment that may be NaN). With ``apply=False`` (elastic workers, before the commit
    vote) the copies are returned as (destination, reduced values) instead of made.
    """
    needed = (weights.sum(dim=0) > 0).tolist()
    mine = weights[worker_index].tolist()
    replace = anomalous[worker_index].bool().tolist()
    pending = []
    buffer: Optional[torch.Tensor] = None
    for key, tensors in moments:
        if not needed[key]:
            continue
        for t in tensors:
            flat = t.view(-1)
            for lo in range(0, flat.numel(), chunk_size):
                hi = min(flat.numel(), lo + chunk_size)
                if not apply or buffer is None or buffer.numel() < hi - lo:
                    buffer = torch.empty(min(chunk_size, flat.numel()) if apply else hi - lo,
                                         dtype=torch.float32, device=flat.device)
                part = buffer[:hi - lo]
                if mine[key] > 0:
                    part.copy_(flat[lo:hi]).mul_(mine[key])
                else:
                    part.zero_()
                reduced = reduce_sum(part)
                if replace[key]:
                    if apply:
                        flat[lo:hi].copy_(reduced)
                    else:
                        pending.append((flat[lo:hi], reduced))
    return pending
