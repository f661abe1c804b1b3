"""Ship encoded batches over HTTP: retries, auth, TLS, batching, spool hand-off.

    >>> out = Output("mimir", "https://mimir:8080/api/v1/push", "prometheus-rw2",
    ...              fallback_fmt="prometheus-rw1", auth={"bearer_token_file": "/var/run/token"},
    ...              spool_hook=spool.append)
    >>> await out.submit(relay_batch)         # buffered; a background task ships it
    >>> await out.aclose(timeout_s=5)         # SIGTERM: flush, wait, spool the rest

Layers (each usable on its own):

* :func:`build_client_kwargs` turns the ``auth``/``tls`` mappings of a
  :class:`~dcgmrelay.targets.Target` (the same keys for scrapes and outputs) and
  custom headers into keyword arguments for ``httpx.Client``/``httpx.AsyncClient``.
* :class:`Sender` (async) and :class:`SyncSender` POST one already-encoded body with
  the :class:`RetryPolicy`; they map httpx errors once, at the single place httpx is
  called (:func:`_map_httpx_error`), into :class:`TransportError` subclasses.
* :class:`Output` is one configured destination: it buffers relay batches, cuts them
  into requests bounded by samples and bytes, sends at most ``max_in_flight`` at a
  time, falls back from remote write 2.0 to 1.0 on 415, and hands what it cannot
  deliver to the spool hook.

Retry policy (:class:`RetryPolicy`)
-----------------------------------

What each outcome of one HTTP attempt leads to:

======================================  =====================================================
outcome of an attempt                   what the sender does
======================================  =====================================================
2xx                                     done. For a remote write 2.0 request the
                                        ``X-Prometheus-Remote-Write-*-Written`` headers are
                                        checked (see "Remote write 2.0" below)
status in ``retry_on`` (default 429     :class:`RetryableStatus`: retried after
and every 5xx)                          ``delay(attempt, retry_after)``
connection refused / reset / dropped    :class:`ConnectError` (``TLSError``,
mid-response, DNS, TLS handshake        ``ConnectionLost``): retried with backoff
connect/read/write/pool timeout         :class:`RequestTimeout`: retried with backoff
unreadable credential file              :class:`CredentialsError`: retried with backoff
415 to a remote write 2.0 request       :class:`UnsupportedMediaType`: not retried as is;
                                        :class:`Output` re-encodes with ``fallback_fmt``
any other 3xx/4xx (400, 401, 403,       :class:`PermanentStatus`: never retried. The batch
404, 409, 413, 415 to a 1.0 request)    is dropped, counted per status in ``stats`` and
                                        logged ONCE per (status, output) with the status
                                        and the first 200 bytes of the body
bad URL, unsupported scheme, invalid    :class:`RequestError`: not retried (configuration);
header value                            :class:`Output` hands the body to the spool hook
next delay would end past ``budget_s``  :class:`RetryBudgetExhausted` (``last_error``,
(or ``max_attempts`` reached)           ``attempts``): :class:`Output` spools the body
======================================  =====================================================

The delay before attempt ``n + 1`` (``n`` = attempts made so far, from 1):

=========================  ====================================================  ===========================
parameter (default)        meaning                                               with the defaults
=========================  ====================================================  ===========================
``min_backoff_s`` (0.5)    un-jittered delay after the first failure             n=1: 0.5 s
``multiplier`` (2)         growth per failed attempt:                            n=2: 1, 3: 2, 4: 4, 5: 8,
                           ``base = min_backoff_s * multiplier ** (n - 1)``      6: 16 s
``max_backoff_s`` (30)     cap on ``base``                                       n>=7: 30 s
``jitter`` (0.2)           delay = ``base * uniform(1 - jitter, 1 + jitter)``    n=1: 0.4..0.6 s; the cap can
                           (a fraction; 0 disables)                              be exceeded by ``jitter``
``respect_retry_after``    a ``Retry-After`` on a retryable answer (delta-       ``Retry-After: 7`` -> 7..8.4 s
(True)                     seconds or an HTTP-date) replaces the backoff:
                           ``clamp(ra, min_backoff_s, max_retry_after_s) *
                           uniform(1, 1 + jitter)``, never earlier than asked,
                           at most ``max_retry_after_s``
``max_retry_after_s``      ceiling on an honoured Retry-After                    ``Retry-After: 3600`` -> 300 s
(300)
``budget_s`` (120)         time bound from the first attempt: if ``elapsed +     about 9 attempts against a
                           delay`` would pass it, stop now with                  collector that refuses
                           :class:`RetryBudgetExhausted` (no useless sleep).     connections at once
                           The last attempt may still take one ``timeout_s``,
                           so a send ends within ``budget_s + timeout_s``
``retry_on`` (429, "5xx")  statuses retried; ints and ``"5xx"``. Remove 429 to
                           drop on 429 (the Prometheus default)
``max_attempts`` (None)    optional bound on attempts besides the budget
=========================  ====================================================  ===========================

Remote write 2.0
----------------

A request is 2.0 when its ``Content-Type`` names ``io.prometheus.write.v2.Request``
(or ``X-Prometheus-Remote-Write-Version`` starts with ``2``). On a 2xx answer:

* ``X-Prometheus-Remote-Write-Samples-Written`` missing: ``stats.written_header_missing``.
  If *none* of the Samples/Histograms/Exemplars-Written headers is there the receiver
  is a 1.0 receiver that decoded the 2.0 body as an empty 1.0 message (the spec says:
  assume 415): :class:`UnsupportedMediaType` is raised (``inferred=True``) so that
  :class:`Output` re-sends as 1.0 (``missing_written_headers="note"`` only counts it).
* Present and lower than the samples sent: the difference is added to
  ``stats.samples_not_written`` and logged (once per output at WARNING). Not retried.

415 to a 2.0 request raises :class:`UnsupportedMediaType`. :class:`Output` then
switches to ``fallback_fmt`` for good (``output.stats.fallback_active``; until
:meth:`Output.reset_format` or a restart), re-encodes the same batches and sends them.

Batching and splitting (:class:`Output`)
----------------------------------------

* A submitted batch counts ``len(batch) + len(batch.stale_name_ids)`` units (samples
  plus stale markers; for other batch-likes ``len(batch)``). One larger than
  ``max_samples_per_batch`` is cut with :func:`split_batch` into :class:`BatchSlice`
  pieces (index slices of the columns sharing the batch's tables; stale markers go
  after the samples, in the last pieces). An encoder takes a ``RelayBatch`` or a
  ``BatchSlice`` alike.
* An encoder is ``encode(batch) -> (body, headers)`` or ``(body, headers, samples)``
  (``samples``: what the body really carries, for the 2.0 written check; default: the
  units). The default (:func:`default_encoder_factory`) is one
  :class:`dcgmrelay.encode.Encoder` per output, reporting its ``last_samples``. An
  encoder object may also offer ``encode_many(batches)``; then queued pieces are
  merged into one request up to ``max_samples_per_batch``, otherwise each piece is one
  request. One with ``reset_dictionaries()`` (the stateful compact format) gets it
  called after a 409, and the same samples are re-encoded and sent once more.
* After encoding, a body over ``max_bytes_per_batch`` is split in two (by pieces, or
  a single piece by :func:`split_batch` into halves) and re-encoded, recursively; a
  single sample that is still too big is sent anyway (logged once).
* Pieces wait in the buffer until ``flush_interval_s`` has passed since the oldest
  one, or ``max_samples_per_batch`` units are waiting, or :meth:`Output.flush`; then
  everything sendable goes out. At most ``max_in_flight`` requests run at once
  (``asyncio.Semaphore``, shared with :meth:`Output.replay`), and requests carrying
  pieces of the same target are never in flight together, so samples of a series
  leave in timestamp order (remote write requires it).
* ``max_buffered_samples`` (default the larger of 1,000,000 and 50 x ``max_samples_per_batch``) bounds memory: past
  it the oldest pieces are encoded and handed to the spool hook (dropped as
  ``buffer_full`` without one).

Spool hook contract
-------------------

``spool_hook(body: bytes, headers: dict[str, str], samples: int) -> Awaitable[None]``
receives an encoded request exactly as it would be POSTed: the body (already
compressed) and the *encoder's* headers (Content-Type, Content-Encoding,
X-Prometheus-Remote-Write-Version, ...). Auth and custom headers are never in it (the
client adds them when sending), so nothing secret reaches the disk. It is called when
the retry budget is exhausted, for a :class:`RequestError`, while the output is down
(``fast_fail_when_down``: after a budget exhaustion each new request gets one attempt
until one succeeds), for buffer overflow, and on :meth:`Output.aclose` for what is
still buffered or in flight. Never for a permanent 4xx (that batch is dropped). If the
hook raises, the batch is dropped (``dropped_batches["spool_error"]``) and logged.
Spooled records come back through :meth:`Output.replay` as ``(body, headers,
samples)`` tuples, objects with those attributes, or ``SpooledRecord`` objects
(``payload``, ``meta``); ``on_done`` acks each finished record.

With :mod:`dcgmrelay.spool`::

    spool = Spool(directory, max_bytes=1 << 30)
    out = Output(..., spool_hook=spool_hook_for(spool))   # append(body, meta=spool_meta(...))
    await out.replay_spool(spool)                          # peek, send, ack each; stops at a failure

Secrets
-------

Bearer tokens, passwords and the values of secret headers (a :class:`Secret` value,
or a name containing ``authorization``, ``token``, ``key``, ``secret``, ``password``,
``cookie``, ``auth``, ``credential``, ``signature`` or ``session``) never appear in
logs, exception messages or reprs: reprs leave them out, URLs go through
:func:`redact_url`, header dumps through :func:`redact`, and error bodies and messages
are scrubbed of every known secret value (including basic auth's base64 form) before
they are logged or raised.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import gzip
import importlib
import itertools
import logging
import math
import os
import random
import ssl
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import (
    Any,
    AsyncIterable,
    Awaitable,
    Callable,
    ClassVar,
    Deque,
    Dict,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
)

import cramjam
import httpx

from ._http_client import LeanTransport, deadline
from ._version import __version__
from ._secret import Secret
from .errors import DcgmRelayError

__all__ = [
    "BasicAuth",
    "BatchSlice",
    "BearerToken",
    "BearerTokenFile",
    "ConnectError",
    "ConnectionLost",
    "CredentialsError",
    "Output",
    "OutputStats",
    "PermanentStatus",
    "ReplayResult",
    "RequestError",
    "RequestTimeout",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "RetryableStatus",
    "Secret",
    "SendResult",
    "Sender",
    "SenderStats",
    "StatusError",
    "SyncSender",
    "TLSError",
    "TransportConfigError",
    "TransportError",
    "UnsupportedMediaType",
    "WrittenCheck",
    "build_auth",
    "build_client_kwargs",
    "build_ssl_context",
    "compress_body",
    "default_encoder_factory",
    "headers_from_meta",
    "is_secret_header",
    "parse_retry_after",
    "redact",
    "redact_url",
    "split_batch",
    "spool_hook_for",
    "spool_meta",
]

log = logging.getLogger(__name__)

USER_AGENT = f"dcgmrelay/{__version__}"
#: How much of an error body is kept, logged and put in exceptions.
BODY_START_BYTES = 200
REDACTED = "<redacted>"

SAMPLES_WRITTEN = "X-Prometheus-Remote-Write-Samples-Written"
HISTOGRAMS_WRITTEN = "X-Prometheus-Remote-Write-Histograms-Written"
EXEMPLARS_WRITTEN = "X-Prometheus-Remote-Write-Exemplars-Written"

#: Headers a user may not set on an output (remote write: "MUST NOT allow users to
#: configure them"); the encoder and the client own them.
RESERVED_OUTPUT_HEADERS = frozenset({
    "content-type", "content-encoding", "content-length", "transfer-encoding", "host",
    "user-agent", "x-prometheus-remote-write-version",
})

_SECRET_WORDS = ("authorization", "auth", "token", "key", "secret", "password", "passwd",
                 "cookie", "credential", "signature", "session")


# ------------------------------------------------------------------------------------------
# Errors


class TransportConfigError(DcgmRelayError, ValueError):
    """An auth, TLS, header or output setting that cannot be used."""


class TransportError(DcgmRelayError):
    """Sending a request failed. ``retryable`` says whether the retry loop tries again.

    Messages never contain credentials: URLs are redacted and bodies scrubbed.
    """

    retryable: ClassVar[bool] = False
    #: Short reason used as a stats key ("connect", "timeout", "http_503", ...).
    reason: str = "error"

    def __init__(self, message: str, *, url: Optional[str] = None) -> None:
        self.message = message
        self.url = url
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class ConnectError(TransportError):
    """No usable connection: refused, unreachable, DNS, proxy, TLS, or lost mid-request."""

    retryable = True
    reason = "connect"


class TLSError(ConnectError):
    """The TLS handshake failed (certificate not trusted, wrong host name, client certificate refused)."""

    reason = "tls"


class ConnectionLost(ConnectError):
    """The connection broke after it was made: reset, closed before or during the answer."""

    reason = "connection_lost"


class RequestTimeout(TransportError):
    """A connect, write, read or connection-pool wait took longer than ``timeout_s``."""

    retryable = True
    reason = "timeout"

    def __init__(self, message: str, *, phase: str = "read", url: Optional[str] = None) -> None:
        self.phase = phase
        super().__init__(message, url=url)


class CredentialsError(TransportError):
    """A credential file (bearer token, password) is missing, unreadable or empty.

    Retried: a mounted secret can appear or be fixed while the relay runs.
    """

    retryable = True
    reason = "credentials"


class RequestError(TransportError):
    """The request cannot be made as configured (bad URL, unsupported scheme, invalid
    header value, too many redirects). Not retried."""

    reason = "request"


class StatusError(TransportError):
    """The receiver answered with a status that is not a success."""

    def __init__(self, status: int, message: str, *, body_start: str = "", url: Optional[str] = None) -> None:
        self.status = int(status)
        self.body_start = body_start
        super().__init__(message, url=url)

    @property
    def reason(self) -> str:  # type: ignore[override]
        return f"http_{self.status}"


class RetryableStatus(StatusError):
    """429 or 5xx (``RetryPolicy.retry_on``): retried; ``retry_after_s`` from ``Retry-After``."""

    retryable = True

    def __init__(self, status: int, message: str, *, body_start: str = "", retry_after_s: Optional[float] = None,
                 url: Optional[str] = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(status, message, body_start=body_start, url=url)


class PermanentStatus(StatusError):
    """Any other non-2xx answer (400, 401, 403, 404, 413 ...): never retried."""


class UnsupportedMediaType(PermanentStatus):
    """415 to a remote write 2.0 request, or (``inferred``) a 2xx to it without any
    ``X-Prometheus-Remote-Write-*-Written`` header: re-encode as 1.0."""

    def __init__(self, status: int, message: str, *, body_start: str = "", inferred: bool = False,
                 url: Optional[str] = None) -> None:
        self.inferred = inferred
        super().__init__(status, message, body_start=body_start, url=url)

    @property
    def reason(self) -> str:  # type: ignore[override]
        return "http_415"


class RetryBudgetExhausted(TransportError):
    """Retries stopped: the next delay would pass ``budget_s`` (or ``max_attempts`` was
    reached). ``last_error`` is the last attempt's error."""

    reason = "retry_budget"

    def __init__(self, message: str, *, last_error: TransportError, attempts: int, elapsed_s: float,
                 url: Optional[str] = None) -> None:
        self.last_error = last_error
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        super().__init__(message, url=url)


def _ssl_cause(exc: BaseException) -> Optional[ssl.SSLError]:
    """The ``ssl.SSLError`` somewhere in ``exc``'s cause/context chain, if any."""
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 10:
        if isinstance(cur, ssl.SSLError) and not isinstance(cur, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        cause = exc.__cause__ or exc.__context__
        text = f"{type(cause).__name__}: {cause}" if cause is not None else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_TIMEOUT_PHASES = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


def _map_httpx_error(exc: BaseException, *, url: Optional[str] = None) -> TransportError:
    """Map an httpx (or socket/ssl) exception to a :class:`TransportError`.

    The one translation point: senders call httpx in exactly one place and route every
    exception through here. ``url`` should already be redacted.

    ==========================================================  =====================
    httpx                                                       dcgmrelay
    ==========================================================  =====================
    ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout      RequestTimeout (phase)
    ConnectError, ProxyError                                    ConnectError
    ... with an ssl.SSLError behind it (also on read/write)     TLSError
    ReadError, WriteError, CloseError, RemoteProtocolError      ConnectionLost
    UnsupportedProtocol, LocalProtocolError, InvalidURL,        RequestError
    TooManyRedirects, DecodingError, anything else
    OSError (not wrapped by httpx)                              ConnectError
    ==========================================================  =====================
    """
    if isinstance(exc, TransportError):
        return exc
    where = f" ({url})" if url else ""
    detail = _detail(exc)
    if isinstance(exc, httpx.TimeoutException):
        phase = next((p for cls, p in _TIMEOUT_PHASES if isinstance(exc, cls)), "read")
        return RequestTimeout(f"{phase} timeout{where}: {detail}", phase=phase, url=url)
    ssl_err = _ssl_cause(exc)
    if ssl_err is not None and isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, OSError)):
        return TLSError(f"TLS error{where}: {type(ssl_err).__name__}: {ssl_err}", url=url)
    if isinstance(exc, (httpx.ConnectError, httpx.ProxyError)):
        return ConnectError(f"cannot connect{where}: {detail}", url=url)
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.CloseError, httpx.RemoteProtocolError,
                        httpx.NetworkError)):
        return ConnectionLost(f"connection lost{where}: {detail}", url=url)
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect{where}: {detail}", url=url)
    return RequestError(f"request failed{where}: {detail}", url=url)


# ------------------------------------------------------------------------------------------
# Secrets and redaction


def _reveal(value: Any) -> str:
    return value.reveal() if isinstance(value, Secret) else str(value)


def is_secret_header(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether a header's value is secret: its name contains one of the secret words
    (``authorization``, ``token``, ``key``, ``secret``, ``password``, ``cookie`` ...) or
    is in ``extra``."""
    low = name.lower()
    return any(w in low for w in _SECRET_WORDS) or low in {e.lower() for e in extra}


def _header_items(headers: Any) -> List[Tuple[str, Any]]:
    if headers is None:
        return []
    if isinstance(headers, httpx.Headers):
        return list(headers.items())
    if isinstance(headers, Mapping):
        return list(headers.items())
    return [(k, v) for k, v in headers]


def redact(headers: Any, secret_names: Iterable[str] = ()) -> Dict[str, str]:
    """A copy of ``headers`` safe to log: secret values (see :func:`is_secret_header`,
    :class:`Secret`, ``secret_names``) replaced by ``<redacted>``."""
    extra = tuple(secret_names)
    out: Dict[str, str] = {}
    for k, v in _header_items(headers):
        k = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        if isinstance(v, Secret) or is_secret_header(k, extra):
            out[k] = REDACTED
        else:
            out[k] = v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return out


def redact_url(url: Union[str, httpx.URL]) -> str:
    """``url`` with its userinfo password and secret-looking query values replaced."""
    try:
        u = httpx.URL(str(url))
    except Exception:
        return "<invalid url>"
    if u.password:
        u = u.copy_with(username=u.username, password="xxx")
    if u.query:
        params = u.params
        if any(is_secret_header(k) for k in params.keys()):
            u = u.copy_with(params=[(k, "xxx" if is_secret_header(k) else v) for k, v in params.multi_items()])
    return str(u)


class _RedactURLFilter(logging.Filter):
    """On the ``httpx`` logger: its "HTTP Request: POST <url>" INFO line prints the
    URL with userinfo and query; redact them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, httpx.URL) for a in args):
            record.args = tuple(redact_url(a) if isinstance(a, httpx.URL) else a for a in args)
        return True


def _install_httpx_log_filter() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactURLFilter) for f in logger.filters):
        logger.addFilter(_RedactURLFilter())


_install_httpx_log_filter()


class _RedactedHeaders(httpx.Headers):
    """httpx headers whose repr hides secret values (the kwargs of
    :func:`build_client_kwargs` are safe to print)."""

    def __repr__(self) -> str:
        return f"Headers({redact(self)!r})"


def _scrubber(secrets: Iterable[str]) -> Callable[[str], str]:
    values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for s in values:
            if s in text:
                text = text.replace(s, REDACTED)
        return text

    return scrub


# ------------------------------------------------------------------------------------------
# Auth


class _WatchedFile:
    """A small file's stripped text, re-read when its (mtime, size, inode, ctime) changes.

    An unreadable or empty file keeps the last good value (a rotation in progress);
    with no value yet it raises :class:`CredentialsError`.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], what: str) -> None:
        self.path = os.fspath(path)
        self.what = what
        self._stamp: Optional[Tuple[int, int, int, int]] = None
        self._value: Optional[str] = None
        self._lock = threading.Lock()
        self._warned = False

    def _keep_or_raise(self, problem: str) -> str:
        if self._value is not None:
            if not self._warned:
                self._warned = True
                log.warning("%s %s: %s; keeping the previous value", self.what, self.path, problem)
            return self._value
        raise CredentialsError(f"{self.what} {self.path}: {problem}")

    def read(self, force: bool = False) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                return self._keep_or_raise(exc.strerror or type(exc).__name__)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
            if not force and stamp == self._stamp and self._value is not None:
                return self._value
            try:
                with open(self.path, "rb") as f:
                    raw = f.read(1 << 20)
            except OSError as exc:
                return self._keep_or_raise(exc.strerror or type(exc).__name__)
            value = raw.decode("utf-8", "replace").strip()
            if not value:
                return self._keep_or_raise("file is empty")
            if self._value is not None and value != self._value:
                log.info("%s %s changed: using the new value", self.what, self.path)
            self._value, self._stamp, self._warned = value, stamp, False
            return value

    @property
    def cached(self) -> Optional[str]:
        return self._value


class BearerToken(httpx.Auth):
    """``Authorization: Bearer <token>`` with a literal token (never shown)."""

    def __init__(self, token: Union[str, Secret]) -> None:
        self._token = _reveal(token).strip()
        if not self._token:
            raise TransportConfigError("bearer_token is empty")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def secret_values(self) -> List[str]:
        return [self._token]

    def __repr__(self) -> str:
        return f"BearerToken({REDACTED!r})"


class BearerTokenFile(httpx.Auth):
    """``Authorization: Bearer <token>`` with the token read from a file.

    The file is ``stat``-ed before every request and re-read (whitespace stripped) when
    its mtime, size, inode or ctime changed, so rotated tokens (Kubernetes bound
    service-account tokens, Vault agents) are picked up without a restart. A 401 answer
    forces one re-read and, if the token changed, one immediate resend.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self._file = _WatchedFile(path, "bearer token file")

    @property
    def path(self) -> str:
        return self._file.path

    def token(self, force: bool = False) -> str:
        return self._file.read(force)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            fresh = self.token(force=True)
            if fresh != token:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request

    def secret_values(self) -> List[str]:
        return [self._file.cached] if self._file.cached else []

    def __repr__(self) -> str:
        return f"BearerTokenFile(path={self.path!r})"


class BasicAuth(httpx.Auth):
    """HTTP basic auth; the password literal or read from ``password_file`` (re-read
    when it changes, like :class:`BearerTokenFile`)."""

    def __init__(self, username: str, password: Union[str, Secret, None] = None, *,
                 password_file: Optional[str] = None) -> None:
        if (password is None) == (password_file is None):
            raise TransportConfigError("basic auth needs exactly one of password and password_file")
        self.username = str(username)
        self._password = None if password is None else _reveal(password)
        self._file = None if password_file is None else _WatchedFile(password_file, "basic auth password file")

    def password(self, force: bool = False) -> str:
        if self._file is not None:
            return self._file.read(force)
        assert self._password is not None
        return self._password

    def _header(self, password: str) -> str:
        raw = f"{self.username}:{password}".encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        pw = self.password()
        request.headers["Authorization"] = self._header(pw)
        response = yield request
        if response.status_code == 401 and self._file is not None:
            fresh = self.password(force=True)
            if fresh != pw:
                request.headers["Authorization"] = self._header(fresh)
                yield request

    def secret_values(self) -> List[str]:
        pw = self._password if self._file is None else self._file.cached
        if not pw:
            return []
        return [pw, self._header(pw)[len("Basic "):]]

    def __repr__(self) -> str:
        src = f"password_file={self._file.path!r}" if self._file is not None else f"password={REDACTED!r}"
        return f"BasicAuth(username={self.username!r}, {src})"


_AUTH_KEYS = ("bearer_token", "bearer_token_file", "basic")
_TLS_KEYS = ("ca_file", "cert_file", "key_file", "insecure_skip_verify", "server_name")


def build_auth(auth: Optional[Mapping[str, Any]]) -> Optional[httpx.Auth]:
    """An ``httpx.Auth`` from a :attr:`Target.auth <dcgmrelay.targets.Target.auth>` mapping.

    Keys (at most one method): ``bearer_token`` (str or :class:`Secret`),
    ``bearer_token_file`` (path), ``basic``: ``(username, password)`` or
    ``{"username": ..., "password": ...}`` / ``{"username": ..., "password_file": ...}``.
    Unknown keys raise :class:`TransportConfigError` (typos must not silently disable auth).
    """
    if not auth:
        return None
    unknown = sorted(set(auth) - set(_AUTH_KEYS))
    if unknown:
        raise TransportConfigError(f"unknown auth setting(s) {unknown}; known: {list(_AUTH_KEYS)}")
    given = [k for k in _AUTH_KEYS if auth.get(k) not in (None, "", ())]
    if len(given) > 1:
        raise TransportConfigError(f"auth: use only one of {given}")
    if not given:
        return None
    key = given[0]
    value = auth[key]
    if key == "bearer_token":
        return BearerToken(value)
    if key == "bearer_token_file":
        return BearerTokenFile(str(value))
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"username", "password", "password_file"})
        if extra or "username" not in value:
            raise TransportConfigError("auth.basic takes username and password or password_file")
        return BasicAuth(str(value["username"]), value.get("password"), password_file=value.get("password_file"))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return BasicAuth(str(value[0]), value[1])
    raise TransportConfigError("auth.basic must be (username, password) or a mapping")


def _default_verify_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with httpx
        return ssl.create_default_context()


def build_ssl_context(tls: Optional[Mapping[str, Any]]) -> Union[ssl.SSLContext, bool]:
    """``verify=`` for httpx from a :attr:`Target.tls <dcgmrelay.targets.Target.tls>` mapping.

    * nothing: ``True`` (verified against the certifi roots, as httpx does).
    * ``ca_file``: only that CA bundle is trusted.
    * ``cert_file`` (+ ``key_file`` unless the cert file holds the key): client
      certificate for mutual TLS.
    * ``insecure_skip_verify: true``: no certificate or host name check (explicit only;
      logged at WARNING when the context is built).
    * ``server_name`` is not part of the context: it is sent as SNI and checked as the
      host name per request (see :func:`build_client_kwargs`).

    Files are read now: rotated client certificates need a new client.
    """
    tls = dict(tls or {})
    unknown = sorted(set(tls) - set(_TLS_KEYS))
    if unknown:
        raise TransportConfigError(f"unknown tls setting(s) {unknown}; known: {list(_TLS_KEYS)}")
    ca_file, cert_file, key_file = tls.get("ca_file"), tls.get("cert_file"), tls.get("key_file")
    insecure = tls.get("insecure_skip_verify", False)
    if not isinstance(insecure, bool):
        raise TransportConfigError("tls.insecure_skip_verify must be true or false")
    if key_file and not cert_file:
        raise TransportConfigError("tls.key_file needs tls.cert_file")
    if not (ca_file or cert_file or insecure):
        return True
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else _default_verify_context()
    except (OSError, ssl.SSLError) as exc:
        raise TransportConfigError(f"tls.ca_file {ca_file}: {exc}") from None
    if cert_file:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TransportConfigError(f"tls.cert_file {cert_file} / key_file {key_file}: {exc}") from None
    if insecure:
        log.warning("TLS certificate verification is disabled (insecure_skip_verify)")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _SNIHook:
    """Request event hook setting the TLS server name (SNI, and the name the certificate
    is checked against). Works for sync and async clients: it returns an awaitable that
    is already done."""

    class _Done:
        def __await__(self) -> Generator[Any, None, None]:
            return
            yield  # a generator that finishes at once

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name

    def __call__(self, request: httpx.Request) -> "_SNIHook._Done":
        if request.url.scheme == "https":
            request.extensions["sni_hostname"] = self.server_name
        return self._Done()

    def __repr__(self) -> str:
        return f"_SNIHook({self.server_name!r})"


def build_client_kwargs(auth: Optional[Mapping[str, Any]] = None, tls: Optional[Mapping[str, Any]] = None,
                        headers: Optional[Mapping[str, Any]] = None, timeout_s: float = 10.0) -> Dict[str, Any]:
    """Keyword arguments for ``httpx.Client``/``httpx.AsyncClient`` (scrapes and outputs).

    Returns ``auth`` (:func:`build_auth`), ``verify`` (:func:`build_ssl_context`),
    ``headers`` (``User-Agent: dcgmrelay/<version>`` plus ``headers``, :class:`Secret`
    values revealed; its repr is redacted), ``timeout`` (``timeout_s`` for each of
    connect, write, read and pool wait), ``follow_redirects=False`` and, with
    ``tls.server_name``, a request ``event_hooks`` entry that sets it as SNI.
    """
    if timeout_s is None or not timeout_s > 0:
        raise TransportConfigError(f"timeout_s must be > 0, not {timeout_s!r}")
    h = _RedactedHeaders({"User-Agent": USER_AGENT})
    for k, v in _header_items(headers):
        if v is None:
            continue
        h[str(k)] = _reveal(v)
    kwargs: Dict[str, Any] = {
        "auth": build_auth(auth),
        "verify": build_ssl_context(tls),
        "headers": h,
        "timeout": httpx.Timeout(float(timeout_s)),
        "follow_redirects": False,
    }
    server_name = (tls or {}).get("server_name")
    if server_name:
        kwargs["event_hooks"] = {"request": [_SNIHook(str(server_name))], "response": []}
    return kwargs


def _secret_values(auth: Optional[httpx.Auth], headers: Optional[Mapping[str, Any]], url: str) -> List[str]:
    out: List[str] = []
    sv = getattr(auth, "secret_values", None)
    if callable(sv):
        out.extend(sv())
    for k, v in _header_items(headers):
        if v is not None and (isinstance(v, Secret) or is_secret_header(str(k))):
            val = _reveal(v)
            out.append(val)
            # "Bearer xyz" / "Api-Key xyz": the credential alone may be echoed too
            parts = val.split(None, 1)
            if len(parts) == 2:
                out.append(parts[1])
    try:
        u = httpx.URL(url)
        if u.password:
            out.append(u.password)
        for k, v in u.params.multi_items():
            if is_secret_header(k) and v:
                out.append(v)
    except Exception:
        pass
    return out


# ------------------------------------------------------------------------------------------
# Retry policy


def parse_retry_after(value: Optional[str], *, now: Optional[datetime] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds (``"120"``) or an
    HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``, past dates give 0). ``None`` when
    absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, Retry-After and a time budget (table in the module docstring)."""

    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    budget_s: float = 120.0
    retry_on: Tuple[Union[int, str], ...] = (429, "5xx")
    respect_retry_after: bool = True
    max_retry_after_s: float = 300.0
    max_attempts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.min_backoff_s < 0 or self.max_backoff_s < self.min_backoff_s:
            raise TransportConfigError("need 0 <= min_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise TransportConfigError("multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise TransportConfigError("jitter is a fraction in [0, 1)")
        if self.budget_s < 0 or self.max_retry_after_s < 0:
            raise TransportConfigError("budget_s and max_retry_after_s must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise TransportConfigError("max_attempts must be >= 1")
        codes: Set[int] = set()
        for item in self.retry_on:
            if isinstance(item, str) and len(item) == 3 and item[0] in "45" and item[1:].lower() == "xx":
                base = int(item[0]) * 100
                codes.update(range(base, base + 100))
            elif isinstance(item, int) and not isinstance(item, bool) and 300 <= item <= 599:
                codes.add(item)
            else:
                raise TransportConfigError(f"retry_on: {item!r} is neither a status code nor like '5xx'")
        object.__setattr__(self, "_codes", frozenset(codes))

    def is_retryable_status(self, status: int) -> bool:
        return status in self._codes  # type: ignore[attr-defined]

    def backoff(self, attempt: int) -> float:
        """Un-jittered delay after ``attempt`` failed attempts (1-based), capped."""
        n = max(1, int(attempt))
        try:
            base = self.min_backoff_s * self.multiplier ** (n - 1)
        except OverflowError:
            base = math.inf
        return min(base, self.max_backoff_s)

    def delay(self, attempt: int, retry_after: Optional[float] = None, *,
              rng: Optional[random.Random] = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``; ``retry_after`` is the parsed
        ``Retry-After`` of the failed answer, if any."""
        r = rng or random
        if retry_after is not None and self.respect_retry_after:
            d = min(max(float(retry_after), self.min_backoff_s), self.max_retry_after_s)
            if self.jitter:
                d *= r.uniform(1.0, 1.0 + self.jitter)
            return min(d, max(self.max_retry_after_s, self.min_backoff_s))
        base = self.backoff(attempt)
        if self.jitter:
            base *= r.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base


# ------------------------------------------------------------------------------------------
# Senders


@dataclasses.dataclass(frozen=True)
class WrittenCheck:
    """The remote write 2.0 ``X-Prometheus-Remote-Write-*-Written`` headers of a 2xx answer."""

    samples_expected: int
    samples: Optional[int]
    histograms: Optional[int]
    exemplars: Optional[int]

    @property
    def missing(self) -> bool:
        """The Samples-Written header was not there."""
        return self.samples is None

    @property
    def ok(self) -> bool:
        return self.samples is not None and self.samples >= self.samples_expected

    @property
    def not_written(self) -> int:
        return 0 if self.samples is None else max(0, self.samples_expected - self.samples)


@dataclasses.dataclass(frozen=True)
class SendResult:
    """A delivered request."""

    status: int
    attempts: int
    elapsed_s: float
    bytes_sent: int
    samples: int
    #: For remote write 2.0 requests; ``None`` otherwise.
    written: Optional[WrittenCheck] = None

    @property
    def retries(self) -> int:
        return self.attempts - 1


@dataclasses.dataclass
class SenderStats:
    """Counters of one sender (one output)."""

    #: HTTP attempts made.
    attempts: int = 0
    #: Attempts after the first of a send.
    retries: int = 0
    #: Requests delivered (2xx).
    successes: int = 0
    bytes_sent: int = 0
    samples_sent: int = 0
    #: Failed attempts that were retryable, by reason ("http_503", "connect", "timeout" ...).
    failures: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: Requests given up on a permanent status, by status.
    permanent_errors: Dict[int, int] = dataclasses.field(default_factory=dict)
    #: Requests given up on a non-retryable request error.
    request_errors: int = 0
    budget_exhausted: int = 0
    #: 415 (or inferred 415) to remote write 2.0 requests.
    unsupported_media_type: int = 0
    #: 2xx answers to 2.0 requests without X-Prometheus-Remote-Write-Samples-Written.
    written_header_missing: int = 0
    #: Samples the receiver said it did not write (2xx with a lower Samples-Written).
    samples_not_written: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _is_rw2(headers: Mapping[str, str]) -> bool:
    ct = ver = ""
    for k, v in headers.items():
        lk = k.lower()
        if lk == "content-type":
            ct = str(v)
        elif lk == "x-prometheus-remote-write-version":
            ver = str(v)
    return "io.prometheus.write.v2.request" in ct.lower() or ver.strip().startswith("2")


def _int_header(response: httpx.Response, name: str) -> Optional[int]:
    raw = response.headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return None


class _OnceLogger:
    """Log the first occurrence of each key at ``level``, later ones at DEBUG."""

    def __init__(self) -> None:
        self._seen: Set[Any] = set()

    def log(self, key: Any, level: int, msg: str, *args: Any) -> None:
        if key in self._seen:
            log.debug(msg, *args)
        else:
            if len(self._seen) < 4096:
                self._seen.add(key)
            log.log(level, msg, *args)

    def forget(self, key: Any) -> None:
        """Log ``key``'s next occurrence again (the condition ended: a collector came back)."""
        self._seen.discard(key)


class _SenderBase:
    """What :class:`Sender` and :class:`SyncSender` share: client settings, response
    classification, the retry decision and the counters."""

    def __init__(self, url: str, *, name: Optional[str] = None, auth: Optional[Mapping[str, Any]] = None,
                 tls: Optional[Mapping[str, Any]] = None, headers: Optional[Mapping[str, Any]] = None,
                 timeout_s: float = 10.0, retry: Optional[RetryPolicy] = None, max_connections: int = 10,
                 missing_written_headers: str = "fallback", rng: Optional[random.Random] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if missing_written_headers not in ("fallback", "note"):
            raise TransportConfigError("missing_written_headers must be 'fallback' or 'note'")
        self.url = str(url)
        self.safe_url = redact_url(self.url)
        self.name = name or self.safe_url
        self.retry = retry or RetryPolicy()
        self.timeout_s = float(timeout_s)
        self.missing_written_headers = missing_written_headers
        self.stats = SenderStats()
        self._rng = rng or random.Random()
        self._clock = clock
        self._kwargs = build_client_kwargs(auth, tls, headers, timeout_s)
        n = max(1, int(max_connections))
        self._kwargs["limits"] = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self._auth = self._kwargs["auth"]
        self._static_secrets = _secret_values(None, headers, self.url)
        self._once = _OnceLogger()

    # -- secrets ------------------------------------------------------------------------

    def _secrets(self) -> List[str]:
        return self._static_secrets + _secret_values(self._auth, None, "")

    def scrub(self, text: str) -> str:
        """``text`` with every known secret value replaced by ``<redacted>``."""
        return _scrubber(self._secrets())(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.safe_url!r}, retry={self.retry!r})"

    # -- one attempt ----------------------------------------------------------------------

    def _map(self, exc: BaseException) -> TransportError:
        err = _map_httpx_error(exc, url=self.safe_url)
        err.message = self.scrub(err.message)
        err.args = (err.message,)
        return err

    def _body_start(self, response: httpx.Response) -> str:
        """The first ``BODY_START_BYTES`` of the body, scrubbed. Scrubbing happens on a
        window longer by the longest secret before cutting, so that a secret crossing
        the cut cannot leave a prefix behind."""
        secrets = self._secrets()
        margin = max((len(x.encode()) for x in secrets), default=0)
        try:
            raw = response.content[:BODY_START_BYTES + margin]
        except Exception:  # pragma: no cover - a streamed response that was not read
            return ""
        text = _scrubber(secrets)(raw.decode("utf-8", "replace"))
        return text.encode()[:BODY_START_BYTES].decode("utf-8", "ignore").strip()

    def _on_response(self, response: httpx.Response, *, samples: int, rw2: bool, attempt: int,
                     start: float, nbytes: int) -> SendResult:
        status = response.status_code
        if 200 <= status < 300:
            written = self._check_written(response, samples, status) if rw2 else None
            self.stats.successes += 1
            self.stats.bytes_sent += nbytes
            self.stats.samples_sent += samples
            return SendResult(status, attempt, self._clock() - start, nbytes, samples, written)
        body = self._body_start(response)
        what = f"HTTP {status} from {self.safe_url}" + (f": {body!r}" if body else "")
        if self.retry.is_retryable_status(status):
            ra = parse_retry_after(response.headers.get("Retry-After"))
            raise RetryableStatus(status, what, body_start=body, retry_after_s=ra, url=self.safe_url)
        if status == 415 and rw2:
            raise UnsupportedMediaType(status, what, body_start=body, url=self.safe_url)
        raise PermanentStatus(status, what, body_start=body, url=self.safe_url)

    def _check_written(self, response: httpx.Response, samples: int, status: int) -> WrittenCheck:
        check = WrittenCheck(samples, _int_header(response, SAMPLES_WRITTEN),
                             _int_header(response, HISTOGRAMS_WRITTEN), _int_header(response, EXEMPLARS_WRITTEN))
        if check.samples is None:
            self.stats.written_header_missing += 1
            if check.histograms is None and check.exemplars is None and self.missing_written_headers == "fallback":
                raise UnsupportedMediaType(
                    status, f"HTTP {status} from {self.safe_url} to a remote write 2.0 request without any "
                    "X-Prometheus-Remote-Write-*-Written header: a 1.0 receiver (treated as 415)",
                    inferred=True, url=self.safe_url)
            self._once.log(("written_missing",), logging.WARNING,
                           "output %s: 2xx without %s header (remote write 2.0)", self.name, SAMPLES_WRITTEN)
        elif check.samples < samples:
            self.stats.samples_not_written += samples - check.samples
            self._once.log(("not_written",), logging.WARNING,
                           "output %s: receiver wrote %d of %d samples (HTTP %d, %s)",
                           self.name, check.samples, samples, status, SAMPLES_WRITTEN)
        return check

    # -- the retry decision ------------------------------------------------------------

    def _after_failure(self, err: TransportError, attempt: int, start: float, samples: int,
                       max_attempts: Optional[int]) -> float:
        """Seconds to sleep before the next attempt, or raise the error that ends the send."""
        if not err.retryable:
            if isinstance(err, UnsupportedMediaType):
                self.stats.unsupported_media_type += 1
            elif isinstance(err, PermanentStatus) and err.status == 409 and "resend_dictionaries" in err.body_start:
                # compact format: the receiver asks for full dictionaries; the Output resends
                # (and logs a drop itself if that fails too)
                self.stats.permanent_errors[409] = self.stats.permanent_errors.get(409, 0) + 1
            elif isinstance(err, PermanentStatus):
                self.stats.permanent_errors[err.status] = self.stats.permanent_errors.get(err.status, 0) + 1
                self._once.log(("permanent", err.status), logging.ERROR,
                               "output %s: HTTP %d from %s, not retried; batch of %d samples dropped; body: %r",
                               self.name, err.status, self.safe_url, samples, err.body_start)
            else:
                self.stats.request_errors += 1
                self._once.log(("request", type(err).__name__), logging.ERROR, "output %s: %s (not retried)",
                               self.name, err)
            raise err
        self.stats.failures[err.reason] = self.stats.failures.get(err.reason, 0) + 1
        ra = err.retry_after_s if isinstance(err, RetryableStatus) else None
        delay = self.retry.delay(attempt, ra, rng=self._rng)
        elapsed = self._clock() - start
        limit = max_attempts or self.retry.max_attempts
        if (limit is not None and attempt >= limit) or elapsed + delay > self.retry.budget_s:
            self.stats.budget_exhausted += 1
            why = f"{attempt} attempt(s)" if limit is not None and attempt >= limit else \
                f"retry budget {self.retry.budget_s:g}s"
            raise RetryBudgetExhausted(
                f"gave up on {self.safe_url} after {attempt} attempt(s) in {elapsed:.2f}s ({why}): {err}",
                last_error=err, attempts=attempt, elapsed_s=elapsed, url=self.safe_url) from err
        self._once.log(("retry", err.reason), logging.WARNING,
                       "output %s: %s; retrying in %.2fs (attempt %d)", self.name, err, delay, attempt)
        self.stats.retries += 1
        return delay


_Headers = Mapping[str, str]


class Sender(_SenderBase):
    """POST encoded bodies to one URL with retries (async, ``httpx.AsyncClient``, keep-alive).

    ``transport``: an httpx transport (``httpx.MockTransport`` in tests). ``sleep`` and
    ``clock`` can be replaced in tests. ``max_connections`` bounds the connection pool.
    """

    def __init__(self, url: str, *, transport: Optional[httpx.AsyncBaseTransport] = None,
                 sleep: Optional[Callable[[float], Awaitable[None]]] = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._sleep = sleep or asyncio.sleep
        # Plain http:// (the usual in-cluster collector) goes through the lean transport
        # without httpx's client layer: one request object per POST, nothing else per send.
        # TLS, proxies and injected transports (tests) keep httpx's client.
        self._lean: Optional[LeanTransport] = None
        self._client: Optional[httpx.AsyncClient] = None
        if transport is None and self.url.lower().startswith("http://") and "event_hooks" not in self._kwargs:
            self._lean = LeanTransport(max_idle_per_host=self._kwargs["limits"].max_keepalive_connections or 1)
            t = self._kwargs["timeout"]
            self._lean_timeout = {"connect": t.connect, "read": t.read, "write": t.write, "pool": t.pool}
            self._lean_headers = list(self._kwargs["headers"].raw)
        else:
            self._client = httpx.AsyncClient(transport=transport, **self._kwargs)

    async def _post(self, body: bytes, headers: _Headers) -> httpx.Response:
        self.stats.attempts += 1
        try:  # the one place httpx is called
            if self._lean is not None:
                return await self._post_lean(body, headers)
            assert self._client is not None
            return await self._client.post(self.url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise self._map(exc) from exc

    async def _post_lean(self, body: bytes, headers: _Headers) -> httpx.Response:
        assert self._lean is not None
        hdrs = httpx.Headers(self._lean_headers)
        hdrs.update(headers)
        request = httpx.Request("POST", self.url, headers=hdrs, content=body,
                                extensions={"timeout": self._lean_timeout})
        if self._auth is None:
            response = await self._lean.handle_async_request(request)
        else:  # httpx's auth protocol, as its client runs it
            flow = self._auth.async_auth_flow(request)
            request = await flow.__anext__()
            while True:
                response = await self._lean.handle_async_request(request)
                if self._auth.requires_response_body:
                    await response.aread()
                try:
                    request = await flow.asend(response)
                except StopAsyncIteration:
                    break
                await response.aclose()
        response.request = request
        await response.aread()
        return response

    async def send(self, body: bytes, headers: Optional[_Headers] = None, *, samples: int = 0,
                   max_attempts: Optional[int] = None) -> SendResult:
        """Deliver ``body``; retry per the policy. Raises :class:`RetryBudgetExhausted`,
        :class:`PermanentStatus` (:class:`UnsupportedMediaType`) or :class:`RequestError`."""
        hdrs = dict(headers or {})
        rw2 = _is_rw2(hdrs)
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._post(body, hdrs)
                return self._on_response(response, samples=samples, rw2=rw2, attempt=attempt, start=start,
                                         nbytes=len(body))
            except TransportError as err:
                delay = self._after_failure(err, attempt, start, samples, max_attempts)
            await self._sleep(delay)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._lean is not None:
            await self._lean.aclose()

    async def __aenter__(self) -> "Sender":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class SyncSender(_SenderBase):
    """:class:`Sender` with a blocking ``httpx.Client`` (one-shot pushes, the CLI)."""

    def __init__(self, url: str, *, transport: Optional[httpx.BaseTransport] = None,
                 sleep: Optional[Callable[[float], None]] = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._sleep = sleep or time.sleep
        self._client = httpx.Client(transport=transport, **self._kwargs)

    def _post(self, body: bytes, headers: _Headers) -> httpx.Response:
        self.stats.attempts += 1
        try:  # the one place httpx is called
            return self._client.post(self.url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise self._map(exc) from exc

    def send(self, body: bytes, headers: Optional[_Headers] = None, *, samples: int = 0,
             max_attempts: Optional[int] = None) -> SendResult:
        """See :meth:`Sender.send`."""
        hdrs = dict(headers or {})
        rw2 = _is_rw2(hdrs)
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._post(body, hdrs)
                return self._on_response(response, samples=samples, rw2=rw2, attempt=attempt, start=start,
                                         nbytes=len(body))
            except TransportError as err:
                delay = self._after_failure(err, attempt, start, samples, max_attempts)
            self._sleep(delay)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SyncSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Batches: units and splitting


def _is_relay_batch(batch: Any) -> bool:
    return hasattr(batch, "stale_name_ids") and hasattr(batch, "name_ids") and hasattr(batch, "values")


def batch_units(batch: Any) -> int:
    """Samples plus stale markers of a relay batch (or slice); ``len()`` of anything else, or 1."""
    if _is_relay_batch(batch):
        return len(batch) + len(batch.stale_name_ids)
    try:
        return len(batch)
    except TypeError:
        return 1


_SLICED_COLUMNS = ("name_ids", "labelset_ids", "field_ids", "kinds", "values", "deltas", "resets",
                   "timestamps", "start_timestamps", "event_counts")


class BatchSlice:
    """A contiguous part of a ``RelayBatch``: the same tables (``names``, ``labelsets``,
    ``families``, ``entities``, ``target``, ``timestamp_ms``, ``output``, ``stats``), the
    per-sample columns sliced to ``[start, stop)`` (numpy views) and the stale markers
    sliced to ``[stale_start, stale_stop)``. Anything that encodes a ``RelayBatch`` can
    encode a slice."""

    def __init__(self, base: Any, start: int, stop: int, stale_start: int, stale_stop: int) -> None:
        self.base = base
        self.start, self.stop = start, stop
        self.stale_start, self.stale_stop = stale_start, stale_stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "start", "stop", "stale_start", "stale_stop"):
            raise AttributeError(name)
        base = self.base
        if name in _SLICED_COLUMNS or name == "entity_ids":
            return getattr(base, name)[self.start:self.stop]
        if name in ("stale_name_ids", "stale_labelset_ids"):
            return getattr(base, name)[self.stale_start:self.stale_stop]
        return getattr(base, name)

    def _index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.start + i

    def labels(self, i: int) -> Dict[str, str]:
        return self.base.labels(self._index(i))  # type: ignore[no-any-return]

    def series_labels(self, i: int) -> List[Tuple[str, str]]:
        return self.base.series_labels(self._index(i))  # type: ignore[no-any-return]

    def samples(self) -> Iterable[Any]:
        return itertools.islice(self.base.samples(), self.start, self.stop)

    def stale_series(self) -> Iterable[Any]:
        return itertools.islice(self.base.stale_series(), self.stale_start, self.stale_stop)

    def __repr__(self) -> str:
        return (f"<BatchSlice {getattr(self.base, 'target', '?')} samples[{self.start}:{self.stop}] "
                f"stale[{self.stale_start}:{self.stale_stop}]>")


def split_batch(batch: Any, max_samples: int) -> List[Any]:
    """Cut ``batch`` into pieces of at most ``max_samples`` units, in order.

    A ``RelayBatch`` (or :class:`BatchSlice`) gives :class:`BatchSlice` pieces: samples
    first, then its stale markers. Anything else that supports ``len`` and slicing
    (a list) is sliced; other objects come back whole.
    """
    if max_samples < 1:
        raise ValueError("max_samples must be >= 1")
    n = batch_units(batch)
    if n <= max_samples:
        return [batch]
    if _is_relay_batch(batch):
        if isinstance(batch, BatchSlice):
            base, s0, s1, t0, t1 = batch.base, batch.start, batch.stop, batch.stale_start, batch.stale_stop
        else:
            base, s0, s1, t0, t1 = batch, 0, len(batch), 0, len(batch.stale_name_ids)
        ns = s1 - s0
        out = []
        for a in range(0, n, max_samples):
            b = min(a + max_samples, n)
            out.append(BatchSlice(base, s0 + min(a, ns), s0 + min(b, ns),
                                  t0 + max(a - ns, 0), t0 + max(b - ns, 0)))
        assert out[-1].stale_stop == t1
        return out
    try:
        return [batch[i:i + max_samples] for i in range(0, n, max_samples)]
    except TypeError:
        return [batch]


# ------------------------------------------------------------------------------------------
# Encoders and compression


EncodeResult = Union[Tuple[bytes, Mapping[str, str]], Tuple[bytes, Mapping[str, str], int]]


class _Encoder:
    """Normalizes what an ``encoder_factory`` returns: a callable ``encode(batch)`` or an
    object with ``encode(batch)`` and optionally ``encode_many(batches)``."""

    def __init__(self, obj: Any) -> None:
        if hasattr(obj, "encode") and callable(obj.encode):
            self.one = obj.encode
        elif callable(obj):
            self.one = obj
        else:
            raise TransportConfigError(f"encoder {obj!r} is neither callable nor has encode()")
        many = getattr(obj, "encode_many", None)
        self.many = many if callable(many) else None
        reset = getattr(obj, "reset_dictionaries", None)
        #: Stateful wire formats (compact): start a new stream after a 409.
        self.reset = reset if callable(reset) else None


class _ModuleEncoder:
    """:class:`dcgmrelay.encode.Encoder` for one output: its caches live as long as the
    output; ``encode`` also returns ``last_samples`` (samples and stale markers really
    in the body, ``_delta`` series included) for the remote write 2.0 written check."""

    def __init__(self, fmt: str) -> None:
        mod = importlib.import_module(".encode", __package__)
        self._enc = mod.Encoder(fmt)
        self.fmt = fmt

    def encode(self, batch: Any) -> EncodeResult:
        body, headers = self._enc.encode(batch)
        return body, headers, int(self._enc.last_samples)

    def reset_dictionaries(self) -> None:
        self._enc.reset_dictionaries()

    def __repr__(self) -> str:
        return f"<_ModuleEncoder {self._enc!r}>"


def default_encoder_factory(fmt: str) -> Any:
    """A :class:`dcgmrelay.encode.Encoder` for ``fmt`` (``"rw1"``/``"remote-write-1"``,
    ``"rw2"``, ``"prometheus"``, ``"openmetrics"``, ``"compact"``), one per output."""
    return _ModuleEncoder(fmt)


def compress_body(body: bytes, headers: Mapping[str, str], codec: Optional[str]) -> Tuple[bytes, Dict[str, str]]:
    """Compress ``body`` with ``codec`` (``gzip``, ``zstd``, ``snappy`` = block format,
    ``deflate``; ``None``/``identity``: as is) and set ``Content-Encoding``. A body whose
    headers already name a ``Content-Encoding`` (remote write: snappy from the encoder)
    is left alone."""
    hdrs = dict(headers)
    if not codec or codec == "identity" or any(k.lower() == "content-encoding" for k in hdrs):
        return body, hdrs
    if codec == "gzip":
        out = gzip.compress(body, compresslevel=5)
    elif codec == "deflate":
        import zlib

        out = zlib.compress(body)
    elif codec in ("zstd", "snappy"):
        import cramjam

        out = bytes(cramjam.zstd.compress(body) if codec == "zstd" else cramjam.snappy.compress_raw(body))
    else:
        raise TransportConfigError(f"unknown compression {codec!r}")
    hdrs["Content-Encoding"] = codec
    return out, hdrs


# ------------------------------------------------------------------------------------------
# Output


@dataclasses.dataclass
class OutputStats:
    """Self-metrics of one :class:`Output`."""

    batches_submitted: int = 0
    #: Requests delivered (2xx), their samples and body bytes.
    batches_sent: int = 0
    samples_sent: int = 0
    bytes_sent: int = 0
    retries: int = 0
    #: Requests (and their samples) given up, by reason: ``http_<status>``,
    #: ``retry_budget`` / ``request`` / ``shutdown`` / ``buffer_full`` (no spool hook),
    #: ``spool_error``, ``encode_error``, ``replay_http_<status>``.
    dropped_batches: Dict[str, int] = dataclasses.field(default_factory=dict)
    dropped_samples: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: Requests handed to the spool hook, by reason (``retry_budget``, ``request``,
    #: ``shutdown``, ``buffer_full``); totals in ``spooled_batches``/``spooled_samples``.
    spooled_batches: int = 0
    spooled_samples: int = 0
    spooled_by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
    replayed_batches: int = 0
    replayed_samples: int = 0
    in_flight: int = 0
    buffered_samples: int = 0
    #: Bodies that were split because they passed ``max_bytes_per_batch``.
    byte_splits: int = 0
    #: ``time.time()`` of the last delivered request.
    last_success_ts: Optional[float] = None
    last_error: Optional[str] = None
    #: The collector is considered down (a retry budget was exhausted, no success since).
    down: bool = False
    fallback_active: bool = False
    #: Write-ahead outputs: batches sent from memory because the spool could not take them.
    wal_bypassed: int = 0
    fmt: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ReplayResult:
    """What :meth:`Output.replay` did: the first ``done`` records are finished (sent or
    dropped for good) and can be removed from the spool; ``error`` stopped the replay."""

    done: int = 0
    sent: int = 0
    dropped: int = 0
    error: Optional[TransportError] = None


@dataclasses.dataclass
class _Piece:
    batch: Any
    units: int
    target: Any
    t: float


@dataclasses.dataclass
class _Job:
    """One dispatched request: its pieces, and the bodies not yet finished once encoded."""

    pieces: List["_Piece"]
    bodies: Optional[List["_Body"]] = None
    done: bool = False


@dataclasses.dataclass
class _Body:
    body: bytes
    headers: Dict[str, str]
    samples: int
    pieces: List[_Piece]
    fmt: str
    #: Re-encoded after a 409 (stateful format restarted its stream) already.
    restarted: bool = False


SpoolHook = Callable[[bytes, Dict[str, str], int], Awaitable[None]]


class Output:
    """One configured destination (see the module docstring for batching, retries,
    the 2.0 -> 1.0 fallback and the spool hook contract).

    ``encoder_factory(fmt)`` returns the encoder for a format (default:
    :func:`default_encoder_factory`, i.e. :mod:`dcgmrelay.encode`). ``transport``, ``rng``,
    ``clock`` and ``sleep`` are passed to the :class:`Sender` (tests).
    """

    def __init__(self, name: str, url: str, fmt: str,
                 encoder_factory: Optional[Callable[[str], Any]] = None, *,
                 auth: Optional[Mapping[str, Any]] = None, tls: Optional[Mapping[str, Any]] = None,
                 headers: Optional[Mapping[str, Any]] = None, timeout_s: float = 10.0,
                 max_samples_per_batch: int = 2000, max_bytes_per_batch: int = 4 << 20,
                 flush_interval_s: float = 1.0, max_in_flight: int = 4, retry: Optional[RetryPolicy] = None,
                 spool_hook: Optional[SpoolHook] = None, fallback_fmt: Optional[str] = None,
                 max_buffered_samples: Optional[int] = None, compression: Optional[str] = None,
                 fast_fail_when_down: bool = True, missing_written_headers: str = "fallback",
                 transport: Optional[httpx.AsyncBaseTransport] = None, rng: Optional[random.Random] = None,
                 clock: Optional[Callable[[], float]] = None,
                 sleep: Optional[Callable[[float], Awaitable[None]]] = None) -> None:
        if max_samples_per_batch < 1 or max_bytes_per_batch < 1 or max_in_flight < 1:
            raise TransportConfigError("max_samples_per_batch, max_bytes_per_batch and max_in_flight must be >= 1")
        if flush_interval_s < 0:
            raise TransportConfigError("flush_interval_s must be >= 0")
        bad = sorted(k for k, _ in _header_items(headers) if str(k).lower() in RESERVED_OUTPUT_HEADERS)
        if bad:
            raise TransportConfigError(f"output {name}: headers {bad} are reserved and cannot be configured")
        if compression not in (None, "identity", "gzip", "zstd", "snappy", "deflate"):
            raise TransportConfigError(f"unknown compression {compression!r}")
        self.name = name
        self.fmt = fmt
        self.fallback_fmt = fallback_fmt
        self.max_samples_per_batch = int(max_samples_per_batch)
        self.max_bytes_per_batch = int(max_bytes_per_batch)
        self.flush_interval_s = float(flush_interval_s)
        self.max_in_flight = int(max_in_flight)
        # In memory while requests are in flight: enough for a whole interval of many targets
        # (1,000 8-GPU nodes send 200,000 samples per interval, all at start-up at once).
        self.max_buffered_samples = int(max_buffered_samples or max(1_000_000, 50 * self.max_samples_per_batch))
        self.compression = compression
        self.fast_fail_when_down = fast_fail_when_down
        self.spool_hook = spool_hook
        self._factory = encoder_factory or default_encoder_factory
        self._active_fmt = fmt
        self._encoder = _Encoder(self._factory(fmt))
        if fallback_fmt is not None:
            _Encoder(self._factory(fallback_fmt))  # a bad fallback format fails now, not at the first 415
        kw: Dict[str, Any] = dict(name=name, auth=auth, tls=tls, headers=headers, timeout_s=timeout_s,
                                  retry=retry, max_connections=max_in_flight,
                                  missing_written_headers=missing_written_headers, rng=rng)
        if clock is not None:
            kw["clock"] = clock
        self._sender = Sender(url, transport=transport, sleep=sleep, **kw)
        self.stats = OutputStats(fmt=fmt)
        self._buffer: Deque[_Piece] = deque()
        self._busy: Dict[Any, int] = {}
        self._tasks: Set["asyncio.Task[None]"] = set()
        self._jobs: Dict[int, _Job] = {}
        self._force = 0
        self._closing = False
        self._closed = False
        self._close_task: Optional["asyncio.Future[None]"] = None
        self._started = False
        self._once = _OnceLogger()
        # created on first use, inside the running loop
        self._slots: Optional[asyncio.Semaphore] = None
        self._wake: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._flusher: Optional["asyncio.Task[None]"] = None

    # -- public ---------------------------------------------------------------------------

    @property
    def sender(self) -> Sender:
        return self._sender

    @property
    def active_fmt(self) -> str:
        """The format requests are encoded in now (``fallback_fmt`` after a 415)."""
        return self._active_fmt

    def reset_format(self) -> None:
        """Go back to ``fmt`` after a fallback (e.g. after the receiver was upgraded)."""
        self._set_format(self.fmt)

    def __repr__(self) -> str:
        return (f"<Output {self.name} {self._sender.safe_url} fmt={self._active_fmt} "
                f"in_flight={self.stats.in_flight} buffered={self.stats.buffered_samples}>")

    async def submit(self, batch: Any) -> None:
        """Queue a batch; it is sent by the background flusher. After :meth:`aclose` has
        started, the batch goes straight to the spool hook."""
        self._ensure_started()
        units = batch_units(batch)
        if units == 0:
            return
        self.stats.batches_submitted += 1
        now = time.monotonic()
        target = getattr(batch, "target", None)
        pieces = [_Piece(p, batch_units(p), target, now) for p in split_batch(batch, self.max_samples_per_batch)]
        if self._closing:
            for body in self._encode(pieces):
                await self._to_spool(body, "shutdown")
            return
        self._buffer.extend(pieces)
        self.stats.buffered_samples += units
        self._refresh_idle()
        while self.stats.buffered_samples > self.max_buffered_samples and len(self._buffer) > 1:
            oldest = self._buffer.popleft()
            self.stats.buffered_samples -= oldest.units
            self._once.log(("buffer_full",), logging.WARNING,
                           "output %s: more than %d samples buffered; the oldest go to the spool",
                           self.name, self.max_buffered_samples)
            for body in self._encode([oldest]):
                await self._to_spool(body, "buffer_full")
        assert self._wake is not None
        self._wake.set()

    async def flush(self) -> None:
        """Send everything buffered now and wait until nothing is buffered or in flight
        (delivered, dropped or spooled)."""
        self._ensure_started()
        assert self._idle is not None and self._wake is not None
        self._force += 1
        try:
            self._wake.set()
            await self._idle.wait()
        finally:
            self._force -= 1

    async def replay(self, records: Union[Iterable[Any], AsyncIterable[Any]], *,
                     max_attempts: Optional[int] = None,
                     on_done: Optional[Callable[[Any], Any]] = None) -> ReplayResult:
        """Send spooled records in order, with the retry policy (``max_attempts=1`` for a
        quick probe). A record is ``(body, headers, samples)``, an object with ``body``,
        ``headers``, ``samples``, or a :class:`dcgmrelay.spool.SpooledRecord` (``payload``
        and ``meta`` as written by :func:`spool_meta`). A permanent answer drops that
        record and goes on (it can never succeed); any other failure stops the replay.
        ``on_done(record)`` (sync or async; e.g. ``spool.ack(rec.seq)``) is called after
        each record that is finished, so at most one delivered record is un-acked at a
        time; ``result.done`` counts them."""
        self._ensure_started()
        assert self._slots is not None
        result = ReplayResult()
        async for rec in _aiter(records):
            body, headers, samples = _record_fields(rec)
            async with self._slots:
                try:
                    await self._sender.send(body, headers, samples=samples, max_attempts=max_attempts)
                except PermanentStatus as err:
                    self._drop(f"replay_{err.reason}", samples, err)
                    result.dropped += 1
                except TransportError as err:
                    self.stats.last_error = str(err)
                    result.error = err
                    break
                else:
                    self._on_sent(body, samples)
                    self.stats.replayed_batches += 1
                    self.stats.replayed_samples += samples
                    result.sent += 1
                finally:
                    self.stats.retries = self._sender.stats.retries
            result.done += 1
            if on_done is not None:
                ack = on_done(rec)
                if asyncio.iscoroutine(ack) or isinstance(ack, asyncio.Future):
                    await ack
        return result

    async def replay_spool(self, spool: Any, *, max_records: int = 16,
                           max_attempts: Optional[int] = None) -> ReplayResult:
        """Replay a :class:`dcgmrelay.spool.Spool` oldest first (``peek``, send, ``ack``
        after each record) until it is empty or a send fails (``result.error``; the
        failed record stays pending). Returns the totals."""
        total = ReplayResult()
        while True:
            recs = spool.peek(max_records=max_records)
            if not recs:
                return total
            res = await self.replay(recs, max_attempts=max_attempts, on_done=lambda r: spool.ack(r.seq))
            total.done += res.done
            total.sent += res.sent
            total.dropped += res.dropped
            if res.error is not None:
                total.error = res.error
                return total

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Shut down (SIGTERM): send what is buffered, wait for requests in flight up to
        ``timeout_s``, then cancel them and hand everything not delivered to the spool
        hook (dropped as ``shutdown`` without one). Closes the HTTP client."""
        if self._closed:
            return
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.ensure_future(self._close(timeout_s))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout_s: float) -> None:
        if self._started:
            assert self._idle is not None and self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
            except asyncio.TimeoutError:
                log.warning("output %s: %d request(s) still in flight after %.1fs; handing them to the spool",
                            self.name, len(self._tasks), timeout_s)
            pending = [t for t in [self._flusher, *self._tasks] if t is not None and not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            leftovers: List[_Body] = []
            for job in list(self._jobs.values()):
                if not job.done:
                    leftovers.extend(job.bodies if job.bodies is not None else self._encode(job.pieces))
            self._jobs.clear()
            if self._buffer:
                rest = list(self._buffer)
                self._buffer.clear()
                self.stats.buffered_samples = 0
                leftovers.extend(self._encode(rest))
            for body in leftovers:
                await self._to_spool(body, "shutdown")
        self._closed = True
        await self._sender.aclose()

    # -- machinery ------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError(f"output {self.name} is closed")
        if self._started:
            return
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = True
        self._flusher = asyncio.ensure_future(self._run())

    def _refresh_idle(self) -> None:
        assert self._idle is not None
        if not self._buffer and not self._tasks:
            self._idle.set()
        else:
            self._idle.clear()

    def _set_format(self, fmt: str) -> None:
        self._encoder = _Encoder(self._factory(fmt))
        self._active_fmt = fmt
        self.stats.fmt = fmt
        self.stats.fallback_active = fmt != self.fmt

    def _pickable(self) -> Tuple[int, Optional[float]]:
        """Units sendable now (their target not in flight) and the oldest one's time."""
        units, oldest, blocked = 0, None, set()
        for p in self._buffer:
            if p.target is not None and (p.target in self._busy or p.target in blocked):
                blocked.add(p.target)
                continue
            units += p.units
            oldest = p.t if oldest is None else min(oldest, p.t)
        return units, oldest

    async def _wait_for_trigger(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            units, oldest = self._pickable()
            timeout: Optional[float] = None
            if units:
                if self._closing or self._force or units >= self.max_samples_per_batch:
                    return
                assert oldest is not None
                timeout = oldest + self.flush_interval_s - time.monotonic()
                if timeout <= 0:
                    return
            try:  # a deadline on this task, not wait_for's extra task per wait
                async with deadline(timeout):
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass

    def _take_group(self) -> List[_Piece]:
        """Remove and return the next request's pieces: FIFO, skipping targets in flight
        (and, to keep per-target order, every later piece of a skipped target); merged up
        to ``max_samples_per_batch`` when the encoder has ``encode_many``."""
        group: List[_Piece] = []
        units = 0
        blocked: Set[Any] = set()
        keep: Deque[_Piece] = deque()
        merge = self._encoder.many is not None
        for p in self._buffer:
            free = p.target is None or (p.target not in self._busy and p.target not in blocked)
            fits = not group or (merge and units + p.units <= self.max_samples_per_batch)
            if free and fits:
                group.append(p)
                units += p.units
            else:
                keep.append(p)
                if p.target is not None:
                    blocked.add(p.target)
        self._buffer = keep
        self.stats.buffered_samples -= units
        return group

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            try:
                await self._wait_for_trigger()
                while True:
                    await self._slots.acquire()
                    group = self._take_group()
                    if not group:
                        self._slots.release()
                        break
                    for p in group:
                        if p.target is not None:
                            self._busy[p.target] = self._busy.get(p.target, 0) + 1
                    job = _Job(group)
                    self._jobs[id(job)] = job
                    task = asyncio.ensure_future(self._send_job(job))
                    self._tasks.add(task)
                    self.stats.in_flight = len(self._tasks)
                    self._refresh_idle()
                    task.add_done_callback(self._job_done(job))
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - a bug; keep shipping
                log.exception("output %s: flusher error", self.name)
                await asyncio.sleep(0.1)

    def _job_done(self, job: _Job) -> Callable[["asyncio.Task[None]"], None]:
        def done(task: "asyncio.Task[None]") -> None:
            self._tasks.discard(task)
            if job.done:
                self._jobs.pop(id(job), None)
            assert self._slots is not None and self._wake is not None
            self._slots.release()
            for p in job.pieces:
                if p.target is not None:
                    n = self._busy.get(p.target, 0) - 1
                    if n <= 0:
                        self._busy.pop(p.target, None)
                    else:
                        self._busy[p.target] = n
            self.stats.in_flight = len(self._tasks)
            if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
                log.error("output %s: send task failed", self.name, exc_info=task.exception())
            self._refresh_idle()
            self._wake.set()
        return done

    async def _send_job(self, job: _Job) -> None:
        """Encode and deliver a job's bodies in order. Cancelled (shutdown), the bodies
        not finished stay in ``job`` for :meth:`aclose` to spool."""
        job.bodies = self._encode(job.pieces)
        while job.bodies:
            await self._deliver(job.bodies[0])
            job.bodies.pop(0)
        job.done = True

    def _encode(self, pieces: List[_Piece], encoder: Optional["_Encoder"] = None) -> List[_Body]:
        """Encode pieces into bodies no larger than ``max_bytes_per_batch`` (halving and
        re-encoding when one is larger); an encoder error drops the pieces (counted and
        logged once). ``encoder``: another encoder of the active format (the write-ahead
        queue's), else this output's."""
        enc = encoder or self._encoder
        units = sum(p.units for p in pieces)
        fmt = self._active_fmt
        try:
            if len(pieces) == 1:
                out = enc.one(pieces[0].batch)
            elif enc.many is not None:
                out = enc.many([p.batch for p in pieces])
            else:  # not reached by _take_group; merging is impossible without encode_many
                return [b for p in pieces for b in self._encode([p], encoder)]
            body, headers = out[0], out[1]
            samples = int(out[2]) if len(out) > 2 else units
            body, headers = compress_body(bytes(body), headers, self.compression)
        except Exception as exc:
            self._once.log(("encode_error", type(exc).__name__), logging.ERROR,
                           "output %s: encoding %d samples as %s failed: %s: %s", self.name, units,
                           self._active_fmt, type(exc).__name__, exc)
            self._drop("encode_error", units)
            return []
        if len(body) <= self.max_bytes_per_batch or units <= 1:
            if len(body) > self.max_bytes_per_batch:
                self._once.log(("too_big",), logging.WARNING,
                               "output %s: a single sample encodes to %d bytes > max_bytes_per_batch %d; sent anyway",
                               self.name, len(body), self.max_bytes_per_batch)
            return [_Body(body, dict(headers), samples, pieces, fmt)]
        self.stats.byte_splits += 1
        if len(pieces) > 1:
            acc, cut = 0, 1
            for i, p in enumerate(pieces):
                acc += p.units
                if acc >= units / 2:
                    cut = max(1, min(i + 1, len(pieces) - 1))
                    break
            halves = [pieces[:cut], pieces[cut:]]
        else:
            p = pieces[0]
            parts = split_batch(p.batch, (p.units + 1) // 2)
            if len(parts) < 2:
                self._once.log(("unsplittable",), logging.WARNING,
                               "output %s: a %d-byte body cannot be split (batch type %s); sent anyway",
                               self.name, len(body), type(p.batch).__name__)
                return [_Body(body, dict(headers), samples, pieces, fmt)]
            halves = [[_Piece(part, batch_units(part), p.target, p.t)] for part in parts]
        return [b for half in halves for b in self._encode(half, encoder)]

    async def _deliver(self, b: _Body) -> None:
        one_try = 1 if (self.fast_fail_when_down and self.stats.down) else None
        try:
            await self._sender.send(b.body, b.headers, samples=b.samples, max_attempts=one_try)
        except UnsupportedMediaType as err:
            if b.fmt != self._active_fmt:
                # encoded before another request switched formats: re-encode in the new one
                for nb in self._encode(b.pieces):
                    await self._deliver(nb)
            elif self.fallback_fmt and self._active_fmt != self.fallback_fmt:
                log.warning("output %s: %s; falling back from %s to %s for this output", self.name, err,
                            self._active_fmt, self.fallback_fmt)
                self._set_format(self.fallback_fmt)
                for nb in self._encode(b.pieces):
                    await self._deliver(nb)
            else:
                self._once.log(("http_415",), logging.ERROR, "output %s: %s; no fallback format, batch dropped",
                               self.name, err)
                self._drop(err.reason, b.samples, err)
        except PermanentStatus as err:
            if err.status == 409 and self._encoder.reset is not None and not b.restarted and b.fmt == self._active_fmt:
                # compact: the receiver lacks this stream's dictionaries; start a new
                # stream (full dictionaries) and send the same samples once more
                self._encoder.reset()
                for nb in self._encode(b.pieces):
                    nb.restarted = True
                    await self._deliver(nb)
            else:
                if err.status == 409:
                    self._once.log(("http_409",), logging.ERROR,
                                   "output %s: %s even with full dictionaries; batch of %d samples dropped",
                                   self.name, err, b.samples)
                self._drop(err.reason, b.samples, err)
        except RetryBudgetExhausted as err:
            if not self.stats.down:
                log.warning("output %s: collector unreachable (%s); spooling until it answers again",
                            self.name, err)
            self.stats.down = True
            self.stats.last_error = str(err)
            await self._to_spool(b, err.reason)
        except TransportError as err:
            self.stats.last_error = str(err)
            await self._to_spool(b, err.reason)
        else:
            if self.stats.down:
                log.info("output %s: collector answers again", self.name)
            self.stats.down = False
            self._on_sent(b.body, b.samples)
        finally:
            self.stats.retries = self._sender.stats.retries

    def _on_sent(self, body: bytes, samples: int) -> None:
        self.stats.batches_sent += 1
        self.stats.samples_sent += samples
        self.stats.bytes_sent += len(body)
        self.stats.last_success_ts = time.time()

    def _drop(self, reason: str, samples: int, err: Optional[BaseException] = None) -> None:
        self.stats.dropped_batches[reason] = self.stats.dropped_batches.get(reason, 0) + 1
        self.stats.dropped_samples[reason] = self.stats.dropped_samples.get(reason, 0) + samples
        if err is not None:
            self.stats.last_error = str(err)

    async def _to_spool(self, b: _Body, reason: str) -> None:
        if self.spool_hook is None:
            self._once.log(("no_spool", reason), logging.ERROR,
                           "output %s: no spool configured; batch of %d samples dropped (%s)",
                           self.name, b.samples, reason)
            self._drop(reason, b.samples)
            return
        body, headers = b.body, b.headers
        if b.fmt == "compact" and b.pieces:
            # A compact body may reference dictionary entries sent in earlier requests. A spooled
            # one can be replayed much later, to a receiver that never saw those (or restarted),
            # so it is re-encoded self-contained: a fresh stream with full dictionaries.
            try:
                enc = _Encoder(self._factory(b.fmt))
                if len(b.pieces) == 1:
                    out = enc.one(b.pieces[0].batch)
                else:
                    assert enc.many is not None  # only encoders with `many` merge pieces into one body
                    out = enc.many([p.batch for p in b.pieces])
                body, headers = compress_body(bytes(out[0]), out[1], self.compression)
            except Exception as exc:  # keep the original body: better a 409 on replay than a loss now
                self._once.log(("spool_reencode", type(exc).__name__), logging.WARNING,
                               "output %s: could not re-encode a compact batch for the spool (%s)", self.name, exc)
        try:
            await self.spool_hook(body, dict(headers), b.samples)
        except Exception as exc:
            self._once.log(("spool_error", type(exc).__name__), logging.ERROR,
                           "output %s: spool hook failed (%s: %s); batch of %d samples dropped",
                           self.name, type(exc).__name__, exc, b.samples)
            self._drop("spool_error", b.samples)
            return
        self.stats.spooled_batches += 1
        self.stats.spooled_samples += b.samples
        self.stats.spooled_by_reason[reason] = self.stats.spooled_by_reason.get(reason, 0) + 1


async def _aiter(records: Union[Iterable[Any], AsyncIterable[Any]]) -> Any:
    if isinstance(records, AsyncIterable):
        async for r in records:
            yield r
    else:
        for r in records:
            yield r


class WriteAheadQueue:
    """An output whose spool is its queue: every batch is encoded and appended to the spool
    before anything is sent, and acknowledged there once the collector took it.

    Why: a batch held only in memory (buffered for ``flush_interval``, in flight, or being
    retried within the retry budget) is lost when the process is killed; and batches sent
    live while older ones wait in the spool reach the collector out of order, which
    Prometheus refuses (400 "out of order"). Here one loop delivers the spool oldest first,
    so after ``kill -9`` nothing whose ``append`` returned is lost (an append is a write
    into the page cache; see the spool's fsync policies for power loss), duplicates are at
    most the one request in flight (plus any the collector stored but did not answer in
    time), and delivery stays in order through any outage.

    For formats that are stateless on the wire (remote write 1.0, the text formats);
    remote write 2.0 (whose 415 fallback re-encodes batches) and the compact format (a
    stream with dictionaries) keep :class:`Output`'s in-memory path with the spool as an
    overflow. Consecutive remote write 1.0 records are merged into one request up to
    ``max_samples_per_batch`` (a WriteRequest is a run of repeated fields, so the
    uncompressed bodies concatenate).
    """

    #: Formats whose bodies can wait on disk and be sent in any later request as they are.
    FORMATS = ("remote-write-1", "prometheus", "openmetrics")

    def __init__(self, output: "Output", spool: Any, *, retry_pause_s: float = 1.0,
                 max_records: int = 32) -> None:
        if output.fmt not in self.FORMATS:
            raise TransportConfigError(f"output {output.name}: {output.fmt} cannot be queued write-ahead")
        self.output = output
        self.spool = spool
        self.retry_pause_s = float(retry_pause_s)
        self.max_records = int(max_records)
        self._encoder = _Encoder(output._factory(output.fmt))
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._merge = output.fmt == "remote-write-1"

    def _start(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())
        return self._wake

    async def submit(self, batch: Any) -> None:
        """Encode ``batch`` and append it to the spool; the delivery loop sends it. When the
        spool cannot take it (disk full, a record over the cap) the batch goes the
        in-memory way instead, so a full disk costs durability, not data."""
        wake = self._start()
        out = self.output
        if batch_units(batch) == 0:
            return
        out.stats.batches_submitted += 1
        now = time.monotonic()
        for piece in split_batch(batch, out.max_samples_per_batch):
            # the output's own encoding: max_bytes_per_batch splits, encoder errors dropped
            # and counted; only the encoder (its metadata schedule) is this queue's
            for b in out._encode([_Piece(piece, batch_units(piece), None, now)], self._encoder):
                try:
                    self.spool.append(b.body, meta=spool_meta(b.headers, b.samples))
                    out.stats.spooled_batches += 1
                    out.stats.spooled_samples += b.samples
                    out.stats.spooled_by_reason["write_ahead"] = out.stats.spooled_by_reason.get("write_ahead", 0) + 1
                except Exception as exc:  # SpoolFullError (ENOSPC, over the cap) or a closed spool
                    out._once.log(("wal_append", type(exc).__name__), logging.WARNING,
                                  "output %s: the spool cannot take a batch (%s); sending it from memory",
                                  out.name, exc)
                    out.stats.wal_bypassed += 1
                    for p in b.pieces:
                        await out.submit(p.batch)
        wake.set()

    def _next_request(self) -> Tuple[Optional[bytes], Dict[str, str], int, int, int]:
        """(body, headers, samples, records, last seq) of the next request: the oldest
        record, merged with the ones after it where the format allows."""
        recs = self.spool.peek(max_records=self.max_records if self._merge else 1)
        if not recs:
            return None, {}, 0, 0, 0
        body, headers, samples = _record_fields(recs[0])
        last = recs[0].seq
        if not self._merge or len(recs) == 1 or headers.get("content-encoding") != "snappy":
            return body, headers, samples, 1, last
        raws = [bytes(cramjam.snappy.decompress_raw(body))]
        n = 1
        for rec in recs[1:]:
            b, h, k = _record_fields(rec)
            if h != headers or samples + k > self.output.max_samples_per_batch:
                break
            raws.append(bytes(cramjam.snappy.decompress_raw(b)))
            samples += k
            last = rec.seq
            n += 1
        if n == 1:
            return body, headers, samples, 1, last
        return bytes(cramjam.snappy.compress_raw(b"".join(raws))), headers, samples, n, last

    async def _run(self) -> None:
        assert self._wake is not None
        out = self.output
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    body, headers, samples, n, last = self._next_request()
                except Exception as exc:  # a spool read error: logged once, tried again later
                    out._once.log(("wal_read", type(exc).__name__), logging.ERROR,
                                  "output %s: reading the spool failed: %s", out.name, exc)
                    break
                if body is None:
                    break
                out.stats.in_flight = 1
                try:
                    await out._sender.send(body, headers, samples=samples)
                except PermanentStatus as err:  # can never succeed: dropped, counted, acked
                    out._drop(err.reason, samples, err)
                    out._once.log(("wal_permanent", err.status), logging.ERROR,
                                  "output %s: %s; %d record(s) dropped", out.name, err, n)
                except TransportError as err:  # retry budget used up: the records stay on disk
                    out.stats.last_error = str(err)
                    out.stats.in_flight = 0
                    out._once.log(("wal_down",), logging.WARNING,
                                  "output %s: %s; batches wait in the spool", out.name, err)
                    await asyncio.sleep(self.retry_pause_s)
                    continue
                else:
                    out._on_sent(body, samples)
                    out._once.forget(("wal_down",))
                finally:
                    out.stats.in_flight = 0
                    out.stats.retries = out._sender.stats.retries
                self.spool.ack(last)

    def kick(self) -> None:
        """Start delivering (e.g. records a previous run left in the spool)."""
        self._start().set()

    def pending(self) -> int:
        return len(self.spool)

    async def flush(self, timeout_s: float) -> bool:
        """Deliver what the spool holds, for at most ``timeout_s``; True when it is empty."""
        wake = self._start()
        wake.set()
        end = time.monotonic() + timeout_s
        while len(self.spool) and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return not len(self.spool)

    async def aclose(self, timeout_s: float) -> None:
        """Try to deliver what is queued within ``timeout_s``, then stop: anything left stays
        in the spool for the next start (nothing is lost by stopping)."""
        if self._task is not None:
            await self.flush(timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def spool_meta(headers: Mapping[str, str], samples: int) -> Dict[str, Union[str, int]]:
    """The ``meta`` to store with a spooled body: the encoder's headers (names in lower
    case) and ``samples``. Nothing secret: auth and custom headers are not in them."""
    meta: Dict[str, Union[str, int]] = {str(k).lower(): str(v) for k, v in headers.items()}
    meta["samples"] = int(samples)
    return meta


def headers_from_meta(meta: Mapping[str, Any]) -> Tuple[Dict[str, str], int]:
    """Inverse of :func:`spool_meta`: ``(headers, samples)``."""
    headers = {str(k): str(v) for k, v in meta.items() if k != "samples"}
    return headers, int(meta.get("samples", 0) or 0)


def spool_hook_for(spool: Any) -> SpoolHook:
    """A ``spool_hook`` storing bodies in a :class:`dcgmrelay.spool.Spool` (``append``
    with :func:`spool_meta`). Its ``SpoolFullError`` makes :class:`Output` count the
    batch as ``dropped_batches["spool_error"]``."""

    async def hook(body: bytes, headers: Dict[str, str], samples: int) -> None:
        spool.append(body, meta=spool_meta(headers, samples))

    return hook


def _record_fields(rec: Any) -> Tuple[bytes, Dict[str, str], int]:
    if hasattr(rec, "payload") and hasattr(rec, "meta"):
        headers, samples = headers_from_meta(rec.meta or {})
        return bytes(rec.payload), headers, samples
    if hasattr(rec, "body"):
        return bytes(rec.body), dict(rec.headers or {}), int(getattr(rec, "samples", 0) or 0)
    body, headers, samples = rec
    return bytes(body), dict(headers or {}), int(samples or 0)
