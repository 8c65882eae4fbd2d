"""The outer state (anchor, outer momentum) of every fp32 main-param shard this rank owns.

Shards are taken from the inner optimizer itself, so they are exactly the distributed optimizer's
sharding (per rank: 2 x its own shard, fp32, nothing replicated). Each ``OuterShard`` also records which
"layer" the parameter belongs to (the penalty is per layer), which DDP bucket group it is gathered with
(the layer-wise sync works per bucket group) and whether it counts towards norms (TP duplicates and the
tied output-embedding copy must not be counted twice).

Layer keys: 0 word embeddings (and the tied output weight), 1 position embeddings, 2 + l transformer
layer l (global numbering), num_layers + 2 final norm and untied output layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_edit import mcore_adapter


def num_layer_keys(num_layers: int) -> int:
    return num_layers + 3


def layer_key(global_name: str, num_layers: int) -> int:
    if global_name.startswith("embedding.word_embeddings"):
        return 0
    if global_name.startswith("embedding.position_embeddings"):
        return 1
    if global_name.startswith("decoder.layers."):
        return 2 + int(global_name.split(".")[2])
    return num_layers + 2


def layer_key_name(key: int, num_layers: int) -> str:
    if key == 0:
        return "embedding"
    if key == 1:
        return "position-embedding"
    if key == num_layers + 2:
        return "output"
    return f"layer{key - 2}"


@dataclass
class OuterShard:
    model_param: torch.nn.Parameter
    main: torch.Tensor  # fp32 main shard the inner optimizer updates
    model_view: torch.Tensor  # the region of the model param that `main` mirrors (bf16 or fp32)
    key: int
    chunk: int
    bucket_group: Any
    count_in_worker_norm: bool
    count_in_stage_norm: bool
    anchor: Optional[torch.Tensor] = None
    momentum: Optional[torch.Tensor] = None


def _named_params(model_chunks):
    """(chunk index, param, global name, is the tied output copy) for every model parameter."""
    from megatron_edit.training.model import global_param_name, unwrap

    for c, chunk in enumerate(model_chunks):
        inner = unwrap(chunk)
        for local_name, p in inner.named_parameters():
            name = global_param_name(inner, local_name)
            tied_copy = getattr(p, "shared", False) and getattr(p, "shared_embedding", False)
            if tied_copy or (local_name == "output_layer.weight" and inner.share_embeddings_and_output_weights):
                name = "embedding.word_embeddings.weight"
            yield c, p, name, tied_copy


def param_layer_keys(model_chunks, num_layers: int) -> dict:
    return {p: layer_key(name, num_layers) for _, p, name, _ in _named_params(model_chunks)}


def collect_outer_shards(model_chunks, optimizer, num_layers: int, tp_rank: int, intra_dp_rank: int,
                         distributed_optimizer: bool) -> list[OuterShard]:
    """One record per (model param, main shard) pair of this rank, in a fixed order on every rank."""
    bucket_group_of = [mcore_adapter.param_to_bucket_group(chunk) for chunk in model_chunks]
    info = {}
    for c, p, name, tied_copy in _named_params(model_chunks):
        info[p] = (c, name, bucket_group_of[c].get(p), tied_copy)
    shards = []
    for model_param, main, view in mcore_adapter.main_param_pairs(optimizer):
        c, name, bucket_group, tied_copy = info[model_param]
        tp_duplicate = not getattr(model_param, "tensor_model_parallel", False) and tp_rank != 0
        replicated = not distributed_optimizer and intra_dp_rank != 0
        counted = not tp_duplicate and not replicated
        shards.append(OuterShard(
            model_param=model_param, main=main, model_view=view, key=layer_key(name, num_layers), chunk=c,
            bucket_group=bucket_group, count_in_worker_norm=counted and not tied_copy,
            count_in_stage_norm=counted,
        ))
    return shards


def init_outer_state(shards: list[OuterShard], with_momentum: bool, offload: bool) -> None:
    """anchor = current main params (fp32 copy), momentum = 0; in pinned CPU memory when offloaded."""
    for s in shards:
        device = torch.device("cpu") if offload else s.main.device
        pin = offload and torch.cuda.is_available()
        s.anchor = torch.empty(s.main.shape, dtype=torch.float32, device=device, pin_memory=pin)
        s.anchor.copy_(s.main.detach())
        if with_momentum:
            s.momentum = torch.zeros(s.main.shape, dtype=torch.float32, device=device, pin_memory=pin)


def outer_state_bytes(shards: list[OuterShard]) -> int:
    total = 0
    for s in shards:
        for t in (s.anchor, s.momentum):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


class OuterStateStaging:
    """Offloaded outer state (``--local-sgd-offload-outer-state``, SPEC 2.2): anchor and momentum live in
    pinned host memory; a unit's are brought to the device a unit ahead of its launch and written back
    after its outer step, so the device holds the outer state of the few units in flight, not a stage's.

    On CUDA both copies run on a side stream, ordered by events and never by the host: the host-to-device
    copy (``non_blocking`` from pinned memory) records an event the compute stream waits for before the
    staged tensors are read; the device-to-host copy starts after an event recorded on the compute stream
    when the outer step was enqueued, and the staged tensors stay alive until its own event completes. The
    next sync (and a checkpoint) first waits for the write-backs (``settle``). Without CUDA (gloo tests,
    CPU runs) the same code path does plain copies, so training is bitwise the same as without offload.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._releasing: list = []  # (event, staged tensors) of write-backs in flight

    def stage(self, unit) -> None:
        """Start bringing the unit's anchor and momentum to the device (no-op if already there)."""
        if unit.staged is not None:
            return

        def copy(t):
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=self.device).copy_(
                t, non_blocking=True)

        if not self.cuda:
            unit.staged = ([(copy(s.anchor), copy(s.momentum)) for s in unit.shards], None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            tensors = [(copy(s.anchor), copy(s.momentum)) for s in unit.shards]
            ready = torch.cuda.Event()
            ready.record(self.stream)
        unit.staged = (tensors, ready)

    def tensors(self, unit, position: int):
        """The unit's staged (anchor, momentum) of shard ``position``; the compute stream waits for them."""
        if unit.staged is None:
            self.stage(unit)
        tensors, ready = unit.staged
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for pair in tensors:
                for t in pair:
                    if t is not None:
                        t.record_stream(current)  # allocated on the side stream, used on this one
            unit.staged = (tensors, None)
        return tensors[position]

    def unstage(self, unit) -> None:
        """Write the unit's updated anchor and momentum back to host memory and drop the device copies."""
        if unit.staged is None:
            return
        tensors, _ = unit.staged
        unit.staged = None
        if not self.cuda:
            for s, (anchor, momentum) in zip(unit.shards, tensors):
                s.anchor.copy_(anchor)
                if momentum is not None:
                    s.momentum.copy_(momentum)
            return
        updated = torch.cuda.Event()
        updated.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(updated)
            for s, (anchor, momentum) in zip(unit.shards, tensors):
                s.anchor.copy_(anchor, non_blocking=True)
                if momentum is not None:
                    s.momentum.copy_(momentum, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self._releasing = [(e, t) for e, t in self._releasing if not e.query()] + [(copied, tensors)]

    def settle(self, host: bool = False) -> None:
        """Order everything after the write-backs in flight: the compute stream waits for them (the next
        sync reads the host copies through it); ``host``: the host waits too (a checkpoint reads them)."""
        if not self.cuda:
            return
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if host:
            self.stream.synchronize()
        self._releasing = []
