"""Save and load a whole training run with megatron-core dist_checkpointing (torch_dist).

One checkpoint holds:
- common (rank 0; ``common.pt`` before megatron-core 0.19, a ``common_state`` object since): args,
  iteration, LR scheduler, the inner optimizers' param groups and ``megatron_edit``: method, number of
  workers, layout, penalty statistics, streaming fragments in flight, A-EDiT's agreed sample count, the
  fault-injection generator (local_sgd_state.metadata);
- every worker's model and inner optimizer (``fully_reshardable``: model space), keyed per worker
  (worker_keys.py);
- the outer state ``local_sgd.anchor.<key>`` / ``local_sgd.momentum.<key>``, the reduced pseudo-gradients
  of streaming fragments in flight ``local_sgd.inflight.<key>`` and the error-feedback residuals (per
  worker), all in model space (model_space.py), so they reshard like the weights;
- ``megatron_edit.progress`` per worker (iteration = data position, consumed samples, Adam's step) and
  ``megatron_edit.rank_state`` per rank (RNG states, byte counters), loaded only by the same layout.

Saving is collective, happens after an iteration's optimizer step and outer sync, first lands pending
layer-wise updates (as Megatron-LM's disable_forward_pre_hook(param_sync=True) does) and completes the
collectives of fragments in flight (their results are saved; the merge still happens at its iteration).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_edit import mcore_adapter
from megatron_edit.checkpoint import files, local_sgd_state
from megatron_edit.checkpoint.local_sgd_state import LocalSGDPlan
from megatron_edit.checkpoint.worker_keys import rekey_for_worker, source_worker

FORMAT = 1
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Plan:
    """What a save writes, or what a load asks for (decided from the saved metadata)."""

    worker: int  # whose keys: the own worker (save) or the saved worker continued from (load)
    saved_workers: int = 1
    optimizer: bool = True
    same_layout: bool = True
    local_sgd: LocalSGDPlan = field(default_factory=LocalSGDPlan)


def _layout(trainer) -> dict:
    a = trainer.args
    return {"tp": a.tensor_model_parallel_size, "pp": a.pipeline_model_parallel_size,
            "dp": a.data_parallel_size, "chunks": len(trainer.model), "workers": trainer.topology.num_workers}


def _ranks(trainer) -> tuple[int, int, int, int]:
    """(pp, tp, this job's data-parallel rank, rank in the worker). An elastic worker's job holds its own
    data-parallel ranks only (its global data rank is worker x S + this)."""
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            trainer.topology.data_parallel_rank % trainer.args.data_parallel_size,
            trainer.topology.intra_dp_group.rank())


def checkpoint_root(trainer, path: str) -> str:
    """--save / --load as given; an elastic worker (its own job) keeps its checkpoints in worker<I>/ below
    it, so the workers of one run can share the flag."""
    if getattr(trainer, "elastic", None) is not None:
        return os.path.join(path, f"worker{trainer.topology.worker_index}")
    return path


def checkpoint_iteration(trainer) -> int:
    """The directory's iteration: the agreed step count for A-EDiT (workers' own counts differ)."""
    ls = trainer.local_sgd
    if ls is not None and ls.async_ctl is not None and trainer.iteration > ls.cfg.warmup_iters:
        return ls.async_ctl.agreed_samples // trainer.args.global_batch_size
    return trainer.iteration


# ---------------------------------------------------------------- what goes where
def _model_sharded_state_dict(trainer) -> dict:
    if len(trainer.model) == 1:
        return {"model": trainer.model[0].module.sharded_state_dict()}
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(trainer.model)}


def build_state_dict(trainer, plan: Plan, is_loading: bool) -> tuple[dict, dict]:
    """(sharded state dict for dist_checkpointing, {name: {index: param}} to map loaded tensors back)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    topo = trainer.topology
    pp_rank, tp_rank, dp_rank, intra = _ranks(trainer)
    layout = _layout(trainer)
    model_sd = _model_sharded_state_dict(trainer)

    # Local-SGD tensors first: they copy the weights' metadata before it is re-keyed per worker.
    local: dict = {}
    params_of: dict = {}
    if trainer.local_sgd is not None:
        local, params_of = local_sgd_state.sharded_state(trainer.local_sgd, model_sd, plan.local_sgd, plan.worker,
                                                         is_loading)

    per_worker_sd = dict(model_sd)
    if plan.optimizer:
        if is_loading:
            mcore_adapter.init_torch_adam_state(trainer.optimizer)
        mcore_adapter.fix_fully_reshardable_bucket_offsets(trainer.optimizer)
        per_worker_sd["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA))
    rekey_for_worker(per_worker_sd, plan.worker, intra)

    sd = dict(per_worker_sd)
    sd["local_sgd"] = local
    progress = None if is_loading else {
        "iteration": trainer.iteration,
        "consumed_samples": trainer.consumed_samples,
        "optimizer_step": mcore_adapter.inner_optimizer_step(trainer.optimizer),
    }
    if getattr(trainer, "elastic", None) is not None:  # its own directory holds this worker only
        slots, slot = 1, 0
    else:
        slots, slot = (plan.saved_workers if is_loading else topo.num_workers), plan.worker
    sd["progress"] = ShardedObject("megatron_edit.progress", progress, (slots,), (slot,),
                                   replica_id=(pp_rank, tp_rank, intra))
    if plan.same_layout:
        rank_state = None if is_loading else _rank_state(trainer)
        sd["rank_state"] = ShardedObject("megatron_edit.rank_state", rank_state,
                                         (layout["pp"], layout["tp"], layout["dp"]), (pp_rank, tp_rank, dp_rank),
                                         replica_id=0)
    if not is_loading:
        sd.update(_common(trainer, plan))
    return sd, params_of


def _rank_state(trainer) -> dict:
    from megatron.core import tensor_parallel

    ls = trainer.local_sgd
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
        "bytes_sent_total": ls.bytes_sent_total if ls else 0,
        "bytes_sent_measured": ls.bytes_sent_measured if ls else 0,
    }


def _common(trainer, plan: Plan) -> dict:
    ls = trainer.local_sgd
    meta = {"format": FORMAT, "method": None, "layout": _layout(trainer),
            "num_workers": trainer.topology.num_workers, "optimizer": plan.optimizer,
            "outer_state": False, "momentum": False}
    if ls is not None:
        meta.update(local_sgd_state.metadata(ls, plan.local_sgd))
    if getattr(trainer, "elastic", None) is not None:
        meta["torchft"] = trainer.elastic.state_dict()  # torchft's committed step (torchft #277)
    return {
        "checkpoint_version": 3.0,
        "iteration": checkpoint_iteration(trainer),
        "args": trainer.args,
        "opt_param_scheduler": trainer.scheduler.state_dict(),
        "megatron_edit": meta,
    }


# ---------------------------------------------------------------- save
def _distributed_verify(directory: str) -> None:
    """Every rank checks a share of the files against the manifest; all ranks raise the same error."""
    manifest = files.read_manifest(directory)
    if manifest is None:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    try:
        files.verify_files(directory, manifest, sorted(manifest)[rank::world])
    except files.CheckpointError as e:
        error = str(e)
    errors = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise files.CheckpointError(first)


def save_checkpoint(trainer) -> str:
    """Collective. Writes <save>/iter_N atomically (files.py) and returns its path."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(trainer, trainer.args.save)
    iteration = checkpoint_iteration(trainer)
    ls = trainer.local_sgd
    trainer.sync_params_for_reading()
    plan = Plan(worker=trainer.topology.worker_index, saved_workers=trainer.topology.num_workers)
    if ls is not None:
        ls.complete_in_flight()
        plan.local_sgd = local_sgd_state.plan_for_save(ls)
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        files.prepare_partial(root, iteration)
    dist.barrier()
    partial = files.partial_dir(root, iteration)
    sd, _ = build_state_dict(trainer, plan, is_loading=False)
    dist_checkpointing.save(sd, partial, validate_access_integrity=True)
    dist.barrier()
    names = files.checkpoint_files(partial)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: files.digest(os.path.join(partial, n)) for n in names[rank::world]}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        digests = {}
        for part in gathered:
            digests.update(part)
        files.write_manifest(partial, digests)
        files.publish(root, iteration)
    dist.barrier()
    trainer.resume_param_hooks()
    trainer.last_saved_iteration = iteration
    return files.iteration_dir(root, iteration)


# ---------------------------------------------------------------- load
def load_checkpoint(trainer) -> Optional[int]:
    """Collective. Loads the latest checkpoint under --load into the built trainer; returns its
    iteration, or None when the directory holds no checkpoint yet (training starts from scratch)."""
    from megatron.core import dist_checkpointing

    start = time.perf_counter()
    args = trainer.args
    root = checkpoint_root(trainer, args.load)
    iteration = files.read_tracker(root)
    if args.ckpt_step is not None:
        iteration = args.ckpt_step
        if not os.path.isdir(files.iteration_dir(root, iteration)):
            raise files.CheckpointError(f"--ckpt-step {iteration}: {files.iteration_dir(root, iteration)} "
                                        "does not exist")
    if iteration is None:
        if dist.get_rank() == 0:
            print(f" > no checkpoint found in {root} ({files.TRACKER} missing); training from scratch",
                  flush=True)
        return None
    directory = files.iteration_dir(root, iteration)
    _distributed_verify(directory)
    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a broken file
        raise files.CheckpointError(f"{directory}: its common state cannot be read ({e})") from None
    if "megatron_edit" not in common:
        raise files.CheckpointError(
            f"{directory} was not written by megatron_edit's entry (a Megatron-LM training-loop checkpoint: its "
            "iteration, RNG and data position are laid out per Megatron-LM, and a local-SGD one keeps the "
            "workers' state inside its optimizer state): resume it with Megatron-LM's pretrain_gpt.py through "
            "python -m megatron_edit.launch")
    meta = common["megatron_edit"]
    plan = _load_plan(trainer, meta, args)
    sd, params_of = build_state_dict(trainer, plan, is_loading=True)
    try:
        # Not every saved shard is read (fewer workers, another layout): no access-integrity check.
        loaded = dist_checkpointing.load(sd, directory, validate_access_integrity=False)
    except Exception as e:  # noqa: BLE001 - name the checkpoint, keep the cause
        raise files.CheckpointError(f"{directory}: {type(e).__name__}: {e}") from e
    _apply(trainer, plan, meta, common, loaded, params_of)
    if dist.get_rank() == 0:
        saved = meta.get("num_workers", 1)
        note = "" if saved == trainer.topology.num_workers else (
            f"; {saved} saved workers -> {trainer.topology.num_workers}: worker w continues from saved worker "
            f"w mod {saved}")
        print(f" > loaded checkpoint {directory} (iteration {iteration}{note}) in "
              f"{(time.perf_counter() - start) * 1000.0:.1f} ms", flush=True)
    return iteration


def _load_plan(trainer, meta: dict, args) -> Plan:
    ls = trainer.local_sgd
    saved_workers = int(meta.get("num_workers", 1))
    same_layout = meta.get("layout") == _layout(trainer)
    plan = Plan(worker=source_worker(trainer.topology.worker_index, saved_workers), saved_workers=saved_workers,
                optimizer=bool(meta.get("optimizer", True)) and not args.no_load_optim,
                same_layout=same_layout and not args.no_load_rng)
    if ls is not None:
        plan.local_sgd = local_sgd_state.plan_for_load(ls, meta, f"--load {args.load}")
    return plan


def _apply(trainer, plan: Plan, meta: dict, common: dict, loaded: dict, params_of: dict) -> None:
    from megatron.core import tensor_parallel

    for key in [k for k in loaded if k.startswith("model")]:
        index = 0 if key == "model" else int(key[len("model"):])
        trainer.model[index].module.load_state_dict(loaded[key], strict=True)
    progress = loaded["progress"]
    if plan.optimizer:
        mcore_adapter.patch_fully_reshardable_load(trainer.optimizer)
        mcore_adapter.align_saved_param_groups(trainer.optimizer, loaded["optimizer"])
        trainer.optimizer.load_state_dict(loaded["optimizer"])
        if progress.get("optimizer_step") is not None:
            mcore_adapter.set_inner_optimizer_step(trainer.optimizer, progress["optimizer_step"])
    else:
        trainer.optimizer.reload_model_params()
    _load_scheduler(trainer, common["opt_param_scheduler"])
    mcore_adapter.set_param_group_lr_bounds(trainer.optimizer, trainer.scheduler.max_lr, trainer.scheduler.min_lr)
    trainer.iteration = int(progress["iteration"])
    trainer.consumed_samples = int(progress["consumed_samples"])
    if getattr(trainer, "elastic", None) is not None and meta.get("torchft") is not None:
        trainer.elastic.load_state_dict(meta["torchft"])
    if "rank_state" in loaded:
        state = loaded["rank_state"]
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    ls = trainer.local_sgd
    if ls is not None:
        _apply_local_sgd(trainer, ls, plan, meta, loaded, params_of, loaded.get("rank_state"))
    trainer.restart_data(trainer.iteration)


def _load_scheduler(trainer, saved: dict) -> None:
    """Megatron-LM's rule: the checkpoint's LR schedule wins unless --override-opt-param-scheduler; say
    so when the flags disagree, since a longer --train-iters then does not stretch the schedule."""
    flags = trainer.scheduler.state_dict()
    trainer.scheduler.load_state_dict(saved)
    keys = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")
    differ = [f"{k} {saved.get(k)} (flags: {flags.get(k)})" for k in keys if saved.get(k) != flags.get(k)]
    if differ and not trainer.args.override_opt_param_scheduler and dist.get_rank() == 0:
        print(" > LR schedule from the checkpoint: " + ", ".join(differ) +
              "; --override-opt-param-scheduler uses the flags", flush=True)


def _apply_local_sgd(trainer, ls, plan: Plan, meta: dict, loaded: dict, params_of: dict, rank_state) -> None:
    past_warmup = trainer.iteration >= ls.cfg.warmup_iters
    local_sgd_state.apply(ls, plan.local_sgd, meta, loaded["local_sgd"], params_of, past_warmup,
                          announce=dist.get_rank() == 0)
    if rank_state is not None:
        ls.bytes_sent_total = rank_state["bytes_sent_total"]
        ls.bytes_sent_measured = rank_state["bytes_sent_measured"]
    if ls.async_ctl is not None and past_warmup and meta.get("agreed_samples") is not None:
        ls.async_ctl.start(consumed_samples=int(meta["agreed_samples"]))
        trainer.consumed_samples = ls.async_ctl.agreed_samples
