"""The dcgm-exporter collectors CSV ("counters file") and what it allows through.

:func:`load_csv` reads the file the way dcgm-exporter does, so a file the
relay accepts is one the exporter accepts, and the result (:class:`MetricSpec`)
answers the relay's questions per DCGM field id with numpy lookups.

Reading rules (dcgm-exporter ``ReadCSVFile``/``ExtractCounters``: Go
``encoding/csv`` with ``Comment = '#'``, other options default):

* A line whose first character is ``#`` is a comment; an empty line is skipped.
* ``\\r\\n`` counts as ``\\n``. RFC 4180 quoting: a field that *starts* with
  ``"`` is quoted, may hold commas, newlines and ``""``; a ``"`` anywhere in an
  unquoted field is an error (so ``x, "a, b"`` is an error: the field starts
  with a space).
* The first record fixes the number of fields; a later record with another
  count is an error. Then every record must have exactly 3 fields: DCGM field
  name, Prometheus type, help.
* Each field is trimmed of spaces only (Go ``strings.Trim(f, " ")``), not tabs.
* The name resolves through the field table (DCGM 4.6 canonical names, the
  pre-4.6 names dcgm-exporter uses, the 1.x names, ``DCGM_EXP_*``). The type
  must be one of :data:`PROM_TYPES`, case-sensitive; dcgm-exporter does not check
  the type of its own ``DCGM_EXP_*`` fields, so neither do we (a warning only).

Tolerant extensions, needed for real vendor files (WhaTap's operator CSV). Stock
dcgm-exporter refuses or misreads each of these:

* Indented lines: leading spaces and tabs before the first field are ignored.
* Indented ``#`` lines and whitespace-only lines are comments/blank. (Go's reader
  treats them as one-field records, which then fail the field-count check.)
* An inline comment in the third (or a later) column: from a ``#`` that follows
  a space or tab, outside quotes, to the end of the line, it is dropped together
  with the whitespace before it (``Driver Version.   # code 1`` -> ``Driver
  Version.``). A ``#`` not preceded by whitespace stays part of the help text.
* A UTF-8 byte-order mark at the start is dropped, with a warning.

Semantic checks beyond dcgm-exporter, reported as :class:`CsvSpecWarning`:

* A field listed twice (under the same or another of its names): the first row
  wins. (The exporter would render the family twice.)
* A name in :data:`TOLERATED_NAMES` (not a DCGM field, but used by a known
  exporter fork) gets its synthetic id; ``strict_names=True`` makes it an error.
* A string/blob field typed as a metric: its samples are not numbers.

Errors are :class:`~dcgmrelay.errors.CsvSpecError` with the file, the line (of
the field in question; 1-based) and the CSV column (1 = name, 2 = type, 3 =
help, 4+ = an extra field). Syntax errors also give the character position.
"""

from __future__ import annotations

import os
import warnings
from importlib import resources
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, TypeVar,
                    Union, cast)

import numpy as np
import numpy.typing as npt

from . import fields
from .errors import CsvSpecError, UnknownFieldError
from .kinds import Kind, builtin_kind

__all__ = [
    "PROM_TYPES",
    "TOLERATED_NAMES",
    "CsvSpecWarning",
    "MetricSpec",
    "SpecRow",
    "ToleratedName",
    "builtin_profiles",
    "load_csv",
]

#: The Prometheus types column 2 may hold (dcgm-exporter ``promMetricType``), case-sensitive.
PROM_TYPES: Tuple[str, ...] = ("gauge", "counter", "histogram", "summary", "label")

# Types that make a metric row (everything but "label").
_METRIC_TYPES = frozenset(PROM_TYPES) - {"label"}

# dcgm-exporter's own synthesised fields, whose type column it does not check.
_EXPORTER_PREFIX = "DCGM_EXP_"


class ToleratedName(NamedTuple):
    """A name that is not a DCGM field but is accepted, with a warning."""

    field_id: int
    kind: Kind
    why: str


#: Non-DCGM names seen in real collectors CSVs. Keep this short: every entry is a
#: name stock dcgm-exporter refuses ("could not find DCGM field").
TOLERATED_NAMES: Mapping[str, ToleratedName] = {
    "DCGM_FI_DEV_WEIGHTED_GPU_UTIL": ToleratedName(
        9005,
        Kind.GAUGE,
        # whatap/dcgm-exporter exporter_counters.go: iota after the four DCGM_EXP_* (9001-9004);
        # the "# code 9003" comment in WhaTap's CSV is stale.
        "computed by WhaTap's dcgm-exporter fork (synthetic id 9005), a 0.0-1.0 utilisation ratio",
    ),
}

_TOLERATED_BY_ID: Mapping[int, ToleratedName] = {t.field_id: t for t in TOLERATED_NAMES.values()}

# name -> (file in dcgmrelay/profiles, description)
_PROFILES: Mapping[str, Tuple[str, str]] = {
    "default": (
        "default-counters.csv",
        "dcgm-exporter etc/default-counters.csv: the exporter's default collectors file",
    ),
    "dcp": (
        "dcp-metrics-included.csv",
        "dcgm-exporter etc/dcp-metrics-included.csv: the same active rows as default",
    ),
    "whatap": (
        "whatap.csv",
        "WhaTap operator's whatap-dcgm-exporter.csv: identity labels, core gauges, DCP ratios, "
        "DCGM_FI_DEV_WEIGHTED_GPU_UTIL (indented, inline '# code N' comments)",
    ),
    "1.x": (
        "1.x-compatibility-metrics.csv",
        "dcgm-exporter etc/1.x-compatibility-metrics.csv: dcgm-exporter 1.x metric names",
    ),
}


class CsvSpecWarning(UserWarning):
    """Something in a collectors CSV the relay accepts but the author should look at."""


class SpecRow(NamedTuple):
    """One kept row of a collectors CSV."""

    field_id: int
    #: The name as written in the CSV (dcgm-exporter uses it as the metric name).
    name: str
    #: Column 2 as written: gauge, counter, histogram, summary or label.
    prom_type: str
    help: str
    #: What the relay does with the values (LABEL for ``label`` rows).
    kind: Kind
    #: 1-based line of the row in its file.
    line: int


KindLike = Union[Kind, str, int]
IdArray = npt.ArrayLike


class MetricSpec:
    """The rows of a collectors CSV, with per-field-id lookups.

    Immutable once built. ``in``, :meth:`kind`, :meth:`prom_type`, :meth:`help`
    and :meth:`row` take a field id or any name of the field; the array methods
    take integer arrays of field ids (any shape; -1 and unknown ids allowed).
    """

    __slots__ = ("_rows", "_by_id", "_source", "_warnings", "_field_ids", "_label_ids", "_kind_table", "_metric_table")

    def __init__(self, rows: Iterable[SpecRow], *, source: str = "<rows>", warnings: Iterable[str] = ()) -> None:
        kept = tuple(rows)
        by_id: Dict[int, SpecRow] = {}
        for r in kept:
            if r.field_id <= 0:
                raise ValueError(f"field id must be positive, got {r.field_id} ({r.name})")
            if r.field_id in by_id:
                raise ValueError(f"field {r.field_id} appears twice ({by_id[r.field_id].name}, {r.name})")
            if r.kind is Kind.LABEL and r.prom_type != "label":
                raise ValueError(f"{r.name}: kind LABEL needs prom_type 'label', got {r.prom_type!r}")
            by_id[r.field_id] = r
        metric_ids = sorted(i for i, r in by_id.items() if r.kind is not Kind.LABEL)
        label_ids = sorted(i for i, r in by_id.items() if r.kind is Kind.LABEL)

        # Dense lookup tables indexed by field id. Index 0 (not a field id) and the last
        # index stay "absent": np.take(mode="clip") maps negative ids to 0 and too-large
        # ids to the last index, so lookups need no bounds masks.
        size = max(by_id, default=0) + 2
        kind_table = np.full(size, -1, dtype=np.int8)
        metric_table = np.zeros(size, dtype=np.bool_)
        for i, r in by_id.items():
            kind_table[i] = int(r.kind)
        metric_table[metric_ids] = True

        self._rows: Tuple[SpecRow, ...] = kept
        self._by_id: Mapping[int, SpecRow] = by_id
        self._source = source
        self._warnings: Tuple[str, ...] = tuple(warnings)
        self._field_ids = _frozen(np.array(metric_ids, dtype=np.int32))
        self._label_ids = _frozen(np.array(label_ids, dtype=np.int32))
        self._kind_table = _frozen(kind_table)
        self._metric_table = _frozen(metric_table)

    # --- attributes --------------------------------------------------------------------

    @property
    def rows(self) -> Tuple[SpecRow, ...]:
        """The kept rows, in file order (duplicates dropped)."""
        return self._rows

    @property
    def field_ids(self) -> npt.NDArray[np.int32]:
        """Sorted ids of the metric rows (every type but ``label``); read-only."""
        return self._field_ids

    @property
    def label_field_ids(self) -> npt.NDArray[np.int32]:
        """Sorted ids of the ``label`` rows; read-only."""
        return self._label_ids

    @property
    def source(self) -> str:
        """Where the spec came from: a path, ``<text>``, ``<profile:NAME>`` or the caller's name."""
        return self._source

    @property
    def warnings(self) -> List[str]:
        """The warnings raised while loading, each starting ``file:line:``."""
        return list(self._warnings)

    # --- per-field lookups -------------------------------------------------------------

    def row(self, field: Union[int, str]) -> SpecRow:
        """The row of a field id or name; KeyError if the spec does not list it."""
        fid = _lookup_id(field)
        row = None if fid is None else self._by_id.get(fid)
        if row is None:
            raise KeyError(f"{field!r} is not in {self._source}")
        return row

    def kind(self, field: Union[int, str]) -> Kind:
        """The relay kind of a listed field; KeyError if not listed."""
        return self.row(field).kind

    def prom_type(self, field: Union[int, str]) -> str:
        """Column 2 of a listed field; KeyError if not listed."""
        return self.row(field).prom_type

    def help(self, field: Union[int, str]) -> str:
        """Column 3 of a listed field (inline comments removed); KeyError if not listed."""
        return self.row(field).help

    def __contains__(self, field: object) -> bool:
        if not isinstance(field, (int, np.integer, str)) or isinstance(field, bool):
            return False
        return _lookup_id(field) in self._by_id

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[SpecRow]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return (
            f"<MetricSpec {self._source}: {len(self._field_ids)} metrics, "
            f"{len(self._label_ids)} labels, {len(self._warnings)} warnings>"
        )

    # --- vectorised lookups --------------------------------------------------------------

    def kind_array(self, field_ids: IdArray) -> npt.NDArray[np.int8]:
        """``int(Kind)`` per field id, -1 where the spec does not list the id (same shape)."""
        return np.take(self._kind_table, _id_array(field_ids, len(self._kind_table)), mode="clip")

    def mask(self, field_ids: IdArray) -> npt.NDArray[np.bool_]:
        """True where the field id is a metric row of the spec (the allow-list); same shape."""
        return np.take(self._metric_table, _id_array(field_ids, len(self._metric_table)), mode="clip")


_Array = TypeVar("_Array", bound="npt.NDArray[Any]")


def _frozen(a: _Array) -> _Array:
    a.setflags(write=False)
    return a


def _id_array(field_ids: IdArray, table_size: int) -> npt.NDArray[np.integer[Any]]:
    """Field ids as an integer array np.take(mode="clip") can index a table of ``table_size`` with."""
    ids = np.asarray(field_ids)
    if ids.dtype.kind == "u" and ids.dtype.itemsize >= np.dtype(np.intp).itemsize:
        # uint64 -> intp would wrap huge ids to negatives; clip them first.
        clipped: npt.NDArray[np.unsignedinteger[Any]] = np.minimum(ids, table_size)
        return clipped.astype(np.intp)
    if ids.dtype.kind not in "iu":
        if ids.size == 0:  # np.asarray([]) is float64
            return ids.astype(np.intp)
        raise TypeError(f"field ids must be an integer array, got dtype {ids.dtype}")
    return cast("npt.NDArray[np.integer[Any]]", ids)  # an integer dtype: checked above


def _lookup_id(field: Union[int, str, "np.integer[Any]"]) -> Optional[int]:
    """Field id of an id or name; None for an unknown name."""
    if isinstance(field, str):
        f = fields.get(field)
        if f is not None:
            return f.id
        t = TOLERATED_NAMES.get(field)
        return None if t is None else t.field_id
    return int(field)


# ---------------------------------------------------------------------------------------
# Go encoding/csv, record by record
# ---------------------------------------------------------------------------------------


class _Field(NamedTuple):
    text: str  # unquoted, untrimmed
    line: int  # 1-based line where the field starts
    char: int  # 1-based character column where the field starts


class _Record(NamedTuple):
    fields: Tuple[_Field, ...]
    line: int


def _split_lines(text: str) -> List[str]:
    """Lines as Go's csv reader sees them: split on \\n only, \\r\\n -> \\n, a final \\r dropped."""
    lines = text.split("\n")
    out = [ln[:-1] + "\n" if ln.endswith("\r") else ln + "\n" for ln in lines[:-1]]
    last = lines[-1]
    if last:
        out.append(last[:-1] if last.endswith("\r") else last)
    return out


def _inline_comment(line: str, start: int, end: int) -> int:
    """Index of the first ``#`` in line[start:end] preceded by a space or tab, or -1."""
    j = line.find("#", start, end)
    while j >= 0:
        if j > start and line[j - 1] in " \t":
            return j
        j = line.find("#", j + 1, end)
    return -1


def _read_records(text: str, source: str) -> List[_Record]:
    """Go ``csv.Reader.ReadAll`` with Comment='#', plus the tolerant extensions."""
    lines = _split_lines(text)
    records: List[_Record] = []
    expected: Optional[Tuple[int, int]] = None  # (field count, line) of the first record
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        body = line.rstrip("\n")
        stripped = body.lstrip(" \t")
        # Go skips only empty lines and lines starting with '#'; we also skip
        # whitespace-only and indented-comment lines (module docstring).
        if not stripped or stripped[0] == "#":
            continue
        rec_line = i
        cur, cur_no, pos = line, i, len(body) - len(stripped)
        out: List[_Field] = []
        while True:  # one field per pass
            col = len(out) + 1
            f_line, f_char = cur_no, pos + 1
            eol = len(cur) - 1 if cur.endswith("\n") else len(cur)
            if pos < len(cur) and cur[pos] == '"':
                buf: List[str] = []
                pos += 1
                while True:
                    q = cur.find('"', pos)
                    if q < 0:
                        # The field runs on to the next line (the newline is data).
                        buf.append(cur[pos:])
                        if i >= len(lines):
                            raise CsvSpecError(
                                f'quoted field opened on line {f_line} (character {f_char}) is never closed',
                                file=source, line=cur_no, column=col,
                            )
                        cur, cur_no, pos = lines[i], i + 1, 0
                        i += 1
                        continue
                    buf.append(cur[pos:q])
                    pos = q + 1
                    nxt = cur[pos] if pos < len(cur) else ""
                    if nxt == '"':  # "" is a literal quote
                        buf.append('"')
                        pos += 1
                        continue
                    break
                out.append(_Field("".join(buf), f_line, f_char))
                eol = len(cur) - 1 if cur.endswith("\n") else len(cur)
                if nxt == ",":
                    pos += 1
                    continue
                if pos >= eol:
                    break
                rest = cur[pos:eol]
                if col >= 3 and rest.lstrip(" \t").startswith("#") and rest[0] in " \t":
                    break  # tolerated: "help"  # comment
                raise CsvSpecError(
                    f'unexpected {rest[0]!r} after the closing quote at character {pos + 1} '
                    f'(a quoted field must end with ", followed by a comma or the end of the line)',
                    file=source, line=cur_no, column=col,
                )
            comma = cur.find(",", pos, eol)
            end = comma if comma >= 0 else eol
            hash_at = _inline_comment(cur, pos, eol) if col >= 3 else -1
            commented = hash_at >= 0 and (comma < 0 or hash_at < comma)
            if commented:
                end = hash_at
            quote = cur.find('"', pos, end)
            if quote >= 0:
                raise CsvSpecError(
                    f'bare " in non-quoted field at character {quote + 1}; quote the whole field '
                    f'(the " must come right after the comma) and double any " inside it',
                    file=source, line=cur_no, column=col,
                )
            if commented:  # tolerated: help   # comment, to the end of the line
                out.append(_Field(cur[pos:end].rstrip(" \t"), f_line, f_char))
                break
            out.append(_Field(cur[pos:end], f_line, f_char))
            if comma < 0:
                break
            pos = comma + 1
        # Go: FieldsPerRecord = 0 -> the first record fixes the count for the rest.
        if expected is None:
            expected = (len(out), rec_line)
        elif len(out) != expected[0]:
            n, first = expected
            raise CsvSpecError(
                f"wrong number of fields: {len(out)}, but the first record (line {first}) has {n}",
                file=source, line=rec_line, column=min(len(out), n) + 1,
            )
        records.append(_Record(tuple(out), rec_line))
    return records


# ---------------------------------------------------------------------------------------
# records -> MetricSpec (dcgm-exporter ExtractCounters, plus our checks)
# ---------------------------------------------------------------------------------------


def _name_hint(name: str) -> str:
    """A short 'did you mean' for the common ways a real name gets mangled."""
    for candidate, why in (
        (name.strip(), "only spaces are trimmed, not tabs"),
        (name.upper(), "names are case-sensitive"),
        (name.lower(), "names are case-sensitive"),
    ):
        if candidate != name and (fields.get(candidate) or candidate in TOLERATED_NAMES):
            return f" ({why}; did you mean {candidate!r}?)"
    return ""


def _resolve_overrides(kind_overrides: Optional[Mapping[Union[str, int], KindLike]]) -> Dict[int, Kind]:
    out: Dict[int, Kind] = {}
    for key, value in (kind_overrides or {}).items():
        if isinstance(key, str):
            fid = _lookup_id(key)
            if fid is None:
                raise UnknownFieldError(f"kind_overrides: unknown DCGM field name {key!r}")
        else:
            fid = int(key)
        kind = Kind.parse(value)
        if kind is Kind.LABEL:
            raise ValueError(f"kind_overrides[{key!r}]: LABEL comes from the CSV type column, not an override")
        out[fid] = kind
    return out


def _build(
    records: Sequence[_Record],
    source: str,
    overrides: Mapping[int, Kind],
    strict_names: bool,
    notes: List[str],
) -> List[SpecRow]:
    rows: List[SpecRow] = []
    seen: Dict[int, SpecRow] = {}
    for rec in records:
        if len(rec.fields) != 3:
            raise CsvSpecError(
                f"malformed CSV record: expected 3 fields (DCGM field name, Prometheus type, help), "
                f"got {len(rec.fields)}",
                file=source, line=rec.line, column=min(len(rec.fields), 3) + 1,
            )
        f_name, f_type, f_help = rec.fields
        name = f_name.text.strip(" ")
        prom_type = f_type.text.strip(" ")
        help_text = f_help.text.strip(" ")
        where = f"{source}:{f_name.line}"

        field = fields.get(name)
        tolerated = TOLERATED_NAMES.get(name) if field is None else None
        if field is not None:
            fid = field.id
        elif tolerated is not None:
            if strict_names:
                raise CsvSpecError(
                    f"{name!r} is not a DCGM field ({tolerated.why}); stock dcgm-exporter refuses it",
                    file=source, line=f_name.line, column=1,
                )
            fid = tolerated.field_id
            notes.append(f"{where}: {name} is not a DCGM field; tolerated: {tolerated.why}")
        else:
            raise CsvSpecError(
                f"unknown DCGM field name {name!r}{_name_hint(name)}",
                file=source, line=f_name.line, column=1,
            )

        if name.startswith(_EXPORTER_PREFIX):
            # dcgm-exporter never checks the type of its own fields and never makes them labels.
            if prom_type not in _METRIC_TYPES:
                notes.append(
                    f"{source}:{f_type.line}: {name} has type {prom_type!r}; dcgm-exporter does not check "
                    f"the type of its own fields, kept as a metric"
                )
        elif prom_type not in PROM_TYPES:
            raise CsvSpecError(
                f"unknown Prometheus type {prom_type!r} for {name}; expected one of "
                f"{', '.join(PROM_TYPES)} (case-sensitive)",
                file=source, line=f_type.line, column=2,
            )

        if fid in seen:
            first = seen[fid]
            also = "" if first.name == name else f" as {first.name}"
            notes.append(
                f"{where}: {name} (field {fid}) is already listed on line {first.line}{also}; "
                f"this row is ignored, the first wins"
            )
            continue

        is_label = prom_type == "label" and not name.startswith(_EXPORTER_PREFIX)
        if is_label:
            if fid in overrides:
                raise ValueError(f"kind_overrides: {name} is a 'label' row in {source}, it has no metric kind")
            kind = Kind.LABEL
        elif fid in overrides:
            kind = overrides[fid]
        else:
            kind = tolerated.kind if tolerated is not None else builtin_kind(fid)
            if kind is Kind.LABEL:
                notes.append(
                    f"{where}: {name} is a {field.type if field else 'string'} field typed {prom_type!r}; "
                    f"its samples are not numbers (use type 'label')"
                )
                kind = Kind.GAUGE
        row = SpecRow(fid, name, "label" if is_label else prom_type, help_text, kind, f_name.line)
        seen[fid] = row
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------


def builtin_profiles() -> Dict[str, str]:
    """Built-in profile name -> description; each name is accepted by :func:`load_csv`."""
    return {name: desc for name, (_, desc) in _PROFILES.items()}


def _read_input(path_or_text: Union[str, bytes, "os.PathLike[str]"], name: Optional[str]) -> Tuple[str, str]:
    """(CSV text, source label) of a path, CSV text, CSV bytes or profile name."""
    if isinstance(path_or_text, bytes):
        return path_or_text.decode("utf-8", errors="replace"), name or "<text>"
    if isinstance(path_or_text, str):
        if "\n" in path_or_text:
            return path_or_text, name or "<text>"
        if path_or_text in _PROFILES:
            fname = _PROFILES[path_or_text][0]
            data = (resources.files("dcgmrelay") / "profiles" / fname).read_bytes()
            return data.decode("utf-8", errors="replace"), name or f"<profile:{path_or_text}>"
        if not os.path.isfile(path_or_text):
            raise FileNotFoundError(
                f"no collectors CSV file {path_or_text!r} (built-in profiles: {', '.join(_PROFILES)}; "
                f"CSV text must contain a newline)"
            )
    path = os.fspath(path_or_text)
    with open(path, "rb") as fh:
        data = fh.read()
    return data.decode("utf-8", errors="replace"), name or str(path)


def load_csv(
    path_or_text: Union[str, bytes, "os.PathLike[str]"],
    *,
    name: Optional[str] = None,
    kind_overrides: Optional[Mapping[Union[str, int], KindLike]] = None,
    strict_names: bool = False,
) -> MetricSpec:
    """Read a dcgm-exporter collectors CSV.

    ``path_or_text`` is a path (``os.PathLike``, or a ``str`` naming an existing
    file), CSV text (a ``str`` containing a newline, or ``bytes``), or a built-in
    profile name (``"default"``, ``"dcp"``, ``"whatap"``, ``"1.x"``; see
    :func:`builtin_profiles`). A bare profile name wins over a file of that name
    in the working directory; write ``./default`` for the file.

    ``name`` labels the source in errors and warnings (default: the path,
    ``<text>`` or ``<profile:NAME>``). ``kind_overrides`` maps a field name or id
    to a :class:`~dcgmrelay.kinds.Kind` (or its name) for metric rows, replacing
    the built-in kind; entries for fields the CSV does not list are ignored.
    ``strict_names=True`` refuses :data:`TOLERATED_NAMES` as dcgm-exporter does.

    Raises :class:`~dcgmrelay.errors.CsvSpecError` for a file dcgm-exporter would
    refuse; issues :class:`CsvSpecWarning` (also kept in ``spec.warnings``).
    """
    text, source = _read_input(path_or_text, name)
    notes: List[str] = []
    if text.startswith("\ufeff"):
        text = text[1:]
        notes.append(f"{source}:1: UTF-8 byte-order mark removed; stock dcgm-exporter would read it as part of the name")
    overrides = _resolve_overrides(kind_overrides)
    records = _read_records(text, source)
    rows = _build(records, source, overrides, strict_names, notes)
    for note in notes:
        warnings.warn(note, CsvSpecWarning, stacklevel=2)
    return MetricSpec(rows, source=source, warnings=notes)
