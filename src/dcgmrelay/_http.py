"""A minimal asyncio HTTP/1.1 server for the relay's own endpoints and the simulated exporter.

Only what those need: GET/HEAD (and POST bodies with Content-Length), keep-alive,
one handler coroutine ``handler(method, path, query, headers, body) -> (status,
headers, body)``. Bound to 127.0.0.1 unless told otherwise. Request lines and
headers are size-limited so a bad client cannot make it buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

__all__ = ["HttpServer", "Handler", "Response"]

Response = Tuple[int, Mapping[str, str], bytes]
Handler = Callable[[str, str, Mapping[str, List[str]], Mapping[str, str], bytes], Awaitable[Response]]

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 256 * 1024 * 1024


class HttpServer:
    """``async with HttpServer(handler, host, port) as srv: srv.url``; port 0 picks a free one."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self._server: Optional[asyncio.base_events.Server] = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> "HttpServer":
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "HttpServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, _version = lines[0].split(" ", 2)
                except ValueError:
                    await self._write(writer, 400, {}, b"bad request line\n", False, "GET")
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY_BYTES:
                    await self._write(writer, 413, {}, b"body too large\n", False, method)
                    return
                if length:
                    body = await reader.readexactly(length)
                parts = urlsplit(target)
                try:
                    status, rheaders, rbody = await self._handler(method, parts.path, parse_qs(parts.query),
                                                                  headers, body)
                except Exception as e:  # a handler bug answers 500, it does not kill the server
                    status, rheaders, rbody = 500, {"Content-Type": "text/plain"}, f"{type(e).__name__}\n".encode()
                keep = headers.get("connection", "").lower() != "close"
                await self._write(writer, status, rheaders, rbody, keep, method)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # server shutting down: end the connection quietly (asyncio logs a cancelled handler)
        finally:
            if task is not None:
                self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, status: int, headers: Mapping[str, str], body: bytes,
                     keep: bool, method: str) -> None:
        out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        hdrs = {"Content-Length": str(len(body)), "Connection": "keep-alive" if keep else "close", **headers}
        out.extend(f"{k}: {v}" for k, v in hdrs.items())
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()
