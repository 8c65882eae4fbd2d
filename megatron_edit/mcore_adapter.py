"""Every megatron-core internal megatron_edit depends on, named in one place.

Checked on megatron-core 0.16.1 (SUPPORTED_MCORE). Public API (GPTModel, DistributedDataParallel,
get_megatron_optimizer, parallel_state getters) is imported where it is used; what is listed here is
private or undocumented and may move between releases, so each accessor says what it relies on.
"""
from __future__ import annotations

import importlib
from typing import Any

SUPPORTED_MCORE = ((0, 16, 1), (0, 17, 0))  # [min, max) checked
SUPPORTED_MCORE_TEXT = ">=0.16.1,<0.17"


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _version_tuple(text: str) -> tuple[int, int, int]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_megatron_core_version(version: str | None = None) -> None:
    """Refuse a megatron-core this adapter was not checked against, with one clear line."""
    version = version or megatron_core_version()
    low, high = SUPPORTED_MCORE
    if not (low <= _version_tuple(version) < high):
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
