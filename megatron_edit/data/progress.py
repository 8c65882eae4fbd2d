"""A tiny stderr progress bar for the data tools (tqdm is not a dependency).

On a terminal it redraws one line in place; in a log file it writes a line at most every
``log_interval`` seconds, so CI logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Progress in bytes of input consumed, with a free-form count (documents, tokens) alongside."""

    def __init__(
        self,
        total: int,
        label: str,
        stream: Optional[TextIO] = None,
        redraw_interval: float = 0.1,
        log_interval: float = 10.0,
        width: int = 30,
    ) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = redraw_interval if self.interactive else log_interval
        self.start = time.monotonic()
        self.last_draw = self.start
        self.done = 0
        self.drawn_width = 0

    def update(self, done: int, note: str = "") -> None:
        """Record ``done`` units finished; draws only if enough time has passed since the last draw."""
        self.done = min(int(done), self.total)
        now = time.monotonic()
        if now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(note, final=False)

    def close(self, note: str = "") -> None:
        """Draw the finished bar and end its line."""
        self.done = self.total
        self._draw(note, final=True)

    def abandon(self) -> None:
        """End a half-drawn terminal line so an error message that follows starts on its own line."""
        if self.interactive and self.drawn_width:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn_width = 0

    def _draw(self, note: str, final: bool) -> None:
        fraction = self.done / self.total
        filled = int(round(fraction * self.width))
        elapsed = time.monotonic() - self.start
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}% "
            f"{elapsed:6.1f}s {note}".rstrip()
        )
        if self.interactive:
            padded = line.ljust(self.drawn_width)  # erase the rest of a longer previous line
            self.drawn_width = len(line)
            self.stream.write("\r" + padded + ("\n" if final else ""))
            if final:
                self.drawn_width = 0
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
