"""Encode -> decode is the identity, for every output format, native and pure encoder loops.

Generated batches (what ``Relay.ingest`` gives for a scrape, output ``cumulative``: random
metric names and label sets, values with NaN, ±Inf, -0.0, subnormal and huge floats, label
values with unicode, quotes, backslashes, newlines and NUL, gauges and counters, stale
series) are encoded by one :class:`Encoder` per format over a sequence of batches (its
caches in play) and decoded by an independent reader:

* ``remote-write-1`` / ``remote-write-2``: the protobuf runtime with the official schemas
  (built in tests/test_encode.py from tests/data/proto), after snappy;
* ``prometheus``: our parser, strict; ``openmetrics``: the strict OpenMetrics validator,
  then our parser, strict;
* ``compact``: the reference receiver (``CompactReceiver.receive``).

Each must give back the same series (name and labels), values and timestamps; compact
gives back every column as it was. What a format cannot represent is left out of the
strategy or compared as the format defines it, never papered over:

* a label with an empty value is no label in Prometheus (remote write and text leave it
  out), and label order carries no meaning: those compare as sorted non-empty labels;
* NaN payloads: remote write sends every NaN as Prometheus' normal NaN
  ``0x7ff8000000000001`` (the stale pattern only for stale series), text writes ``NaN``;
  those compare as "a NaN". Compact keeps every bit;
* stale markers exist in remote write and compact only (text has no way to say it);
* HELP text comes back without leading and trailing blanks (our parser trims them);
* text formats rewrite metric and label names outside the Prometheus character set, and
  OpenMetrics prefixes names starting with ``_`` (reserved there) with ``x``: generated
  names are valid and do not start with ``_``, so no two names are written alike;
* OpenMetrics timestamps are decimal seconds read as a float: exact to the millisecond
  within ±2**50 ms (35,000 years), the range generated for it;
* a counter ``x_total`` is OpenMetrics family ``x``, whose sample names ``x_total`` and
  ``x_created`` no other metric may use: names are generated without such clashes (the
  encoder does not yet avoid them: see ``test_openmetrics_counter_family_clash``).
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any, Dict, List, Tuple

import cramjam
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcgmrelay
from dcgmrelay import fields
from dcgmrelay._openmetrics_strict import validate as validate_openmetrics
from dcgmrelay.encode import Encoder
from dcgmrelay.receiver import CompactReceiver

from test_encode import RequestV2, WriteRequest  # the official schemas, built with the protobuf runtime

try:
    from dcgmrelay import _encode as _native  # noqa: F401

    HAVE_NATIVE = True
except ImportError:  # pragma: no cover - a pure build
    HAVE_NATIVE = False

IMPLS = [pytest.param("c", marks=pytest.mark.skipif(not HAVE_NATIVE and os.environ.get("CI") != "true",
                                                    reason="native encoder not built")), "py"]
TEXT_FORMATS = ["prometheus", "openmetrics"]
RW_FORMATS = ["remote-write-1", "remote-write-2"]
STALE_BITS = 0x7FF0000000000002
NORMAL_NAN_BITS = 0x7FF8000000000001
K_GAUGE, K_COUNTER = 0, 1
PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


# ------------------------------------------------------------------------------------------
# Strategies

_DCGM_NAMES = ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
               "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_PROF_PCIE_TX_BYTES", "dcgm_gpu_temp"]
_name = st.one_of(st.sampled_from(_DCGM_NAMES), st.from_regex(r"\A[a-zA-Z:][a-zA-Z0-9_:]{0,12}\Z"),
                  st.from_regex(r"\A[a-z][a-z0-9_]{0,8}_(total|created|count|sum|bucket|info)\Z"))
_label_name = st.one_of(st.sampled_from(["gpu", "UUID", "pod", "err_msg", "Hostname", "le", "quantile"]),
                        st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_]{0,10}\Z"))
_label_value = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["", "\\", '"', "\n", '\\"', "\\n", "a,b=c}", "GPU-ü", "\x00", "\r", "# EOF"]),
)
_labelset = st.lists(st.tuples(_label_name, _label_value), max_size=5,
                     unique_by=lambda kv: kv[0]).map(tuple)
_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10 ** 6, 10 ** 6).map(float),
    st.tuples(st.integers(-10 ** 9, 10 ** 9), st.integers(0, 8)).map(lambda t: t[0] / 10 ** t[1]),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 2.0 ** 53 + 2,
                     1e21, 1e-7, 0.1, math.inf, -math.inf, math.nan]),
    # any bit pattern: NaNs with payloads, the stale pattern among them
    st.integers(0, 2 ** 64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]),
)
_help = st.one_of(st.none(), st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
                  .filter(lambda h: not h.endswith("\r")))
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1
OM_TS_LIMIT = 2 ** 50


class Batch:
    """A RelayBatch as the encoders read it (duck-typed)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __len__(self) -> int:
        return len(self.values)


@st.composite
def batches(draw: Any, *, om_timestamps: bool = False) -> List[Batch]:
    """1-3 batches of one target: a universe of series, each batch a subset of them."""
    names = draw(st.lists(_name, min_size=1, max_size=5, unique=True))
    labelsets = draw(st.lists(_labelset, min_size=1, max_size=4, unique=True))
    kinds = {n: draw(st.sampled_from([K_GAUGE, K_COUNTER])) for n in names}
    families = {n: ("counter" if kinds[n] == K_COUNTER else "gauge", draw(_help), None) for n in names}
    series = [(i, j) for i in range(len(names)) for j in range(len(labelsets))]
    lo, hi = (-OM_TS_LIMIT, OM_TS_LIMIT) if om_timestamps else (_INT64_MIN + 1, _INT64_MAX)
    out = []
    for k in range(draw(st.integers(1, 3))):
        # one sample per Prometheus series (label sets equal once empty values go are one series);
        # stale series are others, gone since the previous scrape
        picked = draw(st.lists(st.sampled_from(series), max_size=10, unique=True))
        used: set = set()
        chosen, stale = [], []
        for s in picked:
            key = (s[0], _canon(labelsets[s[1]]))
            if key not in used:
                used.add(key)
                (stale if len(chosen) >= 8 or draw(st.integers(0, 4)) == 0 else chosen).append(s)
        n = len(chosen)
        t0 = draw(st.integers(lo, hi))
        same_ts = draw(st.booleans())
        ts = [t0] * n if same_ts else draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
        kind = np.array([kinds[names[i]] for i, _ in chosen], dtype=np.int8)
        values = np.array(draw(st.lists(_float, min_size=n, max_size=n)), dtype=np.float64)
        deltas = np.array(draw(st.lists(_float, min_size=n, max_size=n)), dtype=np.float64)
        deltas[kind != K_COUNTER] = np.nan
        resets = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool) & (kind == K_COUNTER)
        starts = np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)
        out.append(Batch(
            target="node-0:9400", timestamp_ms=t0, output="cumulative", names=tuple(names),
            labelsets=tuple(labelsets), name_ids=np.array([i for i, _ in chosen], dtype=np.int32),
            labelset_ids=np.array([j for _, j in chosen], dtype=np.int32),
            field_ids=np.array([fields.id_of(names[i]) for i, _ in chosen], dtype=np.int32), kinds=kind,
            values=values, deltas=deltas, resets=resets, timestamps=np.array(ts, dtype=np.int64),
            start_timestamps=starts, event_counts=np.full(n, np.nan),
            stale_name_ids=np.array([i for i, _ in stale], dtype=np.int32),
            stale_labelset_ids=np.array([j for _, j in stale], dtype=np.int32),
            families=families if k == 0 or draw(st.booleans()) else {},
            entity_ids=np.full(n, -1, dtype=np.int32), entities=()))
    return out


# ------------------------------------------------------------------------------------------
# What a batch holds, and what each format gives back


def _canon(labels: Any) -> Tuple[Tuple[str, str], ...]:
    """A label set as a Prometheus series has it: sorted, without empty values or __name__."""
    return tuple(sorted((k, v) for k, v in labels if v != "" and k != "__name__"))


def expected(b: Batch, *, stale: bool) -> List[tuple]:
    """[(name, labels, value bits or 'nan', timestamp)] sorted; stale markers when the format has them."""
    out = []
    for i in range(len(b)):
        v = float(b.values[i])
        out.append((b.names[b.name_ids[i]], _canon(b.labelsets[b.labelset_ids[i]]),
                    "nan" if v != v else bits(v), int(b.timestamps[i])))
    if stale:
        for n, ls in zip(b.stale_name_ids.tolist(), b.stale_labelset_ids.tolist()):
            out.append((b.names[n], _canon(b.labelsets[ls]), "stale", int(b.timestamp_ms)))
    return sorted(out, key=repr)


def _nan_class(v: float, *, remote_write: bool) -> Any:
    if v == v:
        return bits(v)
    if remote_write:
        b = bits(v)
        assert b in (NORMAL_NAN_BITS, STALE_BITS), f"remote write NaN 0x{b:016x} is neither normal nor stale"
        return "stale" if b == STALE_BITS else "nan"
    return "nan"


def decode_rw1(body: bytes) -> List[tuple]:
    m = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    out = []
    for ts in m.timeseries:
        labels = [(lb.name, lb.value) for lb in ts.labels]
        name = dict(labels)["__name__"]
        for s in ts.samples:
            out.append((name, _canon(labels), _nan_class(s.value, remote_write=True), s.timestamp))
    return sorted(out, key=repr)


def decode_rw2(body: bytes) -> List[tuple]:
    m = RequestV2.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    sym = list(m.symbols)
    out = []
    for ts in m.timeseries:
        refs = list(ts.labels_refs)
        labels = [(sym[refs[i]], sym[refs[i + 1]]) for i in range(0, len(refs), 2)]
        name = dict(labels)["__name__"]
        for s in ts.samples:
            out.append((name, _canon(labels), _nan_class(s.value, remote_write=True), s.timestamp))
    return sorted(out, key=repr)


def decode_text(body: bytes, fmt: str) -> Tuple[List[tuple], dcgmrelay.Scrape]:
    if fmt == "openmetrics":
        validate_openmetrics(body)
    s = dcgmrelay.parse(body, format=fmt, strict=True)
    out = [(name, _canon(labels.items()), _nan_class(v, remote_write=False), ts)
           for name, labels, v, ts in s.samples()]
    return sorted(out, key=repr), s


# ------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", RW_FORMATS)
@PROPS
@given(bs=batches())
def test_remote_write_identity(fmt: str, impl: str, bs: List[Batch]) -> None:
    enc = Encoder(fmt, implementation=impl)
    decode = decode_rw1 if fmt == "remote-write-1" else decode_rw2
    for b in bs:
        body, _ = enc.encode(b)
        assert decode(body) == expected(b, stale=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", TEXT_FORMATS)
@PROPS
@given(data=st.data())
def test_text_identity(fmt: str, impl: str, data: Any) -> None:
    bs = data.draw(batches(om_timestamps=fmt == "openmetrics"))
    enc = Encoder(fmt, implementation=impl)
    families: Dict[str, tuple] = {}
    for b in bs:
        families.update(b.families)
        body, _ = enc.encode(b)
        got, scrape = decode_text(body, fmt)
        assert got == expected(b, stale=False)
        for name in {b.names[i] for i in b.name_ids.tolist()}:
            help_text = families[name][1]
            # OpenMetrics: a counter x_total is family x, found through its sample name
            assert scrape.family_of(name).help == (None if help_text is None else help_text.strip(" \t")), name


@PROPS
@given(bs=batches())
def test_compact_identity_through_the_receiver(bs: List[Batch]) -> None:
    enc = Encoder("compact")
    rx = CompactReceiver()  # not started: receive() is what POST /api/v1/compact runs
    families: Dict[str, tuple] = {}
    for b in bs:
        families.update(b.families)
        body, _ = enc.encode(b)
        d = rx.receive(body)
        assert (d.target, d.timestamp_ms, d.output, len(d)) == (b.target, b.timestamp_ms, b.output, len(b))
        assert [d.names[i] for i in d.name_ids] == [b.names[i] for i in b.name_ids]
        assert [d.labelsets[i] for i in d.labelset_ids] == [b.labelsets[i] for i in b.labelset_ids]
        for col in ("values", "deltas", "event_counts"):
            assert d.__dict__[col].view(np.int64).tolist() == b.__dict__[col].view(np.int64).tolist(), col
        for col in ("field_ids", "kinds", "resets", "timestamps", "start_timestamps", "entity_ids"):
            assert d.__dict__[col].tolist() == b.__dict__[col].tolist(), col
        assert ([(d.names[n], d.labelsets[ls]) for n, ls in zip(d.stale_name_ids, d.stale_labelset_ids)]
                == [(b.names[n], b.labelsets[ls]) for n, ls in zip(b.stale_name_ids, b.stale_labelset_ids)])
        assert {k: d.families[k] for k in families} == families
    assert rx.stats["batches_received"] == len(bs)


def test_property_strategy_reaches_the_hard_values() -> None:
    """The strategy draws what the properties are about (NaN payloads, -0.0, ±Inf, escapes,
    empty label values, stale series) -- a guard that it does not quietly narrow."""
    seen = set()

    # derandomized: a fixed sequence of examples, so the guard cannot fail by the luck of a draw
    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bs=batches())
    def collect(bs: List[Batch]) -> None:
        for b in bs:
            for v in b.values.tolist():
                if v != v:
                    seen.add("stale" if bits(v) == STALE_BITS else "nan" if bits(v) == 0x7FF8000000000000 else
                             "nan-payload")
                elif v in (math.inf, -math.inf):
                    seen.add("inf")
                elif v == 0 and math.copysign(1, v) < 0:
                    seen.add("-0")
            for ls in b.labelsets:
                for _, v in ls:
                    seen.update(c for c in ("\n", "\\", '"', "") if (c in v if c else v == ""))
            if len(b.stale_name_ids):
                seen.add("stale-series")

    collect()
    assert {"nan", "nan-payload", "inf", "-0", "\n", "\\", '"', "", "stale-series"} <= seen, seen


@pytest.mark.parametrize("other", ["x", "x_created", "x_total_total"])
def test_openmetrics_counter_family_clash(other: str) -> None:
    """A scrape with a counter ``x_total`` and a metric ``x_created`` (an OpenMetrics exporter's
    counter relayed as is), ``x`` or ``x_total_total``: the OpenMetrics body must be valid."""
    names = ("x_total", other)
    b = Batch(target="t", timestamp_ms=1_700_000_000_000, output="cumulative", names=names, labelsets=((),),
              name_ids=np.array([0, 1], dtype=np.int32), labelset_ids=np.array([0, 0], dtype=np.int32),
              field_ids=np.array([-1, -1], dtype=np.int32), kinds=np.array([K_COUNTER, K_COUNTER], dtype=np.int8),
              values=np.array([3.0, 1.0]), deltas=np.full(2, np.nan), resets=np.zeros(2, dtype=bool),
              timestamps=np.full(2, 1_700_000_000_000, dtype=np.int64),
              start_timestamps=np.zeros(2, dtype=np.int64), event_counts=np.full(2, np.nan),
              stale_name_ids=np.zeros(0, dtype=np.int32), stale_labelset_ids=np.zeros(0, dtype=np.int32),
              families={n: ("counter", None, None) for n in names}, entity_ids=np.full(2, -1, dtype=np.int32),
              entities=())
    body, _ = Encoder("openmetrics").encode(b)
    got, _ = decode_text(body, "openmetrics")
    assert got == expected(b, stale=False)
