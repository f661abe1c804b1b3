"""The relay step: allow-list, typing and per-series deltas on the columnar :class:`Scrape`.

    >>> from dcgmrelay import parse
    >>> from dcgmrelay.csvspec import load_csv
    >>> from dcgmrelay.relay import Relay
    >>> relay = Relay(load_csv("default"), first_observation="drop", output="both")
    >>> batch = relay.ingest(parse(body), target="node-0:9400", timestamp_ms=now_ms)
    >>> batch.values, batch.deltas, batch.resets, batch.stale_name_ids

Everything per sample is numpy on the scrape's columns; Python-level work is per
*distinct* metric name and per *distinct* label set (a dict lookup each, or a tuple
comparison while the label-set table is the previous scrape's), never per sample. The
exceptions are label-type fields that arrive as samples (see below), a loop over those
samples only (dcgm-exporter never sends them as samples), and stale series, a loop over
the names and label sets that went away.

How (for reviewers): per target, names and label sets get ids (dict lookups), a dense
table maps (name id, label-set id) to a row of the per-series state arrays, so one numpy
gather finds every sample's state and new series are appended. After a change of the
scrape's *shape* (its names, label sets and id columns) the rows are put in sample
order; while the shape stays the same (the steady state) the allow-list, kinds and row
positions are reused and the state is read and written with slices.

Allow-list (issue item 2)
    A sample is kept when its DCGM field id is a metric row of the spec (the spec's
    ``kind_array``/``mask`` tables, evaluated once per distinct metric name and spread
    over the samples with one gather, before any label set is touched). Samples of DCGM
    fields the spec does not list are dropped
    (``stats.dropped_not_in_spec``); samples of non-DCGM names (``go_*``, ``up`` ...)
    pass only with ``include_non_dcgm=True`` (else ``stats.dropped_non_dcgm``).

Label-type fields (item 3)
    dcgm-exporter renders the spec's ``label`` rows as labels of every sample of the
    entity (``DCGM_FI_DRIVER_VERSION="550.127.05"``): those pass untouched, they are part
    of the label set. When a label field arrives as a *sample* instead (another
    renderer, or a string field's number), it is not emitted: it becomes an attribute of
    its entity (name = the metric name; value = the label of the same name on that
    sample if it has one, else the number, integral values without a fraction), counted
    in ``stats.label_samples``. Attributes are kept per target and entity (a GPU's
    attributes also apply to its MIG instances) until that entity sends new ones, and are
    appended to the output label set of every sample of the entity, unless the label set
    already has a label of that name. They are not persisted. Label samples about no
    entity are dropped. Series identity (for deltas) is the *input* label set, so an
    attribute that changes does not restart a counter.

Kinds (item 4)
    Per field id from the spec (:mod:`dcgmrelay.kinds`), with ``kind_overrides``
    (field name or id -> kind; a non-DCGM metric name may be overridden too) applied
    on top. Non-DCGM names: COUNTER when their ``# TYPE`` is ``counter``, else GAUGE.

Deltas (item 5). A series is (target, metric name, full input label set). Per sample:

=================  ==========================  ============================  =========================
situation          COUNTER                     EVENT (XID, SXID)             GAUGE, RATE
=================  ==========================  ============================  =========================
first observation  policy: drop -> NaN (and    no event; delta NaN (drop)    delta NaN
                   the sample leaves a         or 0 (zero, full); event
                   ``output="delta"`` batch),  count 0
                   zero -> 0, full -> value;
                   start = its timestamp
steady             value - previous            1 if the value changed to a   delta NaN
                                               non-zero value, else 0
value went down    reset: delta = value,       (a change to 0 is no event)   delta NaN, no reset
                   ``resets`` True,
                   start = its timestamp
identical scrape   0                           0                             delta NaN
disappears         listed in ``stale_*``; state kept ``evict_after_ms`` (since last seen), then dropped
comes back         delta since the last value seen (a decrease is a reset), no first-observation
relay restart      with ``state_path``: as "steady"/"reset" against the last scrape before the
                   restart; without: first observation
=================  ==========================  ============================  =========================

    ``values`` is always the scraped value (for EVENT: the current XID number);
    ``event_counts`` carries, for EVENT samples, the number of events since the series'
    start (persisted). An XID sample of dcgm-exporter >= 3.3.6 carries the code again in
    ``err_code``/``err_msg``, so its label set changes with every new XID: the delta
    state of an EVENT sample is keyed by the label set *without* ``event_value_labels``
    (default those two), while staleness still uses the full label set (the old
    ``err_code`` series goes stale). A repeat of the same XID (same value) cannot be seen.
    NaN sample values give a NaN delta and leave the state alone. A series repeated in
    one body (invalid exposition): every copy deltas against the same previous value;
    which copy the state keeps is unspecified.

Start timestamps
    Per series: the timestamp of its first observation, or of the scrape that saw the
    counter reset (for remote write 2.0's ``Sample.start_timestamp``; for a COUNTER
    ``start_timestamps == timestamps`` on those samples, a transport may subtract 1 ms).

Output mode
    ``deltas`` and ``resets`` are computed in every mode. ``output`` decides what a
    transport ships (``batch.output``), the types in ``batch.families`` and, for
    ``"delta"`` only, drops COUNTER/EVENT samples without a delta (first observation
    under the ``"drop"`` policy; ``stats.dropped_first_observation``).

    =========  ==================  =======================  ==================
    kind       cumulative          delta                    both
    =========  ==================  =======================  ==================
    COUNTER    counter (values)    gauge (deltas)           counter (values)
    EVENT      gauge (XID value)   gauge (new events)       gauge (XID value)
    GAUGE      gauge               gauge                    gauge
    RATE       gauge               gauge                    gauge
    non-DCGM   its ``# TYPE``      gauge for counters,      its ``# TYPE``
                                   else its ``# TYPE``
    =========  ==================  =======================  ==================

Staleness and eviction
    Series of a target present in its previous ingest but not in this one are listed in
    ``batch.stale_name_ids``/``stale_labelset_ids`` (indices into the batch tables) for
    Prometheus stale markers at ``batch.timestamp_ms``; :meth:`Relay.target_down` lists
    all of them. The state of a series not seen for ``evict_after_ms`` is dropped
    (``stats.evicted_series``), a whole target's when it has not been ingested for that
    long, and the per-target string tables are compacted, so memory stays bounded.

Persistence
    With ``state_path`` the delta state (per target: the name and label-set strings and
    the per-series arrays) is written atomically (temp file in the same directory,
    fsync, ``os.replace``) as an ``.npz`` with a format version, after each ingest (or at
    most every ``save_every_s`` seconds; :meth:`Relay.save` forces it), and read back by
    a new :class:`Relay`. An unreadable file logs a warning (logger ``dcgmrelay.relay``)
    and the relay starts empty.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import math
import operator
import os
import tempfile
import time
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Literal, Mapping, Optional, Sequence,
                    Tuple, TypeVar, Union)

import numpy as np
import numpy.typing as npt

from . import fields as _fields
from ._ids import same_ids
from .csvspec import MetricSpec, load_csv
from .kinds import Kind
from .scrape import TS_ABSENT, Entity, Scrape

__all__ = ["STATE_VERSION", "Relay", "RelayBatch", "RelayStats"]

logger = logging.getLogger("dcgmrelay.relay")

#: Version of the state file format; a file of another version is ignored (with a warning).
STATE_VERSION = 1

FirstObservation = Literal["drop", "zero", "full"]
OutputMode = Literal["cumulative", "delta", "both"]
LabelSet = Tuple[Tuple[str, str], ...]
KindLike = Union[Kind, str, int]

_NO_TS = np.iinfo(np.int64).min  # "never observed" in the per-series prev_ts
_LOW32 = np.int64(0xFFFFFFFF)
_EMPTY_I64 = np.empty(0, dtype=np.int64)

# Per-name classification codes.
_DROP_NOT_IN_SPEC, _DROP_NON_DCGM, _LABEL_SAMPLE, _KEEP = 0, 1, 2, 3

_KIND_NAMES = tuple(k.name.lower() for k in Kind)
_K_COUNTER, _K_EVENT = int(Kind.COUNTER), int(Kind.EVENT)


# ------------------------------------------------------------------------------------------
# Stats


@dataclasses.dataclass
class RelayStats:
    """What the relay kept, dropped and why. ``Relay.stats`` sums every batch's ``stats``."""

    #: Samples in the scrapes.
    samples_in: int = 0
    #: Samples in the batches.
    kept: int = 0
    #: DCGM fields that are not a metric row of the spec.
    dropped_not_in_spec: int = 0
    #: Non-DCGM names (``include_non_dcgm=False``).
    dropped_non_dcgm: int = 0
    #: COUNTER/EVENT first observations left out of an ``output="delta"`` batch.
    dropped_first_observation: int = 0
    #: Label-type fields that arrived as samples and became entity attributes.
    label_samples: int = 0
    #: Series seen for the first time (or again after eviction).
    new_series: int = 0
    #: Counter decreases (delta = the new value).
    resets: int = 0
    #: EVENT changes to a non-zero value.
    events: int = 0
    #: Series reported for stale markers.
    stale_series: int = 0
    #: Series whose state was dropped after ``evict_after_ms``.
    evicted_series: int = 0

    def add(self, other: "RelayStats") -> None:
        """Add ``other``'s counts to these."""
        self.samples_in += other.samples_in
        self.kept += other.kept
        self.dropped_not_in_spec += other.dropped_not_in_spec
        self.dropped_non_dcgm += other.dropped_non_dcgm
        self.dropped_first_observation += other.dropped_first_observation
        self.label_samples += other.label_samples
        self.new_series += other.new_series
        self.resets += other.resets
        self.events += other.events
        self.stale_series += other.stale_series
        self.evicted_series += other.evicted_series

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# The batch


class RelayBatch:
    """One relayed scrape: numpy columns aligned per output sample, plus tables.

    Columns (length ``len(batch)``): ``name_ids`` int32 -> ``names``, ``labelset_ids``
    int32 -> ``labelsets`` (the full output label set, entity attributes attached, no
    ``__name__``), ``field_ids`` int32 (-1: not DCGM), ``kinds`` int8 (:class:`Kind`),
    ``values`` float64, ``deltas`` float64 (NaN: no delta), ``resets`` bool,
    ``timestamps`` int64 (the sample's own or the scrape's), ``start_timestamps`` int64,
    ``event_counts`` float64 (EVENT samples: events since start; NaN elsewhere),
    ``entity_ids`` int32 -> ``entities`` (computed on first access).

    The tables may hold entries no sample uses (dropped samples, stale series).
    ``stale_name_ids``/``stale_labelset_ids`` (int32) are the series to end with a stale
    marker at ``timestamp_ms``. ``families``: name -> (output type, help, unit).
    """

    def __init__(
        self,
        *,
        target: str,
        timestamp_ms: int,
        output: str,
        names: Tuple[str, ...],
        labelsets: Tuple[LabelSet, ...],
        name_ids: npt.NDArray[np.int32],
        labelset_ids: npt.NDArray[np.int32],
        field_ids: npt.NDArray[np.int32],
        kinds: npt.NDArray[np.int8],
        values: npt.NDArray[np.float64],
        deltas: npt.NDArray[np.float64],
        resets: npt.NDArray[np.bool_],
        timestamps: npt.NDArray[np.int64],
        start_timestamps: npt.NDArray[np.int64],
        event_counts: npt.NDArray[np.float64],
        stale_name_ids: npt.NDArray[np.int32],
        stale_labelset_ids: npt.NDArray[np.int32],
        stats: RelayStats,
        families: Callable[[], Dict[str, Tuple[str, Optional[str], Optional[str]]]],
        entities: Callable[[], Tuple[npt.NDArray[np.int32], Tuple[Entity, ...]]],
    ) -> None:
        self.target = target
        self.timestamp_ms = int(timestamp_ms)
        self.output = output
        self.names = names
        self.labelsets = labelsets
        self.name_ids = name_ids
        self.labelset_ids = labelset_ids
        self.field_ids = field_ids
        self.kinds = kinds
        self.values = values
        self.deltas = deltas
        self.resets = resets
        self.timestamps = timestamps
        self.start_timestamps = start_timestamps
        self.event_counts = event_counts
        self.stale_name_ids = stale_name_ids
        self.stale_labelset_ids = stale_labelset_ids
        self.stats = stats
        self._families_fn = families
        self._families: Optional[Dict[str, Tuple[str, Optional[str], Optional[str]]]] = None
        self._entities_fn = entities
        self._entity_tables: Optional[Tuple[npt.NDArray[np.int32], Tuple[Entity, ...]]] = None
        self._series_labels: Dict[int, Tuple[List[Tuple[str, str]], int]] = {}

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return (f"<RelayBatch {self.target} t={self.timestamp_ms} samples={len(self)} "
                f"stale={len(self.stale_name_ids)} output={self.output}>")

    @property
    def families(self) -> Dict[str, Tuple[str, Optional[str], Optional[str]]]:
        """Metric name -> (output Prometheus type, help, unit); see the module docstring."""
        if self._families is None:
            self._families = self._families_fn()
        return self._families

    def _entities(self) -> Tuple[npt.NDArray[np.int32], Tuple[Entity, ...]]:
        if self._entity_tables is None:
            self._entity_tables = self._entities_fn()
        return self._entity_tables

    @property
    def entity_ids(self) -> npt.NDArray[np.int32]:
        """int32 per sample: index into :attr:`entities`, -1 for samples about no device."""
        return self._entities()[0]

    @property
    def entities(self) -> Tuple[Entity, ...]:
        return self._entities()[1]

    def labels(self, i: int) -> Dict[str, str]:
        """The output labels of sample ``i`` (without ``__name__``)."""
        return dict(self.labelsets[self.labelset_ids[i]])

    def series_labels(self, i: int) -> List[Tuple[str, str]]:
        """Labels of sample ``i`` with ``("__name__", name)``, sorted by label name (code
        point order, as remote write wants them). The sorted label set is cached per label
        set; the list returned is new."""
        lid = int(self.labelset_ids[i])
        cached = self._series_labels.get(lid)
        if cached is None:
            ordered = sorted(self.labelsets[lid])
            at = bisect.bisect_left([k for k, _ in ordered], "__name__")
            cached = self._series_labels[lid] = (ordered, at)
        ordered, at = cached
        return [*ordered[:at], ("__name__", self.names[self.name_ids[i]]), *ordered[at:]]

    def samples(self) -> Iterator[Tuple[str, Dict[str, str], float, str, Optional[float], int]]:
        """``(name, labels, value, kind name, delta or None, timestamp_ms)`` per sample, for
        inspection and tests."""
        names, labelsets = self.names, self.labelsets
        for nid, lid, v, k, d, ts in zip(self.name_ids.tolist(), self.labelset_ids.tolist(),
                                         self.values.tolist(), self.kinds.tolist(),
                                         self.deltas.tolist(), self.timestamps.tolist()):
            yield names[nid], dict(labelsets[lid]), v, _KIND_NAMES[k], (None if d != d else d), ts

    def stale_series(self) -> Iterator[Tuple[str, Dict[str, str]]]:
        """``(name, labels)`` of every series to end with a stale marker."""
        for nid, lid in zip(self.stale_name_ids.tolist(), self.stale_labelset_ids.tolist()):
            yield self.names[nid], dict(self.labelsets[lid])


# ------------------------------------------------------------------------------------------
# Per-target state


class _Target:
    """Delta state of one target.

    Names and label sets get per-target ids (pids: indices into ``names``/``labelsets``).
    A series is a row of the per-series arrays; ``rows2d`` (flat, ``name_pid * cap_l +
    labelset_pid``) maps a series to its row, so looking up every sample of a scrape is
    one numpy gather, and new series are appended. ``live2d`` (same cells, keyed by the
    *full* label set) marks the series present in the last ingest, for staleness. After a
    change of shape the rows are reordered so that rows ``[:n_live]`` are the series of
    the last ingest in sample order; every later ingest of the same shape then reads and
    writes the state with slices.
    """

    def __init__(self) -> None:
        self.names: List[str] = []
        self.name_pid: Dict[str, int] = {}
        self.labelsets: List[LabelSet] = []
        self.ls_pid: Dict[LabelSet, int] = {}
        self.out_ls: Dict[int, LabelSet] = {}  # labelset pid -> last output label set (attrs)
        self.entity_attrs: Dict[Tuple[Any, ...], Dict[str, str]] = {}
        self.tables_version = 0
        self._json_cache: Optional[Tuple[int, bytes]] = None
        # last classification: (options version, names, families metadata, codes, kinds)
        self.classified: Optional[Tuple[int, Tuple[str, ...], Any, np.ndarray, np.ndarray]] = None
        # last scrape's label-set table and its pids (reused while the table is unchanged)
        self.last_tables: Optional[Tuple[Tuple[LabelSet, ...], np.ndarray]] = None
        # dense cell tables
        self.cap_n = 0
        self.cap_l = 0
        self.rows2d = np.empty(0, dtype=np.int64)  # cell -> row, -1: no series
        self.live2d = np.empty(0, dtype=np.bool_)  # cell present in the last ingest
        self.strip_lut = np.empty(0, dtype=np.int64)  # labelset pid -> pid without event labels
        # per-series rows
        self.keys = _EMPTY_I64  # name_pid << 32 | labelset_pid
        self.prev = np.empty(0, dtype=np.float64)  # last non-NaN value
        self.prev_ts = _EMPTY_I64  # its timestamp; _NO_TS: never observed
        self.start = _EMPTY_I64  # first observation or last reset
        self.events = np.empty(0, dtype=np.float64)  # EVENT: changes since start
        self.last_seen = _EMPTY_I64  # ingest time (ms) the series was last present
        self.n_live = 0  # rows[:n_live]: the series of the last ingest
        self.last_ingest_ms: int = 0
        # the shape of the last ingest (fast path), None after any layout change
        self.structure: Optional[_Structure] = None
        # (what the batch families were made from, the exporter's metadata, the result):
        # an unchanged scrape reuses the same dict, which the encoders then skip at once
        self.families_cache: Optional[Tuple[Any, Any, Dict[str, Tuple[str, Optional[str], Optional[str]]]]] = None

    def __len__(self) -> int:
        return len(self.keys)

    # -- string tables ----------------------------------------------------------------------
    def name_pids(self, names: Sequence[str]) -> np.ndarray:
        get = self.name_pid.get
        out = np.empty(len(names), dtype=np.int64)
        for i, n in enumerate(names):
            pid = get(n)
            if pid is None:
                pid = self.name_pid[n] = len(self.names)
                self.names.append(n)
                self.tables_version += 1
            out[i] = pid
        return out

    def labelset_pid(self, ls: LabelSet) -> int:
        pid = self.ls_pid.get(ls)
        if pid is None:
            pid = self.ls_pid[ls] = len(self.labelsets)
            self.labelsets.append(ls)
            self.tables_version += 1
        return pid

    def labelset_pids(self, labelsets: Tuple[LabelSet, ...]) -> np.ndarray:
        """Pids of a scrape's label sets: one dict lookup per label set, or, when the table
        has the length of the previous one, one tuple comparison per label set and lookups
        for those that differ."""
        last = self.last_tables
        if last is not None and len(last[0]) == len(labelsets):
            if last[0] is labelsets or last[0] == labelsets:
                return last[1]
            same = np.fromiter(map(operator.eq, labelsets, last[0]), dtype=np.bool_, count=len(labelsets))
            if same.all():
                out = last[1]
            else:
                out = last[1].copy()
                for i in np.flatnonzero(~same).tolist():
                    out[i] = self.labelset_pid(labelsets[i])
        else:
            ids = list(map(self.ls_pid.get, labelsets))
            try:
                out = np.array(ids, dtype=np.int64)
            except TypeError:  # a None: a label set this target has not seen
                out = np.array([self.labelset_pid(ls) if pid is None else pid
                                for pid, ls in zip(ids, labelsets)], dtype=np.int64)
        self.last_tables = (labelsets, out)
        return out

    def stripped(self, pl: npt.NDArray[np.int64], strip: FrozenSet[str]) -> npt.NDArray[np.int64]:
        """Pids of the label sets ``pl`` without the labels ``strip`` (per new label set)."""
        self.ensure_capacity()
        lut = self.strip_lut
        unknown = lut[pl] < 0
        if unknown.any():
            for pid in np.unique(pl[unknown]).tolist():
                ls = self.labelsets[pid]
                kept = tuple(p for p in ls if p[0] not in strip)
                lut[pid] = pid if len(kept) == len(ls) else self.labelset_pid(kept)
            self.ensure_capacity()
            lut = self.strip_lut
        return lut[pl]

    # -- cells ------------------------------------------------------------------------------
    def ensure_capacity(self) -> None:
        """Grow the cell tables to hold every name and label set pid (doubling)."""
        if len(self.names) <= self.cap_n and len(self.labelsets) <= self.cap_l:
            return
        cap_n = max(self.cap_n, 8)
        while cap_n < len(self.names):
            cap_n *= 2
        cap_l = max(self.cap_l, 64)
        while cap_l < len(self.labelsets):
            cap_l *= 2
        self._rebuild(cap_n, cap_l, self.live_keys())
        lut = np.full(cap_l, -1, dtype=np.int64)
        lut[: len(self.strip_lut)] = self.strip_lut
        self.strip_lut = lut

    def _rebuild(self, cap_n: int, cap_l: int, live_keys: np.ndarray) -> None:
        self.cap_n, self.cap_l = cap_n, cap_l
        self.rows2d = np.full(cap_n * cap_l, -1, dtype=np.int64)
        self.rows2d[self.cells(self.keys)] = np.arange(len(self.keys))
        self.live2d = np.zeros(cap_n * cap_l, dtype=np.bool_)
        self.live2d[self.cells(live_keys)] = True

    def cells(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        out: npt.NDArray[np.int64] = (keys >> 32) * self.cap_l + (keys & _LOW32)
        return out

    def live_keys(self) -> npt.NDArray[np.int64]:
        """Keys (full label set) of the series present in the last ingest, ascending."""
        if not self.cap_l:
            return _EMPTY_I64
        return self.cell_keys(np.flatnonzero(self.live2d))

    def cell_keys(self, cells: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return (cells // self.cap_l) << 32 | (cells % self.cap_l)

    # -- series -----------------------------------------------------------------------------
    def add_series(self, keys: np.ndarray) -> None:
        """Append rows for new series (never observed)."""
        n = len(keys)
        base = len(self.keys)
        self.keys = np.concatenate([self.keys, keys])
        self.prev = np.concatenate([self.prev, np.full(n, np.nan)])
        self.prev_ts = np.concatenate([self.prev_ts, np.full(n, _NO_TS, dtype=np.int64)])
        self.start = np.concatenate([self.start, np.full(n, _NO_TS, dtype=np.int64)])
        self.events = np.concatenate([self.events, np.zeros(n)])
        self.last_seen = np.concatenate([self.last_seen, np.full(n, _NO_TS, dtype=np.int64)])
        self.rows2d[self.cells(keys)] = np.arange(base, base + n)

    def reorder(self, perm: np.ndarray) -> None:
        """Rows ``perm`` become rows ``0..len(perm)-1`` (``perm``: every row once)."""
        for name in ("keys", "prev", "prev_ts", "start", "events", "last_seen"):
            setattr(self, name, getattr(self, name)[perm])
        self.rows2d[self.cells(self.keys)] = np.arange(len(self.keys))
        self.structure = None

    def evict(self, cutoff: int) -> int:
        """Drop rows not seen since ``cutoff`` (only rows past ``n_live`` can be)."""
        tail = self.last_seen[self.n_live:]
        gone = tail < cutoff
        if not gone.any():
            return 0
        n_gone = int(np.count_nonzero(gone))
        self.rows2d[self.cells(self.keys[self.n_live:][gone])] = -1
        keep = np.ones(len(self.keys), dtype=np.bool_)
        keep[self.n_live:] = ~gone
        for name in ("keys", "prev", "prev_ts", "start", "events", "last_seen"):
            setattr(self, name, getattr(self, name)[keep])
        self.rows2d[self.cells(self.keys[self.n_live:])] = np.arange(self.n_live, len(self.keys))
        if len(self.labelsets) > 2 * len(self.keys) + 64 or not len(self.keys):
            self.compact()
        return n_gone

    def compact(self) -> None:
        """Drop strings no series refers to and renumber the rest."""
        live = self.live_keys()
        refs = np.concatenate([self.keys, live])
        used_n = np.unique(refs >> 32)
        used_l = np.unique(refs & _LOW32)
        if len(used_n) == len(self.names) and len(used_l) == len(self.labelsets):
            return
        map_n = np.full(len(self.names), -1, dtype=np.int64)
        map_n[used_n] = np.arange(len(used_n))
        map_l = np.full(len(self.labelsets), -1, dtype=np.int64)
        map_l[used_l] = np.arange(len(used_l))
        self.names = [self.names[i] for i in used_n.tolist()]
        self.name_pid = {n: i for i, n in enumerate(self.names)}
        self.labelsets = [self.labelsets[i] for i in used_l.tolist()]
        self.ls_pid = {ls: i for i, ls in enumerate(self.labelsets)}
        self.out_ls = {int(map_l[p]): ls for p, ls in self.out_ls.items() if map_l[p] >= 0}
        self.keys = map_n[self.keys >> 32] << 32 | map_l[self.keys & _LOW32]
        live = map_n[live >> 32] << 32 | map_l[live & _LOW32]
        self.cap_n = self.cap_l = 0
        self.strip_lut = np.empty(0, dtype=np.int64)
        self.tables_version += 1
        self.structure = None
        self.last_tables = None
        cap_n, cap_l = 8, 64
        while cap_n < len(self.names):
            cap_n *= 2
        while cap_l < len(self.labelsets):
            cap_l *= 2
        self._rebuild(cap_n, cap_l, live)
        self.strip_lut = np.full(cap_l, -1, dtype=np.int64)

    # -- persistence ------------------------------------------------------------------------
    def strings_json(self) -> bytes:
        cached = self._json_cache
        if cached is not None and cached[0] == self.tables_version:
            return cached[1]
        data = json.dumps({
            "names": self.names,
            "labelsets": self.labelsets,
            "out": [[p, ls] for p, ls in self.out_ls.items()],
        }, separators=(",", ":")).encode()
        self._json_cache = (self.tables_version, data)
        return data


_A = TypeVar("_A", bound="npt.NDArray[Any]")


def _readonly(a: _A) -> _A:
    v: _A = a.view()
    v.flags.writeable = False
    return v


class _Structure:
    """What an ingest derives from a scrape's *shape* (names, label sets, the per-sample
    id columns), reused as is by the next ingest of a target with the same shape."""

    __slots__ = ("names", "labelsets", "name_ids_in", "labelset_ids_in", "codes", "name_kinds",
                 "pname", "plabel", "keep", "label_idx", "counts", "name_ids", "labelset_ids",
                 "field_ids", "kinds", "is_ctr", "not_delta", "any_ctr", "any_delta", "ev_idx",
                 "ev_rows", "pos", "rows")

    # the scrape's shape, as it was when built
    names: Tuple[str, ...]
    labelsets: Tuple[LabelSet, ...]
    name_ids_in: npt.NDArray[np.int32]
    labelset_ids_in: npt.NDArray[np.int32]
    codes: npt.NDArray[np.int8]  # per name: _DROP_NOT_IN_SPEC ... _KEEP
    name_kinds: npt.NDArray[np.int8]
    pname: npt.NDArray[np.int64]
    plabel: npt.NDArray[np.int64]
    # the kept samples: their indices (None: all), label samples, drop counts
    keep: Optional[npt.NDArray[np.intp]]
    label_idx: npt.NDArray[np.intp]
    counts: Tuple[int, int, int]  # not in spec, non-DCGM, label samples
    # per kept sample (read-only, shared by every batch of this shape)
    name_ids: npt.NDArray[np.int32]
    labelset_ids: npt.NDArray[np.int32]
    field_ids: npt.NDArray[np.int32]
    kinds: npt.NDArray[np.int8]
    is_ctr: npt.NDArray[np.bool_]
    not_delta: npt.NDArray[np.bool_]
    any_ctr: bool
    any_delta: bool
    ev_idx: npt.NDArray[np.intp]
    ev_rows: npt.NDArray[np.int64]
    # state rows of the kept samples: a slice while they are rows 0..n-1 in sample order
    pos: Union[npt.NDArray[np.int64], slice]
    rows: npt.NDArray[np.int64]

    def matches(self, scrape: Scrape, codes: np.ndarray, name_kinds: np.ndarray, pname: np.ndarray,
                plabel: np.ndarray) -> bool:
        return (same_ids(codes, self.codes) and same_ids(name_kinds, self.name_kinds)
                and same_ids(pname, self.pname)
                and (plabel is self.plabel or same_ids(plabel, self.plabel))
                and same_ids(scrape.name_ids, self.name_ids_in)
                and same_ids(scrape.labelset_ids, self.labelset_ids_in))


# ------------------------------------------------------------------------------------------
# The relay


def _format_attr(v: float) -> str:
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


class Relay:
    """Allow-list, typing and deltas for scrapes of many targets. See the module docstring.

    ``spec`` is a :class:`~dcgmrelay.csvspec.MetricSpec` (or anything :func:`load_csv`
    takes, e.g. ``"default"``). Not thread-safe: one ``ingest`` at a time.
    """

    def __init__(
        self,
        spec: Union[MetricSpec, str, "os.PathLike[str]"],
        *,
        state_path: Union[str, "os.PathLike[str]", None] = None,
        include_non_dcgm: bool = False,
        first_observation: FirstObservation = "drop",
        output: OutputMode = "cumulative",
        evict_after_ms: int = 3_600_000,
        kind_overrides: Optional[Mapping[Union[str, int], KindLike]] = None,
        save_every_s: float = 0.0,
        event_value_labels: Sequence[str] = ("err_code", "err_msg"),
        passthrough_names: Iterable[str] = (),
    ) -> None:
        """``passthrough_names``: non-DCGM metric names kept even when ``include_non_dcgm`` is
        False (the relay process's own per-target health series: ``up``, ``scrape_*``)."""
        if not isinstance(spec, MetricSpec):
            spec = load_csv(spec)
        if first_observation not in ("drop", "zero", "full"):
            raise ValueError(f"first_observation must be 'drop', 'zero' or 'full', not {first_observation!r}")
        if output not in ("cumulative", "delta", "both"):
            raise ValueError(f"output must be 'cumulative', 'delta' or 'both', not {output!r}")
        if evict_after_ms <= 0:
            raise ValueError("evict_after_ms must be > 0")
        if save_every_s < 0:
            raise ValueError("save_every_s must be >= 0")
        self.spec = spec
        self._last_target_scan_ms = -(2**62)
        self.include_non_dcgm = bool(include_non_dcgm)
        self.first_observation = first_observation
        self.output = output
        self.evict_after_ms = int(evict_after_ms)
        self.save_every_s = float(save_every_s)
        self.event_value_labels = frozenset(event_value_labels)
        self.passthrough_names = frozenset(passthrough_names)
        self.state_path = None if state_path is None else os.fspath(state_path)
        self._field_overrides, self._name_overrides = self._resolve_overrides(kind_overrides or {})
        self._name_class: Dict[str, Tuple[int, int]] = {}  # DCGM names only
        #: bumped by reconfigure(): per-target caches made under other options are stale
        self._options_version = 0
        self._targets: Dict[str, _Target] = {}
        self._last_save = -math.inf
        self.stats = RelayStats()
        if self.state_path is not None:
            self._load()

    # -- configuration ----------------------------------------------------------------------
    def reconfigure(
        self,
        *,
        spec: Union[MetricSpec, str, "os.PathLike[str]", None] = None,
        include_non_dcgm: Optional[bool] = None,
        first_observation: Optional[FirstObservation] = None,
        output: Optional[OutputMode] = None,
        evict_after_ms: Optional[int] = None,
        kind_overrides: Optional[Mapping[Union[str, int], KindLike]] = None,
    ) -> None:
        """Change options in place (a config reload): the per-series delta state is kept, so
        counters continue without a gap; only the per-name classification is recomputed."""
        if spec is not None:
            self.spec = spec if isinstance(spec, MetricSpec) else load_csv(spec)
        if include_non_dcgm is not None:
            self.include_non_dcgm = bool(include_non_dcgm)
        if first_observation is not None:
            if first_observation not in ("drop", "zero", "full"):
                raise ValueError(f"first_observation must be 'drop', 'zero' or 'full', not {first_observation!r}")
            self.first_observation = first_observation
        if output is not None:
            if output not in ("cumulative", "delta", "both"):
                raise ValueError(f"output must be 'cumulative', 'delta' or 'both', not {output!r}")
            self.output = output
        if evict_after_ms is not None:
            if evict_after_ms <= 0:
                raise ValueError("evict_after_ms must be > 0")
            self.evict_after_ms = int(evict_after_ms)
        if kind_overrides is not None:
            self._field_overrides, self._name_overrides = self._resolve_overrides(kind_overrides)
        self._name_class.clear()
        self._options_version += 1

    def _resolve_overrides(self, overrides: Mapping[Union[str, int], KindLike]) -> Tuple[Dict[int, int], Dict[str, int]]:
        by_field: Dict[int, int] = {}
        by_name: Dict[str, int] = {}
        label_ids = set(self.spec.label_field_ids.tolist())
        for key, value in overrides.items():
            kind = Kind.parse(value)
            if kind is Kind.LABEL:
                raise ValueError(f"kind_overrides[{key!r}]: LABEL comes from the CSV type column, not an override")
            if isinstance(key, str):
                f = _fields.get(key)
                if f is None:
                    if key in self.spec:  # a tolerated name (synthetic id)
                        by_field[self.spec.row(key).field_id] = int(kind)
                    else:
                        by_name[key] = int(kind)  # a non-DCGM metric name
                    continue
                fid = f.id
            elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
                fid = int(key)
            else:
                raise TypeError(f"kind_overrides keys are field names or ids, not {type(key).__name__}")
            if fid in label_ids:
                raise ValueError(f"kind_overrides[{key!r}]: field {fid} is a 'label' row of the spec")
            by_field[fid] = int(kind)
        return by_field, by_name

    def _classify_dcgm(self, name: str, fid: int) -> Tuple[int, int]:
        """(code, kind) of a DCGM metric name; cached per name."""
        cached = self._name_class.get(name)
        if cached is None:
            k = int(self.spec.kind_array(np.array([fid]))[0])
            if k < 0:
                cached = (_DROP_NOT_IN_SPEC, int(Kind.GAUGE))
            elif k == int(Kind.LABEL):
                cached = (_LABEL_SAMPLE, k)
            else:
                cached = (_KEEP, self._field_overrides.get(fid, k))
            self._name_class[name] = cached
        return cached

    def _classify(self, scrape: Scrape) -> Tuple[np.ndarray, np.ndarray]:
        """Per distinct name: classification code and kind (int8 arrays)."""
        names = scrape.names
        codes = np.empty(len(names), dtype=np.int8)
        kinds = np.empty(len(names), dtype=np.int8)
        fids = scrape.name_field_ids.tolist()
        for i, (name, fid) in enumerate(zip(names, fids)):
            if fid >= 0:
                codes[i], kinds[i] = self._classify_dcgm(name, fid)
            elif not self.include_non_dcgm and name not in self.passthrough_names:
                codes[i], kinds[i] = _DROP_NON_DCGM, int(Kind.GAUGE)
            else:
                codes[i] = _KEEP
                k = self._name_overrides.get(name)
                if k is None:
                    k = int(Kind.COUNTER) if scrape.family_of(name).type == "counter" else int(Kind.GAUGE)
                kinds[i] = k
        return codes, kinds

    # -- public API -------------------------------------------------------------------------
    @property
    def targets(self) -> List[str]:
        """Targets with state."""
        return list(self._targets)

    def series_count(self, target: Optional[str] = None) -> int:
        """Series with delta state (of one target, or all)."""
        if target is not None:
            t = self._targets.get(target)
            return 0 if t is None else len(t)
        return sum(len(t) for t in self._targets.values())

    def ingest(self, scrape: Scrape, *, target: str, timestamp_ms: int) -> RelayBatch:
        """Relay one scrape of ``target`` taken at ``timestamp_ms`` (ms since the epoch)."""
        now = int(timestamp_ms)
        n_in = len(scrape)
        t = self._targets.get(target)
        if t is None:
            t = self._targets[target] = _Target()

        # 1. shape: allow-list, kinds, series rows. Reused when the scrape has the shape of
        #    the target's previous one (the steady state); else rebuilt (per distinct name and
        #    label set, plus numpy on the id columns).
        c = t.classified  # the previous scrape's, while names, metadata and options are the same
        if c is not None and c[0] == self._options_version and c[1] == scrape.names \
                and c[2] == scrape._families_raw:
            codes, name_kinds = c[3], c[4]
        else:
            codes, name_kinds = self._classify(scrape)
            t.classified = (self._options_version, scrape.names, scrape._families_raw, codes, name_kinds)
        pname = t.name_pids(scrape.names)
        plabel = t.labelset_pids(scrape.labelsets)
        st = t.structure
        stale_keys = _EMPTY_I64
        if st is None or not st.matches(scrape, codes, name_kinds, pname, plabel):
            st, stale_keys = self._build_structure(t, scrape, codes, name_kinds, pname, plabel)
        keep = st.keep
        stats = RelayStats(samples_in=n_in, dropped_not_in_spec=st.counts[0], dropped_non_dcgm=st.counts[1],
                           label_samples=st.counts[2])
        if len(st.label_idx):
            self._learn_attributes(t, scrape, st.label_idx)

        values = scrape.values if keep is None else scrape.values[keep]
        raw_ts = scrape.timestamps if keep is None else scrape.timestamps[keep]
        n = len(values)
        own_ts = raw_ts != TS_ABSENT
        any_own_ts = bool(own_ts.any())
        ts = np.where(own_ts, raw_ts, now) if any_own_ts else np.full(n, now, dtype=np.int64)

        # 2. deltas, resets, events, start timestamps (numpy on the kept samples).
        pos = st.pos
        prev = t.prev[pos]
        first = t.prev_ts[pos] == _NO_TS
        n_first = int(np.count_nonzero(first))
        n_resets = 0
        n_events = 0
        resets: np.ndarray
        event_counts = np.full(n, np.nan)
        if st.any_delta:
            with np.errstate(invalid="ignore"):
                deltas = np.subtract(values, prev)
                np.copyto(deltas, np.nan, where=st.not_delta)
                if st.any_ctr:
                    resets = np.less(values, prev)
                    resets &= st.is_ctr
                    n_resets = int(np.count_nonzero(resets))
                    if n_resets:
                        np.copyto(deltas, values, where=resets)
                else:
                    resets = np.zeros(n, dtype=np.bool_)
                if len(st.ev_idx):
                    ei = st.ev_idx
                    v, p = values[ei], prev[ei]
                    changed = ~first[ei] & (v != p) & (v != 0) & ~np.isnan(v)
                    n_events = int(np.count_nonzero(changed))
                    deltas[ei] = changed
                    total = t.events[st.ev_rows] + changed
                    t.events[st.ev_rows] = total
                    event_counts[ei] = total
            if n_first:
                fm = first & ~st.not_delta
                if self.first_observation == "drop":
                    deltas[fm] = np.nan
                elif self.first_observation == "zero":
                    deltas[fm] = 0.0
                else:
                    fc = fm & st.is_ctr
                    deltas[fc] = values[fc]
                    deltas[fm & ~st.is_ctr] = 0.0
        else:
            deltas = np.full(n, np.nan)
            resets = np.zeros(n, dtype=np.bool_)
        if n_first or n_resets:
            start = np.where(first | resets, ts, t.start[pos])
            t.start[pos] = start
        else:
            start = t.start[pos]
            if isinstance(pos, slice):
                start = start.copy()

        # 3. state update (NaN values leave the previous value in place).
        nan = np.isnan(values)
        if nan.any():
            ok = st.rows[~nan]
            t.prev[ok] = values[~nan]
            t.prev_ts[ok] = ts[~nan]
        else:
            t.prev[pos] = values
            if any_own_ts:
                t.prev_ts[pos] = ts
            else:
                t.prev_ts[pos] = now
        t.last_seen[pos] = now
        t.last_ingest_ms = now

        # 4. output tables (stale series may need extra table entries).
        out_names: Tuple[str, ...] = scrape.names
        out_labelsets: Tuple[LabelSet, ...] = scrape.labelsets
        if t.entity_attrs:
            out_labelsets = self._attach_attributes(t, scrape, st.plabel)
        stale_nids = stale_lids = np.empty(0, dtype=np.int32)
        if len(stale_keys):
            out_names, out_labelsets, stale_nids, stale_lids = self._stale_tables(
                t, stale_keys, out_names, out_labelsets, st.plabel)
            stats.stale_series = len(stale_keys)

        name_ids, labelset_ids, field_ids, kinds = st.name_ids, st.labelset_ids, st.field_ids, st.kinds
        if self.output == "delta" and n_first and self.first_observation == "drop":
            drop = first & ~st.not_delta
            n_drop = int(np.count_nonzero(drop))
            if n_drop:
                stats.dropped_first_observation = n_drop
                sel = ~drop
                name_ids, labelset_ids, field_ids, kinds, values, deltas, resets, ts, start, event_counts = (
                    a[sel] for a in (name_ids, labelset_ids, field_ids, kinds, values, deltas, resets,
                                     ts, start, event_counts))
                keep = (np.arange(n_in) if keep is None else keep)[sel]

        stats.kept = len(values)
        stats.new_series = n_first
        stats.resets = n_resets
        stats.events = n_events

        # 5. eviction (this target's gone series, whole targets not ingested for long).
        stats.evicted_series = self._evict(t, now)

        self.stats.add(stats)
        batch = RelayBatch(
            target=target, timestamp_ms=now, output=self.output,
            names=out_names, labelsets=out_labelsets,
            name_ids=name_ids, labelset_ids=labelset_ids, field_ids=field_ids, kinds=kinds,
            values=values, deltas=deltas, resets=resets, timestamps=ts,
            start_timestamps=start, event_counts=event_counts,
            stale_name_ids=stale_nids, stale_labelset_ids=stale_lids, stats=stats,
            families=lambda: self._families_of(t, scrape, out_names, codes, name_kinds),
            entities=lambda: self._entities(scrape, keep),
        )
        if self.state_path is not None and time.monotonic() - self._last_save >= self.save_every_s:
            self.save()
        return batch

    def target_down(self, target: str, timestamp_ms: int) -> RelayBatch:
        """The target could not be scraped: every series of its last ingest goes stale. Its
        delta state is kept (a counter that comes back deltas against its last value) until
        eviction."""
        now = int(timestamp_ms)
        stats = RelayStats()
        t = self._targets.get(target)
        names: Tuple[str, ...] = ()
        labelsets: Tuple[LabelSet, ...] = ()
        stale_nids = stale_lids = np.empty(0, dtype=np.int32)
        if t is not None:
            live = t.live_keys()
            if len(live):
                names, labelsets, stale_nids, stale_lids = self._stale_tables(t, live, (), (), _EMPTY_I64)
                stats.stale_series = len(live)
            t.live2d[:] = False
            t.n_live = 0
            t.structure = None
            stats.evicted_series = self._evict(t, now)
        self.stats.add(stats)
        e_i32 = _readonly(np.empty(0, dtype=np.int32))
        e_f = np.empty(0, dtype=np.float64)
        e_i64 = np.empty(0, dtype=np.int64)
        batch = RelayBatch(
            target=target, timestamp_ms=now, output=self.output, names=names, labelsets=labelsets,
            name_ids=e_i32, labelset_ids=e_i32, field_ids=e_i32, kinds=np.empty(0, dtype=np.int8),
            values=e_f, deltas=e_f, resets=np.empty(0, dtype=np.bool_), timestamps=e_i64,
            start_timestamps=e_i64, event_counts=e_f, stale_name_ids=stale_nids,
            stale_labelset_ids=stale_lids, stats=stats, families=lambda: {},
            entities=lambda: (e_i32, ()),
        )
        if self.state_path is not None and time.monotonic() - self._last_save >= self.save_every_s:
            self.save()
        return batch

    def forget(self, target: str) -> None:
        """Drop all state of a target (no stale markers)."""
        self._targets.pop(target, None)

    # -- internals --------------------------------------------------------------------------
    def _build_structure(self, t: _Target, scrape: Scrape, codes: np.ndarray, name_kinds: np.ndarray,
                         pname: np.ndarray, plabel: np.ndarray) -> Tuple[_Structure, np.ndarray]:
        """The slow path, for a scrape whose shape differs from the target's previous one:
        allow-list, kinds, state rows (new series appended), staleness. Per distinct name
        and label set plus numpy on the id columns. Returns the stale presence keys."""
        st = _Structure()
        st.names, st.labelsets = scrape.names, scrape.labelsets
        st.name_ids_in, st.labelset_ids_in = scrape.name_ids, scrape.labelset_ids
        st.codes, st.name_kinds, st.pname = codes, name_kinds, pname
        st.plabel = plabel

        all_ids = scrape.name_ids
        if len(codes) and bool((codes == _KEEP).all()):
            st.keep = None
            st.label_idx = _EMPTY_I64
            st.counts = (0, 0, 0)
            name_ids = all_ids
            labelset_ids = scrape.labelset_ids
            field_ids = scrape.field_ids
        else:
            sample_codes = codes[all_ids] if len(all_ids) else np.empty(0, dtype=np.int8)
            counts = np.bincount(sample_codes, minlength=4) if len(sample_codes) else np.zeros(4, dtype=np.int64)
            st.counts = (int(counts[_DROP_NOT_IN_SPEC]), int(counts[_DROP_NON_DCGM]), int(counts[_LABEL_SAMPLE]))
            st.label_idx = np.flatnonzero(sample_codes == _LABEL_SAMPLE)
            st.keep = np.flatnonzero(sample_codes == _KEEP)
            name_ids = all_ids[st.keep]
            labelset_ids = scrape.labelset_ids[st.keep]
            field_ids = scrape.field_ids[st.keep]
        n = len(name_ids)
        ni = name_ids.astype(np.intp)  # index arrays: one conversion, several gathers
        li = labelset_ids.astype(np.intp)
        kinds = name_kinds[ni] if n else np.empty(0, dtype=np.int8)
        st.name_ids = _readonly(name_ids.astype(np.int32, copy=False))
        st.labelset_ids = _readonly(labelset_ids.astype(np.int32, copy=False))
        st.field_ids = _readonly(field_ids.astype(np.int32, copy=False))
        st.kinds = _readonly(kinds.astype(np.int8, copy=False))
        st.is_ctr = kinds == _K_COUNTER
        is_ev = kinds == _K_EVENT
        st.not_delta = ~(st.is_ctr | is_ev)
        st.any_ctr = bool(st.is_ctr.any())
        st.any_delta = bool(st.any_ctr or is_ev.any())
        st.ev_idx = np.flatnonzero(is_ev)

        # Series: presence by the full label set, state by the label set without the event
        # value labels for EVENT samples. A cell is name_pid * cap_l + labelset_pid.
        strip_ev = bool(self.event_value_labels) and len(st.ev_idx) > 0
        if strip_ev:
            ev_pl = t.stripped(plabel[li[st.ev_idx]], self.event_value_labels)
        t.ensure_capacity()
        cap = t.cap_l
        ncell = pname * cap
        pcell = ncell[ni] + plabel[li] if n else _EMPTY_I64
        scell = pcell
        if strip_ev:
            scell = pcell.copy()
            scell[st.ev_idx] = ncell[ni[st.ev_idx]] + ev_pl

        rows = t.rows2d[scell]
        new = np.flatnonzero(rows < 0)
        if len(new):
            # New series get rows at the end; copies of one new series (duplicate samples)
            # share the row written last.
            base = len(t.keys)
            cells = scell[new]
            t.rows2d[cells] = base + np.arange(len(new))
            got = t.rows2d[cells] - base
            used = np.zeros(len(new), dtype=np.bool_)
            used[got] = True
            if not used.all():
                got = (np.cumsum(used) - 1)[got]
            n_new = int(got.max()) + 1
            new_keys = np.empty(n_new, dtype=np.int64)
            new_keys[got] = t.cell_keys(cells)
            t.add_series(new_keys)
            rows[new] = base + got

        # Layout: the live rows first, in sample order when there are no duplicates.
        in_place = np.array_equal(rows, np.arange(n))
        dup = False
        if not in_place:
            mark = np.zeros(len(t.keys), dtype=np.bool_)
            mark[rows] = True
            n_live = int(np.count_nonzero(mark))
            dup = n_live != n
            live_rows = np.flatnonzero(mark) if dup else rows
            if not np.array_equal(live_rows, np.arange(n_live)):
                t.reorder(np.concatenate([live_rows, np.flatnonzero(~mark)]))
                if dup:
                    inv = np.full(len(t.keys), -1, dtype=np.int64)
                    inv[live_rows] = np.arange(n_live)
                    rows = inv[rows]
            t.n_live = n_live
        else:
            t.n_live = n
        if dup:
            st.rows = st.pos = rows
        else:
            st.rows = np.arange(n)
            st.pos = slice(0, n)
        st.ev_rows = st.rows[st.ev_idx]

        # Staleness: cells present last time and not now.
        live = np.zeros(len(t.live2d), dtype=np.bool_)
        live[pcell] = True
        stale = t.cell_keys(np.flatnonzero(t.live2d & ~live))
        t.live2d = live
        t.structure = st
        return st, stale

    def _stale_tables(self, t: _Target, stale_keys: np.ndarray, names: Tuple[str, ...],
                      labelsets: Tuple[LabelSet, ...], plabel: np.ndarray
                      ) -> Tuple[Tuple[str, ...], Tuple[LabelSet, ...], np.ndarray, np.ndarray]:
        """Batch tables extended with the stale series' strings, and their ids. ``names``
        and ``labelsets`` are the scrape's tables, ``plabel`` the pids of ``labelsets``."""
        npid = stale_keys >> 32
        lpid = stale_keys & _LOW32
        nid_of = np.full(len(t.names), -1, dtype=np.int64)
        if names:
            nid_of[t.name_pids(names)] = np.arange(len(names))
        lid_of = np.full(len(t.labelsets), -1, dtype=np.int64)
        lid_of[plabel] = np.arange(len(plabel))
        nids = nid_of[npid]
        lids = lid_of[lpid]
        extra_names: List[str] = []
        extra_ls: List[LabelSet] = []
        for p in np.unique(npid[nids < 0]).tolist():  # names the scrape no longer has
            nid_of[p] = len(names) + len(extra_names)
            extra_names.append(t.names[p])
        for p in np.unique(lpid[lids < 0]).tolist():  # label sets the scrape no longer has
            lid_of[p] = len(labelsets) + len(extra_ls)
            extra_ls.append(t.out_ls.get(p, t.labelsets[p]))
        return (names + tuple(extra_names), labelsets + tuple(extra_ls),
                nid_of[npid].astype(np.int32), lid_of[lpid].astype(np.int32))

    def _learn_attributes(self, t: _Target, scrape: Scrape, idx: np.ndarray) -> None:
        """Label-type fields sent as samples -> attributes of their entity (loop over those
        samples only)."""
        ents = scrape.entities
        ent_of_ls = scrape.labelset_entity_ids
        fresh: Dict[Tuple[Any, ...], Dict[str, str]] = {}
        for i in idx.tolist():
            lid = int(scrape.labelset_ids[i])
            eid = int(ent_of_ls[lid])
            if eid < 0:
                continue
            name = scrape.names[scrape.name_ids[i]]
            labels = dict(scrape.labelsets[lid])
            value = labels.get(name)
            if value is None:
                value = _format_attr(float(scrape.values[i]))
            fresh.setdefault(ents[eid].key, {})[name] = value
        t.entity_attrs.update(fresh)

    def _attach_attributes(self, t: _Target, scrape: Scrape, plabel: np.ndarray) -> Tuple[LabelSet, ...]:
        """Output label sets: each input set plus its entity's attributes (per label set)."""
        ents = scrape.entities
        ent_of_ls = scrape.labelset_entity_ids.tolist()
        attrs_of = t.entity_attrs
        out: List[LabelSet] = []
        for lid, ls in enumerate(scrape.labelsets):
            eid = ent_of_ls[lid]
            if eid < 0:
                out.append(ls)
                continue
            e = ents[eid]
            attrs: Dict[str, str] = {}
            if e.kind == "mig":
                attrs.update(attrs_of.get(("gpu", e.uuid), {}))
            attrs.update(attrs_of.get(e.key, {}))
            if not attrs:
                out.append(ls)
                continue
            have = {k for k, _ in ls}
            extra = tuple((k, v) for k, v in sorted(attrs.items()) if k not in have)
            new = ls + extra if extra else ls
            out.append(new)
            if extra:
                t.out_ls[int(plabel[lid])] = new
        return tuple(out)

    def _evict(self, t: _Target, now: int) -> int:
        cutoff = now - self.evict_after_ms
        evicted = t.evict(cutoff)
        if len(t.labelsets) > 2 * len(t.keys) + 1024:  # label sets of dropped samples only
            t.compact()
        # Targets not ingested for that long: every series of theirs is gone that long. A scan
        # of every target per scrape would cost O(targets²) per interval, so at most one scan a
        # second (eviction works in hours; a second late changes nothing).
        if now - self._last_target_scan_ms >= 1000 or now < self._last_target_scan_ms:
            self._last_target_scan_ms = now
            for name in [k for k, o in self._targets.items() if o is not t and o.last_ingest_ms < cutoff]:
                evicted += len(self._targets.pop(name))
        return evicted

    def _families_of(self, t: _Target, scrape: Scrape, names: Tuple[str, ...], codes: np.ndarray,
                     name_kinds: np.ndarray) -> Dict[str, Tuple[str, Optional[str], Optional[str]]]:
        """:meth:`_families`, reused while the target's names, their classification, the
        options and the exporter's HELP/TYPE/UNIT lines are those of the last batch."""
        key = (self._options_version, self.output, names, codes.tobytes(), name_kinds.tobytes())
        raw = scrape._families_raw  # the parser's metadata, before Family objects are made
        c = t.families_cache
        if c is not None and c[0] == key and c[1] == raw:
            return c[2]
        out = self._families(scrape, names, codes, name_kinds)
        t.families_cache = (key, raw, out)
        return out

    def _families(self, scrape: Scrape, names: Tuple[str, ...], codes: np.ndarray, name_kinds: np.ndarray
                  ) -> Dict[str, Tuple[str, Optional[str], Optional[str]]]:
        """Output type, help and unit of every name a sample or a stale series of the batch uses."""
        out: Dict[str, Tuple[str, Optional[str], Optional[str]]] = {}
        delta = self.output == "delta"
        for i, name in enumerate(names):
            fam = scrape.family_of(name)
            fid = _fields.id_of(name)
            if i < len(codes):  # a name of the scrape
                if codes[i] != _KEEP:
                    continue
                kind = int(name_kinds[i])
            elif fid >= 0:  # a stale series' name the scrape no longer has
                kind = self._classify_dcgm(name, fid)[1]
            else:
                kind = self._name_overrides.get(name, int(Kind.GAUGE))
            if fid >= 0:
                typ = "counter" if kind == _K_COUNTER and not delta else "gauge"
                help_ = self.spec.help(fid) if fid in self.spec else fam.help
            else:
                typ = fam.type
                if kind == _K_COUNTER:
                    typ = "gauge" if delta else "counter"
                elif typ == "counter":  # overridden to a gauge
                    typ = "gauge"
                help_ = fam.help
            out[name] = (typ, help_, fam.unit)
        return out

    def _entities(self, scrape: Scrape, keep: Optional[np.ndarray]
                  ) -> Tuple[npt.NDArray[np.int32], Tuple[Entity, ...]]:
        ids = scrape.entity_ids
        return (ids if keep is None else ids[keep]).astype(np.int32, copy=False), scrape.entities

    # -- persistence ------------------------------------------------------------------------
    def save(self) -> None:
        """Write the delta state to ``state_path`` atomically (no-op without a path)."""
        if self.state_path is None:
            return
        arrays: Dict[str, np.ndarray] = {}
        meta = {"version": STATE_VERSION, "format": "dcgmrelay-relay-state", "targets": list(self._targets),
                "saved_ms": int(time.time() * 1000)}
        for i, (name, t) in enumerate(self._targets.items()):
            p = f"t{i}_"
            arrays[p + "strings"] = np.frombuffer(t.strings_json(), dtype=np.uint8)
            arrays[p + "keys"] = t.keys
            arrays[p + "prev"] = t.prev
            arrays[p + "prev_ts"] = t.prev_ts
            arrays[p + "start"] = t.start
            arrays[p + "events"] = t.events
            arrays[p + "last_seen"] = t.last_seen
            arrays[p + "present"] = t.live_keys()
            arrays[p + "info"] = np.array([t.last_ingest_ms, t.n_live], dtype=np.int64)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)  # numeric arrays only; _read_state refuses pickles
        path = self.state_path
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".relay-state-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:  # make the rename durable
            dfd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. Windows
            pass
        else:
            try:
                os.fsync(dfd)
            except OSError:  # pragma: no cover
                pass
            finally:
                os.close(dfd)
        self._last_save = time.monotonic()

    def _load(self) -> None:
        path = self.state_path
        assert path is not None
        if not os.path.exists(path):
            return
        try:
            targets = _read_state(path)
        except Exception as exc:  # noqa: BLE001 - any damage means "start empty"
            logger.warning("relay state %s is unreadable (%s: %s); starting with empty state",
                           path, type(exc).__name__, exc)
            return
        self._targets = targets


def _read_state(path: str) -> Dict[str, _Target]:
    with open(path, "rb") as fh:
        data = fh.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if not isinstance(meta, dict) or meta.get("format") != "dcgmrelay-relay-state":
            raise ValueError("not a dcgmrelay relay state file")
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"state format version {meta.get('version')!r}, expected {STATE_VERSION}")
        out: Dict[str, _Target] = {}
        for i, name in enumerate(meta["targets"]):
            if not isinstance(name, str):
                raise ValueError("bad target name")
            p = f"t{i}_"
            t = _Target()
            strings = json.loads(bytes(z[p + "strings"]).decode())
            t.names = [str(n) for n in strings["names"]]
            t.labelsets = [tuple((str(k), str(v)) for k, v in ls) for ls in strings["labelsets"]]
            t.name_pid = {n: j for j, n in enumerate(t.names)}
            t.ls_pid = {ls: j for j, ls in enumerate(t.labelsets)}
            if len(t.name_pid) != len(t.names) or len(t.ls_pid) != len(t.labelsets):
                raise ValueError("duplicate strings")
            t.out_ls = {int(pid): tuple((str(k), str(v)) for k, v in ls) for pid, ls in strings["out"]}
            t.keys = np.asarray(z[p + "keys"], dtype=np.int64)
            t.prev = np.asarray(z[p + "prev"], dtype=np.float64)
            t.prev_ts = np.asarray(z[p + "prev_ts"], dtype=np.int64)
            t.start = np.asarray(z[p + "start"], dtype=np.int64)
            t.events = np.asarray(z[p + "events"], dtype=np.float64)
            t.last_seen = np.asarray(z[p + "last_seen"], dtype=np.int64)
            present = np.asarray(z[p + "present"], dtype=np.int64)
            info = np.asarray(z[p + "info"], dtype=np.int64)
            t.last_ingest_ms, t.n_live = int(info[0]), int(info[1])
            n = len(t.keys)
            if any(a.ndim != 1 or len(a) != n for a in (t.keys, t.prev, t.prev_ts, t.start, t.events, t.last_seen)):
                raise ValueError("state arrays of different lengths")
            if not 0 <= t.n_live <= n:
                raise ValueError("bad live row count")
            for keys in (t.keys, present):
                if len(keys) and (keys.min() < 0 or (keys >> 32).max() >= len(t.names)
                                  or (keys & _LOW32).max() >= len(t.labelsets)):
                    raise ValueError("series keys out of range")
            if len(np.unique(t.keys)) != n or len(np.unique(present)) != len(present):
                raise ValueError("duplicate series keys")
            if any(p2 >= len(t.labelsets) or p2 < 0 for p2 in t.out_ls):
                raise ValueError("bad output label set")
            cap_n, cap_l = 8, 64
            while cap_n < len(t.names):
                cap_n *= 2
            while cap_l < len(t.labelsets):
                cap_l *= 2
            t._rebuild(cap_n, cap_l, present)
            t.strip_lut = np.full(cap_l, -1, dtype=np.int64)
            t.tables_version = 1
            out[name] = t
        return out
