"""Real collectors for integration tests: Prometheus and VictoriaMetrics.

Each server class starts its own binary as a subprocess on a free 127.0.0.1
port with a private temporary data directory, waits until it is ready and
offers small query helpers. Nothing here imports pytest; the pytest fixtures
live in ``fixtures_servers.py``.

    with VictoriaMetricsServer() as vm:
        httpx.post(vm.import_prometheus_url, content=b'm{a="1"} 2 1700000000000\\n')
        vm.query("m", time=1700000000)

Found by experiment on Debian 12 (Prometheus 2.42.0, VictoriaMetrics 1.79.5):

* Both accept remote write 1.0 (snappy block) on ``/api/v1/write``; both
  ignore ``Content-Encoding`` and answer 400 "snappy: corrupt input" to
  anything else (framed snappy, zstd, uncompressed).
* Neither accepts remote write 2.0: a ``io.prometheus.write.v2.Request`` body
  is decoded as a 1.0 WriteRequest with unknown fields, answered **204** with
  no ``X-Prometheus-Remote-Write-*-Written`` headers, and nothing is stored.
  ``PrometheusServer.accepts_rw2`` tells whether the installed Prometheus has
  ``--web.remote-write-receiver.accepted-protobuf-messages`` (2.54+), in which
  case it is passed to accept both message types.
* Prometheus rejects a sample older than (newest sample in the head - 1h)
  with 400 "out of bounds" unless ``out_of_order_time_window`` is set; the
  servers are shared per test session, so write timestamps near "now" or
  start a server of your own. VictoriaMetrics takes any timestamp inside
  ``-retentionPeriod``.
* VictoriaMetrics makes written rows searchable about once a second; its
  query helpers here call ``/internal/force_flush`` first.
* VictoriaMetrics does not keep float64 values exactly: it stores a decimal
  of about 12-13 significant digits (0.1+0.2 -> 0.3, 1/3 -> 0.333333333333,
  pi -> 3.141592653589) and drops NaN samples; its export writes +Inf/-Inf
  unquoted (``export()`` here turns them into floats). Prometheus keeps
  float64 bits exactly. Compare VictoriaMetrics values with a tolerance or
  use values with few digits.
* VictoriaMetrics ``/api/v1/series`` without ``start`` (or with start=0)
  only looks at the last day; ``series()`` here passes start=1.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time as _time
from typing import Any, Dict, Iterable, List, Optional, Sequence, TypeVar, Union

import httpx

__all__ = [
    "BinaryMissingError",
    "ServerStartError",
    "QueryError",
    "find_binary",
    "require_binaries",
    "binary_version",
    "free_port",
    "PrometheusServer",
    "VictoriaMetricsServer",
]

TimeLike = Union[int, float, str, _dt.datetime, None]
Match = Union[str, Sequence[str]]

_SEARCH_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin", "/bin", "/sbin")


class BinaryMissingError(RuntimeError):
    """A server binary the tests need is not installed (raised in CI)."""


class ServerStartError(RuntimeError):
    """A server did not start or did not become ready in time."""


class QueryError(RuntimeError):
    """The server answered a query with an error."""


def find_binary(name: str) -> Optional[str]:
    """Path of an executable, or None.

    ``DCGMRELAY_<NAME>_BIN`` (``-`` as ``_``, e.g. DCGMRELAY_VICTORIA_METRICS_BIN)
    overrides the lookup; then PATH, then the usual system directories.
    """
    env = "DCGMRELAY_%s_BIN" % name.upper().replace("-", "_")
    override = os.environ.get(env)
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH_DIRS:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def require_binaries(*names: str) -> Optional[str]:
    """None when every binary is found; else a skip reason.

    In CI (``CI=true``) a missing binary is an error instead: raises
    BinaryMissingError, so integration tests cannot silently turn into skips.
    """
    names = names or ("prometheus", "victoria-metrics")
    missing = [n for n in names if find_binary(n) is None]
    if not missing:
        return None
    reason = "integration server binary not installed: %s (run .ci/install-servers.sh)" % ", ".join(missing)
    if os.environ.get("CI") == "true":
        raise BinaryMissingError(reason)
    return reason


def binary_version(name: str) -> Optional[str]:
    """Version string of an installed server binary, or None.

    Asks the binary first; Debian's VictoriaMetrics build reports an empty
    version, so fall back to the Debian package version.
    """
    path = find_binary(name)
    if path is None:
        return None
    flag = "--version" if name == "prometheus" else "-version"
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip()
        if text:
            first = text.splitlines()[0]
            if name == "prometheus" and first.startswith("prometheus, version "):
                return first.split()[2]
            return first
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seconds(t: TimeLike) -> Optional[str]:
    """Prometheus API time parameter from epoch seconds, RFC 3339 or datetime."""
    if t is None:
        return None
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        return repr(t.timestamp())
    if isinstance(t, (int, float)):
        return repr(float(t)) if isinstance(t, float) else str(t)
    return str(t)


def _matches(match: Match) -> List[str]:
    return [match] if isinstance(match, str) else list(match)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the server if the test process dies without stop()."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_LIVE: "set[_Server]" = set()
_S = TypeVar("_S", bound="_Server")


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:
            pass


class _Server:
    binary_name = ""
    ready_path = ""
    #: Whether this server stores remote write 2.0 requests.
    accepts_rw2 = False

    def __init__(self, *, binary: Optional[str] = None, start_timeout: float = 30.0) -> None:
        path = binary or find_binary(self.binary_name)
        if path is None:
            raise BinaryMissingError("%s not found (run .ci/install-servers.sh)" % self.binary_name)
        self.binary = path
        self.start_timeout = start_timeout
        self.port = 0
        self.tmpdir = ""
        self.log_path = ""
        self.startup_seconds: Optional[float] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Any = None
        self._client: Optional[httpx.Client] = None

    # -- lifecycle --------------------------------------------------------
    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    @property
    def remote_write_url(self) -> str:
        return self.url + "/api/v1/write"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            # trust_env=False: never send 127.0.0.1 traffic through a proxy from the environment.
            self._client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)
        return self._client

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> List[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files into self.tmpdir before the first start."""

    def start(self: _S) -> _S:
        """Start the binary and wait until it is ready; raises ServerStartError."""
        if self.running:
            return self
        self.tmpdir = tempfile.mkdtemp(prefix="dcgmrelay-%s-" % self.binary_name)
        self.log_path = os.path.join(self.tmpdir, "server.log")
        self._prepare()
        t0 = _time.monotonic()
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            _LIVE.add(self)
            try:
                self._wait_ready(t0)
                self.startup_seconds = _time.monotonic() - t0
                return self
            except ServerStartError as exc:
                last_error = str(exc)
                self._terminate()
                if "address already in use" not in self.log_tail().lower():
                    break
        self._cleanup_dir()
        raise ServerStartError(last_error)

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        assert self._proc is not None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise ServerStartError(
                    "%s exited with code %s before becoming ready; %s" % (self.binary_name, rc, self._tail_msg())
                )
            try:
                r = self.client.get(self.ready_path, timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if _time.monotonic() > deadline:
                raise ServerStartError(
                    "%s not ready at %s%s after %.0fs; %s"
                    % (self.binary_name, self.url, self.ready_path, self.start_timeout, self._tail_msg())
                )
            _time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def _tail_msg(self) -> str:
        return "command: %s\nserver log (tail):\n%s" % (" ".join(self._argv()), self.log_tail())

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup_dir(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""
        _LIVE.discard(self)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout`` seconds, then remove the temp dir."""
        self._terminate(timeout)
        self._cleanup_dir()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "<%s %s %s>" % (type(self).__name__, self.url, "running" if self.running else "stopped")

    # -- Prometheus HTTP API ---------------------------------------------
    def _api(self, path: str, params: List[tuple]) -> Any:
        r = self.client.get(path, params=[(k, v) for k, v in params if v is not None])
        try:
            body = r.json()
        except ValueError:
            raise QueryError("%s %s -> HTTP %d: %s" % (path, params, r.status_code, r.text[:500])) from None
        if r.status_code != 200 or body.get("status") != "success":
            raise QueryError(
                "%s %s -> HTTP %d: %s" % (path, params, r.status_code, body.get("error") or r.text[:500])
            )
        return body["data"]

    def _before_read(self) -> None:
        pass

    def query(self, promql: str, time: TimeLike = None) -> List[Dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list for vector/matrix results)."""
        self._before_read()
        return self._api("/api/v1/query", [("query", promql), ("time", _seconds(time))])["result"]

    def query_range(
        self, promql: str, start: TimeLike, end: TimeLike, step: Union[str, float] = "1s"
    ) -> List[Dict[str, Any]]:
        """Range query; returns ``data.result`` (matrix: metric + values)."""
        self._before_read()
        params = [("query", promql), ("start", _seconds(start)), ("end", _seconds(end)), ("step", str(step))]
        return self._api("/api/v1/query_range", params)["result"]

    def series(self, match: Match, start: TimeLike = None, end: TimeLike = None) -> List[Dict[str, str]]:
        """Label sets of the series matching one or more selectors."""
        self._before_read()
        params: List[tuple] = [("match[]", m) for m in _matches(match)]
        params += [("start", _seconds(start)), ("end", _seconds(end))]
        return self._api("/api/v1/series", params)


class PrometheusServer(_Server):
    """Prometheus with its remote-write receiver on and no scrape jobs.

    ``lookback_delta`` is passed as ``--query.lookback-delta``;
    ``out_of_order_time_window`` (e.g. ``"100y"``) lets the TSDB take samples
    older than the newest one by more than an hour; by default off, as in a
    stock Prometheus. Retention is 100y so nothing written is deleted.
    """

    binary_name = "prometheus"
    ready_path = "/-/ready"

    def __init__(
        self,
        *,
        binary: Optional[str] = None,
        start_timeout: float = 30.0,
        lookback_delta: str = "5m",
        out_of_order_time_window: Optional[str] = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(binary=binary, start_timeout=start_timeout)
        self.lookback_delta = lookback_delta
        self.out_of_order_time_window = out_of_order_time_window
        self.extra_args = list(extra_args)
        self._help: Optional[str] = None
        self.accepts_rw2 = "--web.remote-write-receiver.accepted-protobuf-messages" in self._help_text()

    def _help_text(self) -> str:
        if self._help is None:
            try:
                out = subprocess.run([self.binary, "--help"], capture_output=True, text=True, timeout=10)
                self._help = out.stdout + out.stderr
            except (OSError, subprocess.SubprocessError):
                self._help = ""
        return self._help

    @property
    def config_path(self) -> str:
        return os.path.join(self.tmpdir, "prometheus.yml")

    def _prepare(self) -> None:
        lines = ["global:", "  scrape_interval: 1h", "  evaluation_interval: 1h", "scrape_configs: []"]
        if self.out_of_order_time_window:
            lines += ["storage:", "  tsdb:", "    out_of_order_time_window: %s" % self.out_of_order_time_window]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _argv(self) -> List[str]:
        argv = [
            self.binary,
            "--config.file=" + self.config_path,
            "--storage.tsdb.path=" + os.path.join(self.tmpdir, "data"),
            "--storage.tsdb.retention.time=100y",
            "--web.listen-address=127.0.0.1:%d" % self.port,
            "--web.enable-remote-write-receiver",
            "--web.enable-lifecycle",
            "--web.enable-admin-api",
            "--query.lookback-delta=" + self.lookback_delta,
            "--log.level=info",
        ]
        if self.accepts_rw2:
            argv.append(
                "--web.remote-write-receiver.accepted-protobuf-messages="
                "prometheus.WriteRequest,io.prometheus.write.v2.Request"
            )
        return argv + self.extra_args

    @property
    def version(self) -> Optional[str]:
        info = self._api("/api/v1/status/buildinfo", [])
        return info.get("version")


class VictoriaMetricsServer(_Server):
    """Single-node VictoriaMetrics (``victoria-metrics``) with caches off.

    Reads through ``query``/``query_range``/``series``/``export`` flush first
    (``/internal/force_flush``), so rows written just before are visible.
    """

    binary_name = "victoria-metrics"
    ready_path = "/health"

    def __init__(
        self,
        *,
        binary: Optional[str] = None,
        start_timeout: float = 30.0,
        retention_period: str = "100y",
        flush_before_read: bool = True,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(binary=binary, start_timeout=start_timeout)
        self.retention_period = retention_period
        self.flush_before_read = flush_before_read
        self.extra_args = list(extra_args)

    @property
    def import_prometheus_url(self) -> str:
        """Prometheus/OpenMetrics text exposition import (``?timestamp=`` optional)."""
        return self.url + "/api/v1/import/prometheus"

    @property
    def import_url(self) -> str:
        """VictoriaMetrics JSON-lines import (the format ``export()`` returns)."""
        return self.url + "/api/v1/import"

    def _argv(self) -> List[str]:
        return [
            self.binary,
            "-httpListenAddr=127.0.0.1:%d" % self.port,
            "-storageDataPath=" + os.path.join(self.tmpdir, "data"),
            "-retentionPeriod=" + self.retention_period,
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=INFO",
        ] + self.extra_args

    def flush(self) -> None:
        """Make all rows written so far searchable (``/internal/force_flush``)."""
        r = self.client.get("/internal/force_flush")
        if r.status_code != 200:
            raise QueryError("force_flush -> HTTP %d: %s" % (r.status_code, r.text[:500]))

    def _before_read(self) -> None:
        if self.flush_before_read:
            self.flush()

    def series(self, match: Match, start: TimeLike = None, end: TimeLike = None) -> List[Dict[str, str]]:
        # VictoriaMetrics limits /api/v1/series to the last day unless start is
        # given, and takes start=0 as "not given".
        return super().series(match, 1 if start is None else start, end)

    def export(self, match: Match, start: TimeLike = None, end: TimeLike = None) -> List[Dict[str, Any]]:
        """Raw samples: ``[{"metric": {...}, "values": [...], "timestamps": [ms, ...]}]``."""
        self._before_read()
        params: List[tuple] = [("match[]", m) for m in _matches(match)]
        params += [("start", _seconds(start)), ("end", _seconds(end))]
        r = self.client.get("/api/v1/export", params=[(k, v) for k, v in params if v is not None])
        if r.status_code != 200:
            raise QueryError("export %s -> HTTP %d: %s" % (match, r.status_code, r.text[:500]))
        return [_parse_export_line(line) for line in r.text.splitlines() if line.strip()]


_NONFINITE = re.compile(r"(?<=[\[,])([+-]?Inf|NaN)(?=[,\]])")


def _parse_export_line(line: str) -> Dict[str, Any]:
    """One /api/v1/export JSON line; VictoriaMetrics writes +Inf/-Inf/NaN unquoted."""
    cut = line.rfind('"values":[')  # the metric object (label values) comes before it
    if cut >= 0:
        line = line[:cut] + _NONFINITE.sub(r'"\1"', line[cut:])
    obj: Dict[str, Any] = json.loads(line)
    obj["values"] = [float(v) if isinstance(v, str) else v for v in obj.get("values", [])]
    return obj
