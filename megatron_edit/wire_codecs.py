"""Wire formats for quantized outer gradients (pure functions, no process group).

Streaming DiLoCo (Douillard et al., arXiv 2501.18512, "quantized outer gradients") sends each worker's
pseudo-gradient in as little as 4 bits (E3M0: 1 sign + 3 exponent bits) while the cross-worker sum is still
accumulated in fp32. This module is the codec half of that: it turns an fp32 vector into the bytes that
cross the wire and back. The distributed half (who sends what to whom, fp32 accumulation) lives in
``quantized_collectives.py``; SPEC section 2.5.

Formats (``--outer-grad-dtype``):

========== ==== ======= ===============================================================================
name       bits scales  grid (magnitudes a block's scaled values are rounded to)
========== ==== ======= ===============================================================================
fp32       32   no      identity
bf16       16   no      bfloat16 (round-to-nearest-even, or stochastic on the 16 dropped mantissa bits)
fp8-e4m3   8    yes     torch.float8_e4m3fn: max 448, subnormals down to 2^-9
fp8-e5m2   8    yes     torch.float8_e5m2: max 57344, subnormals down to 2^-16
fp4-e3m0   4    yes     {0} U {2^-6, 2^-5, ..., 2^0}: 8 magnitudes, the paper's format (see below)
fp4-e2m1   4    yes     {0, 0.5, 1, 1.5, 2, 3, 4, 6}: the OCP MX / NVFP4 element format
int8       8    yes     symmetric integers -127..127 (-128 unused)
int4       4    yes     symmetric integers -7..7 (-8 unused), two's complement nibbles
========== ==== ======= ===============================================================================

Block scales: the vector is cut into blocks of ``block_size`` consecutive elements (the last block may be
partial); each block gets one fp32 scale ``absmax(block) / max_magnitude`` so the block's largest magnitude
maps exactly onto the format's largest code. A block of zeros gets scale 0 and decodes to zeros (no 0/0).
A block whose absmax is so small that the scale underflows fp32 (absmax below ~1e-45 * max_magnitude)
decodes to zeros.

fp4-e3m0 exponent range (our choice; the paper does not publish its exact bias): with the block scale
mapping absmax to 1, the eight magnitudes are 0 and 2^k for k = -6..0, i.e. a dynamic range of 2^6 below the
block's absmax. Code = sign << 3 | i, where i = 0 is zero and i = k + 7 for 2^k. Rounding treats it as a
minifloat with no mantissa and subnormal step 2^-6: the neighbours lo < hi of a magnitude a are found in the
log2 domain (lo = 2^floor(log2 a), hi = 2 lo; or 0 and 2^-6 below 2^-6), then the deterministic mode picks
the nearest in the linear domain (threshold (lo + hi) / 2 = 1.5 lo; an exact tie goes to hi, the even
multiple of the step, and to 0 at 2^-7); the stochastic mode picks hi with probability (a - lo) / (hi - lo),
which is unbiased.

Rounding: deterministic = round to nearest, ties to even (identical to torch's float8 casts). Stochastic
(``stochastic=True`` with an optional ``torch.Generator`` for reproducibility) rounds up with probability
equal to the linear distance from the lower neighbour, so E[decode(encode(x))] == x for every x inside the
representable range (values clamped at the format's max are the only biased ones, and the block scale
guarantees no element exceeds it). Error bounds relative to the block absmax: deterministic <= half an ulp
of the top binade divided by max_magnitude, stochastic < one such ulp.

Non-finite input: NaN/Inf entries are encoded as 0 and reported in ``Encoded.nonfinite`` (a 0-dim bool
tensor on the input's device). It is a tensor, not a Python bool or an exception, because on a GPU testing
it would be a host synchronisation in the middle of the sync; callers reduce it (or fold it into the
anomaly detection of SPEC 2.2, which excludes a worker whose delta is not finite) when they choose to.

Packing: 4-bit codes go two per byte, element 2i in the low nibble and 2i+1 in the high nibble; an odd
count leaves the last high nibble zero. Byte counts are exact: ``wire_bytes(n) == payload.numel() +
4 * scales.numel()``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "FORMAT_NAMES",
    "WireFormat",
    "Encoded",
    "ErrorFeedback",
    "get_format",
    "encode",
    "decode",
    "payload_bytes",
    "num_blocks",
    "wire_bytes",
]

FORMAT_NAMES: tuple[str, ...] = (
    "fp32",
    "bf16",
    "fp8-e4m3",
    "fp8-e5m2",
    "fp4-e3m0",
    "fp4-e2m1",
    "int8",
    "int4",
)


@dataclass(frozen=True)
class WireFormat:
    """One wire format. ``max_magnitude`` is the code a block's absmax maps to (None without scales)."""

    name: str
    bits: int
    has_scales: bool
    max_magnitude: float | None = None


@dataclass(frozen=True)
class _Grid:
    """The magnitudes a format can represent once divided by the block scale.

    A minifloat with ``mantissa_bits`` and smallest normal binade 2^``min_exponent`` has, in the binade
    [2^e, 2^(e+1)), the step 2^(max(e, min_exponent) - mantissa_bits); subnormals share the smallest step.
    ``mantissa_bits=None`` is the integer grid (step 1).
    """

    mantissa_bits: int | None
    min_exponent: int
    max_value: float


_FORMATS: dict[str, WireFormat] = {
    "fp32": WireFormat("fp32", 32, False),
    "bf16": WireFormat("bf16", 16, False),
    "fp8-e4m3": WireFormat("fp8-e4m3", 8, True, 448.0),
    "fp8-e5m2": WireFormat("fp8-e5m2", 8, True, 57344.0),
    "fp4-e3m0": WireFormat("fp4-e3m0", 4, True, 1.0),
    "fp4-e2m1": WireFormat("fp4-e2m1", 4, True, 6.0),
    "int8": WireFormat("int8", 8, True, 127.0),
    "int4": WireFormat("int4", 4, True, 7.0),
}

_GRIDS: dict[str, _Grid] = {
    "fp8-e4m3": _Grid(3, -6, 448.0),
    "fp8-e5m2": _Grid(2, -14, 57344.0),
    "fp4-e3m0": _Grid(0, -6, 1.0),
    "fp4-e2m1": _Grid(1, 0, 6.0),
    "int8": _Grid(None, 0, 127.0),
    "int4": _Grid(None, 0, 7.0),
}

# Magnitudes of the 4-bit float codes 0..7 (bit 3 is the sign).
_FP4_MAGNITUDES: dict[str, tuple[float, ...]] = {
    "fp4-e3m0": (0.0,) + tuple(2.0**k for k in range(-6, 1)),
    "fp4-e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}

_FP8_DTYPES: dict[str, torch.dtype] = {
    "fp8-e4m3": torch.float8_e4m3fn,
    "fp8-e5m2": torch.float8_e5m2,
}

_BF16_MAX = torch.finfo(torch.bfloat16).max


@dataclass
class Encoded:
    """What crosses the wire for one vector: ``payload`` (uint8) and, for scaled formats, ``scales``.

    ``numel`` is the element count (needed to drop the padding nibble of 4-bit formats); ``nonfinite`` is a
    0-dim bool tensor, True if the input had a NaN/Inf (encoded as 0). Neither travels on the wire.
    """

    payload: torch.Tensor
    scales: torch.Tensor | None
    numel: int
    nonfinite: torch.Tensor


def get_format(name: str | WireFormat) -> WireFormat:
    """The format called ``name`` (a ``WireFormat`` is returned unchanged)."""
    if isinstance(name, WireFormat):
        return name
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(
            f"--outer-grad-dtype {name!r} is not a wire format; choose one of {', '.join(FORMAT_NAMES)}"
        ) from None


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"--outer-grad-block-size must be a positive integer, got {block_size!r}")


def payload_bytes(numel: int, fmt: str | WireFormat) -> int:
    """Bytes of the element codes of ``numel`` values (4-bit formats: two per byte, rounded up)."""
    fmt = get_format(fmt)
    return (numel * fmt.bits + 7) // 8


def num_blocks(numel: int, fmt: str | WireFormat, block_size: int) -> int:
    """Number of fp32 block scales for ``numel`` values (0 for formats without scales)."""
    fmt = get_format(fmt)
    _check_block_size(block_size)
    return math.ceil(numel / block_size) if fmt.has_scales else 0


def wire_bytes(numel: int, fmt: str | WireFormat, block_size: int = 128) -> int:
    """Exact bytes one encoded vector of ``numel`` values occupies on the wire: payload + 4 per scale."""
    return payload_bytes(numel, fmt) + 4 * num_blocks(numel, fmt, block_size)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent in fp32 for integer exponents in the normal range, built from the bit pattern."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _round_magnitude(
    a: torch.Tensor, grid: _Grid, stochastic: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Round non-negative ``a`` (already <= grid.max_value) to the grid; the result is exactly on it."""
    if grid.mantissa_bits is None:
        step = None
        t = a
    else:
        _, exponent = torch.frexp(a)  # a = m * 2**exponent, m in [0.5, 1): binade = exponent - 1
        binade = torch.clamp(exponent - 1, min=grid.min_exponent)
        step = _pow2(binade - grid.mantissa_bits)
        t = a / step  # exact: division by a power of two
    if stochastic:
        lower = torch.floor(t)
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32)
        k = lower + (u < (t - lower)).to(t.dtype)
    else:
        k = torch.round(t)  # half to even
    q = k if step is None else k * step
    return torch.clamp(q, max=grid.max_value)


def _sanitize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with non-finite entries set to 0, 0-dim bool "had a non-finite entry") without a host sync."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), ~finite.all()


def _as_flat_fp32(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"wire codecs take a 1-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"wire codecs take a floating-point tensor, got {x.dtype}")
    return x.to(torch.float32).contiguous()


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(payload: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([payload & 0xF, payload >> 4], dim=1).reshape(-1)[:numel]


@functools.lru_cache(maxsize=None)
def _fp4_table(name: str, device: torch.device) -> torch.Tensor:
    """The 8 magnitudes of a 4-bit float format, cached per device (no host-to-device copy per call)."""
    return torch.tensor(_FP4_MAGNITUDES[name], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _nibble_lut(name: str, device: torch.device) -> torch.Tensor:
    """Decoded value of each of the 16 codes of a 4-bit format, cached per device."""
    if name == "int4":
        values = [float(c) for c in range(8)] + [float(c - 16) for c in range(8, 16)]
    else:
        mags = _FP4_MAGNITUDES[name]
        values = list(mags) + [-m for m in mags]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _encode_bf16(x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    x = torch.clamp(x, -_BF16_MAX, _BF16_MAX)  # the bf16 max has zero low bits: rounding up cannot overflow
    if stochastic:
        # Adding uniform noise below the 16 kept bits and truncating rounds the magnitude up with
        # probability (distance to the lower bf16 neighbour) / (bf16 step): unbiased.
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
        x = ((x.view(torch.int32) + noise) & -(1 << 16)).view(torch.float32)
    return x.to(torch.bfloat16).view(torch.uint8)


def encode(
    x: torch.Tensor,
    fmt: str | WireFormat,
    block_size: int = 128,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Encoded:
    """Encode a 1-D float tensor for the wire (non-finite entries become 0 and set ``nonfinite``)."""
    fmt = get_format(fmt)
    _check_block_size(block_size)
    x, nonfinite = _sanitize(_as_flat_fp32(x))
    n = x.numel()
    if fmt.name == "fp32":
        return Encoded(x.view(torch.uint8), None, n, nonfinite)
    if fmt.name == "bf16":
        return Encoded(_encode_bf16(x, stochastic, generator), None, n, nonfinite)

    grid = _GRIDS[fmt.name]
    blocks = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(x, (0, blocks * block_size - n)).view(blocks, block_size)
    scales = padded.abs().amax(dim=1) / grid.max_value
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    y = padded / safe[:, None]
    q = _round_magnitude(torch.clamp(y.abs(), max=grid.max_value), grid, stochastic, generator)
    q = q.reshape(-1)[:n]
    negative = (y.reshape(-1)[:n] < 0) & (q > 0)
    signed = torch.where(negative, -q, q)

    if fmt.name in _FP8_DTYPES:
        payload = signed.to(_FP8_DTYPES[fmt.name]).view(torch.uint8)  # exact: q is on the fp8 grid
    elif fmt.name == "int8":
        payload = signed.to(torch.int8).view(torch.uint8)
    elif fmt.name == "int4":
        payload = _pack_nibbles((signed.to(torch.int16) & 0xF).to(torch.uint8))
    else:  # fp4-e3m0, fp4-e2m1: index of the magnitude in the code table, sign in bit 3
        index = torch.searchsorted(_fp4_table(fmt.name, x.device), q.contiguous()).to(torch.uint8)
        payload = _pack_nibbles(index | (negative.to(torch.uint8) << 3))
    return Encoded(payload, scales, n, nonfinite)


def _view_bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View uint8 bytes as ``dtype``, copying first if the slice is not aligned for it."""
    data = data.contiguous()
    itemsize = torch.empty((), dtype=dtype).element_size()
    if data.storage_offset() % itemsize:
        data = data.clone()
    return data.view(dtype)


def decode(enc: Encoded, fmt: str | WireFormat, block_size: int = 128) -> torch.Tensor:
    """Decode to a new fp32 tensor of ``enc.numel`` values."""
    fmt = get_format(fmt)
    _check_block_size(block_size)
    n = enc.numel
    if fmt.name == "fp32":
        return _view_bytes_as(enc.payload, torch.float32).clone()
    if fmt.name == "bf16":
        return _view_bytes_as(enc.payload, torch.bfloat16).to(torch.float32)

    if fmt.name in _FP8_DTYPES:
        values = enc.payload.view(_FP8_DTYPES[fmt.name]).to(torch.float32)
    elif fmt.name == "int8":
        values = enc.payload.view(torch.int8).to(torch.float32)
    else:
        values = _nibble_lut(fmt.name, enc.payload.device)[_unpack_nibbles(enc.payload, n).long()]
    if enc.scales is None:
        raise ValueError(f"format {fmt.name} needs block scales but the encoded vector has none")
    blocks = enc.scales.numel()
    padded = torch.nn.functional.pad(values, (0, blocks * block_size - n)).view(blocks, block_size)
    return (padded * enc.scales[:, None]).reshape(-1)[:n]


class ErrorFeedback:
    """The local quantization residual, added to the next pseudo-gradient before it is encoded.

    Error feedback (SPEC 2.5, ``--outer-grad-error-feedback``) keeps what the wire format dropped,
    ``residual = sent - decode(encode(sent))``, and adds it to the next delta, so the sum of decoded
    contributions over syncs tracks the sum of true contributions up to one residual (the error does not
    accumulate). One instance per tensor (e.g. per bucket shard); entries that were not finite get a zero
    residual. ``state_dict()`` holds the residual tensor (or None before the first sync) for checkpoints.
    """

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None

    def compensate(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the residual of the previous sync (a new tensor; x itself is not modified)."""
        if self.residual is None:
            return x.to(torch.float32).clone()
        return x.to(torch.float32) + self.residual

    def record(self, sent: torch.Tensor, decoded: torch.Tensor) -> None:
        """Keep ``sent - decoded`` (what the peers did not receive) for the next sync."""
        residual = sent.to(torch.float32) - decoded
        self.residual = torch.where(torch.isfinite(residual), residual, torch.zeros_like(residual))

    def compensate_(self, x: torch.Tensor) -> None:
        """In place: x += the residual of the previous sync (x is the caller's fp32 working buffer)."""
        if self.residual is not None:
            x.add_(self.residual)

    def record_slice(self, start: int, numel: int, sent: torch.Tensor, decoded: torch.Tensor) -> None:
        """``record`` for elements [start, start + len(sent)) of a vector of ``numel`` (the residual is
        kept whole; codecs encode chunk by chunk to bound their temporaries)."""
        if self.residual is None or self.residual.numel() != numel:
            self.residual = torch.zeros(numel, dtype=torch.float32, device=sent.device)
        piece = self.residual[start:start + sent.numel()]
        torch.sub(sent.to(torch.float32), decoded, out=piece)
        piece.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def encode(
        self,
        x: torch.Tensor,
        fmt: str | WireFormat,
        block_size: int = 128,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Encoded:
        """Compensate, encode, and record the new residual in one call."""
        sent = self.compensate(x)
        enc = encode(sent, fmt, block_size, stochastic, generator)
        self.record(sent, decode(enc, fmt, block_size))
        return enc

    def reset(self) -> None:
        self.residual = None

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"residual": self.residual}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor | None]) -> None:
        residual = state_dict["residual"]
        self.residual = None if residual is None else residual.detach().to(torch.float32).clone()


class ErrorFeedbackSection:
    """The part [offset, offset + len) of an ``ErrorFeedback`` of ``numel`` elements: a vector sent in
    chunks (an all-at-once sync communicates a stage in bounded chunks) keeps one residual."""

    def __init__(self, feedback: ErrorFeedback, offset: int, numel: int) -> None:
        self.feedback, self.offset, self.numel = feedback, offset, numel

    def compensate_(self, x: torch.Tensor) -> None:
        residual = self.feedback.residual
        if residual is not None:
            x.add_(residual[self.offset:self.offset + x.numel()])

    def record_slice(self, start: int, numel: int, sent: torch.Tensor, decoded: torch.Tensor) -> None:
        self.feedback.record_slice(self.offset + start, self.numel, sent, decoded)
