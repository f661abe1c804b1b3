"""Every exception dcgmrelay raises, under one base.

    DcgmRelayError
    ├── ParseError            a /metrics body is not valid text exposition / OpenMetrics
    ├── UnknownFieldError     a DCGM field name or id that the field table does not know (also a KeyError)
    └── CsvSpecError          a collectors CSV that dcgm-exporter would refuse

The parsers (native and pure) import this module, so callers can catch these
without importing the extension.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["CsvSpecError", "DcgmRelayError", "ParseError", "UnknownFieldError"]

# How much of a long line the caret excerpt shows on each side of the column.
_EXCERPT = 60


def _excerpt(text: str, column: int) -> tuple[str, int]:
    """Cut ``text`` around 1-based ``column``; return the excerpt and the caret offset in it."""
    col0 = max(0, column - 1)
    start = max(0, col0 - _EXCERPT)
    end = col0 + _EXCERPT
    piece = text[start:end]
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    return prefix + piece + suffix, len(prefix) + (col0 - start)


class DcgmRelayError(Exception):
    """Base class of every dcgmrelay error."""


class ParseError(DcgmRelayError, ValueError):
    """A payload that cannot be parsed.

    ``line`` and ``column`` are 1-based; ``column`` counts characters of the
    decoded line. ``source_line`` is the offending line (decoded with
    replacement characters if it was not UTF-8), ``source`` the file or URL if
    the caller named one. ``str(err)`` shows the line with a caret under the
    column.
    """

    def __init__(
        self,
        reason: str,
        *,
        line: int,
        column: int = 1,
        source_line: str | None = None,
        source: str | None = None,
    ) -> None:
        self.reason = reason
        self.line = line
        self.column = column
        self.source_line = source_line
        self.source = source
        super().__init__(reason, line, column)

    def __str__(self) -> str:
        where = f"{self.source}:" if self.source else ""
        msg = f"{where}line {self.line}, column {self.column}: {self.reason}"
        if self.source_line is not None:
            text, caret = _excerpt(self.source_line, self.column)
            text = text.replace("\t", " ").replace("\r", " ")
            msg += f"\n    {text}\n    {' ' * caret}^"
        return msg

    def __reduce__(self) -> tuple[Callable[..., ParseError], tuple[str, int, int, str | None, str | None]]:
        return (_rebuild_parse_error, (self.reason, self.line, self.column, self.source_line, self.source))


def _rebuild_parse_error(
    reason: str, line: int, column: int, source_line: str | None, source: str | None
) -> ParseError:
    return ParseError(reason, line=line, column=column, source_line=source_line, source=source)


class UnknownFieldError(DcgmRelayError, KeyError):
    """A DCGM field name or id that is not in the field table."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown DCGM field"


class CsvSpecError(DcgmRelayError, ValueError):
    """A collectors CSV that cannot be used; names the file, line and column."""

    def __init__(self, reason: str, *, file: str, line: int, column: int | None = None) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        self.column = column
        super().__init__(reason, file, line, column)

    def __str__(self) -> str:
        col = f", column {self.column}" if self.column is not None else ""
        return f"{self.file}: line {self.line}{col}: {self.reason}"
