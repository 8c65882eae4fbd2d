"""Check megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) before training touches them.

megatron-core reads the .idx with ``numpy.frombuffer`` and asserts, so a truncated or mismatched file
fails deep inside dataset building with a numpy traceback, on every rank, after the model is built. This
module reads only the small .idx header and arrays, checks that the .idx and .bin agree, and raises one
``DataError`` line naming the file instead.

The layout checked is what ``megatron.core.datasets.indexed_dataset._IndexWriter`` writes (0.16.1):
  9-byte magic ``MMIDIDX\\0\\0`` | u64 version = 1 | u8 dtype code (``DType``) |
  u64 sequence count S | u64 document count D |
  int32[S] sequence lengths | int64[S] sequence byte pointers | int64[D] document indices.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy

from megatron_edit.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

# DType codes of megatron.core.datasets.indexed_dataset.DType (a public enum; numbers are file format).
_DTYPE_BY_CODE = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What a valid prefix holds; ``num_documents`` excludes the leading 0 of the document index."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def validate_indexed_prefix(prefix: str, vocab_size: Optional[int] = None) -> IndexedDatasetInfo:
    """Check PREFIX.bin / PREFIX.idx exist, are non-empty and consistent; raise ``DataError`` if not.

    With ``vocab_size`` the .bin is also scanned for ids outside the vocabulary (data tokenized with
    another tokenizer would otherwise index past the embedding table); it reads every token once.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist (data prefix {prefix})")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty (data prefix {prefix})")

    idx_size = os.path.getsize(idx_path)
    try:
        with open(idx_path, "rb") as stream:
            header = stream.read(_HEADER.size)
    except OSError as exc:
        raise DataError(f"{idx_path} is not readable: {exc.strerror}") from exc
    if len(header) < _HEADER.size:
        raise DataError(
            f"{idx_path} is truncated: {idx_size} bytes, shorter than the {_HEADER.size}-byte header"
        )
    magic, version, code, num_sequences, num_doc_indices = _HEADER.unpack(header)
    if magic != INDEX_MAGIC:
        raise DataError(f"{idx_path} is not a megatron-core index (bad magic {magic!r})")
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path} has index version {version}, expected {INDEX_VERSION}")
    if code not in _DTYPE_BY_CODE:
        raise DataError(f"{idx_path} has unknown token dtype code {code}")
    dtype = _DTYPE_BY_CODE[code]

    expected = _HEADER.size + num_sequences * (4 + 8) + num_doc_indices * 8
    if idx_size < expected:
        raise DataError(
            f"{idx_path} is truncated: {idx_size} bytes, but its header declares {num_sequences} "
            f"sequences and {num_doc_indices} document indices ({expected} bytes)"
        )
    if idx_size != expected:
        # The multimodal variant appends one int8 mode per sequence; GPT data never has it.
        raise DataError(
            f"{idx_path} has {idx_size - expected} unexpected trailing bytes "
            f"(expected {expected} bytes; multimodal indices are not GPT data)"
        )

    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    offset = _HEADER.size
    lengths = numpy.frombuffer(index, dtype=numpy.int32, count=num_sequences, offset=offset)
    offset += lengths.nbytes
    pointers = numpy.frombuffer(index, dtype=numpy.int64, count=num_sequences, offset=offset)
    offset += pointers.nbytes
    doc_indices = numpy.frombuffer(index, dtype=numpy.int64, count=num_doc_indices, offset=offset)

    if num_doc_indices < 1 or doc_indices[0] != 0 or doc_indices[-1] != num_sequences:
        raise DataError(
            f"{idx_path} has an inconsistent document index (must run from 0 to the "
            f"{num_sequences} sequences)"
        )
    if numpy.any(numpy.diff(doc_indices) < 0):
        raise DataError(f"{idx_path} has a decreasing document index")
    if numpy.any(lengths < 0):
        raise DataError(f"{idx_path} has negative sequence lengths")

    itemsize = numpy.dtype(dtype).itemsize
    byte_lengths = lengths.astype(numpy.int64) * itemsize
    starts = numpy.concatenate(([0], numpy.cumsum(byte_lengths)[:-1])) if num_sequences else byte_lengths
    if not numpy.array_equal(pointers, starts):
        raise DataError(f"{idx_path} has sequence pointers that do not match its sequence lengths")

    num_tokens = int(lengths.sum(dtype=numpy.int64))
    bin_size = os.path.getsize(bin_path)
    if num_tokens * itemsize != bin_size:
        raise DataError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {num_tokens} tokens of "
            f"{numpy.dtype(dtype).name} ({num_tokens * itemsize} bytes); the pair is from different "
            f"runs or truncated"
        )
    if vocab_size is not None and num_tokens:
        largest = int(numpy.memmap(bin_path, mode="r", dtype=dtype).max())
        if largest >= vocab_size:
            raise DataError(
                f"{bin_path} holds token id {largest}, outside the tokenizer's vocabulary of "
                f"{vocab_size}; it was preprocessed with another tokenizer"
            )
    return IndexedDatasetInfo(
        prefix=prefix,
        dtype=dtype,
        num_sequences=num_sequences,
        num_documents=num_doc_indices - 1,
        num_tokens=num_tokens,
    )


def parse_data_path(
    data_path: Union[str, Sequence[str]], validate: bool = True, vocab_size: Optional[int] = None
) -> tuple[list[str], list[float] | None]:
    """Parse Megatron's ``--data-path`` into ``GPTDatasetConfig.blend`` form ``(prefixes, weights)``.

    Accepts ``PREFIX [PREFIX ...]`` (weights ``None``: megatron-core weighs by size) or
    ``WEIGHT PREFIX [WEIGHT PREFIX ...]``. Stricter than megatron-core's ``get_blend_from_list``,
    which reads a mistyped list such as ``0.3 a b`` as three prefixes and fails later on a missing
    ``0.3.bin``. With ``validate`` every prefix goes through ``validate_indexed_prefix`` (with
    ``vocab_size``, if given).
    """
    items = data_path.split() if isinstance(data_path, str) else [str(item) for item in data_path]
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise DataError("--data-path is empty; give PREFIX [PREFIX ...] or WEIGHT PREFIX [...]")

    is_number = [_as_float(item) is not None for item in items]
    weights: list[float] | None
    if not any(is_number):
        prefixes, weights = items, None
    elif len(items) % 2 == 0 and all(is_number[0::2]) and not any(is_number[1::2]):
        weights = [_as_float(item) for item in items[0::2]]  # type: ignore[misc]
        prefixes = items[1::2]
        for weight, prefix in zip(weights, prefixes):
            if not math.isfinite(weight) or weight < 0:
                raise DataError(f"--data-path weight {weight} for {prefix} must be finite and >= 0")
        if sum(weights) <= 0:
            raise DataError("--data-path weights sum to zero")
    else:
        raise DataError(
            f"--data-path {' '.join(items)!r} is neither PREFIX [PREFIX ...] nor "
            f"WEIGHT PREFIX [WEIGHT PREFIX ...]"
        )

    for prefix in prefixes:
        if prefix.endswith((".bin", ".idx")):
            raise DataError(
                f"--data-path {prefix} names a file; pass the prefix without .bin/.idx"
            )
        if validate:
            validate_indexed_prefix(prefix, vocab_size)
    return prefixes, weights


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
