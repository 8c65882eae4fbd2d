"""Cross-worker mean of pseudo-gradients over a quantized wire, accumulated in fp32.

Streaming DiLoCo (Douillard et al., arXiv 2501.18512, "quantized outer gradients") quantizes what each worker
sends but never adds in low precision: every partial sum is formed in fp32 from dequantized contributions
(SPEC 2.5). A plain ``all_reduce`` on a low-precision tensor would add in that precision at every ring hop,
so the reduction is built from data movement only:

``reduce-scatter`` (default, :data:`REDUCE_SCATTER`)
    Phase 1: each rank encodes its whole contribution once and sends chunk p (its blocks and their scales)
    to rank p with one ``all_to_all_single``; rank p decodes the W pieces of its chunk and sums them in fp32
    in rank order, then divides by ``divisor``. Phase 2: rank p re-encodes its reduced chunk and sends it to
    every peer (an all-gather done as ``all_to_all_single`` because chunk sizes may differ by one block).
    Result chunk p = decode(encode(sum_w decode(encode(c_w))[chunk p] / divisor)): the sum itself is
    exact fp32, the second quantization is the price of sending each reduced chunk once. Traffic per rank:
    ~2 (W-1)/W of one encoded vector, like a ring all-reduce.
``all-gather`` (:data:`ALL_GATHER`)
    Every rank all-gathers every rank's encoded vector and sums the W decoded vectors in fp32 in rank
    order: result = sum_w decode(encode(c_w)) / divisor, with a single quantization. Traffic per rank:
    (W-1) encoded vectors, so worth it only for small W (or when one quantization matters more than bytes).

``fp32`` is always a plain ``all_reduce`` (SUM in fp32 is already exact accumulation), whatever the algorithm.
With a single rank nothing crosses a wire, so nothing is quantized: the result is ``c / divisor``.

Here ``c_w = weight_w * x_w`` (+ the error-feedback residual when one is given), with NaN/Inf entries replaced
by 0 so one bad worker cannot poison every worker's sum; the penalty of SPEC 2.2 is where a non-finite
delta makes a worker anomalous (weight 0). The local flag is kept on the handle (``nonfinite``).

Why ``all_to_all_single``: megatron-core's template
(``megatron/core/distributed/reduce_scatter_with_fp32_accumulation.py``) does its fp32-accumulating
reduce-scatter the same way. gloo implements ``all_to_all_single`` (checked on torch 2.13 CPU, uint8, uneven
and empty splits, ``async_op=True``), and so does NCCL, so one code path serves both; the all-gather variant
uses ``all_gather_single`` (``all_gather_into_tensor`` on older torch), also on both backends.

Bytes: ``bytes_sent`` counts exactly the payload and scale bytes this rank hands to other ranks (its own chunk
excluded), computed from sizes on the host (no sync). It is the traffic of a bandwidth-optimal (direct or
ring) implementation; for the fp32 ``all_reduce`` it is the same reduce-scatter + all-gather count, since the
backend's own all-reduce algorithm is not observable.

Memory: with ``inplace=True`` the caller's fp32 vector is the contribution buffer (weighted, compensated and
sanitised in place), then, once encoded, the buffer the result is decoded into, so a reduction needs no
fp32 temporary of its size: beyond it, the encoded bytes sent and received (bits / 32 of the fp32 size
each way: fp4 ~0.14x, int8 ~0.28x, bf16 0.5x) and codec temporaries bounded by :data:`CODEC_CHUNK`
elements (every encode and decode runs chunk by chunk; blocks are independent, so the bytes are those of
one whole-vector encode). fp32 is an in-place all-reduce.

Async: :func:`launch_quantized_all_reduce_mean` starts the first collective and returns a handle; training can
go on while it is in flight (Streaming DiLoCo's overlap of tau inner steps). ``handle.advance()`` finishes
phase 1 and launches phase 2 without waiting for it; ``handle.wait()`` completes everything and returns the
fp32 result. Collectives on one group must be issued in the same order on every rank, so call ``advance``
and ``launch`` at the same (deterministic) point on all ranks, never based on polling.
"""
from __future__ import annotations

import math
import time
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_edit.wire_codecs import (
    Encoded,
    ErrorFeedback,
    WireFormat,
    decode,
    encode,
    get_format,
    num_blocks,
    payload_bytes,
    wire_bytes,
)

__all__ = [
    "REDUCE_SCATTER",
    "ALL_GATHER",
    "ALGORITHMS",
    "QuantizedAllReduceHandle",
    "chunk_bounds",
    "predicted_bytes_sent",
    "launch_quantized_all_reduce_mean",
    "quantized_all_reduce_mean",
]

REDUCE_SCATTER = "reduce-scatter"
ALL_GATHER = "all-gather"
ALGORITHMS: tuple[str, ...] = (REDUCE_SCATTER, ALL_GATHER)

Weight = float | torch.Tensor


class QuantizedAllReduceHandle(Protocol):
    """An in-flight quantized all-reduce.

    ``bytes_sent``: bytes this rank sends to other ranks in total (known at launch).
    ``nonfinite``: 0-dim bool tensor, True if this rank's contribution had NaN/Inf entries (sent as 0).
    """

    bytes_sent: int
    nonfinite: torch.Tensor

    def advance(self) -> None:
        """Finish the current phase and launch the next collective (no-op if there is none)."""

    def wait(self) -> torch.Tensor:
        """Complete the reduction and return the fp32 result (same values on every rank)."""


def chunk_bounds(
    numel: int, world_size: int, fmt: str | WireFormat, block_size: int = 128
) -> list[tuple[int, int]]:
    """Element range [start, end) of each rank's reduce-scatter chunk.

    Boundaries fall on block boundaries (so a chunk's blocks are the whole vector's blocks, and one encode
    of the whole vector serves every peer) and, for 4-bit formats, on byte boundaries. Whole units are dealt
    out as evenly as possible, the first ranks getting one more; the last non-empty chunk ends at ``numel``
    (a partial block). Ranks may get empty chunks when the vector is small.
    """
    fmt = get_format(fmt)
    unit = block_size if fmt.has_scales else 1
    if fmt.bits < 8 and unit % 2:
        unit *= 2
    units = math.ceil(numel / unit)
    base, extra = divmod(units, world_size)
    bounds = []
    start = 0
    for rank in range(world_size):
        end = min(numel, start + (base + (rank < extra)) * unit)
        bounds.append((start, end))
        start = end
    return bounds


def _message(enc: Encoded, start: int, end: int, fmt: WireFormat, block_size: int) -> torch.Tensor:
    """Bytes of elements [start, end) of a whole-vector encoding: payload slice then its scales."""
    bits = fmt.bits
    payload = enc.payload[start * bits // 8 : start * bits // 8 + payload_bytes(end - start, fmt)]
    if enc.scales is None:
        return payload
    first = start // block_size
    scales = enc.scales[first : first + num_blocks(end - start, fmt, block_size)]
    return torch.cat([payload, scales.contiguous().view(torch.uint8)])


CODEC_CHUNK = 1 << 16  # elements encoded or decoded at a time: the codecs need ~16 fp32-sized temporaries of it


def _codec_step(fmt: WireFormat, block_size: int) -> int:
    """CODEC_CHUNK rounded down to whole blocks (scaled formats) and whole bytes (4-bit formats)."""
    unit = block_size if fmt.has_scales else 1
    if fmt.bits < 8 and unit % 2:
        unit *= 2
    return max(unit, CODEC_CHUNK // unit * unit)


def _sanitize_(x: torch.Tensor, step: int) -> torch.Tensor:
    """In place: NaN/Inf entries become 0; returns the 0-dim bool "had one" (no host sync)."""
    flag = torch.zeros((), dtype=torch.bool, device=x.device)
    for lo in range(0, x.numel(), step):
        piece = x[lo:lo + step]
        flag |= ~torch.isfinite(piece).all()
        piece.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return flag


def _encode_bounded(x: torch.Tensor, fmt: WireFormat, block_size: int, stochastic: bool,
                    generator: torch.Generator | None, error_feedback: ErrorFeedback | None) -> Encoded:
    """``encode(x)`` chunk by chunk into one payload and one scale vector (the same bytes: blocks are
    independent), recording the error-feedback residual of each chunk as it goes."""
    n = x.numel()
    payload = torch.empty(payload_bytes(n, fmt), dtype=torch.uint8, device=x.device)
    scales = torch.empty(num_blocks(n, fmt, block_size), dtype=torch.float32, device=x.device) \
        if fmt.has_scales else None
    step = _codec_step(fmt, block_size)
    for lo in range(0, n, step):
        piece = x[lo:lo + step]
        enc = encode(piece, fmt, block_size, stochastic, generator)
        start = lo * fmt.bits // 8
        payload[start:start + enc.payload.numel()] = enc.payload
        if scales is not None:
            scales[lo // block_size:lo // block_size + enc.scales.numel()] = enc.scales
        if error_feedback is not None:
            error_feedback.record_slice(lo, n, piece, decode(enc, fmt, block_size))
    return Encoded(payload, scales, n, torch.zeros((), dtype=torch.bool, device=x.device))


def _decode_into(out: torch.Tensor, message: torch.Tensor, fmt: WireFormat, block_size: int,
                 accumulate: bool) -> None:
    """``out`` (1-D fp32) := (or +=) the decoded :func:`_message` of ``out.numel()`` elements, chunk by chunk."""
    n = out.numel()
    size = payload_bytes(n, fmt)
    step = _codec_step(fmt, block_size)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        start = lo * fmt.bits // 8
        payload = message[start:start + payload_bytes(hi - lo, fmt)]
        scales = None
        if fmt.has_scales:
            first = size + 4 * (lo // block_size)
            scales = _view_fp32(message[first:first + 4 * num_blocks(hi - lo, fmt, block_size)])
        empty = torch.zeros((), dtype=torch.bool, device=message.device)
        values = decode(Encoded(payload, scales, hi - lo, empty), fmt, block_size)
        if accumulate:
            out[lo:hi] += values
        else:
            out[lo:hi] = values


def _view_fp32(data: torch.Tensor) -> torch.Tensor:
    return data.clone().view(torch.float32)  # clone: the slice may be misaligned for fp32


def _divide_(x: torch.Tensor, divisor: Weight) -> None:
    if not (isinstance(divisor, (int, float)) and divisor == 1):
        x.div_(divisor)


def _chunk_wire_sizes(
    numel: int, world_size: int, fmt: WireFormat, block_size: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Chunk bounds and the wire bytes of each chunk's encoding."""
    bounds = chunk_bounds(numel, world_size, fmt, block_size)
    return bounds, [wire_bytes(end - start, fmt, block_size) for start, end in bounds]


def _reduce_scatter_all_gather_bytes(sizes: list[int], rank: int) -> int:
    """Phase 1 sends every peer its chunk; phase 2 sends this rank's reduced chunk to every peer."""
    own = sizes[rank]
    return sum(sizes) - own + (len(sizes) - 1) * own


def predicted_bytes_sent(
    numel: int, world_size: int, rank: int, fmt: str | WireFormat, block_size: int = 128,
    algorithm: str = REDUCE_SCATTER,
) -> int:
    """What :func:`launch_quantized_all_reduce_mean` will report as ``bytes_sent`` for a vector of
    ``numel`` elements, known before launching (sync log lines report it at sync time)."""
    fmt = get_format(fmt)
    if world_size <= 1 or numel == 0:
        return 0
    if algorithm == ALL_GATHER and fmt.name != "fp32":
        return (world_size - 1) * wire_bytes(numel, fmt, block_size)
    _, sizes = _chunk_wire_sizes(numel, world_size, fmt, block_size)
    return _reduce_scatter_all_gather_bytes(sizes, rank)


def _all_gather_into(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


class _Waits:
    """``waited_seconds``: time blocked in the collectives themselves (the network), as opposed to the
    codec work done in ``advance`` / ``wait`` (on a GPU: kernels queued on the stream, not host time)."""

    waited_seconds = 0.0

    def _wait_work(self) -> None:
        start = time.perf_counter()
        self.work.wait()
        self.waited_seconds += time.perf_counter() - start


class _Done(_Waits):
    """No communication (one rank, or an empty vector)."""

    def __init__(self, result: torch.Tensor, nonfinite: torch.Tensor) -> None:
        self.result, self.nonfinite, self.bytes_sent = result, nonfinite, 0

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        return self.result


class _PlainAllReduce(_Waits):
    """fp32: ``all_reduce`` SUM of the contribution, then division by ``divisor``."""

    def __init__(
        self,
        contribution: torch.Tensor,
        group: ProcessGroup,
        divisor: Weight,
        nonfinite: torch.Tensor,
        bytes_sent: int,
    ) -> None:
        self.buffer, self.divisor = contribution, divisor
        self.nonfinite, self.bytes_sent = nonfinite, bytes_sent
        self.work = dist.all_reduce(self.buffer, group=group, async_op=True)

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self._wait_work()
            self.work = None
            if not (isinstance(self.divisor, (int, float)) and self.divisor == 1):
                self.buffer.div_(self.divisor)
        return self.buffer


class _AllGather(_Waits):
    """All-gather of every rank's encoded vector, fp32 sum of the decoded vectors in rank order."""

    def __init__(
        self,
        enc: Encoded,
        group: ProcessGroup,
        fmt: WireFormat,
        block_size: int,
        divisor: Weight,
        nonfinite: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        self.fmt, self.block_size, self.divisor, self.nonfinite = fmt, block_size, divisor, nonfinite
        self.numel, self.out = enc.numel, out
        self.world_size = dist.get_world_size(group)
        message = _message(enc, 0, enc.numel, fmt, block_size)
        self.message_bytes = message.numel()
        self.bytes_sent = (self.world_size - 1) * self.message_bytes
        self.received = torch.empty(
            self.world_size * self.message_bytes, dtype=torch.uint8, device=message.device
        )
        self.work = _all_gather_into(self.received, message, group, async_op=True)
        self.result: torch.Tensor | None = None

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        if self.result is None:
            self._wait_work()
            for index, message in enumerate(self.received.split(self.message_bytes)):  # fp32 sum in rank order
                _decode_into(self.out, message, self.fmt, self.block_size, accumulate=index > 0)
            _divide_(self.out, self.divisor)
            self.result, self.received = self.out, None
        return self.result


class _ReduceScatterAllGather(_Waits):
    """Phase 1 all-to-all of quantized chunks + fp32 sum; phase 2 all-to-all of the requantized sums."""

    def __init__(
        self,
        enc: Encoded,
        group: ProcessGroup,
        fmt: WireFormat,
        block_size: int,
        divisor: Weight,
        nonfinite: torch.Tensor,
        stochastic: bool,
        generator: torch.Generator | None,
        out: torch.Tensor,
    ) -> None:
        self.group, self.fmt, self.block_size, self.divisor, self.out = group, fmt, block_size, divisor, out
        self.nonfinite, self.stochastic, self.generator = nonfinite, stochastic, generator
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds, self.sizes = _chunk_wire_sizes(enc.numel, self.world_size, fmt, block_size)
        self.bytes_sent = _reduce_scatter_all_gather_bytes(self.sizes, self.rank)
        own = self.sizes[self.rank]

        send = torch.cat([_message(enc, start, end, fmt, block_size) for start, end in self.bounds])
        self.received = torch.empty(self.world_size * own, dtype=torch.uint8, device=send.device)
        self.work = dist.all_to_all_single(
            self.received, send, [own] * self.world_size, self.sizes, group=group, async_op=True
        )
        self.phase = 1
        self.result: torch.Tensor | None = None

    def advance(self) -> None:
        if self.phase != 1:
            return
        self._wait_work()
        start, end = self.bounds[self.rank]
        own = self.sizes[self.rank]
        reduced = self.out[start:end]  # this rank's own contribution is already encoded and sent
        for index, message in enumerate(self.received.split(own)):  # fp32 sum in rank order
            _decode_into(reduced, message, self.fmt, self.block_size, accumulate=index > 0)
        _divide_(reduced, self.divisor)
        enc = _encode_bounded(reduced, self.fmt, self.block_size, self.stochastic, self.generator, None)
        message = _message(enc, 0, end - start, self.fmt, self.block_size)
        self.received = torch.empty(sum(self.sizes), dtype=torch.uint8, device=message.device)
        self.work = dist.all_to_all_single(
            self.received, message.repeat(self.world_size), self.sizes, [own] * self.world_size,
            group=self.group, async_op=True,
        )
        self.phase = 2

    def wait(self) -> torch.Tensor:
        if self.result is None:
            self.advance()
            self._wait_work()
            for message, (start, end) in zip(self.received.split(self.sizes), self.bounds):
                _decode_into(self.out[start:end], message, self.fmt, self.block_size, accumulate=False)
            self.result, self.received = self.out, None
            self.phase = 3
        return self.result


def launch_quantized_all_reduce_mean(
    x: torch.Tensor,
    group: ProcessGroup | None,
    fmt: str | WireFormat,
    block_size: int = 128,
    weight: Weight = 1.0,
    divisor: Weight | None = None,
    algorithm: str = REDUCE_SCATTER,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    error_feedback: ErrorFeedback | None = None,
    inplace: bool = False,
) -> QuantizedAllReduceHandle:
    """Start ``sum_w (weight_w * x_w) / divisor`` over ``group`` with ``fmt`` on the wire; see the module doc.

    ``x`` is this rank's 1-D contribution (same length on every rank). Not modified unless ``inplace``: then
    ``x`` (fp32, contiguous) is the working buffer and, on ``wait()``, the result (module doc, Memory).
    ``divisor`` defaults to the group size (a plain mean); pass the sum of the weights for a weighted mean, or
    1 when the weights are already normalised (EDiT's softmax weights, SPEC 2.2). With ``error_feedback``,
    this rank's residual from the previous sync is added to ``weight * x`` before encoding and the new
    residual (of the first quantization) is stored. ``generator`` drives stochastic rounding of both
    quantizations.
    """
    fmt = get_format(fmt)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if x.dim() != 1:
        raise ValueError(f"quantized all-reduce takes a 1-D tensor, got shape {tuple(x.shape)}")
    if inplace and (x.dtype != torch.float32 or not x.is_contiguous()):
        raise ValueError("an in-place quantized all-reduce needs a contiguous fp32 tensor")
    world_size = dist.get_world_size(group)
    if divisor is None:
        divisor = float(world_size)

    contribution = x if inplace else x.to(torch.float32, copy=True)
    if not (isinstance(weight, (int, float)) and weight == 1):
        contribution.mul_(weight)
    if error_feedback is not None:
        error_feedback.compensate_(contribution)
    nonfinite = _sanitize_(contribution, _codec_step(fmt, block_size))

    if world_size == 1 or contribution.numel() == 0:
        if error_feedback is not None:
            error_feedback.record_slice(0, contribution.numel(), contribution, contribution)
        _divide_(contribution, divisor)
        return _Done(contribution, nonfinite)
    if fmt.name == "fp32":
        if error_feedback is not None:
            error_feedback.record_slice(0, contribution.numel(), contribution, contribution)
        _, sizes = _chunk_wire_sizes(contribution.numel(), world_size, fmt, block_size)
        bytes_sent = _reduce_scatter_all_gather_bytes(sizes, dist.get_rank(group))
        return _PlainAllReduce(contribution, group, divisor, nonfinite, bytes_sent)

    enc = _encode_bounded(contribution, fmt, block_size, stochastic, generator, error_feedback)
    if algorithm == ALL_GATHER:
        return _AllGather(enc, group, fmt, block_size, divisor, nonfinite, contribution)
    return _ReduceScatterAllGather(enc, group, fmt, block_size, divisor, nonfinite, stochastic, generator,
                                   contribution)


def quantized_all_reduce_mean(
    x: torch.Tensor,
    group: ProcessGroup | None,
    fmt: str | WireFormat,
    block_size: int = 128,
    weight: Weight = 1.0,
    divisor: Weight | None = None,
    algorithm: str = REDUCE_SCATTER,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    error_feedback: ErrorFeedback | None = None,
) -> tuple[torch.Tensor, int]:
    """Blocking form of :func:`launch_quantized_all_reduce_mean`: (fp32 result, bytes this rank sent)."""
    handle = launch_quantized_all_reduce_mean(
        x, group, fmt, block_size, weight, divisor, algorithm, stochastic, generator, error_feedback
    )
    return handle.wait(), handle.bytes_sent
