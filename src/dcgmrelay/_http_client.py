"""A lean HTTP/1.1 keep-alive transport for httpx, for plain ``http://`` on asyncio streams.

Why: a node relay makes two small requests per scrape interval (the GET of the
exporter's page and the remote-write POST). Through httpx's default transport
each one crosses httpcore, h11 and anyio, which at 15 requests a second costs
more CPU than parsing the page. This transport keeps httpx's API (requests,
responses, auth, event hooks, gzip decoding, timeouts and exception types are
httpx's) and replaces only the wire: one asyncio stream per connection, the
request head written in one call, the response head read in one call, the body
by ``Content-Length``, chunked coding or connection close.

Only ``http://`` without a proxy goes this way; anything else (TLS, HTTP/2,
proxies) is handed to httpx's own transport, created on first use. The
relay chooses this transport only where that holds (see :func:`lean_transport_for`).

Failure semantics follow httpx: a refused or failed connect raises
:class:`httpx.ConnectError`, timeouts raise the phase's timeout, a peer that
closes early raises :class:`httpx.RemoteProtocolError` or :class:`httpx.ReadError`.
A pooled connection that the server closed while idle is noticed before reuse;
one that fails before any byte of the response arrived is retried once on a new
connection (the server cannot have acted on a request it never answered on a
connection it had already closed; remote write is at-least-once anyway).
"""

from __future__ import annotations

import asyncio
import sys
from typing import AsyncIterator, Awaitable, Dict, List, Optional, Tuple

import httpx

__all__ = ["LeanTransport", "lean_transport_for", "deadline"]

_MAX_HEAD_BYTES = 64 * 1024   # status line + headers; more is a protocol error
_READ_CHUNK = 256 * 1024      # body chunk handed to httpx (and the scraper's size limit) at once
_MAX_IDLE_PER_HOST = 8

if sys.version_info >= (3, 11):
    deadline = asyncio.timeout
else:  # pragma: no cover - 3.9/3.10
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def deadline(delay: Optional[float]) -> AsyncIterator[None]:
        # asyncio.timeout's semantics without a task per wait: cancel this task at the deadline
        if delay is None:
            yield
            return
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise asyncio.TimeoutError() from None
            raise
        finally:
            handle.cancel()


def lean_transport_for(url: str, *, trust_env: bool = False) -> Optional["LeanTransport"]:
    """A :class:`LeanTransport` when ``url`` is plain ``http://`` (and no proxy can apply), else None."""
    if trust_env:
        return None  # proxies from the environment need httpx's own transport
    if not str(url).lower().startswith("http://"):
        return None
    return LeanTransport()


class _Conn:
    __slots__ = ("reader", "writer", "key")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: Tuple[str, int]) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key

    def usable(self) -> bool:
        # an idle keep-alive connection the server closed shows as EOF (or unexpected bytes)
        return not (self.writer.is_closing() or self.reader.at_eof() or len(self.reader._buffer))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()


class _Timeouts:
    __slots__ = ("connect", "read", "write")

    def __init__(self, request: httpx.Request) -> None:
        t = request.extensions.get("timeout") or {}
        self.connect = t.get("connect")
        self.read = t.get("read")
        self.write = t.get("write")


class _Body(httpx.AsyncByteStream):
    """The response body: yields chunks as they arrive; gives the connection back to the
    pool once it has been read to its end, closes it otherwise."""

    __slots__ = ("_t", "_conn", "_length", "_chunked", "_read", "_done", "_keep")

    def __init__(self, transport: "LeanTransport", conn: _Conn, length: Optional[int], chunked: bool,
                 read_timeout: Optional[float], keep_alive: bool) -> None:
        self._t = transport
        self._conn = conn
        self._length = length
        self._chunked = chunked
        self._read = read_timeout
        self._done = length == 0
        self._keep = keep_alive

    async def _recv(self, coro: "Awaitable[bytes]") -> bytes:
        # the read timeout bounds each wait for bytes, as httpx's does (not the whole body)
        try:
            async with deadline(self._read):
                return await coro
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout("timed out reading the response body") from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("peer closed connection inside a chunked body") from None
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError("chunk size line too long") from None
        except (ConnectionError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        if self._chunked:
            async for chunk in self._iter_chunked(reader):
                yield chunk
        elif self._length is not None:
            left = self._length
            while left > 0:
                chunk = await self._recv(reader.read(min(left, _READ_CHUNK)))
                if not chunk:
                    raise httpx.RemoteProtocolError(
                        f"peer closed connection without sending complete message body: "
                        f"received {self._length - left} bytes, expected {self._length}")
                left -= len(chunk)
                yield chunk
        else:  # delimited by the connection's end
            self._keep = False
            while True:
                chunk = await self._recv(reader.read(_READ_CHUNK))
                if not chunk:
                    break
                yield chunk
        self._done = True

    async def _iter_chunked(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            line = await self._recv(reader.readuntil(b"\r\n"))
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
                if size < 0 or len(size_s) > 16:
                    raise ValueError
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_s[:20]!r}") from None
            if size == 0:
                # trailer section: header lines up to an empty one
                while await self._recv(reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            left = size
            while left > 0:
                chunk = await self._recv(reader.read(min(left, _READ_CHUNK)))
                if not chunk:
                    raise httpx.RemoteProtocolError("peer closed connection inside a chunk")
                left -= len(chunk)
                yield chunk
            if await self._recv(reader.readexactly(2)) != b"\r\n":
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self._done and self._keep:
            self._t._release(conn)
        else:
            conn.close()


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams for plain ``http://``; other URLs go to httpx's transport."""

    def __init__(self, *, max_idle_per_host: int = _MAX_IDLE_PER_HOST) -> None:
        self._idle: Dict[Tuple[str, int], List[_Conn]] = {}
        self._max_idle = max(0, int(max_idle_per_host))
        self._fallback: Optional[httpx.AsyncBaseTransport] = None
        self._closed = False

    # -- pool ---------------------------------------------------------------------------

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self._max_idle or not conn.usable():
            conn.close()
        else:
            idle.append(conn)

    def _take(self, key: Tuple[str, int]) -> Optional[_Conn]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int, timeout: Optional[float]) -> _Conn:
        try:
            async with deadline(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEAD_BYTES)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Conn(reader, writer, (host, port))

    # -- requests -----------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        status, reason, headers, stream = await self.open(request)
        return httpx.Response(status, headers=headers, stream=stream,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason})

    async def open(self, request: httpx.Request) -> Tuple[int, bytes, List[Tuple[bytes, bytes]], "_Body"]:
        """Send a plain-``http://`` request; return the response head (status, reason, raw
        headers) and its body stream, not yet read (iterate it, then ``aclose()`` it).

        The scraper's hot path: no :class:`httpx.Response` (its header model, decoders and
        chunkers) per request, which for one node's page every interval cost about as much
        CPU as the parse. Same connection handling and errors as :meth:`handle_async_request`.

        Any scheme but ``http`` raises :class:`httpx.UnsupportedProtocol` before a
        connection is made: this path speaks plain HTTP only, and must not send an
        ``https://`` request in cleartext."""
        if self._closed:
            raise RuntimeError("the transport has been closed")
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"the lean transport speaks plain http:// only; refusing to send a {url.scheme or 'scheme-less'}:// "
                f"request to {url.host or '?'} without its protocol (use httpx's transport)")
        host = url.host
        port = url.port or 80
        key = (host, port)
        timeouts = _Timeouts(request)
        body = request.content if request.stream is not None else b""  # httpx has read a bytes body
        head = self._head(request, url)
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, request, timeouts)
            except _NothingReceived:
                conn.close()  # closed by the server while idle: once more on a new connection
        conn = await self._connect(host, port, timeouts.connect)
        try:
            return await self._exchange(conn, head, body, request, timeouts)
        except _NothingReceived as exc:
            raise httpx.RemoteProtocolError("server disconnected without sending a response") from exc.__cause__

    @staticmethod
    def _head(request: httpx.Request, url: httpx.URL) -> bytes:
        target = url.raw_path  # path and query, already percent-encoded by httpx
        lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for k, v in request.headers.raw:
            lines += (k, b": ", v, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes, request: httpx.Request,
                        timeouts: _Timeouts) -> Tuple[int, bytes, List[Tuple[bytes, bytes]], "_Body"]:
        writer, reader = conn.writer, conn.reader
        try:
            writer.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                writer.write(body)
            if writer.transport.get_write_buffer_size():
                async with deadline(timeouts.write):
                    await writer.drain()
        except asyncio.TimeoutError:
            conn.close()
            raise httpx.WriteTimeout("timed out sending the request") from None
        except (ConnectionError, OSError) as exc:
            conn.close()
            raise _NothingReceived() from exc
        try:
            async with deadline(timeouts.read):
                raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.TimeoutError:
            conn.close()
            raise httpx.ReadTimeout("timed out waiting for the response") from None
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if not exc.partial:
                raise _NothingReceived() from exc
            raise httpx.RemoteProtocolError("peer closed connection inside the response head") from None
        except asyncio.LimitOverrunError:
            conn.close()
            raise httpx.RemoteProtocolError(f"response head longer than {_MAX_HEAD_BYTES} bytes") from None
        except (ConnectionError, OSError) as exc:
            conn.close()
            raise _NothingReceived() from exc
        try:
            status, reason, headers, length, chunked, keep = _parse_head(raw)
        except httpx.RemoteProtocolError:
            conn.close()
            raise
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        return status, reason, headers, _Body(self, conn, length, chunked, timeouts.read, keep)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()


class _NothingReceived(Exception):
    """The connection failed before any byte of the response: safe to try a new one."""


def _parse_head(raw: bytes) -> Tuple[int, bytes, List[Tuple[bytes, bytes]], Optional[int], bool, bool]:
    """Status line and headers → (status, reason, headers, content length, chunked, keep-alive)."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else b""
    keep = parts[0] != b"HTTP/1.0"
    headers: List[Tuple[bytes, bytes]] = []
    length: Optional[int] = None
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        value = value.strip()
        headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length":
            try:
                n = int(value)
                if n < 0 or (length is not None and n != length):
                    raise ValueError
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}") from None
            length = n
        elif lname == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lname == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                keep = False
            elif b"keep-alive" in tokens:
                keep = True
    if chunked:
        length = None  # Transfer-Encoding wins over Content-Length (RFC 9112 §6.3)
    return status, reason, headers, length, chunked, keep
