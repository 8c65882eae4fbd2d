"""Quantized cross-worker mean with fp32 accumulation (SPEC 2.5), on real gloo process groups.

Each world size is one ``torch.multiprocessing.spawn``; every rank runs all checks and rebuilds every
rank's contribution from seeds, so it can compute the exact expected result locally. The collectives are
wrapped to measure the bytes actually handed to the backend for other ranks.
"""
import math

import pytest
import torch
import torch.distributed as dist

from megatron_edit.quantized_collectives import (
    ALL_GATHER,
    REDUCE_SCATTER,
    chunk_bounds,
    launch_quantized_all_reduce_mean,
    quantized_all_reduce_mean,
)
from megatron_edit.training.launch import rendezvous_store, run_processes, set_rank_environment
from megatron_edit.wire_codecs import FORMAT_NAMES, ErrorFeedback, decode, encode, get_format, wire_bytes

SIZES = (0, 5, 1001)
BLOCK_SIZES = (128, 7)


def _contribution(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    blocks = math.ceil(n / 64)
    magnitudes = torch.pow(10.0, torch.empty(blocks).uniform_(-3, 3, generator=g)).repeat_interleave(64)[:n]
    return torch.randn(n, generator=g) * magnitudes


def _roundtrip(x, fmt, block_size, generator=None):
    return decode(encode(x, fmt, block_size, generator is not None, generator), fmt, block_size)


def _sum_in_rank_order(parts):
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


class _WireMeter:
    """Wraps the torch.distributed data-movement calls and adds up the bytes sent to other ranks."""

    def __init__(self) -> None:
        self.bytes = 0
        self._a2a = dist.all_to_all_single
        self._ag = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor")
                    if hasattr(dist, name)}
        meter = self

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                              async_op=False):
            world_size = dist.get_world_size(group)
            splits = input_split_sizes or [input.numel() // world_size] * world_size
            meter.bytes += (sum(splits) - splits[dist.get_rank(group)]) * input.element_size()
            return meter._a2a(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
            )

        def make_gather(original):
            def gather(output, input, group=None, async_op=False):
                meter.bytes += (dist.get_world_size(group) - 1) * input.numel() * input.element_size()
                return original(output, input, group=group, async_op=async_op)
            return gather

        dist.all_to_all_single = all_to_all_single
        for name, original in self._ag.items():
            setattr(dist, name, make_gather(original))

    def take(self) -> int:
        value, self.bytes = self.bytes, 0
        return value


def _expected_bytes(n, world_size, rank, fmt, block_size, algorithm):
    if algorithm == ALL_GATHER and fmt != "fp32":
        return (world_size - 1) * wire_bytes(n, fmt, block_size)
    sizes = [wire_bytes(b - a, fmt, block_size) for a, b in chunk_bounds(n, world_size, fmt, block_size)]
    return sum(sizes) - sizes[rank] + (world_size - 1) * sizes[rank]


def _expected(inputs, weights, divisor, fmt, block_size, algorithm, world_size, generators=None):
    gens = generators or [None] * world_size
    parts = [_roundtrip(x * w, fmt, block_size, g) for x, w, g in zip(inputs, weights, gens)]
    total = _sum_in_rank_order(parts) / divisor
    if algorithm == ALL_GATHER:
        return total
    bounds = chunk_bounds(total.numel(), world_size, fmt, block_size)
    return torch.cat([_roundtrip(total[a:b], fmt, block_size, gens[p]) for p, (a, b) in enumerate(bounds)])


def _check_exact_results_and_bytes(rank, world_size, meter):
    weights = [float(w + 1) for w in range(world_size)]
    divisor = sum(weights)
    for n in SIZES:
        inputs = [_contribution(n, w) for w in range(world_size)]
        for fmt in FORMAT_NAMES:
            for block_size in BLOCK_SIZES:
                for algorithm in (REDUCE_SCATTER, ALL_GATHER):
                    x = inputs[rank].clone()
                    result, sent = quantized_all_reduce_mean(
                        x, None, fmt, block_size, weight=weights[rank], divisor=divisor, algorithm=algorithm
                    )
                    where = f"n={n} fmt={fmt} block={block_size} {algorithm}"
                    assert torch.equal(x, inputs[rank]), where  # input untouched
                    assert result.dtype == torch.float32 and result.shape == (n,), where
                    if fmt == "fp32":
                        reference = inputs[rank] * weights[rank]
                        dist.all_reduce(reference)
                        expected = reference / divisor
                    else:
                        expected = _expected(inputs, weights, divisor, fmt, block_size, algorithm, world_size)
                    assert torch.equal(result, expected), where
                    theory = _expected_bytes(n, world_size, rank, fmt, block_size, algorithm) if n else 0
                    assert sent == theory, where
                    measured = meter.take()
                    if fmt != "fp32":  # fp32 is a plain all_reduce: its algorithm is the backend's
                        assert measured == sent, where


def _check_fp32_is_plain_all_reduce(rank, world_size):
    x = _contribution(3001, rank, seed=1)
    result, _ = quantized_all_reduce_mean(x, None, "fp32")
    reference = x.clone()
    dist.all_reduce(reference)
    assert torch.equal(result, reference / world_size)
    for algorithm in (REDUCE_SCATTER, ALL_GATHER):
        result, _ = quantized_all_reduce_mean(x, None, "fp32", algorithm=algorithm)
        assert torch.equal(result, reference / world_size)


def _check_stochastic_reproducible(rank, world_size):
    n, seed = 1000, 7
    inputs = [_contribution(n, w, seed=2) for w in range(world_size)]
    for fmt in ("fp4-e3m0", "int8", "bf16"):
        for algorithm in (REDUCE_SCATTER, ALL_GATHER):
            g = torch.Generator().manual_seed(seed + rank)
            result, _ = quantized_all_reduce_mean(
                inputs[rank], None, fmt, 64, algorithm=algorithm, stochastic=True, generator=g
            )
            gens = [torch.Generator().manual_seed(seed + w) for w in range(world_size)]
            ones = [1.0] * world_size
            expected = _expected(inputs, ones, float(world_size), fmt, 64, algorithm, world_size, gens)
            assert torch.equal(result, expected), (fmt, algorithm)


def _check_weights_nonfinite_and_async(rank, world_size):
    n = 1000
    inputs = [_contribution(n, w, seed=3) for w in range(world_size)]
    # Worker 1 is anomalous: weight 0 (as a device tensor) and NaNs in its delta; it adds exactly nothing.
    x = inputs[rank].clone()
    if rank == 1:
        x[::10] = float("nan")
    weight = torch.tensor(0.0 if rank == 1 else 1.0)
    handle = launch_quantized_all_reduce_mean(x, None, "fp8-e4m3", 128, weight=weight, divisor=world_size - 1,
                                              algorithm=ALL_GATHER)
    assert bool(handle.nonfinite) == (rank == 1)
    weights = [0.0 if w == 1 else 1.0 for w in range(world_size)]
    expected = _expected(inputs, weights, float(world_size - 1), "fp8-e4m3", 128, ALL_GATHER, world_size)
    assert torch.equal(handle.wait(), expected)

    # Two fragments in flight, advanced and finished in a different order than launched.
    first = launch_quantized_all_reduce_mean(inputs[rank], None, "fp4-e3m0", 128)
    second = launch_quantized_all_reduce_mean(inputs[rank][:500], None, "int4", 32, algorithm=REDUCE_SCATTER)
    first.advance()
    second.advance()
    r2, r1 = second.wait(), first.wait()
    assert torch.equal(r1, quantized_all_reduce_mean(inputs[rank], None, "fp4-e3m0", 128)[0])
    assert torch.equal(r2, quantized_all_reduce_mean(inputs[rank][:500], None, "int4", 32)[0])
    assert first.bytes_sent == _expected_bytes(n, world_size, rank, "fp4-e3m0", 128, REDUCE_SCATTER)


def _check_error_feedback(rank, world_size):
    ef = ErrorFeedback()
    x0 = _contribution(1000, rank, seed=4)
    quantized_all_reduce_mean(x0, None, "fp4-e3m0", 128, error_feedback=ef)
    assert torch.equal(ef.residual, x0 - _roundtrip(x0, "fp4-e3m0", 128))
    x1 = _contribution(1000, rank, seed=5)
    sent = x1 + ef.residual
    result, _ = quantized_all_reduce_mean(x1, None, "fp4-e3m0", 128, error_feedback=ef, algorithm=ALL_GATHER)
    assert torch.equal(ef.residual, sent - _roundtrip(sent, "fp4-e3m0", 128))
    parts = [None] * world_size
    dist.all_gather_object(parts, _roundtrip(sent, "fp4-e3m0", 128))
    assert torch.equal(result, _sum_in_rank_order(parts) / world_size)


def _worker(rank, world_size, port):
    set_rank_environment(rank, world_size, port)
    dist.init_process_group("gloo")
    try:
        meter = _WireMeter()
        _check_exact_results_and_bytes(rank, world_size, meter)
        _check_fp32_is_plain_all_reduce(rank, world_size)
        _check_stochastic_reproducible(rank, world_size)
        _check_weights_nonfinite_and_async(rank, world_size)
        _check_error_feedback(rank, world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_quantized_all_reduce_gloo(world_size):
    with rendezvous_store() as port:
        run_processes(_worker, (world_size, port), world_size, timeout=300)


def test_chunk_bounds_cover_and_align():
    for fmt in FORMAT_NAMES:
        for n in (0, 1, 5, 127, 128, 1000, 3001):
            for world_size in (1, 2, 3, 4):
                for block_size in (1, 7, 128):
                    bounds = chunk_bounds(n, world_size, fmt, block_size)
                    assert len(bounds) == world_size
                    assert bounds[0][0] == 0 and bounds[-1][1] == n
                    assert all(a <= b for a, b in bounds)
                    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world_size - 1))
                    unit = block_size if get_format(fmt).has_scales else 1
                    if get_format(fmt).bits == 4 and unit % 2:
                        unit *= 2
                    assert all(a % unit == 0 or a == n for a, _ in bounds)
                    full = [b - a for a, b in bounds if b - a and b != n]
                    assert all(size % unit == 0 for size in full)
                    units = [math.ceil((b - a) / unit) for a, b in bounds]
                    assert max(units) - min(units) <= 1  # balanced to within one block


def test_single_rank_is_identity():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = _contribution(300, 0)
        result, sent = quantized_all_reduce_mean(x, None, "fp4-e3m0", 128, weight=2.0, divisor=4.0)
        assert sent == 0 and torch.equal(result, x * 2.0 / 4.0)
    finally:
        dist.destroy_process_group()
