#!/usr/bin/env python
"""Fault injection against the real relay process; writes docs/reliability.md.

    python benchmarks/reliability.py                 # quick mode (what CI runs), prints the table
    python benchmarks/reliability.py --long --out docs/reliability.md

Every scenario runs ``python -m dcgmrelay run --config ...`` as a subprocess, scraping
simulated dcgm-exporters (``dcgmrelay.simulate``) on 127.0.0.1 every second and
remote-writing to a real VictoriaMetrics (and Prometheus in the outage scenario)
started here (``tests/servers.py``). Between the relay and each receiver sits a fault
proxy (:class:`FaultProxy`) that can refuse connections ("down"), answer 429 with
Retry-After, answer 500, or hold requests before forwarding them ("slow").

Accounting, per exporter (its ``instance`` label):

* **sent**: every scrape the exporter answered is logged with its wall-clock time; it
  carries ``K`` relayed samples (the exporter's series kept by the collectors CSV,
  computed by parsing its body).
* **received**: ``/api/v1/export`` of VictoriaMetrics, exact per series and timestamp.
  The relay stamps a scrape's samples with the time the scrape started, so a served
  scrape at time ``s`` is the received timestamp ``t`` with ``t <= s <= t + timeout``
  (scrapes are an interval apart, longer than the timeout, so the match is unique).
* **lost**: samples of served scrapes not in the receiver. Scrapes the relay itself
  reported failed (``up`` = 0 in the receiver) are listed apart.
* **duplicated**: the proxy decodes every remote-write request the receiver accepted
  and counts each (series, timestamp) it forwarded; a second copy is a duplicate.
  VictoriaMetrics keeps duplicates too (checked: an export lists both copies), and
  both counts are reported.
* **peak RSS**: ``VmHWM`` of the relay process (``/proc/<pid>/status``), the largest
  over its restarts.

Nothing here reads outside the repository; every server listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import bisect
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # the real receivers: tests/servers.py
    sys.path.insert(0, str(ROOT / "tests"))

import dcgmrelay  # noqa: E402
from dcgmrelay.app import HEALTH_SERIES  # noqa: E402
from dcgmrelay.simulate import ExporterServer, SimulatedNode  # noqa: E402
from servers import (  # noqa: E402
    PrometheusServer,
    VictoriaMetricsServer,
    binary_version,
    free_port,
    require_binaries,
)

__all__ = ["Harness", "ScenarioResult", "SCENARIOS", "run_all", "render_markdown", "main"]

#: The relay's scrape body limit (``dcgmrelay.scraper.Scraper.body_limit_bytes``).
BODY_LIMIT = 64 * 1024 * 1024
INTERVAL_S = 1.0
TIMEOUT_S = 0.8


# ------------------------------------------------------------------------------------------
# Remote write 1.0 decoding (only what counting needs: labels and timestamps)


def _varint(b: bytes, i: int) -> Tuple[int, int]:
    shift = out = 0
    while True:
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        if c < 0x80:
            return out, i
        shift += 7


def _skip(b: bytes, i: int, wt: int) -> int:
    if wt == 0:
        return _varint(b, i)[1]
    if wt == 1:
        return i + 8
    if wt == 2:
        n, i = _varint(b, i)
        return i + n
    if wt == 5:
        return i + 4
    raise ValueError(f"protobuf wire type {wt} at byte {i}")


def rw1_samples(body: bytes) -> List[Tuple[Tuple[Tuple[str, str], ...], int]]:
    """``[(labels, timestamp_ms)]`` of a snappy-compressed remote write 1.0 request."""
    import cramjam

    raw = bytes(cramjam.snappy.decompress_raw(body))
    out = []
    i, n = 0, len(raw)
    while i < n:
        tag, i = _varint(raw, i)
        if tag >> 3 != 1 or tag & 7 != 2:  # not a TimeSeries (metadata)
            i = _skip(raw, i, tag & 7)
            continue
        ln, i = _varint(raw, i)
        end = i + ln
        labels: List[Tuple[str, str]] = []
        stamps: List[int] = []
        while i < end:
            t, i = _varint(raw, i)
            ln2, i = _varint(raw, i)
            sub, i = raw[i:i + ln2], i + ln2
            j, kv = 0, ["", ""]
            ts = 0
            while j < len(sub):
                t2, j = _varint(sub, j)
                f, wt = t2 >> 3, t2 & 7
                if t >> 3 == 1 and wt == 2:  # Label: name = 1, value = 2
                    ln3, j = _varint(sub, j)
                    kv[f - 1] = sub[j:j + ln3].decode()
                    j += ln3
                elif t >> 3 == 2 and f == 2 and wt == 0:  # Sample.timestamp
                    v, j = _varint(sub, j)
                    ts = v - (1 << 64) if v >= 1 << 63 else v
                else:
                    j = _skip(sub, j, wt)
            if t >> 3 == 1:
                labels.append((kv[0], kv[1]))
            elif t >> 3 == 2:
                stamps.append(ts)
        key = tuple(labels)
        out.extend((key, ts) for ts in stamps)
    return out


# ------------------------------------------------------------------------------------------
# The harness event loop (exporters and proxies), run in a thread


class Loop:
    """One asyncio loop in a daemon thread; ``call(coro)`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="reliability-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class LoggedExporter(ExporterServer):
    """A simulated exporter that logs when it answered each scrape (wall clock, ms)."""

    def __init__(self, node: SimulatedNode, kept_per_scrape: int) -> None:
        super().__init__(node)
        self.kept_per_scrape = kept_per_scrape
        self.served_ms: List[int] = []

    @property
    def instance(self) -> str:
        return self.url.split("/")[2]

    async def _handle(self, method, path, query, headers, body):  # type: ignore[no-untyped-def]
        if path == "/metrics":
            self.served_ms.append(int(time.time() * 1000))  # when the request arrived
        return await super()._handle(method, path, query, headers, body)


def kept_samples(node_args: Dict[str, Any], csv: str = "default") -> int:
    """Samples of one scrape of such a node that the relay forwards (the CSV's metric rows)."""
    s = dcgmrelay.parse(SimulatedNode(**node_args).render(0.0))
    return int(dcgmrelay.load_csv(csv).mask(s.field_ids).sum())


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of a receiver, with switchable faults.

    Modes: ``up`` (forward), ``down`` (listener closed: connection refused, open
    connections cut), ``429`` (answer 429 with ``Retry-After``), ``500`` (answer 500;
    ``p500`` < 1 answers 500 to that share of requests and forwards the rest), ``slow``
    (hold each request ``delay()`` seconds, then forward it whether or not the client
    is still there, as a collector that is merely slow would).

    For each request the receiver accepted, the (series, timestamp) pairs are counted
    in ``delivered``: a count above 1 is a duplicate at the receiver.
    """

    def __init__(self, loop: Loop, upstream: str) -> None:
        self.loop = loop
        self.upstream = upstream.rstrip("/")
        self.port = 0
        self.mode = "up"
        self.retry_after = "1"
        self.p500 = 1.0
        self.delay: Callable[[], float] = lambda: 0.0
        self.rng = random.Random(7)
        self.delivered: Counter = Counter()
        self.requests: Counter = Counter()  # by what happened: forwarded, 429, 500, ...
        self.gone_forwarded = 0  # requests forwarded after their client had given up
        self.gone_samples = 0
        self.dup_requests = 0  # forwarded requests holding a sample delivered before
        self.forwarded_samples = 0  # in requests the receiver accepted
        self._server: Optional[asyncio.base_events.Server] = None
        self._writers: set = set()
        self._busy: set = set()
        self._client: Optional[httpx.AsyncClient] = None
        loop.call(self._start())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(timeout=60.0, trust_env=False)
        # the listener stays open for the whole run: a port given back could be taken by
        # another process's outgoing connection before it is bound again
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _go_down(self) -> None:
        for w in list(self._writers):
            if w not in self._busy:  # idle keep-alive connections end now; busy ones after their answer
                self._reset(w)

    def set_mode(self, mode: str, **kw: Any) -> None:
        """Switch mode (from any thread). ``down``: new connections are reset, idle ones
        closed, a request being forwarded completes and its connection is then closed."""
        for k, v in kw.items():
            setattr(self, k, v)
        self.mode = mode
        if mode == "down":
            self.loop.call(self._go_down())

    def close(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            if self._client is not None:
                await self._client.aclose()

        self.loop.call(_close())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                if self.mode == "down":
                    self.requests["reset"] += 1
                    self._reset(writer)
                    return
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                self._busy.add(writer)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, rbody, extra = await self._answer(path, headers, body, reader)
                if status is None:
                    return
                hdr = [f"HTTP/1.1 {status} X", f"Content-Length: {len(rbody)}", *extra]
                writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode("latin-1") + rbody)
                await writer.drain()
                self._busy.discard(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._busy.discard(writer)
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, path: str, headers: Dict[str, str], body: bytes,
                      reader: asyncio.StreamReader) -> Tuple[Optional[int], bytes, List[str]]:
        mode = self.mode
        if mode == "down":  # went down after this request's head arrived: not taken
            self.requests["cut"] += 1
            return None, b"", []
        if mode == "429":
            self.requests["429"] += 1
            return 429, b"too many requests\n", [f"Retry-After: {self.retry_after}"]
        if mode == "500" and self.rng.random() < self.p500:
            self.requests["500"] += 1
            return 500, b"internal server error\n", []
        eof = None
        if mode == "slow":
            # hold the request; notice the client hanging up (EOF) meanwhile
            eof = asyncio.ensure_future(reader.read(1))
            await asyncio.wait({eof}, timeout=self.delay())
        fwd = {k: v for k, v in headers.items() if k.startswith(("content-", "x-prometheus", "user-agent"))
               and k != "content-length"}
        assert self._client is not None
        try:
            r = await self._client.post(self.upstream + path, content=body, headers=fwd)
        except httpx.HTTPError as e:
            self.requests["upstream_error"] += 1
            return 502, f"upstream: {e}\n".encode(), []
        finally:
            gone = eof is not None and eof.done() and not eof.cancelled() and eof.result() == b""
            if eof is not None and not eof.done():
                eof.cancel()
                with contextlib.suppress(BaseException):
                    await eof
        self.requests[f"forwarded_{r.status_code}"] += 1
        if 200 <= r.status_code < 300:
            pairs = rw1_samples(body)
            if any(self.delivered[p] for p in pairs):
                self.dup_requests += 1
            for p in pairs:
                self.delivered[p] += 1
            self.forwarded_samples += len(pairs)
            if gone:
                self.gone_forwarded += 1
                self.gone_samples += len(pairs)
        if gone:
            return None, b"", []
        return r.status_code, r.content, []

    def duplicates(self, instance: Optional[str] = None, dcgm_only: bool = True) -> int:
        """Second and later copies the receiver accepted, of the exporters' samples (``dcgm_only``)
        or of every sample (the relay's ``up``, ``scrape_*`` too); of one exporter's when given."""
        return sum(c - 1 for (labels, _ts), c in self.delivered.items()
                   if c > 1 and (instance is None or ("instance", instance) in labels)
                   and (not dcgm_only or dict(labels).get("__name__", "").startswith("DCGM_")))


# ------------------------------------------------------------------------------------------
# The relay process


def _metric_values(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(values: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values.items()
               if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


_LIVE_RELAYS: "set[RelayProcess]" = set()


def kill_leftover_relays() -> None:
    """kill -9 every relay process a failed scenario left running."""
    for r in list(_LIVE_RELAYS):
        if r.proc is not None and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)
        _LIVE_RELAYS.discard(r)


atexit.register(kill_leftover_relays)


class RelayProcess:
    """``python -m dcgmrelay run --config FILE`` with its log, self-metrics and peak RSS."""

    def __init__(self, workdir: Path, config: str, *, wrap: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.config_path = workdir / "relay.yaml"
        self.config_path.write_text(config)
        self.listen = next(line.split('"')[1] for line in config.splitlines() if line.startswith("listen:"))
        self.wrap = list(wrap)
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0
        self.peak_rss_kib = 0
        self.last_metrics: Dict[Any, float] = {}
        self.exit_codes: List[Optional[int]] = []
        self.stop_ms: List[int] = []  # wall-clock ms of each SIGTERM
        self._stop_poll = threading.Event()
        self._poller: Optional[threading.Thread] = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"relay-{self.runs}.log"

    def start(self, timeout: float = 60.0) -> "RelayProcess":
        self.runs += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [*self.wrap, sys.executable, "-m", "dcgmrelay", "run", "--config", str(self.config_path)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=str(self.workdir))
        _LIVE_RELAYS.add(self)
        self._stop_poll.clear()
        self._poller = threading.Thread(target=self._poll_rss, args=(self.proc.pid,), daemon=True)
        self._poller.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.listen}/readyz", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"relay not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _read_hwm(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))

    def _poll_rss(self, pid: int) -> None:
        while not self._stop_poll.wait(0.2):
            self._read_hwm(pid)

    def metrics(self) -> Dict[Any, float]:
        r = httpx.get(f"http://{self.listen}/metrics", timeout=10.0, trust_env=False)
        r.raise_for_status()
        self.last_metrics = _metric_values(r.text)
        return self.last_metrics

    def wait_drained(self, timeout: float, settle: float = 2.0) -> bool:
        """Until no spool holds a record and nothing is in flight (``settle`` s in a row)."""
        deadline = time.monotonic() + timeout
        calm_since: Optional[float] = None
        while time.monotonic() < deadline:
            m = self.metrics()
            busy = metric_sum(m, "dcgmrelay_spool_records") + metric_sum(m, "dcgmrelay_output_requests_in_flight")
            if busy == 0:
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since >= settle:
                    return True
            else:
                calm_since = None
            time.sleep(0.25)
        return False

    def _end(self) -> None:
        self._stop_poll.set()
        if self._poller is not None:
            self._poller.join(2)

    def kill9(self) -> None:
        assert self.proc is not None
        self._read_hwm(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.exit_codes.append(self.proc.wait(30))
        self._end()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the relay flushes, spools the rest, exits); the last self-metrics first."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                self.metrics()
            self._read_hwm(self.proc.pid)
            self.stop_ms.append(int(time.time() * 1000))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._end()
        self.exit_codes.append(self.proc.returncode)
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join((self.workdir / f"relay-{i}.log").read_text(errors="replace")
                         for i in range(1, self.runs + 1) if (self.workdir / f"relay-{i}.log").exists())


def relay_config(targets: Sequence[str], outputs: Sequence[Tuple[str, str]], workdir: Path, *,
                 spool_dir: Optional[Path] = None, retry: str = "{min_backoff: 200ms, max_backoff: 2s, max_elapsed: 5s}",
                 output_timeout: str = "5s", extra: str = "") -> str:
    """The relay's YAML: one static job, remote write 1.0 outputs ``(name, url)``, a spool."""
    lines = [
        "global: {interval: %gs, timeout: %dms}" % (INTERVAL_S, TIMEOUT_S * 1000),
        "targets:",
        "  - name: dcgm",
        "    endpoints:",
        *[f"      - url: {u}" for u in targets],
        "outputs:",
    ]
    for name, url in outputs:
        lines += [f"  - name: {name}", "    type: remote-write", f"    url: {url}/api/v1/write",
                  f"    timeout: {output_timeout}", f"    retry: {retry}"]
    lines += [
        f"spool: {{dir: {spool_dir or workdir / 'spool'}, fsync: batch}}",
        f"relay: {{state_path: {workdir / 'state.npz'}}}",
        f'listen: "127.0.0.1:{free_port()}"',
        "logging: {level: info, format: plain}",
    ]
    return "\n".join(lines) + "\n" + extra


# ------------------------------------------------------------------------------------------
# Accounting


@dataclasses.dataclass
class Account:
    """What one exporter served against what one receiver holds."""

    scrapes: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    lost_scrapes: int = 0
    failed_scrapes: int = 0  # the relay reported the scrape failed (up = 0)
    failed_samples: int = 0
    duplicated_receiver: int = 0
    unmatched_timestamps: int = 0
    failed_unserved: int = 0
    series: int = 0
    lost_at_ms: List[int] = dataclasses.field(default_factory=list)
    # scrapes in progress when the relay was told to stop (SIGTERM): requested within a scrape
    # timeout of the signal (the exporter may serve them just after it), none of their samples
    # relayed. Shutdown abandons a scrape it has not read yet, as Prometheus does; at most one
    # per exporter per stop, so these are counted apart from the lost.
    abandoned_at_stop_ms: List[int] = dataclasses.field(default_factory=list)


def _rows(export: List[Dict[str, Any]]) -> Tuple[Counter, Counter, Dict[int, float], int]:
    rows: Counter = Counter()  # ts -> samples of DCGM series (copies included)
    distinct: Counter = Counter()  # ts -> DCGM series with a sample at ts
    up: Dict[int, float] = {}
    series = 0
    for s in export:
        name = s["metric"].get("__name__", "")
        if name == "up":
            for ts, v in zip(s["timestamps"], s["values"]):
                up[ts] = min(up.get(ts, 1.0), float(v))
        elif name.startswith("DCGM_"):
            series += 1
            c = Counter(s["timestamps"])
            rows.update(c)
            distinct.update(c.keys())
    return rows, distinct, up, series


def account(served_ms: Sequence[int], kept: int, export: List[Dict[str, Any]],
            timeout_ms: int = int(TIMEOUT_S * 1000), interval_ms: int = int(INTERVAL_S * 1000),
            stops_ms: Sequence[int] = ()) -> Account:
    """Match served scrapes to received timestamps: the scrape that started at ``t`` reached the
    exporter at ``t <= s <= t + timeout``. A scrape the relay reported failed (``up`` = 0, no
    samples) may have reached the exporter later (the relay gave up first), before the next tick."""
    rows, distinct, up, series = _rows(export)
    a = Account(scrapes=len(served_ms), sent=len(served_ms) * kept, series=series)
    served = sorted(served_ms)
    taken = [False] * len(served)
    matched: Dict[int, int] = {}
    failed_ts = sorted(ts for ts, v in up.items() if v == 0.0 and ts not in rows)
    with_data = sorted(set(rows) | (set(up) - set(failed_ts)))
    for group, late in ((with_data, timeout_ms + 50), (failed_ts, interval_ms - 50)):
        for ts in group:
            i = bisect.bisect_left(served, ts - 20)
            while i < len(served) and taken[i]:
                i += 1
            if i < len(served) and served[i] <= ts + late:
                taken[i] = True
                matched[i] = ts
            elif group is with_data:
                a.unmatched_timestamps += 1  # samples of a scrape the exporter did not serve
            else:
                a.failed_unserved += 1  # the relay failed a scrape before the exporter saw it
    for i, s in enumerate(served):
        ts = matched.get(i)
        got = distinct.get(ts, 0) if ts is not None else 0
        a.received += got
        if ts is not None:
            a.duplicated_receiver += rows[ts] - distinct[ts]
        if got < kept:
            if ts is not None and up.get(ts) == 0.0 and got == 0:
                a.failed_scrapes += 1
                a.failed_samples += kept
            elif got == 0 and any(k - timeout_ms <= s <= k + timeout_ms for k in stops_ms):
                a.abandoned_at_stop_ms.append(s)
            else:
                a.lost += kept - got
                a.lost_scrapes += 1
                a.lost_at_ms.append(s)
    return a


# ------------------------------------------------------------------------------------------
# Scenarios


@dataclasses.dataclass
class ScenarioResult:
    name: str
    title: str
    receiver: str = "VictoriaMetrics"
    duration_s: float = 0.0
    scrapes: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    failed_scrapes: int = 0
    failed_samples: int = 0
    duplicated: int = 0  # counted at the proxy (accepted by the receiver)
    duplicated_receiver: int = 0  # counted in the receiver's export
    dup_bound: Optional[int] = None
    unmatched: int = 0
    peak_rss_mib: float = 0.0
    relay_runs: int = 1
    exit_codes: List[Optional[int]] = dataclasses.field(default_factory=list)
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    log: str = ""

    def row(self) -> List[str]:
        bound = "—" if self.dup_bound is None else f"≤ {self.dup_bound}"
        return [self.name, self.receiver, f"{self.duration_s:.0f}", str(self.scrapes), str(self.sent),
                str(self.received), str(self.lost), str(self.duplicated), bound, f"{self.peak_rss_mib:.0f}"]


class Harness:
    """Shared pieces of one run: the receivers, the harness loop, a work directory."""

    def __init__(self, mode: str = "quick", workdir: Optional[Path] = None, prometheus: bool = True) -> None:
        if mode not in ("quick", "long"):
            raise ValueError(f"mode must be quick or long, not {mode!r}")
        self.mode = mode
        self.long = mode == "long"
        reason = require_binaries("victoria-metrics", *(["prometheus"] if prometheus else []))
        if reason:
            raise RuntimeError(reason)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dcgmrelay-reliability-"))
        self.loop = Loop()
        self.vm = VictoriaMetricsServer().start()
        self.prom = PrometheusServer().start() if prometheus else None
        self._seed = 100
        self._lock = threading.Lock()
        self.finished: Dict[int, Dict[str, float]] = {}  # per relay: when its scenario ended

    def close(self) -> None:
        kill_leftover_relays()
        for srv in (self.vm, self.prom):
            if srv is not None:
                srv.stop()
        self.loop.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir(self, name: str) -> Path:
        d = self.workdir / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def exporters(self, n: int, n_gpus: int = 4) -> List[LoggedExporter]:
        out = []
        for _ in range(n):
            with self._lock:
                self._seed += 1
                seed = self._seed
            args = dict(n_gpus=n_gpus, seed=seed, collect_interval=1.0)
            ex = LoggedExporter(SimulatedNode(**args), kept_samples(args))
            self.loop.call(ex.start())
            out.append(ex)
        return out

    def stop_exporters(self, exporters: Sequence[LoggedExporter]) -> None:
        for ex in exporters:
            self.loop.call(ex.stop())

    def vm_export(self, instance: str) -> List[Dict[str, Any]]:
        return self.vm.export('{instance="%s"}' % instance, start=1)

    def prom_export(self, instance: str) -> List[Dict[str, Any]]:
        """Raw samples from Prometheus in the export's shape (a range selector at now)."""
        assert self.prom is not None
        res = self.prom.query('{instance="%s"}[1h]' % instance, time=time.time() + 1)
        return [{"metric": r["metric"], "timestamps": [int(round(float(t) * 1000)) for t, _ in r["values"]],
                 "values": [float(v) for _, v in r["values"]]} for r in res]

    def settle_receiver(self) -> None:
        time.sleep(1.0)  # the receivers make rows searchable about once a second
        self.vm.flush()


def output_metrics(m: Dict[Any, float], output: str) -> Dict[str, float]:
    """One output's counters from the relay's last self-metrics (its last run)."""
    return {
        "batches_sent": metric_sum(m, "dcgmrelay_output_batches_sent_total", output=output),
        "samples_sent": metric_sum(m, "dcgmrelay_output_samples_sent_total", output=output),
        "retries": metric_sum(m, "dcgmrelay_output_retries_total", output=output),
        "spooled_batches": metric_sum(m, "dcgmrelay_output_spooled_batches_total", output=output),
        "dropped_batches": metric_sum(m, "dcgmrelay_output_batches_dropped_total", output=output),
        "spool_dropped_records": metric_sum(m, "dcgmrelay_spool_dropped_records_total", output=output),
        "scrapes_failed": metric_sum(m, "dcgmrelay_scrapes_total", result="failed"),
    }


def _finish(h: Harness, res: ScenarioResult, relay: RelayProcess, exporters: Sequence[LoggedExporter],
            proxy: Optional[FaultProxy], t0: float,
            export: Optional[Callable[[str], List[Dict[str, Any]]]] = None, output: str = "vm") -> ScenarioResult:
    """Stop the exporters (once) and count what they served against one receiver."""
    if "duration_s" not in h.finished.setdefault(id(relay), {}):
        h.stop_exporters(exporters)
        h.finished[id(relay)]["duration_s"] = time.monotonic() - t0
        h.settle_receiver()
    res.duration_s = h.finished[id(relay)]["duration_s"]
    export = export or h.vm_export
    for ex in exporters:
        a = account(ex.served_ms, ex.kept_per_scrape, export(ex.instance), stops_ms=relay.stop_ms)
        res.scrapes += a.scrapes
        res.sent += a.sent
        res.received += a.received
        res.lost += a.lost
        res.failed_scrapes += a.failed_scrapes
        res.failed_samples += a.failed_samples
        res.facts["failed_scrapes_not_served"] = res.facts.get("failed_scrapes_not_served", 0) + a.failed_unserved
        res.duplicated_receiver += a.duplicated_receiver
        res.unmatched += a.unmatched_timestamps
        if proxy is not None:
            res.duplicated += proxy.duplicates(ex.instance)
        res.facts.setdefault("series", []).append(a.series)
        res.facts.setdefault("kept_per_scrape", []).append(ex.kept_per_scrape)
        res.facts.setdefault("lost_at_ms", []).extend(a.lost_at_ms)
        res.facts.setdefault("abandoned_at_stop_ms", []).extend(a.abandoned_at_stop_ms)
        res.facts["abandoned_at_stop_samples"] = (res.facts.get("abandoned_at_stop_samples", 0)
                                                  + len(a.abandoned_at_stop_ms) * ex.kept_per_scrape)
    res.facts["stops"] = len(relay.stop_ms)
    res.peak_rss_mib = relay.peak_rss_kib / 1024
    res.relay_runs = relay.runs
    res.exit_codes = list(relay.exit_codes)
    res.metrics = output_metrics(relay.last_metrics, output)
    res.facts["dropped_by_reason"] = {dict(lab)["reason"]: v for (n, lab), v in relay.last_metrics.items()
                                      if n == "dcgmrelay_output_batches_dropped_total"
                                      and dict(lab).get("output") == output}
    if proxy is not None:
        res.facts["proxy_requests"] = dict(proxy.requests)
        res.facts["dup_requests"] = proxy.dup_requests
    res.log = relay.logs()
    return res


def _outage(h: Harness, name: str, title: str, mode: str, seconds: float, warmup: float = 4.0,
            with_prometheus: bool = False, **proxy_kw: Any) -> List[ScenarioResult]:
    """Run a relay; put the collector(s) in ``mode`` for ``seconds``; back; drain; count."""
    d = h.dir(name)
    exporters = h.exporters(2)
    receivers = [("vm", FaultProxy(h.loop, h.vm.url))]
    if with_prometheus and h.prom is not None:
        receivers.append(("prometheus", FaultProxy(h.loop, h.prom.url)))
    relay = RelayProcess(d, relay_config([e.url for e in exporters], [(n, p.url) for n, p in receivers], d))
    t0 = time.monotonic()
    relay.start()
    time.sleep(warmup)
    for _, p in receivers:
        p.set_mode(mode, **proxy_kw)
    fault_at = time.time()
    time.sleep(seconds)
    for _, p in receivers:
        p.set_mode("up")
    relay.wait_drained(timeout=120 + seconds)
    relay.stop()
    out = []
    for rname, proxy in receivers:
        res = _finish(h, ScenarioResult(name, title, receiver="VictoriaMetrics" if rname == "vm" else "Prometheus"),
                      relay, exporters, proxy, t0, export=h.vm_export if rname == "vm" else h.prom_export,
                      output=rname)
        res.facts["fault_seconds"] = seconds
        res.facts["fault_started"] = fault_at
        res.dup_bound = 0 if mode in ("down", "429", "500") else None
        proxy.close()
        out.append(res)
    return out


def scenario_outage(h: Harness) -> List[ScenarioResult]:
    secs = 300.0 if h.long else 60.0
    return _outage(h, "collector-down", f"collector down (connection refused) for {secs:.0f} s", "down", secs,
                   with_prometheus=h.prom is not None)


def scenario_429(h: Harness) -> List[ScenarioResult]:
    secs = 60.0 if h.long else 15.0
    return _outage(h, "429-storm", f"every request answered 429 with Retry-After: 2 for {secs:.0f} s", "429",
                   secs, retry_after="2")


def scenario_500(h: Harness) -> List[ScenarioResult]:
    secs = 60.0 if h.long else 15.0
    res = _outage(h, "500s", f"every second request answered 500 for {secs:.0f} s (random, p = 0.5)", "500",
                  secs, p500=0.5)
    return res


def scenario_slow(h: Harness) -> List[ScenarioResult]:
    """Requests held 0.2-4 s before forwarding, with a 2 s output timeout: some time out at the
    relay and are retried although the receiver got them (duplicates, bounded by those)."""
    secs = 60.0 if h.long else 20.0
    rng = random.Random(3)
    d = h.dir("slow-collector")
    exporters = h.exporters(2)
    proxy = FaultProxy(h.loop, h.vm.url)
    relay = RelayProcess(d, relay_config([e.url for e in exporters], [("vm", proxy.url)], d,
                                         output_timeout="2s"))
    t0 = time.monotonic()
    relay.start()
    time.sleep(3.0)
    proxy.set_mode("slow", delay=lambda: rng.uniform(0.2, 4.0))
    time.sleep(secs)
    proxy.set_mode("up")
    relay.wait_drained(timeout=120)
    relay.stop()
    res = _finish(h, ScenarioResult("slow-collector", f"requests held 0.2-4 s (output timeout 2 s) for {secs:.0f} s"),
                  relay, exporters, proxy, t0)
    # at-least-once: a copy beyond the first can only come from a request the receiver accepted
    # but whose answer the relay did not get (it timed out first): the samples the receiver took
    # beyond what the relay counts as delivered. Requests hold whole scrapes, each K exporter
    # samples plus the relay's health series, so the bound in exporter samples is in proportion.
    unacked = proxy.forwarded_samples - int(res.metrics["samples_sent"])
    k = exporters[0].kept_per_scrape
    res.dup_bound = unacked * k // (k + len(HEALTH_SERIES))
    res.facts["unacked_samples"] = unacked
    res.facts["duplicated_all_samples"] = proxy.duplicates(dcgm_only=False)
    res.facts["forwarded_after_timeout"] = proxy.gone_forwarded
    res.facts["forwarded_after_timeout_samples"] = proxy.gone_samples
    proxy.close()
    return [res]


def scenario_kill9(h: Harness, kills: Optional[int] = None) -> List[ScenarioResult]:
    """kill -9 at random moments (some while the collector is down), restart on the same spool."""
    kills = kills or (30 if h.long else 10)
    rng = random.Random(9)
    d = h.dir("kill-9")
    exporters = h.exporters(2)
    proxy = FaultProxy(h.loop, h.vm.url)
    relay = RelayProcess(d, relay_config([e.url for e in exporters], [("vm", proxy.url)], d,
                                         retry="{min_backoff: 100ms, max_backoff: 500ms, max_elapsed: 1s}"))
    t0 = time.monotonic()
    kill_times = []
    downs = 0
    for _ in range(kills):
        down = rng.random() < 0.3
        downs += down
        proxy.set_mode("down" if down else "up")
        relay.start()
        time.sleep(rng.uniform(1.0, 7.0))
        kill_times.append(int(time.time() * 1000))
        relay.kill9()
    proxy.set_mode("up")
    relay.start()
    relay.wait_drained(timeout=120, settle=3.0)
    relay.stop()
    res = _finish(h, ScenarioResult("kill-9", f"kill -9 at {kills} random moments ({downs} with the collector down), "
                                    "restart on the same spool"), relay, exporters, proxy, t0)
    res.facts["kills"] = kills
    res.facts["kills_while_down"] = downs
    res.facts["kill_ms"] = kill_times
    # the documented bound: duplicates <= requests in flight at a crash (max_in_flight = 1)
    res.dup_bound = kills * 1 * 2000
    res.facts["dup_request_bound"] = kills
    # Outputs with a spool are write-ahead: a batch is on disk before it is sent, so a kill
    # can only lose a scrape still in progress (requested, not yet parsed, relayed and
    # appended): one whose request started at most a scrape timeout before the kill, plus 3 s
    # for a process starved of CPU by the scenarios running beside it on 2 cores (seen: a
    # scrape served 2.4 s before a kill, not yet relayed). Any other lost scrape is a bug.
    window_ms = int((TIMEOUT_S + 3.0) * 1000)
    lost_at = sorted(res.facts.get("lost_at_ms", []))
    nxt = [next((k for k in kill_times if k >= t), None) for t in lost_at]
    res.facts["memory_window_s"] = window_ms / 1000
    res.facts["lost_scrapes_in_memory_window"] = sum(1 for t, k in zip(lost_at, nxt) if k is not None
                                                     and k - t <= window_ms)
    outside = [(t, k) for t, k in zip(lost_at, nxt) if k is None or k - t > window_ms]
    res.facts["lost_scrapes_outside_memory_window"] = len(outside)
    if outside:  # (served at, next kill) in ms, to find them in the relay logs
        res.facts["lost_outside_memory_window_at"] = outside
    proxy.close()
    return [res]


def _in_private_tmpfs(size: str, mountpoint: Path) -> List[str]:
    """Command prefix: a private mount namespace with a ``size`` tmpfs on ``mountpoint``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("the disk-full scenario needs unshare(1) (util-linux)")
    ns = ["-m"] if os.geteuid() == 0 else ["-Urm"]
    return [unshare, *ns, "--propagation", "private", "--", "sh", "-c",
            f'mount -t tmpfs -o size={size} dcgmrelay-spool "{mountpoint}" || exit 97; exec "$@"', "sh"]


def tmpfs_available() -> Optional[str]:
    """None when a private tmpfs can be mounted here; else why not."""
    d = Path(tempfile.mkdtemp(prefix="dcgmrelay-tmpfs-probe-"))
    try:
        r = subprocess.run([*_in_private_tmpfs("64k", d), "true"], capture_output=True, text=True, timeout=30)
        return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def scenario_disk_full(h: Harness) -> List[ScenarioResult]:
    """The spool's filesystem fills up (real ENOSPC: a 160 KiB tmpfs) during an outage; it is
    grown later (remount), then the collector returns."""
    secs = 60.0 if h.long else 24.0
    d = h.dir("disk-full")
    mnt = d / "spoolfs"
    mnt.mkdir()
    exporters = h.exporters(2, n_gpus=8)
    proxy = FaultProxy(h.loop, h.vm.url)
    relay = RelayProcess(d, relay_config([e.url for e in exporters], [("vm", proxy.url)], d, spool_dir=mnt / "spool",
                                         retry="{min_backoff: 100ms, max_backoff: 500ms, max_elapsed: 1s}"),
                         wrap=_in_private_tmpfs("160k", mnt))
    t0 = time.monotonic()
    relay.start()
    time.sleep(3.0)
    proxy.set_mode("down")
    time.sleep(secs * 2 / 3)  # the spool fills and refuses appends
    full = relay.metrics()
    assert relay.proc is not None
    r = subprocess.run(["nsenter", "-t", str(relay.proc.pid), "-m", "--", "mount", "-o", "remount,size=64m",
                        str(mnt)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"could not grow the spool's tmpfs: {r.stderr.strip()}")
    time.sleep(secs / 3)  # space is back: the spool takes batches again
    proxy.set_mode("up")
    relay.wait_drained(timeout=120)
    relay.stop()
    res = _finish(h, ScenarioResult("disk-full", f"collector down {secs:.0f} s, spool on a full 160 KiB tmpfs "
                                    f"(ENOSPC), grown after {secs * 2 / 3:.0f} s"), relay, exporters, proxy, t0)
    res.dup_bound = 0
    res.facts["dropped_when_full"] = {
        "batches_dropped_spool_error": metric_sum(full, "dcgmrelay_output_batches_dropped_total", reason="spool_error"),
        "spool_disk_full_records": metric_sum(full, "dcgmrelay_spool_dropped_records_total", reason="disk_full"),
    }
    res.facts["dropped_batches_spool_error"] = metric_sum(relay.last_metrics, "dcgmrelay_output_batches_dropped_total",
                                                          reason="spool_error")
    res.facts["spool_disk_full_records"] = metric_sum(relay.last_metrics, "dcgmrelay_spool_dropped_records_total",
                                                      reason="disk_full")
    res.facts["max_samples_per_request"] = 2000
    res.facts["spooled_after_growth"] = res.metrics["spooled_batches"] - metric_sum(
        full, "dcgmrelay_output_spooled_batches_total")
    proxy.close()
    return [res]


# -- hostile exporters (a separate process, so their traffic cannot slow the healthy exporters)

_HOSTILE_KINDS = ("garbage", "1gb-body", "endless-line", "slowloris")


async def _hostile_main() -> None:
    served: Counter = Counter()
    filler = b"".join(b'filler_metric{i="%07d",pad="%s"} 1\n' % (i, b"x" * 64) for i in range(12000))
    rnd = random.Random(5)
    garbage = bytes(rnd.getrandbits(8) for _ in range(256 * 1024)) + b"\nok_metric 1\n"

    def handler(kind: str) -> Callable[..., Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                if kind == "garbage":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(garbage) + garbage)
                    served[kind] += len(garbage)
                elif kind == "1gb-body":  # valid lines, generated as they are read: never held here
                    total = 1 << 30
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n" % total)
                    sent = 0
                    while sent < total:
                        chunk = filler[:total - sent]
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
                        served[kind] += len(chunk)
                elif kind == "endless-line":  # one line that never ends (chunked, no length)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"7\r\nendless\r\n")
                    part = b"x" * (1 << 20)
                    chunk = b"%x\r\n%s\r\n" % (len(part), part)
                    while True:
                        writer.write(chunk)
                        await writer.drain()
                        served[kind] += len(part)
                elif kind == "slowloris":  # promises 100 kB, sends a byte every 100 ms
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
                    while True:
                        writer.write(b"a")
                        await writer.drain()
                        served[kind] += 1
                        await asyncio.sleep(0.1)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()
        return handle

    urls = {}
    for kind in _HOSTILE_KINDS:
        srv = await asyncio.start_server(handler(kind), "127.0.0.1", 0)
        urls[kind] = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/metrics"
    print(json.dumps(urls), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(json.dumps(dict(served)), flush=True)


def scenario_hostile(h: Harness) -> List[ScenarioResult]:
    """Garbage, a 1 GiB body, an endless line and a slowloris trickle beside two healthy exporters."""
    secs = 120.0 if h.long else 20.0
    d = h.dir("hostile")
    hostile = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-hostile"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert hostile.stdout is not None
        urls = json.loads(hostile.stdout.readline())
        exporters = h.exporters(2, n_gpus=8)
        proxy = FaultProxy(h.loop, h.vm.url)
        relay = RelayProcess(d, relay_config([e.url for e in exporters] + list(urls.values()), [("vm", proxy.url)], d))
        t0 = time.monotonic()
        relay.start()
        started = time.time()
        time.sleep(secs)
        window = time.time() - started
        relay.wait_drained(timeout=60)
        relay.stop()
    finally:
        hostile.send_signal(signal.SIGTERM)
        out, _ = hostile.communicate(timeout=30)
    res = _finish(h, ScenarioResult("hostile", f"{len(_HOSTILE_KINDS)} hostile exporters ({', '.join(_HOSTILE_KINDS)}) "
                                    f"beside 2 healthy ones, {secs:.0f} s"), relay, exporters, proxy, t0)
    res.dup_bound = 0
    m = relay.last_metrics
    res.facts["hostile_bytes_served"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    res.facts["window_s"] = window
    res.facts["ticks_in_window"] = int(window / INTERVAL_S)
    res.facts["healthy"] = {ex.instance: {
        "ok": metric_sum(m, "dcgmrelay_scrapes_total", target=ex.url, result="ok"),
        "failed": metric_sum(m, "dcgmrelay_scrapes_total", target=ex.url, result="failed"),
        "served": len(ex.served_ms)} for ex in exporters}
    res.facts["hostile"] = {kind: {
        "ok": metric_sum(m, "dcgmrelay_scrapes_total", target=u, result="ok"),
        "failed": metric_sum(m, "dcgmrelay_scrapes_total", target=u, result="failed"),
        "rejected_lines": metric_sum(m, "dcgmrelay_parse_rejected_lines_total", target=u)}
        for kind, u in urls.items()}
    res.facts["hostile_urls"] = urls
    res.facts["rss_bound_mib"] = rss_bound_mib(2)
    proxy.close()
    return [res]


def rss_bound_mib(big_bodies: int) -> float:
    """The stated bound on the relay's peak RSS: a base of 128 MiB (interpreter, numpy, httpx,
    the parser's tables; about 55 MiB measured) plus, per target sending an oversized body at the
    same time, twice the body limit (the chunks read until the limit, and the allocator's slack)."""
    return 128 + big_bodies * 2 * BODY_LIMIT / (1 << 20)


SCENARIOS: Dict[str, Callable[[Harness], List[ScenarioResult]]] = {
    "collector-down": scenario_outage,
    "429-storm": scenario_429,
    "500s": scenario_500,
    "slow-collector": scenario_slow,
    "kill-9": scenario_kill9,
    "disk-full": scenario_disk_full,
    "hostile": scenario_hostile,
}
#: Run alone (after the others), since it loads the machine on purpose.
SERIAL = ("hostile",)


def run_all(h: Harness, names: Optional[Sequence[str]] = None,
            progress: Callable[[str], None] = lambda s: None) -> Dict[str, List[ScenarioResult]]:
    """Run scenarios: the independent ones in parallel threads (one relay each, one shared
    VictoriaMetrics), then the serial ones. A scenario that raises is reported as such."""
    names = list(names or SCENARIOS)
    results: Dict[str, Any] = {}

    def one(name: str) -> None:
        progress(f"{name}: started")
        try:
            results[name] = SCENARIOS[name](h)
            progress(f"{name}: done")
        except Exception as e:  # keep the other scenarios' figures
            import traceback

            results[name] = e
            progress(f"{name}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc()}")

    parallel = [n for n in names if n not in SERIAL]
    threads = [threading.Thread(target=one, args=(n,), name=n) for n in parallel]
    for t in threads:
        t.start()
        time.sleep(0.5)  # stagger the relays' start-up (imports)
    for t in threads:
        t.join()
    for n in names:
        if n in SERIAL:
            one(n)
    kill_leftover_relays()
    return {n: results[n] for n in names}


# ------------------------------------------------------------------------------------------
# Report

_HEAD = ["scenario", "receiver", "s", "scrapes", "samples sent", "received", "lost", "duplicated",
         "dup. bound", "peak RSS MiB"]


def table(results: Dict[str, Any]) -> str:
    rows = [_HEAD, ["---"] * len(_HEAD)]
    for name, rs in results.items():
        if isinstance(rs, BaseException):
            rows.append([name, "—", *(["—"] * 7), f"failed: {type(rs).__name__}"])
            continue
        rows.extend(r.row() for r in rs)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def machine() -> str:
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
    except OSError:
        cpu = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB; "
            f"Python {platform.python_version()}, dcgmrelay {dcgmrelay.__version__} "
            f"(parser: {dcgmrelay.implementation()}), VictoriaMetrics {binary_version('victoria-metrics') or '?'}, "
            f"Prometheus {binary_version('prometheus') or '?'}")


def _facts(results: Dict[str, Any]) -> str:
    out = []
    for name, rs in results.items():
        if isinstance(rs, BaseException):
            out.append(f"- **{name}**: the scenario failed: `{type(rs).__name__}: {rs}`")
            continue
        for r in rs:
            f = {k: v for k, v in r.facts.items() if k not in ("lost_at_ms", "kill_ms", "fault_started",
                                                                  "hostile_urls", "series", "kept_per_scrape")}
            extra = "" if not r.failed_scrapes else f", scrapes the relay reported failed: {r.failed_scrapes}"
            out.append(f"- **{name}** ({r.receiver}): relay counters {json.dumps(r.metrics)}; "
                       f"duplicates in the receiver's export: {r.duplicated_receiver}; "
                       f"timestamps matching no served scrape: {r.unmatched}{extra}; {json.dumps(f, default=str)}")
    return "\n".join(out)


DOC_INTRO = """\
# Reliability: fault injection against the relay process

Written by `python benchmarks/reliability.py --{mode} --out docs/reliability.md`: rerun it to
refresh the figures. `tests/test_faults.py` runs the quick scenarios through the same code in CI
and asserts the properties in the last column of the scenario table.

## Set-up

Each scenario starts the real relay process, `python -m dcgmrelay run --config relay.yaml`,
scraping two simulated dcgm-exporters (`dcgmrelay.simulate.ExporterServer`, 4 or 8 GPUs: 100 or
200 relayed samples per scrape) every **1 s** (timeout 800 ms), and shipping remote write 1.0 to a
real **VictoriaMetrics** (and, in the outage scenario, also a real **Prometheus**, stock settings:
no out-of-order window), both started by the script on 127.0.0.1. A fault proxy between the relay
and each receiver resets connections ("down": new connections are reset, idle keep-alive ones
closed, a request already being forwarded completes), answers 429 with `Retry-After` or 500, or
holds requests before forwarding them. The relay runs with a spool (`fsync: batch`), a state file
and `retry: {{min_backoff: 200ms, max_backoff: 2s, max_elapsed: 5s}}` (1 s in kill-9 and disk-full),
so that an outage reaches the spool within seconds; with the default `max_elapsed: 5m` the first
five minutes of an outage wait in memory.

How each figure is obtained:

- **samples sent**: each exporter logs the wall-clock time of every scrape it answers; a scrape
  carries the samples the collectors CSV keeps (computed by parsing the exporter's body). The
  relay's own `up` / `scrape_*` series are not counted.
- **received**: VictoriaMetrics' `/api/v1/export` (every raw sample, per series and timestamp;
  Prometheus: a range query at the end). The relay stamps a scrape's samples with the scrape's
  start, so the scrape served at time `s` is the received timestamp `t` with `t ≤ s ≤ t + timeout`.
  A received timestamp that matches no served scrape would be reported (there were none).
- **lost** = sent − received, scrape by scrape. A scrape the relay itself reported failed (`up` = 0
  relayed, e.g. a timeout on a loaded machine) is not counted as lost; the notes list such scrapes.
  Nor is a scrape in progress when the relay is told to stop (SIGTERM): shutdown flushes every
  batch but abandons a page it has not read yet, as Prometheus does, and the exporter may even
  serve that request just after the signal. Such a scrape is one whose request reached the
  exporter within a scrape timeout of a SIGTERM and of which nothing arrived; the notes list them
  (`abandoned_at_stop_ms`), at most one per exporter per stop (checked).
- **duplicated**: the proxy decodes every request the receiver accepted (2xx) and counts each
  (series, timestamp) it forwarded; every copy after the first is a duplicate. VictoriaMetrics keeps
  duplicate samples (an export lists each copy; checked), so its export gives an independent count
  (in the notes; the two agreed in every run).
- **dup. bound**: the bound the scenario checks (below); "≤ 0" where a duplicate would be a bug.
- **peak RSS**: `VmHWM` from `/proc/<pid>/status` of the relay process (the largest over restarts).

## Figures

{date}, **{mode}** mode, {machine}.

{table}

Notes per scenario (the relay's self-metrics for that output at the end of its last run, the
proxy's counters):

{facts}

## Scenarios and what they check

| scenario | what happens | checked (tests/test_faults.py) |
|---|---|---|
| collector-down | both receivers down (connections reset) for 60 s (quick) / 5 min (long), then back | VictoriaMetrics: nothing lost, no duplicate, the outage went through the spool; Prometheus: every sample it does not hold is counted by the relay as dropped |
| 429-storm | every request answered `429` with `Retry-After: 2` for 15 s / 60 s | nothing lost, no duplicate (a 429 stores nothing) |
| 500s | half the requests, at random, answered `500` for 15 s / 60 s | nothing lost, no duplicate, retries counted |
| slow-collector | each request held 0.2–4 s before it is forwarded, against a 2 s output timeout: some requests time out at the relay and are retried although the receiver stores them | nothing lost; duplicates ≤ the samples the receiver accepted beyond those the relay counts as delivered (`dcgmrelay_output_samples_sent_total`): the at-least-once bound |
| kill-9 | `kill -9` at 10 / 30 random moments (about a third while the collector is down), restarted each time on the same spool and state file | write-ahead output (below): duplicated requests ≤ the one request in flight at each kill (in samples ≤ kills × 2000); nothing lost that was scraped: only a scrape still in progress at a kill (its request started at most the scrape timeout + 3 s before, on a loaded machine) may be missing, at most one per exporter per kill |
| disk-full | the spool lives on a 160 KiB tmpfs (a real `ENOSPC`, mounted in a private mount namespace: `unshare -m`; needs root or user namespaces) while the collector is down; two thirds into the outage the filesystem is grown (`nsenter … mount -o remount,size=64m`), then the collector returns | the relay keeps running (one process, exit code 0), counts the refused batches (`dcgmrelay_output_batches_dropped_total{{reason="spool_error"}}`, `dcgmrelay_spool_dropped_records_total{{reason="disk_full"}}`) and logs `No space left on device`; everything lost is within those counted batches; after the growth the spool takes batches again and they arrive |
| hostile | beside 2 healthy exporters: 256 KiB of random bytes, a 1 GiB body (valid lines generated as they are read, never held by the server), a line that never ends, a slowloris (one byte per 100 ms) | healthy targets: no failed scrape, nothing lost, ≥ 90 % of the window's ticks scraped; the oversized, endless and trickling targets fail (body limit, timeout), the garbage one is parsed leniently with its lines counted as rejected; peak RSS ≤ 128 MiB + 2 × 64 MiB (the body limit) per oversized body read at once: 384 MiB here |

### What `kill -9` loses

An output with a spool is write-ahead (`WriteAheadQueue`, for remote write 1.0 and the text
formats): every batch is encoded and appended to the spool before it is sent, delivered oldest
first by one loop, and acknowledged after the collector's 2xx. An append is a write into the page
cache, which survives the process, so a `kill -9` loses nothing the relay has relayed; what can
be missing is a scrape in progress at the kill (requested, not yet parsed and appended). On
restart the unacknowledged records are sent again: duplicates are the one request in flight at
the kill (plus, as in the slow-collector row, requests the collector stored but did not answer in
time). Power loss and kernel crashes are the fsync policy's business (docs/spool.md).

Without a spool, or for remote write 2.0 and the compact format (whose bodies cannot wait on disk
as they are), batches live in memory until delivered or until their retry budget is spent, and a
kill loses those.

### Replaying into Prometheus

Delivery stays in order through an outage: while the spool holds records, new batches queue
behind them, so a series' older samples always reach the receiver before its newer ones and
Prometheus (without `out_of_order_time_window`) takes them all, as VictoriaMetrics does. Samples
older than Prometheus' head block can still be refused after a very long outage (400 "out of
bounds"); those are counted (`dcgmrelay_output_batches_dropped_total{{reason}}`), never silent.

## Rerun

```sh
pip install -e '.[test]'                 # and the receivers: bash .ci/install-servers.sh
python benchmarks/reliability.py         # quick mode, about 2-3 minutes; prints the table
python benchmarks/reliability.py --long --out docs/reliability.md   # 5-minute outage, 30 kills
python benchmarks/reliability.py --only kill-9 hostile --keep       # some scenarios; keep the relay logs
pytest -m integration tests/test_faults.py                           # the CI checks
```

The disk-full scenario needs `unshare` and `nsenter` (util-linux) and root or unprivileged user
namespaces; where it cannot mount its tmpfs it reports why (the test fails in CI, skips elsewhere).
"""


def render_markdown(results: Dict[str, Any], mode: str) -> str:
    return DOC_INTRO.format(mode=mode, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            machine=machine(), table=table(results), facts=_facts(results))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the CI durations (default)")
    g.add_argument("--long", action="store_true", help="a 5-minute outage, 30 kills, longer storms")
    ap.add_argument("--out", help="write the report (markdown) here, e.g. docs/reliability.md")
    ap.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (relay logs, spools)")
    ap.add_argument("--serve-hostile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_hostile:
        asyncio.run(_hostile_main())
        return 0
    mode = "long" if args.long else "quick"
    t0 = time.monotonic()
    with Harness(mode) as h:
        print(f"work directory: {h.workdir}", file=sys.stderr)
        results = run_all(h, args.only, progress=lambda s: print(f"[{time.monotonic() - t0:6.1f}s] {s}",
                                                                  file=sys.stderr, flush=True))
        if not args.keep:
            shutil.rmtree(h.workdir, ignore_errors=True)
    print(table(results))
    print()
    print(_facts(results))
    if args.out:
        Path(args.out).write_text(render_markdown(results, mode))
        print(f"\nwrote {args.out}", file=sys.stderr)
    failed = [n for n, r in results.items() if isinstance(r, BaseException)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
