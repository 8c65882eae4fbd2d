"""Build megatron-core's own GPTModel, DDP wrapper, optimizer and LR scheduler from the flags.

Nothing here reimplements megatron-core: it maps Megatron-LM flag names onto ``TransformerConfig``,
``DistributedDataParallelConfig`` and ``OptimizerConfig`` and hands over the worker-local process groups
(topology.worker_process_groups) so the inner gradient reduction stays inside a worker.
"""
from __future__ import annotations

import zlib

import torch

from megatron_edit.topology import WorkerTopology, worker_process_groups

try:  # Transformer Engine is optional (GPU only); its layer spec is used when it is importable.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # pragma: no cover - TE cannot be installed on the CPU machines
    HAVE_TE = False


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by x TP so every TP shard has equal rows."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_transformer_config(args):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        add_bias_linear=not args.disable_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=args.bf16,
        use_cpu_initialization=False,
        # Fusions need CUDA kernels; the plain torch paths are numerically the same thing.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
    )
    from megatron_edit import cpu_compat

    kwargs.update(cpu_compat.transformer_config_overrides())
    if args.swiglu:
        import torch.nn.functional as F

        kwargs["activation_func"] = F.silu
    if args.num_layers_per_virtual_pipeline_stage is not None:
        kwargs["virtual_pipeline_model_parallel_size"] = (
            args.num_layers // args.pipeline_model_parallel_size // args.num_layers_per_virtual_pipeline_stage
        )
    if args.fp8_format is not None:
        kwargs["fp8"] = args.fp8_format
        kwargs["fp8_param"] = args.fp8_param_gather
    return TransformerConfig(**kwargs)


def layer_spec(args):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if HAVE_TE and torch.cuda.is_available() and not args.force_cpu:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=args.normalization)


def build_gpt_chunks(args, config, vocab_size: int) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=layer_spec(args),
                vocab_size=vocab_size,
                max_sequence_length=args.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                rotary_base=args.rotary_base,
                vp_stage=stage,
            )
        )
    return chunks


def global_param_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Name a parameter by its global layer number so the same tensor has the same name in every
    TP/PP/VPP layout (``decoder.layers.<local>.`` -> ``decoder.layers.<global>.``)."""
    if local_name.startswith("decoder.layers."):
        rest = local_name[len("decoder.layers."):]
        local_index, tail = rest.split(".", 1)
        layer = chunk.decoder.layers[int(local_index)]
        return f"decoder.layers.{layer.layer_number - 1}.{tail}"
    return local_name


@torch.no_grad()
def layout_invariant_init_(chunks: list[torch.nn.Module], config, seed: int) -> None:
    """Re-initialise every parameter from (seed, global name), then take this rank's TP slice.

    megatron-core's initialisation depends on the layout (per-TP-rank RNG streams, per-stage layer
    order), so runs with different TP/PP cannot be compared. Values follow megatron-core's scheme:
    normal(0, init_method_std) for weights, the scaled std/sqrt(2L) for the output projections
    (linear_proj, linear_fc2), zeros for biases, ones for norm weights.
    """
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    std = config.init_method_std
    scaled_std = std / (2.0 * config.num_layers) ** 0.5
    for chunk in chunks:
        for local_name, param in chunk.named_parameters():
            name = global_param_name(chunk, local_name)
            if getattr(param, "shared_embedding", False) or name == "output_layer.weight" and (
                chunk.share_embeddings_and_output_weights
            ):
                name = "embedding.word_embeddings.weight"  # tied copy on the last stage: same values
            partitioned = getattr(param, "tensor_model_parallel", False)
            dim = getattr(param, "partition_dim", 0) if partitioned else None
            full_shape = list(param.shape)
            if partitioned:
                full_shape[dim] *= tp_size
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name or "layernorm" in name
            if leaf == "bias" or (is_norm and leaf != "weight"):
                param.zero_()
                continue
            if is_norm:
                param.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2**63))
            sigma = scaled_std if ("linear_proj" in name or "linear_fc2" in name) else std
            full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, sigma, generator=gen)
            if partitioned:
                if config.gated_linear_unit and "linear_fc1" in name:
                    # [gate; up] is stacked per TP shard: shard each half, then stack.
                    gate, up = full.chunk(2, dim=dim)
                    full = torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim)
                else:
                    full = full.chunk(tp_size, dim=dim)[tp_rank]
            param.copy_(full.to(param.dtype))


def build_ddp_config(args):
    from megatron.core.distributed import DistributedDataParallelConfig

    kwargs = dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        num_distributed_optimizer_instances=1,  # instances are our workers; see topology.py
        check_for_nan_in_grad=False,
        # FP8 weights in the param buffer (uint8), requantized from the fp32 main shards after every step:
        # since 0.17.1 the distributed optimizer requantizes only when this is set (SPEC 5b).
        fp8_param_gather=bool(args.fp8_param_gather),
    )
    if args.ddp_bucket_size is not None:
        kwargs["bucket_size"] = args.ddp_bucket_size
    return DistributedDataParallelConfig(**kwargs)


def wrap_ddp(args, config, chunks, topology: WorkerTopology, layerwise: bool = False):
    from megatron.core.distributed import DistributedDataParallel

    from megatron_edit import mcore_adapter

    pgc = worker_process_groups(topology)
    ddp_config = build_ddp_config(args)
    if layerwise and args.ddp_bucket_size is None:
        # About one bucket per transformer layer: the granularity of EDiT's layer-wise sync.
        ddp_config.bucket_size = max(filter(None, (mcore_adapter.layer_bucket_size(c) for c in chunks)), default=None)
    if args.bf16:
        # As Megatron-LM does: Float16Module casts the inputs (and the loss back to fp32) around the
        # bf16 model; without it the first matmul sees fp32 activations and bf16 weights.
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Megatron-LM disables bucketing for all but the first virtual chunk (and DDP on pipeline stages
        # > 0); layer-wise EDiT keeps buckets everywhere (mcore_adapter.ddp_arguments).
        chunk_pgc, disable_bucketing, extra = mcore_adapter.ddp_arguments(
            chunk, ddp_config, pgc, disable_bucketing=i > 0, bucket_every_stage=layerwise)
        ddp = DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=disable_bucketing,
                                      pg_collection=chunk_pgc, **extra)
        mcore_adapter.restore_pipeline_group(ddp)
        wrapped.append(ddp)
    return wrapped, pgc


def build_optimizer(args, chunks, pgc, topology: WorkerTopology):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks, use_gloo_process_groups=False, pg_collection=pgc)
    # Checkpoint replica ids: megatron-core derives them from the instance id (SPEC section 5).
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "distributed_optimizer_instance_id"):
            sub.distributed_optimizer_instance_id = topology.worker_index
    return optimizer, opt_config


def build_scheduler(args, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    decay_iters = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=max(decay_iters, 1) * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=max(args.train_iters, 1) * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=(args.lr_wsd_decay_iters * gbs) if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
        # Megatron-LM's semantics on --load: the checkpoint's schedule unless overridden by the flags.
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
    )


def count_parameters(chunks) -> int:
    return sum(p.numel() for c in chunks for p in c.parameters())


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
