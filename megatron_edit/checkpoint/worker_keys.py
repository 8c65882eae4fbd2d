"""Per-worker checkpoint keys: how every worker's inner state is kept (SPEC 7).

megatron-core derives replica ids from the global data-parallel rank, so only worker 0 would ever write
model weights and Adam moments; between syncs the workers differ and a resume from worker 0's copy is
not the run that was saved. We keep each worker's inner state instead:

- worker 0 under megatron-core's own keys (``decoder.layers.0...``, ``optimizer.state.exp_avg....``), so
  a run without ``--local-sgd`` (or Megatron-LM) loads it as an ordinary checkpoint;
- worker w > 0 under ``local_sgd.worker{w}.<key>``;
- the data-parallel entry of every replica id re-based on the worker's own data-parallel group, so the
  first rank of each worker writes that worker's copy exactly once.

A checkpoint of W_old workers loaded by W_new workers: new worker w continues from old worker
``w % W_old`` (its params and inner optimizer state).
"""
from __future__ import annotations

from typing import Any


def worker_prefix(worker: int) -> str:
    return "" if worker == 0 else f"local_sgd.worker{worker}."


def source_worker(worker: int, saved_workers: int) -> int:
    """Which saved worker a (possibly differently sized) set of workers continues from."""
    return worker % max(1, saved_workers)


def _sharded_objects(tree: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    seen = set()
    for value in nested_values(tree):
        if isinstance(value, ShardedBase) and id(value) not in seen:
            seen.add(id(value))
            yield value


def rekey_for_worker(tree: Any, worker: int, intra_dp_rank: int) -> None:
    """In place: prefix the keys with the worker's, replica ids' data-parallel entry := intra_dp_rank."""
    prefix = worker_prefix(worker)
    for obj in _sharded_objects(tree):
        if prefix:
            obj.key = prefix + obj.key
        replica = obj.replica_id
        if isinstance(replica, tuple) and replica:
            obj.replica_id = (*replica[:-1], intra_dp_rank)
        elif isinstance(replica, int):
            obj.replica_id = intra_dp_rank if replica == 0 else replica
