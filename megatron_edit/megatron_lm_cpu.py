"""Megatron-LM's own training loop on a machine without CUDA: the one place that decides it.

Megatron-LM asserts CUDA at start-up and compiles CUDA kernels, so without this a user cannot debug a
local-SGD configuration with their real ``pretrain_gpt.py`` on a laptop, and CI cannot train inside
Megatron-LM at all. When CUDA is absent (never when it is present), ``enable()`` is called by
``megatron_lm_adapter.install()`` before Megatron-LM builds anything, and then:

* megatron-core's CPU / gloo compatibility layer (cpu_compat) is switched on;
* Megatron-LM's argument checks see GPU architecture 0 (``get_device_arch_version``, asked with TP > 1),
  and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set if unset (they assert it below Blackwell);
* ``initialize_megatron`` is called with ``allow_no_cuda=True`` (its CUDA assert);
* ``megatron.legacy.fused_kernels.load`` (0.16 trees; gone from core_v0.19) builds nothing;
* before Megatron-LM's own ``validate_args``: ``--distributed-backend gloo``, ``--transformer-impl local``,
  and the fusions that need
  Apex / TE kernels are off (``--no-persist-layer-norm --no-gradient-accumulation-fusion
  --no-masked-softmax-fusion``, bias-GELU/SwiGLU and bias-dropout fusions), each said once on rank 0
  when it overrides a flag the user gave;
* the model config gets ``batch_p2p_comm=False``: gloo's batched p2p pairs messages of different
  microbatches (cpu_compat.transformer_config_overrides says why); Megatron-LM derives the flag from
  ``--overlap-p2p-comm``, which it forces off without the interleaved schedule.

Numerics are megatron-core's own CPU paths; nothing here is faster or different on a GPU machine, where
none of it runs.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable

import torch

_ENABLED = False

# Megatron-LM flag dest -> value on CPU (Apex / TE kernels, CUDA-only JIT fusions).
CPU_ARGS = {
    "distributed_backend": "gloo",
    "transformer_impl": "local",  # Transformer Engine layers need CUDA
    "no_persist_layer_norm": True,
    "gradient_accumulation_fusion": False,
    "masked_softmax_fusion": False,
    "bias_gelu_fusion": False,
    "bias_swiglu_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "cross_entropy_loss_fusion": False,
}


def enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Switch Megatron-LM to CPU / gloo if CUDA is absent; returns whether it is on. Idempotent."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    from megatron_edit import cpu_compat

    cpu_compat.activate(True)
    # Megatron-LM asserts this with TP > 1 on GPUs before Blackwell (architecture 0 here, below); it
    # orders CUDA kernel launches and means nothing on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        from megatron.legacy import fused_kernels  # Megatron-LM core_v0.16 trees
    except ImportError:
        fused_kernels = None
    if fused_kernels is not None and hasattr(fused_kernels, "load"):
        fused_kernels.load = lambda *args, **kwargs: None
    try:
        from megatron.training import arguments
    except ImportError:  # not a Megatron-LM tree: install() says so in one line
        arguments = None
    if arguments is not None and hasattr(arguments, "get_device_arch_version"):
        # validate_args asks for the GPU architecture (with TP > 1); a CPU has none. torch's own
        # get_device_properties stays untouched: torch.compile reads it too.
        arguments.get_device_arch_version = lambda: 0
    _ENABLED = True
    return True


def adjust_args(args: Any) -> None:
    """Before Megatron-LM's validate_args: the CPU settings of CPU_ARGS (a no-op with CUDA)."""
    if not _ENABLED:
        return
    changed = []
    for dest, value in CPU_ARGS.items():
        if hasattr(args, dest) and getattr(args, dest) != value:
            changed.append(dest)
            setattr(args, dest, value)
    if changed and getattr(args, "rank", 0) == 0:
        print(f" > megatron_edit: no CUDA: Megatron-LM runs on CPU with gloo ({', '.join(changed)} set for CPU)",
              file=sys.stderr, flush=True)


def adjust_model_config(config: Any) -> None:
    """The model's TransformerConfig, before the schedules read it (a no-op with CUDA)."""
    if _ENABLED and config is not None and hasattr(config, "batch_p2p_comm"):
        config.batch_p2p_comm = False


def adjust_optimizer(optimizer: Any) -> None:
    """Without Apex / TE, megatron-core falls back to torch's Adam, whose state is empty until the first
    step; the distributed optimizer's checkpoint code asserts one shared ``step`` (and its
    ``fully_reshardable`` loader expects ``step`` among the loaded keys), so a ``--load`` would fail
    before the first step; and its load puts one ``step`` tensor into every param's state, which torch's
    Adam then increments once per param (bias correction runs ahead after a resume). Both are fixed
    around the optimizer's load (mcore_adapter); the local-SGD checkpoint wrapper
    (checkpoint/megatron_lm.py) does the same on any hardware."""
    if not _ENABLED or optimizer is None:
        return
    from megatron_edit import mcore_adapter

    original_sharded_state_dict, original_load_state_dict = optimizer.sharded_state_dict, optimizer.load_state_dict

    def sharded_state_dict(model_sharded_state_dict, is_loading: bool = False, **kwargs):
        if is_loading:
            mcore_adapter.init_torch_adam_state(optimizer)
            mcore_adapter.patch_fully_reshardable_load(optimizer)
        return original_sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)

    def load_state_dict(state_dict):
        result = original_load_state_dict(state_dict)
        step = mcore_adapter.inner_optimizer_step(optimizer)
        if step is not None:  # one loaded step tensor shared by every param (set_inner_optimizer_step)
            mcore_adapter.set_inner_optimizer_step(optimizer, step)
        return result

    optimizer.sharded_state_dict = sharded_state_dict
    optimizer.load_state_dict = load_state_dict


def wrap_initialize_megatron(original: Callable) -> Callable:
    """``initialize_megatron`` with ``allow_no_cuda=True`` in CPU mode; untouched otherwise."""

    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        if _ENABLED:
            bound = signature.bind(*args, **kwargs)
            bound.arguments["allow_no_cuda"] = True
            args, kwargs = bound.args, bound.kwargs
        return original(*args, **kwargs)

    initialize_megatron.megatron_edit = True
    return initialize_megatron
