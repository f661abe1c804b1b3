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

__all__ = ["SelfMetrics"]


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
        self.scrapes = Counter("dcgmrelay_scrapes", "Scrapes by target and result (ok, failed).",
                               ["target", "result"], registry=r)
        self.scrape_duration = Histogram("dcgmrelay_scrape_duration_seconds", "Time to fetch and parse a target.",
                                         ["target"], registry=r,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.parse_seconds = Counter("dcgmrelay_parse_seconds", "CPU time spent parsing bodies.", registry=r)
        self.relay_seconds = Counter("dcgmrelay_relay_seconds", "Time spent in the relay step.", registry=r)
        self.parse_errors = Counter("dcgmrelay_parse_rejected_lines",
                                    "Lines rejected by the lenient parser (also logged once per target).",
                                    ["target"], registry=r)
        self.targets = Gauge("dcgmrelay_targets", "Targets being scraped, by source.", ["source"], registry=r)
        self.target_up = Gauge("dcgmrelay_target_up", "1 if the last scrape of the target succeeded.",
                               ["target"], registry=r)
        self.last_scrape = Gauge("dcgmrelay_target_last_scrape_timestamp_seconds",
                                 "When the target was last scraped.", ["target"], registry=r)
        self.config_reloads = Counter("dcgmrelay_config_reloads", "Config reloads (SIGHUP) by result.",
                                      ["result"], registry=r)
        self.start_time = Gauge("dcgmrelay_start_time_seconds", "When the relay started.", registry=r)
        self.start_time.set(time.time())
        self._sources: Dict[str, Callable[[], Iterable[Metric]]] = {}
        r.register(_Callbacks(self._collect_sources))

    def add_source(self, name: str, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register a function yielding metric families at collection time."""
        self._sources[name] = fn

    def _collect_sources(self) -> Iterator[Metric]:
        for fn in list(self._sources.values()):
            yield from fn()

    def forget_target(self, target: str) -> None:
        """Remove a target's per-target series when it is no longer scraped."""
        for metric in (self.target_up, self.last_scrape, self.parse_errors, self.scrape_duration):
            try:
                metric.remove(target)
            except KeyError:
                pass
        for result in ("ok", "failed"):
            try:
                self.scrapes.remove(target, result)
            except KeyError:
                pass


def relay_families(stats: Mapping[str, int], series: int) -> Iterator[Metric]:
    """Metric families for the relay's running stats (``RelayStats.as_dict()``)."""
    samples = CounterMetricFamily("dcgmrelay_samples", "Samples by stage: in (scraped), kept (relayed).",
                                  labels=["stage"])
    samples.add_metric(["in"], stats.get("samples_in", 0))
    samples.add_metric(["kept"], stats.get("kept", 0))
    yield samples
    dropped = CounterMetricFamily("dcgmrelay_samples_dropped", "Samples not relayed, by reason.",
                                  labels=["reason"])
    for reason in ("not_in_spec", "non_dcgm", "first_observation"):
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
    dropped = CounterMetricFamily("dcgmrelay_output_batches_dropped", "Batches dropped, by reason.",
                                  labels=["output", "reason"])
    for out, st in outputs.items():
        by = st.get("dropped_batches")
        if isinstance(by, Mapping):
            for reason, n in by.items():
                dropped.add_metric([out, str(reason)], n)
    yield dropped
    inflight = GaugeMetricFamily("dcgmrelay_output_requests_in_flight", "Requests in flight.", labels=["output"])
    for out, st in outputs.items():
        v = st.get("in_flight")
        if isinstance(v, (int, float)):
            inflight.add_metric([out], v)
    yield inflight


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
