"""Outer-shard space <-> model space, so local-SGD state reshards exactly like the weights.

The local-SGD engine keeps its tensors (anchor, momentum, in-flight reduced pseudo-gradients, error
feedback residuals) per ``OuterShard``: this rank's distributed-optimizer shard of one parameter. A
checkpoint stores them instead with the parameter's own shape, under the parameter's checkpoint key
with a prefix (``local_sgd.anchor.<key>``), and with the same offsets and replica id as the weight
(SPEC 7); then a different TP / PP / data-parallel layout loads them the way megatron-core loads the
weights. megatron-core 0.16.1 refuses ``ShardedTensor.flattened_range``, so the pieces of a worker are
put together first: each rank writes its piece into a zero tensor of the parameter's size and the worker's
ranks sum them (exact: every element has one non-zero contribution). This is the same gather the
distributed optimizer's own ``fully_reshardable`` format does for the Adam moments.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist


def shard_start(shard) -> int:
    """Offset of the shard inside its flattened parameter (the model view shares the param's storage)."""
    return shard.model_view.storage_offset() - shard.model_param.detach().storage_offset()


def ordered_params(model_chunks) -> list[torch.nn.Parameter]:
    """Every parameter of this pipeline stage in a fixed order (the same on the ranks of a worker)."""
    out, seen = [], set()
    for chunk in model_chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def to_model_space(model_chunks, shards, values: list[Optional[torch.Tensor]], group,
                   distributed_optimizer: bool) -> dict:
    """{param: fp32 tensor of the param's shape} from one tensor per shard (None = no value, e.g. a
    shard outside the fragments in flight); only params with a value anywhere in the worker come back.
    Collective over ``group`` (the worker's data-parallel group) with the distributed optimizer."""
    params = ordered_params(model_chunks)
    index = {id(p): i for i, p in enumerate(params)}
    has = torch.zeros(len(params), dtype=torch.float32)
    flats: dict[int, torch.Tensor] = {}
    for s, v in zip(shards, values):
        if v is None:
            continue
        i = index[id(s.model_param)]
        flat = flats.setdefault(i, torch.zeros(s.model_param.numel(), dtype=torch.float32))
        start = shard_start(s)
        flat[start:start + v.numel()] = v.detach().reshape(-1).float().cpu()
        has[i] = 1.0
    if distributed_optimizer and group is not None and group.size() > 1:
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
        present = [i for i in range(len(params)) if has[i] > 0]
        buffer = torch.cat([flats.get(i, torch.zeros(params[i].numel())) for i in present]) if present \
            else torch.zeros(0)
        device = params[0].device if params else torch.device("cpu")
        buffer = buffer.to(device)
        dist.all_reduce(buffer, group=group)
        buffer = buffer.cpu()
        flats, offset = {}, 0
        for i in present:
            n = params[i].numel()
            flats[i] = buffer[offset:offset + n]
            offset += n
    return {params[i]: flat.view(params[i].shape) for i, flat in flats.items()}


def from_model_space(shards, full: dict) -> list[Optional[torch.Tensor]]:
    """Inverse of to_model_space for this rank: each shard's slice (None where the param has no value)."""
    out = []
    for s in shards:
        tensor = full.get(s.model_param)
        if tensor is None:
            out.append(None)
            continue
        start = shard_start(s)
        out.append(tensor.reshape(-1)[start:start + s.main.numel()])
    return out


def sharded_entries(model_sharded_state_dict, values: dict, name: str) -> dict:
    """{str index: ShardedTensor(Factory)} for ``local_sgd.<name>.<key>``: the weight's metadata (shape,
    offsets, replica id, TP split) with our fp32 tensor as data."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    entries = {}
    for i, sh in enumerate(nested_values(model_sharded_state_dict)):
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or sh.data not in values:
            continue
        data = values[sh.data].to(torch.float32)
        kwargs = dict(key=f"local_sgd.{name}.{sh.key}", data=data)
        if isinstance(sh, ShardedTensor):
            kwargs["dtype"] = torch.float32
        entries[str(i)] = (sh.data, replace(sh, **kwargs))
    return entries
