"""Realistic worker faults for ``--local-sgd-debug-fault W:KIND:START[:LENGTH]`` (quality benchmarks and tests).

What the pseudo-gradient penalty has to survive in practice, injected into one worker W from iteration
START for LENGTH iterations (default 1), identically on every rank of that worker:

- ``random-tokens``: the worker trains on uniformly random tokens (inputs and labels): a corrupted data
  shard. Its gradients point nowhere useful but have an ordinary size.
- ``repeated-tokens``: every sequence is one token repeated (inputs and labels): a degenerate shard
  (e.g. a deduplication or packing bug). The loss falls fast, and the worker drifts towards predicting
  that token.
- ``loss-spike``: the worker's gradients are multiplied by ``SPIKE_FACTOR`` (one bad batch, the classic
  loss spike). Without gradient clipping Adam's second moment jumps by ``SPIKE_FACTOR**2`` and the
  worker is nearly frozen for ~1/(1 - beta2) steps afterwards (its pseudo-gradient norm collapses).
- ``bit-flip``: after the optimizer step of iteration START, bit ``FLIPPED_BIT`` (the top exponent bit)
  of one fp32 master weight of the worker flips: a silent data corruption. A weight of 0.02 becomes
  ~7e36, so the worker's loss and then its whole state turn non-finite. LENGTH must be 1.
- ``kill``: after the optimizer step (and sync, if any) of iteration START, every rank of the worker sends
  itself SIGKILL: a node lost between syncs. Restarted with the same command, an elastic worker heals to
  a later iteration, so the fault does not fire again. LENGTH must be 1.
- ``kill-in-sync``: in the sync at iteration START, after the workers exchanged their norms and before the
  pseudo-gradient reduction, every rank of the worker sends itself SIGKILL (a node lost in the middle of
  a sync; elastic workers must finish that sync without it). LENGTH must be 1.

A straggler, ``--local-sgd-debug-slow-worker W:FACTOR`` (``SlowWorker``): every rank of worker W sleeps
(FACTOR - 1) x the time of its own step after each optimizer step, for every method and during the
synchronous warmup too (where, as in synchronous DP, everybody then waits for it).

The older ``--local-sgd-debug-corrupt-worker W:SCALE:PROB`` (Gaussian gradient noise with probability
PROB per step) stays in ``local_sgd.LocalSGD._maybe_corrupt``.

Data faults replace the model's inputs in a forward pre-hook of every model chunk (GPTModel's
``input_ids`` argument and ``labels`` keyword, present on the first / last pipeline stage), in training
mode only, so they work under any entry (ours or Megatron-LM's) without touching the data pipeline. Each
micro-batch becomes a window of one corrupted document (labels = inputs shifted by one, as in real data),
drawn from a generator seeded by (seed, iteration, micro-batch, data-parallel rank): the same on the
tensor-parallel ranks and on the first and last pipeline stage of a micro-batch. The iteration a forward belongs to is the one
after the last optimizer step this injector saw (``after_optimizer_step``), or ``start_iteration + 1``
(our entry sets it after a checkpoint load; inside Megatron-LM the count is right from the first
optimizer step after a resume, so a data fault due in the very first resumed iteration is missed).
Faults are meant for iterations after ``--local-sgd-warmup-iters``: during the synchronous warmup a
worker's gradients are averaged into every worker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FAULT_KINDS: tuple[str, ...] = ("random-tokens", "repeated-tokens", "loss-spike", "bit-flip", "kill", "kill-in-sync")
SPIKE_FACTOR = 1000.0
FLIPPED_BIT = 30  # fp32: sign 31, exponent 30..23, mantissa 22..0


@dataclass(frozen=True)
class FaultSpec:
    worker: int
    kind: str
    start: int
    length: int = 1

    def active(self, iteration: int) -> bool:
        return self.start <= iteration < self.start + self.length


# The parsed flag lives in the args namespace that checkpoints save in their common state, which
# megatron-core reads back with torch.load(weights_only=True): allow this plain record there.
torch.serialization.add_safe_globals([FaultSpec])


def parse_fault_spec(text: str) -> FaultSpec:
    """``W:KIND:START[:LENGTH]`` -> FaultSpec; ValueError with the expected form otherwise."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"expected W:KIND:START[:LENGTH], got {text!r}")
    try:
        worker, start = int(parts[0]), int(parts[2])
        length = int(parts[3]) if len(parts) == 4 else 1
    except ValueError:
        raise ValueError(f"expected W:KIND:START[:LENGTH] with integer W, START, LENGTH, got {text!r}") from None
    kind = parts[1]
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault kind {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    if start < 1 or length < 1:
        raise ValueError(f"START {start} and LENGTH {length} must be >= 1")
    if kind in ("bit-flip", "kill", "kill-in-sync") and length != 1:
        raise ValueError(f"{kind} happens once: LENGTH must be 1, got {length}")
    return FaultSpec(worker, kind, start, length)


def flip_bit_(values: torch.Tensor, index: int, bit: int = FLIPPED_BIT) -> None:
    """Flip one bit (0..30) of one element of a contiguous fp32 tensor, in place."""
    if values.dtype != torch.float32 or not 0 <= bit <= 30:
        raise ValueError(f"flip_bit_ needs fp32 values and a bit in 0..30, got {values.dtype}, bit {bit}")
    values.view(-1)[index:index + 1].view(torch.int32).bitwise_xor_(1 << bit)


def model_vocab_size(chunk) -> int:
    """The (padded) vocabulary size of a model chunk wrapped in DDP / Float16Module."""
    module = chunk
    while not hasattr(module, "vocab_size") and hasattr(module, "module"):
        module = module.module
    if not hasattr(module, "vocab_size"):
        raise ValueError(f"--local-sgd-debug-fault: {type(chunk).__name__} has no vocab_size (not a GPTModel?)")
    return int(module.vocab_size)


def corrupt_tokens(tokens: torch.Tensor, kind: str, vocab_size: int, generator: torch.Generator,
                   labels: bool = False) -> torch.Tensor:
    """A corrupted copy of a [batch, seq] token tensor, as a shifted window of one corrupted document of
    seq + 1 tokens: inputs are its first seq tokens, labels (``labels=True``) its last seq, so inputs and
    labels drawn with equal generators are a consistent next-token pair (on different pipeline stages too).
    ``random-tokens``: uniformly random ids (the next token is unpredictable); ``repeated-tokens``: each row
    one id, drawn per row."""
    batch, seq = tokens.shape
    if kind == "random-tokens":
        document = torch.randint(0, vocab_size, (batch, seq + 1), generator=generator)
    elif kind == "repeated-tokens":
        document = torch.randint(0, vocab_size, (batch, 1), generator=generator).expand(batch, seq + 1)
    else:
        raise ValueError(f"corrupt_tokens: {kind!r} is not a data fault")
    values = document[:, 1:] if labels else document[:, :-1]
    return values.to(device=tokens.device, dtype=tokens.dtype).contiguous()


class FaultInjector:
    """Injects one FaultSpec into worker ``spec.worker`` (a no-op on the other workers' ranks)."""

    def __init__(self, spec: FaultSpec, worker_index: int, model_chunks, vocab_size: int, seed: int,
                 data_parallel_rank: int, first_shard_rank: bool):
        self.spec = spec
        self.mine = worker_index == spec.worker
        self.model = model_chunks
        self.vocab_size = vocab_size
        self.seed = seed
        self.data_parallel_rank = data_parallel_rank
        self.first_shard_rank = first_shard_rank  # the one rank of the worker that flips a bit
        self.next_iteration = 1
        self._micro_batch = [0] * len(model_chunks)
        self.injected = 0  # how many times this rank applied the fault (tests read it)
        if self.mine and spec.kind in ("random-tokens", "repeated-tokens"):
            for index, chunk in enumerate(model_chunks):
                chunk.register_forward_pre_hook(self._data_hook(index), with_kwargs=True)

    def start_iteration(self, iteration: int) -> None:
        """The iteration a (resumed) run starts after."""
        self.next_iteration = iteration + 1
        self._micro_batch = [0] * len(self.model)

    def _data_hook(self, chunk_index: int):
        def hook(module, args, kwargs):
            if not module.training or not self.spec.active(self.next_iteration):
                return None
            micro_batch = self._micro_batch[chunk_index]
            self._micro_batch[chunk_index] += 1

            def draw(tensor: Optional[torch.Tensor], labels: bool) -> Optional[torch.Tensor]:
                if not isinstance(tensor, torch.Tensor):
                    return tensor
                generator = torch.Generator().manual_seed(
                    (self.seed * 1000003 + self.next_iteration * 8191 + micro_batch * 131
                     + self.data_parallel_rank) % (2 ** 63))
                return corrupt_tokens(tensor, self.spec.kind, self.vocab_size, generator, labels=labels)

            args = list(args)
            if args:
                args[0] = draw(args[0], labels=False)
            if "input_ids" in kwargs:
                kwargs["input_ids"] = draw(kwargs["input_ids"], labels=False)
            if "labels" in kwargs:
                kwargs["labels"] = draw(kwargs["labels"], labels=True)
            elif len(args) > 4:
                args[4] = draw(args[4], labels=True)
            self.injected += 1
            return tuple(args), kwargs

        return hook

    def spikes_at(self, iteration: int) -> bool:
        """Whether this rank's gradients of ``iteration`` are to be scaled (``loss-spike``)."""
        return self.mine and self.spec.kind == "loss-spike" and self.spec.active(iteration)

    def before_optimizer_step(self, iteration: int, grad_buffers) -> None:
        """``loss-spike``: scale the worker's reduced gradients (``grad_buffers``: flat tensors)."""
        if self.spikes_at(iteration):
            for grad in grad_buffers:
                grad.mul_(SPIKE_FACTOR)
            self.injected += 1

    def _kill_if(self, kind: str, iteration: int) -> None:
        if self.mine and self.spec.kind == kind and self.spec.active(iteration):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def in_sync(self, iteration: int) -> None:
        """``kill-in-sync``: called between the norms' exchange and the pseudo-gradient reduction."""
        self._kill_if("kill-in-sync", iteration)

    def after_optimizer_step(self, iteration: int, main_shards) -> None:
        """``bit-flip``: one element of the first non-empty fp32 main shard of the worker's first rank."""
        self.next_iteration = iteration + 1
        self._micro_batch = [0] * len(self.model)
        self._kill_if("kill", iteration)
        if not (self.mine and self.spec.kind == "bit-flip" and self.spec.active(iteration)):
            return
        if not self.first_shard_rank:
            return
        for main in main_shards:
            if main.numel() > 0 and main.dtype == torch.float32:
                with torch.no_grad():
                    flip_bit_(main.detach(), 0)
                self.injected += 1
                return


class SlowWorker:
    """A worker FACTOR times slower than the others (older GPUs, thermal throttling, a busy host).

    The step time is measured from the previous ``after_sync`` (after any sync) to ``before_sync``, so it
    is the worker's own forward, backward and optimizer step, not time spent waiting for the others."""

    def __init__(self, factor: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        self.factor = factor
        self.clock = clock
        self.sleep = sleep
        self._start = clock()

    def before_sync(self) -> None:
        self.sleep((self.factor - 1.0) * max(0.0, self.clock() - self._start))

    def after_sync(self) -> None:
        self._start = self.clock()

