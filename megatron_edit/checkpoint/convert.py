"""Read a checkpoint as one global model and write it as a plain megatron-core checkpoint, a single torch
file or a Hugging Face model (tools/convert_checkpoint.py is the command line).

Global params: the anchor (the last outer-synced model, identical on every worker: the natural
"the model" of a local-SGD run), the mean of the workers' params, or one worker's. Reading goes through
dist_checkpointing itself: a one-process GPTModel (TP 1, PP 1) asks for the same keys with the anchor's
prefix or a worker's (worker_keys.py), so any saved TP / PP / DP layout is read the way megatron-core
reshards the weights.
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Optional

import torch

from megatron_edit.checkpoint import files
from megatron_edit.checkpoint.worker_keys import worker_prefix

SOURCES = ("anchor", "average", "worker")


def resolve(root: str, step: Optional[int] = None) -> tuple[str, int]:
    """(iteration directory, iteration) of --load-style root (latest marker) or an iteration dir."""
    if os.path.exists(os.path.join(root, ".metadata")):  # an iteration directory (every release writes it)
        name = os.path.basename(os.path.normpath(root))
        return root, int(name.split("_")[-1]) if name.startswith("iter_") else -1
    iteration = step if step is not None else files.read_tracker(root)
    if iteration is None:
        raise files.CheckpointError(f"{root}: no {files.TRACKER} and no .metadata: not a checkpoint")
    directory = files.iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise files.CheckpointError(f"{directory}: does not exist")
    return directory, iteration


def read_common(directory: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(directory)
    except Exception as e:  # noqa: BLE001
        raise files.CheckpointError(f"{directory}: its common state cannot be read ({e})") from None


def init_single_process() -> None:
    """One gloo rank with TP = PP = 1 (dist_checkpointing loads through torch.distributed)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_edit import cpu_compat

    cpu_compat.activate()
    if not dist.is_initialized():
        # An in-process store: one rank needs no port (a picked free port could be taken before the bind).
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def single_rank_args(args):
    """The saved args at TP 1, PP 1, one data-parallel rank, fp32, without local SGD."""
    a = copy.copy(args)
    a.tensor_model_parallel_size = a.pipeline_model_parallel_size = a.data_parallel_size = 1
    a.num_layers_per_virtual_pipeline_stage = None
    a.local_sgd = None
    a.bf16 = False
    a.fp8_format = None
    a.fp8_param_gather = False
    return a


def build_model(args, vocab_size: int):
    from megatron_edit.training import model as model_lib

    config = model_lib.build_transformer_config(args)
    (model,) = model_lib.build_gpt_chunks(args, config, vocab_size)
    return model.eval()


def saved_vocab_size(directory: str) -> int:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(directory)
    return int(meta["embedding.word_embeddings.weight"].global_shape[0])


def _load_with_prefix(model, directory: str, prefix: str, dtype: Optional[torch.dtype]) -> dict:
    """{state-dict name: tensor} of the model's tensors stored under ``prefix + key``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sd = {}
    for name, sh in model.sharded_state_dict().items():
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            continue
        data = torch.empty(sh.data.shape, dtype=dtype or sh.data.dtype)
        kwargs = dict(key=prefix + sh.key, data=data)
        if isinstance(sh, ShardedTensor):
            kwargs["dtype"] = data.dtype
        sd[name] = replace(sh, **kwargs)
    try:
        loaded = dist_checkpointing.load(sd, directory, validate_access_integrity=False)
    except Exception as e:  # noqa: BLE001
        raise files.CheckpointError(f"{directory}: cannot read '{prefix}*' tensors: {e}") from e
    return {name: loaded[name].float() for name in sd}  # load() also returns the common state


def global_params(model, directory: str, meta: dict, source: str, worker: int = 0) -> tuple[dict, str]:
    """({state-dict name: fp32 tensor}, what was read). A checkpoint without outer state (no local SGD,
    or saved during the synchronous warmup) has one model, read as worker 0's."""
    workers = int(meta.get("num_workers", 1))
    if source == "anchor" and meta.get("outer_state"):
        return _load_with_prefix(model, directory, "local_sgd.anchor.", torch.float32), "anchor"
    if source == "average" and workers > 1:
        total = None
        for w in range(workers):
            state = _load_with_prefix(model, directory, worker_prefix(w), None)
            total = state if total is None else {k: total[k] + state[k] for k in total}
        return {k: v / workers for k, v in total.items()}, f"mean of {workers} workers"
    if source == "worker" and not 0 <= worker < workers:
        raise files.CheckpointError(f"--worker {worker}: the checkpoint has workers 0..{workers - 1}")
    w = worker if source == "worker" else 0
    return _load_with_prefix(model, directory, worker_prefix(w), None), f"worker {w}"


def read_progress(directory: str, meta: dict) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd = {"progress": ShardedObject("megatron_edit.progress", None, (int(meta.get("num_workers", 1)),), (0,),
                                    replica_id=0)}
    try:
        return dist_checkpointing.load(sd, directory, validate_access_integrity=False)["progress"]
    except Exception:  # noqa: BLE001 - not written by megatron_edit: no progress record
        return {}


def set_params(model, state: dict) -> None:
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))


def write_mcore(model, state: dict, common: dict, progress: dict, output_root: str, iteration: int,
                target_tp: int = 1, target_pp: int = 1) -> str:
    """A plain megatron-core checkpoint (model only, no optimizer, no local-SGD state) that a run without
    --local-sgd loads; dist checkpoints are stored unsharded, so any TP / PP layout loads it, and the
    target layout is written into the saved args (after checking it divides the model)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    args = copy.copy(common["args"])
    check_layout(args, target_tp, target_pp)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = target_tp, target_pp
    args.local_sgd = None
    set_params(model, state)
    sd = {"model": model.sharded_state_dict()}
    sd["progress"] = ShardedObject("megatron_edit.progress", {
        "iteration": progress.get("iteration", iteration),
        "consumed_samples": progress.get("consumed_samples", 0), "optimizer_step": None}, (1,), (0,), replica_id=0)
    sd.update({
        "checkpoint_version": 3.0, "iteration": iteration, "args": args,
        "opt_param_scheduler": common.get("opt_param_scheduler"),
        "megatron_edit": {"format": 1, "method": None, "num_workers": 1, "layout": None, "optimizer": False,
                          "outer_state": False, "momentum": False, "converted_from": "local-sgd checkpoint"},
    })
    os.makedirs(output_root, exist_ok=True)
    partial = files.prepare_partial(output_root, iteration)
    dist_checkpointing.save(sd, partial)
    files.write_manifest(partial, {n: files.digest(os.path.join(partial, n)) for n in files.checkpoint_files(partial)})
    return files.publish(output_root, iteration)


def check_layout(args, tp: int, pp: int) -> None:
    heads, groups = args.num_attention_heads, args.num_query_groups or args.num_attention_heads
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    problems = [f"{what} {value} is not divisible by --target-tensor-parallel-size {tp}"
                for what, value in (("attention heads", heads), ("query groups", groups), ("ffn size", ffn))
                if value % tp]
    if args.num_layers % pp:
        problems.append(f"{args.num_layers} layers are not divisible by --target-pipeline-parallel-size {pp}")
    if problems:
        raise files.CheckpointError("; ".join(problems))


def write_torch(state: dict, path: str, args, iteration: int, source: str, dtype: torch.dtype) -> None:
    """One file: {'model': {global name: tensor}, 'args': dict, 'iteration', 'source'}."""
    model = {k: v.to(dtype).contiguous() for k, v in state.items() if not k.endswith("_extra_state")}
    torch.save({"model": model, "args": {k: v for k, v in vars(args).items()
                                         if isinstance(v, (int, float, str, bool, type(None), list, tuple))},
                "iteration": iteration, "source": source}, path)


def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()
