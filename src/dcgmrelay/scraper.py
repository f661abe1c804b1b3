"""Scrape targets on their intervals (asyncio + httpx), one independent task per target.

Each target gets its own loop, its own :class:`~dcgmrelay.Parser` (which remembers
the exporter's label blocks between scrapes) and a deterministic phase within
its interval (from a hash of its key, as Prometheus spreads scrapes), so a
slow, hung, huge or garbage target only ever delays itself:

* the whole request (connect, headers, body) is bounded by the target's timeout;
* the body is read in chunks and abandoned past ``body_limit_bytes`` (counted
  after gzip decoding, so a compressed bomb is cut too);
* the parse is lenient: bad lines are reported in the result, the rest is kept.

A loop that overruns its interval skips the missed ticks instead of piling up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Union

import httpx

from ._http_client import LeanTransport, deadline
from ._version import __version__
from .scrape import Parser, Scrape
from .targets import DEFAULT_BODY_SIZE_LIMIT, Target

__all__ = ["ACCEPT", "ScrapeResult", "Scraper", "phase_offset"]

logger = logging.getLogger("dcgmrelay.scraper")

#: What we ask exporters for: OpenMetrics first, then the text format (both parsed natively).
ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
USER_AGENT = f"dcgmrelay/{__version__}"


@dataclass
class ScrapeResult:
    """One scrape of one target: the parsed body, or why there is none."""

    target: Target
    #: When the scrape started (ms since the epoch): the timestamp of its samples.
    timestamp_ms: int
    duration_s: float
    scrape: Optional[Scrape]
    #: None when the scrape succeeded; else a one-line reason (timeout, HTTP status, limit ...).
    error: Optional[str] = None
    status_code: Optional[int] = None
    body_bytes: int = 0

    @property
    def up(self) -> bool:
        return self.scrape is not None


def phase_offset(key: str, interval_s: float) -> float:
    """Deterministic offset of a target within its interval (the same in every process)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return (h / 2**64) * interval_s


class _BodyTooLarge(Exception):
    pass


ClientFactory = Callable[[Target], httpx.AsyncClient]


class Scraper:
    """Runs one scrape loop per target and hands every result to ``on_result``."""

    def __init__(
        self,
        on_result: Callable[[ScrapeResult], Awaitable[None]],
        *,
        client_factory: Optional[ClientFactory] = None,
        body_limit_bytes: int = DEFAULT_BODY_SIZE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_result = on_result
        self._client_factory = client_factory
        self.body_limit_bytes = body_limit_bytes
        self._clock = clock
        self._tasks: Dict[str, asyncio.Task[None]] = {}
        self._targets: Dict[str, Target] = {}
        self._clients: Dict[str, httpx.AsyncClient] = {}
        self._shared: Optional[httpx.AsyncClient] = None
        # Plain http:// targets without auth or TLS settings (the common exporter) skip
        # httpx's client layer: one lean keep-alive transport, one request built per target.
        self._lean: Optional[LeanTransport] = None
        self._requests: Dict[str, httpx.Request] = {}

    @property
    def targets(self) -> list[Target]:
        return list(self._targets.values())

    def _client(self, target: Target) -> httpx.AsyncClient:
        if self._client_factory is not None and (target.auth or target.tls):
            client = self._clients.get(target.key)
            if client is None:
                client = self._clients[target.key] = self._client_factory(target)
            return client
        if self._shared is None:
            # One pooled client for every plain target: connections are reused across scrapes.
            self._shared = httpx.AsyncClient(http2=False, trust_env=False,
                                             limits=httpx.Limits(max_keepalive_connections=1000))
        return self._shared

    def update(self, targets: Sequence[Target]) -> tuple[int, int]:
        """Make the running loops match ``targets``: start new ones, stop removed or changed ones.
        Returns (started, stopped)."""
        wanted = {t.key: t for t in targets}
        stopped = 0
        for key in list(self._tasks):
            if key not in wanted or not wanted[key].same_scrape(self._targets[key]):
                self._tasks.pop(key).cancel()
                self._targets.pop(key)
                self._requests.pop(key, None)
                client = self._clients.pop(key, None)
                if client is not None:
                    asyncio.ensure_future(client.aclose())
                stopped += 1
        started = 0
        for key, t in wanted.items():
            if key not in self._tasks:
                self._targets[key] = t
                self._tasks[key] = asyncio.create_task(self._loop(t), name=f"scrape {key}")
                started += 1
        return started, stopped

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop every loop and close the connections, within ``timeout_s`` (a target that
        does not let go of a connection cannot hold up a shutdown)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        self._tasks.clear()
        self._targets.clear()
        self._requests.clear()
        clients: List[Union[httpx.AsyncClient, LeanTransport]] = [*self._clients.values()]
        clients += [c for c in (self._shared, self._lean) if c is not None]
        self._clients.clear()
        self._shared = None
        self._lean = None
        if clients:
            closing = [asyncio.ensure_future(c.aclose()) for c in clients]
            done, pending = await asyncio.wait(closing, timeout=timeout_s)
            for f in pending:
                f.cancel()
            for f in done:
                if not f.cancelled() and f.exception() is not None:
                    logger.debug("closing a scrape client: %s", f.exception())

    async def _loop(self, target: Target) -> None:
        parser = Parser()
        interval = max(0.001, target.interval_s)
        offset = phase_offset(target.key, interval)
        now = self._clock()
        next_at = now - (now % interval) + offset
        if next_at < now:
            next_at += interval
        while True:
            await asyncio.sleep(max(0.0, next_at - self._clock()))
            result = await self.scrape_once(target, parser)
            try:
                await self._on_result(result)
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer's bug must not stop scraping
                logger.exception("handling the scrape of %s failed", target.key)
            next_at += interval
            now = self._clock()
            if next_at < now:  # overran: skip the missed ticks, keep the phase
                missed = int((now - next_at) // interval) + 1
                next_at += missed * interval

    async def scrape_once(self, target: Target, parser: Optional[Parser] = None) -> ScrapeResult:
        """Scrape ``target`` once now (also used by tests and ``inspect``)."""
        parser = parser or Parser()
        started = self._clock()
        ts_ms = int(started * 1000)
        t0 = time.perf_counter()
        status = None
        size = 0
        try:
            async with deadline(target.timeout_s):
                body, status, ctype = await self._fetch(target)
            size = len(body)
            if status != 200:
                raise _Failed(f"HTTP {status}: {body[:120].decode('utf-8', 'replace').strip()}")
            scrape = parser.parse(body, source=target.key, content_type=ctype)
            return ScrapeResult(target, ts_ms, time.perf_counter() - t0, scrape, None, status, size)
        except asyncio.TimeoutError:
            err = f"scrape timed out after {target.timeout_s:g}s"
        except _BodyTooLarge:
            err = f"body exceeds the limit of {self.body_limit_bytes} bytes"
        except _Failed as e:
            err = str(e)
        except httpx.HTTPError as e:
            err = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return ScrapeResult(target, ts_ms, time.perf_counter() - t0, None, err, status, size)

    def _lean_request(self, target: Target) -> Optional[httpx.Request]:
        """The request to send to ``target`` through the lean transport, built once; None
        when the target needs httpx's client (TLS, auth)."""
        req = self._requests.get(target.key)
        if req is None:
            if target.auth or target.tls or not target.url.lower().startswith("http://"):
                return None
            params = {k: list(v) for k, v in target.params.items()} if target.params else None
            t = target.timeout_s
            req = httpx.Request("GET", target.url, params=params, headers={
                "Accept": ACCEPT, "Accept-Encoding": "gzip", "User-Agent": USER_AGENT,
                "X-Prometheus-Scrape-Timeout-Seconds": f"{t:g}"},
                extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}})
            self._requests[target.key] = req
        return req

    async def _fetch(self, target: Target) -> tuple[Union[bytes, bytearray], int, Optional[str]]:
        req = self._lean_request(target)
        if req is not None:
            if self._lean is None:
                self._lean = LeanTransport(max_idle_per_host=4)
            status, _, head, stream = await self._lean.open(req)
            try:
                ctype = coding = None
                for k, v in head:
                    lk = k.lower()
                    if lk == b"content-type":
                        ctype = v.decode("latin-1")
                    elif lk == b"content-encoding":
                        coding = v
                return await self._read_chunks(stream, coding), status, ctype
            finally:
                await stream.aclose()
        client = self._client(target)
        headers = {"Accept": ACCEPT, "User-Agent": USER_AGENT,
                   "X-Prometheus-Scrape-Timeout-Seconds": f"{target.timeout_s:g}"}
        params = {k: list(v) for k, v in target.params.items()} if target.params else None
        async with client.stream("GET", target.url, headers=headers, params=params,
                                 timeout=target.timeout_s) as resp:
            return await self._read(resp), resp.status_code, resp.headers.get("content-type")

    async def _read_chunks(self, stream: AsyncIterable[bytes], coding: Optional[bytes]) -> Union[bytes, bytearray]:
        """The lean transport's body, decoded as its ``Content-Encoding`` says (gzip or
        deflate, as httpx would; codings it does not know pass through, as with httpx)."""
        codings = [c for c in (t.strip().lower() for t in coding.split(b",")) if c and c != b"identity"] \
            if coding else []
        if not codings:
            return await self._read(stream)
        if len(codings) > 1 or codings[0] not in _ZLIB_WBITS:
            if any(c in _ZLIB_WBITS for c in codings):
                raise _Failed(f"unsupported Content-Encoding {(coding or b'').decode('latin-1')!r}")
            return await self._read(stream)
        return await self._read(_inflate(stream, codings[0], self.body_limit_bytes))

    async def _read(self, resp: Union[httpx.Response, AsyncIterable[bytes]]) -> Union[bytes, bytearray]:
        # chunk by chunk, after content decoding: a gzip bomb is cut at the limit too. Chunks
        # go into one growing buffer (not a list joined at the end), so a large page is held
        # about once rather than twice at the peak.
        first: Optional[bytes] = None
        buf: Optional[bytearray] = None
        total = 0
        async for chunk in (resp.aiter_bytes() if isinstance(resp, httpx.Response) else resp):
            total += len(chunk)
            if total > self.body_limit_bytes:
                raise _BodyTooLarge()
            if first is None:
                first = chunk
            elif buf is None:
                buf = bytearray(first)
                buf += chunk
            else:
                buf += chunk
        if buf is not None:
            return buf
        return first if first is not None else b""


class _Failed(Exception):
    pass


# zlib's window bits per content coding: gzip's header and trailer; deflate as RFC 9110 has it
# (zlib-wrapped), raw deflate accepted too (as httpx's decoder does)
_ZLIB_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def _zlib_header(b: bytes) -> bool:
    """A zlib stream's two header bytes (RFC 1950: deflate method, check bits)."""
    return len(b) >= 2 and b[0] & 0x0F == 8 and (b[0] << 8 | b[1]) % 31 == 0


async def _inflate(stream: AsyncIterable[bytes], coding: bytes, limit: int) -> AsyncIterator[bytes]:
    """Decode a gzip/deflate body chunk by chunk, never more than ``limit + 1`` bytes of output
    per input chunk held at once (a bomb is cut by the reader's limit, not inflated whole)."""
    d = zlib.decompressobj(_ZLIB_WBITS[coding])
    first = True
    try:
        async for chunk in stream:
            if first and coding == b"deflate" and not _zlib_header(chunk):
                d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header
            first = False
            data = chunk
            while data:
                out = d.decompress(data, limit + 1)
                if out:
                    yield out
                data = d.unconsumed_tail
        tail = d.flush()
        if tail:
            yield tail
    except zlib.error as exc:
        raise _Failed(f"bad {coding.decode()} body: {exc}") from None

