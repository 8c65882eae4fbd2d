"""FP8 (Transformer Engine) with local SGD (SPEC 2.6).

With ``--fp8-param-gather`` the model weights are TE FP8 tensors (uint8 storage plus a scale) and the
distributed optimizer keeps fp32 main shards. Local SGD must work on the same fp32 shards and write back
the way the inner step does:

* sources: pseudo-gradients (anchor - theta) and the anchor itself are read from the fp32 main shards
  (``mcore_adapter.main_param_pairs``), never from FP8 weights, whose rounding would leak into every
  outer step;
* write-back: after the outer update has set a main shard, an FP8 param (the optimizer's own predicate,
  mcore_adapter.is_fp8_param_for_param_gather) is requantized with ``fp8_utils.quantize_param_shard`` (a
  collective over the worker's shard group: amax/scale agreement), as
  ``DistributedOptimizer._copy_main_params_to_model_params`` does after an inner step. It is called
  once per DDP bucket that holds FP8 params of the unit being updated, in bucket order, with every FP8
  param of that bucket (a rank without a shard of a param passes ``None`` for it), so all ranks of the
  shard group enter the same collectives in the same order whatever shards they own. The parameter
  all-gather that follows (DDP's ``start_param_sync``) moves the FP8 bytes and runs
  ``post_all_gather_processing`` per bucket, exactly as after an inner step. Non-FP8 params are copied.
  Since 0.17.1 the inner step requantizes only with ``ddp_config.fp8_param_gather``, which the DDP config
  therefore takes from ``--fp8-param-gather`` (training/model.py).

Streaming quantized outer syncs (``--outer-grad-dtype``) are independent of this: they quantize the
fp32 pseudo-gradient on the wire; the model's FP8 format only concerns the weights.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

from megatron_edit import mcore_adapter

FP8_FORMATS = ("e4m3", "hybrid")


def transformer_engine_available() -> bool:
    """TE importable without importing it (it initialises CUDA on import)."""
    return importlib.util.find_spec("transformer_engine") is not None


def fp8_flag_error(fp8_format: Optional[str], fp8_param_gather: bool, distributed_optimizer: bool,
                   te_available: Optional[bool] = None) -> Optional[str]:
    """The one line that explains why these FP8 flags cannot run here, or None when they can."""
    if fp8_format is None:
        return "--fp8-param-gather needs --fp8-format" if fp8_param_gather else None
    if te_available is None:
        te_available = transformer_engine_available()
    if not te_available:
        return (f"--fp8-format {fp8_format} needs Transformer Engine (GPU only), which is not installed: "
                "install transformer_engine[pytorch] on a CUDA machine, or run without --fp8-format")
    if fp8_param_gather and not distributed_optimizer:
        return ("--fp8-param-gather needs --use-distributed-optimizer (FP8 weights are requantized from the "
                "distributed optimizer's fp32 main shards)")
    return None


def _unit_members(unit, model_chunks, num_layers: int):
    """Which params a unit updates, decided the same way on every rank (not from this rank's shards)."""
    if getattr(unit, "bucket_group", None) is not None:
        members = mcore_adapter.bucket_group_params(unit.bucket_group)
        return lambda p: p in members
    from megatron_edit.outer_state import param_layer_keys

    key_of = param_layer_keys(model_chunks, num_layers)
    keys = set(unit.keys)
    return lambda p: key_of.get(p) in keys


def requantize_batches(unit, model_chunks, optimizer, num_layers: int) -> list[tuple[list, list, list, Any]]:
    """Per DDP bucket (in bucket order): (FP8 params of the unit, their fp32 main shards or None,
    shard start offsets or None, shard group) -- the arguments of one ``quantize_param_shard`` call."""
    fp8_params = mcore_adapter.fp8_param_shards(optimizer)
    if not fp8_params:
        return []
    member = _unit_members(unit, model_chunks, num_layers)
    batches = []
    for bucket_params, group, owner in mcore_adapter.optimizer_bucket_params(optimizer):
        params = [p for p in bucket_params if p in fp8_params and member(p)]
        if params:
            mains = [fp8_params[p][0] for p in params]
            offsets = [fp8_params[p][1] for p in params]
            batches.append((*mcore_adapter.expand_quantized_param_shards(owner, params, mains, offsets), group))
    return batches


def write_back_model_params(unit, model_chunks, optimizer, num_layers: int) -> None:
    """Model params <- the unit's fp32 main shards: a copy for bf16/fp32 params (a no-op when the main
    shard *is* the param buffer), a per-bucket requantize for FP8 params (module docstring)."""
    import torch
    from megatron.core import fp8_utils

    with torch.no_grad():
        for s in unit.shards:
            if mcore_adapter.is_fp8_param_for_param_gather(s.model_param):
                continue
            if s.model_view.data_ptr() != s.main.data_ptr():
                s.model_view.copy_(s.main)
        for params, mains, offsets, group in requantize_batches(unit, model_chunks, optimizer, num_layers):
            fp8_utils.quantize_param_shard(params, mains, offsets, group)
