"""CPU / gloo compatibility layer for megatron-core (SPEC section 6).

megatron-core assumes CUDA in a few dozen places: ``torch.cuda.current_device()`` used as a device,
``device="cuda"`` factory arguments, ``.cuda()``, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks in
the optimizers, CUDA streams/events around the DDP collectives, and a CUDA RNG tracker. On a machine
without CUDA (CI, laptops, debugging runs) this module redirects exactly those, in one place:

* a ``TorchFunctionMode`` that rewrites CUDA device arguments to CPU, makes ``Tensor.cuda()`` and
  ``pin_memory`` no-ops, and reports CPU tensors as ``torch.cuda.*Tensor`` from ``Tensor.type()``;
* stand-ins for the ``torch.cuda`` stream/event/synchronize/memory/nvtx functions megatron-core calls;
* the CUDA RNG: ``torch.cuda.manual_seed`` seeds the CPU default generator (on a CPU build it is a silent
  no-op, which gives every TP rank different "replicated" parameters), ``manual_seed_all`` must not recurse
  (``torch.manual_seed`` calls it), and megatron-core's RNG tracker reads/writes the CPU generator.

It refuses megatron-core versions it was not checked on, and it is never active when CUDA is available
unless explicitly forced. ``deactivate()`` restores everything (tests use it).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_edit import mcore_adapter

_ACTIVE: "_CpuCompat | None" = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
}


def _is_cuda_device(device: Any) -> bool:
    """Any device that would mean an accelerator: 'cuda', 'cuda:0', torch.device('cuda'), or a bare index."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls to CPU; everything else passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _FakeStream:
    """Stands in for torch.cuda.Stream: CPU ops are already ordered, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _FakeEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _FakeEvent:
    """Stands in for torch.cuda.Event; timing uses the host clock."""

    def __init__(self, *args, **kwargs):
        import time

        self._time = time.perf_counter
        self._t = None

    def record(self, stream=None) -> None:
        self._t = self._time()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end._t - self._t) * 1000.0


_REENTRANT_NULL = contextlib.nullcontext()  # nullcontext may be entered any number of times


class _FakeNvtx:
    @staticmethod
    def range_push(msg):
        return 0

    @staticmethod
    def range_pop():
        return 0

    @staticmethod
    def range(msg, *args, **kwargs):
        return _REENTRANT_NULL

    @staticmethod
    def mark(msg):
        pass


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.default_generator.set_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    """The RNG tracker warns when the CPU generator moves inside a fork; here the CPU generator *is* the
    forked generator, so the warning is always true and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


class _CpuCompat:
    """Holds the originals so deactivate() can restore them."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode = _CudaToCpuMode()

    _MISSING = object()

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name, self._MISSING)))
        setattr(owner, name, value)

    def apply(self) -> None:
        cuda = torch.cuda
        default_stream = _FakeStream()
        self._patch(cuda, "current_device", lambda: 0)
        self._patch(cuda, "device_count", lambda: 1)
        self._patch(cuda, "set_device", lambda *a, **k: None)
        self._patch(cuda, "Stream", _FakeStream)
        self._patch(cuda, "Event", _FakeEvent)
        self._patch(cuda, "stream", lambda *a, **k: _REENTRANT_NULL)
        self._patch(cuda, "current_stream", lambda *a, **k: default_stream)
        self._patch(cuda, "default_stream", lambda *a, **k: default_stream)
        self._patch(cuda, "set_stream", lambda *a, **k: None)
        self._patch(cuda, "synchronize", lambda *a, **k: None)
        self._patch(cuda, "empty_cache", lambda *a, **k: None)
        self._patch(cuda, "memory_allocated", lambda *a, **k: 0)
        self._patch(cuda, "max_memory_allocated", lambda *a, **k: 0)
        self._patch(cuda, "memory_reserved", lambda *a, **k: 0)
        self._patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
        self._patch(cuda, "nvtx", _FakeNvtx)
        # RNG: the CUDA generator is the CPU default generator.
        self._patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
        self._patch(cuda, "manual_seed_all", lambda seed: None)  # torch.manual_seed calls this
        self._patch(cuda, "get_rng_state", _cpu_get_rng_state)
        self._patch(cuda, "set_rng_state", _cpu_set_rng_state)
        rng = mcore_adapter.rng_module()
        self._patch(rng, "_get_cuda_rng_state", _cpu_get_rng_state)
        self._patch(rng, "_set_cuda_rng_state", _cpu_set_rng_state)
        self._rng_logger = logging.getLogger(rng.__name__)
        self._rng_filter = _DropCpuRngWarning()
        self._rng_logger.addFilter(self._rng_filter)
        self._mode.__enter__()

    def restore(self) -> None:
        self._mode.__exit__(None, None, None)
        self._rng_logger.removeFilter(self._rng_filter)
        for owner, name, value in reversed(self._saved):
            if value is self._MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._saved.clear()


def activate(enabled: bool | None = None) -> bool:
    """Switch the layer on if CUDA is absent (``enabled=None``), or as asked (``True``/``False``).

    Returns whether the layer is active. Raises RuntimeError for an unsupported megatron-core version
    before touching anything.
    """
    global _ACTIVE
    if enabled is None:
        enabled = not torch.cuda.is_available()
    if not enabled:
        return _ACTIVE is not None
    if _ACTIVE is not None:
        return True
    mcore_adapter.check_megatron_core_version()
    compat = _CpuCompat()
    compat.apply()
    _ACTIVE = compat
    return True


def deactivate() -> None:
    """Restore every patched attribute (for tests and for handing the process back to CUDA code)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.restore()
        _ACTIVE = None


def is_active() -> bool:
    return _ACTIVE is not None


def transformer_config_overrides() -> dict:
    """TransformerConfig settings the gloo backend needs (empty when the layer is off).

    ``batch_p2p_comm=False``: gloo matches point-to-point messages between two ranks in posting order;
    megatron-core's batched p2p path posts forward and backward messages in different orders on the
    two sides (NCCL groups make that safe), which pairs activations of different microbatches under the
    interleaved schedule (measured: wrong loss from the first iteration with 4 microbatches, PP 2, VPP 2).
    The unbatched path orders them even/odd and is correct on gloo.
    """
    return {"batch_p2p_comm": False} if is_active() else {}
