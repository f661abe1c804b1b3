"""The transport against a small fault-injecting HTTP(S) server of the tests' own.

The server listens on 127.0.0.1, answers each request from a script (status, slow
answer, connection dropped before or during the answer, reset) and records what it
got, so the whole httpx stack (pooling, keep-alive, timeouts, TLS) is exercised end
to end. TLS material (a CA, a server certificate for 127.0.0.1 and ``relay.test``, a
client certificate) is generated with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Tuple

import pytest

from dcgmrelay.transport import (
    ConnectError,
    ConnectionLost,
    Output,
    PermanentStatus,
    RequestTimeout,
    RetryBudgetExhausted,
    RetryPolicy,
    Sender,
    SyncSender,
    TLSError,
    TransportError,
)

RW1 = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
       "X-Prometheus-Remote-Write-Version": "0.1.0"}
FAST = RetryPolicy(min_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0, budget_s=3.0)


def run(coro: Any, timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------------------------------
# The fault server


@dataclass
class Seen:
    conn: int
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    peer_cert: Optional[Dict[str, Any]] = None


@dataclass
class Act:
    """One scripted answer. kind: "status" (code, headers, body), "slow" (sleep
    ``delay`` then answer), "drop" (close without answering), "truncate" (headers
    promise 100 bytes, 7 come, then close), "reset" (RST)."""

    kind: str = "status"
    code: int = 204
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


class FaultServer:
    def __init__(self, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.ssl_context = ssl_context
        self.script: Deque[Act] = deque()
        self.default = Act()
        self.requests: List[Seen] = []
        self.handshake_errors: List[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: List[socket.socket] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/api/v1/write"

    def push(self, *acts: Act) -> None:
        self.script.extend(acts)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except OSError:
                    pass
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
                cid = self.connections
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, cid), daemon=True).start()

    def _serve(self, conn: socket.socket, cid: int) -> None:
        conn.settimeout(5)
        peer_cert = None
        try:
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.handshake_errors.append(str(exc))
                    return
                with self._lock:
                    self._conns.append(conn)
                peer_cert = conn.getpeercert() or None
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: Dict[str, str] = {}
                while True:
                    h = reader.readline().decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    k, v = h.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                with self._lock:
                    act = self.script.popleft() if self.script else self.default
                    self.requests.append(Seen(cid, method, path, headers, body, peer_cert))
                if not self._answer(conn, act):
                    return
        except OSError:
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, conn: socket.socket, act: Act) -> bool:
        """Perform ``act``; False when the connection is finished."""
        if act.kind == "slow":
            if self._stop.wait(act.delay):
                return False
        if act.kind == "drop":
            return False
        if act.kind == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if act.kind == "truncate":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            return False
        reason = http.HTTPStatus(act.code).phrase
        head = [f"HTTP/1.1 {act.code} {reason}", f"Content-Length: {len(act.body)}"]
        head += [f"{k}: {v}" for k, v in act.headers.items()]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + act.body)
        return True


@pytest.fixture
def server() -> Any:
    srv = FaultServer()
    yield srv
    srv.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


# ------------------------------------------------------------------------------------------
# Plain HTTP faults


def test_500_then_success_over_one_kept_alive_connection(server: FaultServer) -> None:
    server.push(Act(code=500, body=b"internal"), Act(code=503))

    async def go() -> Any:
        async with Sender(server.url, retry=FAST) as s:
            first = await s.send(b"payload-1", RW1, samples=3)
            for i in range(4):
                await s.send(f"payload-{i + 2}".encode(), RW1, samples=1)
            return first, s.stats

    first, stats = run(go())
    assert (first.status, first.attempts) == (204, 3)
    assert [r.body for r in server.requests[:3]] == [b"payload-1"] * 3
    assert server.connections == 1  # keep-alive: every attempt and send reused it
    assert stats.failures == {"http_500": 1, "http_503": 1}
    assert server.requests[0].headers["content-encoding"] == "snappy"
    assert server.requests[0].headers["user-agent"].startswith("dcgmrelay/")


def test_429_with_retry_after_seconds(server: FaultServer) -> None:
    server.push(Act(code=429, headers={"Retry-After": "1"}))
    s = SyncSender(server.url, retry=RetryPolicy(min_backoff_s=0.01, jitter=0.0, budget_s=5))
    t0 = time.monotonic()
    res = s.send(b"x", RW1)
    took = time.monotonic() - t0
    s.close()
    assert res.attempts == 2 and 0.95 <= took < 3.0


def test_429_with_retry_after_http_date(server: FaultServer) -> None:
    async def go() -> Tuple[Any, float, float]:
        async with Sender(server.url, retry=RetryPolicy(min_backoff_s=0.01, jitter=0.0, budget_s=6)) as s:
            now = time.time()
            when = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=2)
            server.push(Act(code=429, headers={"Retry-After": email.utils.format_datetime(when, usegmt=True)}))
            expected = int(now + 2) - now  # the date has whole seconds: 1 < expected <= 2
            t0 = time.monotonic()
            res = await s.send(b"x", RW1)
            return res, time.monotonic() - t0, expected

    res, took, expected = run(go())
    assert res.attempts == 2 and expected - 0.1 <= took < expected + 1.5


def test_400_with_body_not_retried_and_logged_once(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"error":"out of order sample for series up{job=\\"x\\"}"}' + b" " * 300
    server.default = Act(code=400, body=body)
    caplog.set_level(logging.WARNING, logger="dcgmrelay.transport")

    async def go() -> List[PermanentStatus]:
        errs = []
        async with Sender(server.url, name="collector", retry=FAST) as s:
            for _ in range(2):
                try:
                    await s.send(b"x", RW1, samples=9)
                except PermanentStatus as e:
                    errs.append(e)
        return errs

    errs = run(go())
    assert len(errs) == 2 and len(server.requests) == 2
    assert errs[0].status == 400 and errs[0].body_start.startswith('{"error":"out of order sample')
    logged = [r for r in caplog.records if "HTTP 400" in r.getMessage()]
    assert len(logged) == 1 and "out of order sample" in logged[0].getMessage()


def test_slow_answer_times_out_then_retry_succeeds(server: FaultServer) -> None:
    server.push(Act(kind="slow", delay=1.5))

    async def go() -> Any:
        async with Sender(server.url, timeout_s=0.3, retry=FAST) as s:
            t0 = time.monotonic()
            res = await s.send(b"x", RW1)
            return res, s.stats, time.monotonic() - t0

    res, stats, took = run(go())
    assert res.attempts == 2 and stats.failures == {"timeout": 1} and took < 1.4


def test_always_slow_exhausts_the_budget_with_a_timeout(server: FaultServer) -> None:
    server.default = Act(kind="slow", delay=3)

    async def go() -> RetryBudgetExhausted:
        async with Sender(server.url, timeout_s=0.2, retry=RetryPolicy(min_backoff_s=0.05, jitter=0,
                                                                      budget_s=0.5)) as s:
            try:
                await s.send(b"x", RW1)
            except RetryBudgetExhausted as e:
                return e
        raise AssertionError("no error")

    err = run(go())
    assert isinstance(err.last_error, RequestTimeout) and err.last_error.phase == "read"
    assert 2 <= err.attempts <= 4 and err.elapsed_s < 1.5


@pytest.mark.parametrize("kind", ["drop", "truncate", "reset"])
def test_dropped_connection_is_retried(server: FaultServer, kind: str) -> None:
    server.push(Act(kind=kind))

    async def go() -> Any:
        async with Sender(server.url, retry=FAST) as s:
            return await s.send(b"x", RW1), s.stats

    res, stats = run(go())
    assert res.attempts == 2 and res.status == 204
    assert list(stats.failures) == ["connection_lost"]


def test_dropped_connection_error_type(server: FaultServer) -> None:
    server.default = Act(kind="truncate")

    async def go() -> RetryBudgetExhausted:
        async with Sender(server.url, retry=RetryPolicy(min_backoff_s=0.01, jitter=0, max_attempts=2)) as s:
            try:
                await s.send(b"x", RW1)
            except RetryBudgetExhausted as e:
                return e
        raise AssertionError

    err = run(go())
    assert isinstance(err.last_error, ConnectionLost) and isinstance(err.last_error, ConnectError)
    assert "RemoteProtocolError" in str(err.last_error)


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}/write"

    async def go() -> RetryBudgetExhausted:
        async with Sender(url, retry=RetryPolicy(min_backoff_s=0.02, jitter=0, budget_s=0.2)) as s:
            try:
                await s.send(b"x", RW1)
            except RetryBudgetExhausted as e:
                return e
        raise AssertionError

    t0 = time.monotonic()
    err = run(go())
    assert type(err.last_error) is ConnectError and err.attempts >= 3
    assert time.monotonic() - t0 < 2


def test_output_end_to_end_spools_when_down_and_sends_when_up(server: FaultServer) -> None:
    server.default = Act(code=503, body=b"ingester unavailable")
    spooled: List[Tuple[bytes, Dict[str, str], int]] = []

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spooled.append((body, headers, samples))

    def enc(fmt: str) -> Any:
        return lambda batch: (b"|".join(x.encode() for x in batch), dict(RW1), len(batch))

    async def go() -> Output:
        out = Output("e2e", server.url, "rw1", enc, auth={"bearer_token": "t0ken-value"},
                     retry=RetryPolicy(min_backoff_s=0.01, jitter=0, budget_s=0.2), flush_interval_s=0.01,
                     spool_hook=hook, rng=random.Random(0))
        await out.submit(["a", "b", "c"])
        await out.flush()
        server.default = Act(code=204)
        res = await out.replay(spooled)
        assert res.sent == 1
        await out.submit(["d"])
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert spooled == [(b"a|b|c", RW1, 3)]
    ok = [r for r in server.requests if r.body in (b"a|b|c", b"d")]
    assert [r.body for r in ok[-2:]] == [b"a|b|c", b"d"]
    assert all(r.headers["authorization"] == "Bearer t0ken-value" for r in server.requests)
    assert out.stats.spooled_batches == 1 and out.stats.replayed_batches == 1 and not out.stats.down


# ------------------------------------------------------------------------------------------
# TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: Any, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("dcgmrelay test CA")).issuer_name(name("dcgmrelay test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, usage: Any, san: Optional[List[Any]] = None) -> Tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    skey, scert = issue("relay.test", ExtendedKeyUsageOID.SERVER_AUTH,
                        [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("relay.test")])
    ckey, ccert = issue("dcgmrelay-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(write_cert(ca_cert, d / "ca.pem"), write_cert(scert, d / "server.pem"), write_key(skey, d / "server.key"),
               write_cert(ccert, d / "client.pem"), write_key(ckey, d / "client.key"))


def tls_server(pki: Pki, require_client_cert: bool = False) -> FaultServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(pki.ca))
    return FaultServer(ctx)


def send_once(url: str, **kw: Any) -> Any:
    """One attempt through the async sender: the result, or the last error."""

    async def go() -> Any:
        async with Sender(url, retry=RetryPolicy(max_attempts=1), timeout_s=3, **kw) as s:
            try:
                return await s.send(b"x", RW1)
            except RetryBudgetExhausted as e:
                return e.last_error
            except TransportError as e:
                return e

    return run(go())


def test_tls_verified_by_default_fails_without_the_ca(pki: Pki) -> None:
    srv = tls_server(pki)
    try:
        err = send_once(srv.url)
        assert isinstance(err, TLSError) and isinstance(err, ConnectError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err)
        assert srv.requests == []
    finally:
        srv.close()


def test_tls_with_ca_file_and_with_insecure_switch(pki: Pki) -> None:
    srv = tls_server(pki)
    try:
        assert send_once(srv.url, tls={"ca_file": str(pki.ca)}).status == 204
        assert send_once(srv.url, tls={"insecure_skip_verify": True}).status == 204
        with SyncSender(srv.url, tls={"ca_file": str(pki.ca)}, retry=FAST) as s:
            assert s.send(b"sync", RW1).status == 204
        assert len(srv.requests) == 3
    finally:
        srv.close()


def test_tls_server_name_is_sent_and_checked(pki: Pki) -> None:
    srv = tls_server(pki)
    try:
        ok = send_once(srv.url, tls={"ca_file": str(pki.ca), "server_name": "relay.test"})
        assert ok.status == 204
        wrong = send_once(srv.url, tls={"ca_file": str(pki.ca), "server_name": "other.test"})
        assert isinstance(wrong, TLSError) and "other.test" in str(wrong)
    finally:
        srv.close()


def test_mutual_tls(pki: Pki) -> None:
    srv = tls_server(pki, require_client_cert=True)
    try:
        refused = send_once(srv.url, tls={"ca_file": str(pki.ca)})
        assert isinstance(refused, ConnectError)  # TLSError or ConnectionLost, by TLS version timing
        assert srv.requests == [] and srv.handshake_errors
        ok = send_once(srv.url, tls={"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                                     "key_file": str(pki.client_key)})
        assert ok.status == 204
        subject = dict(x[0] for x in srv.requests[0].peer_cert["subject"])  # type: ignore[index]
        assert subject["commonName"] == "dcgmrelay-client"
    finally:
        srv.close()
