"""The one seam through which a sync talks to the other workers.

Two transports, chosen once when the engine is built:

- ``ProcessGroupTransport``: workers inside one job (SPEC section 1). megatron-core's inter-instance group
  links the W ranks that hold the same shard; a dead rank stops the job, as in synchronous training.
- ``TorchftTransport``: each worker is its own job (SPEC section 10, ``--local-sgd-fault-tolerance``).
  The same W-rank links are a torchft ``ProcessGroupGloo``/``NCCL`` that its ``Manager`` reconfigures at
  every quorum; the members of a sync are whoever is in that quorum. torchft only makes all-reduce fault
  tolerant (``Manager.allreduce``: errors are recorded, not raised, and ``should_commit`` turns them into
  "do not apply"), so every collective here is an all-reduce: a gather is a SUM of rows that are zero
  except the sender's own.

The engine calls, per sync: ``begin_sync`` (a quorum: may heal this worker from a live peer), then any
number of ``gather_rows`` / ``launch_sum`` in the same order on every member, then ``commit`` before it
applies anything. In-job the quorum is everybody and the commit always succeeds.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_edit.quantized_collectives import REDUCE_SCATTER, launch_quantized_all_reduce_mean, predicted_bytes_sent


class ProcessGroupTransport:
    """In-job workers: a plain torch.distributed group (None with one worker)."""

    fault_tolerant = False

    def __init__(self, group: Optional[dist.ProcessGroup], num_workers: int, worker_index: int):
        self.group = group
        self.num_workers = num_workers
        self.worker_index = worker_index

    def begin_sync(self) -> None:
        pass

    def commit(self) -> bool:
        return True

    def gather_rows(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([W, n] every worker's ``local`` by worker index, bool [W] present: all True in-job)."""
        out = torch.zeros(self.num_workers * local.numel(), dtype=local.dtype, device=local.device)
        if self.group is not None:
            dist.all_gather_into_tensor(out, local, group=self.group)
        else:
            out.copy_(local)
        return out.view(self.num_workers, -1), torch.ones(self.num_workers, dtype=torch.bool)

    def launch_sum(self, buffer: torch.Tensor, wire_format: str, block_size: int, error_feedback=None,
                   stochastic: bool = False, generator: Optional[torch.Generator] = None,
                   algorithm: str = REDUCE_SCATTER):
        """Start the in-place SUM of every worker's (already weighted) contribution; ``.wait()`` returns it.
        ``algorithm`` picks how a quantized wire reduces (quantized_collectives' module docstring)."""
        return launch_quantized_all_reduce_mean(
            buffer, self.group, wire_format, block_size, weight=1.0, divisor=1.0, algorithm=algorithm,
            error_feedback=error_feedback, inplace=True, stochastic=stochastic, generator=generator)

    def predicted_bytes(self, numel: int, wire_format: str, block_size: int, algorithm: str = REDUCE_SCATTER) -> int:
        if self.group is None:
            return 0
        return predicted_bytes_sent(numel, self.group.size(), self.group.rank(), wire_format, block_size, algorithm)

    def peers(self) -> int:
        """Other workers a gather row goes to (log line byte counts)."""
        return 0 if self.group is None else self.group.size() - 1


class _ManagedSum:
    """A torchft Manager all-reduce (SUM, fp32) behind the handle interface of quantized_collectives."""

    def __init__(self, work, buffer: torch.Tensor, bytes_sent: int):
        self.work, self.buffer, self.bytes_sent = work, buffer, bytes_sent
        self.waited_seconds = 0.0

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        import time

        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            self.waited_seconds += time.perf_counter() - start
            self.work = None
        return self.buffer


class TorchftTransport:
    """Cross-worker traffic through a torchft ``Manager`` (see the module docstring).

    ``contributing`` is False for a sync in which this worker only receives: it has just healed from a
    peer, so its pseudo-gradient is zero and it must not count in the mean (weights are renormalised over
    the workers whose row says present)."""

    fault_tolerant = True

    def __init__(self, manager, num_workers: int, worker_index: int):
        self.manager = manager
        self.num_workers = num_workers
        self.worker_index = worker_index
        self.contributing = True
        self.after_quorum = None  # fault_tolerance.ElasticWorker.check_members

    def begin_sync(self) -> None:
        """A quorum of whoever reaches this sync; torchft heals this worker inside it if it is behind."""
        self.manager.start_quorum()
        if self.after_quorum is not None:
            self.after_quorum()

    def commit(self) -> bool:
        return bool(self.manager.should_commit())

    def _sum_(self, tensor: torch.Tensor) -> None:
        from torch.distributed import ReduceOp

        self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()

    def gather_slots(self, local: torch.Tensor, slot: int, num_slots: int) -> torch.Tensor:
        """[num_slots, n]: row ``slot`` is this member's ``local``, the others' rows theirs (a SUM of
        otherwise-zero rows; float64 keeps integers up to 2**53 exact)."""
        rows = torch.zeros(num_slots, local.numel(), dtype=local.dtype, device=local.device)
        rows[slot] = local
        self._sum_(rows)
        return rows

    def gather_rows(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([W, n] by worker index, bool [W] present). A slot nobody filled, or filled by a worker that
        only receives this sync, is absent."""
        with_flag = torch.cat([local, torch.ones(1, dtype=local.dtype, device=local.device)])
        if not self.contributing:
            with_flag.zero_()
        rows = self.gather_slots(with_flag, self.worker_index, self.num_workers)
        return rows[:, :-1], (rows[:, -1] == 1).cpu()

    def launch_sum(self, buffer: torch.Tensor, wire_format: str, block_size: int, error_feedback=None,
                   stochastic: bool = False, generator: Optional[torch.Generator] = None,
                   algorithm: str = REDUCE_SCATTER):
        from torch.distributed import ReduceOp

        if wire_format != "fp32":  # refused by the config; a second line of defence
            raise ValueError("torchft transport carries fp32 pseudo-gradients only")
        buffer.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite worker has weight 0
        work = self.manager.allreduce(buffer, reduce_op=ReduceOp.SUM)
        return _ManagedSum(work, buffer, self.predicted_bytes(buffer.numel(), wire_format, block_size))

    def predicted_bytes(self, numel: int, wire_format: str, block_size: int, algorithm: str = REDUCE_SCATTER) -> int:
        """fp32 only: ``algorithm`` does not apply (an fp32 sum is one all-reduce)."""
        members = max(self.manager.num_participants(), 1)
        return predicted_bytes_sent(numel, members, 0, wire_format, block_size)

    def peers(self) -> int:
        return max(self.manager.num_participants() - 1, 0)
