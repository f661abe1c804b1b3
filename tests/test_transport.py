"""Transport unit tests: retry policy, error mapping, auth, secrets, batching, Output
lifecycle, the write-ahead queue. HTTP is faked with ``httpx.MockTransport``; the real
stack is exercised in test_transport_faults.py and, for write-ahead outputs, test_faults.py."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import ssl
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import httpx
import numpy as np
import pytest

from dcgmrelay.errors import DcgmRelayError
from dcgmrelay.spool import Spool
from dcgmrelay.transport import (
    BasicAuth,
    BatchSlice,
    BearerToken,
    BearerTokenFile,
    ConnectError,
    ConnectionLost,
    CredentialsError,
    Output,
    PermanentStatus,
    RequestError,
    RequestTimeout,
    RetryableStatus,
    RetryBudgetExhausted,
    RetryPolicy,
    Secret,
    Sender,
    SyncSender,
    TLSError,
    TransportConfigError,
    TransportError,
    UnsupportedMediaType,
    WriteAheadQueue,
    _map_httpx_error,
    build_client_kwargs,
    compress_body,
    parse_retry_after,
    redact,
    redact_url,
    split_batch,
)

URL = "http://collector.test/api/v1/write"
RW2_HEADERS = {"Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
               "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "2.0.0"}
RW1_HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
               "X-Prometheus-Remote-Write-Version": "0.1.0"}
FAST = RetryPolicy(min_backoff_s=0.001, max_backoff_s=0.01, jitter=0.0, budget_s=2.0)


def run(coro: Any, timeout: float = 20.0) -> Any:
    """Run a coroutine with a hard time bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeClock:
    """Monotonic clock advanced by the fake sleep: budgets without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def sync_sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def scripted(*responses: Any, then: Any = 204) -> Any:
    """A MockTransport handler answering from a script (status int, httpx.Response, an
    exception to raise, or a callable(request)); then ``then`` forever. ``handler.requests``."""
    script = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        handler.requests.append(request)
        item = script.pop(0) if script else then
        if callable(item) and not isinstance(item, type):
            item = item(request)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, int):
            return httpx.Response(item)
        return item

    handler.requests = []  # type: ignore[attr-defined]
    return handler


def sender(handler: Any, clock: Optional[FakeClock] = None, **kw: Any) -> Sender:
    kw.setdefault("retry", FAST)
    if clock is not None:
        kw.update(clock=clock, sleep=clock.sleep)
    return Sender(URL, transport=httpx.MockTransport(handler), rng=random.Random(1), **kw)


# ------------------------------------------------------------------------------------------
# Retry policy


def test_backoff_sequence_without_jitter() -> None:
    p = RetryPolicy(jitter=0)
    assert [p.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert p.delay(10_000) == 30  # no overflow


def test_backoff_jitter_bounds_and_spread() -> None:
    p = RetryPolicy()  # jitter 0.2
    rng = random.Random(7)
    for n in range(1, 9):
        base = p.backoff(n)
        draws = [p.delay(n, rng=rng) for _ in range(500)]
        assert min(draws) >= base * 0.8 and max(draws) <= base * 1.2
        assert max(draws) - min(draws) > base * 0.3  # really jittered
    custom = RetryPolicy(min_backoff_s=0.1, max_backoff_s=1.0, multiplier=3, jitter=0)
    assert [custom.delay(n) for n in range(1, 5)] == pytest.approx([0.1, 0.3, 0.9, 1.0])


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 120 ") == 120.0
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    date = email.utils.format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert date.endswith("GMT")
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0  # past
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad) is None


def test_delay_honours_retry_after() -> None:
    p = RetryPolicy(min_backoff_s=0.5, jitter=0.2)
    rng = random.Random(3)
    for _ in range(200):
        assert 7.0 <= p.delay(1, 7.0, rng=rng) <= 7.0 * 1.2
    assert p.delay(1, 3600.0) == 300.0  # clamped to max_retry_after_s
    assert 0.5 <= p.delay(1, 0.0, rng=rng) <= 0.6  # never below min_backoff_s
    ignoring = RetryPolicy(respect_retry_after=False, jitter=0)
    assert ignoring.delay(3, 100.0) == 2.0


def test_policy_validation_and_retry_on() -> None:
    for bad in (dict(jitter=1.5), dict(multiplier=0.5), dict(min_backoff_s=5, max_backoff_s=1),
                dict(retry_on=("6xx",)), dict(retry_on=(200,)), dict(retry_on=("2xx",)), dict(max_attempts=0)):
        with pytest.raises(TransportConfigError):
            RetryPolicy(**bad)
    p = RetryPolicy()
    assert p.is_retryable_status(429) and p.is_retryable_status(500) and p.is_retryable_status(599)
    assert not any(p.is_retryable_status(s) for s in (400, 401, 403, 404, 408, 413, 415))
    only503 = RetryPolicy(retry_on=(503,))
    assert only503.is_retryable_status(503) and not only503.is_retryable_status(500)
    assert not only503.is_retryable_status(429)


# ------------------------------------------------------------------------------------------
# Sender: retries


def test_5xx_retried_with_backoff_then_success() -> None:
    clock = FakeClock()
    h = scripted(500, 503, 204)
    s = sender(h, clock, retry=RetryPolicy(min_backoff_s=0.5, jitter=0.2, budget_s=60))
    res = run(s.send(b"body", RW1_HEADERS, samples=3))
    assert (res.status, res.attempts, res.retries) == (204, 3, 2)
    assert len(h.requests) == 3 and all(r.content == b"body" for r in h.requests)
    assert 0.4 <= clock.sleeps[0] <= 0.6 and 0.8 <= clock.sleeps[1] <= 1.2
    assert s.stats.failures == {"http_500": 1, "http_503": 1}
    assert (s.stats.retries, s.stats.successes, s.stats.samples_sent) == (2, 1, 3)
    run(s.aclose())


def test_429_retry_after_seconds_and_http_date_honoured() -> None:
    clock = FakeClock()
    date = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=40), usegmt=True)
    h = scripted(httpx.Response(429, headers={"Retry-After": "5"}),
                 httpx.Response(429, headers={"Retry-After": date}),
                 httpx.Response(503, headers={"Retry-After": "2"}))
    s = sender(h, clock, retry=RetryPolicy(min_backoff_s=0.01, jitter=0, budget_s=600))
    res = run(s.send(b"x", RW1_HEADERS, samples=1))
    assert res.attempts == 4
    assert clock.sleeps[0] == 5.0
    assert 37.0 <= clock.sleeps[1] <= 40.0  # HTTP-date: whole seconds, measured from now
    assert clock.sleeps[2] == 2.0  # Retry-After on a 5xx too
    run(s.aclose())


def test_budget_exhausted_carries_last_error() -> None:
    clock = FakeClock()
    h = scripted(then=503)
    s = sender(h, clock, retry=RetryPolicy(min_backoff_s=1, max_backoff_s=4, jitter=0, budget_s=10))
    with pytest.raises(RetryBudgetExhausted) as ei:
        run(s.send(b"x", RW1_HEADERS, samples=1))
    err = ei.value
    # delays 1, 2, 4 (=7); the next 4 would end at 11 > 10: stop without sleeping
    assert clock.sleeps == [1, 2, 4] and err.attempts == 4 == len(h.requests)
    assert isinstance(err.last_error, RetryableStatus) and err.last_error.status == 503
    assert isinstance(err, TransportError) and isinstance(err, DcgmRelayError)
    assert s.stats.budget_exhausted == 1
    run(s.aclose())


def test_retry_after_longer_than_budget_gives_up_at_once() -> None:
    clock = FakeClock()
    h = scripted(httpx.Response(429, headers={"Retry-After": "200"}))
    s = sender(h, clock, retry=RetryPolicy(budget_s=120))
    with pytest.raises(RetryBudgetExhausted):
        run(s.send(b"x", RW1_HEADERS))
    assert clock.sleeps == [] and len(h.requests) == 1
    run(s.aclose())


def test_max_attempts_bounds_retries() -> None:
    h = scripted(then=500)
    s = sender(h, retry=RetryPolicy(min_backoff_s=0, jitter=0, max_attempts=3))
    with pytest.raises(RetryBudgetExhausted) as ei:
        run(s.send(b"x"))
    assert ei.value.attempts == 3 == len(h.requests)
    h2 = scripted(then=500)
    s2 = sender(h2)
    with pytest.raises(RetryBudgetExhausted):
        run(s2.send(b"x", max_attempts=1))
    assert len(h2.requests) == 1
    run(s.aclose())
    run(s2.aclose())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413])
def test_4xx_never_retried_counted_and_logged_once(status: int, caplog: pytest.LogCaptureFixture) -> None:
    body = ("bad sample: " + "x" * 400).encode()
    h = scripted(then=httpx.Response(status, content=body))
    s = sender(h, name="mimir")
    caplog.set_level(logging.DEBUG, logger="dcgmrelay.transport")
    for _ in range(3):
        with pytest.raises(PermanentStatus) as ei:
            run(s.send(b"x", RW1_HEADERS, samples=5))
        assert not isinstance(ei.value, RetryableStatus)
    assert len(h.requests) == 3  # one attempt per send
    assert ei.value.status == status and ei.value.body_start == body[:200].decode()
    assert s.stats.permanent_errors == {status: 3} and s.stats.retries == 0
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1
    msg = loud[0].getMessage()
    assert str(status) in msg and "mimir" in msg and "bad sample: xxx" in msg and "x" * 201 not in msg
    run(s.aclose())


def test_429_can_be_made_permanent() -> None:
    h = scripted(then=429)
    s = sender(h, retry=RetryPolicy(retry_on=("5xx",)))
    with pytest.raises(PermanentStatus):
        run(s.send(b"x"))
    assert len(h.requests) == 1
    run(s.aclose())


def test_sync_sender_shares_the_policy() -> None:
    clock = FakeClock()
    h = scripted(502, httpx.ConnectError("refused"), 200)
    s = SyncSender(URL, transport=httpx.MockTransport(h), retry=RetryPolicy(jitter=0, budget_s=30),
                   clock=clock, sleep=clock.sync_sleep)
    res = s.send(b"x", RW1_HEADERS, samples=2)
    assert (res.status, res.attempts) == (200, 3) and clock.sleeps == [0.5, 1.0]
    assert s.stats.failures == {"http_502": 1, "connect": 1}
    h2 = scripted(then=400)
    with SyncSender(URL, transport=httpx.MockTransport(h2)) as s2:
        with pytest.raises(PermanentStatus):
            s2.send(b"x")
    s.close()


# ------------------------------------------------------------------------------------------
# Error mapping


def _ssl_connect_error() -> httpx.ConnectError:
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except ssl.SSLError as e:
            raise httpx.ConnectError(str(e)) from e
    except httpx.ConnectError as exc:
        return exc


@pytest.mark.parametrize("exc, cls, retryable", [
    (httpx.ConnectError("[Errno 111] Connection refused"), ConnectError, True),
    (httpx.ConnectTimeout("t"), RequestTimeout, True),
    (httpx.ReadTimeout("t"), RequestTimeout, True),
    (httpx.WriteTimeout("t"), RequestTimeout, True),
    (httpx.PoolTimeout("t"), RequestTimeout, True),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."), ConnectionLost, True),
    (httpx.ReadError("reset"), ConnectionLost, True),
    (httpx.WriteError("broken pipe"), ConnectionLost, True),
    (httpx.CloseError("x"), ConnectionLost, True),
    (httpx.ProxyError("proxy said no"), ConnectError, True),
    (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."), RequestError, False),
    (httpx.LocalProtocolError("Illegal header value"), RequestError, False),
    (httpx.TooManyRedirects("x"), RequestError, False),
    (httpx.DecodingError("x"), RequestError, False),
    (httpx.InvalidURL("bad"), RequestError, False),
    (ConnectionResetError(104, "Connection reset by peer"), ConnectError, True),
    (_ssl_connect_error(), TLSError, True),
])
def test_map_httpx_error(exc: BaseException, cls: type, retryable: bool) -> None:
    mapped = _map_httpx_error(exc, url="http://c/x")
    assert type(mapped) is cls
    assert isinstance(mapped, TransportError) and isinstance(mapped, DcgmRelayError)
    assert mapped.retryable is retryable
    assert "http://c/x" in str(mapped)
    if cls is RequestTimeout:
        assert mapped.phase == type(exc).__name__.replace("Timeout", "").lower()
    if cls is TLSError:
        assert isinstance(mapped, ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(mapped)


def test_httpx_errors_mapped_at_the_sender_boundary() -> None:
    clock = FakeClock()
    h = scripted(httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped"), 204)
    s = sender(h, clock)
    assert run(s.send(b"x")).attempts == 3
    assert s.stats.failures == {"timeout": 1, "connection_lost": 1}
    h2 = scripted(httpx.UnsupportedProtocol("nope"))
    s2 = sender(h2)
    with pytest.raises(RequestError) as ei:
        run(s2.send(b"x"))
    assert isinstance(ei.value.__cause__, httpx.UnsupportedProtocol) and len(h2.requests) == 1
    run(s.aclose())
    run(s2.aclose())


# ------------------------------------------------------------------------------------------
# Remote write 2.0: written headers and 415


def _written(n: Optional[int], **extra: str) -> httpx.Response:
    headers = dict(extra)
    if n is not None:
        headers["X-Prometheus-Remote-Write-Samples-Written"] = str(n)
    return httpx.Response(204, headers=headers)


def test_written_headers_checked(caplog: pytest.LogCaptureFixture) -> None:
    s = sender(scripted(_written(10), _written(7), _written(7), _written(None, **{
        "X-Prometheus-Remote-Write-Histograms-Written": "0"})))
    ok = run(s.send(b"x", RW2_HEADERS, samples=10))
    assert ok.written is not None and ok.written.ok and ok.written.samples == 10
    caplog.set_level(logging.WARNING, logger="dcgmrelay.transport")
    short = run(s.send(b"x", RW2_HEADERS, samples=10))
    assert short.status == 204 and not short.written.ok and short.written.not_written == 3  # type: ignore[union-attr]
    run(s.send(b"x", RW2_HEADERS, samples=10))
    assert s.stats.samples_not_written == 6
    assert sum("7 of 10" in r.getMessage() for r in caplog.records) == 1  # logged once
    partial = run(s.send(b"x", RW2_HEADERS, samples=10))  # Histograms-Written only: noted
    assert partial.written.missing and s.stats.written_header_missing == 1  # type: ignore[union-attr]
    run(s.aclose())


def test_rw2_2xx_without_written_headers_is_a_415() -> None:
    s = sender(scripted(then=_written(None)))
    with pytest.raises(UnsupportedMediaType) as ei:
        run(s.send(b"x", RW2_HEADERS, samples=4))
    assert ei.value.inferred and ei.value.status == 204
    assert s.stats.written_header_missing == 1 and s.stats.unsupported_media_type == 1
    noting = sender(scripted(then=_written(None)), missing_written_headers="note")
    res = run(noting.send(b"x", RW2_HEADERS, samples=4))
    assert res.written.missing and noting.stats.written_header_missing == 1  # type: ignore[union-attr]
    rw1 = sender(scripted(then=_written(None)))
    assert run(rw1.send(b"x", RW1_HEADERS, samples=4)).written is None  # 1.0: nothing to check
    for x in (s, noting, rw1):
        run(x.aclose())


def test_415_is_unsupported_media_type_only_for_rw2() -> None:
    s = sender(scripted(then=415))
    with pytest.raises(UnsupportedMediaType):
        run(s.send(b"x", RW2_HEADERS))
    with pytest.raises(PermanentStatus) as ei:
        run(s.send(b"x", RW1_HEADERS))
    assert not isinstance(ei.value, UnsupportedMediaType)
    run(s.aclose())


# ------------------------------------------------------------------------------------------
# Auth, TLS settings, secrets


def test_bearer_token_file_reread_after_rotation(tmp_path: Any) -> None:
    path = tmp_path / "token"
    path.write_text("  tok-one\n")
    seen: List[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(204)

    s = Sender(URL, auth={"bearer_token_file": str(path)}, transport=httpx.MockTransport(handler))
    run(s.send(b"x"))
    run(s.send(b"x"))
    path.write_text("tok-two-rotated\n")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    run(s.send(b"x"))
    assert seen == ["Bearer tok-one", "Bearer tok-one", "Bearer tok-two-rotated"]
    run(s.aclose())


def test_bearer_token_file_401_forces_reread(tmp_path: Any) -> None:
    path = tmp_path / "token"
    path.write_text("old-token")

    def handler(request: httpx.Request) -> httpx.Response:
        ok = request.headers["Authorization"] == "Bearer new-token"
        return httpx.Response(204 if ok else 401)

    auth = BearerTokenFile(str(path))
    assert auth.token() == "old-token"
    path.write_text("new-token")
    auth._file._stamp = (lambda st: (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns))(os.stat(path))
    assert auth.token() == "old-token"  # a coarse mtime hid the change ...
    with httpx.Client(auth=auth, transport=httpx.MockTransport(handler)) as c:
        assert c.post(URL, content=b"x").status_code == 204  # ... the 401 re-read it
    assert auth.token() == "new-token"


def test_credentials_file_errors(tmp_path: Any) -> None:
    missing = BearerTokenFile(str(tmp_path / "nope"))
    with pytest.raises(CredentialsError) as ei:
        missing.token()
    assert ei.value.retryable
    path = tmp_path / "t"
    path.write_text("good-token")
    auth = BearerTokenFile(str(path))
    assert auth.token() == "good-token"
    path.write_text("   \n")  # being rewritten: keep the last good token
    assert auth.token() == "good-token"
    path.unlink()
    assert auth.token() == "good-token"


def test_basic_auth_literal_and_file(tmp_path: Any) -> None:
    seen: List[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    pw = tmp_path / "pw"
    pw.write_text("file-pass\n")
    for auth in ({"basic": ("user", "lit-pass")}, {"basic": {"username": "u2", "password_file": str(pw)}}):
        s = Sender(URL, auth=auth, headers={"X-License-Key": Secret("lic-123"), "X-Scope-OrgID": "t1"},
                   transport=httpx.MockTransport(handler))
        run(s.send(b"x"))
        run(s.aclose())
    assert seen[0].headers["Authorization"] == httpx.BasicAuth("user", "lit-pass")._auth_header
    assert seen[1].headers["Authorization"] == httpx.BasicAuth("u2", "file-pass")._auth_header
    assert seen[0].headers["X-License-Key"] == "lic-123" and seen[0].headers["X-Scope-OrgID"] == "t1"
    assert seen[0].headers["User-Agent"].startswith("dcgmrelay/")


def test_auth_and_tls_settings_validated(tmp_path: Any) -> None:
    for bad in ({"bearer_tokn": "x"}, {"bearer_token": "a", "basic": ("u", "p")}, {"basic": "u:p"},
                {"basic": {"username": "u"}}):
        with pytest.raises(TransportConfigError):
            build_client_kwargs(auth=bad)
    for bad_tls in ({"ca_flie": "x"}, {"insecure_skip_verify": "yes"}, {"key_file": "k.pem"},
                    {"ca_file": str(tmp_path / "missing.pem")}):
        with pytest.raises(TransportConfigError):
            build_client_kwargs(tls=bad_tls)
    with pytest.raises(TransportConfigError):
        Output("o", URL, "rw1", fake_factory, headers={"Content-Type": "text/plain"})
    with pytest.raises(TransportConfigError):
        Output("o", URL, "rw1", fake_factory, headers={"X-Prometheus-Remote-Write-Version": "9"})


def test_build_client_kwargs_defaults_and_switches(caplog: pytest.LogCaptureFixture) -> None:
    kw = build_client_kwargs()
    assert kw["verify"] is True and kw["auth"] is None and kw["follow_redirects"] is False
    assert kw["timeout"] == httpx.Timeout(10.0)
    assert kw["headers"]["User-Agent"].startswith("dcgmrelay/")
    with caplog.at_level(logging.WARNING, logger="dcgmrelay.transport"):
        insecure = build_client_kwargs(tls={"insecure_skip_verify": True})
    ctx = insecure["verify"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert any("verification is disabled" in r.getMessage() for r in caplog.records)
    sni = build_client_kwargs(tls={"server_name": "relay.test"}, timeout_s=3)
    req = httpx.Request("POST", "https://127.0.0.1:1/x")
    hook = sni["event_hooks"]["request"][0]
    hook(req)
    assert req.extensions["sni_hostname"] == "relay.test" and sni["verify"] is True
    run(_await(hook(httpx.Request("POST", "https://h/")))) # awaitable for AsyncClient too
    with httpx.Client(**sni):
        pass
    with pytest.raises(TransportConfigError):
        build_client_kwargs(timeout_s=0)


async def _await(x: Any) -> None:
    await x


SENTINEL = "SENTINEL-s3cr3t-42"


def test_secrets_never_in_logs_exceptions_or_repr(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "tok"
    token_file.write_text(SENTINEL + "-file")

    def echo(status: int) -> Any:
        def answer(request: httpx.Request) -> httpx.Response:
            echoed = "; ".join(f"{k}={v}" for k, v in request.headers.items())
            return httpx.Response(status, text=f"rejected: {echoed}")
        return answer

    configs = [
        dict(auth={"bearer_token": SENTINEL + "-tok"}),
        dict(auth={"bearer_token_file": str(token_file)}),
        dict(auth={"basic": ("alice", SENTINEL + "-pw")}),
        dict(headers={"X-License-Key": Secret(SENTINEL + "-lic"), "X-Api-Token": SENTINEL + "-hdr"}),
    ]
    texts: List[str] = []
    for cfg in configs:
        clock = FakeClock()
        s = Sender(f"http://bob:{SENTINEL}-url@collector.test/write?api_key={SENTINEL}-q",
                   transport=httpx.MockTransport(scripted(echo(400), echo(503), then=echo(503))),
                   retry=RetryPolicy(min_backoff_s=1, jitter=0, budget_s=3), clock=clock, sleep=clock.sleep,
                   **cfg)
        for _ in range(2):
            with pytest.raises(TransportError) as ei:
                run(s.send(b"x", RW1_HEADERS))
            texts += [str(ei.value), repr(ei.value), repr(ei.value.args)]
            if isinstance(ei.value, RetryBudgetExhausted):
                texts += [str(ei.value.last_error), ei.value.last_error.body_start]  # type: ignore[attr-defined]
            else:
                texts.append(ei.value.body_start)  # type: ignore[attr-defined]
        texts += [repr(s), repr(s._auth), repr(s._kwargs), repr(s.stats)]
        run(s.aclose())
    out = Output("o", f"http://bob:{SENTINEL}-url@collector.test/write", "rw1", fake_factory,
                 auth={"bearer_token": SENTINEL}, headers={"X-License-Key": Secret(SENTINEL)})
    texts += [repr(out), repr(Secret(SENTINEL)), str(Secret(SENTINEL)), repr(BearerToken(SENTINEL)),
              repr(BasicAuth("u", SENTINEL)), repr(build_client_kwargs(auth={"bearer_token": SENTINEL},
                                                                     headers={"X-License-Key": SENTINEL}))]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("rejected:" in t for t in texts)  # the bodies were there, scrubbed
    assert any("<redacted>" in t for t in texts)
    leaked = [t for t in texts if SENTINEL in t]
    assert not leaked, leaked[:3]


def test_secret_across_the_body_cut_is_scrubbed() -> None:
    secret = "tok-" + "Z" * 40
    for pad in range(170, 205, 3):  # the secret starts before, at and after byte 200
        h = scripted(then=httpx.Response(400, text="e" * pad + secret + " tail"))
        s = sender(h, auth={"bearer_token": secret})
        with pytest.raises(PermanentStatus) as ei:
            run(s.send(b"x"))
        start = ei.value.body_start
        assert len(start.encode()) <= 200 and "ZZZZ" not in start and "tok-" not in start
        run(s.aclose())


def test_redact_helpers() -> None:
    hdrs = {"Authorization": "Bearer x", "X-License-Key": "k", "Cookie": "c", "X-Scope-OrgID": "tenant",
            "X-Custom": Secret("s"), "Content-Type": "application/x-protobuf"}
    r = redact(hdrs, secret_names=["X-Scope-OrgID"])
    assert r == {"Authorization": "<redacted>", "X-License-Key": "<redacted>", "Cookie": "<redacted>",
                 "X-Scope-OrgID": "<redacted>", "X-Custom": "<redacted>", "Content-Type": "application/x-protobuf"}
    assert redact({"X-Scope-OrgID": "tenant"}) == {"X-Scope-OrgID": "tenant"}
    assert redact_url("https://u:hunter2@h:1/p?token=abc&x=1") == "https://u:xxx@h:1/p?token=xxx&x=1"
    assert "abc" not in redact_url("https://h/p?token=abc&x=1") and "x=1" in redact_url("https://h/p?token=abc&x=1")
    assert repr(Secret("x")) == str(Secret("x")) == f"{Secret('x')}" == "<secret>"


# ------------------------------------------------------------------------------------------
# Batches


class FakeBatch:
    """Batch-like: a list of sample names for one target (sliceable)."""

    def __init__(self, target: Optional[str], items: List[str]) -> None:
        self.target = target
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sl: slice) -> "FakeBatch":
        return FakeBatch(self.target, self.items[sl])


def fake_batch(target: Optional[str], n: int, prefix: str = "s") -> FakeBatch:
    return FakeBatch(target, [f"{prefix}{i:04d}" for i in range(n)])


CT = {"rw1": RW1_HEADERS, "rw2": RW2_HEADERS}


class FakeEncoder:
    def __init__(self, fmt: str, many: bool = False, pad: int = 0) -> None:
        self.fmt = fmt
        self.pad = pad
        if many:
            self.encode_many = lambda batches: self._enc([i for b in batches for i in b.items],
                                                         [b.target for b in batches])

    def _enc(self, items: List[str], targets: List[Any]) -> Any:
        body = json.dumps({"fmt": self.fmt, "targets": targets, "items": items, "pad": "p" * self.pad * len(items)})
        return body.encode(), dict(CT.get(self.fmt, RW1_HEADERS))

    def encode(self, batch: FakeBatch) -> Any:
        return self._enc(batch.items, [batch.target])


def fake_factory(fmt: str) -> FakeEncoder:
    return FakeEncoder(fmt)


def many_factory(fmt: str) -> FakeEncoder:
    return FakeEncoder(fmt, many=True)


class Recorder:
    """Async MockTransport handler: decodes FakeEncoder bodies, counts concurrency."""

    def __init__(self, answer: Any = 204, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.bodies: List[Dict[str, Any]] = []
        self.headers: List[httpx.Headers] = []
        self.times: List[float] = []
        self.sizes: List[int] = []
        self.active = 0
        self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            body = json.loads(request.content)
            answer = self.answer(request, body) if callable(self.answer) else self.answer
            if isinstance(answer, int):
                answer = httpx.Response(answer)
            if 200 <= answer.status_code < 300:
                self.bodies.append(body)
                self.headers.append(request.headers)
                self.times.append(time.monotonic())
                self.sizes.append(len(request.content))
            return answer
        finally:
            self.active -= 1

    def items(self) -> List[str]:
        return [i for b in self.bodies for i in b["items"]]


def output(rec: Any, factory: Any = fake_factory, fmt: str = "rw1", **kw: Any) -> Output:
    kw.setdefault("retry", FAST)
    kw.setdefault("flush_interval_s", 0.01)
    return Output("test", URL, fmt, factory, transport=httpx.MockTransport(rec), rng=random.Random(0), **kw)


def test_batches_split_by_samples_in_order() -> None:
    rec = Recorder()

    async def go() -> Output:
        out = output(rec, max_samples_per_batch=100)
        await out.submit(fake_batch("a", 250))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert [len(b["items"]) for b in rec.bodies] == [100, 100, 50]
    assert rec.items() == fake_batch("a", 250).items
    assert (out.stats.batches_sent, out.stats.samples_sent) == (3, 250)
    assert out.stats.bytes_sent == sum(rec.sizes) > 0


def test_batches_split_by_bytes() -> None:
    rec = Recorder()
    sizes: List[int] = []

    async def spy(request: httpx.Request) -> httpx.Response:
        sizes.append(len(request.content))
        return await rec(request)

    async def go() -> Output:
        out = Output("t", URL, "rw1", lambda f: FakeEncoder(f, pad=20), transport=httpx.MockTransport(spy),
                     retry=FAST, flush_interval_s=0.01, max_samples_per_batch=1000, max_bytes_per_batch=700)
        await out.submit(fake_batch("a", 100))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert max(sizes) <= 700 and len(sizes) > 3
    assert rec.items() == fake_batch("a", 100).items  # order kept across the splits
    assert out.stats.byte_splits > 0 and out.stats.samples_sent == 100


def test_merging_with_encode_many_up_to_the_sample_bound() -> None:
    rec = Recorder()

    async def go() -> None:
        out = output(rec, many_factory, max_samples_per_batch=100, flush_interval_s=0.2)
        for t in "abcde":
            await out.submit(fake_batch(t, 30, prefix=t))
        await out.flush()
        await out.aclose()

    run(go())
    assert [len(b["items"]) for b in rec.bodies] == [90, 60]
    assert [b["targets"] for b in rec.bodies] == [["a", "b", "c"], ["d", "e"]]


def test_max_in_flight_respected() -> None:
    rec = Recorder(delay=0.05)

    async def go() -> Output:
        out = output(rec, max_in_flight=3)
        for i in range(12):
            await out.submit(fake_batch(f"t{i}", 5))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert rec.peak == 3 and len(rec.bodies) == 12 and out.stats.in_flight == 0


def test_same_target_never_in_flight_twice_and_stays_in_order() -> None:
    calls = {"n": 0}

    def answer(request: httpx.Request, body: Dict[str, Any]) -> int:
        calls["n"] += 1
        return 503 if calls["n"] == 1 else 204  # the first request needs a retry

    rec = Recorder(answer=answer, delay=0.01)

    async def go() -> None:
        out = output(rec, max_in_flight=4)
        for k in range(4):
            await out.submit(fake_batch("node-1", 3, prefix=f"scrape{k}-"))
        await out.flush()
        await out.aclose()

    run(go())
    assert rec.peak == 1
    assert [b["items"][0] for b in rec.bodies] == ["scrape0-0000", "scrape1-0000", "scrape2-0000", "scrape3-0000"]


def test_flush_interval() -> None:
    rec = Recorder()

    async def go() -> float:
        out = output(rec, flush_interval_s=0.4, max_samples_per_batch=1000)
        t0 = time.monotonic()
        await out.submit(fake_batch("a", 10))
        await asyncio.sleep(0.15)
        assert rec.bodies == []  # waiting for the interval
        for _ in range(100):
            if rec.bodies:
                break
            await asyncio.sleep(0.02)
        sent_after = rec.times[0] - t0
        await out.aclose()
        return sent_after

    sent_after = run(go())
    assert 0.35 <= sent_after < 1.5


def test_full_batch_sent_before_the_interval() -> None:
    rec = Recorder()

    async def go() -> float:
        out = output(rec, flush_interval_s=30, max_samples_per_batch=50)
        t0 = time.monotonic()
        await out.submit(fake_batch("a", 50))
        for _ in range(100):
            if rec.bodies:
                break
            await asyncio.sleep(0.01)
        await out.aclose()
        return rec.times[0] - t0

    assert run(go()) < 1.0


def test_budget_exhausted_goes_to_spool_then_fast_fail_then_recovery() -> None:
    state = {"up": False, "requests": 0}

    def answer(request: httpx.Request, body: Dict[str, Any]) -> int:
        state["requests"] += 1
        return 204 if state["up"] else 503

    rec = Recorder(answer=answer)
    spooled: List[Any] = []

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spooled.append((body, headers, samples))

    async def go() -> Output:
        out = output(rec, spool_hook=hook, retry=RetryPolicy(min_backoff_s=0.01, jitter=0, budget_s=0.1))
        await out.submit(fake_batch("a", 7))
        await out.flush()
        assert len(spooled) == 1 and out.stats.down
        first = state["requests"]
        assert first > 2  # retried until the budget ran out
        await out.submit(fake_batch("b", 3))
        await out.flush()
        assert state["requests"] == first + 1  # down: one attempt, then the spool
        state["up"] = True
        await out.submit(fake_batch("c", 2))
        await out.flush()
        assert not out.stats.down and out.stats.last_success_ts is not None
        await out.aclose()
        return out

    out = run(go())
    body, headers, samples = spooled[0]
    assert json.loads(body)["items"] == fake_batch("a", 7).items and samples == 7
    assert headers == RW1_HEADERS  # the encoder's headers only: no auth, nothing secret
    assert out.stats.spooled_batches == 2 and out.stats.spooled_samples == 10
    assert out.stats.spooled_by_reason == {"retry_budget": 2} and out.stats.retries > 0


def test_no_spool_hook_drops_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(answer=500)
    caplog.set_level(logging.DEBUG, logger="dcgmrelay.transport")

    async def go() -> Output:
        out = output(rec, retry=RetryPolicy(min_backoff_s=0.001, jitter=0, budget_s=0.02))
        for t in "abc":
            await out.submit(fake_batch(t, 4))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert out.stats.dropped_batches == {"retry_budget": 3} and out.stats.dropped_samples == {"retry_budget": 12}
    assert sum("no spool" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == 1


def test_permanent_4xx_dropped_not_spooled(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(answer=lambda r, b: httpx.Response(400, text="out of order sample"))
    spooled: List[Any] = []

    async def hook(*a: Any) -> None:
        spooled.append(a)

    async def go() -> Output:
        out = output(rec, spool_hook=hook)
        for t in "ab":
            await out.submit(fake_batch(t, 4))
        await out.flush()
        await out.aclose()
        return out

    with caplog.at_level(logging.WARNING, logger="dcgmrelay.transport"):
        out = run(go())
    assert spooled == [] and out.stats.dropped_batches == {"http_400": 2}
    assert out.sender.stats.permanent_errors == {400: 2}
    assert sum("out of order sample" in r.getMessage() for r in caplog.records) == 1


def test_415_falls_back_to_rw1_and_remembers() -> None:
    def answer(request: httpx.Request, body: Dict[str, Any]) -> int:
        return 415 if "v2" in request.headers["Content-Type"] else 204

    rec = Recorder(answer=answer)
    seen: List[str] = []

    async def go() -> Output:
        out = output(rec, fmt="rw2", fallback_fmt="rw1")
        await out.submit(fake_batch("a", 5))
        await out.flush()
        await out.submit(fake_batch("a", 6))
        await out.flush()
        seen.extend(b["fmt"] for b in rec.bodies)
        await out.aclose()
        return out

    out = run(go())
    assert seen == ["rw1", "rw1"] and rec.items() == fake_batch("a", 5).items + fake_batch("a", 6).items
    assert out.active_fmt == "rw1" and out.stats.fallback_active
    assert out.sender.stats.unsupported_media_type == 1  # the second batch went straight to 1.0


def test_rw2_answered_like_a_1_0_receiver_falls_back() -> None:
    def answer(request: httpx.Request, body: Dict[str, Any]) -> httpx.Response:
        return httpx.Response(204)  # no X-Prometheus-Remote-Write-*-Written: a 1.0 receiver

    rec = Recorder(answer=answer)

    async def go() -> Output:
        out = output(rec, fmt="rw2", fallback_fmt="rw1")
        await out.submit(fake_batch("a", 5))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert [b["fmt"] for b in rec.bodies] == ["rw2", "rw1"]  # the 2.0 one was lost: re-sent as 1.0
    assert out.active_fmt == "rw1" and out.stats.samples_sent == 5


def test_415_without_fallback_is_dropped() -> None:
    rec = Recorder(answer=415)

    async def go() -> Output:
        out = output(rec, fmt="rw2")
        await out.submit(fake_batch("a", 5))
        await out.flush()
        await out.aclose()
        return out

    assert run(go()).stats.dropped_batches == {"http_415": 1}


def test_aclose_hands_in_flight_and_buffered_to_the_spool() -> None:
    rec = Recorder(delay=30)  # the collector hangs
    spooled: List[Any] = []

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spooled.append(json.loads(body)["items"][0])

    async def go() -> float:
        out = output(rec, spool_hook=hook, max_in_flight=1, timeout_s=60)
        for t in "abc":
            await out.submit(fake_batch(t, 3, prefix=t))
        await asyncio.sleep(0.1)
        assert out.stats.in_flight == 1
        t0 = time.monotonic()
        await asyncio.gather(out.aclose(timeout_s=0.2), out.aclose(timeout_s=0.2))  # twice: one close
        took = time.monotonic() - t0
        with pytest.raises(RuntimeError):
            await out.submit(fake_batch("d", 1))
        return took

    took = run(go())
    assert took < 2.0
    assert sorted(spooled) == ["a0000", "b0000", "c0000"]  # each exactly once


def test_submit_during_shutdown_goes_to_spool() -> None:
    spooled: List[int] = []

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spooled.append(samples)

    async def go() -> None:
        out = output(Recorder(delay=30), spool_hook=hook, timeout_s=60)
        await out.submit(fake_batch("a", 2))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(out.aclose(timeout_s=0.3))
        await asyncio.sleep(0.05)
        await out.submit(fake_batch("b", 4))
        await closing

    run(go())
    assert sorted(spooled) == [2, 4]


def test_spool_hook_failure_counted() -> None:
    async def hook(*a: Any) -> None:
        raise OSError("disk full")

    async def go() -> Output:
        out = output(Recorder(answer=503), spool_hook=hook, retry=RetryPolicy(min_backoff_s=0, jitter=0, budget_s=0))
        await out.submit(fake_batch("a", 2))
        await out.flush()
        await out.aclose()
        return out

    assert run(go()).stats.dropped_batches == {"spool_error": 1}


def test_buffer_bound_spills_oldest_to_spool() -> None:
    spooled: List[str] = []

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spooled.append(json.loads(body)["targets"][0])

    async def go() -> Output:
        out = output(Recorder(), spool_hook=hook, flush_interval_s=30, max_samples_per_batch=100,
                     max_buffered_samples=25)
        for t in "abcd":
            await out.submit(fake_batch(t, 10))
        assert out.stats.buffered_samples <= 25
        await out.aclose()
        return out

    out = run(go())
    assert spooled[:2] == ["a", "b"] and out.stats.spooled_by_reason["buffer_full"] == 2


def test_replay_in_order_stops_at_first_failure() -> None:
    def answer(request: httpx.Request, body: Dict[str, Any]) -> Any:
        item = body["items"][0]
        if item == "bad":
            return httpx.Response(400, text="invalid")
        return 503 if item == "down" else 204

    rec = Recorder(answer=answer)

    class Rec:
        def __init__(self, item: str) -> None:
            self.body = json.dumps({"items": [item]}).encode()
            self.headers = RW1_HEADERS
            self.samples = 1

    records = [(json.dumps({"items": ["r1"]}).encode(), RW1_HEADERS, 1), Rec("r2"), Rec("bad"), Rec("down"), Rec("r5")]

    async def go() -> Any:
        out = output(rec)
        res = await out.replay(records, max_attempts=2)

        async def agen() -> Any:
            yield Rec("r6")

        res2 = await out.replay(agen())
        await out.aclose()
        return out, res, res2

    out, res, res2 = run(go())
    assert (res.done, res.sent, res.dropped) == (3, 2, 1)
    assert isinstance(res.error, RetryBudgetExhausted)
    assert rec.items() == ["r1", "r2", "r6"] and res2.sent == 1
    assert out.stats.replayed_batches == 3 and out.stats.dropped_batches == {"replay_http_400": 1}


def test_custom_headers_and_compression_on_output() -> None:
    rec_headers: List[httpx.Headers] = []
    import gzip

    def handler(request: httpx.Request) -> httpx.Response:
        rec_headers.append(request.headers)
        assert json.loads(gzip.decompress(request.content))["items"]
        return httpx.Response(204)

    def plain(fmt: str) -> Any:
        return lambda batch: (json.dumps({"items": batch.items}).encode(), {"Content-Type": "application/json"})

    async def go() -> None:
        out = Output("o", URL, "json", plain, transport=httpx.MockTransport(handler), compression="gzip",
                     headers={"X-License-Key": Secret("lk"), "X-Scope-OrgID": "tenant"}, retry=FAST,
                     flush_interval_s=0.01, auth={"bearer_token": "tkn"})
        await out.submit(fake_batch("a", 3))
        await out.flush()
        await out.aclose()

    run(go())
    h = rec_headers[0]
    assert h["Content-Encoding"] == "gzip" and h["X-License-Key"] == "lk" and h["X-Scope-OrgID"] == "tenant"
    assert h["Authorization"] == "Bearer tkn" and h["User-Agent"].startswith("dcgmrelay/")
    body, hdrs = compress_body(b"abc", {"Content-Encoding": "snappy"}, "gzip")
    assert body == b"abc" and hdrs == {"Content-Encoding": "snappy"}  # the encoder's choice stands


def test_encoder_error_dropped_and_flusher_survives() -> None:
    rec = Recorder()

    class Flaky(FakeEncoder):
        def encode(self, batch: FakeBatch) -> Any:
            if batch.target == "boom":
                raise ValueError("cannot encode")
            return super().encode(batch)

    async def go() -> Output:
        out = output(rec, lambda f: Flaky(f))
        await out.submit(fake_batch("boom", 2))
        await out.submit(fake_batch("ok", 2))
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert out.stats.dropped_batches == {"encode_error": 1} and len(rec.bodies) == 1


# ------------------------------------------------------------------------------------------
# split_batch on relay batches


def _relay_batches() -> Any:
    dcgmrelay = pytest.importorskip("dcgmrelay")
    relay_mod = pytest.importorskip("dcgmrelay.relay")
    from dcgmrelay.csvspec import load_csv

    fields = ["DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
              "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED"]

    def body(skip: str = "") -> bytes:
        lines = []
        for f in fields:
            if f == skip:
                continue
            lines.append(f"# TYPE {f} gauge")
            for g in range(4):
                lines.append(f'{f}{{gpu="{g}",UUID="GPU-{g:04d}",device="nvidia{g}",modelName="T",Hostname="h"}} {g + 1}')
        return ("\n".join(lines) + "\n").encode()

    relay = relay_mod.Relay(load_csv("default"))
    first = relay.ingest(dcgmrelay.parse(body()), target="n0:9400", timestamp_ms=1000)
    second = relay.ingest(dcgmrelay.parse(body(skip="DCGM_FI_DEV_GPU_TEMP")), target="n0:9400", timestamp_ms=2000)
    return first, second


def test_split_relay_batch_into_slices() -> None:
    first, second = _relay_batches()
    assert len(first) == 28 and len(second) == 24 and len(second.stale_name_ids) == 4
    pieces = split_batch(second, 10)
    assert [len(p) + len(p.stale_name_ids) for p in pieces] == [10, 10, 8]
    assert all(isinstance(p, BatchSlice) for p in pieces)
    assert [x for p in pieces for x in p.samples()] == list(second.samples())
    assert [x for p in pieces for x in p.stale_series()] == list(second.stale_series())
    joined = np.concatenate([p.values for p in pieces])
    assert np.array_equal(joined, second.values)
    p = pieces[1]
    assert p.target == second.target and p.timestamp_ms == 2000 and p.names is second.names
    assert p.series_labels(0) == second.series_labels(10) and p.labels(-1) == second.labels(19)
    assert len(p.entity_ids) == len(p) and len(p.timestamps) == 10
    with pytest.raises(IndexError):
        p.labels(10)
    # nested split of a slice, and the halving used for the byte bound
    sub = split_batch(pieces[2], 3)
    assert [x for s in sub for x in s.stale_series()] == list(second.stale_series())
    assert split_batch(first, 100) == [first]
    assert "BatchSlice" in repr(p)


def test_split_generic_batches() -> None:
    assert [len(x) for x in split_batch(list(range(7)), 3)] == [3, 3, 1]
    obj = object()
    assert split_batch(obj, 1) == [obj]
    with pytest.raises(ValueError):
        split_batch([1], 0)


# ------------------------------------------------------------------------------------------
# With the real encoder and spool


def _rw2_answer(written: Optional[int] = None) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        answer.requests.append(request)
        if "v2" not in request.headers["Content-Type"]:
            return httpx.Response(204)
        return httpx.Response(204, headers={"X-Prometheus-Remote-Write-Samples-Written": str(written or 10_000)})
    answer.requests = []  # type: ignore[attr-defined]
    return answer


def test_output_with_the_real_encoder_splits_relay_batches() -> None:
    pytest.importorskip("dcgmrelay.encode")
    first, second = _relay_batches()
    h = _rw2_answer()

    async def go() -> Output:
        out = Output("rw", URL, "rw2", transport=httpx.MockTransport(h), retry=FAST, flush_interval_s=0.01,
                     max_samples_per_batch=10, fallback_fmt="rw1")
        await out.submit(second)
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert len(h.requests) == 3 and all("io.prometheus.write.v2.Request" in r.headers["Content-Type"]
                                        for r in h.requests)
    assert out.stats.samples_sent == 28 and out.sender.stats.samples_not_written == 0


def test_output_with_the_real_encoder_falls_back_to_rw1() -> None:
    pytest.importorskip("dcgmrelay.encode")
    first, _ = _relay_batches()

    def answer(request: httpx.Request) -> httpx.Response:
        answer.types.append(request.headers["Content-Type"])
        return httpx.Response(415 if "v2" in request.headers["Content-Type"] else 204)
    answer.types = []  # type: ignore[attr-defined]

    async def go() -> Output:
        out = Output("rw", URL, "rw2", transport=httpx.MockTransport(answer), retry=FAST, flush_interval_s=0.01,
                     fallback_fmt="rw1")
        await out.submit(first)
        await out.flush()
        await out.aclose()
        return out

    out = run(go())
    assert answer.types == ["application/x-protobuf;proto=io.prometheus.write.v2.Request", "application/x-protobuf"]
    assert out.active_fmt == "rw1" and out.stats.samples_sent == 28


def test_409_restarts_a_stateful_stream_once() -> None:
    resets: List[int] = []

    class Stateful(FakeEncoder):
        def reset_dictionaries(self) -> None:
            resets.append(1)

    calls = {"n": 0}

    def answer(request: httpx.Request, body: Dict[str, Any]) -> int:
        calls["n"] += 1
        return 409 if calls["n"] == 1 else 204

    rec = Recorder(answer=answer)

    async def go(r: Recorder) -> Output:
        out = output(r, lambda f: Stateful(f), fmt="compact")
        await out.submit(fake_batch("a", 3))
        await out.flush()
        await out.aclose()
        return out

    out = run(go(rec))
    assert resets == [1] and len(rec.bodies) == 1 and out.stats.dropped_batches == {}
    resets.clear()
    out = run(go(Recorder(answer=409)))  # still 409 after the restart: dropped
    assert resets == [1] and out.stats.dropped_batches == {"http_409": 1}


def test_spool_round_trip_with_the_real_spool(tmp_path: Any) -> None:
    spool_mod = pytest.importorskip("dcgmrelay.spool")
    from dcgmrelay.transport import headers_from_meta, spool_hook_for, spool_meta

    assert headers_from_meta(spool_meta(RW2_HEADERS, 7)) == ({k.lower(): v for k, v in RW2_HEADERS.items()}, 7)
    state = {"up": False}

    def answer(request: httpx.Request, body: Dict[str, Any]) -> Any:
        if not state["up"]:
            return 503
        return httpx.Response(204, headers={"X-Prometheus-Remote-Write-Samples-Written": str(len(body["items"]))})

    rec = Recorder(answer=answer)
    appended: List[str] = []

    def hook_for(spool: Any) -> Any:
        inner = spool_hook_for(spool)

        async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
            await inner(body, headers, samples)
            appended.append(json.loads(body)["items"][0])
        return hook

    async def go(spool: Any) -> Any:
        out = output(rec, fmt="rw2", spool_hook=hook_for(spool),
                     retry=RetryPolicy(min_backoff_s=0.001, jitter=0, budget_s=0.02))
        for t in "abc":
            await out.submit(fake_batch(t, 4, prefix=t))
        await out.flush()
        assert len(spool) == 3 and out.stats.spooled_batches == 3
        failed = await out.replay_spool(spool, max_records=2, max_attempts=1)
        assert failed.done == 0 and failed.error is not None and len(spool) == 3
        state["up"] = True
        res = await out.replay_spool(spool, max_records=2)
        await out.aclose()
        return res

    with spool_mod.Spool(tmp_path / "spool", fsync="never") as spool:
        res = run(go(spool))
        assert (res.done, res.sent, res.error) == (3, 3, None) and len(spool) == 0
    # different targets fail concurrently, in any order; the replay follows the spool's order
    assert sorted(appended) == ["a0000", "b0000", "c0000"]
    assert [b["items"][0] for b in rec.bodies] == appended
    assert all("v2" in h["content-type"] for h in rec.headers)  # headers restored from meta


# -- write-ahead outputs (WriteAheadQueue: the spool is the queue) ---------------------------


def _wal_output(rec: Any, factory: Any, **kw: Any) -> Output:
    kw.setdefault("retry", FAST)
    return Output("wal", URL, "prometheus", factory, transport=httpx.MockTransport(rec), rng=random.Random(0), **kw)


def test_write_ahead_bodies_respect_max_bytes_per_batch(tmp_path: Path) -> None:
    """A write-ahead output encodes the way the in-memory one does: a body over
    max_bytes_per_batch is split before it is written to the spool."""
    rec = Recorder()

    async def go() -> Tuple[Output, List[int]]:
        out = _wal_output(rec, lambda f: FakeEncoder(f, pad=20), max_samples_per_batch=1000, max_bytes_per_batch=700)
        spool = Spool(tmp_path / "spool", fsync="never")
        wal = WriteAheadQueue(out, spool)
        await wal.submit(fake_batch("a", 100))
        sizes = [len(r.payload) for r in spool.peek(max_records=1000)]
        assert await wal.flush(10)
        await wal.aclose(1)
        spool.close()
        return out, sizes

    out, sizes = run(go())
    assert len(sizes) > 3 and max(sizes) <= 700, sizes
    assert rec.items() == fake_batch("a", 100).items  # all of them, in order, once
    assert out.stats.byte_splits > 0 and out.stats.samples_sent == 100


def test_write_ahead_encode_error_is_counted_and_logged_once(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeEncoder):
        def encode(self, batch: FakeBatch) -> Any:
            raise ValueError("cannot encode this")

    rec = Recorder()

    async def go() -> Output:
        out = _wal_output(rec, Broken)
        spool = Spool(tmp_path / "spool", fsync="never")
        wal = WriteAheadQueue(out, spool)
        await wal.submit(fake_batch("a", 5))
        await wal.submit(fake_batch("b", 3))
        assert len(spool) == 0
        await wal.aclose(1)
        spool.close()
        return out

    with caplog.at_level(logging.ERROR, logger="dcgmrelay"):
        out = run(go())
    assert out.stats.dropped_samples == {"encode_error": 8}, out.stats.dropped_samples
    assert sum("cannot encode this" in r.getMessage() for r in caplog.records) == 1
    assert rec.bodies == []


def test_write_ahead_full_spool_sends_from_memory(tmp_path: Path) -> None:
    """A record the spool cannot take (here: over its size cap) costs durability, not data."""
    rec = Recorder()

    async def go() -> Output:
        out = _wal_output(rec, lambda f: FakeEncoder(f, pad=50), flush_interval_s=0.01)
        spool = Spool(tmp_path / "spool", fsync="never", max_bytes=4096, segment_bytes=4096)
        wal = WriteAheadQueue(out, spool)
        await wal.submit(fake_batch("a", 200))  # ~10 kB: over the cap
        await out.flush()
        await wal.aclose(1)
        await out.aclose()
        spool.close()
        return out

    out = run(go())
    assert out.stats.wal_bypassed == 1
    assert rec.items() == fake_batch("a", 200).items
