"""The one exception the data pipeline raises for bad inputs.

Tools turn it into ``error: <message>`` and exit status 2, so every message is a single line that names
the offending file: a user fixing a corpus or a data prefix should not have to read a traceback.
"""
from __future__ import annotations


class DataError(Exception):
    """A problem with a data file (corpus, tokenizer model, indexed dataset); one line, names the file."""

    def __init__(self, message: str) -> None:
        # Collapse anything multi-line (e.g. a wrapped library message) so the one-line promise holds.
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__(" ".join(lines))
