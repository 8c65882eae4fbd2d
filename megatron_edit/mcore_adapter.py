"""Every megatron-core internal megatron_edit depends on, named in one place.

Checked on megatron-core 0.16.1 (SUPPORTED_MCORE). Public API (GPTModel, DistributedDataParallel,
get_megatron_optimizer, parallel_state getters) is imported where it is used; what is listed here is
private or undocumented and may move between releases, so each accessor says what it relies on.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

SUPPORTED_MCORE = ((0, 16, 1), (0, 17, 0))  # [min, max) checked
SUPPORTED_MCORE_TEXT = ">=0.16.1,<0.17"


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _version_tuple(text: str) -> tuple[int, int, int, int]:
    """(major, minor, patch, is_final): leading digits of each part; a pre-release tail ("rc1", "a0",
    ".dev") sorts before the release, so "0.16.1rc1" < "0.16.1" and "0.16.0rc1" is not accepted as 0.16.1."""
    import re

    match = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)$", text.strip())
    if not match:
        return (0, 0, 0, 0)
    major, minor, patch, tail = match.groups()
    final = 0 if re.match(r"^\.?(rc|a|b|dev|alpha|beta|pre)", tail or "") else 1
    return (int(major), int(minor or 0), int(patch or 0), final)


def check_megatron_core_version(version: str | None = None) -> None:
    """Refuse a megatron-core this adapter was not checked against, with one clear line."""
    version = version or megatron_core_version()
    low, high = SUPPORTED_MCORE
    if not ((*low, 1) <= _version_tuple(version) < (*high, 0)):
        raise RuntimeError(
            f"megatron_edit supports megatron-core {SUPPORTED_MCORE_TEXT}; found {version}. "
            f"Install a supported version: pip install 'megatron-core{SUPPORTED_MCORE_TEXT}'"
        )


def rng_module() -> Any:
    """``megatron.core.tensor_parallel.random``: its private ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` are what the RNG tracker uses to swap generator states (0.16.1)."""
    return importlib.import_module("megatron.core.tensor_parallel.random")


def ddp_bucket_groups(ddp_module: Any) -> list:
    """DDP's ``bucket_groups`` (non-expert) + ``expert_parallel_bucket_groups`` (0.16.1 attributes).

    Each is a ``_ParamAndGradBucketGroup`` whose ``start_param_sync`` dispatches the all-gather of its
    buckets' params and whose ``buckets[i]`` hold ``params_list``, ``param_data`` and the shard range
    (``param_index_map`` / the distributed optimizer's ``gbuf_ranges``)."""
    return list(ddp_module.bucket_groups) + list(ddp_module.expert_parallel_bucket_groups)


def param_to_bucket_group(ddp_module: Any) -> dict:
    """DDP's ``param_to_bucket_group`` map (0.16.1 attribute; absent without the distributed optimizer's
    overlap paths in some versions, hence the default)."""
    return dict(getattr(ddp_module, "param_to_bucket_group", {}))


def bucket_group_params(bucket_group: Any) -> set:
    """``_ParamAndGradBucketGroup.params``: every param of the group's buckets (0.16.1)."""
    return set(bucket_group.params)


def sub_optimizers(optimizer: Any) -> list:
    """``ChainedOptimizer.chained_optimizers`` or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_param_pairs(optimizer: Any) -> list[tuple[Any, Any, Any]]:
    """(model_param, fp32 main param, view of the model param that the main param mirrors).

    Relies on 0.16.1 internals:
    - DistributedOptimizer: ``model_float16_groups`` / ``shard_fp32_from_float16_groups`` and
      ``model_fp32_groups`` / ``shard_fp32_groups`` (parallel lists per param group), and
      ``_get_model_param_range_map(p)["param"]`` (the shard's range inside the flattened param).
    - Float16OptimizerWithFloat16Params: ``float16_groups`` / ``fp32_from_float16_groups`` and
      ``fp32_from_fp32_groups`` (main == model param).
    - FP32Optimizer: its torch optimizer's params are the model params.
    """
    pairs = []
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "shard_fp32_from_float16_groups"):
            groups = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups))
            groups += list(zip(opt.model_fp32_groups, opt.shard_fp32_groups))
            for model_group, main_group in groups:
                for model_param, main in zip(model_group, main_group):
                    r = opt._get_model_param_range_map(model_param)["param"]
                    view = model_param.detach().view(-1)[r.start:r.end]
                    pairs.append((model_param, main, view))
        elif hasattr(opt, "fp32_from_float16_groups"):
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model_param, main in zip(model_group, main_group):
                    pairs.append((model_param, main, model_param.detach()))
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    pairs.append((p, p, p.detach()))
        else:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    pairs.append((p, p, p.detach()))
    return pairs


def grad_shards_for_sync(ddp_module: Any, distributed_optimizer: bool) -> list:
    """The gradient region each rank owns after DDP's reduction: its reduce-scatter shard of every
    bucket's ``grad_data`` with the distributed optimizer, the whole ``grad_data`` without it.
    Uses ``buffers``/``expert_parallel_buffers`` -> ``buckets`` -> ``grad_data`` and
    ``param_and_grad_buffer.shard_buffer`` (0.16.1)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    out = []
    for buffer in list(ddp_module.buffers) + list(ddp_module.expert_parallel_buffers):
        for bucket in buffer.buckets:
            if distributed_optimizer:
                size = buffer.data_parallel_group.size()
                rank = buffer.data_parallel_group.rank()
                out.append(shard_buffer(bucket.grad_data, size)[rank])
            else:
                out.append(bucket.grad_data)
    return out


def init_torch_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam/AdamW (inside megatron-core's optimizers) its state before a checkpoint
    load: the distributed optimizer's ``state_dict()`` asserts one shared ``step`` (0.16.1), which a
    fresh torch Adam does not have yet; zeros are overwritten by the load."""
    import torch

    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def inner_optimizer_step(optimizer: Any) -> Optional[float]:
    """The shared torch-Adam ``step`` of the inner optimizer (None for SGD or before the first step)."""
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if "step" in state:
                return float(state["step"])
    return None


def set_inner_optimizer_step(optimizer: Any, step: float) -> None:
    """One ``step`` tensor per parameter again after a load. DistributedOptimizer.load_state_dict
    (0.16.1) puts the *same* tensor object into every parameter's state, and torch's single-tensor Adam
    increments it in place once per parameter, so the bias correction would run ahead after a resume."""
    import torch

    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)


def patch_fully_reshardable_load(optimizer: Any) -> None:
    """DistributedOptimizer._set_main_param_and_optimizer_states (0.16.1) copies every key of the torch
    optimizer's state from the loaded tensors, ``step`` included, which the ``fully_reshardable`` loader
    never provides (KeyError 'step' with torch Adam). Keep the current step for that key; the step
    itself is restored from the param groups (and set_inner_optimizer_step)."""
    for opt in sub_optimizers(optimizer):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None or getattr(original, "_megatron_edit_patched", False):
            continue

        def set_states(model_param, tensors, _opt=opt, _original=original):
            if "step" not in tensors and not _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                group_index, group_order = _opt.model_param_group_index_map[model_param]
                main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
                step = _opt.optimizer.state[main_param].get("step")
                if step is not None:
                    tensors = {**tensors, "step": step}
            return _original(model_param, tensors)

        set_states._megatron_edit_patched = True
        opt._set_main_param_and_optimizer_states = set_states


def fp8_param_shards(optimizer: Any) -> dict:
    """FP8 model param -> (its fp32 main shard on this rank or None, the shard's start offset in the param
    or None), exactly as the distributed optimizer passes them to ``quantize_param_shard`` after an inner
    step: ``DistributedOptimizer._get_fp8_params_and_shard_fp32_from_fp8`` (0.16.1 private). Empty when
    no param is FP8 (the same answer on every rank: it lists every FP8 param of the buffers)."""
    out = {}
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "_get_fp8_params_and_shard_fp32_from_fp8"):
            for param, main, offset in zip(*opt._get_fp8_params_and_shard_fp32_from_fp8()):
                out[param] = (main, offset)
    return out


def optimizer_bucket_params(optimizer: Any) -> list[tuple[list, Any]]:
    """(params of one DDP bucket in bucket order, the shard group) for every bucket of every distributed
    optimizer in the chain: ``DistributedOptimizer.buffers`` -> ``buckets`` -> ``params_list`` and its
    ``data_parallel_group`` (0.16.1 attributes). The order is the same on every rank of the group."""
    out = []
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "_get_fp8_params_and_shard_fp32_from_fp8"):
            for buffer in opt.buffers:
                for bucket in buffer.buckets:
                    out.append((list(bucket.params_list), opt.data_parallel_group))
    return out
