"""Every megatron-core internal megatron_edit depends on, named in one place.

Checked on megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.2 (SUPPORTED_MCORE: >=0.16.1,<0.20). Public API
(GPTModel, DistributedDataParallel, get_megatron_optimizer, parallel_state getters) is imported where it
is used; what is listed here is private, undocumented or changed between those releases, so each
accessor says what it relies on and, where the releases differ, which release changed it. Differences
are found by feature probes (a parameter, an attribute, a field), not by comparing version numbers, so a
patch release that back-ports a change is handled too.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

SUPPORTED_MCORE = ((0, 16, 1), (0, 20, 0))  # [min, max) checked
SUPPORTED_MCORE_TEXT = ">=0.16.1,<0.20"


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


def null_tokenizer(vocab_size: int) -> Any:
    """megatron-core's null tokenizer with ``vocab_size`` ids plus an EOD id after them (vocabulary
    ``vocab_size + 1``, EOD = ``vocab_size``) on every supported release, so a ``--vocab-size`` gives the
    same model and the same data whichever megatron-core is installed.

    - 0.17 renamed its library from ``null`` to ``null-text`` (probe: ``TEXT_LIBRARIES``);
    - 0.18 made its ``vocab_size`` count the EOD id (EOD = vocab_size - 1 by default) and added an
      ``eod_id`` parameter (probe: that parameter); before, vocabulary = vocab_size + 1, EOD = vocab_size.
    """
    import inspect

    from megatron.core.tokenizers import MegatronTokenizer
    from megatron.core.tokenizers import megatron_tokenizer

    libraries = getattr(megatron_tokenizer, "TEXT_LIBRARIES", None) or getattr(
        megatron_tokenizer, "TOKENIZER_LIBRARIES", [])
    library = "null-text" if "null-text" in libraries else "null"
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    if "eod_id" in inspect.signature(NullTokenizer.__init__).parameters:  # 0.18+
        return MegatronTokenizer.from_pretrained(metadata_path={"library": library}, vocab_size=vocab_size + 1,
                                                 eod_id=vocab_size)
    return MegatronTokenizer.from_pretrained(metadata_path={"library": library}, vocab_size=vocab_size)


def rng_module() -> Any:
    """``megatron.core.tensor_parallel.random``: its private ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` are what the RNG tracker uses to swap generator states (0.16.1)."""
    return importlib.import_module("megatron.core.tensor_parallel.random")


def layer_bucket_size(module: Any) -> Optional[int]:
    """Elements of the largest transformer layer of one model chunk (``decoder.layers``; None without
    layers): as a DDP bucket size it gives about one bucket per layer, the granularity of EDiT's
    layer-wise sync (each bucket's parameter all-gather is where its outer update lands)."""
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    layers = getattr(getattr(module, "decoder", None), "layers", None)
    if not layers:
        return None
    return max(sum(p.numel() for p in layer.parameters()) for layer in layers)


class _BucketingStageView:
    """The pipeline group as DDP's bucketing rule sees it: rank 0. megatron-core turns bucketing off on
    pipeline stages > 0 (``DistributedDataParallel.__init__``: ``if disable_bucketing or pp_rank > 0:
    bucket_size = None``; a heuristic: the grad reduce of later stages is off the critical path), and reads
    the group for nothing else there (checked 0.16.1 to 0.19.2). Layer-wise EDiT needs buckets on every
    stage: one bucket per stage means one outer update for the whole stage, with nothing to overlap."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def rank(self) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


def ddp_arguments(module: Any, ddp_config: Any, pg_collection: Any, disable_bucketing: bool,
                  bucket_every_stage: bool = False) -> tuple[Any, bool, dict]:
    """(pg_collection, disable_bucketing, extra keyword arguments) for megatron-core's
    ``DistributedDataParallel`` over one model chunk.

    - Since 0.18 DDP takes the distributed optimizer's parameter layout (``full_param_layout``, from
      ``DistributedOptimizer.compute_full_param_layout``) instead of sizing buffers itself (without it
      it warns and computes the same). We compute it as Megatron-LM 0.18+ does
      (``wrap_model_chunks_with_ddp``): over the worker's data-parallel group (the shard count the
      optimizer asserts), with DDP's own bucket-size rule (``bucket_size`` default max(4e7, 1e6 x DP), none
      without ``overlap_grad_reduce``, one bucket on pipeline stages > 0 and with ``disable_bucketing``).
      Probed by the parameter; nothing before 0.18 or without the distributed optimizer.
    - ``bucket_every_stage`` (layer-wise EDiT): buckets on every pipeline stage and virtual chunk too.
      Since 0.18 the layout carries the buckets (computed without the stage rule); before, DDP gets a
      pipeline-group view that reports rank 0 to its bucketing rule (_BucketingStageView; call
      ``restore_pipeline_group`` on the built module)."""
    import copy
    import inspect

    from megatron.core.distributed import DistributedDataParallel

    if bucket_every_stage:
        disable_bucketing = False
    takes_layout = "full_param_layout" in inspect.signature(DistributedDataParallel.__init__).parameters
    if bucket_every_stage and not takes_layout:  # 0.16, 0.17
        pg_collection = copy.copy(pg_collection)
        pg_collection.pp = _BucketingStageView(pg_collection.pp)
    if not takes_layout or not ddp_config.use_distributed_optimizer:
        return pg_collection, disable_bucketing, {}
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    bucket_size = ddp_config.bucket_size
    if bucket_size is None:
        bucket_size = max(40000000, 1000000 * pg_collection.dp.size())
    pp = pg_collection.pp
    pp_rank = (pp[0] if isinstance(pp, list) else pp).rank()
    if not ddp_config.overlap_grad_reduce or disable_bucketing or (pp_rank > 0 and not bucket_every_stage):
        bucket_size = None
    expert_group = pg_collection.intra_expt_dp
    layout = DistributedOptimizer.compute_full_param_layout(
        [p for p in module.parameters() if p.requires_grad], bucket_size, pg_collection.intra_dp_cp.size(),
        ddp_config, expert_data_parallel_world_size=expert_group.size() if expert_group is not None else None)
    return pg_collection, disable_bucketing, {"full_param_layout": layout}


def restore_pipeline_group(ddp_module: Any) -> None:
    """After DDP was built with a _BucketingStageView: its ``pp_group`` is the real group again."""
    if isinstance(getattr(ddp_module, "pp_group", None), _BucketingStageView):
        ddp_module.pp_group = ddp_module.pp_group._group


def set_worker_data_parallel_groups_gtp(pg_collection: Any, intra_dp: Any, intra_expert_dp: Any) -> None:
    """0.19 added ``ProcessGroupCollection.dp_cp_gtp_remat`` / ``expt_dp_gtp_remat`` (the data-parallel
    groups times the GTP weight-rematerialisation axis: loss and token-count reductions, replica ids of
    replicated weights). Without GTP they equal ``dp_cp`` / ``expt_dp``, so in a worker they must be the
    worker's groups too. Probed by the dataclass field (``hasattr`` is no probe: since 0.19 the collection
    answers None for every declared field that was never set)."""
    from dataclasses import fields

    names = {f.name for f in fields(type(pg_collection))}
    if "dp_cp_gtp_remat" in names:
        pg_collection.dp_cp_gtp_remat = intra_dp
    if "expt_dp_gtp_remat" in names and intra_expert_dp is not None:
        pg_collection.expt_dp_gtp_remat = intra_expert_dp


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


_LR_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _param_group_lists(tree: Any):
    if isinstance(tree, dict):
        if isinstance(tree.get("param_groups"), list):
            yield tree["param_groups"]
        for value in tree.values():
            yield from _param_group_lists(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _param_group_lists(value)


def align_saved_param_groups(optimizer: Any, saved_state: Any) -> None:
    """Before ``optimizer.load_state_dict(saved_state)``: the saved param groups take this run's
    ``max_lr`` / ``min_lr`` / ``start_wd`` / ``end_wd``. Since 0.19 megatron-core matches saved groups to
    live ones by these keys too (``param_group_identifier_keys``: a KeyError when ``--lr`` or ``--min-lr``
    changed across a resume); before, the load copied the saved values into the live groups, where the
    scheduler reads them first, so ``--override-opt-param-scheduler`` with a new ``--lr`` kept the old
    peak. The scheduler decides afterwards (set_param_group_lr_bounds)."""
    live = [g for opt in sub_optimizers(optimizer) for g in getattr(opt, "param_groups", [])]
    for groups in _param_group_lists(saved_state):
        for saved in groups:
            if not isinstance(saved, dict):
                continue
            for group in live:
                same = all(saved.get(k) == group.get(k) for k in ("wd_mult", "lr_mult", "is_expert_parallel",
                                                                  "is_decoupled_lr") if k in saved and k in group)
                if same:
                    saved.update({k: group[k] for k in _LR_KEYS if k in group})
                    break


def set_param_group_lr_bounds(optimizer: Any, max_lr: float, min_lr: float) -> None:
    """Every param group's ``max_lr`` / ``min_lr`` := the scheduler's (no per-group LR overrides here)."""
    for opt in sub_optimizers(optimizer):
        for group in getattr(opt, "param_groups", []):
            if "max_lr" in group:
                group["max_lr"] = max_lr
            if "min_lr" in group:
                group["min_lr"] = min_lr


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


def inner_optimizer_state(optimizer: Any) -> list[dict]:
    """Copies of the torch inner optimizer's per-parameter state (Adam: ``step``, ``exp_avg``,
    ``exp_avg_sq``), in param-group order, for every sub-optimizer: what a worker that heals from a peer
    receives (fault_tolerance.py). Uses ``opt.optimizer`` (the torch optimizer megatron-core wraps, 0.16.1
    to 0.19.2); parameters with no state yet give an empty dict."""
    out = []
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                out.append({k: v.detach().clone() if hasattr(v, "detach") else v
                            for k, v in inner.state.get(p, {}).items()})
    return out


def _inner_state_by_param(optimizer: Any) -> dict:
    """id(fp32 main param) -> the torch inner optimizer's state dict for it (``opt.optimizer``)."""
    state_of = {}
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                state_of[id(p)] = inner.state.get(p, {})
    return state_of


def inner_moments(optimizer: Any, mains: list) -> list[list]:
    """Per fp32 main param (the objects ``main_param_pairs`` returns), the live fp32 state tensors of its
    shape in the torch inner optimizer (Adam: ``exp_avg``, ``exp_avg_sq``; ``max_exp_avg_sq`` with
    amsgrad), for inner_state_repair.py. Same ``opt.optimizer`` reliance as inner_optimizer_state; a
    parameter with no state yet gives []. megatron-core's precision-aware optimizer (TE FusedAdam, its
    moments kept in bf16/fp8 with scales) is refused by ``check_fp32_inner_moments`` instead."""
    state_of = _inner_state_by_param(optimizer)
    out = []
    for main in mains:
        state = state_of.get(id(main), {})
        out.append([v for k, v in state.items() if k != "step" and hasattr(v, "shape")
                    and v.shape == main.shape and str(v.dtype) == "torch.float32"])
    return out


def inner_second_moments(optimizer: Any, mains: list) -> list:
    """Per fp32 main param, the inner optimizer's live second moment (Adam's ``exp_avg_sq``, in whatever
    float dtype the optimizer keeps it), or None (no state yet, an optimizer without one, or one kept in an
    integer format), for pseudo_grad_penalty.frozen_outliers. Same ``opt.optimizer`` reliance as
    inner_moments."""
    state_of = _inner_state_by_param(optimizer)
    out = []
    for main in mains:
        v = state_of.get(id(main), {}).get("exp_avg_sq")
        # TE FusedAdam's fp8 moments (precision-aware optimizer) are uint8 with scales: not read, unknown.
        usable = v is not None and hasattr(v, "shape") and v.shape == main.shape and v.is_floating_point()
        out.append(v if usable else None)
    return out


def check_fp32_inner_moments(optimizer: Any) -> Optional[str]:
    """Why the inner moments cannot be averaged as fp32 tensors (``OptimizerConfig.
    use_precision_aware_optimizer``, 0.16.1 to 0.19.2), or None."""
    for opt in sub_optimizers(optimizer):
        config = getattr(opt, "config", None)
        if getattr(config, "use_precision_aware_optimizer", False):
            return "--use-precision-aware-optimizer keeps the inner moments in reduced precision"
    return None


def load_inner_optimizer_state(optimizer: Any, states: list[dict]) -> None:
    """Inverse of inner_optimizer_state on a worker of the same layout (same shards in the same order)."""
    params = [(getattr(opt, "optimizer", None), p) for opt in sub_optimizers(optimizer)
              for group in getattr(getattr(opt, "optimizer", None), "param_groups", []) for p in group["params"]]
    if len(params) != len(states):
        raise ValueError(f"inner optimizer state for {len(states)} parameters, this worker has {len(params)}")
    for (inner, p), state in zip(params, states):
        inner.state[p] = {k: v.clone().to(p.device) if hasattr(v, "clone") and k != "step" else
                          (v.clone() if hasattr(v, "clone") else v) for k, v in state.items()}


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


def _saves_fully_reshardable_at_padded_offsets(cls: Any) -> bool:
    """Probe: does this DistributedOptimizer slice its gathered world tensors at the buffer's padded
    offsets? Every release from 0.16.1 to 0.19.2 does (its zero-padding workaround, "param range exceeds
    unpadded buffer", is the mark); Megatron-LM PR #5077 (merged upstream 2026-05) fixes it."""
    import inspect

    method = getattr(cls, "sharded_param_state_fully_reshardable", None)
    if method is None:
        return False
    try:
        return "param range exceeds" in inspect.getsource(method)
    except (OSError, TypeError):
        return False


def fix_fully_reshardable_bucket_offsets(optimizer: Any) -> None:
    """Make ``fully_reshardable`` saves of a multi-bucket grad buffer correct (megatron-core 0.16.1 to
    0.19.2). ``DistributedOptimizer.get_parameter_state_dp_zero`` packs each bucket's gathered state
    without the bucket's end padding, but ``sharded_param_state_fully_reshardable`` reads it at
    ``buffer.param_index_map`` offsets, which include the padding of every earlier bucket: every param
    after the first bucket is saved shifted (its neighbours' values; zeros past the end, with a warning).
    Invisible with one bucket; found by the Megatron-LM resume test once layer-wise EDiT used buckets of
    about one layer (the resumed run's first step went wrong). The fix (as upstream): during that call the
    map holds the offsets minus the end padding of the earlier buckets (``bucket.grad_data.numel() -
    bucket.numel_unpadded``), so save and load templates agree with the packed world tensors."""
    for opt in sub_optimizers(optimizer):
        original = getattr(opt, "sharded_param_state_fully_reshardable", None)
        if (original is None or getattr(original, "_megatron_edit_patched", False)
                or not _saves_fully_reshardable_at_padded_offsets(type(opt))):
            continue

        def sharded_param_state(*args, _opt=opt, _original=original, **kwargs):
            kept = [buffer.param_index_map for buffer in _opt.buffers]
            try:
                for buffer in _opt.buffers:
                    stripped, before = 0, []
                    for bucket in buffer.buckets:
                        before.append(stripped)
                        stripped += bucket.grad_data.numel() - bucket.numel_unpadded
                    buffer.param_index_map = {
                        param: (start - before[bucket_id], end - before[bucket_id], bucket_id)
                        for param, (start, end, bucket_id) in buffer.param_index_map.items()}
                return _original(*args, **kwargs)
            finally:
                for buffer, index_map in zip(_opt.buffers, kept):
                    buffer.param_index_map = index_map

        sharded_param_state._megatron_edit_patched = True
        opt.sharded_param_state_fully_reshardable = sharded_param_state


def fp8_param_shards(optimizer: Any) -> dict:
    """FP8 model param -> (its fp32 main shard on this rank or None, the shard's start offset in the param
    or None), exactly as the distributed optimizer passes them to ``quantize_param_shard`` after an inner
    step: ``DistributedOptimizer._get_fp8_params_and_shard_fp32_from_fp8`` (private, 0.16.1 to 0.19.2;
    since 0.19 it selects by ``_is_fp8_param_for_param_gather``). Empty when no param is FP8 (the same
    answer on every rank: it lists every FP8 param of the buffers)."""
    out = {}
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "_get_fp8_params_and_shard_fp32_from_fp8"):
            for param, main, offset in zip(*opt._get_fp8_params_and_shard_fp32_from_fp8()):
                out[param] = (main, offset)
    return out


def is_fp8_param_for_param_gather(param: Any) -> bool:
    """Whether the distributed optimizer requantizes this param from its fp32 main shard after a step:
    ``DistributedOptimizer._is_fp8_param_for_param_gather`` since 0.19 (FP8 / MXFP8 tensors and grouped
    quantized tensors, not grouped NVFP4), ``_is_distopt_quantized_param`` in 0.18 (FP8 and grouped
    quantized tensors), ``fp8_utils.is_float8tensor`` before (probes: the methods)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for name in ("_is_fp8_param_for_param_gather", "_is_distopt_quantized_param"):  # 0.19, 0.18
        predicate = getattr(DistributedOptimizer, name, None)
        if predicate is not None:
            return bool(predicate(param))
    from megatron.core import fp8_utils

    return bool(fp8_utils.is_float8tensor(param))


def expand_quantized_param_shards(optimizer: Any, params: list, mains: list,
                                  offsets: list) -> tuple[list, list, list]:
    """What the inner step hands ``quantize_param_shard`` for these FP8 params of ``optimizer`` (one
    distributed optimizer): since 0.18 a grouped quantized param is split into its member tensors with
    member-aligned main shards (``_expand_quantized_param_shard_for_cast``: an instance method in 0.18, a
    classmethod since 0.19; called on the optimizer, which works for both); unchanged before."""
    expand = getattr(optimizer, "_expand_quantized_param_shard_for_cast", None)  # 0.18: an instance method
    if expand is None:
        return params, mains, offsets
    out = ([], [], [])
    for param, main, offset in zip(params, mains, offsets):
        for target, values in zip(out, expand(param, main, offset)):
            target.extend(values)
    return out


def optimizer_bucket_params(optimizer: Any) -> list[tuple[list, Any, Any]]:
    """(params of one DDP bucket in bucket order, the shard group, the distributed optimizer) for every
    bucket of every distributed optimizer in the chain: ``DistributedOptimizer.buffers`` -> ``buckets``
    -> ``params_list`` and its ``data_parallel_group`` (0.16.1 to 0.19.2). The order is the same on
    every rank of the group."""
    out = []
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "_get_fp8_params_and_shard_fp32_from_fp8"):
            for buffer in opt.buffers:
                for bucket in buffer.buckets:
                    out.append((list(bucket.params_list), opt.data_parallel_group, opt))
    return out
