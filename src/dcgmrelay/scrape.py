"""``parse()`` and the columnar :class:`Scrape` it returns.

A scrape is a set of per-sample numpy columns plus dictionary tables::

    values        float64[n]   the sample values
    timestamps    int64[n]     milliseconds; TS_ABSENT (INT64_MIN) where the line had none
    field_ids     int32[n]     DCGM field id of the metric name; -1 when it is not a DCGM field
    name_ids      int32[n]  -> names       metric names, first-seen order
    labelset_ids  int32[n]  -> labelsets   label sets as ((name, value), ...), first-seen order
    entity_ids    int32[n]  -> entities    the GPU / MIG instance / NVSwitch / NvLink / CPU a sample is about; -1 if none

Series identity is (name, label set): a shared GPU reported once per pod gives
one series per pod, all with the same entity.
"""

from __future__ import annotations

from functools import cached_property
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import numpy as np
import numpy.typing as npt

from . import fields as _fields
from ._impl import IMPLEMENTATION, parse_raw
from ._parser_py import TS_ABSENT, Memo, RawScrape
from .errors import UnknownFieldError

if TYPE_CHECKING:
    from .relabel import RelabelRules

__all__ = [
    "TS_ABSENT",
    "Entity",
    "Family",
    "GpuMatrix",
    "Parser",
    "Scrape",
    "SampleError",
    "format_from_content_type",
    "parse",
]

Format = Literal["prometheus", "openmetrics", "auto"]
Buffer = Union[bytes, bytearray, memoryview, str]
#: ``parse_raw`` of either implementation: (body, openmetrics, strict, max_errors, source, memo).
RawParse = Callable[[Union[bytes, bytearray, memoryview], bool, bool, int, Optional[str], Optional[Memo]], RawScrape]

#: How many rejected lines a lenient parse keeps with their reason (all are counted).
MAX_ERRORS = 100


class Family(NamedTuple):
    """Metadata of one metric family, from its ``# HELP`` / ``# TYPE`` / ``# UNIT`` lines."""

    name: str
    type: str  # "untyped" when the body gave no # TYPE
    help: str | None
    unit: str | None


class SampleError(NamedTuple):
    """A line a lenient parse rejected."""

    line: int
    column: int
    reason: str


class Entity(NamedTuple):
    """The device a sample is about, with the identifying labels dcgm-exporter attaches."""

    #: ``gpu``, ``mig``, ``nvswitch``, ``nvlink``, ``cpu`` or ``cpu_core``.
    kind: str
    #: Physical GPU UUID (``UUID``, old exporters ``uuid``, NvLink samples ``gpu_uuid``).
    uuid: str | None
    #: DCGM GPU index (``gpu``).
    gpu: str | None
    #: MIG GPU instance id (``GPU_I_ID``) and profile (``GPU_I_PROFILE``).
    gpu_instance: str | None
    gpu_profile: str | None
    pci_bus_id: str | None
    device: str | None
    #: ``modelName`` (NvLink samples: ``model_name``).
    model_name: str | None
    #: ``Hostname`` (``hostname`` from 2026 exporters and on NvLink samples).
    hostname: str | None
    nvswitch: str | None
    nvlink: str | None
    cpu: str | None
    cpucore: str | None

    @property
    def key(self) -> tuple[str | None, ...]:
        """What makes the entity unique: UUID (and GPU_I_ID), or host and switch/link/CPU ids."""
        return _entity_key(self)


def _entity_key(e: Entity) -> tuple[str | None, ...]:
    if e.kind == "gpu":
        return ("gpu", e.uuid) if e.uuid else ("gpu", None, e.hostname, e.gpu)
    if e.kind == "mig":
        return ("mig", e.uuid, e.gpu_instance)
    if e.kind == "nvlink":
        return ("nvlink", e.hostname, e.uuid or e.nvswitch, e.nvlink)
    if e.kind == "nvswitch":
        return ("nvswitch", e.hostname, e.nvswitch)
    if e.kind == "cpu_core":
        return ("cpu_core", e.hostname, e.cpu, e.cpucore)
    return ("cpu", e.hostname, e.cpu)


def _entity_of(labels: dict[str, str]) -> Entity | None:
    """The entity a label set describes, or None for samples about no device (``go_*``, ``up``)."""
    get = labels.get
    uuid = get("UUID") or get("uuid") or get("gpu_uuid")
    if "nvlink" in labels:
        kind = "nvlink"
    elif "nvswitch" in labels:
        kind = "nvswitch"
    elif uuid or "gpu" in labels:
        kind = "mig" if uuid and "GPU_I_ID" in labels else "gpu"
    elif "cpucore" in labels:
        kind = "cpu_core"
    elif "cpu" in labels:
        kind = "cpu"
    else:
        return None
    return Entity(kind, uuid, get("gpu"), get("GPU_I_ID"), get("GPU_I_PROFILE"), get("pci_bus_id"),
                  get("device"), get("modelName") or get("model_name"), get("Hostname") or get("hostname"),
                  get("nvswitch"), get("nvlink"), get("cpu"), get("cpucore"))


class GpuMatrix(NamedTuple):
    """A dense entity × field view of a scrape (NaN where an entity lacks a field)."""

    values: npt.NDArray[np.float64]  # [len(entities), len(field_ids)]
    entities: tuple[Entity, ...]
    field_ids: npt.NDArray[np.int32]

    def column(self, field: int | str) -> npt.NDArray[np.float64]:
        """The column of one field (id or any of its names)."""
        fid = _field_id(field)
        hits = np.flatnonzero(self.field_ids == fid)
        if not len(hits):
            raise UnknownFieldError(f"field {field!r} is not in this matrix")
        return self.values[:, hits[0]]


def _field_id(field: int | str) -> int:
    return field if isinstance(field, (int, np.integer)) else _fields.by_name(field).id


# Sample-name suffixes that belong to a family of the base name, by family type.
_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_gcount", "_gsum", "_info")


# names, label sets, field id per name: what equal tables of two scrapes share
_Tables = Tuple[Tuple[str, ...], Tuple[Tuple[Tuple[str, str], ...], ...], "npt.NDArray[np.int32]"]


class Scrape:
    """One parsed ``/metrics`` body: per-sample numpy columns and dictionary tables."""

    def __init__(self, raw: RawScrape, *, format: str, source: str | None = None,
                 tables: _Tables | None = None) -> None:
        """``tables``: the names, label sets and per-name field ids of an earlier scrape whose
        tables equal ``raw``'s (a :class:`Parser` passes them in the steady state)."""
        self.format = format
        self.source = source
        self.values: npt.NDArray[np.float64] = np.asarray(raw.values, dtype=np.float64)
        self.timestamps: npt.NDArray[np.int64] = np.asarray(raw.timestamps, dtype=np.int64)
        self.name_ids: npt.NDArray[np.int32] = np.asarray(raw.name_ids, dtype=np.int32)
        self.labelset_ids: npt.NDArray[np.int32] = np.asarray(raw.labelset_ids, dtype=np.int32)
        self.errors: list[SampleError] = [SampleError(*e) for e in raw.errors] if raw.errors else []
        #: Every rejected line, including those past the ``errors`` cap.
        self.n_errors: int = raw.n_errors
        self._families_raw = raw.families
        self.names: tuple[str, ...]
        self.labelsets: tuple[tuple[tuple[str, str], ...], ...]
        self.name_field_ids: npt.NDArray[np.int32]
        if tables is not None:
            self.names, self.labelsets, self.name_field_ids = tables
        else:
            self.names = tuple(raw.names)
            self.labelsets = tuple(raw.labelsets)
            # One field-table lookup per distinct name, then a vectorised take.
            self.name_field_ids = np.fromiter(
                (_fields.id_of(n) for n in self.names), dtype=np.int32, count=len(self.names))
        self.field_ids: npt.NDArray[np.int32] = (self.name_field_ids[self.name_ids] if len(self.name_ids)
                                                 else np.empty(0, dtype=np.int32))

    # -- sizes and display ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return (f"<Scrape {self.format} samples={len(self)} names={len(self.names)} "
                f"series={self.series_count()} entities={len(self.entities)} errors={self.n_errors}>")

    # -- metadata -------------------------------------------------------------------------------
    @cached_property
    def families(self) -> dict[str, Family]:
        """Family metadata by family name, for every ``# HELP``/``# TYPE``/``# UNIT`` seen."""
        return {name: Family(name, t or "untyped", h, u) for name, (t, h, u) in self._families_raw.items()}

    def family_of(self, name: str) -> Family:
        """The family a sample name belongs to (``x_total`` → ``x`` for a counter, ...)."""
        fam = self.families.get(name)
        if fam is not None:
            return fam
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                fam = self.families.get(name[: -len(suffix)])
                if fam is not None:
                    return fam
        return Family(name, "untyped", None, None)

    # -- entities -------------------------------------------------------------------------------
    def _build_entities(self) -> tuple[tuple[Entity, ...], npt.NDArray[np.int32]]:
        table: list[Entity] = []
        index: dict[tuple[str | None, ...], int] = {}
        per_labelset = np.full(len(self.labelsets), -1, dtype=np.int32)
        for lid, pairs in enumerate(self.labelsets):
            ent = _entity_of(dict(pairs))
            if ent is None:
                continue
            key = ent.key
            eid = index.get(key)
            if eid is None:
                eid = index[key] = len(table)
                table.append(ent)
            per_labelset[lid] = eid
        return tuple(table), per_labelset

    @cached_property
    def _entity_tables(self) -> tuple[tuple[Entity, ...], npt.NDArray[np.int32]]:
        return self._build_entities()

    @property
    def entities(self) -> tuple[Entity, ...]:
        """Every entity in the scrape, first-seen order."""
        return self._entity_tables[0]

    @property
    def labelset_entity_ids(self) -> npt.NDArray[np.int32]:
        """int32 per label set: its entity id, -1 if none."""
        return self._entity_tables[1]

    @cached_property
    def entity_ids(self) -> npt.NDArray[np.int32]:
        """int32 per sample: index into :attr:`entities`, -1 for samples about no device."""
        per_ls = self.labelset_entity_ids
        return per_ls[self.labelset_ids] if len(self.labelset_ids) else np.empty(0, dtype=np.int32)

    @cached_property
    def _entity_index(self) -> dict[tuple[str | None, ...], int]:
        return {e.key: i for i, e in enumerate(self.entities)}

    def entity_id(self, uuid: str, gpu_instance: str | int | None = None) -> int:
        """Index of the GPU (or MIG instance) with this UUID; KeyError if absent."""
        key = ("gpu", uuid) if gpu_instance is None else ("mig", uuid, str(gpu_instance))
        try:
            return self._entity_index[key]
        except KeyError:
            what = uuid if gpu_instance is None else f"{uuid} GPU_I_ID={gpu_instance}"
            raise KeyError(f"no entity {what} in this scrape") from None

    # -- per-sample access ----------------------------------------------------------------------
    def labels(self, i: int) -> dict[str, str]:
        """The labels of sample ``i``."""
        return dict(self.labelsets[self.labelset_ids[i]])

    def samples(self) -> Iterator[tuple[str, dict[str, str], float, int | None]]:
        """``(name, labels, value, timestamp_ms | None)`` per sample, in body order (for inspection)."""
        names, labelsets = self.names, self.labelsets
        for nid, lid, v, ts in zip(self.name_ids.tolist(), self.labelset_ids.tolist(),
                                   self.values.tolist(), self.timestamps.tolist()):
            yield names[nid], dict(labelsets[lid]), v, (None if ts == TS_ABSENT else ts)

    # -- GPU views ------------------------------------------------------------------------------
    def matrix(self, fields: Iterable[int | str] | None = None, *,
               kinds: Sequence[str] = ("gpu", "mig")) -> GpuMatrix:
        """Entity × field values. Rows: entities of ``kinds``; columns: ``fields`` (default: every
        DCGM field present, ascending id). Where a series repeats (one per pod on a shared GPU,
        or per ``err_code``) the first sample in the body wins."""
        ent_ids = self.entity_ids
        ents = self.entities
        wanted = np.array([i for i, e in enumerate(ents) if e.kind in kinds], dtype=np.int32)
        if fields is None:
            fids = np.unique(self.field_ids[self.field_ids >= 0]).astype(np.int32)
        else:
            fids = np.array([_field_id(f) for f in fields], dtype=np.int32)
        out = np.full((len(wanted), len(fids)), np.nan)
        if len(wanted) and len(fids) and len(self):
            row_of = np.full(len(ents) + 1, -1, dtype=np.int64)
            row_of[wanted] = np.arange(len(wanted))
            order = np.argsort(fids, kind="stable")
            sorted_f = fids[order]
            pos = np.searchsorted(sorted_f, self.field_ids)
            pos = np.minimum(pos, len(sorted_f) - 1)
            col = np.where(sorted_f[pos] == self.field_ids, order[pos], -1)
            row = row_of[ent_ids]  # ent id -1 → row_of[-1] == -1
            keep = np.flatnonzero((row >= 0) & (col >= 0))[::-1]  # reversed: first sample wins
            out[row[keep], col[keep]] = self.values[keep]
        return GpuMatrix(out, tuple(ents[i] for i in wanted), fids)

    def value(self, uuid: str, field: int | str, *, gpu_instance: str | int | None = None) -> float:
        """The value of one field for one GPU (or MIG instance); KeyError if the scrape lacks it."""
        eid = self.entity_id(uuid, gpu_instance)
        fid = _field_id(field)
        hits = np.flatnonzero((self.entity_ids == eid) & (self.field_ids == fid))
        if not len(hits):
            raise KeyError(f"no {_fields.by_id(fid).exporter_name if fid >= 0 else field} sample for {uuid}")
        return float(self.values[hits[0]])

    # -- transforms (the relay process applies these per scrape) --------------------------------
    def _replace(self, *, keep: npt.NDArray[np.bool_] | None = None, name_ids: npt.NDArray[np.int32] | None = None,
                 labelset_ids: npt.NDArray[np.int32] | None = None, names: Sequence[str] | None = None,
                 labelsets: Sequence[tuple[tuple[str, str], ...]] | None = None) -> "Scrape":
        cols: list[npt.NDArray[np.generic]] = [self.values, self.timestamps,
                                               self.name_ids if name_ids is None else name_ids,
                                               self.labelset_ids if labelset_ids is None else labelset_ids]
        if keep is not None:
            cols = [c[keep] for c in cols]
        names_t = self.names if names is None else tuple(names)
        ls_t = self.labelsets if labelsets is None else tuple(labelsets)
        raw = RawScrape(cols[0], cols[1], cols[2], cols[3], names_t, ls_t, self._families_raw,
                        self.errors, self.n_errors, 0)
        # the field ids go with the names: reused unless the names change
        return Scrape(raw, format=self.format, source=self.source,
                      tables=None if names is not None else (names_t, ls_t, self.name_field_ids))

    def extended(self, other: "Scrape") -> "Scrape":
        """This scrape followed by ``other``'s samples (tables concatenated; metadata merged)."""
        no, lo = len(self.names), len(self.labelsets)
        names, labelsets = self.names + other.names, self.labelsets + other.labelsets
        raw = RawScrape(np.concatenate([self.values, other.values]),
                        np.concatenate([self.timestamps, other.timestamps]),
                        np.concatenate([self.name_ids, other.name_ids + no]).astype(np.int32),
                        np.concatenate([self.labelset_ids, other.labelset_ids + lo]).astype(np.int32),
                        names, labelsets, {**other._families_raw, **self._families_raw}, self.errors,
                        self.n_errors, 0)
        return Scrape(raw, format=self.format, source=self.source, tables=(
            names, labelsets, np.concatenate([self.name_field_ids, other.name_field_ids])))

    def with_labels(self, extra: Mapping[str, str], *, honor_labels: bool = True,
                    memo: dict[str, Any] | None = None) -> "Scrape":
        """The scrape with ``extra`` labels (a target's ``job``, ``instance``, ``pod`` ...) added to
        every label set; per label set, not per sample. With ``honor_labels`` (the default) a
        label the exporter sent wins; otherwise the exporter's is renamed ``exported_<name>``, as
        Prometheus does.

        ``memo``: a dict kept by the caller per target; when this scrape has the same label
        sets as the previous one (the steady state: a reused :class:`Parser` hands back the
        same tuples), the previous result is reused instead of rebuilt."""
        if not extra:
            return self
        extra_items = tuple(extra.items())
        if memo is not None and memo.get("extra") == (extra_items, honor_labels) \
                and memo.get("src") == self.labelsets:  # identical tuples: compared by identity, in C
            return self._replace(labelsets=memo["out"])
        out = []
        for pairs in self.labelsets:
            have = dict(pairs)
            if honor_labels:
                out.append(pairs + tuple((k, v) for k, v in extra_items if k not in have))
            else:
                renamed = tuple((f"exported_{k}" if k in extra else k, v) for k, v in pairs)
                out.append(renamed + extra_items)
        if memo is not None:
            memo.update(extra=(extra_items, honor_labels), src=self.labelsets, out=out)
        return self._replace(labelsets=out)

    def relabeled(self, rules: "RelabelRules") -> "Scrape":
        """The scrape after Prometheus metric relabeling (``metricRelabelConfigs``).

        Rules see ``__name__``, so they run once per distinct series (memoised in ``rules``
        across scrapes), and the columns are remapped with numpy. Dropped series leave the
        scrape; the caller counts them (``len(before) - len(after)``)."""
        if not len(self):
            return self
        key = self.name_ids.astype(np.int64) << 32 | self.labelset_ids.astype(np.int64)
        uniq, inverse = np.unique(key, return_inverse=True)
        names: list[str] = []
        name_index: dict[str, int] = {}
        labelsets: list[tuple[tuple[str, str], ...]] = []
        ls_index: dict[tuple[tuple[str, str], ...], int] = {}
        new_name = np.empty(len(uniq), dtype=np.int32)
        new_ls = np.empty(len(uniq), dtype=np.int32)
        kept = np.ones(len(uniq), dtype=bool)
        for i, k in enumerate(uniq.tolist()):
            name = self.names[k >> 32]
            items = (("__name__", name),) + self.labelsets[k & 0xFFFFFFFF]
            out = rules.apply_items(items, drop_meta=False)
            if out is None:
                kept[i] = False
                continue
            d = dict(out)
            nname = d.pop("__name__", name)
            pairs = tuple(d.items())
            new_name[i] = name_index.setdefault(nname, len(names))
            if new_name[i] == len(names):
                names.append(nname)
            lid = ls_index.get(pairs)
            if lid is None:
                lid = ls_index[pairs] = len(labelsets)
                labelsets.append(pairs)
            new_ls[i] = lid
        keep = kept[inverse]
        return self._replace(keep=keep, name_ids=new_name[inverse], labelset_ids=new_ls[inverse],
                             names=names, labelsets=labelsets)

    def series_count(self) -> int:
        """Number of distinct (name, label set) series."""
        if not len(self):
            return 0
        key = self.name_ids.astype(np.int64) << 32 | self.labelset_ids.astype(np.int64)
        return int(len(np.unique(key)))


def format_from_content_type(content_type: str | None) -> Format:
    """Map an HTTP ``Content-Type`` to a parse format (``auto`` when it says nothing useful)."""
    if not content_type:
        return "auto"
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/openmetrics-text":
        return "openmetrics"
    if media == "text/plain":
        return "prometheus"
    return "auto"


def _detect_format(data: memoryview) -> Literal["prometheus", "openmetrics"]:
    """OpenMetrics if the body's last non-blank line is ``# EOF``."""
    i = len(data)
    while i > 0 and data[i - 1] in b" \t\r\n":
        i -= 1
    if i >= 5 and bytes(data[i - 5:i]) == b"# EOF" and (i == 5 or data[i - 6] == 0x0A):
        return "openmetrics"
    return "prometheus"


def _as_bytes(data: Buffer) -> bytes | bytearray | memoryview:
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        if not data.c_contiguous:
            return data.tobytes()
        return data.cast("B") if data.format != "B" or data.ndim != 1 else data
    raise TypeError(f"parse() takes bytes, bytearray, memoryview or str, not {type(data).__name__}")


def _raw_parser(implementation: str | None) -> RawParse:
    if implementation is None:
        return parse_raw
    if implementation == "py":
        from ._parser_py import parse_raw as py_parse_raw

        return py_parse_raw
    if implementation == "c":
        from ._parser import parse_raw as c_parse_raw  # ImportError when not built

        return c_parse_raw
    raise ValueError(f"implementation must be 'c', 'py' or None, not {implementation!r}")


class Parser:
    """Parses bodies with fixed options; reuse one per target.

    A parser remembers the label blocks it has parsed (bounded), so scraping the
    same exporter again costs only the recognition of known blocks. Results are
    the same as :func:`parse`'s.
    """

    def __init__(self, *, format: Format = "auto", strict: bool = False, max_errors: int = MAX_ERRORS,
                 implementation: str | None = None) -> None:
        if format not in ("prometheus", "openmetrics", "auto"):
            raise ValueError(f"format must be 'prometheus', 'openmetrics' or 'auto', not {format!r}")
        self.format = format
        self.strict = strict
        self.max_errors = max_errors
        self._parse_raw = _raw_parser(implementation)
        self._memo: Memo = {}
        self._last: tuple[Sequence[str], Sequence[tuple[tuple[str, str], ...]], _Tables] | None = None

    def parse(self, data: Buffer, *, source: str | None = None, content_type: str | None = None) -> Scrape:
        """Parse one body. ``content_type`` (the HTTP header) picks the format when this parser's is auto."""
        buf = _as_bytes(data)
        fmt = self.format
        if fmt == "auto" and content_type:
            fmt = format_from_content_type(content_type)
        if fmt == "auto":
            fmt = _detect_format(memoryview(buf))
        om = fmt == "openmetrics"
        if self.strict and om:
            from ._openmetrics_strict import validate

            validate(bytes(buf), source=source)
        raw = self._parse_raw(buf, om, self.strict, self.max_errors, source, self._memo)
        # An exporter sends the same names and label sets every scrape: the tables built from
        # the last body (tuples, field ids) are handed on while equal (two list compares, in C).
        last = self._last
        if last is not None and last[0] == raw.names and last[1] == raw.labelsets:
            return Scrape(raw, format=fmt, source=source, tables=last[2])
        scrape = Scrape(raw, format=fmt, source=source)
        self._last = (raw.names, raw.labelsets, (scrape.names, scrape.labelsets, scrape.name_field_ids))
        return scrape


_shared: dict[tuple[str | None, str, bool, int], Parser] = {}


def parse(data: Buffer, *, format: Format = "auto", strict: bool = False, source: str | None = None,
          max_errors: int = MAX_ERRORS, implementation: str | None = None) -> Scrape:
    """Parse a dcgm-exporter (or any Prometheus text / OpenMetrics 1.0) body into a :class:`Scrape`.

    ``format``: ``"prometheus"`` (text 0.0.4), ``"openmetrics"`` or ``"auto"`` (OpenMetrics when the
    body ends with ``# EOF``). Lenient by default: a bad line is skipped and listed in
    ``scrape.errors``. ``strict=True`` raises :class:`~dcgmrelay.ParseError` at the first bad line
    and, for OpenMetrics, enforces the whole OpenMetrics 1.0 specification. ``source`` (a file name
    or URL) is quoted in errors. ``implementation`` forces ``"c"`` or ``"py"`` (for comparisons;
    the default is the native parser unless ``DCGMRELAY_NO_EXTENSIONS`` is set).
    """
    key = (implementation, format, strict, max_errors)
    parser = _shared.get(key)
    if parser is None:
        parser = _shared[key] = Parser(format=format, strict=strict, max_errors=max_errors,
                                       implementation=implementation)
    return parser.parse(data, source=source)


def implementation() -> str:
    """``"c"`` when the native parser is in use, ``"py"`` for the pure-Python twin."""
    return IMPLEMENTATION
