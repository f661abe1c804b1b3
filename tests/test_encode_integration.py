"""The encoders against real receivers (Prometheus 2.42 and VictoriaMetrics 1.79 on 127.0.0.1).

Every test writes series with a label ``dcgmrelay_test`` of its own (the servers are shared
by the whole session), at timestamps near "now" (Prometheus refuses samples more than an
hour older than its newest), then reads them back through the HTTP API and compares label
sets, values (bit for bit on Prometheus; VictoriaMetrics keeps about 12 significant digits
and drops NaN) and timestamps (ms).

What the servers accept (pinned by the tests below):

* remote write 1.0 (``encode(batch, "remote-write-1")``): Prometheus and VictoriaMetrics
  store every sample exactly; a stale marker ends the series (an instant query just after it
  returns nothing, inside the 5 minute lookback); VictoriaMetrics keeps the markers and
  exports them as ``null``. Metadata (field 3) is accepted and ignored.
* text 0.0.4 (``"prometheus"``, ms timestamps, plain or gzip) on VictoriaMetrics'
  ``/api/v1/import/prometheus``: stored exactly (escaped label values included).
* compact, through the embedded ``CompactReceiver`` forwarding remote write 1.0 into
  Prometheus: stored exactly, stale markers included.
* remote write 2.0: neither server here accepts it. The body matches the official schema
  (decoded with the protobuf runtime); Prometheus 2.42 and VictoriaMetrics 1.79 answer 2xx
  without any ``X-Prometheus-Remote-Write-*-Written`` header and store nothing (a 2.0 sender
  must treat that as 415 and fall back to 1.0), unless the Prometheus found is new enough to
  accept 2.0 (``accepts_rw2``), in which case the samples must be stored exactly.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import time
from typing import Any, Dict, List, Tuple

import httpx
import numpy as np
import pytest

import dcgmrelay
from dcgmrelay.csvspec import load_csv
from dcgmrelay.encode import DecodedBatch, Encoder, encode
from dcgmrelay.receiver import CompactReceiver
from dcgmrelay.relay import Relay
from dcgmrelay.simulate import SimulatedNode
from servers import PrometheusServer, VictoriaMetricsServer
from test_encode import REAL_PAYLOADS, STALE, expected_samples, rw1_decode, rw2_decode

pytestmark = pytest.mark.integration

_counter = itertools.count()
RUN_LABEL = "dcgmrelay_test"


def run_id(prefix: str) -> str:
    return "%s-%d-%d" % (prefix, os.getpid(), next(_counter))


def now_ms() -> int:
    return int(time.time()) * 1000


def post(url: str, body: bytes, headers: Dict[str, str]) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers, timeout=30.0, trust_env=False)


def tagged(batch: Any, rid: str) -> DecodedBatch:
    """The batch with ``dcgmrelay_test=<rid>`` added to every label set (the series of this test
    alone) and every sample at the batch timestamp."""
    labelsets = tuple(tuple(ls) + ((RUN_LABEL, rid),) for ls in batch.labelsets)
    fields = {k: getattr(batch, k) for k in (
        "target", "timestamp_ms", "output", "names", "name_ids", "labelset_ids", "field_ids", "kinds", "values",
        "deltas", "resets", "start_timestamps", "event_counts", "stale_name_ids", "stale_labelset_ids")}
    fields.update(labelsets=labelsets, timestamps=np.full(len(batch.values), batch.timestamp_ms, dtype=np.int64),
                  families=dict(batch.families or {}), entities=tuple(batch.entities),
                  entity_ids=np.asarray(batch.entity_ids), series_ids=np.zeros(len(batch.values), dtype=np.int64),
                  stream_id=0, seq=0, full=True, duplicate=False)
    return DecodedBatch(**fields)


def sim_batches(rid: str, output: str, t0: int, n: int = 4, events: bool = True, n_gpus: int = 4) -> List[DecodedBatch]:
    """Relayed scrapes of a simulated node every 15 s ending at t0; GPU 1 reset its counters
    before the third, GPU 3 vanished before the third (its series go stale)."""
    node = SimulatedNode(n_gpus, pods="some", xid=True, seed=11, hostname="node-" + rid)
    relay = Relay(load_csv("default"), output=output, first_observation="full")
    out = []
    for k in range(n):
        if events and k == 2:
            node.reset_counters(1)
            node.remove_gpu(3)
        t = t0 - 15_000 * (n - 1 - k)
        b = relay.ingest(dcgmrelay.parse(node.render(600 + 15 * k)), target="sim", timestamp_ms=t)
        out.append(tagged(b, rid))
    return out


def real_batches(rid: str, t0: int, output: str = "cumulative") -> List[DecodedBatch]:
    """Every real payload relayed twice (15 s apart), the second scrape of each at t0."""
    out = []
    for i, path in enumerate(REAL_PAYLOADS):
        scrape = dcgmrelay.parse(path.read_bytes())
        if not len(scrape):
            continue
        relay = Relay(load_csv("default"), output=output, include_non_dcgm=True, first_observation="full")
        for k, t in enumerate((t0 - 15_000, t0)):
            b = relay.ingest(scrape, target=path.name, timestamp_ms=t)
            out.append(tagged(b, f"{rid}-{i}"))
    return out


# -- reading back -----------------------------------------------------------------------------


def _bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def _key(metric: Dict[str, str]) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted(metric.items()))


def expected(batches: List[Any]) -> List[Tuple[tuple, int, int]]:
    """(labels, value bits, ts) of every stored sample (stale markers are not samples)."""
    out = []
    for b in batches:
        out += [(k, v, t) for k, v, t, part in expected_samples(b) if part != "stale"]
    return sorted(out)


def prom_samples(prom: PrometheusServer, selector: str, at_ms: int) -> List[Tuple[tuple, int, int]]:
    out = []
    for s in prom.query(f"{selector}[30m]", time=at_ms / 1000):
        for t, v in s["values"]:
            out.append((_key(s["metric"]), _bits(float(v)), round(t * 1000)))
    return sorted(out)


def vm_samples(vm: VictoriaMetricsServer, selector: str) -> List[Tuple[tuple, Any, int]]:
    """(labels, value, ts); value None where the export has ``null``: a stored stale marker."""
    out = []
    for s in vm.export(selector):
        for v, t in zip(s["values"], s["timestamps"]):
            out.append((_key(s["metric"]), None if v is None else float(v), int(t)))
    return sorted(out, key=lambda x: (x[0], x[2]))


def assert_vm_matches(got: List[tuple], batches: List[Any], stale: bool = False) -> None:
    """VictoriaMetrics: NaN dropped, values to ~12 significant digits; with ``stale``, the
    stale markers are exported as ``null`` at their series and timestamps."""
    markers = sorted((k, t) for b in batches for k, v, t, part in expected_samples(b) if part == "stale")
    assert sorted((k, t) for k, v, t in got if v is None) == (markers if stale else [])
    want = []
    for k, bits, t in expected(batches):
        v = struct.unpack("<d", struct.pack("<Q", bits))[0]
        if v == v:
            want.append((k, v, t))
    want.sort(key=lambda x: (x[0], x[2]))
    got = sorted((g for g in got if g[1] is not None and g[1] == g[1]), key=lambda x: (x[0], x[2]))
    assert [(k, t) for k, _, t in got] == [(k, t) for k, _, t in want]
    for (k, gv, _), (_, wv, _) in zip(got, want):
        assert gv == wv or math.isclose(gv, wv, rel_tol=1e-11, abs_tol=1e-300), (k, gv, wv)


def _sel(rid: str) -> str:
    return '{%s=~"%s(-.+)?"}' % (RUN_LABEL, rid)


# -- remote write 1.0 --------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["cumulative", "delta", "both"])
def test_prometheus_remote_write_1_simulated(prometheus_server: PrometheusServer, output: str) -> None:
    rid = run_id("rw1-sim-" + output)
    t0 = now_ms()
    batches = sim_batches(rid, output, t0)
    enc = Encoder("remote-write-1")
    for b in batches:
        body, headers = enc.encode(b)
        r = post(prometheus_server.remote_write_url, body, headers)
        assert r.status_code == 204, r.text
    assert prom_samples(prometheus_server, _sel(rid), t0) == expected(batches)


def test_prometheus_remote_write_1_real_payloads(prometheus_server: PrometheusServer) -> None:
    rid = run_id("rw1-real")
    t0 = now_ms()
    batches = real_batches(rid, t0, output="both")
    for b in batches:
        body, headers = encode(b, "remote-write-1")
        r = post(prometheus_server.remote_write_url, body, headers)
        assert r.status_code == 204, r.text
    got = prom_samples(prometheus_server, _sel(rid), t0)
    assert got == expected(batches)
    assert len({k for k, _, _ in got}) >= 40  # every real payload, its _delta series included


def test_prometheus_stale_markers_end_series(prometheus_server: PrometheusServer) -> None:
    prom = prometheus_server
    rid = run_id("stale")
    t0 = now_ms()
    batches = sim_batches(rid, "cumulative", t0, n=3)
    stale_at = batches[2].timestamp_ms
    assert len(batches[2].stale_name_ids) >= 25
    for b in batches:
        r = post(prom.remote_write_url, *encode(b, "remote-write-1"))
        assert r.status_code == 204, r.text
    gone = '{%s="%s",gpu="3"}' % (RUN_LABEL, rid)
    kept = '{%s="%s",gpu="2"}' % (RUN_LABEL, rid)
    before = prom.query(gone, time=(stale_at - 1000) / 1000)
    assert len(before) >= 25  # GPU 3 had every field before it vanished
    assert prom.query(gone, time=(stale_at + 1000) / 1000) == []  # ended: within the lookback
    assert len(prom.query(kept, time=(stale_at + 1000) / 1000)) >= 25
    # the raw samples of the ended series stop before the marker
    raw = prom.query(gone + "[30m]", time=(stale_at + 1000) / 1000)
    assert raw and all(round(v[0] * 1000) < stale_at for s in raw for v in s["values"])
    # a target that goes down ends all of its series
    relay = Relay(load_csv("default"))
    node = SimulatedNode(2, seed=3, hostname="down-" + rid)
    up = tagged(relay.ingest(dcgmrelay.parse(node.render(0)), target="d", timestamp_ms=t0 - 5000), rid + "-down")
    down = tagged(relay.target_down("d", t0), rid + "-down")
    for b in (up, down):
        assert post(prom.remote_write_url, *encode(b, "remote-write-1")).status_code == 204
    sel = '{%s="%s"}' % (RUN_LABEL, rid + "-down")
    assert len(prom.query(sel, time=(t0 - 1000) / 1000)) == len(up)
    assert prom.query(sel, time=(t0 + 1000) / 1000) == []


def test_victoria_metrics_remote_write_1(victoria_metrics_server: VictoriaMetricsServer) -> None:
    vm = victoria_metrics_server
    rid = run_id("vm-rw1")
    t0 = now_ms()
    batches = sim_batches(rid, "both", t0) + real_batches(rid + "-real", t0)
    enc = Encoder("remote-write-1")
    for b in batches:
        r = post(vm.remote_write_url, *enc.encode(b))
        assert r.status_code == 204, r.text
    assert_vm_matches(vm_samples(vm, _sel(rid)), batches, stale=True)
    # stale markers: VictoriaMetrics 1.79 ends the series too
    stale_at = batches[2].timestamp_ms
    gone = '{%s="%s",gpu="3"}' % (RUN_LABEL, rid)
    assert len(vm.query(gone, time=(stale_at - 1000) / 1000)) >= 25
    assert vm.query(gone, time=(stale_at + 1000) / 1000) == []


# -- text import ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_victoria_metrics_import_prometheus_text(victoria_metrics_server: VictoriaMetricsServer,
                                                 compression: Any) -> None:
    vm = victoria_metrics_server
    rid = run_id("vm-text-%s" % compression)
    t0 = now_ms()
    batches = sim_batches(rid, "both", t0, events=False) + real_batches(rid + "-real", t0)
    # label values a naive exporter would not escape
    fields = {k: v for k, v in batches[0].__dict__.items() if not k.startswith("_")}
    fields["labelsets"] = tuple(tuple((k, v + ' "q" \\ \n # EOF' if k == "Hostname" else v) for k, v in ls)
                                for ls in fields["labelsets"])
    batches.append(DecodedBatch(**fields))
    enc = Encoder("prometheus", compression=compression)
    for b in batches:
        body, headers = enc.encode(b)
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        r = post(vm.import_prometheus_url, body, headers)
        assert r.status_code == 204, r.text
    got = vm_samples(vm, _sel(rid))
    assert any('"q" \\ \n # EOF' in dict(k).get("Hostname", "") for k, _, _ in got)
    assert_vm_matches(got, batches)


def test_victoria_metrics_import_openmetrics(victoria_metrics_server: VictoriaMetricsServer) -> None:
    """OpenMetrics (timestamps in seconds): VictoriaMetrics 1.79 reads the seconds as such."""
    vm = victoria_metrics_server
    rid = run_id("vm-om")
    t0 = now_ms()
    batches = sim_batches(rid, "cumulative", t0, events=False)
    for b in batches:
        r = post(vm.import_prometheus_url, *encode(b, "openmetrics"))
        assert r.status_code == 204, r.text
    assert_vm_matches(vm_samples(vm, _sel(rid)), batches)


# -- compact, through the embedded receiver ------------------------------------------------------


def test_compact_through_receiver_into_prometheus(prometheus_server: PrometheusServer) -> None:
    prom = prometheus_server
    rid = run_id("compact")
    t0 = now_ms()
    batches = sim_batches(rid, "both", t0, n=5)
    with CompactReceiver(forward_url=prom.remote_write_url) as rx, httpx.Client(trust_env=False) as client:
        enc = Encoder("compact")
        sizes = []
        for b in batches:
            body, headers = enc.encode(b)
            sizes.append(len(body))
            r = client.post(rx.compact_url, content=body, headers=headers)
            assert r.status_code == 204, r.text
        assert rx.flush(30)
        stats = rx.stats
        assert stats["batches_forwarded"] == len(batches) and stats["forward_errors"] == 0, rx.forward_responses
        assert all(status == 204 for status, _ in rx.forward_responses)
    assert prom_samples(prom, _sel(rid), t0) == expected(batches)
    stale_at = batches[2].timestamp_ms
    assert prom.query('{%s="%s",gpu="3"}' % (RUN_LABEL, rid), time=(stale_at + 1000) / 1000) == []
    assert max(sizes[1:]) < sizes[0]  # dictionaries went once


# -- remote write 2.0 ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["prometheus", "victoria-metrics"])
def test_remote_write_2(which: str, prometheus_server: PrometheusServer,
                        victoria_metrics_server: VictoriaMetricsServer) -> None:
    srv = prometheus_server if which == "prometheus" else victoria_metrics_server
    rid = run_id("rw2-" + which)
    t0 = now_ms()
    batches = sim_batches(rid, "cumulative", t0, n=2, events=False)
    enc = Encoder("remote-write-2")
    for b in batches:
        body, headers = enc.encode(b)
        assert headers["Content-Type"] == "application/x-protobuf;proto=io.prometheus.write.v2.Request"
        assert headers["X-Prometheus-Remote-Write-Version"] == "2.0.0"
        # the official schema decodes it: every sample, with its start timestamp for counters
        decoded, _ = rw2_decode(body)
        assert sorted(d[:3] for d in decoded) == sorted((k, v, t) for k, v, t, _ in expected_samples(b))
        assert any(d[3] > 0 for d in decoded)
        r = post(srv.remote_write_url, body, headers)
        written = r.headers.get("X-Prometheus-Remote-Write-Samples-Written")
        if srv.accepts_rw2:
            assert r.status_code == 204 and written == str(len(decoded))
        else:
            # 1.0-only receivers: a 2xx that wrote nothing (the transport must fall back to 1.0)
            assert r.is_success, r.text
            assert written is None
    stored = (prom_samples(srv, _sel(rid), t0) if which == "prometheus"
              else vm_samples(srv, _sel(rid)))  # type: ignore[arg-type]
    if srv.accepts_rw2:
        assert stored == expected(batches)
    else:
        assert stored == []
    # the same batches by 1.0 land (the fallback a transport takes)
    for b in batches:
        assert post(srv.remote_write_url, *encode(b, "remote-write-1")).status_code == 204
    if which == "prometheus":
        assert prom_samples(srv, _sel(rid), t0) == expected(batches)  # type: ignore[arg-type]
    else:
        assert_vm_matches(vm_samples(srv, _sel(rid)), batches, stale=True)  # type: ignore[arg-type]


def test_rw1_stale_marker_bits_reach_the_wire() -> None:
    """(No server) the bodies these tests send carry the exact stale NaN."""
    b = sim_batches(run_id("bits"), "cumulative", now_ms(), n=3)[2]
    got, _, _ = rw1_decode(encode(b, "remote-write-1")[0])
    assert sum(v == STALE for _, v, _ in got) == len(b.stale_name_ids)
