"""Smoke tests of the real collectors the integration tests run against.

They check the harness in servers.py (start, ready, write, read back) and pin
what these server versions do with each write protocol, using a minimal
hand-written remote-write encoder so they depend on nothing in dcgmrelay.
"""

from __future__ import annotations

import itertools
import os
import struct
import time

import cramjam
import httpx
import pytest

from servers import PrometheusServer, VictoriaMetricsServer, find_binary, require_binaries

pytestmark = pytest.mark.integration

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A metric name no other test in this session writes."""
    return "%s_%d_%d" % (prefix, os.getpid(), next(_counter))


# --- minimal protobuf encoding of prometheus.WriteRequest (RW 1.0) and
# --- io.prometheus.write.v2.Request (RW 2.0) -------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _sample(value: float, ts_ms: int) -> bytes:
    # Sample{double value = 1; int64 timestamp = 2} (same numbers in v1 and v2)
    return _varint(1 << 3 | 1) + struct.pack("<d", value) + _varint(2 << 3 | 0) + _varint(ts_ms)


def rw1_request(series: list[tuple[dict[str, str], list[tuple[float, int]]]]) -> bytes:
    """WriteRequest{repeated TimeSeries timeseries = 1}; TimeSeries{labels = 1, samples = 2}."""
    out = b""
    for labels, samples in series:
        ts = b"".join(
            _len_field(1, _len_field(1, k.encode()) + _len_field(2, v.encode())) for k, v in sorted(labels.items())
        )
        ts += b"".join(_len_field(2, _sample(v, t)) for v, t in samples)
        out += _len_field(1, ts)
    return out


def rw2_request(series: list[tuple[dict[str, str], list[tuple[float, int]]]]) -> bytes:
    """Request{repeated string symbols = 4; repeated TimeSeries timeseries = 5}."""
    symbols = [""]
    index = {"": 0}

    def ref(s: str) -> int:
        if s not in index:
            index[s] = len(symbols)
            symbols.append(s)
        return index[s]

    body = b""
    for labels, samples in series:
        refs = b"".join(_varint(ref(k)) + _varint(ref(v)) for k, v in sorted(labels.items()))
        ts = _len_field(1, refs) + b"".join(_len_field(2, _sample(v, t)) for v, t in samples)
        body += _len_field(5, ts)
    return b"".join(_len_field(4, s.encode()) for s in symbols) + body


RW1_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
RW2_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
    "X-Prometheus-Remote-Write-Version": "2.0.0",
}


def snappy_block(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(data))


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers, timeout=30, trust_env=False)


def recent_ms() -> int:
    """A timestamp a little in the past, in whole milliseconds."""
    return int(time.time() * 1000) - 5_000


# --- harness ----------------------------------------------------------------
def test_find_binary_and_require(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_binary("definitely-not-a-server-binary") is None
    monkeypatch.delenv("CI", raising=False)
    reason = require_binaries("definitely-not-a-server-binary")
    assert reason is not None and "definitely-not-a-server-binary" in reason
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="definitely-not-a-server-binary"):
        require_binaries("definitely-not-a-server-binary")


def test_servers_listen_on_loopback(
    prometheus_server: PrometheusServer, victoria_metrics_server: VictoriaMetricsServer
) -> None:
    for srv in (prometheus_server, victoria_metrics_server):
        assert srv.running
        assert srv.url.startswith("http://127.0.0.1:")
        assert srv.remote_write_url == srv.url + "/api/v1/write"
        assert os.path.isdir(srv.tmpdir)
    assert victoria_metrics_server.import_prometheus_url == victoria_metrics_server.url + "/api/v1/import/prometheus"


def test_start_stop_removes_tempdir() -> None:
    reason = require_binaries("victoria-metrics")
    if reason:
        pytest.skip(reason)
    with VictoriaMetricsServer() as vm:
        tmp = vm.tmpdir
        assert httpx.get(vm.url + "/health", trust_env=False).status_code == 200
        proc = vm._proc
    assert proc is not None and proc.poll() is not None
    assert not os.path.exists(tmp)
    assert not vm.running


# --- VictoriaMetrics ----------------------------------------------------------
def test_victoria_metrics_import_prometheus_text_roundtrip(victoria_metrics_server: VictoriaMetricsServer) -> None:
    vm = victoria_metrics_server
    name = unique("DCGM_FI_DEV_GPU_TEMP")
    t1, t2 = 1_700_000_000_000, 1_700_000_015_250
    text = (
        f'{name}{{gpu="0",UUID="GPU-1234",modelName="NVIDIA H100 80GB HBM3"}} 42.5 {t1}\n'
        f'{name}{{gpu="0",UUID="GPU-1234",modelName="NVIDIA H100 80GB HBM3"}} 1234567.25 {t2}\n'
    )
    r = post(vm.import_prometheus_url, text.encode(), {"Content-Type": "text/plain"})
    assert r.status_code == 204, r.text

    exported = vm.export(name)
    assert exported == [
        {
            "metric": {"__name__": name, "gpu": "0", "UUID": "GPU-1234", "modelName": "NVIDIA H100 80GB HBM3"},
            "values": [42.5, 1234567.25],
            "timestamps": [t1, t2],
        }
    ]
    result = vm.query(name, time=t2 / 1000)
    assert [(s["metric"]["gpu"], s["value"]) for s in result] == [("0", [t2 / 1000, "1234567.25"])]
    assert vm.series(name) == [
        {"__name__": name, "gpu": "0", "UUID": "GPU-1234", "modelName": "NVIDIA H100 80GB HBM3"}
    ]


def test_victoria_metrics_remote_write_1_0(victoria_metrics_server: VictoriaMetricsServer) -> None:
    vm = victoria_metrics_server
    name = unique("DCGM_FI_DEV_POWER_USAGE")
    ts = recent_ms()
    samples = [(1234.5, ts - 1000), (float("inf"), ts)]  # values VictoriaMetrics stores exactly
    body = snappy_block(rw1_request([({"__name__": name, "gpu": "3"}, samples)]))
    r = post(vm.remote_write_url, body, RW1_HEADERS)
    assert r.status_code == 204, r.text
    assert vm.export(name) == [
        {"metric": {"__name__": name, "gpu": "3"}, "values": [1234.5, float("inf")], "timestamps": [ts - 1000, ts]}
    ]


# --- Prometheus -----------------------------------------------------------------
def test_prometheus_remote_write_1_0_roundtrip(prometheus_server: PrometheusServer) -> None:
    prom = prometheus_server
    name = unique("DCGM_FI_DEV_SM_CLOCK")
    ts = recent_ms()
    labels = {"__name__": name, "gpu": "1", "UUID": "GPU-abcd", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a"}
    body = snappy_block(rw1_request([(labels, [(0.1 + 0.2, ts)])]))
    r = post(prom.remote_write_url, body, RW1_HEADERS)
    assert r.status_code == 204, r.text

    # A range selector returns the raw samples with their own timestamps.
    raw = prom.query(f"{name}[1m]", time=ts / 1000)
    assert raw == [{"metric": labels, "values": [[ts / 1000, "0.30000000000000004"]]}]
    inst = prom.query(name, time=ts / 1000)
    assert inst == [{"metric": labels, "value": [ts / 1000, "0.30000000000000004"]}]
    assert prom.series(name) == [labels]
    rng = prom.query_range(name, start=ts / 1000, end=ts / 1000 + 2, step=1)
    assert rng == [{"metric": labels, "values": [[ts / 1000 + k, "0.30000000000000004"] for k in range(3)]}]


def test_prometheus_rejects_framed_snappy(prometheus_server: PrometheusServer) -> None:
    name = unique("framed")
    body = bytes(cramjam.snappy.compress(rw1_request([({"__name__": name}, [(1.0, recent_ms())])])))
    r = post(prometheus_server.remote_write_url, body, RW1_HEADERS)
    assert r.status_code == 400
    assert prometheus_server.series(name) == []


# --- remote write 2.0: what these versions really do ---------------------------
@pytest.mark.parametrize("which", ["prometheus", "victoria-metrics"])
def test_remote_write_2_0_support_matches_accepts_rw2(
    which: str, prometheus_server: PrometheusServer, victoria_metrics_server: VictoriaMetricsServer
) -> None:
    srv = prometheus_server if which == "prometheus" else victoria_metrics_server
    name = unique("rw2_probe")
    ts = recent_ms()
    r = post(srv.remote_write_url, snappy_block(rw2_request([({"__name__": name, "gpu": "0"}, [(7.0, ts)])])), RW2_HEADERS)
    stored = srv.query(f"{name}[1m]", time=ts / 1000)
    if srv.accepts_rw2:
        assert r.status_code == 204, r.text
        assert r.headers.get("X-Prometheus-Remote-Write-Samples-Written") == "1"
        assert stored == [{"metric": {"__name__": name, "gpu": "0"}, "values": [[ts / 1000, "7"]]}]
    else:
        # A 1.0-only receiver decodes the v2 body as an empty v1 WriteRequest:
        # success status, no *-Written headers, nothing stored. A sender must
        # not take a 2xx alone as proof that RW 2.0 data landed.
        assert r.is_success
        assert "X-Prometheus-Remote-Write-Samples-Written" not in r.headers
        assert stored == []
