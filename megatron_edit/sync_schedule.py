"""When to synchronise: warmup, DiLoCo/EDiT step schedule, Streaming DiLoCo fragments, A-EDiT timer.

Small pure functions on Python ints (no process group, no tensors), so tests can table them.

Iteration convention (Megatron's): ``iteration`` is the number of completed optimizer steps, so the
first step finishes with ``iteration == 1``. Every function here answers a question about the step that
has just completed as ``iteration`` (to ask about the next step, pass ``iteration + 1``).

- Warmup (SPEC 2.1): steps 1..K are synchronous data parallel over all D ranks. The anchor is taken when
  ``iteration == K`` steps have completed (with K = 0: before the first step), never earlier: an anchor
  taken at step 0 would make the first outer step drag the model back toward its initialisation.
- Local SGD: step ``iteration`` is local step ``s = iteration - K`` (s >= 1). DiLoCo/EDiT sync after
  every H local steps: ``s % H == 0``. (The original EDiT code compared the warmup gate with the sync
  interval instead of the warmup length; SPEC 8.)
"""
from __future__ import annotations

import time
from typing import Callable

FRAGMENT_PATTERNS: tuple[str, ...] = ("strided", "sequential")
"""Values of ``--streaming-pattern``."""

LAYERS_PER_FRAGMENT = 3
"""Streaming DiLoCo (arXiv 2501.18512, Section 3) fixes the fragment size at about 3 layers."""


# --------------------------------------------------------------------------------------------------
# Warmup and the DiLoCo / EDiT step schedule.


def is_warmup(iteration: int, warmup_iters: int) -> bool:
    """Whether the step completing as ``iteration`` (>= 1) is a synchronous warmup step: 1..K."""
    _check_iteration(iteration)
    _check_warmup(warmup_iters)
    return iteration <= warmup_iters


def is_anchor_iteration(iteration: int, warmup_iters: int) -> bool:
    """Whether the anchor is taken after ``iteration`` completed steps: exactly at the end of warmup.

    ``iteration`` may be 0 here: with ``warmup_iters == 0`` the anchor is the initial model, taken
    before the first step.
    """
    _check_warmup(warmup_iters)
    if iteration < 0:
        raise ValueError(f"iteration {iteration} must be >= 0")
    return iteration == warmup_iters


def is_sync_iteration(iteration: int, warmup_iters: int, interval: int) -> bool:
    """Whether the step completing as ``iteration`` ends with an outer sync (DiLoCo / EDiT, SPEC 2.1).

    True iff ``iteration > K`` and ``(iteration - K) % H == 0``: a sync after every H local steps counted
    from the end of warmup, so the first outer step sees exactly H local steps.
    """
    _check_iteration(iteration)
    _check_warmup(warmup_iters)
    _check_interval(interval)
    local_step = iteration - warmup_iters
    return local_step > 0 and local_step % interval == 0


# --------------------------------------------------------------------------------------------------
# Streaming DiLoCo (arXiv 2501.18512, Section 2.2-2.3): fragments, staggered syncs, overlap.


def default_num_fragments(num_layers: int) -> int:
    """``--streaming-fragments`` default: fragments of about 3 layers, ``max(1, round(num_layers / 3))``."""
    if num_layers < 1:
        raise ValueError(f"--num-layers {num_layers} must be >= 1")
    return max(1, round(num_layers / LAYERS_PER_FRAGMENT))


def assign_layers_to_fragments(num_layers: int, num_fragments: int, pattern: str = "strided") -> list[int]:
    """The fragment id of each transformer layer (0-based layer ids, the full model across PP stages).

    ``"strided"`` (the paper's default, Section 2.2): layer l is in fragment ``l % P``, so every fragment
    spans the depth of the network. ``"sequential"``: contiguous blocks of nearly equal size, the first
    ``num_layers % P`` blocks one layer longer.
    """
    validate_fragments(num_layers, num_fragments, pattern)
    if pattern == "strided":
        return [layer % num_fragments for layer in range(num_layers)]
    base, remainder = divmod(num_layers, num_fragments)
    assignment: list[int] = []
    for fragment in range(num_fragments):
        assignment.extend([fragment] * (base + (1 if fragment < remainder else 0)))
    return assignment


def fragment_of_embedding(num_fragments: int, pattern: str = "strided") -> int:
    """Fragment of the input embedding (and position embedding): the fragment of layer 0, i.e. 0.

    Both patterns put layer 0 in fragment 0, so the embedding syncs with the first layer it feeds.
    """
    if num_fragments < 1:
        raise ValueError(f"--streaming-fragments {num_fragments} must be >= 1")
    _check_pattern(pattern)
    return 0


def fragment_of_output(num_layers: int, num_fragments: int, pattern: str = "strided") -> int:
    """Fragment of the output layer and the final norm: the fragment of the last transformer layer.

    Strided: ``(num_layers - 1) % P``; sequential: ``P - 1``. They sit on the same (last) pipeline stage
    as the last layer. Caution for the caller: with tied input/output embeddings
    (``share_embeddings_and_output_weights``) the output weight IS the embedding weight (on PP > 1, a
    copy kept equal by the embedding group); it must then sync with :func:`fragment_of_embedding`,
    or the copies on the first and last stage diverge.
    """
    return assign_layers_to_fragments(num_layers, num_fragments, pattern)[num_layers - 1]


def fragment_offset(fragment: int, interval: int, num_fragments: int) -> int:
    """``t_p = p * H // P``: evenly spaced sync offsets of the fragments (Section 2.2)."""
    _check_interval(interval)
    _check_num_fragments_vs_interval(num_fragments, interval)
    if not 0 <= fragment < num_fragments:
        raise ValueError(f"fragment {fragment} must be in [0, {num_fragments})")
    return fragment * interval // num_fragments


def fragments_syncing_at(iteration: int, warmup_iters: int, interval: int, num_fragments: int) -> list[int]:
    """Fragments whose sync is launched when the step completing as ``iteration`` ends (ascending ids).

    With local step ``s = iteration - K``, fragment p syncs at ``s = t_p + H, t_p + 2H, ...``, i.e. when
    ``s - t_p > 0`` and ``(s - t_p) % H == 0``. Consequences:
    - every fragment does exactly H inner steps between two of its own syncs;
    - fragment 0 (``t_0 = 0``) syncs at ``s = H, 2H, ...``: exactly :func:`is_sync_iteration`, so
      ``P = 1`` is DiLoCo;
    - fragment p's first pseudo-gradient covers ``H + t_p`` local steps (all fragments start from the
      anchor taken at the end of warmup); the alternative, a first sync at ``s = t_p``, would send a
      pseudo-gradient of only ``t_p < H`` steps. With ``T`` local steps in total, fragment p syncs
      ``(T - t_p) // H`` times.
    - P <= H is required, so the offsets are distinct and no two fragments sync at the same step.
    """
    _check_iteration(iteration)
    _check_warmup(warmup_iters)
    _check_interval(interval)
    _check_num_fragments_vs_interval(num_fragments, interval)
    local_step = iteration - warmup_iters
    syncing = []
    for fragment in range(num_fragments):
        since_offset = local_step - fragment * interval // num_fragments
        if since_offset > 0 and since_offset % interval == 0:
            syncing.append(fragment)
    return syncing


def fragments_merging_at(
    iteration: int, warmup_iters: int, interval: int, num_fragments: int, overlap_steps: int
) -> list[int]:
    """Fragments whose sync, launched ``tau = overlap_steps`` steps earlier, is merged after this step.

    Streaming DiLoCo overlap (Section 2.3): the collective launched after step ``t`` is awaited after step
    ``t + tau``, then the outer step and the merge ``theta = a * theta + (1 - a) * anchor'`` are applied.
    ``tau = 0`` merges in the step that launched it. ``tau < H`` so a fragment never has two syncs in
    flight; different fragments may be in flight at the same time.
    """
    _check_overlap(overlap_steps, interval)
    launched_at = iteration - overlap_steps
    if launched_at < 1:
        return []
    return fragments_syncing_at(launched_at, warmup_iters, interval, num_fragments)


def validate_fragments(num_layers: int, num_fragments: int, pattern: str) -> None:
    """Fragment options: ``1 <= P <= num_layers`` and a known pattern."""
    if num_layers < 1:
        raise ValueError(f"--num-layers {num_layers} must be >= 1")
    if num_fragments < 1:
        raise ValueError(f"--streaming-fragments {num_fragments} must be >= 1")
    if num_fragments > num_layers:
        raise ValueError(f"--streaming-fragments {num_fragments} exceeds --num-layers {num_layers}")
    _check_pattern(pattern)


def validate_streaming_schedule(
    num_layers: int,
    num_fragments: int,
    pattern: str,
    interval: int,
    overlap_steps: int,
    warmup_iters: int = 0,
) -> None:
    """All Streaming DiLoCo schedule options at once (call before building process groups)."""
    _check_warmup(warmup_iters)
    _check_interval(interval)
    validate_fragments(num_layers, num_fragments, pattern)
    _check_num_fragments_vs_interval(num_fragments, interval)
    _check_overlap(overlap_steps, interval)


# --------------------------------------------------------------------------------------------------
# A-EDiT (SPEC 2.3): syncs triggered by wall-clock time.


def should_check(iteration: int, check_every: int) -> bool:
    """Whether the step completing as ``iteration`` runs the (cheap) "time elapsed?" vote.

    The ranks of an A-EDiT worker agree to sync with a MAX all-reduce of :meth:`TimeTrigger.elapsed`;
    doing it every ``check_every`` steps bounds its cost (async_trigger.AsyncSyncController). Every rank
    must call the collective at the same steps, which is why this depends on the step count only, never
    on the clock.
    """
    _check_iteration(iteration)
    if check_every < 1:
        raise ValueError(f"check_every {check_every} must be >= 1")
    return iteration % check_every == 0


class TimeTrigger:
    """True once ``sync_time_s`` seconds have passed since the last :meth:`reset` (A-EDiT, SPEC 2.3).

    Times are Python floats (float64): time held in float32 has a resolution of about 2 minutes at
    Unix-epoch magnitudes (SPEC 8). The clock defaults to ``time.monotonic``, which is not affected by
    wall-clock adjustments. The timer starts at construction; call :meth:`reset` at the end of warmup and
    after each sync.
    """

    should_check = staticmethod(should_check)

    def __init__(self, sync_time_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not sync_time_s > 0.0:
            raise ValueError(f"--local-sgd-sync-time {sync_time_s} must be > 0")
        self.sync_time_s = float(sync_time_s)
        self.clock = clock
        self.last_reset_s = float(clock())

    def reset(self, now: float | None = None) -> None:
        """Restart the interval at ``now`` (default: the clock)."""
        self.last_reset_s = float(self.clock() if now is None else now)

    def seconds_since_reset(self, now: float | None = None) -> float:
        return float(self.clock() if now is None else now) - self.last_reset_s

    def elapsed(self, now: float | None = None) -> bool:
        """Whether at least ``sync_time_s`` seconds have passed since the last reset."""
        return self.seconds_since_reset(now) >= self.sync_time_s


# --------------------------------------------------------------------------------------------------
# Validation helpers: one line naming the flag and the rule.


def _check_iteration(iteration: int) -> None:
    if iteration < 1:
        raise ValueError(
            f"iteration {iteration} must be >= 1 (it counts completed steps; the first step completes as 1)"
        )


def _check_warmup(warmup_iters: int) -> None:
    if warmup_iters < 0:
        raise ValueError(f"--local-sgd-warmup-iters {warmup_iters} must be >= 0")


def _check_interval(interval: int) -> None:
    if interval < 1:
        raise ValueError(f"--local-sgd-sync-interval must be >= 1, got {interval}")


def _check_pattern(pattern: str) -> None:
    if pattern not in FRAGMENT_PATTERNS:
        raise ValueError(f"--streaming-pattern {pattern} is not one of {', '.join(FRAGMENT_PATTERNS)}")


def _check_num_fragments_vs_interval(num_fragments: int, interval: int) -> None:
    if num_fragments < 1:
        raise ValueError(f"--streaming-fragments {num_fragments} must be >= 1")
    if num_fragments > interval:
        raise ValueError(
            f"--streaming-fragments {num_fragments} exceeds --local-sgd-sync-interval {interval} "
            "(fragment offsets p*H//P must be distinct)"
        )


def _check_overlap(overlap_steps: int, interval: int) -> None:
    _check_interval(interval)
    if overlap_steps < 0:
        raise ValueError(f"--streaming-overlap-steps {overlap_steps} must be >= 0")
    if overlap_steps >= interval:
        raise ValueError(f"--streaming-overlap-steps {overlap_steps} must be < --local-sgd-sync-interval {interval}")
