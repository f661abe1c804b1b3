"""A strict validator for the OpenMetrics 1.0 text exposition format.

``validate(data)`` returns ``None`` for a valid exposition and raises
:class:`~dcgmrelay.errors.ParseError` at the first violation, with the 1-based
line and column. It follows the ABNF of OpenMetrics 1.0 exactly (the spec says
the ABNF wins over the prose) plus every MUST of the prose that can be checked
from one exposition.

Encoding and lines
  * UTF-8 only: an invalid byte is reported at its column; no byte order mark.
  * Lines end with ``\\n`` alone: a line ending in ``\\r`` is an error.
  * No blank lines. ``# EOF`` must be the last line, optionally without its
    trailing ``\\n`` (``exposition = metricset HASH SP eof [ LF ]``); nothing
    may follow it.

Syntax (ABNF)
  * Metric names ``[a-zA-Z_:][a-zA-Z0-9_:]*``, label names
    ``[a-zA-Z_][a-zA-Z0-9_]*``; names starting with ``_`` are reserved.
  * ``{name="value",...}``: no spaces, no empty items, no trailing comma;
    ``{}`` is allowed. Duplicate label names are errors.
  * Escaped strings (label values, HELP): ``\\\\``, ``\\"``, ``\\n`` and
    ``\\`` followed by any other character except a line feed; a bare ``"``
    in HELP text is not allowed.
  * Exactly one space between fields; no trailing space.
  * Values: ``[+-]digits[.digits][e[+-]digits]`` (``1.``, ``.5`` allowed),
    ``[+-]Inf``/``Infinity`` and ``NaN`` in any case; finite values must fit a
    float64. Timestamps: real numbers only (no Inf/NaN).
  * Exemplars `` # {labels} value [timestamp]``.
  * ``# TYPE``, ``# HELP``, ``# UNIT`` with exactly one space between fields;
    types are the eight lowercase names; units are ``[a-zA-Z0-9_:]*``. Any
    other line starting with ``#`` is an error.

MetricFamilies
  * At most one TYPE, HELP and UNIT each, all before the family's samples.
  * A non-empty unit must be the name's suffix after ``_``; info and stateset
    families must not have one.
  * Families are contiguous and unique, and no family may claim a sample
    name (name plus type suffix) that another family can also produce.
  * A sample belongs to the current family if its name is the family name
    plus a suffix of the family's type; otherwise it starts a new ``unknown``
    family named after the sample. Suffixes: counter ``_total``/``_created``,
    histogram ``_bucket``/``_count``/``_sum``/``_created``, gaugehistogram
    ``_bucket``/``_gcount``/``_gsum``, summary none/``_count``/``_sum``/
    ``_created``, info ``_info``, gauge/stateset/unknown none.

Metrics and MetricPoints
  * A Metric (labels without ``le``/``quantile``/the stateset label) is
    contiguous and appears once per family.
  * Its MetricPoints either all have timestamps, strictly increasing, or
    there is only one MetricPoint; a series appears once per MetricPoint.

Types
  * counter: ``_total`` present in every MetricPoint, not NaN, not negative.
  * histogram/gaugehistogram: ``_bucket`` needs ``le`` (a number, ``+Inf``
    spelt exactly so, not NaN); other samples must not have ``le``; thresholds
    strictly increasing; bucket and count values non-negative integers,
    cumulative; a ``+Inf`` bucket in every MetricPoint; ``_count``/``_gcount``
    present if and only if ``_sum``/``_gsum`` is, and equal to the ``+Inf``
    bucket. Histogram ``_sum`` is not NaN, not negative and absent when a
    threshold is negative; ``_gsum`` is not NaN and negative only with a
    negative threshold.
  * summary: quantile samples need ``quantile`` in [0, 1] and a value that is
    not negative; ``_count`` (integer) and ``_sum`` not NaN, not negative;
    other samples must not have ``quantile``.
  * stateset: each sample has a label named after the family; value 0 or 1.
  * info: value 1.
  * Exemplars only on counter ``_total`` and histogram/gaugehistogram
    ``_bucket`` samples; label names plus values at most 128 code points; a
    bucket exemplar's value is at most the bucket's ``le``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Dict, List, NoReturn, Optional, Set, Tuple

from .errors import ParseError

__all__ = ["validate"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNIT_CHARS = re.compile(r"[a-zA-Z0-9_:]*")
# RFC 5234 quoted strings are case-insensitive, so "e" also matches "E".
_REAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# ASCII flag: without it IGNORECASE lets e.g. U+0131 (dotless i) match "i".
_NON_REAL = re.compile(r"[+-]?(?:inf|infinity)|nan", re.IGNORECASE | re.ASCII)
# A run of escaped-string characters that need no attention.
_PLAIN = re.compile(r'[^"\\]*')
# surrogateescape maps each undecodable byte to U+DC80..U+DCFF.
_BAD_BYTE = re.compile("[\udc80-\udcff]")

_TYPES = ("counter", "gauge", "histogram", "gaugehistogram", "stateset", "info", "summary", "unknown")
_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "stateset": ("",),
    "info": ("_info",),
    "summary": ("", "_count", "_sum", "_created"),
    "unknown": ("",),
}
# Only types whose samples all need a suffix can see their bare name refused.
_SUFFIX_RULE = {
    "counter": "counter sample name must end in _total or _created",
    "histogram": "histogram sample name must end in _bucket, _count, _sum or _created",
    "gaugehistogram": "gaugehistogram sample name must end in _bucket, _gcount or _gsum",
    "info": "info sample name must end in _info",
}
_HISTOGRAMS = ("histogram", "gaugehistogram")
_EXEMPLAR_LIMIT = 128
_POS_INF = Decimal("Infinity")
_NEG_INF = Decimal("-Infinity")

_LabelKey = Tuple[Tuple[str, str], ...]
_CR = "carriage return at end of line: lines must end with '\\n' only"


class _Fail(Exception):
    """A violation on the line being parsed; the driver adds the line number."""

    def __init__(self, reason: str, column: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.column = column


class _LineFail(Exception):
    """A violation found while checking semantics, possibly on an earlier line."""

    def __init__(self, reason: str, line: int, column: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line
        self.column = column


# --------------------------------------------------------------------------
# Syntax: one line at a time, positions are 0-based, columns 1-based.


class _Label:
    __slots__ = ("name", "value", "col", "value_col")

    def __init__(self, name: str, value: str, col: int, value_col: int) -> None:
        self.name = name
        self.value = value
        self.col = col
        self.value_col = value_col


class _Exemplar:
    __slots__ = ("labels", "col", "value", "value_col")

    def __init__(self, labels: List[_Label], col: int, value: float, value_col: int) -> None:
        self.labels = labels
        self.col = col
        self.value = value
        self.value_col = value_col


class _Sample:
    __slots__ = ("name", "labels", "labels_col", "value", "value_col", "ts", "ts_col", "exemplar")

    def __init__(self, name: str) -> None:
        self.name = name
        self.labels: List[_Label] = []
        self.labels_col = len(name) + 1
        self.value = 0.0
        self.value_col = 0
        self.ts: Optional[Decimal] = None
        self.ts_col = 0
        self.exemplar: Optional[_Exemplar] = None


class _Descriptor:
    __slots__ = ("kind", "name", "arg", "arg_col")

    def __init__(self, kind: str, name: str, arg: str, arg_col: int) -> None:
        self.kind = kind
        self.name = name
        self.arg = arg
        self.arg_col = arg_col


def _to_decimal(token: str) -> Decimal:
    try:
        return Decimal(token)
    except InvalidOperation:
        # Exponents beyond Decimal's range: float() already showed the value
        # is finite, so it rounded to 0 or a tiny number; ordering is moot.
        return Decimal(float(token))


def _number(token: str, col: int, what: str) -> float:
    if _REAL.fullmatch(token):
        value = float(token)
        if math.isinf(value):
            raise _Fail(f"{what} {_q(token)} does not fit in a float64", col)
        return value
    if _NON_REAL.fullmatch(token):
        return float(token)
    if not token:
        raise _Fail(f"expected {what}; fields are separated by exactly one space", col)
    raise _Fail(f"invalid {what} {_q(token)}: expected a number such as 1, -2.5, 1e3, +Inf or NaN", col)


def _timestamp(token: str, col: int, what: str) -> Decimal:
    if not token:
        raise _Fail(f"expected {what}; fields are separated by exactly one space", col)
    if not _REAL.fullmatch(token):
        raise _Fail(f"invalid {what} {_q(token)}: expected a real number such as 1520879607.789", col)
    if math.isinf(float(token)):
        raise _Fail(f"{what} {_q(token)} does not fit in a float64", col)
    return _to_decimal(token)


def _escaped(text: str, pos: int, in_quotes: bool) -> Tuple[str, int]:
    """Scan an escaped-string from ``pos``; return it unescaped and the end.

    Inside a label value it ends after the closing quote; HELP text runs to
    the end of the line and may not contain a bare quote.
    """
    parts: List[str] = []
    n = len(text)
    while True:
        m = _PLAIN.match(text, pos)
        assert m is not None  # '*' always matches
        parts.append(m.group())
        pos = m.end()
        if pos >= n:
            if in_quotes:
                raise _Fail("unterminated label value: expected a closing '\"'", pos + 1)
            return "".join(parts), pos
        if text[pos] == '"':
            if in_quotes:
                return "".join(parts), pos + 1
            raise _Fail("a '\"' in HELP text must be escaped as '\\\"'", pos + 1)
        if pos + 1 >= n:
            where = "label value" if in_quotes else "HELP text"
            raise _Fail(f"backslash at end of {where}: expected \\\\, \\\" or \\n", pos + 1)
        nxt = text[pos + 1]
        if nxt == "n":
            parts.append("\n")
        elif nxt in '"\\':
            parts.append(nxt)
        else:
            # ABNF: BS normal-char is allowed (only discouraged) and kept as is.
            parts.append("\\" + nxt)
        pos += 2


def _labels(text: str, pos: int, what: str) -> Tuple[List[_Label], int]:
    """Parse ``{...}`` starting at ``text[pos] == '{'``; return labels and the end."""
    n = len(text)
    labels: List[_Label] = []
    seen: Set[str] = set()
    pos += 1
    if pos < n and text[pos] == "}":
        return labels, pos + 1
    while True:
        m = _LABEL_NAME.match(text, pos)
        if m is None:
            if pos < n and text[pos] == "}":
                raise _Fail(f"trailing comma in {what} labels: expected a label name after ','", pos + 1)
            got = f"{_q(text[pos])}" if pos < n else "end of line"
            raise _Fail(f"expected a label name [a-zA-Z_][a-zA-Z0-9_]*, got {got}", pos + 1)
        name = m.group()
        col = pos + 1
        if name in seen:
            raise _Fail(f"duplicate label name {_q(name)}", col)
        if name.startswith("_"):
            raise _Fail(f"label name {_q(name)} is reserved: names starting with '_' must not be used", col)
        seen.add(name)
        pos = m.end()
        if pos >= n or text[pos] != "=":
            raise _Fail(f"expected '=' after label name {_q(name)}", pos + 1)
        pos += 1
        if pos >= n or text[pos] != '"':
            raise _Fail(f"expected '\"' to open the value of label {_q(name)}", pos + 1)
        value, pos = _escaped(text, pos + 1, in_quotes=True)
        labels.append(_Label(name, value, col, col + len(name) + 2))
        if pos < n and text[pos] == "}":
            return labels, pos + 1
        if pos >= n or text[pos] != ",":
            got = f"{_q(text[pos])}" if pos < n else "end of line"
            raise _Fail(f"expected ',' or '}}' after a label value, got {got}", pos + 1)
        pos += 1


def _token(text: str, pos: int) -> int:
    """End of the space-delimited token starting at ``pos``."""
    end = text.find(" ", pos)
    return len(text) if end < 0 else end


def _parse_sample(text: str) -> _Sample:
    n = len(text)
    m = _METRIC_NAME.match(text)
    if m is None:
        raise _Fail("expected a metric name [a-zA-Z_:][a-zA-Z0-9_:]* or a '# TYPE/HELP/UNIT/EOF' line", 1)
    sample = _Sample(m.group())
    pos = m.end()
    if pos < n and text[pos] == "{":
        sample.labels, pos = _labels(text, pos, "sample")
        after = "labels"
    else:
        after = f"metric name {_q(sample.name)}"
    if pos >= n or text[pos] != " ":
        got = f"{_q(text[pos])}" if pos < n else "end of line"
        brace = "'{' or " if after != "labels" else ""
        raise _Fail(f"expected {brace}' ' and a value after the {after}, got {got}", pos + 1)
    pos += 1
    end = _token(text, pos)
    sample.value = _number(text[pos:end], pos + 1, "sample value")
    sample.value_col = pos + 1
    if end == n:
        return sample
    pos = end + 1
    if pos == n:
        raise _Fail("trailing space after the sample value", end + 1)
    if text[pos] != "#":
        end = _token(text, pos)
        sample.ts = _timestamp(text[pos:end], pos + 1, "timestamp")
        sample.ts_col = pos + 1
        if end == n:
            return sample
        pos = end + 1
        if pos == n:
            raise _Fail("trailing space after the timestamp", end + 1)
        if text[pos] != "#":
            raise _Fail(f"expected '# ' to start an exemplar, got {_q(text[pos])}", pos + 1)
    sample.exemplar = _parse_exemplar(text, pos)
    return sample


def _parse_exemplar(text: str, pos: int) -> _Exemplar:
    """Parse ``# {labels} value [timestamp]`` to the end of the line."""
    n = len(text)
    col = pos + 1
    pos += 1
    if pos >= n or text[pos] != " ":
        raise _Fail("expected ' ' after '#' of an exemplar", pos + 1)
    pos += 1
    if pos >= n or text[pos] != "{":
        raise _Fail("expected '{' to open exemplar labels (use {} for none)", pos + 1)
    labels, pos = _labels(text, pos, "exemplar")
    if pos >= n or text[pos] != " ":
        got = f"{_q(text[pos])}" if pos < n else "end of line"
        raise _Fail(f"expected ' ' and a value after exemplar labels, got {got}", pos + 1)
    pos += 1
    end = _token(text, pos)
    value = _number(text[pos:end], pos + 1, "exemplar value")
    exemplar = _Exemplar(labels, col, value, pos + 1)
    if end == n:
        return exemplar
    pos = end + 1
    if pos == n:
        raise _Fail("trailing space after the exemplar value", end + 1)
    end = _token(text, pos)
    _timestamp(text[pos:end], pos + 1, "exemplar timestamp")
    if end != n:
        raise _Fail("unexpected text after the exemplar timestamp", end + 1)
    return exemplar


def _parse_descriptor(text: str) -> _Descriptor:
    n = len(text)
    if text.startswith("# EOF"):
        raise _Fail("'# EOF' must be alone on its line", 6)
    kind = text[2:6]
    if not text.startswith("# ") or kind not in ("TYPE", "HELP", "UNIT"):
        raise _Fail("comments are not allowed: '#' lines must be '# TYPE', '# HELP', '# UNIT' or '# EOF'", 1)
    if n <= 6 or text[6] != " ":
        raise _Fail(f"expected ' ' after '# {kind}'", 7)
    m = _METRIC_NAME.match(text, 7)
    if m is None:
        raise _Fail(f"expected a metric name after '# {kind} '", 8)
    name = m.group()
    pos = m.end()
    if pos >= n or text[pos] != " ":
        got = f"{_q(text[pos])}" if pos < n else "end of line"
        raise _Fail(f"expected ' ' after the metric name in '# {kind}', got {got}", pos + 1)
    pos += 1
    arg_col = pos + 1
    if kind == "TYPE":
        arg = text[pos:]
        if arg not in _TYPES:
            raise _Fail(f"invalid metric type {_q(arg)}: expected one of {', '.join(_TYPES)}", arg_col)
    elif kind == "UNIT":
        um = _UNIT_CHARS.match(text, pos)
        assert um is not None
        if um.end() != n:
            bad = _q(text[um.end()])
            raise _Fail(f"invalid character {bad} in unit: expected [a-zA-Z0-9_:]", um.end() + 1)
        arg = um.group()
    else:
        arg, _ = _escaped(text, pos, in_quotes=False)
    return _Descriptor(kind, name, arg, arg_col)


# --------------------------------------------------------------------------
# Semantics.


class _Point:
    """What one MetricPoint has shown so far (for the cross-sample rules)."""

    def __init__(self, ts: Optional[Decimal], line: int) -> None:
        self.ts = ts
        self.first_line = line
        self.series: Set[Tuple[str, _LabelKey]] = set()
        self.has_total = False
        self.last_le: Optional[Decimal] = None
        self.last_le_text = ""
        self.last_bucket_value = 0.0
        self.last_bucket_line = 0
        self.inf_value: Optional[float] = None
        self.inf_line = 0
        self.negative_le = False
        self.count: Optional[float] = None
        self.count_line = 0
        self.count_name = ""
        self.sum: Optional[float] = None
        self.sum_line = 0
        self.sum_col = 0


class _Family:
    def __init__(self, name: str) -> None:
        self.name = name
        self.type = "unknown"
        self.unit = ""
        self.meta: Set[str] = set()
        self.has_samples = False
        # sample name -> suffix
        self.allowed: Dict[str, str] = {name: ""}
        self.metrics_seen: Set[_LabelKey] = set()
        self.metric: Optional[_LabelKey] = None
        self.point: Optional[_Point] = None


def _clip(text: str, limit: int = 40) -> str:
    """Shorten user text quoted in a reason; the caret excerpt shows the rest."""
    return text if len(text) <= limit else text[:limit] + "..."


def _q(text: str) -> str:
    return repr(_clip(text))


def _show(key: _LabelKey) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in key)
    return "{" + inner + "}"


class _Validator:
    def __init__(self) -> None:
        # sample name -> family that may produce it (catches clashes, repeats)
        self.claimed: Dict[str, str] = {}
        self.types: Dict[str, str] = {}
        self.fam: Optional[_Family] = None

    # families

    def start_family(self, name: str, line: int, col: int) -> _Family:
        owner = self.claimed.get(name)
        if owner == name:
            raise _LineFail(
                f"metric family {_q(name)} already appeared; a family must be contiguous and its name unique",
                line,
                col,
            )
        if owner is not None:
            raise _LineFail(
                f"name {_q(name)} clashes with a sample name of the {self.types[owner]} family {_q(owner)}",
                line,
                col,
            )
        if name.startswith("_"):
            raise _LineFail(f"metric family name {_q(name)} is reserved: names must not start with '_'", line, col)
        self.claimed[name] = name
        self.types[name] = "unknown"
        fam = _Family(name)
        self.fam = fam
        return fam

    def finish_family(self) -> None:
        if self.fam is not None:
            self.close_point(self.fam)
            self.fam = None

    def descriptor(self, d: _Descriptor, line: int) -> None:
        fam = self.fam
        if fam is None or fam.name != d.name:
            self.finish_family()
            fam = self.start_family(d.name, line, 8)
        elif fam.has_samples:
            raise _LineFail(f"'# {d.kind}' for {_q(d.name)} must come before the family's samples", line, 1)
        elif d.kind in fam.meta:
            raise _LineFail(f"duplicate '# {d.kind}' for {_q(d.name)}: at most one per family", line, 1)
        fam.meta.add(d.kind)
        if d.kind == "TYPE":
            if fam.unit and d.arg in ("info", "stateset"):
                raise _LineFail(f"{d.arg} families must have an empty unit", line, d.arg_col)
            for suffix in _SUFFIXES[d.arg]:
                sample_name = d.name + suffix
                owner = self.claimed.get(sample_name)
                if owner is not None and owner != d.name:
                    raise _LineFail(
                        f"a {d.arg} named {_q(d.name)} has sample name {_q(sample_name)}, "
                        f"which clashes with the {self.types[owner]} family {_q(owner)}",
                        line,
                        d.arg_col,
                    )
            for suffix in _SUFFIXES[d.arg]:
                self.claimed[d.name + suffix] = d.name
            fam.type = d.arg
            self.types[d.name] = d.arg
            fam.allowed = {d.name + suffix: suffix for suffix in _SUFFIXES[d.arg]}
        elif d.kind == "UNIT" and d.arg:
            if not d.name.endswith("_" + d.arg):
                raise _LineFail(
                    f"unit {_q(d.arg)} must be the suffix of the family name {_q(d.name)} after an '_'",
                    line,
                    d.arg_col,
                )
            if fam.type in ("info", "stateset"):
                raise _LineFail(f"{fam.type} families must have an empty unit", line, d.arg_col)
            fam.unit = d.arg

    # MetricPoints

    def close_point(self, fam: _Family) -> None:
        p = fam.point
        fam.point = None
        if p is None:
            return
        if fam.type == "counter" and not p.has_total:
            raise _LineFail(f"counter MetricPoint has no {_clip(fam.name)}_total sample", p.first_line, 1)
        if fam.type in _HISTOGRAMS:
            count, total = ("_count", "_sum") if fam.type == "histogram" else ("_gcount", "_gsum")
            if p.inf_value is None:
                raise _LineFail(
                    f'{fam.type} MetricPoint has no {_clip(fam.name)}_bucket{{le="+Inf"}} sample',
                    p.last_bucket_line or p.first_line,
                    1,
                )
            if p.count is not None and p.sum is None:
                raise _LineFail(f"{count} requires {total} in the same {fam.type} MetricPoint", p.count_line, 1)
            if p.sum is not None and p.count is None:
                raise _LineFail(f"{total} requires {count} in the same {fam.type} MetricPoint", p.sum_line, 1)
            if fam.type == "gaugehistogram" and p.sum is not None and p.sum < 0 and not p.negative_le:
                raise _LineFail("_gsum may be negative only if a bucket threshold is", p.sum_line, p.sum_col)

    def sample(self, s: _Sample, line: int) -> None:
        fam = self.fam
        suffix = fam.allowed.get(s.name) if fam is not None else None
        if suffix is None:
            if fam is not None and self.claimed.get(s.name) == fam.name and fam.type in _SUFFIX_RULE:
                self.finish_family()
                raise _LineFail(_SUFFIX_RULE[fam.type], line, 1)
            self.finish_family()
            fam = self.start_family(s.name, line, 1)
            suffix = ""
        assert fam is not None
        fam.has_samples = True
        typ = fam.type
        by_name = {label.name: label for label in s.labels}

        # The label that tells samples of one MetricPoint apart.
        inner: Optional[str] = None
        if typ in _HISTOGRAMS and suffix == "_bucket":
            inner = "le"
        elif typ == "summary" and suffix == "":
            inner = "quantile"
        elif typ == "stateset":
            inner = fam.name

        everything = tuple(sorted((label.name, label.value) for label in s.labels))
        if typ == "info":
            key = everything  # info labels cannot be told apart from Metric labels
        else:
            key = tuple(sorted((label.name, label.value) for label in s.labels if label.name != inner))
        # Placing first closes the previous MetricPoint, whose problems are on earlier lines.
        p = self.place(fam, key, s, line)

        le: Optional[Decimal] = None
        if typ in _HISTOGRAMS:
            if suffix == "_bucket":
                le = self.le(s, by_name, line)
            elif "le" in by_name:
                raise _LineFail(f"only _bucket samples of a {typ} may have an 'le' label", line, by_name["le"].col)
        elif typ == "summary":
            if suffix == "":
                self.quantile(s, by_name, line)
            elif "quantile" in by_name:
                raise _LineFail("only quantile samples may have a 'quantile' label", line, by_name["quantile"].col)
        elif typ == "stateset" and fam.name not in by_name:
            raise _LineFail(f"stateset sample must have a label named {_q(fam.name)}", line, s.labels_col)

        series = (s.name, everything)
        if series in p.series:
            # Without timestamps a Metric has a single MetricPoint.
            shown = _clip(s.name + _show(everything), 80)
            raise _LineFail(f"duplicate sample {shown} in one MetricPoint", line, 1)
        p.series.add(series)

        le_label = by_name.get("le") if le is not None else None
        self.values(fam, suffix, s, p, le, le_label, line)
        if s.exemplar is not None:
            self.exemplar(fam, suffix, s.exemplar, le, le_label, line)

    def place(self, fam: _Family, key: _LabelKey, s: _Sample, line: int) -> _Point:
        """Find the MetricPoint of this sample, enforcing grouping and timestamp order."""
        p = fam.point
        if p is not None and key == fam.metric:
            if (s.ts is None) != (p.ts is None):
                col = s.ts_col if s.ts is not None else s.value_col
                raise _LineFail("samples of one Metric must all have timestamps or all have none", line, col)
            if s.ts is None or p.ts is None or s.ts == p.ts:
                return p
            if s.ts < p.ts:
                raise _LineFail(
                    "timestamp goes backwards: a Metric's MetricPoints must have increasing timestamps "
                    "and must not be interleaved",
                    line,
                    s.ts_col,
                )
            self.close_point(fam)
        else:
            self.close_point(fam)
            if key in fam.metrics_seen:
                raise _LineFail(
                    f"Metric {_clip(fam.name + _show(key), 80)} already appeared; its samples must be contiguous",
                    line,
                    1,
                )
            fam.metrics_seen.add(key)
            fam.metric = key
        p = _Point(s.ts, line)
        fam.point = p
        return p

    def le(self, s: _Sample, by_name: Dict[str, _Label], line: int) -> Decimal:
        label = by_name.get("le")
        if label is None:
            raise _LineFail("_bucket sample must have an 'le' label", line, s.labels_col)
        text = label.value
        if text == "+Inf":
            return _POS_INF
        if text == "-Inf":
            return _NEG_INF
        if _REAL.fullmatch(text) and not math.isinf(float(text)):
            return _to_decimal(text)
        raise _LineFail(f"invalid le {_q(text)}: expected a number or exactly '+Inf'", line, label.value_col)

    def quantile(self, s: _Sample, by_name: Dict[str, _Label], line: int) -> None:
        label = by_name.get("quantile")
        if label is None:
            raise _LineFail("summary quantile sample must have a 'quantile' label", line, s.labels_col)
        text = label.value
        if not _REAL.fullmatch(text) or not Decimal(0) <= _to_decimal(text) <= Decimal(1):
            raise _LineFail(f"invalid quantile {_q(text)}: expected a number between 0 and 1", line, label.value_col)

    def values(
        self,
        fam: _Family,
        suffix: str,
        s: _Sample,
        p: _Point,
        le: Optional[Decimal],
        le_label: Optional[_Label],
        line: int,
    ) -> None:
        typ = fam.type
        v = s.value
        col = s.value_col

        def fail(reason: str) -> NoReturn:
            raise _LineFail(reason, line, col)

        def counter_like(what: str, integer: bool) -> None:
            if math.isnan(v):
                fail(f"{what} must not be NaN")
            if v < 0:
                fail(f"{what} must not be negative")
            if integer and not v.is_integer():
                fail(f"{what} must be an integer")

        if typ == "counter":
            if suffix == "_total":
                counter_like("counter _total", integer=False)
                p.has_total = True
        elif typ in _HISTOGRAMS:
            if suffix == "_bucket":
                assert le is not None and le_label is not None
                le_text = le_label.value
                counter_like("bucket value", integer=True)
                if p.last_le is not None and le <= p.last_le:
                    raise _LineFail(
                        f"buckets must be in increasing le order: le={_q(le_text)} after {_q(p.last_le_text)}",
                        line,
                        le_label.value_col,
                    )
                if p.last_le is not None and v < p.last_bucket_value:
                    fail(f"bucket values must be cumulative: {v} is below the previous {p.last_bucket_value}")
                p.last_le = le
                p.last_le_text = le_text
                p.last_bucket_value = v
                p.last_bucket_line = line
                if le < 0:
                    p.negative_le = True
                    if typ == "histogram" and p.sum is not None:
                        fail("a histogram with a negative bucket threshold must not have _sum")
                if le == _POS_INF:
                    p.inf_value = v
                    p.inf_line = line
                    if p.count is not None and p.count != v:
                        fail(f"+Inf bucket value {v} differs from the {p.count_name} value {p.count}")
            elif suffix in ("_count", "_gcount"):
                counter_like(suffix, integer=True)
                p.count, p.count_line, p.count_name = v, line, suffix
                if p.inf_value is not None and p.inf_value != v:
                    fail(f"{suffix} value {v} differs from the +Inf bucket value {p.inf_value}")
            elif suffix == "_sum":
                counter_like("histogram _sum", integer=False)
                if p.negative_le:
                    fail("a histogram with a negative bucket threshold must not have _sum")
                p.sum, p.sum_line, p.sum_col = v, line, col
            elif suffix == "_gsum":
                if math.isnan(v):
                    fail("_gsum must not be NaN")
                p.sum, p.sum_line, p.sum_col = v, line, col
        elif typ == "summary":
            if suffix == "":
                if v < 0:
                    fail("summary quantile value must not be negative")
            elif suffix == "_count":
                counter_like("summary _count", integer=True)
            elif suffix == "_sum":
                counter_like("summary _sum", integer=False)
        elif typ == "stateset":
            if v not in (0.0, 1.0):
                fail("stateset value must be 0 or 1")
        elif typ == "info":
            if v != 1.0:
                fail("info value must be 1")

    def exemplar(
        self,
        fam: _Family,
        suffix: str,
        ex: _Exemplar,
        le: Optional[Decimal],
        le_label: Optional[_Label],
        line: int,
    ) -> None:
        allowed = (fam.type == "counter" and suffix == "_total") or (fam.type in _HISTOGRAMS and suffix == "_bucket")
        if not allowed:
            raise _LineFail(
                "exemplars are only allowed on counter _total and histogram/gaugehistogram _bucket samples",
                line,
                ex.col,
            )
        length = sum(len(label.name) + len(label.value) for label in ex.labels)
        if length > _EXEMPLAR_LIMIT:
            raise _LineFail(
                f"exemplar labels are {length} characters long; the limit is {_EXEMPLAR_LIMIT}",
                line,
                ex.col + 2,
            )
        if le is not None and le_label is not None and not ex.value <= float(le):
            raise _LineFail(
                f"exemplar value {ex.value} is above its bucket's le={_q(le_label.value)}", line, ex.value_col
            )


# --------------------------------------------------------------------------
# Driver.


def validate(data: bytes, *, source: Optional[str] = None) -> None:
    """Raise ParseError at the first place ``data`` is not OpenMetrics 1.0 text."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"validate() needs bytes, not {type(data).__name__}")
    lines = bytes(data).split(b"\n")
    last = len(lines) - 1
    v = _Validator()

    def error(reason: str, line: int, column: int) -> ParseError:
        raw = lines[line - 1] if line - 1 <= last else b""
        return ParseError(
            reason,
            line=line,
            column=column,
            source_line=raw.decode("utf-8", errors="replace"),
            source=source,
        )

    try:
        for idx, raw in enumerate(lines):
            lineno = idx + 1
            if idx == last and not raw:
                # The input ended (after a line feed, or was empty) without '# EOF'.
                v.finish_family()
                raise _LineFail("expected '# EOF' as the last line", lineno, 1)
            text = raw.decode("utf-8", errors="surrogateescape")
            if text == "# EOF":
                v.finish_family()
                if idx == last or (idx == last - 1 and not lines[last]):
                    return
                raise _LineFail("nothing may follow the '# EOF' line", lineno + 1, 1)
            if not text:
                raise _LineFail("blank lines are not allowed", lineno, 1)
            if idx == 0 and text.startswith("\ufeff"):
                raise _LineFail("byte order marks are not allowed", lineno, 1)
            _line(v, text, lineno)
            if idx == last:
                v.finish_family()
                raise _LineFail(
                    "missing line feed at end of input: expected '# EOF' as the last line", lineno, len(text) + 1
                )
    except _LineFail as f:
        raise error(f.reason, f.line, f.column) from None
    raise AssertionError("unreachable")  # the last element always returns or raises


def _line(v: _Validator, text: str, lineno: int) -> None:
    bad = _BAD_BYTE.search(text)
    # A trailing CR is reported after any earlier problem on the line.
    body = text.rstrip("\r")
    parsed: _Sample | _Descriptor
    if body == "# EOF":
        raise _LineFail(_CR, lineno, len(body) + 1)
    try:
        parsed = _parse_descriptor(body) if body.startswith("#") else _parse_sample(body)
    except _Fail as f:
        if bad is None or f.column <= bad.start():
            raise _LineFail(f.reason, lineno, f.column) from None
        parsed = _Sample("")  # placeholder; the bad byte is reported below
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        raise _LineFail(f"invalid UTF-8 byte 0x{byte:02x}", lineno, bad.start() + 1)
    if len(body) != len(text):
        raise _LineFail(_CR, lineno, len(body) + 1)
    if isinstance(parsed, _Descriptor):
        v.descriptor(parsed, lineno)
    else:
        v.sample(parsed, lineno)
