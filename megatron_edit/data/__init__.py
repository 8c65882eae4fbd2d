"""Data pipeline: corpus reading, tokenizer construction, indexed-dataset checks (SPEC section 9).

The training entry needs three calls: ``build_tokenizer`` for the tokenizer the model and the dataset
share, ``parse_data_path`` to turn ``--data-path`` into a validated ``GPTDatasetConfig.blend``, and
``validate_indexed_prefix`` for a single prefix. Every bad input raises ``DataError`` (one line, names
the file). Importing this package does not import megatron-core.
"""
from megatron_edit.data.errors import DataError
from megatron_edit.data.indexed import IndexedDatasetInfo, parse_data_path, validate_indexed_prefix
from megatron_edit.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, encode_document

__all__ = [
    "DataError",
    "IndexedDatasetInfo",
    "TOKENIZER_TYPES",
    "build_tokenizer",
    "encode_document",
    "parse_data_path",
    "validate_indexed_prefix",
]
