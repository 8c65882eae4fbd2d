"""Tokenize a .jsonl or .txt corpus into a megatron-core indexed dataset PREFIX.bin + PREFIX.idx.

The files are written by megatron-core's own ``IndexedDatasetBuilder`` (one sequence per document),
with the smallest token dtype that holds the vocabulary (``DType.optimal_dtype``: uint16 below 65500).
Tokenization runs in ``--workers`` processes; results come back in input order, so the dataset's
document order is the corpus order whatever the worker count. Outputs appear only when complete (they
are written under temporary names and renamed), and are re-read with ``validate_indexed_prefix``.

    python tools/preprocess_data.py --input data/shakespeare.jsonl --output-prefix data/shakespeare \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/shakespeare_sp1024.model \\
        --workers 2 --append-eod
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from typing import Any, Iterator, Optional, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_edit.data.corpus import RawDocument, check_input_file, iter_documents  # noqa: E402
from megatron_edit.data.errors import DataError  # noqa: E402
from megatron_edit.data.indexed import validate_indexed_prefix  # noqa: E402
from megatron_edit.data.progress import ProgressBar  # noqa: E402
from megatron_edit.data.tokenizer import build_tokenizer, encode_document  # noqa: E402

# megatron-core warns on import that TE/Apex are absent; irrelevant to tokenization, noise in a CLI.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".jsonl/.json (one object per line) or .txt")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer-type", required=True, help="SentencePieceTokenizer or NullTokenizer")
    parser.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    parser.add_argument("--vocab-size", type=int, default=None, help="checked against the model")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=16, help="documents per task sent to a worker")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD id")
    parser.add_argument("--json-key", default="text")
    return parser.parse_args(argv)


class Encoder:
    """Per-process tokenizer state; built once per worker by ``start`` (the pool initializer)."""

    tokenizer: Any = None
    input_path: str = ""
    append_eod: bool = False

    @classmethod
    def start(cls, tokenizer_type: str, model: Optional[str], vocab_size: Optional[int],
              input_path: str, append_eod: bool) -> None:
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        cls.tokenizer = build_tokenizer(tokenizer_type, model, vocab_size)
        cls.input_path, cls.append_eod = input_path, append_eod

    @classmethod
    def encode(cls, document: RawDocument) -> tuple[list[int], int]:
        """Token ids of one document (empty for an empty one) and its input byte count."""
        try:
            ids = encode_document(cls.tokenizer, document.text, cls.append_eod)
        except ValueError as exc:  # NullTokenizer on text that is not space-separated integers
            raise DataError(f"{cls.input_path}:{document.line}: cannot tokenize: {exc}") from exc
        vocab = cls.tokenizer.vocab_size
        if ids and not 0 <= min(ids) <= max(ids) < vocab:
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise DataError(
                f"{cls.input_path}:{document.line}: token id {bad} is outside the vocabulary of {vocab}"
            )
        return ids, document.nbytes


def encoded_documents(args: argparse.Namespace) -> Iterator[tuple[list[int], int]]:
    """(ids, nbytes) per input document, in input order, from ``args.workers`` processes."""
    documents = iter_documents(args.input, args.json_key)
    init_args = (args.tokenizer_type, args.tokenizer_model, args.vocab_size, args.input, args.append_eod)
    if args.workers == 1:
        Encoder.start(*init_args)
        yield from map(Encoder.encode, documents)
        return
    # fork: workers inherit the imported megatron-core instead of paying its import once more each.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(args.workers, Encoder.start, init_args) as pool:
        yield from pool.imap(Encoder.encode, documents, chunksize=args.chunk_size)


def preprocess(args: argparse.Namespace) -> str:
    if args.workers < 1 or args.chunk_size < 1:
        raise DataError("--workers and --chunk-size must be at least 1")
    check_input_file(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)

    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = args.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    partial = f"{prefix}.partial"
    documents = empty = tokens = consumed = 0
    start = time.monotonic()
    progress = ProgressBar(os.path.getsize(args.input), f"tokenizing {os.path.basename(args.input)}")
    builder = IndexedDatasetBuilder(partial + ".bin", dtype=dtype)
    try:
        for ids, nbytes in encoded_documents(args):
            consumed += nbytes
            if ids:
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                documents += 1
                tokens += len(ids)
            else:
                empty += 1
            rate = tokens / max(time.monotonic() - start, 1e-9)
            progress.update(consumed, f"{documents} docs {tokens} tokens {rate:,.0f} tok/s")
        if documents == 0:
            raise DataError(f"input file {args.input} has no non-empty documents")
        builder.finalize(partial + ".idx")
        progress.close(f"{documents} docs {tokens} tokens")
        os.replace(partial + ".bin", prefix + ".bin")
        os.replace(partial + ".idx", prefix + ".idx")
    finally:
        progress.abandon()  # no-op after close()
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(partial + suffix):
                os.remove(partial + suffix)
    info = validate_indexed_prefix(prefix)
    print(
        f"wrote {prefix}.bin/.idx: {info.num_documents} documents, {info.num_tokens} tokens "
        f"({numpy.dtype(info.dtype).name}, vocabulary {tokenizer.vocab_size}), skipped {empty} empty "
        f"documents, {time.monotonic() - start:.1f}s with {args.workers} workers"
    )
    return prefix


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        preprocess(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
