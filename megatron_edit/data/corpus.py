"""Read a text corpus as a stream of documents, and cut long texts into document-sized pieces.

One reader for both tools (tokenizer training and preprocessing) so they agree on what a document is:
  * ``.jsonl`` / ``.json``: one JSON object per line, the document is its ``json_key`` string;
  * ``.txt``: blank-line separated paragraphs (a plain text file has no other document boundary, and a
    whole file as one document would leave nothing for a train/valid/test split).
Documents that are empty or whitespace-only are skipped and counted; they carry no tokens.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple

from megatron_edit.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)


class RawDocument(NamedTuple):
    """One document; ``line`` (1-based, where it starts) and ``nbytes`` are for errors and progress."""

    line: int
    text: str
    nbytes: int


def check_input_file(path: str) -> None:
    """Fail early, naming the file, for a missing, unreadable or unsupported corpus file."""
    if not os.path.exists(path):
        raise DataError(f"input file {path} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"input file {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise DataError(f"input file {path} is not readable")
    if not path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
        raise DataError(f"input file {path} must end in .jsonl, .json or .txt")


def iter_documents(path: str, json_key: str = "text") -> Iterator[RawDocument]:
    """Yield the documents of ``path`` in file order, including empty ones (callers count them)."""
    check_input_file(path)
    if path.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(path, json_key)
    else:
        yield from _iter_paragraphs(path)


def _decoded_lines(path: str) -> Iterator[tuple[int, str, int]]:
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({exc.reason})") from exc
            yield number, text, len(raw)


def _iter_jsonl(path: str, json_key: str) -> Iterator[RawDocument]:
    for number, line, nbytes in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise DataError(f"{path}:{number}: expected an object with a string field {json_key!r}")
        yield RawDocument(number, record[json_key], nbytes)


def _iter_paragraphs(path: str) -> Iterator[RawDocument]:
    lines: list[str] = []
    start, nbytes = 0, 0
    for number, line, size in _decoded_lines(path):
        nbytes += size
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip("\r\n"))
        elif lines:
            yield RawDocument(start, "\n".join(lines), nbytes)
            lines, nbytes = [], 0
    if lines:
        yield RawDocument(start, "\n".join(lines), nbytes)


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of ``text``, trailing whitespace of each line removed."""
    paragraphs, current = [], []
    for line in text.splitlines():
        line = line.rstrip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def group_paragraphs(paragraphs: list[str], target_chars: int, max_chars: int) -> list[str]:
    """Join consecutive paragraphs into documents of about ``target_chars`` (at most ``max_chars``).

    Documents, not paragraphs, are what megatron-core's train/valid/test split divides; a few-KB
    document keeps context for the model while leaving hundreds of documents to split. A paragraph
    longer than ``max_chars`` is cut at line boundaries (or hard-cut if one line is that long).
    """
    if not 0 < target_chars <= max_chars:
        raise ValueError(f"need 0 < target_chars <= max_chars, got {target_chars}, {max_chars}")
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for piece in _pieces_at_most(paragraphs, max_chars):
        added = len(piece) + (2 if current else 0)  # the "\n\n" that joins it
        if current and size + added > max_chars:
            documents.append("\n\n".join(current))
            current, size, added = [], 0, len(piece)
        current.append(piece)
        size += added
        if size >= target_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def _pieces_at_most(paragraphs: list[str], max_chars: int) -> Iterator[str]:
    for paragraph in paragraphs:
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        chunk: list[str] = []
        size = 0
        for line in paragraph.split("\n"):
            while len(line) > max_chars:
                if chunk:
                    yield "\n".join(chunk)
                    chunk, size = [], 0
                yield line[:max_chars]
                line = line[max_chars:]
            if not line:
                continue
            added = len(line) + (1 if chunk else 0)
            if chunk and size + added > max_chars:
                yield "\n".join(chunk)
                chunk, size, added = [], 0, len(line)
            chunk.append(line)
            size += added
        if chunk:
            yield "\n".join(chunk)
