"""The relay's own telemetry (prometheus-client), served on the listen address.

Everything the relay drops, retries or spools is counted here, so "nothing lost
silently" can be checked from outside: samples dropped by reason, batches
dropped by reason, retries, spool drops, and the scrape health of every target.
Values that other components already count (the relay's stats, each output's
stats, each spool's stats) are read at collection time rather than copied.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["SelfMetrics", "TargetRecord"]


class _Callbacks(Collector):
    """Exposes counters that live in other components' stats objects."""

    def __init__(self, collect_fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = collect_fn

    def collect(self) -> Iterator[Metric]:
        yield from self._fn()


class SelfMetrics:
    """The relay's metric set, in a private registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per target: one plain record, rendered at collection time (_collect_targets). A
        # prometheus-client child per target and metric costs a labels() lookup per scrape and
        # a `_created` series per counter; at 1,000 targets the per-target part of /metrics
        # was 1.7 MiB (a histogram per target) and took ~0.25 s to render on the event loop.
        self._per_target: Dict[str, TargetRecord] = {}
        self.scrape_duration = Histogram("dcgmrelay_scrape_duration_seconds",
                                         "Time to fetch and parse a scrape, over all targets.", registry=r,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.parse_seconds = Counter("dcgmrelay_parse_seconds", "CPU time spent parsing bodies.", registry=r)
        self.relay_seconds = Counter("dcgmrelay_relay_seconds", "Time spent in the relay step.", registry=r)
        self.targets = Gauge("dcgmrelay_targets", "Targets being scraped, by source.", ["source"], registry=r)
        self.config_reloads = Counter("dcgmrelay_config_reloads", "Config reloads (SIGHUP) by result.",
                                      ["result"], registry=r)
        self.start_time = Gauge("dcgmrelay_start_time_seconds", "When the relay started.", registry=r)
        self.start_time.set(time.time())
        self._sources: Dict[str, Callable[[], Iterable[Metric]]] = {}
        r.register(_Callbacks(self._collect_targets))
        r.register(_Callbacks(self._collect_sources))

    def target(self, key: str) -> "TargetRecord":
        """The record of a target's scrape health (created on first use)."""
        rec = self._per_target.get(key)
        if rec is None:
            rec = self._per_target[key] = TargetRecord()
        return rec

    def scraped(self, key: str, up: bool, duration_s: float, timestamp_s: float) -> None:
        """Count one scrape of ``key``."""
        rec = self.target(key)
        if up:
            rec.ok += 1
        else:
            rec.failed += 1
        rec.up = up
        rec.duration_s = duration_s
        rec.last_s = timestamp_s
        self.scrape_duration.observe(duration_s)

    def _collect_targets(self) -> Iterator[Metric]:
        recs = list(self._per_target.items())
        scrapes = CounterMetricFamily("dcgmrelay_scrapes", "Scrapes by target and result (ok, failed).",
                                      labels=["target", "result"])
        up = GaugeMetricFamily("dcgmrelay_target_up", "1 if the last scrape of the target succeeded.",
                               labels=["target"])
        dur = GaugeMetricFamily("dcgmrelay_target_scrape_duration_seconds",
                                "Time the target's last scrape took to fetch and parse.", labels=["target"])
        last = GaugeMetricFamily("dcgmrelay_target_last_scrape_timestamp_seconds",
                                 "When the target was last scraped.", labels=["target"])
        rejected = CounterMetricFamily("dcgmrelay_parse_rejected_lines",
                                       "Lines rejected by the lenient parser (also logged once per target).",
                                       labels=["target"])
        for key, rec in recs:
            scrapes.add_metric([key, "ok"], rec.ok)
            scrapes.add_metric([key, "failed"], rec.failed)
            if rec.last_s is not None:
                up.add_metric([key], 1.0 if rec.up else 0.0)
                dur.add_metric([key], rec.duration_s)
                last.add_metric([key], rec.last_s)
            rejected.add_metric([key], rec.rejected_lines)
        yield from (scrapes, up, dur, last, rejected)

    def add_source(self, name: str, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register a function yielding metric families at collection time."""
        self._sources[name] = fn

    def _collect_sources(self) -> Iterator[Metric]:
        for fn in list(self._sources.values()):
            yield from fn()

    def forget_target(self, target: str) -> None:
        """Remove a target's per-target series when it is no longer scraped."""
        self._per_target.pop(target, None)


class TargetRecord:
    """One target's scrape health, as /metrics shows it."""

    __slots__ = ("ok", "failed", "up", "duration_s", "last_s", "rejected_lines")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.up = False
        self.duration_s = 0.0
        self.last_s: Optional[float] = None
        self.rejected_lines = 0


def relay_families(stats: Mapping[str, int], series: int) -> Iterator[Metric]:
    """Metric families for the relay's running stats (``RelayStats.as_dict()``)."""
    samples = CounterMetricFamily("dcgmrelay_samples", "Samples by stage: in (scraped), kept (relayed).",
                                  labels=["stage"])
    samples.add_metric(["in"], stats.get("samples_in", 0))
    samples.add_metric(["kept"], stats.get("kept", 0))
    yield samples
    dropped = CounterMetricFamily("dcgmrelay_samples_dropped", "Samples not relayed, by reason.",
                                  labels=["reason"])
    for reason in ("not_in_spec", "non_dcgm", "first_observation", "sample_limit", "label_limit"):
        dropped.add_metric([reason], stats.get(f"dropped_{reason}", 0))
    dropped.add_metric(["label_field"], stats.get("label_samples", 0))
    yield dropped
    resets = CounterMetricFamily("dcgmrelay_counter_resets", "Counter decreases treated as resets.")
    resets.add_metric([], stats.get("resets", 0))
    yield resets
    events = CounterMetricFamily("dcgmrelay_events", "Event fields (XID) that changed to a new value.")
    events.add_metric([], stats.get("events", 0))
    yield events
    stale = CounterMetricFamily("dcgmrelay_stale_series", "Series ended with a stale marker.")
    stale.add_metric([], stats.get("stale_series", 0))
    yield stale
    evicted = CounterMetricFamily("dcgmrelay_evicted_series", "Series whose delta state was evicted.")
    evicted.add_metric([], stats.get("evicted_series", 0))
    yield evicted
    g = GaugeMetricFamily("dcgmrelay_series", "Series with delta state.")
    g.add_metric([], series)
    yield g


def output_families(outputs: Mapping[str, Mapping[str, object]]) -> Iterator[Metric]:
    """Metric families from each output's stats dict (name -> stats)."""
    counters = {
        "batches_sent": ("dcgmrelay_output_batches_sent", "Requests delivered."),
        "samples_sent": ("dcgmrelay_output_samples_sent", "Samples delivered."),
        "bytes_sent": ("dcgmrelay_output_bytes_sent", "Request body bytes delivered (compressed)."),
        "retries": ("dcgmrelay_output_retries", "Requests retried."),
        "spooled_batches": ("dcgmrelay_output_spooled_batches", "Batches handed to the spool."),
    }
    for key, (name, doc) in counters.items():
        fam = CounterMetricFamily(name, doc, labels=["output"])
        for out, st in outputs.items():
            v = st.get(key)
            if isinstance(v, (int, float)):
                fam.add_metric([out], v)
        yield fam
    yield _by_reason(outputs, "dropped_batches", "dcgmrelay_output_batches_dropped", "Batches dropped, by reason.")
    yield _by_reason(outputs, "dropped_samples", "dcgmrelay_output_samples_dropped",
                     "Samples an output did not get, by reason (write_relabel: its rules dropped them; "
                     "the others: in the batches it dropped).")
    inflight = GaugeMetricFamily("dcgmrelay_output_requests_in_flight", "Requests in flight.", labels=["output"])
    for out, st in outputs.items():
        v = st.get("in_flight")
        if isinstance(v, (int, float)):
            inflight.add_metric([out], v)
    yield inflight


def _by_reason(outputs: Mapping[str, Mapping[str, object]], key: str, name: str, doc: str) -> Metric:
    """A counter per output and reason, from each output's ``key`` stats (reason -> count)."""
    fam = CounterMetricFamily(name, doc, labels=["output", "reason"])
    for out, st in outputs.items():
        by = st.get(key)
        if isinstance(by, Mapping):
            for reason, n in by.items():
                fam.add_metric([out, str(reason)], n)
    return fam


def spool_families(spools: Mapping[str, Mapping[str, Optional[float]]], now: Optional[float] = None
                   ) -> Iterator[Metric]:
    """Metric families from each spool: records/bytes pending, oldest age, drops."""
    rec = GaugeMetricFamily("dcgmrelay_spool_records", "Records waiting in the spool.", labels=["output"])
    byt = GaugeMetricFamily("dcgmrelay_spool_bytes", "Bytes waiting in the spool.", labels=["output"])
    age = GaugeMetricFamily("dcgmrelay_spool_oldest_age_seconds", "Age of the oldest spooled record.",
                            labels=["output"])
    drop = CounterMetricFamily("dcgmrelay_spool_dropped_records",
                               "Spooled records lost, by reason (size cap, disk full, corrupt).",
                               labels=["output", "reason"])
    for out, st in spools.items():
        rec.add_metric([out], st.get("pending_records") or 0)
        byt.add_metric([out], st.get("pending_bytes") or 0)
        age.add_metric([out], st.get("oldest_age_s") or 0.0)  # None: nothing pending
        drop.add_metric([out, "size_cap"], st.get("dropped_records") or 0)
        drop.add_metric([out, "disk_full"], st.get("rejected_records") or 0)
        drop.add_metric([out, "corrupt"], st.get("corrupt_records_skipped") or 0)
        drop.add_metric([out, "torn"], st.get("torn_records_skipped") or 0)
    yield rec
    yield byt
    yield age
    yield drop
