"""The local-SGD part of a checkpoint, whoever runs the training loop.

Shared by megatron_edit's own entry (save_load.py: our checkpoint files) and Megatron-LM's loop
(megatron_lm.py: inside the optimizer's sharded state dict). For one engine (local_sgd.LocalSGD):

- tensors in model space (model_space.py), so they reshard like the weights: the outer state
  ``local_sgd.anchor.<key>`` / ``local_sgd.momentum.<key>``, the reduced pseudo-gradients of streaming
  fragments in flight ``local_sgd.inflight.<key>`` and the error-feedback residuals (per worker:
  ``local_sgd.worker{w}.local_sgd.error_feedback.<key>``);
- metadata (``metadata()``): penalty statistics, the fragments in flight and their skip masks, the unit
  layout and sync schedule, the fault-injection generator, A-EDiT's agreed samples, the loss test's
  per-worker (sum, count) of training losses since the last sync.

What a checkpoint holds is decided by a ``LocalSGDPlan``: at save from the engine (``plan_for_save``,
collective), at load from the saved metadata (``plan_for_load``), so a load asks for exactly what was
saved.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist

from megatron_edit.checkpoint import files
from megatron_edit.checkpoint.model_space import (
    from_model_space,
    ordered_params,
    sharded_entries,
    to_model_space,
)
from megatron_edit.checkpoint.worker_keys import rekey_for_worker

PER_WORKER = {"error_feedback"}


@dataclass
class LocalSGDPlan:
    outer_state: bool = False
    momentum: bool = False
    inflight_units: tuple = ()
    error_feedback_units: tuple = ()

    def names(self) -> list[str]:
        names = []
        if self.outer_state:
            names.append("anchor")
            if self.momentum:
                names.append("momentum")
        if self.inflight_units:
            names.append("inflight")
        if self.error_feedback_units:
            names.append("error_feedback")
        return names


def all_agree(flag: bool, group=None) -> bool:
    """True if any rank says True (a stage with no shards must not disagree on what is saved)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def plan_for_save(ls) -> LocalSGDPlan:
    """Collective. What this engine's state needs saved now (after complete_in_flight())."""
    plan = LocalSGDPlan()
    plan.outer_state = all_agree(bool(ls.shards) and ls.shards[0].anchor is not None)
    plan.momentum = plan.outer_state and ls.with_momentum
    plan.inflight_units = tuple(i for i, u in enumerate(ls.units) if u.launched and u.combined is not None)
    has_residual = any(u.error_feedback is not None and u.error_feedback.residual is not None for u in ls.units)
    plan.error_feedback_units = tuple(range(len(ls.units))) if all_agree(has_residual) else ()
    return plan


def schedule_signature(ls) -> dict:
    c = ls.cfg
    return {"method": c.method, "sync_interval": c.sync_interval, "warmup_iters": c.warmup_iters,
            "fragments": len(ls.units) if ls.streaming else None, "pattern": c.streaming_pattern,
            "overlap": c.streaming_overlap_steps, "layerwise": c.layerwise}


def plan_for_load(ls, meta: dict, where: str) -> LocalSGDPlan:
    """What to ask for, from the saved metadata; CheckpointError (one line) when it cannot continue."""
    plan = LocalSGDPlan(outer_state=bool(meta.get("outer_state")))
    plan.momentum = plan.outer_state and bool(meta.get("momentum")) and ls.with_momentum
    same_units = meta.get("units") == [u.name for u in ls.units]
    if meta.get("inflight"):
        if meta.get("schedule") != schedule_signature(ls) or not same_units:
            raise files.CheckpointError(
                f"{where}: the checkpoint has streaming fragments in flight "
                f"({', '.join(str(u['name']) for u in meta['inflight'])}) and was saved with a different "
                f"sync schedule ({meta.get('schedule')}); resume with the same --local-sgd schedule flags")
        plan.inflight_units = tuple(u["unit"] for u in meta["inflight"])
    if meta.get("error_feedback_units") and ls.cfg.outer_grad_error_feedback and same_units:
        plan.error_feedback_units = tuple(meta["error_feedback_units"])
    return plan


def _unit_values(ls, units: tuple, tensor_of_unit) -> list[torch.Tensor]:
    """Per shard, its slice of a flat per-unit tensor (reduced deltas in flight, error-feedback
    residuals); zeros for shards of other units. Always the whole model: a stacked layer key
    (``decoder.layers.*``) must be covered completely, and zeros are what those units hold in effect
    (no delta in flight; a residual of zero)."""
    by_shard = {}
    for index in units:
        unit = ls.units[index]
        flat = tensor_of_unit(unit)
        offset = 0
        for s in unit.shards:
            n = s.main.numel()
            by_shard[id(s)] = flat[offset:offset + n]
            offset += n
    return [by_shard.get(id(s), torch.zeros(s.main.numel())) for s in ls.shards]


def _residual(unit) -> torch.Tensor:
    residual = unit.error_feedback.residual
    return residual if residual is not None else torch.zeros(unit.numel)


def _values(ls, plan: LocalSGDPlan, is_loading: bool) -> dict[str, dict]:
    """{name: {param: full tensor}}: the local-SGD tensors in model space (a collective over the worker's
    data-parallel group when saving). Loading only needs the shapes: every param of the stage."""
    names = plan.names()
    if is_loading:
        params = ordered_params(ls.model)
        return {n: {p: torch.zeros(p.shape, dtype=torch.float32) for p in params} for n in names}
    values = {
        "anchor": lambda: [s.anchor for s in ls.shards],
        "momentum": lambda: [s.momentum for s in ls.shards],
        "inflight": lambda: _unit_values(ls, plan.inflight_units, lambda u: u.combined),
        "error_feedback": lambda: _unit_values(ls, plan.error_feedback_units, _residual),
    }
    return {n: to_model_space(ls.model, ls.shards, values[n](), ls.topo.intra_dp_group, ls.distributed_optimizer)
            for n in names}


def sharded_state(ls, model_sharded_state_dict: dict, plan: LocalSGDPlan, worker: int,
                  is_loading: bool) -> tuple[dict, dict]:
    """({name: {index: ShardedTensor}}, {name: {index: param}}) for dist_checkpointing. Call before the
    model's entries are re-keyed per worker: ours copy the weights' own keys and metadata."""
    local, params_of = {}, {}
    for name, values in _values(ls, plan, is_loading).items():
        entries = sharded_entries(model_sharded_state_dict, values, name)
        params_of[name] = {k: p for k, (p, _) in entries.items()}
        local[name] = {k: sh for k, (_, sh) in entries.items()}
        if name in PER_WORKER:
            rekey_for_worker(local[name], worker, ls.topo.intra_dp_group.rank())
    return local, params_of


def metadata(ls, plan: LocalSGDPlan) -> dict:
    """What a checkpoint records about the engine besides tensors (identical on every rank)."""
    return dict(
        method=ls.cfg.method, outer_state=plan.outer_state, momentum=plan.momentum,
        penalty_stats={k: v.detach().cpu() for k, v in ls.stats.state_dict().items()},
        loss_probation=ls.loss_probation.detach().cpu(),
        inflight=[{"unit": i, "name": ls.units[i].name, "advanced": ls.units[i].advanced,
                   "skip": ls.units[i].skip.detach().cpu()} for i in plan.inflight_units],
        error_feedback_units=list(plan.error_feedback_units),
        units=[u.name for u in ls.units],
        schedule=schedule_signature(ls),
        corrupt_generator=ls._corrupt_gen.get_state(),
        agreed_samples=ls.async_ctl.agreed_samples if ls.async_ctl is not None else None,
        losses_since_sync=ls.losses_since_sync().cpu() if ls.loss_test else None,  # collective
    )


def apply(ls, plan: LocalSGDPlan, meta: dict, loaded: dict, params_of: dict, past_warmup: bool,
          announce: bool) -> None:
    """Into the engine, after the params and inner optimizer were loaded. ``loaded``: the loaded
    {name: {index: tensor}} of sharded_state. Past warmup the anchor is first re-taken from the loaded
    params (the engine's was taken before the load); the saved outer state then overwrites it."""
    from megatron_edit.outer_state import init_outer_state

    def shard_values(name):
        full = {params_of[name][k]: t for k, t in loaded[name].items()}
        return from_model_space(ls.shards, full)

    def unit_flats(name) -> dict:
        """{unit index: flat per-unit tensor on the engine's device} (inverse of _unit_values)."""
        by_shard = {id(s): v for s, v in zip(ls.shards, shard_values(name))}
        return {i: torch.cat([by_shard[id(s)].reshape(-1) for s in u.shards] or [torch.zeros(0)]).to(ls.device)
                for i, u in enumerate(ls.units)}

    if past_warmup:
        init_outer_state(ls.shards, ls.with_momentum, ls.cfg.offload_outer_state)
    if plan.outer_state:
        for s, value in zip(ls.shards, shard_values("anchor")):
            s.anchor.copy_(value.view_as(s.anchor))
        if plan.momentum:
            for s, value in zip(ls.shards, shard_values("momentum")):
                s.momentum.copy_(value.view_as(s.momentum))
    elif past_warmup and announce:
        print(" > the checkpoint has no outer state: the anchor starts from the loaded parameters", flush=True)
    if meta.get("penalty_stats") is not None:
        ls.stats.load_state_dict({k: v.to(ls.device) for k, v in meta["penalty_stats"].items()})
    probation = meta.get("loss_probation")  # absent in checkpoints of before the probation: nobody
    if probation is not None and probation.shape == ls.loss_probation.shape:
        ls.loss_probation.copy_(probation)
    if meta.get("corrupt_generator") is not None:
        ls._corrupt_gen.set_state(meta["corrupt_generator"])
    saved_losses = meta.get("losses_since_sync")
    if ls.loss_test and saved_losses is not None and saved_losses.shape[0] == ls.topo.num_workers:
        ls.restore_losses_since_sync(saved_losses)
    if plan.inflight_units:
        flats = unit_flats("inflight")
        for record in meta["inflight"]:
            unit = ls.units[record["unit"]]
            unit.combined = flats[record["unit"]]
            unit.launched = unit.pending = True
            unit.advanced = bool(record["advanced"])
            unit.handle = None
            unit.skip = record["skip"].to(ls.device)
    if plan.error_feedback_units:
        flats = unit_flats("error_feedback")
        for index in plan.error_feedback_units:
            ls.units[index].error_feedback.residual = flats[index]
