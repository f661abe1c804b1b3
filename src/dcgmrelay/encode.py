"""Encode relayed batches for the wire: remote write 1.0 / 2.0, text, OpenMetrics, compact.

    >>> from dcgmrelay.encode import Encoder, encode, decode_batch
    >>> body, headers = encode(batch, "remote-write-1")          # self-contained
    >>> enc = Encoder("compact")                                  # one per stream/connection
    >>> body, headers = enc.encode(batch)                         # dictionaries sent once
    >>> decoded = decode_batch(body, state=receiver_state)        # the same columns back

``body`` is exactly what goes on the wire (compressed), ``headers`` the HTTP request
headers it needs. ``batch`` is a :class:`~dcgmrelay.relay.RelayBatch` or anything with
its fields (a :class:`DecodedBatch` is one: a receiver can re-encode what it decoded).

Formats
=======

``"remote-write-1"`` (``"rw1"``)
    ``prometheus.WriteRequest``, snappy *block* format. One ``TimeSeries`` per sample, label
    names sorted, ``__name__`` first-class, labels with an empty value left out (the spec
    forbids them; Prometheus treats them as absent), ``MetricMetadata`` (field 3, what
    Prometheus itself sends) for every family shipped unless ``send_metadata=False``.
    Headers: ``Content-Encoding: snappy``, ``Content-Type: application/x-protobuf``,
    ``X-Prometheus-Remote-Write-Version: 0.1.0``, ``User-Agent``.
``"remote-write-2"`` (``"rw2"``)
    ``io.prometheus.write.v2.Request`` (spec 2.0-rc.4): a symbols table per request
    (``""`` first, then the strings of this request's series in the encoder's interning
    order), ``labels_refs``, ``Sample.start_timestamp`` (field 3) for cumulative counters
    from the relay's start times (``start == timestamp`` is sent as ``timestamp - 1`` so a
    receiver can synthesise the zero sample before it), ``Metadata`` with type, help and
    unit refs. Headers: ``Content-Type: application/x-protobuf;proto=io.prometheus.write.v2.Request``,
    ``Content-Encoding: snappy``, ``X-Prometheus-Remote-Write-Version: 2.0.0``. Falling back
    to 1.0 on 415 (or on a 2xx without ``X-Prometheus-Remote-Write-*-Written``) is the
    transport's job.
``"prometheus"`` (``"text"``)
    Text exposition 0.0.4, ``Content-Type: text/plain; version=0.0.4; charset=utf-8``,
    timestamps in ms (what VictoriaMetrics' ``/api/v1/import/prometheus`` takes).
``"openmetrics"`` (``"om"``)
    OpenMetrics 1.0 text, ``application/openmetrics-text; version=1.0.0; charset=utf-8``,
    timestamps in seconds, ``# EOF``. A counter whose name ends in ``_total`` is written as
    the family without the suffix; a counter without it keeps its name and is typed
    ``unknown`` (renaming would change the series on every receiver); types other than
    counter and gauge are ``unknown``; ``# UNIT`` only where the name ends in ``_<unit>``.
``"compact"``
    The columnar, stateful dcgmrelay format: ``docs/compact-format.md``.
    ``Content-Type: application/x-dcgmrelay-compact; version=1``; zstd inside the format.

Text formats: label values escaped (``\\\\``, ``\\"``, ``\\n``) whatever the exporter sent,
HELP escaped (``\\\\``, ``\\n``, and ``\\"`` in OpenMetrics), metric and label names outside
the Prometheus character set rewritten with ``_`` (a raw newline in a name could
otherwise forge lines), and in OpenMetrics, which reserves names starting with ``_``, such
names get an ``x`` prefix; a counter family whose body holds a NaN or negative value is
typed ``unknown`` there. Floats as Go/Prometheus write them (shortest round trip,
``1e+06``, ``NaN``, ``+Inf``, ``-Inf``). ``compression="gzip"`` gzips the body
(``Content-Encoding: gzip``). Stale markers cannot be expressed in text and are left out.

Series on the wire (every format but compact, which keeps label sets as they are): label
sets that differ only in empty values, repeated names (the first wins) or a ``__name__``
label are one series; a series occurring twice in a batch is sent once per timestamp (the
last sample), its samples in timestamp order. Remote write bodies group the samples by
label set (every series of one device in a row), which halves the snappy size of a
1024-GPU batch (snappy compresses 64 KiB blocks independently).

What is shipped (output mode, ``batch.output``)
===============================================

``cumulative``
    every sample's ``values``.
``delta``
    COUNTER samples as their ``deltas`` (typed gauge), EVENT samples as their new-event
    counts (``deltas``), GAUGE/RATE samples as their ``values``; COUNTER/EVENT samples
    without a delta (NaN) are not shipped.
``both``
    every sample's ``values`` under its name, plus, for COUNTER/EVENT samples with a delta,
    a gauge series ``<name>_delta`` (same labels) carrying the delta; its HELP is the
    family's with " (change since the previous scrape)" appended.

Stale markers (remote write only): every ``stale_*`` series gets the stale NaN
``0x7ff0000000000002`` at ``batch.timestamp_ms``; in ``both`` mode a stale COUNTER/EVENT
series also ends its ``_delta`` series (the kind of a name the batch no longer has comes
from earlier batches of the encoder, else from the DCGM field table). Other NaN values are
sent as Prometheus' normal NaN ``0x7ff8000000000001``, never as the stale pattern.

Caching
=======

An :class:`Encoder` interns metric names, label sets and series ``(name, label set)``
and keeps, per series, what every sample of it repeats (remote write 1.0: the encoded
labels; 2.0: the symbol ids of its labels; text: the escaped ``name{...}`` prefix), so a
steady scrape costs numpy lookups plus the native per-sample loop. The cache is bounded:
past ``max_series`` series it is dropped and rebuilt from the next batch.
An encoder is not thread-safe; use one per sender.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import secrets
import struct
import sys
import time
import zlib
from collections import OrderedDict
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple, TypeVar,
                    Union)

import cramjam
import numpy as np
import numpy.typing as npt

from . import fields as _fields
from ._ids import same_ids
from ._version import __version__
from .errors import DcgmRelayError

__all__ = [
    "COMPACT_CONTENT_TYPE",
    "COMPACT_VERSION",
    "FORMATS",
    "IMPLEMENTATION",
    "STALE_NAN_BITS",
    "CompactFormatError",
    "DecodedBatch",
    "DecoderState",
    "Encoder",
    "cumulative_view",
    "decode_batch",
    "encode",
    "escape_label_value",
    "format_float",
    "merge_batches",
]

# ------------------------------------------------------------------------------------------
# Implementation selector (like _impl.py for the parser)

NO_EXTENSIONS = bool(os.environ.get("DCGMRELAY_NO_EXTENSIONS")) or sys.implementation.name != "cpython"

if TYPE_CHECKING:
    from ._encode_py import F64, I64, U32, Bytes
    from .scrape import Entity


class _Loops(Protocol):
    """What both loop modules (``_encode`` and ``_encode_py``) provide."""

    IMPLEMENTATION: str

    def format_float(self, v: float) -> str: ...
    def gather(self, buf: Bytes, off: I64, idx: I64) -> bytes: ...
    def rw1_body(self, lab_buf: Bytes, lab_off: I64, sids: I64, values: F64, ts: I64, tail: bytes) -> bytes: ...
    def rw2_refs(self, lab_off: I64, refs: U32, out_off: I64) -> bytes: ...
    def rw2_body(self, head: bytes, pre_buf: Bytes, pre_off: I64, suf_buf: Bytes, suf_off: I64, ser_suf: I64,
                 sids: I64, values: F64, ts: I64, start: I64) -> bytes: ...
    def text_body(self, pre_buf: Bytes, pre_off: I64, hdr_buf: Bytes, hdr_off: I64, ser_group: I64, order: I64,
                  sids: I64, values: F64, ts: I64, ts_mode: int, tail: bytes) -> bytes: ...


def _native_or_py() -> _Loops:
    if not NO_EXTENSIONS:
        try:
            from . import _encode

            return _encode
        except ImportError:  # pragma: no cover - a source checkout without a build
            pass
    from . import _encode_py

    return _encode_py


_default_impl = _native_or_py()

#: ``"c"`` when the native loops are in use, ``"py"`` for the pure-Python twin.
IMPLEMENTATION: str = _default_impl.IMPLEMENTATION


def _impl_module(implementation: Optional[str]) -> _Loops:
    if implementation is None:
        return _default_impl
    if implementation == "py":
        from . import _encode_py

        return _encode_py
    if implementation == "c":
        from . import _encode  # ImportError when not built

        return _encode
    raise ValueError(f"implementation must be 'c', 'py' or None, not {implementation!r}")


def format_float(v: float) -> str:
    """A float as Prometheus writes it (Go ``strconv.FormatFloat(v, 'g', -1, 64)``)."""
    return str(_default_impl.format_float(float(v)))


# ------------------------------------------------------------------------------------------
# Constants

#: Prometheus' stale marker: a NaN with this bit pattern ends a series.
STALE_NAN_BITS = 0x7FF0000000000002
#: The NaN Prometheus uses for an ordinary NaN value.
NORMAL_NAN_BITS = 0x7FF8000000000001

_K_GAUGE, _K_COUNTER, _K_RATE, _K_EVENT = 0, 1, 2, 3

FORMATS: Dict[str, str] = {
    "remote-write-1": "remote-write-1",
    "rw1": "remote-write-1",
    "remote-write-2": "remote-write-2",
    "rw2": "remote-write-2",
    "prometheus": "prometheus",
    "text": "prometheus",
    "openmetrics": "openmetrics",
    "om": "openmetrics",
    "compact": "compact",
}

USER_AGENT = f"dcgmrelay/{__version__}"
COMPACT_CONTENT_TYPE = "application/x-dcgmrelay-compact; version=1"
_CONTENT_TYPES = {
    "remote-write-1": "application/x-protobuf",
    "remote-write-2": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
    "prometheus": "text/plain; version=0.0.4; charset=utf-8",
    "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8",
    "compact": COMPACT_CONTENT_TYPE,
}
# MetricMetadata.MetricType (1.0, Prometheus' prompb) and Metadata.MetricType (2.0) agree.
_PB_TYPES = {"counter": 1, "gauge": 2, "histogram": 3, "gaugehistogram": 4, "summary": 5, "info": 6,
             "stateset": 7}
_TEXT_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_OUTPUTS = ("cumulative", "delta", "both")
_DELTA_SUFFIX = "_delta"
_DELTA_HELP = " (change since the previous scrape)"

DEFAULT_MAX_SERIES = 1 << 18

_EMPTY_I64 = np.empty(0, dtype=np.int64)
_LabelSet = Tuple[Tuple[str, str], ...]
_Family = Tuple[str, Optional[str], Optional[str]]
#: rw2 per-series pieces: labels_refs bytes, their offsets, metadata bytes per name, their
#: offsets, name per series.
_Rw2Pieces = Tuple[bytes, npt.NDArray[np.int64], bytes, npt.NDArray[np.int64], npt.NDArray[np.int64]]


# ------------------------------------------------------------------------------------------
# Small helpers


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_bytes(field: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "replace") if not s.isascii() else s.encode("ascii")


class _Grow:
    """A growable numpy array (amortised appends); ``view()`` is the filled part."""

    __slots__ = ("a", "n")

    def __init__(self, dtype: Any, initial: Sequence[int] = ()) -> None:
        self.a = np.zeros(max(16, len(initial)), dtype=dtype)
        self.n = 0
        if len(initial):
            self.extend(initial)

    def extend(self, values: Any) -> None:
        v = np.asarray(values, dtype=self.a.dtype)
        need = self.n + len(v)
        if need > len(self.a):
            cap = len(self.a)
            while cap < need:
                cap *= 2
            a = np.zeros(cap, dtype=self.a.dtype)
            a[: self.n] = self.a[: self.n]
            self.a = a
        self.a[self.n:need] = v
        self.n = need

    def append(self, value: int) -> None:
        if self.n == len(self.a):
            a = np.zeros(len(self.a) * 2, dtype=self.a.dtype)
            a[: self.n] = self.a
            self.a = a
        self.a[self.n] = value
        self.n += 1

    def view(self) -> np.ndarray:
        return self.a[: self.n]

    def __len__(self) -> int:
        return self.n


def _find_sorted(sk: np.ndarray, sv: np.ndarray, keys: np.ndarray) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """Look int64 series keys up in a sorted key array ``sk`` (values ``sv``): ``(ids, empty)``
    when all are known, else ``(None, the unknown keys once each, first-seen order)``."""
    if len(sk):
        pos = np.minimum(np.searchsorted(sk, keys), len(sk) - 1)
        hit = sk[pos] == keys
        if hit.all():
            return sv[pos], _EMPTY_I64
        missing = keys[~hit]
    else:
        missing = keys
    uk, first = np.unique(missing, return_index=True)
    return None, uk[np.argsort(first, kind="stable")]


def _insert_sorted(sk: np.ndarray, sv: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``sk``/``sv`` with new keys (none of them in ``sk``) and their ids added, still sorted
    by key: the new ones are sorted and merged in, O(n + k log k) -- not a sort of the whole
    array, which made start-up with 200,000 arriving series O(n log n) per batch."""
    order = np.argsort(keys, kind="stable")
    keys, ids = keys[order], ids[order]
    pos = np.searchsorted(sk, keys)
    return np.insert(sk, pos, keys), np.insert(sv, pos, ids)


def _i64(a: npt.ArrayLike) -> npt.NDArray[np.int64]:
    return np.ascontiguousarray(a, dtype=np.int64)


def _f64(a: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.ascontiguousarray(a, dtype=np.float64)


def _canon_nan(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Every NaN as Prometheus' normal NaN (never the stale pattern)."""
    nan = np.isnan(values)
    if not nan.any():
        return values
    out = np.array(values, dtype=np.float64, copy=True)
    out.view(np.int64)[nan] = NORMAL_NAN_BITS
    return out


def _stale_values(n: int) -> npt.NDArray[np.float64]:
    return np.full(n, STALE_NAN_BITS, dtype=np.int64).view(np.float64)


def _clean_pairs(ls: _LabelSet) -> List[Tuple[str, str]]:
    """Label pairs sorted by name, without ``__name__``, empty values or repeated names
    (the first of a repeated name wins)."""
    out: List[Tuple[str, str]] = []
    seen = set()
    for k, v in ls:
        if k in seen:
            continue
        seen.add(k)
        if k == "__name__" or v == "":
            continue
        out.append((k, v))
    out.sort(key=lambda kv: kv[0])
    return out


_METRIC_NAME_OK = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME_OK = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_METRIC_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name_text(name: str) -> str:
    if _METRIC_NAME_OK.match(name):
        return name
    out = _METRIC_BAD.sub("_", name) or "_"
    return "_" + out if out[0].isdigit() else out


def _label_name_text(name: str) -> str:
    if _LABEL_NAME_OK.match(name):
        return name
    out = _LABEL_BAD.sub("_", name) or "_"
    return "_" + out if out[0].isdigit() else out


def escape_label_value(v: str) -> str:
    """A label value escaped for text exposition and OpenMetrics."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


def _escape_help(v: str, openmetrics: bool) -> str:
    # a carriage return that would end the line is dropped (OpenMetrics forbids CR line ends)
    v = v.rstrip("\r").replace("\\", "\\\\").replace("\n", "\\n")
    return v.replace('"', '\\"') if openmetrics else v


def _kind_of_name(name: str) -> int:
    fid = _fields.id_of(name)
    if fid < 0:
        return _K_GAUGE
    try:
        from .kinds import builtin_kind

        return int(builtin_kind(fid))
    except Exception:  # noqa: BLE001 - unknown id: a gauge
        return _K_GAUGE


# ------------------------------------------------------------------------------------------
# Interning tables of the non-compact encoders


class _Pieces:
    """A CSR table of byte strings: piece ``i`` is ``buf[off[i]:off[i + 1]]``."""

    __slots__ = ("buf", "off")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.off = _Grow(np.int64, [0])

    def add(self, b: bytes) -> int:
        self.buf += b
        self.off.append(len(self.buf))
        return len(self.off) - 2

    def lengths(self) -> np.ndarray:
        return np.diff(self.off.view())


class _Table:
    """Names, label sets and series of one encoder, with the per-series bytes of a format.

    What a series repeats in every sample is built from pieces: per label set the labels
    that sort before ``__name__`` and those after it, per name the ``__name__`` label
    (remote write 1.0: encoded ``Label`` fields; 2.0: string ids as int64 bytes; text: the
    name, and ``{...}`` with the escaped labels). A new series is the concatenation of its
    pieces, done for all new series of a batch at once by the native ``gather``; Python
    work is per distinct label set, name and label pair, never per series or sample.
    """

    def __init__(self, fmt: str, impl: _Loops) -> None:
        self.fmt = fmt
        self.impl = impl
        self.names: List[str] = []
        self.name_idx: Dict[str, int] = {}
        self.name_base: List[int] = []  # delta name -> its base name index, else -1
        self.name_delta: List[int] = []  # base name -> its delta name index, else -1
        self.name_fam: List[Optional[_Family]] = []
        self.name_kind = _Grow(np.int8)  # last kind seen per name, -1 unknown
        self.labelsets: List[_LabelSet] = []  # canonical: cleaned, sorted (see _clean_pairs)
        self.ls_idx: Dict[_LabelSet, int] = {}  # as the batch has it -> canonical index
        self.canon_idx: Dict[_LabelSet, int] = {}
        self.ser_name = _Grow(np.int64)
        self.ser_ls = _Grow(np.int64)
        self._sk = _EMPTY_I64  # sorted series keys (name << 32 | labelset)
        self._sv = _EMPTY_I64  # their series ids
        self.fam_version = 0
        self._last_families: Optional[Dict[str, _Family]] = None
        # per-batch caches
        self._c_names: Optional[Sequence[str]] = None
        self._c_nmap = _EMPTY_I64
        self._c_dmap: Optional[np.ndarray] = None
        self._c_ls: Optional[Sequence[_LabelSet]] = None
        self._c_lmap = _EMPTY_I64
        self._c_sid_key: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None
        self._c_sids = _EMPTY_I64
        self._c_order: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None
        self._c_unique: Optional[Tuple[np.ndarray, bool]] = None
        # pieces and per-series bytes (rw2: int64 string ids as bytes)
        self.pieces = _Pieces()
        self.name_pid = _Grow(np.int64)
        self.ls_pid_a = _Grow(np.int64)
        self.ls_pid_b = _Grow(np.int64)
        self._pairs: Dict[Tuple[str, str], Any] = {}
        self.buf = bytearray()
        self.off = _Grow(np.int64, [0])
        # rw2: strings interned, symbol bytes per string
        self.str_idx: Dict[str, int] = {"": 0}
        self.sym = _Pieces()
        self.sym.add(b"\x22\x00")
        # name-level caches (metadata / headers), rebuilt on change
        self._meta_cache: Dict[int, bytes] = {}
        self._hdr: Optional[Tuple[bytes, np.ndarray]] = None
        # (table key, series ids, (symbols, pieces)) of the last rw2 body
        self.rw2_cache: Optional[Tuple[Tuple[int, int, int], np.ndarray, Tuple[bytes, _Rw2Pieces]]] = None

    def __len__(self) -> int:
        return len(self.ser_name)

    # -- names, label sets --------------------------------------------------------------
    def _add_name(self, name: str, base: int = -1) -> int:
        j = self.name_idx[name] = len(self.names)
        self.names.append(name)
        self.name_base.append(base)
        self.name_delta.append(-1)
        self.name_fam.append(None)
        self.name_kind.append(-1)
        self.name_pid.append(-1)
        self._hdr = None
        return j

    def name_index(self, name: str) -> int:
        j = self.name_idx.get(name)
        return self._add_name(name) if j is None else j

    def delta_index(self, base: int) -> int:
        d = self.name_delta[base]
        if d < 0:
            name = self.names[base] + _DELTA_SUFFIX
            d = self.name_idx.get(name, -1)
            if d < 0:
                d = self._add_name(name, base)
            self.name_delta[base] = d
        return d

    def name_map(self, names: Sequence[str]) -> np.ndarray:
        if names is self._c_names or (self._c_names is not None and names == self._c_names):
            return self._c_nmap
        out = np.fromiter((self.name_index(n) for n in names), dtype=np.int64, count=len(names))
        self._c_names, self._c_nmap, self._c_dmap = names, out, None
        return out

    def delta_map(self, names: Sequence[str]) -> np.ndarray:
        nmap = self.name_map(names)
        if self._c_dmap is None:
            self._c_dmap = np.fromiter((self.delta_index(int(j)) for j in nmap.tolist()),
                                       dtype=np.int64, count=len(nmap))
        return self._c_dmap

    def ls_map(self, labelsets: Sequence[_LabelSet]) -> np.ndarray:
        if labelsets is self._c_ls or (self._c_ls is not None and labelsets == self._c_ls):
            return self._c_lmap
        idx = self.ls_idx
        out = np.empty(len(labelsets), dtype=np.int64)
        for i, ls in enumerate(labelsets):
            j = idx.get(ls)
            if j is None:
                # label sets that only differ in empty values, repeated names or a __name__
                # label are one series on the wire
                canon = tuple(_clean_pairs(ls))
                j = self.canon_idx.get(canon)
                if j is None:
                    j = self.canon_idx[canon] = len(self.labelsets)
                    self.labelsets.append(canon)
                    self.ls_pid_a.append(-1)
                    self.ls_pid_b.append(-1)
                idx[ls] = j
            out[i] = j
        self._c_ls, self._c_lmap = labelsets, out
        return out

    # -- series -------------------------------------------------------------------------
    def lookup(self, nidx: np.ndarray, lidx: np.ndarray) -> np.ndarray:
        """Series ids of (name index, label set index) pairs; new series are created."""
        keys = (nidx.astype(np.int64) << 32) | lidx.astype(np.int64)
        if not len(keys):
            return _EMPTY_I64
        ids, uk = _find_sorted(self._sk, self._sv, keys)
        if ids is not None:
            return ids
        start = len(self.ser_name)
        self._create(uk >> 32, uk & 0xFFFFFFFF)
        self._sk, self._sv = _insert_sorted(self._sk, self._sv, uk,
                                            np.arange(start, start + len(uk), dtype=np.int64))
        return self.lookup(nidx, lidx)

    def batch_sids(self, nmap: np.ndarray, lmap: np.ndarray, name_ids: np.ndarray,
                   labelset_ids: np.ndarray) -> np.ndarray:
        """Series id per sample, cached while the batch has the previous one's shape."""
        c = self._c_sid_key
        if (c is not None and c[0] is nmap and c[1] is lmap and same_ids(c[2], name_ids)
                and same_ids(c[3], labelset_ids)):
            return self._c_sids
        n = len(name_ids)
        sids = self.lookup(nmap[name_ids], lmap[labelset_ids]) if n else _EMPTY_I64
        # copies: a caller may reuse its arrays for the next batch
        self._c_sid_key = (nmap, lmap, np.array(name_ids), np.array(labelset_ids))
        self._c_sids = sids
        return sids

    def unique_series(self, sids: np.ndarray) -> bool:
        """No series occurs twice in ``sids`` (cached for the batch's series ids)."""
        c = self._c_unique
        if c is not None and c[0] is sids:
            return bool(c[1])
        uniq = int(np.bincount(sids, minlength=1).max()) <= 1
        self._c_unique = (sids, uniq)
        return uniq

    def ls_order(self, sids: np.ndarray) -> Optional[np.ndarray]:
        """Sample order grouping the samples by label set (every series of one device in a
        row), cached for the same series order; None when already grouped."""
        c = self._c_order
        if c is not None and (c[0] is sids or same_ids(c[0], sids)):
            return c[1]
        ls = self.ser_ls.view()[sids]
        order: Optional[np.ndarray] = None
        if len(ls) > 1 and np.any(ls[1:] < ls[:-1]):
            order = np.argsort(ls, kind="stable").astype(np.int64)
        self._c_order = (sids.copy(), order)
        return order

    def _create(self, nids: np.ndarray, lids: np.ndarray) -> None:
        """Append series (name index, label set index): their bytes from the pieces."""
        for j in set(nids.tolist()):
            if self.name_pid.a[j] < 0:
                self.name_pid.a[j] = self.pieces.add(self._name_piece(self.names[j]))
        ls_a, ls_b = self.ls_pid_a.a, self.ls_pid_b.a
        for j in set(lids.tolist()):
            if ls_a[j] < 0:
                a, b = self._ls_pieces(self.labelsets[j])
                ls_a[j] = self.pieces.add(a)
                ls_b[j] = self.pieces.add(b)
        cols = [self.ls_pid_a.view()[lids], self.name_pid.view()[nids], self.ls_pid_b.view()[lids]]
        if self.fmt not in ("remote-write-1", "remote-write-2"):
            cols = [cols[1], cols[0]]  # text: name, then {labels}
        idx = np.stack(cols, axis=1).ravel()
        blob = self.impl.gather(self.pieces.buf, self.pieces.off.view(), idx)
        lens = self.pieces.lengths()[idx].reshape(len(nids), len(cols)).sum(axis=1)
        unit = 8 if self.fmt == "remote-write-2" else 1
        self.buf += blob
        self.off.extend(self.off.a[self.off.n - 1] + np.cumsum(lens) // unit)
        self.ser_name.extend(nids)
        self.ser_ls.extend(lids)

    def _name_piece(self, name: str) -> bytes:
        if self.fmt == "remote-write-1":
            return _pb_bytes(1, _pb_bytes(1, b"__name__") + _pb_bytes(2, _utf8(name)))
        if self.fmt == "remote-write-2":
            return np.array([self.gid("__name__"), self.gid(name)], dtype="<i8").tobytes()
        return _utf8(self.text_name(name))

    def text_name(self, name: str) -> str:
        out = _metric_name_text(name)
        return "x" + out if self.fmt == "openmetrics" and out.startswith("_") else out

    def text_label(self, name: str) -> str:
        out = _label_name_text(name)
        return "x" + out if self.fmt == "openmetrics" and out.startswith("_") else out

    def _pair(self, k: str, v: str) -> Any:
        p = self._pairs.get((k, v))
        if p is None:
            if self.fmt == "remote-write-1":
                p = _pb_bytes(1, _pb_bytes(1, _utf8(k)) + _pb_bytes(2, _utf8(v)))
            elif self.fmt == "remote-write-2":
                p = (self.gid(k), self.gid(v))
            else:
                p = f'{self.text_label(k)}="{escape_label_value(v)}"'
            self._pairs[(k, v)] = p
        return p

    def _ls_pieces(self, ls: _LabelSet) -> Tuple[bytes, bytes]:
        pairs = _clean_pairs(ls)
        if self.fmt == "remote-write-1":
            return (b"".join(self._pair(k, v) for k, v in pairs if k < "__name__"),
                    b"".join(self._pair(k, v) for k, v in pairs if k > "__name__"))
        if self.fmt == "remote-write-2":
            before = [g for k, v in pairs if k < "__name__" for g in self._pair(k, v)]
            after = [g for k, v in pairs if k > "__name__" for g in self._pair(k, v)]
            return np.array(before, dtype="<i8").tobytes(), np.array(after, dtype="<i8").tobytes()
        # Names the text formats cannot carry are rewritten (`_label_name_text`), so two
        # names may meet as one (`a-b` and `a.b` both `a_b`), or as `__name__`: the first
        # keeps it, the others are left out, as `_clean_pairs` does with repeated names --
        # a label name twice makes the whole exposition invalid.
        seen = {"__name__"}
        parts = []
        for k, v in pairs:
            t = self.text_label(k)
            if t not in seen:
                seen.add(t)
                parts.append(self._pair(k, v))
        text = ",".join(parts)
        return (_utf8("{" + text + "}") if text else b""), b""

    def gid(self, s: str) -> int:
        g = self.str_idx.get(s)
        if g is None:
            g = self.str_idx[s] = self.sym.add(_pb_bytes(4, _utf8(s)))
        return g

    def gids(self) -> np.ndarray:
        """rw2: the string ids of every series' labels (CSR with ``off``)."""
        return np.frombuffer(bytes(self.buf), dtype="<i8")

    # -- families -----------------------------------------------------------------------
    def update_families(self, families: Dict[str, _Family]) -> None:
        # The relay hands an unchanged target the same dict again: applied just before, so
        # nothing to do (a reference, not an id: the object stays alive while it is compared)
        if families is self._last_families:
            return
        self._last_families = families
        changed = False
        for name, fam in families.items():
            j = self.name_index(name)
            fam = (str(fam[0]), fam[1], fam[2])
            if self.name_fam[j] != fam:
                self.name_fam[j] = fam
                self._meta_cache.pop(j, None)
                d = self.name_delta[j]
                if d >= 0:
                    self._meta_cache.pop(d, None)
                changed = True
        if changed:
            self.fam_version += 1
            self._hdr = None

    def family(self, j: int) -> _Family:
        """(type, help, unit) of a name index; delta names derive theirs from the base."""
        base = self.name_base[j]
        if base >= 0:
            t, h, u = self.family(base)
            return ("gauge", (h + _DELTA_HELP) if h else _DELTA_HELP.strip(" ()").capitalize(), u)
        fam = self.name_fam[j]
        return fam if fam is not None else ("untyped", None, None)

    def rw1_metadata(self, used_names: np.ndarray) -> bytes:
        out = []
        cache = self._meta_cache
        for j in used_names.tolist():
            b = cache.get(j)
            if b is None:
                t, h, u = self.family(j)
                inner = b""
                code = _PB_TYPES.get(t, 0)
                if code:
                    inner += b"\x08" + _varint(code)
                inner += _pb_bytes(2, _utf8(self.names[j]))
                if h:
                    inner += _pb_bytes(4, _utf8(h))
                if u:
                    inner += _pb_bytes(5, _utf8(u))
                b = cache[j] = _pb_bytes(3, inner)
            out.append(b)
        return b"".join(out)

    def headers(self, openmetrics: bool, with_meta: bool, unknown: Sequence[int] = ()) -> Tuple[bytes, np.ndarray]:
        """CSR of the family header lines per name index (``unknown``: name indices whose
        counter family must be typed unknown in this body)."""
        if self._hdr is not None and not unknown:
            return self._hdr
        buf = bytearray()
        off = [0]
        for j, name in enumerate(self.names):
            if with_meta:
                buf += self._header(j, self.text_name(name), openmetrics, j in unknown)
            off.append(len(buf))
        hdr = (bytes(buf), np.asarray(off, dtype=np.int64))
        if not unknown:
            self._hdr = hdr
        return hdr

    def om_counter_clashes(self, used: npt.NDArray[np.intp]) -> Set[int]:
        """Counters (name indices) among ``used`` whose OpenMetrics family ``x`` (of ``x_total``)
        is, or has its ``x_created`` sample named like, another name of the body: those are
        typed unknown under their own name (OpenMetrics forbids the clash)."""
        text = {self.text_name(self.names[j]) for j in used.tolist()}
        out: Set[int] = set()
        for j in used.tolist():
            tn = self.text_name(self.names[j])
            if len(tn) > 6 and tn.endswith("_total") and (tn[:-6] in text or tn[:-6] + "_created" in text) \
                    and self.family(j)[0] == "counter":
                out.add(j)
        return out

    def _header(self, j: int, name: str, openmetrics: bool, unknown: bool = False) -> bytes:
        t, h, u = self.family(j)
        lines = []
        if openmetrics:
            fam = name
            if t == "counter" and name.endswith("_total") and len(name) > 6 and not unknown:
                fam = name[:-6]
            elif t != "gauge":
                t = "unknown"
            lines.append(f"# TYPE {fam} {t}\n")
            if u and t not in ("info", "stateset") and fam.endswith("_" + u) and re.fullmatch(r"[a-zA-Z0-9_:]+", u):
                lines.append(f"# UNIT {fam} {u}\n")
            if h is not None:
                lines.append(f"# HELP {fam} {_escape_help(h, True)}\n")
        else:
            if h is not None:
                lines.append(f"# HELP {name} {_escape_help(h, False)}\n")
            lines.append(f"# TYPE {name} {t if t in _TEXT_TYPES else 'untyped'}\n")
        return _utf8("".join(lines))

    # -- rw2 symbol layout ----------------------------------------------------------------
    def rw2_layout(self, used: np.ndarray, with_meta: bool) -> Tuple[bytes, _Rw2Pieces]:
        """Symbols of a request whose series are ``used`` (sorted ids), and the per-series
        pieces the body needs: (labels_refs bytes, their offsets, metadata bytes per name,
        their offsets, name per series)."""
        n_names = len(self.names)
        meta_g = np.zeros((n_names, 2), dtype=np.int64)
        types = [0] * n_names
        if with_meta:
            for j in range(n_names):
                t, h, u = self.family(j)
                types[j] = _PB_TYPES.get(t, 0)
                meta_g[j] = (self.gid(h) if h else 0, self.gid(u) if u else 0)
        off = self.off.view()
        gids = self.gids()
        lens = off[used + 1] - off[used]
        total = int(lens.sum())
        n_str = len(self.sym.off) - 1
        mark = np.zeros(n_str, dtype=bool)
        if total:
            starts = np.repeat(off[used] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
            mark[gids[starts + np.arange(total)]] = True
        if with_meta:
            mark[meta_g[self.ser_name.view()[used]].ravel()] = True
        mark[0] = False
        ug = np.flatnonzero(mark)
        local = np.zeros(n_str, dtype=np.int64)
        local[ug] = np.arange(1, len(ug) + 1)
        head = b"\x22\x00" + bytes(self.impl.gather(self.sym.buf, self.sym.off.view(), ug))
        refs = local[gids].astype(np.uint32) if len(gids) else np.empty(0, dtype=np.uint32)
        pre_off = np.empty(len(off), dtype=np.int64)
        pre = bytes(self.impl.rw2_refs(off, refs, pre_off))
        suf = bytearray()
        suf_off = [0]
        for j in range(n_names):
            if with_meta:
                m = b""
                if types[j]:
                    m += b"\x08" + _varint(types[j])
                h_ref, u_ref = (int(x) for x in local[meta_g[j]])
                if h_ref:
                    m += b"\x18" + _varint(h_ref)
                if u_ref:
                    m += b"\x20" + _varint(u_ref)
                suf += _pb_bytes(5, m)
            suf_off.append(len(suf))
        return head, (pre, pre_off, bytes(suf), np.asarray(suf_off, dtype=np.int64), _i64(self.ser_name.view()))


# ------------------------------------------------------------------------------------------
# What a batch ships


class _Shipped:
    """The samples a batch ships: series ids, values, timestamps (and start timestamps), plus
    the series to end with a stale marker."""

    __slots__ = ("sids", "values", "ts", "start", "stale_sids", "n_stale")

    sids: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    ts: npt.NDArray[np.int64]
    start: Optional[npt.NDArray[np.int64]]
    stale_sids: npt.NDArray[np.int64]
    n_stale: int


def _output_of(batch: Any) -> str:
    out = getattr(batch, "output", "cumulative") or "cumulative"
    if out not in _OUTPUTS:
        raise ValueError(f"batch.output must be one of {_OUTPUTS}, not {out!r}")
    return str(out)


# ------------------------------------------------------------------------------------------
# The encoder


class Encoder:
    """A stateful encoder for one format (and, for ``"compact"``, one stream).

    ``send_metadata``: remote write metadata / text ``# HELP``/``# TYPE`` lines.
    ``timestamps``: text formats write sample timestamps (remote write always does).
    ``compression``: ``"gzip"`` for the text formats (``Content-Encoding: gzip``).
    ``level``: zstd level of the compact format (default 3) or gzip level (default 6).
    ``max_series``: bound of the per-series cache (and of the compact dictionaries).
    ``implementation``: ``"c"`` or ``"py"`` to force the native or pure loops.
    ``user_agent``: the ``User-Agent`` header.
    ``metadata_interval_s``: remote write 1.0 carries a family's metadata in the first request
    that has the family and then again once per interval (as Prometheus' ``metadata_config
    send_interval``, 1 min), not in every request: receivers keep it, and at one node it
    would otherwise be a good part of every request. 0 sends it every time.
    """

    def __init__(self, fmt: str, *, send_metadata: bool = True, timestamps: bool = True,
                 compression: Optional[str] = None, level: Optional[int] = None,
                 max_series: int = DEFAULT_MAX_SERIES, implementation: Optional[str] = None,
                 user_agent: Optional[str] = None, metadata_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            self.fmt = FORMATS[fmt]
        except KeyError:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(sorted(set(FORMATS.values())))}") from None
        if compression not in (None, "gzip", "identity"):
            raise ValueError(f"compression must be None or 'gzip', not {compression!r}")
        if compression == "gzip" and self.fmt not in ("prometheus", "openmetrics"):
            raise ValueError(f"compression='gzip' is for the text formats, not {self.fmt}")
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        self.send_metadata = bool(send_metadata)
        if not metadata_interval_s >= 0:
            raise ValueError(f"metadata_interval_s must be >= 0, not {metadata_interval_s!r}")
        self.metadata_interval_s = float(metadata_interval_s)
        self._clock = clock
        self.timestamps = bool(timestamps)
        # Requests can carry several batches only where the format concatenates (remote write
        # 1.0); the transport merges queued batches when this is set.
        self.encode_many: Optional[Callable[[Sequence[Any]], Tuple[bytes, Dict[str, str], int]]] = (
            self._encode_many_rw1 if self.fmt == "remote-write-1" else None)
        self.compression = None if compression == "identity" else compression
        self.level = level
        self.max_series = int(max_series)
        self._impl = _impl_module(implementation)
        self.implementation: str = self._impl.IMPLEMENTATION
        headers = {"Content-Type": _CONTENT_TYPES[self.fmt], "User-Agent": user_agent or USER_AGENT}
        if self.fmt == "remote-write-1":
            headers["Content-Encoding"] = "snappy"
            headers["X-Prometheus-Remote-Write-Version"] = "0.1.0"
        elif self.fmt == "remote-write-2":
            headers["Content-Encoding"] = "snappy"
            headers["X-Prometheus-Remote-Write-Version"] = "2.0.0"
        elif self.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        self.headers: Dict[str, str] = headers
        #: Samples (stale markers included) in the last body, and the body size.
        self.last_samples = 0
        self.last_bytes = 0
        self._table: Optional[_Table] = None
        self._compact: Optional[_CompactEncoder] = None
        self.reset()

    def __repr__(self) -> str:
        return f"<Encoder {self.fmt} impl={self.implementation}>"

    @property
    def content_type(self) -> str:
        return self.headers["Content-Type"]

    def reset(self) -> None:
        """Drop every cache (and, for compact, start a new stream with full dictionaries)."""
        if self.fmt == "compact":
            self._compact = _CompactEncoder(level=3 if self.level is None else int(self.level),
                                            max_series=self.max_series)
        else:
            self._table = _Table(self.fmt, self._impl)
        # remote write 1.0 metadata: which of the table's names had it since _md_at
        self._md_sent: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self._md_table: Optional[_Table] = None
        self._md_at = -math.inf

    def _rw1_metadata(self, tbl: "_Table", sids: npt.NDArray[np.int64]) -> bytes:
        """The metadata entries this request carries: families of its series that have not had
        theirs sent since the interval began (all of them when it begins again)."""
        if not self.send_metadata or not len(sids):
            return b""
        now = self._clock()
        if self._md_table is not tbl or now - self._md_at >= self.metadata_interval_s:
            self._md_table, self._md_at = tbl, now
            self._md_sent = np.zeros(len(tbl.names), dtype=np.bool_)
        elif len(self._md_sent) < len(tbl.names):
            self._md_sent = np.concatenate([self._md_sent, np.zeros(len(tbl.names) - len(self._md_sent), np.bool_)])
        mark = np.zeros(len(tbl.names), dtype=np.bool_)
        mark[tbl.ser_name.view()[sids]] = True
        mark &= ~self._md_sent
        if not mark.any():
            return b""
        self._md_sent |= mark
        return tbl.rw1_metadata(np.flatnonzero(mark))

    def reset_dictionaries(self) -> None:
        """Compact: the next batch carries full dictionaries under a new stream id (the answer
        to a receiver's 409). Other formats are stateless on the wire: no-op."""
        if self._compact is not None:
            self._compact.restart()

    @property
    def stream_id(self) -> Optional[int]:
        """Compact: the current stream id."""
        return None if self._compact is None else self._compact.stream_id

    def encode(self, batch: Any) -> Tuple[bytes, Dict[str, str]]:
        """``(body, headers)`` of one batch; the body is what goes on the wire."""
        if self.fmt == "compact":
            assert self._compact is not None
            body, n = self._compact.encode(batch)
        else:
            assert self._table is not None
            if len(self._table) > self.max_series:
                self._table = _Table(self.fmt, self._impl)
            if self.fmt == "remote-write-1":
                body, n = self._rw1(batch)
            elif self.fmt == "remote-write-2":
                body, n = self._rw2(batch)
            else:
                body, n = self._text(batch)
        self.last_samples = n
        self.last_bytes = len(body)
        return body, dict(self.headers)

    # -- shared: what to ship -------------------------------------------------------------
    def _ship(self, batch: Any, *, stale: bool, starts: bool) -> _Shipped:
        tbl = self._table
        assert tbl is not None
        output = _output_of(batch)
        if self.send_metadata or output == "both":
            fams = batch.families
            if fams:
                tbl.update_families(fams)
        nmap = tbl.name_map(batch.names)
        lmap = tbl.ls_map(batch.labelsets)
        name_ids = batch.name_ids
        labelset_ids = batch.labelset_ids
        base = tbl.batch_sids(nmap, lmap, name_ids, labelset_ids)
        values = _f64(batch.values)
        ts = _i64(batch.timestamps)
        kinds = np.asarray(batch.kinds)
        n = len(values)
        sh = _Shipped()
        start = None
        if starts and output != "delta" and n:
            is_c = kinds == _K_COUNTER
            if is_c.any():
                st = _i64(batch.start_timestamps)
                start = np.where(is_c, st, 0)
                start = np.where(start == ts, start - 1, start)
                start[start <= 0] = 0
        if output == "cumulative" or not n:
            sids, vals, t = base, values, ts
        else:
            is_dk = (kinds == _K_COUNTER) | (kinds == _K_EVENT)
            deltas = _f64(batch.deltas)
            if output == "delta":
                vals = np.where(is_dk, deltas, values)
                drop = is_dk & np.isnan(deltas)
                if drop.any():
                    keep = np.flatnonzero(~drop)
                    sids, vals, t = base[keep], vals[keep], ts[keep]
                else:
                    sids, t = base, ts
            else:  # both
                idx = np.flatnonzero(is_dk & ~np.isnan(deltas))
                if len(idx):
                    dmap = tbl.delta_map(batch.names)
                    dsids = tbl.lookup(dmap[name_ids[idx]], lmap[labelset_ids[idx]])
                    sids = np.concatenate([base, dsids])
                    vals = np.concatenate([values, deltas[idx]])
                    t = np.concatenate([ts, ts[idx]])
                    if start is not None:
                        start = np.concatenate([start, np.zeros(len(idx), dtype=np.int64)])
                else:
                    sids, vals, t = base, values, ts
            # remember kinds per name (to end a name's _delta series when it goes stale)
        if n:
            tbl.name_kind.a[nmap[name_ids]] = kinds
        sids = _i64(sids)
        if len(sids) > 1 and not tbl.unique_series(sids):
            # a series more than once: samples of a series together in timestamp order, one
            # sample per (series, timestamp) -- the last one (receivers reject duplicates)
            t = _i64(t)
            order = np.lexsort((t, sids))
            s2, t2 = sids[order], t[order]
            keep = np.ones(len(order), dtype=bool)
            keep[:-1] = (s2[1:] != s2[:-1]) | (t2[1:] != t2[:-1])
            sel = order[keep]
            sids, vals, t = sids[sel], np.asarray(vals)[sel], t[sel]
            if start is not None:
                start = start[sel]
        sh.sids = sids
        sh.values = _canon_nan(vals)
        sh.ts = t
        sh.start = start if start is not None else (np.zeros(len(sids), dtype=np.int64) if starts else None)
        sh.n_stale = 0
        sh.stale_sids = _EMPTY_I64
        if stale and len(batch.stale_name_ids):
            snid = np.asarray(batch.stale_name_ids, dtype=np.int64)
            slid = np.asarray(batch.stale_labelset_ids, dtype=np.int64)
            sn, sl = nmap[snid], lmap[slid]
            ssids = tbl.lookup(sn, sl)
            if output == "both":
                nk = tbl.name_kind.view()[sn]
                unknown = np.flatnonzero(nk < 0)
                for i in unknown.tolist():
                    nk[i] = _kind_of_name(tbl.names[int(sn[i])])
                dk = np.flatnonzero((nk == _K_COUNTER) | (nk == _K_EVENT))
                if len(dk):
                    dsn = np.fromiter((tbl.delta_index(int(j)) for j in sn[dk].tolist()), dtype=np.int64, count=len(dk))
                    ssids = np.concatenate([ssids, tbl.lookup(dsn, sl[dk])])
            sh.stale_sids = ssids
            sh.n_stale = len(ssids)
        return sh

    def _all(self, sh: _Shipped, batch: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        if not sh.n_stale:
            return sh.sids, sh.values, _i64(sh.ts), sh.start
        k = sh.n_stale
        sts = np.full(k, int(batch.timestamp_ms), dtype=np.int64)
        start = None if sh.start is None else np.concatenate([sh.start, np.zeros(k, dtype=np.int64)])
        return (np.concatenate([sh.sids, sh.stale_sids]), np.concatenate([sh.values, _stale_values(k)]),
                np.concatenate([_i64(sh.ts), sts]), start)

    # -- remote write 1.0 -----------------------------------------------------------------
    def _rw1(self, batch: Any) -> Tuple[bytes, int]:
        tbl = self._table
        assert tbl is not None
        sh = self._ship(batch, stale=True, starts=False)
        sids, vals, ts, _ = self._grouped(sh, batch)
        tail = self._rw1_metadata(tbl, sids)
        raw = self._impl.rw1_body(tbl.buf, tbl.off.view(), sids, vals, ts, tail)
        return bytes(cramjam.snappy.compress_raw(raw)), len(sids)

    def _rw1_raw(self, batch: Any) -> Tuple[bytes, int]:
        tbl = self._table
        assert tbl is not None
        sh = self._ship(batch, stale=True, starts=False)
        sids, vals, ts, _ = self._grouped(sh, batch)
        tail = self._rw1_metadata(tbl, sids)
        return bytes(self._impl.rw1_body(tbl.buf, tbl.off.view(), sids, vals, ts, tail)), len(sids)

    def _encode_many_rw1(self, batches: Sequence[Any]) -> Tuple[bytes, Dict[str, str], int]:
        """Several batches (targets) in one remote-write 1.0 request: a WriteRequest is a
        sequence of repeated fields, so the uncompressed bodies concatenate."""
        if len(self._table or ()) > self.max_series:
            self._table = _Table(self.fmt, self._impl)
        raws, n = [], 0
        for b in batches:
            raw, k = self._rw1_raw(b)
            raws.append(raw)
            n += k
        body = bytes(cramjam.snappy.compress_raw(b"".join(raws)))
        self.last_samples = n
        self.last_bytes = len(body)
        return body, dict(self.headers), n

    def _grouped(self, sh: _Shipped, batch: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Shipped samples grouped by label set (snappy's 64 KiB window then sees a device's
        labels repeat), stale markers last."""
        tbl = self._table
        assert tbl is not None
        order = tbl.ls_order(sh.sids)
        if order is not None:
            sh.sids, sh.values, sh.ts = sh.sids[order], sh.values[order], _i64(sh.ts)[order]
            if sh.start is not None:
                sh.start = sh.start[order]
        return self._all(sh, batch)

    # -- remote write 2.0 -----------------------------------------------------------------
    def _rw2(self, batch: Any) -> Tuple[bytes, int]:
        tbl = self._table
        assert tbl is not None
        sh = self._ship(batch, stale=True, starts=True)
        sids, vals, ts, start = self._grouped(sh, batch)
        assert start is not None
        key = (tbl.fam_version, len(tbl.ser_name), len(tbl.sym.off))
        cached = tbl.rw2_cache
        if cached is not None and cached[0] == key and (cached[1] is sids or same_ids(cached[1], sids)):
            head, pieces = cached[2]
        else:
            mark = np.zeros(len(tbl), dtype=bool)
            mark[sids] = True
            head, pieces = tbl.rw2_layout(np.flatnonzero(mark), self.send_metadata)
            # help/unit strings may have been interned meanwhile: key on the table after it
            key = (tbl.fam_version, len(tbl.ser_name), len(tbl.sym.off))
            tbl.rw2_cache = (key, sids.copy(), (head, pieces))
        pre, pre_off, suf, suf_off, ser_name = pieces
        raw = self._impl.rw2_body(head, pre, pre_off, suf, suf_off, ser_name, sids, vals, ts, _i64(start))
        return bytes(cramjam.snappy.compress_raw(raw)), len(sids)

    # -- text ---------------------------------------------------------------------------
    def _text(self, batch: Any) -> Tuple[bytes, int]:
        tbl = self._table
        assert tbl is not None
        om = self.fmt == "openmetrics"
        sh = self._ship(batch, stale=False, starts=False)
        sids = sh.sids
        groups = tbl.ser_name.view()[sids]
        n = len(sids)
        if n:
            uniq, first = np.unique(groups, return_index=True)
            changes = int(np.count_nonzero(groups[1:] != groups[:-1]))
            if changes == len(uniq) - 1:
                order = np.arange(n, dtype=np.int64)
            else:
                rank = np.zeros(len(tbl.names), dtype=np.int64)
                rank[uniq] = np.argsort(np.argsort(first, kind="stable"), kind="stable")
                order = np.argsort(rank[groups], kind="stable").astype(np.int64)
        else:
            order = _EMPTY_I64
        unknown: Sequence[int] = ()
        if om and n:
            bad = ~(sh.values >= 0)  # NaN or negative: not an OpenMetrics counter value
            demote = tbl.om_counter_clashes(uniq)
            if bad.any():
                demote.update(groups[bad].tolist())
            unknown = [j for j in demote if tbl.family(j)[0] == "counter"]
        hdr_buf, hdr_off = tbl.headers(om, self.send_metadata, unknown)
        ts_mode = (2 if om else 1) if self.timestamps else 0
        raw = self._impl.text_body(tbl.buf, tbl.off.view(), hdr_buf, hdr_off, tbl.ser_name.view(), order,
                                   sids, sh.values, _i64(sh.ts), ts_mode, b"# EOF\n" if om else b"")
        if self.compression == "gzip":
            raw = gzip.compress(raw, compresslevel=6 if self.level is None else int(self.level), mtime=0)
        return bytes(raw), n


def encode(batch: Any, fmt: str, *, encoder: Optional[Encoder] = None, **options: Any) -> Tuple[bytes, Dict[str, str]]:
    """``(body, headers)`` of ``batch`` in ``fmt``: ``"remote-write-1"``, ``"remote-write-2"``,
    ``"prometheus"``, ``"openmetrics"`` or ``"compact"``.

    Without ``encoder`` a fresh :class:`Encoder` (``options`` are its keyword arguments) is
    used: for compact that is a self-contained batch with full dictionaries. With one, its
    caches and (compact) stream state are used and updated.
    """
    if encoder is None:
        return Encoder(fmt, **options).encode(batch)
    if options:
        raise TypeError("pass options to the Encoder, not with encoder=")
    if FORMATS.get(fmt) != encoder.fmt:
        raise ValueError(f"encoder is for {encoder.fmt}, not {fmt!r}")
    return encoder.encode(batch)


def cumulative_view(batch: Any) -> Any:
    """The samples ``batch`` ships, as a batch of output mode ``"cumulative"``.

    ``delta``: COUNTER/EVENT samples carry their deltas (kind GAUGE), those without one are
    left out. ``both``: the ``<name>_delta`` series are added as names of their own (kind
    GAUGE, family gauge with the HELP note), and stale COUNTER/EVENT series also end their
    ``_delta`` series. A cumulative batch is returned as is. Used to merge batches of
    different output modes (the receiver's ``/metrics``); encoding the view gives the same
    series as encoding the batch.
    """
    output = _output_of(batch)
    if output == "cumulative":
        return batch
    names = tuple(batch.names)
    kinds = np.asarray(batch.kinds).astype(np.int8)
    values = _f64(batch.values)
    deltas = _f64(batch.deltas)
    is_dk = (kinds == _K_COUNTER) | (kinds == _K_EVENT)
    fams: Dict[str, _Family] = dict(batch.families or {})
    cols = {k: np.asarray(getattr(batch, k)) for k in ("name_ids", "labelset_ids", "field_ids", "timestamps",
                                                      "start_timestamps", "entity_ids", "resets", "event_counts")}
    stale_n = np.asarray(batch.stale_name_ids, dtype=np.int32)
    stale_l = np.asarray(batch.stale_labelset_ids, dtype=np.int32)
    gauge = np.int8(_K_GAUGE)
    if output == "delta":
        keep = np.flatnonzero(~(is_dk & np.isnan(deltas)))
        vals = np.where(is_dk, deltas, values)[keep]
        new_kinds = np.where(is_dk, gauge, kinds)[keep]
        cols = {k: v[keep] for k, v in cols.items()}
        out_names = names
    else:
        idx = np.flatnonzero(is_dk & ~np.isnan(deltas))
        n_names = len(names)
        out_names = names + tuple(n + _DELTA_SUFFIX for n in names)
        vals = np.concatenate([values, deltas[idx]])
        new_kinds = np.concatenate([kinds, np.full(len(idx), gauge)])
        for k, v in list(cols.items()):
            extra = v[idx]
            if k == "name_ids":
                extra = extra + n_names
            elif k == "start_timestamps":
                extra = np.zeros(len(idx), dtype=v.dtype)
            cols[k] = np.concatenate([v, extra])
        name_kind = np.full(n_names, -1, dtype=np.int64)
        if len(kinds):
            name_kind[np.asarray(batch.name_ids)] = kinds
        for j in np.unique(np.concatenate([np.asarray(batch.name_ids)[idx], stale_n])).tolist():
            kind = int(name_kind[j]) if name_kind[j] >= 0 else _kind_of_name(names[j])
            if kind not in (_K_COUNTER, _K_EVENT):
                continue
            t, h, u = fams.get(names[j], ("untyped", None, None))
            fams[names[j] + _DELTA_SUFFIX] = ("gauge", (h + _DELTA_HELP) if h else _DELTA_HELP.strip(" ()").capitalize(), u)
        if len(stale_n):
            sk = np.array([int(name_kind[j]) if name_kind[j] >= 0 else _kind_of_name(names[j])
                           for j in stale_n.tolist()], dtype=np.int64)
            dk = np.flatnonzero((sk == _K_COUNTER) | (sk == _K_EVENT))
            stale_n = np.concatenate([stale_n, (stale_n[dk] + n_names).astype(np.int32)])
            stale_l = np.concatenate([stale_l, stale_l[dk]])
    entities = getattr(batch, "entities", ())
    return DecodedBatch(
        target=getattr(batch, "target", None), timestamp_ms=int(batch.timestamp_ms), output="cumulative",
        names=out_names, labelsets=tuple(batch.labelsets), entities=tuple(entities), families=fams,
        name_ids=cols["name_ids"].astype(np.int32), labelset_ids=cols["labelset_ids"].astype(np.int32),
        field_ids=cols["field_ids"].astype(np.int32), kinds=new_kinds, entity_ids=cols["entity_ids"].astype(np.int32),
        series_ids=np.full(len(vals), -1, dtype=np.int64), values=vals, deltas=np.full(len(vals), np.nan),
        resets=cols["resets"].astype(bool), timestamps=cols["timestamps"].astype(np.int64),
        start_timestamps=cols["start_timestamps"].astype(np.int64), event_counts=cols["event_counts"].astype(np.float64),
        stale_name_ids=stale_n, stale_labelset_ids=stale_l,
        stream_id=getattr(batch, "stream_id", 0), seq=getattr(batch, "seq", 0), full=True, duplicate=False,
    )


def merge_batches(batches: Sequence[Any]) -> Any:
    """One cumulative batch holding the samples of several (their :func:`cumulative_view`),
    tables concatenated; families merged (the first batch naming a family wins). For
    rendering what several targets sent as one exposition."""
    views = [cumulative_view(b) for b in batches]
    if len(views) == 1:
        return views[0]
    names: List[str] = []
    labelsets: List[_LabelSet] = []
    entities: List[Entity] = []
    fams: Dict[str, _Family] = {}
    cols: Dict[str, List[np.ndarray]] = {k: [] for k in (
        "name_ids", "labelset_ids", "field_ids", "kinds", "entity_ids", "values", "deltas", "resets", "timestamps",
        "start_timestamps", "event_counts", "stale_name_ids", "stale_labelset_ids")}
    for v in views:
        no, lo, eo = len(names), len(labelsets), len(entities)
        names.extend(v.names)
        labelsets.extend(v.labelsets)
        ents = tuple(getattr(v, "entities", ()) or ())
        entities.extend(ents)
        for name, fam in (v.families or {}).items():
            fams.setdefault(name, fam)
        eids = np.asarray(v.entity_ids, dtype=np.int64)
        cols["name_ids"].append(np.asarray(v.name_ids, dtype=np.int64) + no)
        cols["labelset_ids"].append(np.asarray(v.labelset_ids, dtype=np.int64) + lo)
        cols["entity_ids"].append(np.where(eids >= 0, eids + eo, -1))
        cols["stale_name_ids"].append(np.asarray(v.stale_name_ids, dtype=np.int64) + no)
        cols["stale_labelset_ids"].append(np.asarray(v.stale_labelset_ids, dtype=np.int64) + lo)
        for k in ("field_ids", "kinds", "values", "deltas", "resets", "timestamps", "start_timestamps", "event_counts"):
            cols[k].append(np.asarray(getattr(v, k)))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return DecodedBatch(
        target=None, timestamp_ms=max(int(v.timestamp_ms) for v in views), output="cumulative",
        names=tuple(names), labelsets=tuple(labelsets), entities=tuple(entities), families=fams,
        name_ids=c["name_ids"].astype(np.int32), labelset_ids=c["labelset_ids"].astype(np.int32),
        field_ids=c["field_ids"].astype(np.int32), kinds=c["kinds"].astype(np.int8),
        entity_ids=c["entity_ids"].astype(np.int32), series_ids=np.full(len(c["values"]), -1, dtype=np.int64),
        values=c["values"].astype(np.float64), deltas=c["deltas"].astype(np.float64), resets=c["resets"].astype(bool),
        timestamps=c["timestamps"].astype(np.int64), start_timestamps=c["start_timestamps"].astype(np.int64),
        event_counts=c["event_counts"].astype(np.float64),
        stale_name_ids=c["stale_name_ids"].astype(np.int32), stale_labelset_ids=c["stale_labelset_ids"].astype(np.int32),
        stream_id=0, seq=0, full=True, duplicate=False,
    )


# ==========================================================================================
# The compact format (docs/compact-format.md)

COMPACT_MAGIC = b"DCRC"
COMPACT_VERSION = 1
_FLAG_FULL = 0x01
_HEADER = struct.Struct("<4sBBHQIII")  # magic, version, flags, reserved, stream, seq, raw_len, crc32
HEADER_SIZE = _HEADER.size  # 28

# section tags (ascending order in a payload)
_S_STRINGS, _S_NAMES, _S_LABELSETS, _S_ENTITIES, _S_SERIES, _S_FAMILIES = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
_S_BATCH, _S_ORDER, _S_VALUES, _S_TIMESTAMPS, _S_STARTS = 0x10, 0x11, 0x12, 0x13, 0x14
_S_DELTAS, _S_RESETS, _S_EVENTS, _S_STALE = 0x15, 0x16, 0x17, 0x18

_MAX_E = 12  # decimal exponents 0..12
_RAW = 0xFF  # value code: raw IEEE bits
_NONE = 0xFE  # state: no previous value
_POW10 = np.array([10.0 ** e for e in range(_MAX_E + 1)] + [1.0] * (256 - _MAX_E - 1), dtype=np.float64)
_TWO53 = float(2 ** 53)
_TS_NONE = np.iinfo(np.int64).min
_ENTITY_FIELDS = 13  # Entity: kind + 12 optional strings


class CompactFormatError(DcgmRelayError, ValueError):
    """A compact body that cannot be decoded.

    ``code`` says why and ``http_status`` what a receiver answers:

    =====================  ====  ==================================================
    code                   HTTP  meaning / what the sender does
    =====================  ====  ==================================================
    ``unknown-stream``     409   the receiver has no dictionaries for this stream (it
                                 restarted, or evicted the stream): resend with full
                                 dictionaries (``Encoder.reset_dictionaries()``)
    ``out-of-sequence``    409   a batch of the stream is missing: same
    ``unsupported-version`` 415  not version 1 of the format: use another format
    ``bad-magic``          400   not a compact body
    ``checksum``           400   the payload's CRC-32 does not match
    ``too-large``          413   the payload would decompress past the receiver's limit
    ``corrupt``            400   anything else that does not decode
    =====================  ====  ==================================================
    """

    STATUS = {"unknown-stream": 409, "out-of-sequence": 409, "unsupported-version": 415, "bad-magic": 400,
              "checksum": 400, "too-large": 413, "corrupt": 400}

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        self.http_status = self.STATUS.get(code, 400)
        super().__init__(code, reason)

    @property
    def resend_dictionaries(self) -> bool:
        """True when the sender should call ``reset_dictionaries()`` and resend."""
        return self.http_status == 409

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"

    def as_dict(self) -> Dict[str, Any]:
        return {"error": self.code, "reason": self.reason, "status": self.http_status,
                "resend_dictionaries": self.resend_dictionaries}


# -- columns --------------------------------------------------------------------------------


def _put_uints(out: bytearray, a: np.ndarray) -> None:
    """Int column: varint n, u8 width w, then w byte planes of n bytes (little-endian)."""
    n = len(a)
    out += _varint(n)
    if not n:
        out.append(0)
        return
    a = np.ascontiguousarray(a, dtype="<u8")
    mx = int(a.max())
    w = (mx.bit_length() + 7) // 8
    out.append(w)
    if w:
        out += a.view(np.uint8).reshape(n, 8)[:, :w].T.tobytes()


def _zigzag(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64, copy=False)
    return ((a << 1) ^ (a >> 63)).view(np.uint64)


def _unzigzag(u: np.ndarray) -> npt.NDArray[np.int64]:
    u = u.astype(np.uint64, copy=False)
    out: npt.NDArray[np.int64] = ((u >> np.uint64(1)).view(np.int64)) ^ -((u & np.uint64(1)).view(np.int64))
    return out


def _put_ints(out: bytearray, a: np.ndarray) -> None:
    _put_uints(out, _zigzag(np.asarray(a, dtype=np.int64)))


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: Union[bytes, bytearray, memoryview], pos: int = 0, end: Optional[int] = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def _fail(self, what: str) -> CompactFormatError:
        return CompactFormatError("corrupt", f"truncated or malformed {what} at payload offset {self.pos}")

    def varint(self, what: str = "varint") -> int:
        n = shift = 0
        buf, pos, end = self.buf, self.pos, self.end
        while True:
            if pos >= end or shift > 63:
                raise self._fail(what)
            b = buf[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        self.pos = pos
        return n

    def svarint(self, what: str = "varint") -> int:
        u = self.varint(what)
        return (u >> 1) ^ -(u & 1)

    def byte(self, what: str = "byte") -> int:
        if self.pos >= self.end:
            raise self._fail(what)
        b = self.buf[self.pos]
        self.pos += 1
        return int(b)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise self._fail(what)
        mv = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return mv

    def uints(self, what: str, n: Optional[int] = None) -> np.ndarray:
        count = self.varint(what)
        if n is not None and count != n:
            raise CompactFormatError("corrupt", f"{what}: {count} entries, expected {n}")
        w = self.byte(what)
        if w > 8 or count > len(self.buf):  # no column is longer than the payload
            raise self._fail(what)
        if not count:
            return np.empty(0, dtype=np.uint64)
        if not w:
            return np.zeros(count, dtype=np.uint64)
        planes = np.frombuffer(self.take(count * w, what), dtype=np.uint8).reshape(w, count)
        full = np.zeros((count, 8), dtype=np.uint8)
        full[:, :w] = planes.T
        return full.view("<u8").reshape(count).astype(np.uint64)

    def ints(self, what: str, n: Optional[int] = None) -> np.ndarray:
        return _unzigzag(self.uints(what, n))


# -- float columns ----------------------------------------------------------------------------


def _decimal(v: np.ndarray, e: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(ok, mantissa): where v == mantissa / 10**e exactly (bit for bit), |mantissa| <= 2**53."""
    sc = _POW10[e]
    with np.errstate(over="ignore", invalid="ignore"):
        mm = np.rint(v * sc)
        ok = np.abs(mm) <= _TWO53
    m = np.zeros(len(v), dtype=np.int64)
    m[ok] = mm[ok].astype(np.int64)
    with np.errstate(invalid="ignore"):
        back = m.astype(np.float64) / sc
    ok &= back.view(np.int64) == v.view(np.int64)
    return ok, m


def _enc_floats(out: bytearray, v: np.ndarray, sids: np.ndarray, code_st: np.ndarray,
                pay_st: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Float column against per-series state; returns the new (code, payload) per sample."""
    n = len(v)
    v = np.ascontiguousarray(v, dtype=np.float64)
    pc = code_st[sids]
    pp = pay_st[sids]
    bits = v.view(np.int64)
    code = np.full(n, _RAW, dtype=np.uint8)
    m = np.zeros(n, dtype=np.int64)
    finite = np.isfinite(v)
    cand = np.flatnonzero(finite & (pc <= _MAX_E))
    if len(cand):
        ok, mm = _decimal(v[cand], pc[cand])
        code[cand[ok]] = pc[cand[ok]]
        m[cand[ok]] = mm[ok]
    rest = np.flatnonzero(finite & (code == _RAW))
    for e in range(_MAX_E + 1):
        if not len(rest):
            break
        ok, mm = _decimal(v[rest], np.full(len(rest), e, dtype=np.uint8))
        code[rest[ok]] = e
        m[rest[ok]] = mm[ok]
        rest = rest[~ok]
    raw = code == _RAW
    pay = np.where(raw, bits, m)
    same = code == pc
    x = np.where(raw, bits, _zigzag(m).view(np.int64))
    ds = same & ~raw
    if ds.any():
        x[ds] = _zigzag(m[ds] - pp[ds]).view(np.int64)
    rs = same & raw
    if rs.any():
        x[rs] = bits[rs] ^ pp[rs]
    prev_c = np.where(pc == _NONE, 0, pc).astype(np.uint8)
    out += (code ^ prev_c).tobytes()
    _put_uints(out, x.view(np.uint64))
    return code, pay


def _dec_floats(r: _Reader, n: int, sids: np.ndarray, code_st: np.ndarray, pay_st: np.ndarray,
                what: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of _enc_floats: (values, code, payload)."""
    pc = code_st[sids]
    pp = pay_st[sids]
    cb = np.frombuffer(r.take(n, what), dtype=np.uint8)
    code = cb ^ np.where(pc == _NONE, 0, pc).astype(np.uint8)
    if np.any((code > _MAX_E) & (code != _RAW)):
        raise CompactFormatError("corrupt", f"{what}: bad value code")
    x = r.uints(what, n).view(np.int64)
    raw = code == _RAW
    same = code == pc
    pay = x.copy()
    ds = same & ~raw
    nd = ~same & ~raw
    pay[nd] = _unzigzag(x[nd].view(np.uint64))
    if ds.any():
        pay[ds] = pp[ds] + _unzigzag(x[ds].view(np.uint64))
    rs = same & raw
    if rs.any():
        pay[rs] = x[rs] ^ pp[rs]
    vals = np.empty(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        vals[~raw] = pay[~raw].astype(np.float64) / _POW10[code[~raw]]
    vals.view(np.int64)[raw] = pay[raw]
    if np.any(~raw & (np.abs(pay) > 2 ** 53)):
        raise CompactFormatError("corrupt", f"{what}: decimal out of range")
    return vals, code, pay


def _last_occurrence(sids: np.ndarray) -> Optional[np.ndarray]:
    """Indices of the last occurrence of each series, or None when every series occurs once."""
    n = len(sids)
    if n < 2:
        return None
    u, first_rev = np.unique(sids[::-1], return_index=True)
    if len(u) == n:
        return None
    return np.sort(n - 1 - first_rev)


def _store(state: np.ndarray, sids: np.ndarray, vals: np.ndarray, last: Optional[np.ndarray]) -> None:
    if last is None:
        state[sids] = vals
    else:
        state[sids[last]] = vals[last]


def _grow_to(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    if len(a) >= n:
        return a
    out = np.full(max(n, 2 * len(a), 16), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


_OUTPUT_CODES = {"cumulative": 0, "delta": 1, "both": 2}


#: An entity as the compact format carries it: a :class:`~dcgmrelay.scrape.Entity` or its fields.
_EntityRow = Tuple[Optional[str], ...]


def _entity_key(e: _EntityRow) -> _EntityRow:
    return tuple(e)


class _CompactEncoder:
    """Sender-side stream state: dictionaries sent so far and per-series previous values."""

    def __init__(self, *, level: int, max_series: int) -> None:
        self.level = level
        self.max_series = max_series
        self.restart()

    def restart(self) -> None:
        self.stream_id = secrets.randbits(64) or 1
        self.seq = 0
        self.full = True
        self.strings: Dict[str, int] = {}
        self.names: Dict[str, int] = {}
        self.name_list: List[str] = []
        self.ls: Dict[_LabelSet, int] = {}
        self.ents: Dict[_EntityRow, int] = {}
        self.fams: Dict[int, _Family] = {}
        self.n_series = 0
        self._sk = _EMPTY_I64
        self._sv = _EMPTY_I64
        self.ser_nm = np.zeros(16, dtype=np.int64)
        self.ser_lsid = np.zeros(16, dtype=np.int64)
        self.ser_field = np.zeros(16, dtype=np.int64)
        self.ser_kind = np.zeros(16, dtype=np.int64)
        self.ser_ent = np.zeros(16, dtype=np.int64)
        self.val_code = np.full(16, _NONE, dtype=np.uint8)
        self.val_pay = np.zeros(16, dtype=np.int64)
        self.dlt_code = np.full(16, _NONE, dtype=np.uint8)
        self.dlt_pay = np.zeros(16, dtype=np.int64)
        self.evt_code = np.full(16, _NONE, dtype=np.uint8)
        self.evt_pay = np.zeros(16, dtype=np.int64)
        self.start_prev = np.full(16, _TS_NONE, dtype=np.int64)
        self.last_order: Optional[np.ndarray] = None
        self.last_unique = True
        self._pending_restart = False
        # per-batch caches
        self._c_names: Optional[Sequence[str]] = None
        self._c_nmap = _EMPTY_I64
        self._c_ls: Optional[Sequence[_LabelSet]] = None
        self._c_lmap = _EMPTY_I64
        self._c_ents: Optional[Sequence[_EntityRow]] = None
        self._c_emap = np.full(1, -1, dtype=np.int64)
        self._c_sid_key: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None
        self._c_sids = _EMPTY_I64
        # dictionary entries of the batch being encoded
        self._new_strings: List[str] = []
        self._new_names: List[int] = []
        self._new_ls: List[List[int]] = []
        self._new_ents: List[List[int]] = []

    # -- dictionaries ---------------------------------------------------------------------
    def _sref(self, s: str) -> int:
        r = self.strings.get(s)
        if r is None:
            r = self.strings[s] = len(self.strings)
            self._new_strings.append(s)
        return r

    def _name(self, name: str) -> int:
        j = self.names.get(name)
        if j is None:
            j = self.names[name] = len(self.name_list)
            self.name_list.append(name)
            self._new_names.append(self._sref(name))
        return j

    def _name_map(self, names: Sequence[str]) -> np.ndarray:
        if names is self._c_names or (self._c_names is not None and names == self._c_names):
            return self._c_nmap
        out = np.fromiter((self._name(n) for n in names), dtype=np.int64, count=len(names))
        self._c_names, self._c_nmap = names, out
        return out

    def _ls_map(self, labelsets: Sequence[_LabelSet]) -> np.ndarray:
        if labelsets is self._c_ls or (self._c_ls is not None and labelsets == self._c_ls):
            return self._c_lmap
        out = np.empty(len(labelsets), dtype=np.int64)
        for i, ls in enumerate(labelsets):
            j = self.ls.get(ls)
            if j is None:
                j = self.ls[ls] = len(self.ls)
                refs: List[int] = []
                for k, v in ls:
                    refs.append(self._sref(k))
                    refs.append(self._sref(v))
                self._new_ls.append(refs)
            out[i] = j
        self._c_ls, self._c_lmap = labelsets, out
        return out

    def _ent_map(self, entities: Sequence[_EntityRow]) -> np.ndarray:
        """Encoder entity id per batch entity, shifted by one (index 0: no entity -> -1)."""
        if entities is self._c_ents or (self._c_ents is not None and entities == self._c_ents):
            return self._c_emap
        out = np.empty(len(entities) + 1, dtype=np.int64)
        out[0] = -1
        for i, e in enumerate(entities):
            key = _entity_key(e)
            j = self.ents.get(key)
            if j is None:
                j = self.ents[key] = len(self.ents)
                if len(key) != _ENTITY_FIELDS:
                    raise ValueError(f"an entity has {len(key)} fields, expected {_ENTITY_FIELDS}")
                self._new_ents.append([self._sref(str(key[0]))] +
                                      [0 if x is None else self._sref(str(x)) + 1 for x in key[1:]])
            out[i + 1] = j
        self._c_ents, self._c_emap = entities, out
        return out

    def _grow(self, n: int) -> None:
        self.ser_nm = _grow_to(self.ser_nm, n, 0)
        self.ser_lsid = _grow_to(self.ser_lsid, n, 0)
        self.ser_field = _grow_to(self.ser_field, n, 0)
        self.ser_kind = _grow_to(self.ser_kind, n, 0)
        self.ser_ent = _grow_to(self.ser_ent, n, 0)
        self.val_code = _grow_to(self.val_code, n, _NONE)
        self.val_pay = _grow_to(self.val_pay, n, 0)
        self.dlt_code = _grow_to(self.dlt_code, n, _NONE)
        self.dlt_pay = _grow_to(self.dlt_pay, n, 0)
        self.evt_code = _grow_to(self.evt_code, n, _NONE)
        self.evt_pay = _grow_to(self.evt_pay, n, 0)
        self.start_prev = _grow_to(self.start_prev, n, _TS_NONE)

    def _lookup(self, keys: np.ndarray, new: List[np.ndarray]) -> np.ndarray:
        """Series ids of keys (name << 32 | labelset); the ids of new ones are appended to
        ``new``; the caller sets their attributes."""
        if not len(keys):
            return _EMPTY_I64
        found, uk = _find_sorted(self._sk, self._sv, keys)
        if found is not None:
            return found
        start = self.n_series
        ids = np.arange(start, start + len(uk), dtype=np.int64)
        self.n_series += len(uk)
        self._grow(self.n_series)
        self.ser_nm[ids] = uk >> 32
        self.ser_lsid[ids] = uk & 0xFFFFFFFF
        new.append(ids)
        self._sk, self._sv = _insert_sorted(self._sk, self._sv, uk, ids)
        return self._lookup(keys, new)

    # -- one batch --------------------------------------------------------------------------
    def encode(self, batch: Any) -> Tuple[bytes, int]:
        if self._pending_restart or self.n_series > self.max_series:
            self.restart()
        output = _output_of(batch)
        self._new_strings, self._new_names, self._new_ls, self._new_ents = [], [], [], []
        nmap = self._name_map(batch.names)
        lmap = self._ls_map(batch.labelsets)
        name_ids = np.asarray(batch.name_ids)
        labelset_ids = np.asarray(batch.labelset_ids)
        n = len(name_ids)
        field_ids = _i64(batch.field_ids)
        kinds = _i64(batch.kinds)
        emap = self._ent_map(batch.entities) if n else self._c_emap
        ents = emap[_i64(batch.entity_ids) + 1] if n else _EMPTY_I64
        new: List[np.ndarray] = []
        c = self._c_sid_key
        if (c is not None and c[0] is nmap and c[1] is lmap and same_ids(c[2], name_ids)
                and same_ids(c[3], labelset_ids)):
            sids = self._c_sids
        else:
            sids = self._lookup((nmap[name_ids] << 32) | lmap[labelset_ids], new) if n else _EMPTY_I64
            self._c_sid_key = (nmap, lmap, name_ids.copy(), labelset_ids.copy())
            self._c_sids = sids
        # series attributes: new series, and existing ones whose attributes changed
        upd = list(new)
        if n:
            changed = ((self.ser_field[sids] != field_ids) | (self.ser_kind[sids] != kinds)
                       | (self.ser_ent[sids] != ents))
            if new:
                changed[np.isin(sids, new[0])] = True
            if changed.any():
                idx = np.flatnonzero(changed)
                last = _last_occurrence(sids[idx])
                idx = idx if last is None else idx[last]
                self.ser_field[sids[idx]] = field_ids[idx]
                self.ser_kind[sids[idx]] = kinds[idx]
                self.ser_ent[sids[idx]] = ents[idx]
                upd.append(sids[idx])
        # stale series (new ones: field id from the name, gauge, no entity)
        stale_sids = _EMPTY_I64
        if len(batch.stale_name_ids):
            snew: List[np.ndarray] = []
            sn = nmap[_i64(batch.stale_name_ids)]
            sl = lmap[_i64(batch.stale_labelset_ids)]
            stale_sids = self._lookup((sn << 32) | sl, snew)
            for ids in snew:
                for sid in ids.tolist():
                    self.ser_field[sid] = _fields.id_of(self.name_list[int(self.ser_nm[sid])])
                self.ser_kind[ids] = _K_GAUGE
                self.ser_ent[ids] = -1
                upd.append(ids)
        # families
        fam_upd: List[Tuple[int, int, int, int]] = []
        fams = batch.families
        for name, fam in (fams or {}).items():
            j = self._name(name)
            fam = (str(fam[0]), fam[1], fam[2])
            if self.fams.get(j) != fam:
                self.fams[j] = fam
                fam_upd.append((j, self._sref(fam[0]), 0 if fam[1] is None else self._sref(fam[1]) + 1,
                                0 if fam[2] is None else self._sref(fam[2]) + 1))
        target = getattr(batch, "target", None)
        tref = 0 if target is None else self._sref(str(target)) + 1

        out = bytearray()
        # -- dictionary sections
        if self._new_strings:
            sec = bytearray(_varint(len(self._new_strings)))
            enc = [s.encode("utf-8", "surrogatepass") for s in self._new_strings]
            _put_uints(sec, np.fromiter((len(b) for b in enc), dtype=np.uint64, count=len(enc)))
            sec += b"".join(enc)
            _section(out, _S_STRINGS, sec)
        if self._new_names:
            sec = bytearray(_varint(len(self._new_names)))
            _put_uints(sec, np.asarray(self._new_names, dtype=np.uint64))
            _section(out, _S_NAMES, sec)
        if self._new_ls:
            sec = bytearray(_varint(len(self._new_ls)))
            _put_uints(sec, np.fromiter((len(r) // 2 for r in self._new_ls), dtype=np.uint64, count=len(self._new_ls)))
            flat = [x for r in self._new_ls for x in r]
            _put_uints(sec, np.asarray(flat, dtype=np.uint64))
            _section(out, _S_LABELSETS, sec)
        if self._new_ents:
            sec = bytearray(_varint(len(self._new_ents)))
            _put_uints(sec, np.asarray([x for r in self._new_ents for x in r], dtype=np.uint64))
            _section(out, _S_ENTITIES, sec)
        if upd:
            ids = np.unique(np.concatenate(upd))
            sec = bytearray(_varint(len(ids)))
            _put_uints(sec, ids.view(np.uint64))
            _put_uints(sec, self.ser_nm[ids].view(np.uint64))
            _put_uints(sec, self.ser_lsid[ids].view(np.uint64))
            _put_ints(sec, self.ser_field[ids])
            _put_uints(sec, self.ser_kind[ids].view(np.uint64))
            _put_uints(sec, (self.ser_ent[ids] + 1).view(np.uint64))
            _section(out, _S_SERIES, sec)
        if fam_upd:
            sec = bytearray(_varint(len(fam_upd)))
            cols = np.asarray(fam_upd, dtype=np.uint64).reshape(-1, 4)
            for k in range(4):
                _put_uints(sec, cols[:, k])
            _section(out, _S_FAMILIES, sec)
        # -- the batch
        bts = int(batch.timestamp_ms)
        sec = bytearray()
        sec += _varint((bts << 1) ^ (bts >> 63))
        sec += _varint(n)
        sec.append(_OUTPUT_CODES[output])
        sec += _varint(tref)
        sec += _varint(len(stale_sids))
        _section(out, _S_BATCH, sec)
        same_order = self.last_order is not None and same_ids(sids, self.last_order)
        if not same_order:
            sec = bytearray()
            _put_uints(sec, _zigzag(np.diff(sids, prepend=-1) - 1))
            _section(out, _S_ORDER, sec)
            self.last_order = sids.copy()
            self.last_unique = _last_occurrence(sids) is None
        last = None if self.last_unique else _last_occurrence(sids)
        if n:
            values = _f64(batch.values)
            sec = bytearray()
            code, pay = _enc_floats(sec, values, sids, self.val_code, self.val_pay)
            _section(out, _S_VALUES, sec)
            _store(self.val_code, sids, code, last)
            _store(self.val_pay, sids, pay, last)
            ts = _i64(batch.timestamps)
            d = ts - bts
            if d.any():
                sec = bytearray()
                _put_ints(sec, d)
                _section(out, _S_TIMESTAMPS, sec)
            st = _i64(batch.start_timestamps)
            prev = self.start_prev[sids]
            ref = np.where(prev == _TS_NONE, bts, prev)
            d = st - ref
            if d.any():
                sec = bytearray()
                _put_ints(sec, d)
                _section(out, _S_STARTS, sec)
            _store(self.start_prev, sids, st, last)
            sk = self.ser_kind[sids]
            dk = np.flatnonzero((sk == _K_COUNTER) | (sk == _K_EVENT))
            if len(dk):
                dsids = sids[dk]
                dlast = _last_occurrence(dsids) if last is not None else None
                sec = bytearray()
                code, pay = _enc_floats(sec, _f64(batch.deltas)[dk], dsids, self.dlt_code, self.dlt_pay)
                _section(out, _S_DELTAS, sec)
                _store(self.dlt_code, dsids, code, dlast)
                _store(self.dlt_pay, dsids, pay, dlast)
                resets = np.asarray(batch.resets, dtype=bool)[dk]
                if resets.any():
                    _section(out, _S_RESETS, bytearray(np.packbits(resets, bitorder="little").tobytes()))
            ev = np.flatnonzero(sk == _K_EVENT)
            if len(ev):
                esids = sids[ev]
                elast = _last_occurrence(esids) if last is not None else None
                sec = bytearray()
                code, pay = _enc_floats(sec, _f64(batch.event_counts)[ev], esids, self.evt_code, self.evt_pay)
                _section(out, _S_EVENTS, sec)
                _store(self.evt_code, esids, code, elast)
                _store(self.evt_pay, esids, pay, elast)
        if len(stale_sids):
            sec = bytearray()
            _put_uints(sec, stale_sids.view(np.uint64))
            _section(out, _S_STALE, sec)

        payload = bytes(cramjam.zstd.compress(bytes(out), level=self.level))
        flags = _FLAG_FULL if self.full else 0
        seq = self.seq
        header = _HEADER.pack(COMPACT_MAGIC, COMPACT_VERSION, flags, 0, self.stream_id, seq, len(out),
                              zlib.crc32(payload))
        self.full = False
        self.seq = (seq + 1) & 0xFFFFFFFF
        # keep the dictionaries bounded: far more series than a batch uses -> start over
        used = n + len(stale_sids)
        if self.n_series > self.max_series or self.n_series > 4 * used + 4096:
            self._pending_restart = True
        return header + payload, n


def _section(out: bytearray, tag: int, content: Any) -> None:
    out.append(tag)
    out += _varint(len(content))
    out += content


# -- decoding -------------------------------------------------------------------------------


class DecodedBatch:
    """One decoded compact batch: the columns of a :class:`~dcgmrelay.relay.RelayBatch`.

    ``names``/``labelsets``/``entities`` are the stream's dictionaries (they may hold entries
    no sample uses); per sample: ``name_ids``, ``labelset_ids``, ``field_ids``, ``kinds``,
    ``entity_ids``, ``series_ids`` (ids in the stream's series dictionary), ``values``,
    ``timestamps``, ``start_timestamps``, ``deltas`` (COUNTER/EVENT samples, NaN elsewhere),
    ``resets``, ``event_counts`` (EVENT samples, NaN elsewhere); ``stale_name_ids`` /
    ``stale_labelset_ids``; ``families`` (name -> (type, help, unit)); ``target``,
    ``timestamp_ms``, ``output``. ``stream_id``, ``seq``, ``full`` (the batch carried full
    dictionaries) and ``duplicate`` (a resend of the stream's last batch, already seen)
    describe the stream. It can be re-encoded with :func:`encode` like a RelayBatch.
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self._series_labels: Dict[Tuple[int, int], List[Tuple[str, str]]] = {}

    target: Optional[str]
    timestamp_ms: int
    output: str
    names: Tuple[str, ...]
    labelsets: Tuple[_LabelSet, ...]
    entities: Tuple[Entity, ...]
    families: Dict[str, _Family]
    name_ids: npt.NDArray[np.int32]
    labelset_ids: npt.NDArray[np.int32]
    field_ids: npt.NDArray[np.int32]
    kinds: npt.NDArray[np.int8]
    entity_ids: npt.NDArray[np.int32]
    series_ids: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    deltas: npt.NDArray[np.float64]
    resets: npt.NDArray[np.bool_]
    timestamps: npt.NDArray[np.int64]
    start_timestamps: npt.NDArray[np.int64]
    event_counts: npt.NDArray[np.float64]
    stale_name_ids: npt.NDArray[np.int32]
    stale_labelset_ids: npt.NDArray[np.int32]
    stream_id: int
    seq: int
    full: bool
    duplicate: bool

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return (f"<DecodedBatch {self.target} t={self.timestamp_ms} samples={len(self)} "
                f"stale={len(self.stale_name_ids)} output={self.output} stream={self.stream_id:016x} "
                f"seq={self.seq}{' full' if self.full else ''}{' duplicate' if self.duplicate else ''}>")

    def labels(self, i: int) -> Dict[str, str]:
        return dict(self.labelsets[self.labelset_ids[i]])

    def series_labels(self, i: int) -> List[Tuple[str, str]]:
        key = (int(self.name_ids[i]), int(self.labelset_ids[i]))
        out = self._series_labels.get(key)
        if out is None:
            out = self._series_labels[key] = sorted((("__name__", self.names[key[0]]), *self.labelsets[key[1]]))
        return out

    def samples(self) -> Iterator[Tuple[str, Dict[str, str], float, int, Optional[float], int]]:
        """``(name, labels, value, kind, delta or None, timestamp_ms)`` per sample."""
        for nid, lid, v, k, d, ts in zip(self.name_ids.tolist(), self.labelset_ids.tolist(), self.values.tolist(),
                                         self.kinds.tolist(), self.deltas.tolist(), self.timestamps.tolist()):
            yield self.names[nid], dict(self.labelsets[lid]), v, k, (None if d != d else d), ts

    def stale_series(self) -> Iterator[Tuple[str, Dict[str, str]]]:
        for nid, lid in zip(self.stale_name_ids.tolist(), self.stale_labelset_ids.tolist()):
            yield self.names[nid], dict(self.labelsets[lid])


class _Stream:
    """Receiver-side state of one compact stream (mirrors _CompactEncoder)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.seq = -1
        self.last_crc = -1
        self.last: Optional[DecodedBatch] = None
        self.strings: List[str] = []
        self.names: List[str] = []
        self.labelsets: List[_LabelSet] = []
        self.entities: List[Entity] = []
        self.families: Dict[int, _Family] = {}
        # id of every name and label set: each is listed once per stream (as the encoder does)
        self.name_index: Dict[str, int] = {}
        self.labelset_index: Dict[_LabelSet, int] = {}
        self.n_series = 0
        self.ser_name = np.zeros(16, dtype=np.int64)
        self.ser_ls = np.zeros(16, dtype=np.int64)
        self.ser_field = np.zeros(16, dtype=np.int64)
        self.ser_kind = np.zeros(16, dtype=np.int64)
        self.ser_ent = np.zeros(16, dtype=np.int64)
        self.val_code = np.full(16, _NONE, dtype=np.uint8)
        self.val_pay = np.zeros(16, dtype=np.int64)
        self.dlt_code = np.full(16, _NONE, dtype=np.uint8)
        self.dlt_pay = np.zeros(16, dtype=np.int64)
        self.evt_code = np.full(16, _NONE, dtype=np.uint8)
        self.evt_pay = np.zeros(16, dtype=np.int64)
        self.start_prev = np.full(16, _TS_NONE, dtype=np.int64)
        self.last_order: Optional[np.ndarray] = None
        self._t_names: Optional[Tuple[str, ...]] = None
        self._t_labelsets: Optional[Tuple[_LabelSet, ...]] = None
        self._t_entities: Optional[Tuple[Entity, ...]] = None
        self._t_families: Optional[Dict[str, _Family]] = None

    def copy_arrays(self) -> Dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("ser_name", "ser_ls", "ser_field", "ser_kind", "ser_ent", "val_code",
                                              "val_pay", "dlt_code", "dlt_pay", "evt_code", "evt_pay",
                                              "start_prev")}


class DecoderState:
    """Receiver-side dictionaries and previous values of every compact stream it has seen.

    Streams are kept in LRU order, at most ``max_streams``; an evicted stream's next batch
    gets ``unknown-stream`` (409) and its sender resends full dictionaries.
    ``max_payload`` bounds the decompressed size of one batch. Not thread-safe: decode one
    body at a time (the receiver holds a lock).
    """

    def __init__(self, *, max_streams: int = 256, max_payload: int = 256 << 20) -> None:
        self.max_streams = int(max_streams)
        self.max_payload = int(max_payload)
        self.streams: "OrderedDict[int, _Stream]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.streams)

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)


def decode_batch(body: Any, *, state: Optional[DecoderState] = None) -> DecodedBatch:
    """Decode one compact body. ``state`` holds the dictionaries of the streams seen so far
    (without it only a batch with full dictionaries decodes). Raises
    :class:`CompactFormatError`; its ``http_status`` is what a receiver answers (409: the
    sender must resend full dictionaries). State is only changed by a batch that decodes.
    """
    if state is None:
        state = DecoderState()
    buf = bytes(body) if not isinstance(body, bytes) else body
    if len(buf) < HEADER_SIZE:
        if buf[:4] != COMPACT_MAGIC[: len(buf)]:
            raise CompactFormatError("bad-magic", "not a dcgmrelay compact body")
        raise CompactFormatError("corrupt", f"body of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, _reserved, stream_id, seq, raw_len, crc = _HEADER.unpack_from(buf)
    if magic != COMPACT_MAGIC:
        raise CompactFormatError("bad-magic", "not a dcgmrelay compact body (magic bytes differ)")
    if version != COMPACT_VERSION:
        raise CompactFormatError("unsupported-version",
                                 f"compact format version {version}; this receiver reads version {COMPACT_VERSION}")
    if flags & ~_FLAG_FULL:
        raise CompactFormatError("corrupt", f"unknown header flags 0x{flags:02x}")
    payload = memoryview(buf)[HEADER_SIZE:]
    if zlib.crc32(payload) != crc:
        raise CompactFormatError("checksum", "CRC-32 of the payload does not match the header")
    full = bool(flags & _FLAG_FULL)
    old = state.streams.get(stream_id)
    if old is not None and seq == old.seq and crc == old.last_crc and old.last is not None:
        # a resend of the last batch (its response was lost): already applied
        state.streams.move_to_end(stream_id)
        dup = DecodedBatch(**{k: v for k, v in old.last.__dict__.items() if k != "_series_labels"})
        dup.duplicate = True
        return dup
    if full:
        st = _Stream(stream_id)
    else:
        if old is None:
            raise CompactFormatError("unknown-stream",
                                     f"no dictionaries for stream {stream_id:016x}: resend with full dictionaries")
        if seq != ((old.seq + 1) & 0xFFFFFFFF):
            raise CompactFormatError("out-of-sequence",
                                     f"stream {stream_id:016x}: batch {seq} after {old.seq}: a batch is missing; "
                                     "resend with full dictionaries")
        st = old
    if raw_len > state.max_payload:
        raise CompactFormatError("too-large", f"payload of {raw_len} bytes is over the limit of {state.max_payload}")
    raw = bytearray(raw_len)
    try:
        got = cramjam.zstd.decompress_into(bytes(payload), raw)
    except Exception as exc:  # noqa: BLE001 - cramjam raises its own error types
        raise CompactFormatError("corrupt", f"zstd: {exc}") from None
    if got != raw_len:
        raise CompactFormatError("corrupt", f"payload decompressed to {got} bytes, header says {raw_len}")
    try:
        out = _decode_payload(raw, st, full, stream_id, seq)
    except CompactFormatError:
        raise
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        raise CompactFormatError("corrupt", f"{type(exc).__name__}: {exc}") from None
    st.seq = seq
    st.last_crc = crc
    st.last = out
    state.streams[stream_id] = st
    state.streams.move_to_end(stream_id)
    while len(state.streams) > state.max_streams:
        state.streams.popitem(last=False)
    return out


def _check_refs(a: np.ndarray, limit: int, what: str) -> np.ndarray:
    if len(a) and int(a.max()) >= limit:
        raise CompactFormatError("corrupt", f"{what}: reference {int(a.max())} past the table of {limit}")
    return a.astype(np.int64)


_K = TypeVar("_K", str, _LabelSet)


def _index_new(new: List[_K], index: Dict[_K, int], base: int, section: str, what: str,
               offset: int) -> Dict[_K, int]:
    """Ids of a section's new entries (``base`` onwards); an entry the stream already has,
    or that the section lists twice, is a ``corrupt`` body: an encoder lists each once, and
    two ids for one name (label set) would make one series out of two."""
    out: Dict[_K, int] = {}
    for i, x in enumerate(new):
        j = index.get(x)
        if j is None:
            j = out.get(x)
        if j is not None:
            text = repr(x)
            raise CompactFormatError(
                "corrupt", f"{section} section at payload offset {offset}: entry {i} ({what} id {base + i}) "
                           f"repeats {what} id {j} {text if len(text) <= 200 else text[:197] + '...'}: "
                           f"each {what} is listed once per stream")
        out[x] = base + i
    return out


def _check_series_unique(arrays: Dict[str, np.ndarray], n_series: int, offset: int) -> None:
    """Every series id must name its own (name id, label set id): a body that lists one
    series under two ids (with different kinds, fields or entities, or the same) is
    ``corrupt``, as an encoder keeps one id per series and re-encoding could keep only one."""
    if n_series < 2:
        return
    nm, ls = arrays["ser_name"][:n_series], arrays["ser_ls"][:n_series]
    order = np.lexsort((ls, nm))
    nm, ls = nm[order], ls[order]
    same = np.flatnonzero((nm[1:] == nm[:-1]) & (ls[1:] == ls[:-1]))
    if not len(same):
        return
    a, b = (int(x) for x in order[same[0]:same[0] + 2])
    kinds = arrays["ser_kind"]
    raise CompactFormatError(
        "corrupt", f"series section at payload offset {offset}: series ids {a} and {b} are one series "
                   f"(name id {int(arrays['ser_name'][a])}, label set id {int(arrays['ser_ls'][a])}; "
                   f"kinds {int(kinds[a])} and {int(kinds[b])}): each series is listed under one id per stream")


def _check_series_kept(ids: np.ndarray, nm: np.ndarray, ls: np.ndarray, st: _Stream, offset: int) -> None:
    """A SERIES entry for a series id the stream already has may change its field, kind and
    entity, never its name id or label set id: the encoder gives a new (name, label set) a
    new id, so a body re-binding an id is ``corrupt`` (the receiver's previous values and
    start timestamps of that id belong to the old series)."""
    known = ids < st.n_series
    if not known.any():
        return
    sid = ids[known]
    bad = np.flatnonzero((st.ser_name[sid] != nm[known]) | (st.ser_ls[sid] != ls[known]))
    if not len(bad):
        return
    i = int(np.flatnonzero(known)[bad[0]])
    j = int(ids[i])
    raise CompactFormatError(
        "corrupt", f"series section at payload offset {offset}: entry {i} re-binds series id {j} "
                   f"from (name id {int(st.ser_name[j])}, label set id {int(st.ser_ls[j])}) "
                   f"to (name id {int(nm[i])}, label set id {int(ls[i])}): a series id keeps its name "
                   f"and label set for the life of the stream")


def _decode_payload(raw: bytearray, st: _Stream, full: bool, stream_id: int, seq: int) -> DecodedBatch:
    from .scrape import Entity

    r = _Reader(raw)
    sections: Dict[int, Tuple[int, int]] = {}
    last_tag = 0
    while r.pos < r.end:
        tag = r.byte("section tag")
        length = r.varint("section length")
        if tag <= last_tag:
            raise CompactFormatError("corrupt", f"section 0x{tag:02x} out of order")
        if r.pos + length > r.end:
            raise CompactFormatError("corrupt", f"section 0x{tag:02x} runs past the payload")
        if tag >= 0x80:  # optional sections of later minor versions: skipped
            r.pos += length
            last_tag = tag
            continue
        if tag not in (_S_STRINGS, _S_NAMES, _S_LABELSETS, _S_ENTITIES, _S_SERIES, _S_FAMILIES, _S_BATCH, _S_ORDER,
                       _S_VALUES, _S_TIMESTAMPS, _S_STARTS, _S_DELTAS, _S_RESETS, _S_EVENTS, _S_STALE):
            raise CompactFormatError("corrupt", f"unknown section 0x{tag:02x}")
        sections[tag] = (r.pos, r.pos + length)
        r.pos += length
        last_tag = tag
    if _S_BATCH not in sections:
        raise CompactFormatError("corrupt", "no batch section")

    def reader(tag: int) -> _Reader:
        a, b = sections[tag]
        return _Reader(raw, a, b)

    def done(rd: _Reader, what: str) -> None:
        if rd.pos != rd.end:
            raise CompactFormatError("corrupt", f"{what}: {rd.end - rd.pos} bytes left over")

    # -- dictionaries (staged: committed only when everything decoded)
    strings = st.strings
    new_strings: List[str] = []
    if _S_STRINGS in sections:
        rd = reader(_S_STRINGS)
        k = rd.varint("strings")
        if k > len(raw):
            raise CompactFormatError("corrupt", "strings: count larger than the payload")
        lens = rd.uints("string lengths", k).astype(np.int64)
        blob = bytes(rd.take(int(lens.sum()), "strings"))
        done(rd, "strings")
        pos = 0
        for ln in lens.tolist():
            new_strings.append(blob[pos:pos + ln].decode("utf-8", "surrogatepass"))
            pos += ln
    n_str = len(strings) + len(new_strings)

    def s(ref: int) -> str:
        return strings[ref] if ref < len(strings) else new_strings[ref - len(strings)]

    new_names: List[str] = []
    new_name_index: Dict[str, int] = {}
    if _S_NAMES in sections:
        rd = reader(_S_NAMES)
        k = rd.varint("names")
        refs = _check_refs(rd.uints("names", k), n_str, "names")
        done(rd, "names")
        new_names = [s(x) for x in refs.tolist()]
        new_name_index = _index_new(new_names, st.name_index, len(st.names), "names", "name", sections[_S_NAMES][0])
    n_names = len(st.names) + len(new_names)

    new_ls: List[_LabelSet] = []
    new_ls_index: Dict[_LabelSet, int] = {}
    if _S_LABELSETS in sections:
        rd = reader(_S_LABELSETS)
        k = rd.varint("labelsets")
        counts = rd.uints("labelset sizes", k).astype(np.int64)
        flat = _check_refs(rd.uints("labelset refs", int(counts.sum()) * 2), n_str, "labelsets").tolist()
        done(rd, "labelsets")
        pos = 0
        for c in counts.tolist():
            new_ls.append(tuple((s(flat[pos + 2 * i]), s(flat[pos + 2 * i + 1])) for i in range(c)))
            pos += 2 * c
        new_ls_index = _index_new(new_ls, st.labelset_index, len(st.labelsets), "labelsets", "label set",
                                  sections[_S_LABELSETS][0])
    n_ls = len(st.labelsets) + len(new_ls)

    new_ents: List[Any] = []
    if _S_ENTITIES in sections:
        rd = reader(_S_ENTITIES)
        k = rd.varint("entities")
        flat = rd.uints("entity refs", k * _ENTITY_FIELDS).astype(np.int64).tolist()
        done(rd, "entities")
        for i in range(k):
            row = flat[i * _ENTITY_FIELDS:(i + 1) * _ENTITY_FIELDS]
            if row[0] >= n_str or any(x > n_str for x in row[1:]):
                raise CompactFormatError("corrupt", "entities: string reference out of range")
            new_ents.append(Entity(s(row[0]), *[None if x == 0 else s(x - 1) for x in row[1:]]))
    n_ents = len(st.entities) + len(new_ents)

    arrays = st.copy_arrays()
    n_series = st.n_series
    if _S_SERIES in sections:
        rd = reader(_S_SERIES)
        k = rd.varint("series")
        ids = rd.uints("series ids", k).astype(np.int64)
        nm = _check_refs(rd.uints("series names", k), n_names, "series names")
        ls = _check_refs(rd.uints("series labelsets", k), n_ls, "series labelsets")
        fld = rd.ints("series fields", k)
        knd = rd.uints("series kinds", k).astype(np.int64)
        ent = rd.uints("series entities", k).astype(np.int64) - 1
        done(rd, "series")
        if len(ent) and int(ent.max()) >= n_ents:
            raise CompactFormatError("corrupt", "series entities: reference out of range")
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0):
            raise CompactFormatError("corrupt", "series ids not increasing")
        appended = ids[ids >= n_series]
        if len(appended) and not np.array_equal(appended, np.arange(n_series, n_series + len(appended))):
            raise CompactFormatError("corrupt", "new series ids are not consecutive")
        _check_series_kept(ids, nm, ls, st, sections[_S_SERIES][0])
        n_new = n_series + len(appended)
        for key, fill in (("ser_name", 0), ("ser_ls", 0), ("ser_field", 0), ("ser_kind", 0), ("ser_ent", 0),
                          ("val_code", _NONE), ("val_pay", 0), ("dlt_code", _NONE), ("dlt_pay", 0),
                          ("evt_code", _NONE), ("evt_pay", 0), ("start_prev", _TS_NONE)):
            a = arrays[key]
            if len(a) < n_new:
                a = _grow_to(a, n_new, fill)
            else:
                a = a.copy()
            arrays[key] = a
        arrays["ser_name"][ids] = nm
        arrays["ser_ls"][ids] = ls
        arrays["ser_field"][ids] = fld
        arrays["ser_kind"][ids] = knd
        arrays["ser_ent"][ids] = ent
        n_series = n_new
        _check_series_unique(arrays, n_series, sections[_S_SERIES][0])
    else:
        arrays = {k: v.copy() for k, v in arrays.items()}

    fam_upd: List[Tuple[int, _Family]] = []
    if _S_FAMILIES in sections:
        rd = reader(_S_FAMILIES)
        k = rd.varint("families")
        cols = [rd.uints("families", k).astype(np.int64) for _ in range(4)]
        done(rd, "families")
        _check_refs(cols[0], n_names, "family names")
        _check_refs(cols[1], n_str, "family types")
        _check_refs(cols[2], n_str + 1, "family help")
        _check_refs(cols[3], n_str + 1, "family units")
        for j, t, h, u in zip(*(c.tolist() for c in cols)):
            fam_upd.append((j, (s(t), None if h == 0 else s(h - 1), None if u == 0 else s(u - 1))))

    # -- the batch
    rd = reader(_S_BATCH)
    bts = rd.svarint("batch timestamp")
    n = rd.varint("sample count")
    out_code = rd.byte("output mode")
    tref = rd.varint("target")
    n_stale = rd.varint("stale count")
    done(rd, "batch")
    if out_code > 2:
        raise CompactFormatError("corrupt", f"unknown output mode {out_code}")
    if n > len(raw) or n_stale > len(raw):  # every sample has a value code byte; bounds allocations
        raise CompactFormatError("corrupt", "sample or stale count larger than the payload allows")
    if tref > n_str:
        raise CompactFormatError("corrupt", "target: string reference out of range")
    target = None if tref == 0 else s(tref - 1)
    if _S_ORDER in sections:
        rd = reader(_S_ORDER)
        d = rd.ints("order", n)
        done(rd, "order")
        sids = np.cumsum(d + 1) - 1 if n else _EMPTY_I64
    else:
        if st.last_order is None or len(st.last_order) != n:
            raise CompactFormatError("corrupt", "no series order and none to repeat")
        sids = st.last_order
    if n and (int(sids.min()) < 0 or int(sids.max()) >= n_series):
        raise CompactFormatError("corrupt", "order: series id out of range")
    sids = sids.astype(np.int64)
    last = _last_occurrence(sids)
    nan = np.full(n, np.nan)
    if n:
        if _S_VALUES not in sections:
            raise CompactFormatError("corrupt", "no values section")
        rd = reader(_S_VALUES)
        values, code, pay = _dec_floats(rd, n, sids, arrays["val_code"], arrays["val_pay"], "values")
        done(rd, "values")
        _store(arrays["val_code"], sids, code, last)
        _store(arrays["val_pay"], sids, pay, last)
    else:
        values = np.empty(0, dtype=np.float64)
    if _S_TIMESTAMPS in sections:
        rd = reader(_S_TIMESTAMPS)
        ts = rd.ints("timestamps", n) + bts
        done(rd, "timestamps")
    else:
        ts = np.full(n, bts, dtype=np.int64)
    prev = arrays["start_prev"][sids]
    ref = np.where(prev == _TS_NONE, bts, prev)
    if _S_STARTS in sections:
        rd = reader(_S_STARTS)
        starts = rd.ints("start timestamps", n) + ref
        done(rd, "start timestamps")
    else:
        starts = ref.copy()
    if n:
        _store(arrays["start_prev"], sids, starts, last)
    kinds = arrays["ser_kind"][sids]
    dk = np.flatnonzero((kinds == _K_COUNTER) | (kinds == _K_EVENT))
    deltas = nan.copy()
    resets = np.zeros(n, dtype=bool)
    if len(dk):
        dsids = sids[dk]
        dlast = _last_occurrence(dsids) if last is not None else None
        if _S_DELTAS not in sections:
            raise CompactFormatError("corrupt", "no deltas section")
        rd = reader(_S_DELTAS)
        dv, code, pay = _dec_floats(rd, len(dk), dsids, arrays["dlt_code"], arrays["dlt_pay"], "deltas")
        done(rd, "deltas")
        deltas[dk] = dv
        _store(arrays["dlt_code"], dsids, code, dlast)
        _store(arrays["dlt_pay"], dsids, pay, dlast)
        if _S_RESETS in sections:
            rd = reader(_S_RESETS)
            nb = (len(dk) + 7) // 8
            bits = np.unpackbits(np.frombuffer(rd.take(nb, "resets"), dtype=np.uint8), bitorder="little")[: len(dk)]
            done(rd, "resets")
            resets[dk] = bits.astype(bool)
    event_counts = nan.copy()
    ev = np.flatnonzero(kinds == _K_EVENT)
    if len(ev):
        esids = sids[ev]
        elast = _last_occurrence(esids) if last is not None else None
        if _S_EVENTS not in sections:
            raise CompactFormatError("corrupt", "no event counts section")
        rd = reader(_S_EVENTS)
        evv, code, pay = _dec_floats(rd, len(ev), esids, arrays["evt_code"], arrays["evt_pay"], "event counts")
        done(rd, "event counts")
        event_counts[ev] = evv
        _store(arrays["evt_code"], esids, code, elast)
        _store(arrays["evt_pay"], esids, pay, elast)
    if n_stale:
        if _S_STALE not in sections:
            raise CompactFormatError("corrupt", "no stale section")
        rd = reader(_S_STALE)
        stale = rd.uints("stale", n_stale).astype(np.int64)
        done(rd, "stale")
        if int(stale.max()) >= n_series:
            raise CompactFormatError("corrupt", "stale: series id out of range")
    else:
        stale = _EMPTY_I64

    # -- commit
    if new_strings:
        st.strings.extend(new_strings)
    if new_names:
        st.names.extend(new_names)
        st.name_index.update(new_name_index)
        st._t_names = None
        st._t_families = None
    if new_ls:
        st.labelsets.extend(new_ls)
        st.labelset_index.update(new_ls_index)
        st._t_labelsets = None
    if new_ents:
        st.entities.extend(new_ents)
        st._t_entities = None
    for j, fam in fam_upd:
        st.families[j] = fam
        st._t_families = None
    for key, a in arrays.items():
        setattr(st, key, a)
    st.n_series = n_series
    st.last_order = sids
    if st._t_names is None:
        st._t_names = tuple(st.names)
    if st._t_labelsets is None:
        st._t_labelsets = tuple(st.labelsets)
    if st._t_entities is None:
        st._t_entities = tuple(st.entities)
    if st._t_families is None:
        st._t_families = {st.names[j]: fam for j, fam in sorted(st.families.items())}
    ser_ent = st.ser_ent[sids]
    return DecodedBatch(
        target=target, timestamp_ms=bts, output=_OUTPUTS[out_code],
        names=st._t_names, labelsets=st._t_labelsets, entities=st._t_entities, families=st._t_families,
        name_ids=st.ser_name[sids].astype(np.int32), labelset_ids=st.ser_ls[sids].astype(np.int32),
        field_ids=st.ser_field[sids].astype(np.int32), kinds=kinds.astype(np.int8),
        entity_ids=ser_ent.astype(np.int32), series_ids=sids,
        values=values, deltas=deltas, resets=resets, timestamps=ts, start_timestamps=starts,
        event_counts=event_counts,
        stale_name_ids=st.ser_name[stale].astype(np.int32), stale_labelset_ids=st.ser_ls[stale].astype(np.int32),
        stream_id=stream_id, seq=seq, full=full, duplicate=False,
    )
