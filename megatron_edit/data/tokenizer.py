"""Build the megatron-core tokenizer the dataset and the model share, after checking its inputs.

megatron-core ships the tokenizers (``megatron.core.tokenizers.MegatronTokenizer.from_pretrained``
with the sentencepiece and null libraries; the null one through mcore_adapter.null_tokenizer, whose
library name and vocabulary changed in 0.17 / 0.18); we only add the checks whose failure would otherwise
surface much later: a model file that is missing or not a sentencepiece model, and a ``--vocab-size``
that disagrees with the model (the embedding table would silently be the wrong size).

megatron-core is imported lazily so a bad argument fails in milliseconds, not after its multi-second
import.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from megatron_edit.data.errors import DataError

SENTENCEPIECE = "SentencePieceTokenizer"
NULL = "NullTokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, NULL)


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str], vocab_size: Optional[int]
) -> Any:
    """Return a megatron-core ``MegatronTokenizerText`` (``tokenize``, ``detokenize``, ``eod``,
    ``vocab_size``, ``unique_identifiers``) as ``GPTDatasetConfig.tokenizer`` expects.

    ``vocab_size`` is optional for sentencepiece (then only the model decides) and required for
    ``NullTokenizer``, whose vocabulary is ``vocab_size + 1`` (megatron-core appends the EOD id).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(
            f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}"
        )
    if vocab_size is not None and vocab_size <= 0:
        raise DataError(f"--vocab-size must be positive, got {vocab_size}")
    if tokenizer_type == NULL:
        return _build_null(vocab_size)
    return _build_sentencepiece(tokenizer_model, vocab_size)


def _build_null(vocab_size: Optional[int]) -> Any:
    if vocab_size is None:
        raise DataError(f"{NULL} needs --vocab-size (it has no model file to read it from)")
    from megatron_edit import mcore_adapter

    return mcore_adapter.null_tokenizer(vocab_size)


def _build_sentencepiece(tokenizer_model: Optional[str], vocab_size: Optional[int]) -> Any:
    if not tokenizer_model:
        raise DataError(f"{SENTENCEPIECE} needs --tokenizer-model (a sentencepiece .model file)")
    path = os.path.abspath(tokenizer_model)  # absolute: it is part of the dataset cache key
    if not os.path.isfile(path):
        raise DataError(f"tokenizer model {tokenizer_model} does not exist or is not a file")
    try:
        with open(path, "rb") as stream:
            empty = not stream.read(1)
    except OSError as exc:
        raise DataError(f"tokenizer model {tokenizer_model} is not readable: {exc.strerror}") from exc
    if empty:
        raise DataError(f"tokenizer model {tokenizer_model} is empty")

    from megatron.core.tokenizers import MegatronTokenizer

    try:
        tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=path, metadata_path={"library": "sentencepiece", "model_type": "gpt"}
        )
    except (OSError, RuntimeError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"tokenizer model {tokenizer_model} is not a sentencepiece model: {first_line}"
        ) from exc
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise DataError(
            f"tokenizer model {tokenizer_model} has vocabulary {tokenizer.vocab_size} "
            f"but --vocab-size is {vocab_size}"
        )
    return tokenizer


def encode_document(tokenizer: Any, text: str, append_eod: bool) -> list[int]:
    """Token ids of one document, as they are stored in the indexed dataset.

    Without the EOD id, ``GPTDataset`` concatenates documents with nothing between them, so training
    data almost always wants ``append_eod``. An empty or whitespace-only document gives no ids (callers
    skip it) rather than a lone EOD.
    """
    if not text.strip():
        return []
    ids = list(tokenizer.tokenize(text))
    if ids and append_eod:
        ids.append(tokenizer.eod)
    return ids
