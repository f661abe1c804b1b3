"""Pure-Python twin of the native parser, and the slow paths both share.

The native core (``_parser.pyx``) handles the common sample line itself and
calls into :class:`Builder` for everything else: comments and metadata, the
first sight of a label block, and any line its fast path does not accept.
Because every error is produced here, the two implementations report the same
errors, at the same line and column, by construction; the differential tests
check the rest.

Grammar accepted in lenient mode (one line, after a trailing ``\\r`` is cut)::

    line    = ws* ( "#" comment | sample ) | ws*
    sample  = name ws* [ "{" ws* [ label ( ws* "," ws* label )* ws* [","] ws* ] "}" ] ws* value
              [ ws+ timestamp ] [ ws+ "#" exemplar (OpenMetrics) ] ws*
    label   = lname ws* "=" ws* '"' escaped-value '"'

Label values keep their bytes except the escapes ``\\\\``, ``\\"`` and ``\\n``;
any other backslash pair is kept as written (dcgm-exporter does not escape).
"""

from __future__ import annotations

import re
from array import array
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union, cast

from .errors import ParseError

__all__ = ["MEMO_MAX", "MEMO_MAX_KEY", "TS_ABSENT", "Builder", "CommentRecord", "LineError", "Memo", "MemoEntry", "RawScrape",
           "keep_memo", "memo_entry", "parse_raw", "parse_timestamp", "parse_value"]

#: ``Scrape.timestamps`` holds this where a sample has no timestamp (INT64_MIN).
TS_ABSENT = -(2**63)
_TS_MAX = 2**63 - 1

_WS = b" \t"
_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = b"0123456789"
NAME_START = frozenset(_LETTERS + b"_:")
NAME_CHARS = frozenset(_LETTERS + b"_:" + _DIGITS)
LABEL_START = frozenset(_LETTERS + b"_")
LABEL_CHARS = frozenset(_LETTERS + b"_" + _DIGITS)
_QUOTE = 0x22  # '"'
_BACKSLASH = 0x5C
_LBRACE = 0x7B
_RBRACE = 0x7D
_HASH = 0x23
_COMMA = 0x2C
_EQUALS = 0x3D

# The union of the text-format and OpenMetrics type names: lenient mode takes either.
METRIC_TYPES = frozenset(
    ("counter", "gauge", "histogram", "summary", "untyped", "unknown", "gaugehistogram", "stateset", "info")
)

# Go's strconv.ParseFloat syntax without hex floats and underscores.
_VALUE_RE = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_SPECIAL_VALUES = {b"nan": float("nan"), b"inf": float("inf"), b"+inf": float("inf"), b"-inf": float("-inf"),
                   b"infinity": float("inf"), b"+infinity": float("inf"), b"-infinity": float("-inf")}
_INT_RE = re.compile(rb"-?[0-9]+\Z")
_ESCAPE_RE = re.compile(rb"\\(.)", re.S)
_LABEL_ESCAPES = {b"\\": b"\\", b'"': b'"', b"n": b"\n"}
_HELP_ESCAPES_TEXT = {b"\\": b"\\", b"n": b"\n"}


class LineError(Exception):
    """A rejected line: ``col`` is the 0-based byte offset of the fault in it."""

    def __init__(self, col: int, reason: str) -> None:
        super().__init__(col, reason)
        self.col = col
        self.reason = reason


def parse_value(tok: bytes) -> float:
    """A sample value as Go's ParseFloat reads it (decimal, exponent, NaN, [+-]Inf); ValueError otherwise."""
    if _VALUE_RE.match(tok):
        return float(tok)
    special = _SPECIAL_VALUES.get(tok.lower())
    if special is None:
        raise ValueError(tok)
    return special


def parse_timestamp(tok: bytes, om: bool) -> int:
    """Milliseconds: an int64 in the text format, float seconds in OpenMetrics."""
    if om:
        seconds = parse_value(tok)
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            raise ValueError("timestamp must be finite")
        ms_f = seconds * 1000.0
        if not -9.2e18 < ms_f < 9.2e18:  # also catches a product that overflows to inf
            raise ValueError("timestamp out of range")
        ms = round(ms_f)
    else:
        if not _INT_RE.match(tok):
            raise ValueError("timestamp must be an integer number of milliseconds")
        ms = int(tok)
    if not TS_ABSENT < ms <= _TS_MAX:
        raise ValueError("timestamp out of range")
    return ms


def _skip_ws(line: bytes, i: int, n: int) -> int:
    while i < n and line[i] in _WS:
        i += 1
    return i


def _close_quote(buf: bytes, q: int, n: int) -> int:
    """Index of the quote closing a value that starts at ``q``; -1 if none before ``n``."""
    while True:
        r = buf.find(b'"', q, n)
        if r < 0:
            return -1
        k = r - 1
        while k >= q and buf[k] == _BACKSLASH:
            k -= 1
        if (r - 1 - k) % 2 == 0:
            return r
        q = r + 1


def find_block_end(line: bytes, start: int, n: int) -> int:
    """Index of the ``}`` closing a label block opened just before ``start`` (quote-aware)."""
    q = start
    while True:
        while q < n and line[q] != _QUOTE and line[q] != _RBRACE:
            q += 1
        if q >= n:
            raise LineError(start - 1, "label set has no closing '}'")
        if line[q] == _RBRACE:
            return q
        r = _close_quote(line, q + 1, n)
        if r < 0:
            raise LineError(q, "label value has no closing quote")
        q = r + 1


def _unescape(raw: bytes, table: dict[bytes, bytes]) -> bytes:
    if b"\\" not in raw:
        return raw
    return _ESCAPE_RE.sub(lambda m: table.get(m.group(1), m.group(0)), raw)


def parse_label_block(block: bytes) -> list[tuple[str, str]]:
    """The labels between ``{`` and ``}``, in order; LineError columns are relative to the block."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    n = len(block)
    i = _skip_ws(block, 0, n)
    while i < n:
        c = block[i]
        if c not in LABEL_START:
            if c == _COMMA:
                raise LineError(i, "unexpected ',' in label set")
            if c == _QUOTE:
                raise LineError(i, "quoted label names are not supported")
            raise LineError(i, "expected a label name")
        j = i + 1
        while j < n and block[j] in LABEL_CHARS:
            j += 1
        lname = block[i:j].decode("ascii")
        k = _skip_ws(block, j, n)
        if k >= n or block[k] != _EQUALS:
            raise LineError(k, f"expected '=' after label name {lname!r}")
        k = _skip_ws(block, k + 1, n)
        if k >= n or block[k] != _QUOTE:
            raise LineError(k, f"expected '\"' to open the value of label {lname!r}")
        r = _close_quote(block, k + 1, n)
        if r < 0:
            raise LineError(k, "label value has no closing quote")
        raw = _unescape(block[k + 1:r], _LABEL_ESCAPES)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LineError(k + 1, f"invalid UTF-8 in the value of label {lname!r}") from None
        if lname in seen:
            raise LineError(i, f"duplicate label name {lname!r}")
        seen.add(lname)
        pairs.append((lname, value))
        i = _skip_ws(block, r + 1, n)
        if i >= n:
            break
        if block[i] != _COMMA:
            raise LineError(i, "expected ',' or '}' after a label value")
        i = _skip_ws(block, i + 1, n)
    return pairs


#: A parsed label block: (pairs in body order, pairs sorted by name — the identity of the set).
MemoEntry = Tuple[Tuple[Tuple[str, str], ...], Tuple[Tuple[str, str], ...]]

#: A parsed comment line: ``()`` a plain comment, ``(-1,)`` '# EOF', else
#: (slot in the family's [type, help, unit], family name, value, keyword).
CommentRecord = Union[Tuple[()], Tuple[int], Tuple[int, str, str, str]]

#: What a parser remembers across parses: label blocks (keyed by the bytes between the
#: braces) and comment lines (keyed by the line after a '\n', which no block holds).
#: After a parse it holds exactly the blocks and comment lines of that body (one generation:
#: what the previous body had and this one has not is dropped), so it is never larger than
#: the last body, whatever bodies came before: a target that sends ever-new label sets or
#: comments (or garbage) cannot make it grow. An exporter repeats its blocks every scrape,
#: which is all the memo is for.
Memo = Dict[bytes, Union[MemoEntry, CommentRecord]]

#: A body with more distinct blocks and comment lines than this leaves the memo empty.
MEMO_MAX = 65536
#: Label blocks and comment lines longer than this are not remembered (dcgm-exporter's are
#: < 1 KiB): a body of a few huge blocks does not pin copies of them.
MEMO_MAX_KEY = 4096


def keep_memo(memo: Optional[Memo], kept: Optional[Memo], added: int) -> None:
    """End of a parse: the memo becomes ``kept``, what this body used (nothing if that is past
    MEMO_MAX); ``added``: how many of those were not in the memo. A parse that raises (strict)
    leaves the memo as it was."""
    if memo is None or kept is None:
        return
    if not added and len(kept) == len(memo):
        return  # the steady state: every key kept came from the memo, so both hold the same
    memo.clear()
    if len(kept) <= MEMO_MAX:
        memo.update(kept)


def memo_entry(pairs: list[tuple[str, str]]) -> MemoEntry:
    ordered = tuple(pairs)
    return ordered, tuple(sorted(ordered))


class RawScrape(NamedTuple):
    """What a parser hands to :class:`dcgmrelay.Scrape`: columns plus dictionary tables."""

    values: object  # float64[n]
    timestamps: object  # int64[n], TS_ABSENT where absent
    name_ids: object  # int32[n] → names
    labelset_ids: object  # int32[n] → labelsets
    names: Sequence[str]
    labelsets: Sequence[tuple[tuple[str, str], ...]]
    families: dict[str, list[str | None]]  # name → [type, help, unit]
    errors: Sequence[tuple[int, int, str]]  # (line, column, reason), capped
    n_errors: int
    n_lines: int


class Builder:
    """Dictionary tables, metadata and errors of one parse; shared by both parsers."""

    __slots__ = ("om", "strict", "max_errors", "source", "memo", "kept", "added", "names", "_name_ids", "labelsets",
                 "_ls_by_key", "_ls_by_block", "families", "errors", "n_errors", "eof")

    def __init__(self, om: bool, strict: bool, max_errors: int, source: str | None,
                 memo: Optional[Memo] = None) -> None:
        self.om = om
        # label block bytes -> parsed labels, kept across parses by a Parser: the same
        # exporter sends the same blocks every scrape. Read from ``memo`` (the last body's);
        # what this body uses goes to ``kept``, which replaces it (see :data:`Memo`).
        self.memo = memo
        self.kept: Optional[Memo] = None if memo is None else {}
        self.added = 0  # entries of ``kept`` not taken from ``memo``
        self.strict = strict
        self.max_errors = max_errors
        self.source = source
        self.names: list[str] = []
        self._name_ids: dict[bytes, int] = {}
        self.labelsets: list[tuple[tuple[str, str], ...]] = []
        self._ls_by_key: dict[tuple[tuple[str, str], ...], int] = {}
        self._ls_by_block: dict[bytes, int] = {}
        self.families: dict[str, list[str | None]] = {}
        self.errors: list[tuple[int, int, str]] = []
        self.n_errors = 0
        self.eof = False

    # -- tables ---------------------------------------------------------------------------------
    def name_id(self, name: bytes) -> int:
        nid = self._name_ids.get(name)
        if nid is None:
            nid = self._name_ids[name] = len(self.names)
            self.names.append(name.decode("ascii"))
        return nid

    def block_id(self, block: bytes) -> int:
        """Label-set id of a label block's bytes; equal sets in any order or spacing share one id."""
        lid = self._ls_by_block.get(block)
        if lid is None:
            # block keys never start with '\n', comment keys always do (see comment())
            entry = cast("Optional[MemoEntry]", self.memo.get(block) if self.memo is not None else None)
            if entry is None:
                entry = memo_entry(parse_label_block(block))
                self.added += 1
            if self.kept is not None and len(block) <= MEMO_MAX_KEY:
                self.kept[block] = entry
            lid = self._ls_by_block[block] = self.labelset_id(entry)
        return lid

    def labelset_id(self, entry: MemoEntry) -> int:
        """Label-set id of parsed labels (see :func:`memo_entry`), registering a new set in first-seen order."""
        lid = self._ls_by_key.get(entry[1])
        if lid is None:
            lid = self._ls_by_key[entry[1]] = len(self.labelsets)
            self.labelsets.append(entry[0])
        return lid

    # -- errors ---------------------------------------------------------------------------------
    def error(self, lineno: int, line: bytes, col: int, reason: str) -> None:
        """Record a rejected line (lenient) or raise it (strict)."""
        column = len(line[:col].decode("utf-8", "replace")) + 1
        if self.strict:
            raise ParseError(reason, line=lineno, column=column,
                             source_line=line.decode("utf-8", "replace"), source=self.source)
        self.n_errors += 1
        if len(self.errors) < self.max_errors:
            self.errors.append((lineno, column, reason))

    # -- lines ----------------------------------------------------------------------------------
    def comment(self, line: bytes, p: int, lineno: int) -> None:
        """A line starting with '#' at ``p``: HELP, TYPE, UNIT, EOF or a plain comment."""
        # Metadata lines repeat every scrape, so their parse is remembered like label blocks.
        # The '\n' prefix keeps the keys apart: no block holds one ("m{# HELP x y} 1" has a
        # block equal to the line "# HELP x y"). HELP escapes and '# EOF' depend on the
        # format, hence the marker byte.
        key = (b"\n\x01" if self.om else b"\n") + line
        rec = cast("Optional[CommentRecord]", self.memo.get(key) if self.memo is not None else None)
        if rec is None:
            try:
                rec = self._parse_comment(line, p)
            except LineError as e:
                self.error(lineno, line, e.col, e.reason)
                return
            self.added += 1
        if self.kept is not None and len(key) <= MEMO_MAX_KEY:
            self.kept[key] = rec
        if not rec:
            return  # a plain comment
        if len(rec) == 1:  # (-1,): '# EOF'
            self.eof = True
            return
        slot, name, value, kw = rec
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = [None, None, None]
        if fam[slot] is not None:
            self.error(lineno, line, p, f"duplicate '# {kw}' line for {name}")
            return
        fam[slot] = value

    def _parse_comment(self, line: bytes, p: int) -> CommentRecord:
        """() for a plain comment, (-1,) for '# EOF', else (slot, family name, value, keyword)."""
        n = len(line)
        i = _skip_ws(line, p + 1, n)
        j = i
        while j < n and line[j] not in _WS:
            j += 1
        kw = line[i:j]
        if kw == b"EOF" and self.om and _skip_ws(line, j, n) == n:
            return (-1,)
        if kw not in (b"HELP", b"TYPE", b"UNIT"):
            return ()
        k = _skip_ws(line, j, n)
        if k >= n or line[k] not in NAME_START:
            raise LineError(k, f"expected a metric name after '# {kw.decode()}'")
        m = k + 1
        while m < n and line[m] in NAME_CHARS:
            m += 1
        if m < n and line[m] not in _WS:
            raise LineError(m, f"invalid character {chr(line[m])!r} in metric name")
        name = line[k:m].decode("ascii")
        t = _skip_ws(line, m, n)
        text = line[t:].rstrip(_WS)
        if kw == b"HELP":
            slot = 1
            raw = _unescape(text, _LABEL_ESCAPES if self.om else _HELP_ESCAPES_TEXT)
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LineError(t, "invalid UTF-8 in HELP text") from None
        elif kw == b"TYPE":
            slot = 0
            value = text.decode("ascii", "replace")
            if value not in METRIC_TYPES:
                raise LineError(t, f"unknown metric type {value!r}")
        else:
            slot = 2
            try:
                value = text.decode("utf-8")
            except UnicodeDecodeError:
                raise LineError(t, "invalid UTF-8 in UNIT") from None
        return slot, name, value, kw.decode()

    def sample(self, line: bytes, p: int, lineno: int) -> tuple[int, int, float, int] | None:
        """Parse a sample line starting at ``p``; None (and an error recorded) if it is rejected."""
        try:
            return self._sample(line, p)
        except LineError as e:
            self.error(lineno, line, e.col, e.reason)
            return None

    def _sample(self, line: bytes, p: int) -> tuple[int, int, float, int]:
        n = len(line)
        if line[p] not in NAME_START:
            if line[p] == _LBRACE:
                raise LineError(p, "metric name must come before '{'")
            raise LineError(p, "expected a metric name")
        q = p + 1
        while q < n and line[q] in NAME_CHARS:
            q += 1
        r = _skip_ws(line, q, n)
        if r < n and line[r] == _LBRACE:
            end = find_block_end(line, r + 1, n)
            try:
                lid = self.block_id(line[r + 1:end])
            except LineError as e:
                raise LineError(r + 1 + e.col, e.reason) from None
            r = end + 1
        else:
            if r == q and r < n:
                raise LineError(q, f"invalid character {chr(line[q])!r} in metric name")
            lid = self.block_id(b"")
        r = _skip_ws(line, r, n)
        if r >= n:
            raise LineError(r, "expected a value")
        v_end = r
        while v_end < n and line[v_end] not in _WS:
            v_end += 1
        try:
            value = parse_value(line[r:v_end])
        except ValueError:
            raise LineError(r, f"invalid value {line[r:v_end].decode('utf-8', 'replace')!r}") from None
        r = _skip_ws(line, v_end, n)
        ts = TS_ABSENT
        if r < n and not (self.om and line[r] == _HASH):
            t_end = r
            while t_end < n and line[t_end] not in _WS:
                t_end += 1
            try:
                ts = parse_timestamp(line[r:t_end], self.om)
            except ValueError as e:
                raise LineError(r, f"invalid timestamp {line[r:t_end].decode('utf-8', 'replace')!r}: {e}") from None
            r = _skip_ws(line, t_end, n)
        if r < n and not (self.om and line[r] == _HASH):
            raise LineError(r, "unexpected text after the sample")
        # An OpenMetrics exemplar (" # {...} v [ts]") is not kept: the relay does not forward them.
        # The name is registered last, as the native parser does, so both tables list only
        # names of accepted samples.
        return self.name_id(line[p:q]), lid, value, ts

    def after_eof(self, line: bytes, lineno: int) -> bool:
        """A line after '# EOF': True (stop) if it has content, which is an error."""
        if line.strip(_WS):
            self.error(lineno, line, 0, "content after '# EOF'")
            return True
        return False

    def finish(self, n_lines: int) -> None:
        if self.om and not self.eof:
            self.error(max(n_lines, 1), b"", 0, "missing '# EOF' at the end of an OpenMetrics exposition (truncated body?)")


def parse_raw(data: bytes | bytearray | memoryview, om: bool, strict: bool, max_errors: int, source: str | None,
              memo: Optional[Memo] = None) -> RawScrape:
    """Parse a whole body (see the module docstring); the pure-Python implementation.

    ``memo`` (a dict owned by the caller, reused across calls) remembers parsed label blocks
    and comment lines; afterwards it holds those of this body only (see :data:`Memo`).
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray / memoryview: the twin works on immutable bytes
    b = Builder(om, strict, max_errors, source, memo)
    values = array("d")
    timestamps = array("q")
    name_ids = array("i")
    labelset_ids = array("i")
    lineno = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a final newline ends the last line; it does not start another
    for line in lines:
        lineno += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if b.eof:
            if b.after_eof(line, lineno):
                break
            continue
        n = len(line)
        p = _skip_ws(line, 0, n)
        if p == n:
            continue
        if line[p] == _HASH:
            b.comment(line, p, lineno)
            continue
        s = b.sample(line, p, lineno)
        if s is not None:
            name_ids.append(s[0])
            labelset_ids.append(s[1])
            values.append(s[2])
            timestamps.append(s[3])
    b.finish(lineno)
    keep_memo(memo, b.kept, b.added)
    return RawScrape(values, timestamps, name_ids, labelset_ids, b.names, b.labelsets, b.families,
                     b.errors, b.n_errors, lineno)
