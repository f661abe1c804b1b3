"""An embedded collector for the compact format (the reference receiver).

    >>> from dcgmrelay.receiver import CompactReceiver
    >>> with CompactReceiver(forward_url="http://127.0.0.1:9090/api/v1/write") as rx:
    ...     httpx.post(rx.compact_url, content=body, headers=headers)   # from Encoder("compact")
    ...     rx.flush()                     # wait until forwarded
    ...     httpx.get(rx.url + "/metrics").text

Plain standard library (``http.server`` in a background thread) plus httpx for
forwarding. Endpoints, on 127.0.0.1 (port 0 picks a free one; ``.url`` says which):

``POST /api/v1/compact``
    one compact batch (``Content-Type: application/x-dcgmrelay-compact; version=1``).
    204 when decoded (a resend of the stream's last batch too: it is counted as a
    duplicate and not forwarded again); otherwise a JSON body
    ``{"error": code, "reason": ..., "status": ..., "resend_dictionaries": bool}`` with
    409 when the receiver lacks the stream's dictionaries (the sender calls
    ``Encoder.reset_dictionaries()`` and resends: see docs/compact-format.md), 400 for a
    corrupt body, 411 without a Content-Length, 413 over ``max_body``, 415 for another
    content type or encoding.
``GET /metrics``
    what it received: per target, the samples of its latest batch, as Prometheus text
    (escaped; timestamps unless ``metrics_timestamps=False``), or OpenMetrics when the
    ``Accept`` header asks for ``application/openmetrics-text``.
``GET /stats``
    the counters (JSON); ``GET /-/ready``: 200.

Forwarding (``forward_url``): every new batch is re-encoded as remote write 1.0 (stale
markers included) and POSTed by one worker thread, in order, retrying 5xx/429/transport
errors ``forward_retries`` times with backoff; :meth:`flush` waits for the queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import httpx

from .encode import CompactFormatError, DecodedBatch, DecoderState, Encoder, decode_batch, merge_batches

__all__ = ["CompactReceiver", "ReceivedSample"]

#: ``(target, name, labels, value, timestamp_ms)`` of one received sample.
ReceivedSample = Tuple[Optional[str], str, Dict[str, str], float, int]

logger = logging.getLogger("dcgmrelay.receiver")

COMPACT_PATH = "/api/v1/compact"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    receiver: "CompactReceiver"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes = b"", content_type: Optional[str] = None,
              headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and status != 204:
            self.wfile.write(body)

    def _json(self, status: int, obj: Dict[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode() + b"\n", "application/json")

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        rx = self.server.receiver
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            om = "application/openmetrics-text" in (self.headers.get("Accept") or "")
            body, headers = rx.metrics(openmetrics=om)
            self._send(200, body, headers["Content-Type"])
        elif path == "/stats":
            self._json(200, rx.stats)
        elif path in ("/-/ready", "/-/healthy", "/health"):
            self._send(200, b"OK\n", "text/plain; charset=utf-8")
        else:
            self._json(404, {"error": "not-found", "reason": f"no such endpoint: {path}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        rx = self.server.receiver
        path = self.path.split("?", 1)[0]
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            rx._reject("length-required")
            self._json(411, {"error": "length-required", "reason": "a Content-Length is required"})
            return
        n = int(length)
        if n > rx.max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            rx._reject("too-large")
            self._json(413, {"error": "too-large", "reason": f"body of {n} bytes is over {rx.max_body}"})
            return
        body = self.rfile.read(n)  # read before any answer, so the client sees the answer
        if path != COMPACT_PATH:
            self._json(404, {"error": "not-found", "reason": f"POST {COMPACT_PATH}, not {path}"})
            return
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        cenc = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if ctype != "application/x-dcgmrelay-compact" or cenc != "identity":
            rx._reject("unsupported-media-type")
            self._json(415, {"error": "unsupported-media-type",
                             "reason": f"expected application/x-dcgmrelay-compact without Content-Encoding, got "
                                       f"{ctype or 'none'} ({cenc})"})
            return
        try:
            batch = rx.receive(body)
        except CompactFormatError as exc:
            self._json(exc.http_status, exc.as_dict())
            return
        self._send(204, headers={"X-Dcgmrelay-Samples-Written": str(0 if batch.duplicate else len(batch))})


class CompactReceiver:
    """The embedded compact-format collector; see the module docstring.

    ``forward_url``: remote write 1.0 endpoint to forward every batch to (``forward_headers``
    are added to the request). ``keep``: how many decoded batches :attr:`batches` keeps
    (for tests). ``on_batch``: called with each new :class:`DecodedBatch` (in the request
    thread, after it is stored). ``state``: a :class:`DecoderState` to share.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, forward_url: Optional[str] = None,
                 forward_headers: Optional[Dict[str, str]] = None, forward_timeout: float = 10.0,
                 forward_retries: int = 3, forward_queue: int = 1000, max_body: int = 64 << 20,
                 metrics_timestamps: bool = True, keep: int = 100,
                 on_batch: Optional[Callable[[DecodedBatch], None]] = None,
                 state: Optional[DecoderState] = None) -> None:
        self.host = host
        self.port = int(port)
        self.forward_url = forward_url
        self.forward_headers = dict(forward_headers or {})
        self.forward_timeout = float(forward_timeout)
        self.forward_retries = int(forward_retries)
        self.max_body = int(max_body)
        self.metrics_timestamps = bool(metrics_timestamps)
        self.on_batch = on_batch
        self.state = state if state is not None else DecoderState()
        #: The last ``keep`` decoded batches (duplicates excluded), oldest first.
        self.batches: Deque[DecodedBatch] = deque(maxlen=keep)
        #: Per target (``None`` for batches without one): its latest batch.
        self.latest: Dict[Optional[str], DecodedBatch] = {}
        #: Responses of the forwarding endpoint: (status, body) per request, last 100.
        self.forward_responses: Deque[Tuple[int, str]] = deque(maxlen=100)
        self._lock = threading.Lock()
        self._counts: Dict[str, Any] = {
            "batches_received": 0, "samples_received": 0, "stale_received": 0, "bytes_received": 0,
            "duplicates": 0, "batches_rejected": 0, "rejected": {}, "batches_forwarded": 0,
            "samples_forwarded": 0, "forward_errors": 0, "forward_dropped": 0,
        }
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue[Optional[DecodedBatch]]" = queue.Queue(maxsize=forward_queue)
        self._worker: Optional[threading.Thread] = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def compact_url(self) -> str:
        return self.url + COMPACT_PATH

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "CompactReceiver":
        if self._server is not None:
            return self
        srv = _Server((self.host, self.port), _Handler)
        srv.receiver = self
        self.port = int(srv.server_address[1])
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"dcgmrelay-receiver:{self.port}", daemon=True)
        self._thread.start()
        if self.forward_url:
            self._worker = threading.Thread(target=self._forward_loop, name="dcgmrelay-receiver-forward", daemon=True)
            self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; forwards still queued are attempted for up to ``timeout`` seconds."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)
            self._worker = None

    def __enter__(self) -> "CompactReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CompactReceiver {self.url} {'running' if self.running else 'stopped'}>"

    # -- receiving ------------------------------------------------------------------------
    def receive(self, body: bytes) -> DecodedBatch:
        """Decode and store one body (what ``POST /api/v1/compact`` does); raises
        :class:`~dcgmrelay.encode.CompactFormatError`."""
        with self._lock:
            self._counts["bytes_received"] += len(body)
            try:
                batch = decode_batch(body, state=self.state)
            except CompactFormatError as exc:
                self._reject(exc.code, locked=True)
                raise
            if batch.duplicate:
                self._counts["duplicates"] += 1
                return batch
            self._counts["batches_received"] += 1
            self._counts["samples_received"] += len(batch)
            self._counts["stale_received"] += len(batch.stale_name_ids)
            self.batches.append(batch)
            self.latest[batch.target] = batch
        if self.on_batch is not None:
            self.on_batch(batch)
        if self._worker is not None:
            try:
                self._queue.put_nowait(batch)
            except queue.Full:
                with self._lock:
                    self._counts["forward_dropped"] += 1
        return batch

    def _reject(self, code: str, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                self._reject(code, True)
            return
        self._counts["batches_rejected"] += 1
        self._counts["rejected"][code] = self._counts["rejected"].get(code, 0) + 1

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters: batches/samples received, duplicates, rejected (by code), forwarded."""
        with self._lock:
            out = dict(self._counts)
            out["rejected"] = dict(out["rejected"])
            out["streams"] = len(self.state)
            out["forward_queue"] = self._queue.qsize()
        return out

    # -- /metrics -------------------------------------------------------------------------
    def metrics(self, *, openmetrics: bool = False) -> Tuple[bytes, Dict[str, str]]:
        """``(body, headers)`` of what ``GET /metrics`` serves."""
        with self._lock:
            latest = [self.latest[k] for k in sorted(self.latest, key=lambda t: (t is None, t or ""))]
        fmt = "openmetrics" if openmetrics else "prometheus"
        enc = Encoder(fmt, timestamps=self.metrics_timestamps)
        if not latest:
            return (b"# EOF\n" if openmetrics else b""), dict(enc.headers)
        return enc.encode(merge_batches(latest))  # text has no stale markers: they are not written

    # -- forwarding -------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued batch was forwarded (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def _forward_loop(self) -> None:
        enc = Encoder("remote-write-1")
        client = httpx.Client(timeout=self.forward_timeout, trust_env=False)
        try:
            while True:
                batch = self._queue.get()
                try:
                    if batch is None:
                        return
                    self._forward(client, enc, batch)
                finally:
                    self._queue.task_done()
        finally:
            client.close()

    def _forward(self, client: httpx.Client, enc: Encoder, batch: DecodedBatch) -> None:
        assert self.forward_url is not None
        try:
            body, headers = enc.encode(batch)
        except Exception:  # noqa: BLE001 - a batch that cannot be encoded is counted, not fatal
            logger.exception("cannot encode batch %r for forwarding", batch)
            with self._lock:
                self._counts["forward_errors"] += 1
            return
        headers.update(self.forward_headers)
        delay = 0.1
        for attempt in range(self.forward_retries + 1):
            try:
                r = client.post(self.forward_url, content=body, headers=headers)
                self.forward_responses.append((r.status_code, r.text[:500]))
                if r.status_code < 300:
                    with self._lock:
                        self._counts["batches_forwarded"] += 1
                        self._counts["samples_forwarded"] += enc.last_samples
                    return
                if r.status_code < 500 and r.status_code != 429:
                    logger.warning("forward to %s rejected: HTTP %d %s", self.forward_url, r.status_code, r.text[:200])
                    break
            except httpx.HTTPError as exc:
                self.forward_responses.append((0, str(exc)))
            if attempt < self.forward_retries:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        with self._lock:
            self._counts["forward_errors"] += 1

    def received_samples(self) -> List[ReceivedSample]:
        """``(target, name, labels, value, timestamp_ms)`` of every stored batch, oldest first (tests)."""
        out: List[ReceivedSample] = []
        with self._lock:
            batches = list(self.batches)
        for b in batches:
            for nid, lid, v, ts in zip(b.name_ids.tolist(), b.labelset_ids.tolist(), b.values.tolist(),
                                       b.timestamps.tolist()):
                out.append((b.target, b.names[nid], dict(b.labelsets[lid]), v, ts))
        return out
