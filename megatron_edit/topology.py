"""Workers as megatron-core distributed-optimizer instances (SPEC section 1).

World = TP x PP x CP x D. The D data-parallel ranks form W workers of S = D / W consecutive DP ranks.
megatron-core builds the groups we need when told ``num_distributed_optimizer_instances=W``: the
intra-instance DP group (a worker's S ranks of one TP/PP slice) and the inter-instance group (the W ranks
holding the same shard of the same slice: one all-reduce per shard, never a full-model gather). Stock
megatron-core would all-reduce over the inter group every step; we hand DDP and the optimizer a group
collection whose data-parallel groups *are* the intra group, so inner steps stay inside the worker.

We add two groups megatron-core does not have: the whole worker (all its TP x PP x S ranks: per-layer
pseudo-gradient norms are summed there) and the worker's pipeline stage (TP x S ranks of one stage:
per-bucket norms during the layer-wise sync, which must not wait for other stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_edit import mcore_adapter


@dataclass
class WorkerTopology:
    """Everything the local-SGD code needs to know about where this rank sits."""

    num_workers: int
    worker_index: int
    ranks_per_worker_slice: int  # S: DP ranks per worker
    data_parallel_size: int  # D, the global DP size (data loading keeps the global DP rank)
    data_parallel_rank: int
    intra_dp_group: Optional[dist.ProcessGroup]  # S ranks: gradient reduce-scatter / distopt shards
    inter_worker_group: Optional[dist.ProcessGroup]  # W ranks: same shard, different worker
    worker_group: Optional[dist.ProcessGroup]  # all ranks of this worker
    worker_stage_group: Optional[dist.ProcessGroup]  # this worker's ranks of this pipeline stage
    full_dp_group: Optional[dist.ProcessGroup]  # all D ranks (logging and synchronous warmup)

    @property
    def local_sgd(self) -> bool:
        return self.num_workers > 1


def initialize_parallel_state(args, num_workers: int, backend_timeout_minutes: int = 30) -> None:
    """megatron-core's groups with W distributed-optimizer instances (so the intra/inter groups exist)."""
    from megatron.core import parallel_state

    order = "tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp"
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        vpp = args.num_layers // args.pipeline_model_parallel_size // args.num_layers_per_virtual_pipeline_stage
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=args.context_parallel_size,
        num_distributed_optimizer_instances=num_workers,
        distributed_timeout_minutes=backend_timeout_minutes,
        order=order,
        create_gloo_process_groups=False,
    )


def _new_groups_by_key(key: tuple) -> Optional[dist.ProcessGroup]:
    """Every rank calls new_group for every distinct key in the same order; returns this rank's group."""
    world = dist.get_world_size()
    keys: list = [None] * world
    dist.all_gather_object(keys, key)
    mine = None
    for k in sorted(set(keys)):
        ranks = [r for r in range(world) if keys[r] == k]
        group = dist.new_group(ranks)
        if k == key:
            mine = group
    return mine


def build_worker_topology(num_workers: int) -> WorkerTopology:
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    per_worker = dp_size // num_workers
    worker = dp_rank // per_worker
    intra = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
    inter = ps.get_inter_distributed_optimizer_instance_group() if num_workers > 1 else None
    worker_group = _new_groups_by_key((worker,))
    stage_group = _new_groups_by_key((worker, ps.get_pipeline_model_parallel_rank()))
    topo = WorkerTopology(
        num_workers=num_workers,
        worker_index=worker,
        ranks_per_worker_slice=per_worker,
        data_parallel_size=dp_size,
        data_parallel_rank=dp_rank,
        intra_dp_group=intra,
        inter_worker_group=inter,
        worker_group=worker_group,
        worker_stage_group=stage_group,
        full_dp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )
    assert intra.size() == per_worker, (intra.size(), per_worker)
    return topo


def worker_process_groups(topology: WorkerTopology):
    """The ProcessGroupCollection DDP and get_megatron_optimizer get: data-parallel = the worker.

    DDP scales gradients by 1/dp_cp_group.size() (distributed_data_parallel.py, 0.16.1), so with the
    intra group here the inner gradient is the mean over the worker's S ranks, not over all D.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection.use_mpu_process_groups()
    intra = topology.intra_dp_group
    pgc.dp = intra
    pgc.dp_cp = intra
    pgc.intra_dp_cp = intra
    expert_intra = ps.get_expert_data_parallel_group(check_initialized=False, partial_expert_data_parallel=True)
    if expert_intra is not None:
        pgc.expt_dp = expert_intra
        pgc.intra_expt_dp = expert_intra
    mcore_adapter.set_worker_data_parallel_groups_gtp(pgc, intra, expert_intra)
    return pgc


def all_reduce_mean_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
    """In-place mean over a group (gloo has no AVG)."""
    if group is None or group.size() == 1:
        return
    dist.all_reduce(tensor, group=group)
    tensor.div_(group.size())


def as_elastic_worker(topology: WorkerTopology, num_workers: int, worker_index: int) -> WorkerTopology:
    """Elastic workers (fault_tolerance.py): this job is worker ``worker_index`` of ``num_workers``. Its
    megatron-core groups are its own; data are read as the global data-parallel rank would read them in
    one job (worker-major), and the cross-worker link is the torchft transport, not a group."""
    import dataclasses

    per_worker = topology.data_parallel_size
    return dataclasses.replace(
        topology, num_workers=num_workers, worker_index=worker_index, ranks_per_worker_slice=per_worker,
        data_parallel_size=per_worker * num_workers,
        data_parallel_rank=worker_index * per_worker + topology.data_parallel_rank,
        inter_worker_group=None,
    )
