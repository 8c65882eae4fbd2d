"""A-EDiT's time-based sync trigger (EDiT paper, Section 3.3; SPEC 2.3).

Workers run at their own speed and sync once ``sync_time`` seconds have passed since the last sync, so a
fast worker does more inner steps than a slow one. Agreement without hangs:
- inside a worker every rank must decide on the same step: a MAX all-reduce of the "elapsed" flag over
  the worker's ranks (the worker is in lockstep anyway), every k inner steps (``sync_check_every``),
  not every step: each vote costs a small collective and a host sync (``.item()``), which on a GPU stalls
  the launch queue. k comes from the step time voted with the flag (the slowest rank's), so that a sync
  starts at most ~5% of the sync time late; ``--local-sgd-sync-check-interval`` fixes it. Every rank of
  a worker counts the same inner steps and sees the same voted step time, so all vote at the same steps.
  The token budget needs no vote: every rank of a worker has the same step count;
- across workers no per-step collective is needed (it would tie the fast worker to the slow one): every
  worker's clock restarts when the previous sync's collectives complete, so each worker enters the next
  sync's collectives when its own clock runs out, at most one slow step after the others. No worker can
  be left blocked: each clock always runs out, and the budget check at a sync is agreed by all.
At each sync the workers exchange how many inner steps they took (float64 on the host; step-aware
averaging may weight pseudo-gradients by them) and whether they reached the budget. Consumed samples
are agreed there, so the LR schedule follows the same count on every worker.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_edit.sync_schedule import TimeTrigger, should_check

MAX_CHECK_INTERVAL = 64
LATENESS_FRACTION = 0.05  # a sync may start this fraction of the sync time late (derived check interval)


def sync_check_every(sync_time_s: float, step_seconds: float, fraction: float = LATENESS_FRACTION,
                     cap: int = MAX_CHECK_INTERVAL) -> int:
    """Inner steps between votes so that a sync starts at most ``fraction * sync_time_s`` late:
    floor(fraction * sync_time / step_time), at least 1, at most ``cap``."""
    if not step_seconds > 0:
        return 1
    return int(max(1, min(cap, (fraction * sync_time_s) // step_seconds)))


class AsyncSyncController:
    def __init__(self, sync_time_s: float, num_workers: int, worker_index: int, global_batch_size: int,
                 budget_samples: int, worker_group, inter_worker_group,
                 device: torch.device, clock: Callable[[], float] = time.monotonic, check_interval: Optional[int] = None):
        self.trigger = TimeTrigger(sync_time_s, clock)
        self.sync_time_s = sync_time_s
        self.fixed_check_interval = check_interval
        self.check_interval = check_interval or 1  # until a step time has been voted
        self.votes = 0
        self.num_workers = num_workers
        self.worker_index = worker_index
        self.samples_per_worker_step = global_batch_size // num_workers
        self.global_batch_size = global_batch_size
        self.budget_samples = budget_samples
        self.worker_group = worker_group
        self.inter_worker_group = inter_worker_group
        self.clock = clock
        self.device = device
        self.steps_since_sync = 0
        self.agreed_samples = 0  # consumed samples agreed at the last sync (all workers)
        self.stop_requested = False
        self.last_steps_per_worker: list[int] = []
        self._step_start = clock()

    def start(self, consumed_samples: int) -> None:
        """End of warmup: the agreed count so far, and the first interval starts now."""
        self.agreed_samples = consumed_samples
        self.steps_since_sync = 0
        self.trigger.reset()
        self._step_start = self.clock()

    @property
    def estimated_samples(self) -> int:
        """This worker's view of the global count: as if every worker had kept its pace."""
        return self.agreed_samples + self.steps_since_sync * self.global_batch_size

    def after_inner_step(self) -> bool:
        """Count the step and return whether this worker enters a sync now (the same answer on every rank
        of the worker). A simulated straggler (fault_injection.SlowWorker) has slept already."""
        self.steps_since_sync += 1
        now = self.clock()
        step_seconds, self._step_start = now - self._step_start, now
        if self.estimated_samples >= self.budget_samples:
            return True  # the same on every rank of the worker: no vote needed
        if not should_check(self.steps_since_sync, self.check_interval):
            return False
        vote = torch.tensor([1.0 if self.trigger.elapsed() else 0.0, step_seconds], dtype=torch.float64,
                            device=self.device)
        if self.worker_group is not None and self.worker_group.size() > 1:
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.worker_group)
        elapsed, slowest_step = vote.tolist()
        self.votes += 1
        if self.fixed_check_interval is None:
            self.check_interval = sync_check_every(self.sync_time_s, slowest_step)
        return elapsed > 0

    def exchange(self) -> torch.Tensor:
        """At a sync: every worker's inner steps since the last sync; updates the agreed sample count and
        decides (identically everywhere) whether the run ends at this sync."""
        mine = torch.tensor([float(self.steps_since_sync)], dtype=torch.float64, device=self.device)
        steps = torch.zeros(self.num_workers, dtype=torch.float64, device=self.device)
        if self.inter_worker_group is not None:
            dist.all_gather_into_tensor(steps, mine, group=self.inter_worker_group)
        else:
            steps.copy_(mine)
        self.last_steps_per_worker = [int(s) for s in steps.cpu().tolist()]
        self.agreed_samples += int(sum(self.last_steps_per_worker)) * self.samples_per_worker_step
        self.stop_requested = self.agreed_samples >= self.budget_samples
        self.steps_since_sync = 0
        return steps.float()  # on self.device, like the norms it weights

    def restart_clock(self) -> None:
        """After the sync's collectives: every worker's next interval starts (almost) together."""
        self.trigger.reset()
        self._step_start = self.clock()
