"""Local-SGD state in Megatron-LM's own checkpoints: ``--save`` / ``--load`` of its training loop.

Megatron-LM's ``save_checkpoint`` builds one sharded state dict: the model's (``model`` / ``model<i>``)
and then ``optimizer.sharded_state_dict(state_dict, metadata=...)``, handed the whole dict so far as the
model part; ``load_checkpoint`` builds the same with ``is_loading=True``, loads it with
dist_checkpointing and gives ``state_dict['optimizer']`` back to ``optimizer.load_state_dict``. The
optimizer the adapter returns wraps these two methods (``attach``), so everything local SGD needs rides
along without touching Megatron-LM's checkpointing code:

- every worker's model and Adam state: the model entries (already in the dict) and the optimizer's are
  re-keyed per worker (worker_keys.py), exactly as in megatron_edit's own checkpoints; the adapter has
  Megatron-LM save the optimizer ``fully_reshardable`` (model space), which that re-keying needs;
- ``optimizer['megatron_edit']['local_sgd']``: the outer state, fragments in flight and error-feedback
  residuals in model space (local_sgd_state.sharded_state);
- ``optimizer['megatron_edit']['meta']``: plain values, which dist_checkpointing keeps in the
  checkpoint's common part (written by rank 0; identical on every rank): the engine's metadata
  (local_sgd_state.metadata), the number of workers and the inner Adam step.

At load the plan (what to ask for) comes from the common part of the checkpoint Megatron-LM is about to
load (``get_load_checkpoint_path_by_args``): a plain Megatron-LM checkpoint (no ``megatron_edit`` part)
loads into every worker and the anchor starts from it; a checkpoint of megatron_edit's own entry is
refused with one line (its iteration, RNG and scheduler state are laid out differently).

Pending layer-wise updates land before a save because Megatron-LM saves after
``disable_forward_pre_hook(param_sync=True)``; streaming fragments in flight are completed here (their
merge still happens at their own iteration).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch.distributed as dist

from megatron_edit import mcore_adapter
from megatron_edit.checkpoint import files, local_sgd_state
from megatron_edit.checkpoint.worker_keys import rekey_for_worker, source_worker

KEY = "megatron_edit"
FORMAT = 1


class CheckpointFormatError(RuntimeError):
    """A checkpoint this loop cannot continue from; one line saying why."""


def _saved_meta(path: Optional[str]) -> tuple[Optional[dict], int]:
    """(the ``megatron_edit`` metadata of the checkpoint at ``path`` or None, its iteration).
    CheckpointFormatError for a checkpoint of megatron_edit's own entry."""
    import os

    from megatron.core import dist_checkpointing

    if path is None or not os.path.isdir(path):
        return None, 0
    common = dist_checkpointing.load_common_state_dict(path)
    if KEY in common:  # our own entry keeps its metadata at the top level
        raise CheckpointFormatError(
            f"{path} was written by megatron_edit's own entry (examples/pretrain_gpt.py), whose checkpoint "
            "layout (per-worker data position, RNG and LR-schedule state) differs from Megatron-LM's: resume it "
            "with examples/pretrain_gpt.py, or export the model with tools/convert_checkpoint.py --to mcore")
    optimizer = common.get("optimizer")
    meta = optimizer.get(KEY, {}).get("meta") if isinstance(optimizer, dict) else None
    return meta, int(common.get("iteration", 0) or 0)


def _load_path() -> Optional[str]:
    """Where Megatron-LM's load_checkpoint reads from (``--load`` and ``--ckpt-step``, its own rule)."""
    from megatron.training.global_vars import get_args

    checkpointing = sys.modules.get("megatron.training.checkpointing")
    args = get_args()
    if checkpointing is None or getattr(args, "load", None) is None:
        return None
    return checkpointing.get_load_checkpoint_path_by_args(args)


def attach(optimizer: Any, engine: Any, worker: int, num_workers: int, load_path=_load_path) -> None:
    """Wrap ``optimizer.sharded_state_dict`` / ``optimizer.load_state_dict`` (module docstring)."""
    original_sharded_state_dict = optimizer.sharded_state_dict
    original_load_state_dict = optimizer.load_state_dict
    intra = engine.topo.intra_dp_group.rank()
    pending: dict = {}
    mcore_adapter.fix_fully_reshardable_bucket_offsets(optimizer)

    def sharded_state_dict(model_sharded_state_dict, is_loading: bool = False, **kwargs):
        if is_loading:
            meta, iteration = _saved_meta(load_path())
            saved_workers = int(meta["num_workers"]) if meta else 1
            plan = local_sgd_state.plan_for_load(engine, meta, "--load") if meta else local_sgd_state.LocalSGDPlan()
            keys_of = source_worker(worker, saved_workers)
            mcore_adapter.init_torch_adam_state(optimizer)
        else:
            engine.flush_pending()  # normally a no-op: Megatron-LM saves after param_sync=True
            engine.complete_in_flight()
            meta, iteration, plan, keys_of = None, 0, local_sgd_state.plan_for_save(engine), worker
        local, params_of = local_sgd_state.sharded_state(engine, model_sharded_state_dict, plan, keys_of,
                                                         is_loading)
        state = original_sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)
        model_entries = {k: v for k, v in model_sharded_state_dict.items() if k.startswith("model")}
        rekey_for_worker(model_entries, keys_of, intra)
        rekey_for_worker(state, keys_of, intra)
        state = dict(state)
        state[KEY] = {"local_sgd": local}
        if is_loading:
            pending.update(plan=plan, params_of=params_of, meta=meta, iteration=iteration)
        else:
            state[KEY]["meta"] = {"format": FORMAT, "num_workers": num_workers,
                                  "optimizer_step": mcore_adapter.inner_optimizer_step(optimizer),
                                  **local_sgd_state.metadata(engine, plan)}
        return state

    def load_state_dict(state_dict):
        ours = state_dict.pop(KEY, None) if isinstance(state_dict, dict) else None
        mcore_adapter.patch_fully_reshardable_load(optimizer)
        result = original_load_state_dict(state_dict)
        if ours is None or not pending:
            return result
        meta = ours.get("meta") or pending["meta"] or {}
        step = meta.get("optimizer_step", mcore_adapter.inner_optimizer_step(optimizer))
        if step is not None:  # one step tensor per param (mcore_adapter.set_inner_optimizer_step)
            mcore_adapter.set_inner_optimizer_step(optimizer, step)
        local_sgd_state.apply(engine, pending["plan"], meta, ours.get("local_sgd", {}), pending["params_of"],
                              past_warmup=pending["iteration"] >= engine.cfg.warmup_iters,
                              announce=dist.get_rank() == 0)
        pending.clear()
        return result

    optimizer.sharded_state_dict = sharded_state_dict
    optimizer.load_state_dict = load_state_dict
