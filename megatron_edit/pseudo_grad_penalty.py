"""EDiT's pseudo-gradient penalty (arXiv 2412.07210, Section 3.2 and Algorithm 2), as pure tensor math.

Per sync and per layer (a transformer layer, the embedding, or the output layer / final norm), with
``G_w = ||delta_w||`` the norm of worker w's pseudo-gradient for that layer (SPEC 2.2):

1. Anomaly elimination: per layer, an exponentially weighted mean and variance of G over past syncs.
   After ``ewma_warmup`` syncs, worker w is anomalous if ``(G_w - mean) / std > anomaly_threshold``.
   A NaN or Inf norm is anomalous always, warmup or not. Anomalous workers get weight exactly 0, are not
   counted in the denominator, and their G never enters the statistics (the original EDiT code fed a
   +1e6 sentinel into its statistics; SPEC 8). If every worker is anomalous the layer skips its outer
   step (``skip``).
   Optionally (``peer_ratio`` R > 0, ``--pseudo-grad-peer-ratio``) the test is also two-sided and made
   against the other workers at the same sync: see :func:`peer_outliers`. And (``loss_ratio`` Q > 0,
   ``--pseudo-grad-loss-ratio``) a worker whose training loss since the last sync is an outlier against
   the other workers' is anomalous in every layer: see :func:`loss_outliers`.
2. Weighted averaging: ``softmax(-G_w / T)`` over the non-anomalous workers (smaller norm, larger
   weight), or uniform weights. Optionally (A-EDiT, SPEC 2.3) multiplied by the number of inner steps
   each worker took since the last sync, then renormalised.
3. Clip: the combined ``delta = sum_w weight_w * delta_w`` is scaled by ``min(1, clip / ||delta||)``.

How a caller combines deltas (the distributed ``combine`` is written elsewhere): every rank computes the
same ``norms [W, L]`` (reduced over all TP/PP/shard ranks of each layer), calls :func:`penalty_weights`,
and sums ``weighted_sum_contribution(delta_w, weights[w, l])`` over workers. It must NOT compute
``weights[w, l] * delta_w`` directly: an anomalous worker's delta may hold NaN or Inf, and
``0 * NaN = NaN``, ``0 * Inf = NaN`` would poison the sum. :func:`weighted_sum_contribution` masks with
``torch.where`` instead. Then it scales by :func:`clip_coefficient` of the combined norm and passes
``skip`` (expanded to the shard's elements) to ``outer_optimizer.outer_step``.

Defaults of ``--local-sgd edit`` / ``a-edit`` (``config.py``): the EWMA z-test, the peer test with R = 4,
the loss test with Q = 1.1 (:func:`loss_outliers`: a bad data shard, which no norm test sees; 1.05 for a
worker it flagged at the previous sync), uniform weights over the healthy workers, clipping. Not the paper's ``softmax(-G/T)``: it gives the
largest weight to the smallest norm, and in practice the smallest norm belongs to a worker that stopped
learning (after a loss spike or a burst of gradient noise its Adam second moments blew up and froze it),
not to the most trustworthy one; its weights also grow without bound as a norm shrinks. Measured with
``tools/bench_convergence.py`` (README, "Choosing H and the outer optimizer"): the paper's weighting lost
to DiLoCo's plain mean on clean runs and under a loss spike; uniform weights plus a two-sided test lose
nothing when clean and leave a frozen, exploding or non-finite worker out. ``--pseudo-grad-weighting
norm --pseudo-grad-peer-ratio 0 --pseudo-grad-loss-ratio 0`` restores the paper's rule exactly.

Everything here is fp32 tensor math without ``.item()`` or Python conditions on tensor values: it runs
per layer inside the forward pass (EDiT's layer-wise sync), where a host sync would break the overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHTINGS: tuple[str, ...] = ("uniform", "norm")
"""Values of ``--pseudo-grad-weighting``."""

STD_RELATIVE_FLOOR = 0.1
"""The z-score uses ``max(std, STD_RELATIVE_FLOOR * |mean|, tiny)`` as its denominator: a worker is
anomalous only if its norm exceeds the mean by more than ``threshold`` times 10% of the mean (1.3x with the
default threshold 3), however consistent the layer's past norms were. Measured reason: the final norm's
pseudo-gradients of 4 healthy workers agree to ~0.1%, so its EWMA std is tiny; a slow drift of the norm
between syncs then scored z > 3 for every worker at every sync, the layer skipped its outer step each
time and was frozen (the spikes EDiT targets are multiples of the mean, far above 1.3x). A norm equal to
the mean is never anomalous."""


@dataclass
class PenaltyConfig:
    """Options of the pseudo-gradient penalty. Defaults are EDiT's (paper Section 4.1 / SPEC 2.1-2.2).

    Attributes:
        anomaly_threshold: z-score threshold ``delta`` (``--pseudo-grad-anomaly-threshold``); 0 disables
            the z-test (non-finite norms are still anomalous).
        ewma_alpha: weight of a new observation in the EWMA mean/variance (``--pseudo-grad-ewma-alpha``).
        ewma_warmup: number of syncs that must have fed a layer's statistics before its z-test is active
            (``--pseudo-grad-ewma-warmup``); at least 1, since the statistics need an observation.
        weighting: ``"norm"`` = ``softmax(-G / T)``, ``"uniform"`` = plain mean (``--pseudo-grad-weighting``).
        temperature: relative temperature; the absolute one is ``T = temperature * mean(G)`` over the
            non-anomalous workers of the layer (see :func:`penalty_weights`).
        clip: ``phi``, bound on the norm of the combined pseudo-gradient (``--pseudo-grad-clip``); None
            disables.
        peer_ratio: R of the cross-worker test (``--pseudo-grad-peer-ratio``, :func:`peer_outliers`); 0
            disables it (the paper has only the one-sided test against the history).
        loss_ratio: Q of the cross-worker loss test (``--pseudo-grad-loss-ratio``, :func:`loss_outliers`);
            0 disables it.
        moment_ratio: M of the cross-worker test on the inner second moments (``--pseudo-grad-moment-ratio``,
            :func:`frozen_outliers`); 0 disables it.
    """

    anomaly_threshold: float = 3.0
    ewma_alpha: float = 0.02
    ewma_warmup: int = 3
    weighting: str = "norm"
    temperature: float = 1.0
    clip: float | None = 10.0
    peer_ratio: float = 0.0
    loss_ratio: float = 0.0
    moment_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.anomaly_threshold) and self.anomaly_threshold >= 0.0):
            raise ValueError(
                f"PenaltyConfig.anomaly_threshold (--pseudo-grad-anomaly-threshold) {self.anomaly_threshold} must be >= 0"
            )
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"PenaltyConfig.ewma_alpha (--pseudo-grad-ewma-alpha) {self.ewma_alpha} must be in (0, 1]")
        if isinstance(self.ewma_warmup, bool) or not isinstance(self.ewma_warmup, int) or self.ewma_warmup < 1:
            raise ValueError(
                f"PenaltyConfig.ewma_warmup (--pseudo-grad-ewma-warmup) {self.ewma_warmup} must be an integer >= 1"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"PenaltyConfig.weighting (--pseudo-grad-weighting) {self.weighting} is not one of {', '.join(WEIGHTINGS)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ValueError(f"PenaltyConfig.temperature {self.temperature} must be > 0")
        if not (math.isfinite(self.peer_ratio) and (self.peer_ratio == 0.0 or self.peer_ratio > 1.0)):
            raise ValueError(
                f"PenaltyConfig.peer_ratio (--pseudo-grad-peer-ratio) {self.peer_ratio} must be > 1 (0 disables)"
            )
        if not (math.isfinite(self.loss_ratio) and (self.loss_ratio == 0.0 or self.loss_ratio > 1.0)):
            raise ValueError(
                f"PenaltyConfig.loss_ratio (--pseudo-grad-loss-ratio) {self.loss_ratio} must be > 1 (0 disables)"
            )
        if not (math.isfinite(self.moment_ratio) and (self.moment_ratio == 0.0 or self.moment_ratio > 1.0)):
            raise ValueError(
                f"PenaltyConfig.moment_ratio (--pseudo-grad-moment-ratio) {self.moment_ratio} must be > 1 (0 disables)"
            )
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0.0):
            raise ValueError(f"PenaltyConfig.clip (--pseudo-grad-clip) {self.clip} must be > 0 (None disables)")


@dataclass
class PenaltyStats:
    """Per-layer EWMA statistics of the pseudo-gradient norm, as tensors on the training device.

    Attributes:
        mean: fp32 [L], EWMA mean of G.
        var: fp32 [L], EWMA variance of G.
        count: int64 [L], number of syncs whose norms entered this layer's statistics (syncs where every
            worker was anomalous do not count). The warmup compares this with ``ewma_warmup``. It counts
            syncs, not worker observations: with W workers one sync adds W observations but 1 to count.
        var_weight: fp32 [L], total weight the EWMA variance has accumulated so far (0 after the first
            observation, -> 1 - alpha). The z-test divides by it (bias correction, as Adam does for its
            moments): an EWMA variance that starts at 0 with alpha = 0.02 would otherwise be ~50x too
            small for the first syncs, flag ordinary norm fluctuations and freeze layers (all workers
            anomalous -> the layer skips its outer step, again and again).

    All ranks hold identical copies (they see identical norms), so a checkpoint saves one replica.
    """

    mean: Tensor
    var: Tensor
    count: Tensor
    var_weight: Tensor

    @property
    def num_layers(self) -> int:
        return self.mean.shape[0]

    def clone(self) -> "PenaltyStats":
        """An independent copy (elastic workers keep one to restore after a sync that did not commit)."""
        return PenaltyStats(**{k: v.clone() for k, v in self.state_dict().items()})

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "var": self.var, "count": self.count, "var_weight": self.var_weight}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy a :meth:`state_dict` into these tensors (keeps device and dtype)."""
        for name in ("mean", "var", "count", "var_weight"):
            target = getattr(self, name)
            source = state[name]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"PenaltyStats.{name}: checkpoint has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(source)


def init_stats(num_layers: int, device: torch.device | str | None = None) -> PenaltyStats:
    """Empty statistics (count 0) for ``num_layers`` layers."""
    if num_layers < 1:
        raise ValueError(f"init_stats: num_layers {num_layers} must be >= 1")
    return PenaltyStats(
        mean=torch.zeros(num_layers, dtype=torch.float32, device=device),
        var=torch.zeros(num_layers, dtype=torch.float32, device=device),
        count=torch.zeros(num_layers, dtype=torch.int64, device=device),
        var_weight=torch.zeros(num_layers, dtype=torch.float32, device=device),
    )


def penalty_weights(
    norms: Tensor,
    stats: PenaltyStats,
    cfg: PenaltyConfig,
    step_weights: Tensor | None = None,
    losses: Tensor | None = None,
    second_moment_rms: Tensor | None = None,
    loss_probation: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, PenaltyStats]:
    """Per-worker, per-layer averaging weights of EDiT's pseudo-gradient penalty (Algorithm 2).

    Args:
        norms: [W, L], ``G[w, l] = ||delta_w||`` of layer l (fp32; other float dtypes are cast). Every
            rank must pass identical values (reduce the squared norms over all ranks holding the layer).
        stats: the statistics before this sync (not modified).
        cfg: the penalty options.
        step_weights: optional [W], A-EDiT step-aware averaging (SPEC 2.3): the number of inner steps each
            worker took since the last sync, non-negative and finite. The weights are multiplied by it and
            renormalised over the non-anomalous workers; if that sum is 0 the unmultiplied weights are kept.
        losses: optional [W], each worker's mean training loss since the last sync (NaN: unknown). With
            ``cfg.loss_ratio > 0`` a worker that :func:`loss_outliers` flags is anomalous in every layer.
        loss_probation: optional bool [W], the workers the loss test flagged at the previous sync (held to
            :func:`probation_ratio`; the caller keeps it from sync to sync).
        second_moment_rms: optional [W, L], each worker's inner second-moment RMS per layer. With
            ``cfg.moment_ratio > 0`` a worker that :func:`frozen_outliers` flags is anomalous in that layer.

    Returns:
        weights: fp32 [W, L]; each non-skipped column sums to 1 over the non-anomalous workers, anomalous
            workers have exactly 0, skipped columns are all 0.
        skip: bool [L], True where every worker is anomalous: the layer must skip its outer step.
        anomalous: bool [W, L].
        new_stats: the statistics after this sync.

    Anomaly rule: ``G`` NaN/Inf is anomalous always. Once ``stats.count[l] >= cfg.ewma_warmup`` and
    ``cfg.anomaly_threshold > 0``, worker w is anomalous if ``G - mean > threshold * std`` with
    ``std = max(sqrt(var_debiased), STD_RELATIVE_FLOOR * |mean|, tiny)`` (see PenaltyStats.var_weight):
    a one-sided z-test against the statistics of past syncs (this sync's norms do not affect its own
    test). With ``cfg.peer_ratio > 0`` also :func:`peer_outliers` (two-sided, against the other workers;
    its two-worker case uses the z-test in both directions).

    Temperature (scale-aware): ``weights = softmax(-G / T)`` with ``T = cfg.temperature * mean(G)``, the
    mean over the layer's non-anomalous workers, i.e. ``softmax(-(G / mean(G)) / temperature)``.
    Multiplying every norm of a layer by a constant leaves its weights unchanged, so one temperature
    suits layers of very different sizes and every phase of training. ``temperature = 1``: a worker whose
    norm is one mean above another's gets ``1/e`` of its weight. If every non-anomalous norm is 0 the
    weights are uniform.

    Statistics update: each non-anomalous worker's G is one observation, applied in worker order
    0..W-1. The first observation ever of a layer sets ``mean = G, var = 0``; each later one does
    ``diff = G - mean; incr = alpha * diff; mean += incr; var = (1 - alpha) * (var + diff * incr)``.
    ``count`` grows by 1 for each layer that received at least one observation.

    No host synchronisation: the loop over W is over a Python int; all tensor decisions use
    ``torch.where``.
    """
    if norms.dim() != 2:
        raise ValueError(f"penalty_weights: norms must be [W, L], got shape {tuple(norms.shape)}")
    num_workers, num_layers = norms.shape
    if num_layers != stats.num_layers:
        raise ValueError(f"penalty_weights: norms have {num_layers} layers, stats have {stats.num_layers}")
    norms = norms.to(torch.float32)

    anomalous = ~torch.isfinite(norms)
    if cfg.anomaly_threshold > 0.0:
        tiny = torch.finfo(torch.float32).tiny
        # Bias-corrected variance: var * (1 - alpha) / var_weight is the steady-state EWMA variance.
        debiased = torch.where(stats.var_weight > 0.0,
                               stats.var * (1.0 - cfg.ewma_alpha) / stats.var_weight.clamp_min(tiny), stats.var)
        std = torch.maximum(debiased.clamp_min(0.0).sqrt(), STD_RELATIVE_FLOOR * stats.mean.abs()).clamp_min(tiny)
        past_warmup = stats.count >= cfg.ewma_warmup  # [L]
        # NaN compares False, Inf is already anomalous; the comparison avoids dividing by std.
        outlier = (norms - stats.mean) > cfg.anomaly_threshold * std  # [W, L]
        anomalous = anomalous | (outlier & past_warmup)
        below_history = ((stats.mean - norms) > cfg.anomaly_threshold * std) & past_warmup
    else:
        outlier = below_history = torch.zeros_like(anomalous)
    if cfg.peer_ratio > 0.0:
        anomalous = anomalous | peer_outliers(norms, cfg.peer_ratio, outlier, below_history)
    if cfg.loss_ratio > 0.0 and losses is not None:
        if losses.shape != (num_workers,):
            raise ValueError(f"penalty_weights: losses must be [{num_workers}], got {tuple(losses.shape)}")
        anomalous = anomalous | loss_outliers(losses.to(device=norms.device, dtype=torch.float32),
                                              cfg.loss_ratio, loss_probation).unsqueeze(1)
    if cfg.moment_ratio > 0.0 and second_moment_rms is not None:
        if second_moment_rms.shape != norms.shape:
            raise ValueError(f"penalty_weights: second_moment_rms must be {tuple(norms.shape)}, "
                             f"got {tuple(second_moment_rms.shape)}")
        anomalous = anomalous | frozen_outliers(second_moment_rms.to(device=norms.device, dtype=torch.float32),
                                                cfg.moment_ratio)
    ok = ~anomalous
    num_ok = ok.sum(dim=0)  # [L], int64
    skip = num_ok == 0

    safe_norms = torch.where(ok, norms, torch.zeros_like(norms))  # anomalous entries may be NaN/Inf
    if cfg.weighting == "uniform":
        weights = ok.to(torch.float32) / num_ok.clamp_min(1).to(torch.float32)
    else:
        mean_ok = safe_norms.sum(dim=0) / num_ok.clamp_min(1).to(torch.float32)
        temperature = cfg.temperature * mean_ok
        temperature = torch.where(temperature > 0.0, temperature, torch.ones_like(temperature))
        logits = torch.where(ok, -safe_norms / temperature, torch.full_like(norms, -math.inf))
        # A column with no valid worker would be softmax of all -inf = NaN: give it zeros and mask below.
        logits = torch.where(skip, torch.zeros_like(logits), logits)
        weights = torch.softmax(logits, dim=0)
        weights = torch.where(ok, weights, torch.zeros_like(weights))

    if step_weights is not None:
        if step_weights.shape != (num_workers,):
            raise ValueError(f"penalty_weights: step_weights must be [{num_workers}], got {tuple(step_weights.shape)}")
        scaled = weights * step_weights.to(device=weights.device, dtype=torch.float32).unsqueeze(1)
        total = scaled.sum(dim=0)
        renormalised = scaled / torch.where(total > 0.0, total, torch.ones_like(total))
        weights = torch.where(total > 0.0, renormalised, weights)

    new_stats = _update_stats(safe_norms, ok, stats, cfg.ewma_alpha)
    return weights, skip, anomalous, new_stats


def peer_outliers(norms: Tensor, ratio: float, above_history: Tensor, below_history: Tensor) -> Tensor:
    """bool [W, L]: workers whose norm is an outlier against the workers' median at the same sync.

    Why: the paper's test is one-sided and against the layer's own history, so it misses the failure
    seen most in practice (tools/bench_convergence.py): after a burst of gradient noise a worker's Adam
    second moments blow up and it is nearly frozen, i.e. its pseudo-gradient norm is far *below* the
    others'; and softmax(-G/T) then gives that worker the largest weight. A healthy worker's norm is
    within a few percent of its peers' (same model, same data distribution, same number of steps), so
    a factor R between a worker and the median is a fault whichever way it points, and needs no history
    (it works from the first sync and follows schedule-driven drifts that all workers share).

    Rule, per layer, with ``m`` the median of the n finite norms (the mean of the two middle ones for an
    even n, so that two groups of equal size do not make either side the reference):
    - n >= 3: w is an outlier if ``G_w > R m`` or ``G_w < m / R`` (robust while fewer than half of the
      workers are faulty in the same direction);
    - n == 2: the median cannot say which of two is wrong: w is an outlier only if the history agrees,
      i.e. ``G_w > R m`` and ``above_history``, or ``G_w < m / R`` and ``below_history`` (the z-test of
      :func:`penalty_weights` in that direction). ``m`` is then the pair's mean: a worker is flagged low
      below ``1 / (2R - 1)`` of the other one, high above ``2R - 1`` times it (R > 1 never flags both);
    - n < 2: never.
    Non-finite norms are handled by the caller (always anomalous). No host synchronisation.
    """
    finite = torch.isfinite(norms)
    median, n = median_of_finite(norms)  # [L]
    high = norms > ratio * median
    low = norms * ratio < median
    decisive = (n >= 3).unsqueeze(0)
    return finite & (n >= 2).unsqueeze(0) & (
        (decisive & (high | low)) | (high & above_history) | (low & below_history)
    )


def median_of_finite(values: Tensor) -> tuple[Tensor, Tensor]:
    """(median over dim 0 of the finite entries, their count); even count: the mean of the two middle ones."""
    finite = torch.isfinite(values)
    n = finite.sum(dim=0)
    ordered = torch.where(finite, values, torch.full_like(values, math.inf)).sort(dim=0).values
    lower = ((n - 1).clamp_min(0) // 2).unsqueeze(0)
    upper = (n // 2).clamp(max=values.shape[0] - 1).unsqueeze(0)
    return (ordered.gather(0, lower) + ordered.gather(0, upper)).squeeze(0) / 2.0, n


def probation_ratio(ratio: float) -> float:
    """The loss test's ratio for a worker it flagged at the previous sync: half as far from 1 (1.05 for
    Q = 1.1). See :func:`loss_outliers`."""
    return 1.0 + (ratio - 1.0) / 2.0


def loss_outliers(losses: Tensor, ratio: float, probation: Tensor | None = None) -> Tensor:
    """bool [W]: workers whose mean training loss since the last sync is more than ``ratio`` times above or
    below the median of the workers' losses (finite ones, at least 3; NaN = unknown, never flagged).
    ``probation`` (bool [W]): the workers this test flagged at the previous sync; they are held to
    :func:`probation_ratio` instead.

    Why: a worker training on a bad data shard (random, repeated or mis-tokenized tokens) has ordinary
    pseudo-gradient norms, so no norm test sees it; its loss does. Healthy workers see the same data
    distribution, so their losses over an interval agree closely (within 1.6% in
    tests/test_fault_injection.py with only 256 tokens per worker and interval; the spread shrinks as
    1/sqrt(tokens)); random tokens sit at ln(vocab) (above), a degenerate shard near 0 (far below). Two workers cannot say which one is
    wrong and the loss has no history here, so fewer than 3 finite losses flag nobody. A non-finite
    training loss comes with non-finite pseudo-gradients, which the norm rule already catches.

    Why the probation: a stretch of bad data does not end at a sync. The sync that flags a worker resets
    its parameters (and repairs its inner state), but its data loader stays where it was, so the next
    interval opens with the rest of the stretch and only those steps are bad: 2 of 16 random-token steps
    raised a worker's interval loss to 1.086x and 1.089x the median on norvig-big, 2 repeated-token steps
    to 1.052x, all under Q = 1.1, and averaging those workers in cost up to 0.05 in final validation loss.
    A flat Q low enough to catch them is not: healthy workers' interval losses were up to 1.039x apart
    there (8K tokens per worker and interval). A worker that was just flagged is far more likely to be
    still faulty, so only it is held to the tighter ratio; a healthy worker flagged once by chance passes
    it (its next interval is an ordinary one) and leaves the probation at the next sync.
    """
    median, n = median_of_finite(losses)
    finite = torch.isfinite(losses)
    q = torch.full_like(losses, ratio)
    if probation is not None:
        if probation.shape != losses.shape:
            raise ValueError(f"loss_outliers: probation must be {tuple(losses.shape)}, got {tuple(probation.shape)}")
        q = torch.where(probation.to(losses.device), torch.full_like(losses, probation_ratio(ratio)), q)
    return finite & (n >= 3) & ((losses > q * median) | (losses * q < median))


def frozen_outliers(second_moment_rms: Tensor, ratio: float) -> Tensor:
    """bool [W, L]: workers whose inner optimizer's second-moment RMS in a layer, ``sqrt(mean(v))`` of
    Adam's ``exp_avg_sq``, is more than ``ratio`` times the workers' median (finite ones, at least 3;
    NaN = unknown, e.g. no optimizer state yet, never flagged).

    Why: a burst of huge gradients (gradient noise, a bad batch, a corrupted all-reduce inside the worker)
    raises ``v`` by orders of magnitude, and ``v`` forgets it over ~1 / (1 - beta2) steps (1000 with
    beta2 = 0.999). Until then the worker's updates ``m / sqrt(v)`` are tiny: it is frozen. Its
    pseudo-gradient, though, still holds the burst's own steps (about lr per element, of random sign), so
    its norm is ordinary at the first syncs after the burst, and the norm tests flag it only once it has
    stayed frozen long enough to fall R times below its peers (measured: 36 to 100 iterations after the
    burst). ``v`` shows the fault at the very next sync. Healthy workers' ``v`` agree closely (same model,
    same data distribution, same step count), so a factor M above the median is a fault; only "above"
    counts (a worker with a smaller ``v`` takes larger steps, and the norm tests see that). Two workers
    cannot say which is wrong: fewer than 3 finite values flag nobody. A non-finite ``v`` comes with
    non-finite parameters (``m / sqrt(v)`` is NaN), which the norm rule already catches.
    With the inner-state repair (inner_state_repair.py) the flagged worker also gets its peers' moments,
    so it is unfrozen at that sync instead of ~1000 steps later.
    """
    median, n = median_of_finite(second_moment_rms)
    finite = torch.isfinite(second_moment_rms)
    return finite & (n >= 3).unsqueeze(0) & (second_moment_rms > ratio * median)


def _update_stats(norms: Tensor, ok: Tensor, stats: PenaltyStats, alpha: float) -> PenaltyStats:
    """EWMA update with the non-anomalous norms, in worker order (see :func:`penalty_weights`)."""
    mean = stats.mean.clone()
    var = stats.var.clone()
    var_weight = stats.var_weight.clone()
    seen = stats.count > 0
    for w in range(norms.shape[0]):
        observed = ok[w]
        first = observed & ~seen
        later = observed & seen
        diff = norms[w] - mean
        incr = alpha * diff
        mean = torch.where(first, norms[w], torch.where(later, mean + incr, mean))
        var = torch.where(first, torch.zeros_like(var), torch.where(later, (1.0 - alpha) * (var + diff * incr), var))
        # Each later observation adds alpha * (1 - alpha) of weight to var and decays the old by (1 - alpha).
        var_weight = torch.where(later, (1.0 - alpha) * var_weight + alpha * (1.0 - alpha), var_weight)
        seen = seen | observed
    count = stats.count + ok.any(dim=0).to(stats.count.dtype)
    return PenaltyStats(mean=mean, var=var, count=count, var_weight=var_weight)


def clip_coefficient(norm: Tensor, clip: float | None) -> Tensor:
    """Scale ``min(1, clip / norm)`` for the combined pseudo-gradient of each layer (EDiT Algorithm 2).

    ``norm`` is the [L] (or any shape) norm of the combined delta, identical on every rank. Defined for
    every input so no host check is needed:
    - ``clip is None``: 1.
    - ``norm == 0``: 1 (nothing to clip).
    - ``norm == +Inf``: 0, the limit of ``clip / norm`` (a finite delta whose squared norm overflowed).
    - ``norm`` NaN: 1. A NaN norm means a NaN in the delta, which no scale repairs; the coefficient does
      not hide it. Anomalous workers are masked before combining, so this should not happen.
    """
    norm = norm.to(torch.float32)
    if clip is None:
        return torch.ones_like(norm)
    coefficient = (clip / norm).clamp(max=1.0)  # 0 -> inf -> 1, inf -> 0
    return torch.where(torch.isnan(coefficient), torch.ones_like(coefficient), coefficient)


def weighted_sum_contribution(delta: Tensor, weight: Tensor) -> Tensor:
    """``weight * delta``, but exactly 0 where ``weight == 0`` even if ``delta`` holds NaN or Inf.

    A worker's delta is multiplied by its penalty weight before the cross-worker sum; an anomalous
    worker has weight 0 and possibly NaN/Inf in its delta, and ``0 * NaN`` is NaN. ``weight`` is a
    0-dim tensor (or broadcastable to ``delta``); the result is fp32.
    """
    weight = weight.to(torch.float32)
    product = delta.to(torch.float32) * weight
    return torch.where(weight == 0.0, torch.zeros_like(product), product)
