"""The lean HTTP/1.1 transport against scripted servers on 127.0.0.1.

Each server reads one request head (and a Content-Length body) per exchange and writes
the raw bytes the test scripted, so framing, keep-alive and failure paths are exact.
"""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest

from dcgmrelay._http_client import LeanTransport


class Scripted:
    """Answers the n-th request on any connection with ``replies[n]``: bytes to write, then
    'close' to close the connection, or a callable(writer) coroutine."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while self.replies:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                self.requests.append(head + body)
                reply = self.replies.pop(0)
                if callable(reply):
                    await reply(writer)
                    continue
                data, after = reply if isinstance(reply, tuple) else (reply, None)
                writer.write(data)
                await writer.drain()
                if after == "close":
                    writer.close()
                    return
        finally:
            writer.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(e + b"\r\n" for e in extra),
                                                                   body)


async def get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    r = await client.get(url)
    await r.aread()
    return r


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_reuses_one_connection_and_sends_a_correct_head():
    async def main():
        async with Scripted([ok(b"one"), ok(b"two")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                r1 = await get(c, srv.url + "/metrics?a=1&b=x%20y")
                r2 = await c.post(srv.url + "/write", content=b"payload", headers={"X-Test": "1"})
            assert (r1.status_code, r1.content, r2.content) == (200, b"one", b"two")
            assert srv.connections == 1
            head = srv.requests[0].split(b"\r\n")
            assert head[0] == b"GET /metrics?a=1&b=x%20y HTTP/1.1"
            assert b"Host: " + srv.url[7:].encode() in head
            assert srv.requests[1].startswith(b"POST /write HTTP/1.1\r\n")
            assert srv.requests[1].endswith(b"\r\n\r\npayload") and b"Content-Length: 7" in srv.requests[1]
            assert b"X-Test: 1" in srv.requests[1]
    run(main())


def test_chunked_body_with_extensions_and_trailers():
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    async def main():
        async with Scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, ok(b"next")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).content == b"hello world"
                assert (await get(c, srv.url)).content == b"next"  # framing left the connection usable
            assert srv.connections == 1
    run(main())


def test_gzip_is_decoded_by_httpx():
    data = b"DCGM_FI_DEV_GPU_TEMP 50\n" * 100
    async def main():
        async with Scripted([ok(gzip.compress(data), b"Content-Encoding: gzip")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).content == data
    run(main())


def test_body_delimited_by_close_and_connection_close_are_not_reused():
    async def main():
        async with Scripted([(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", "close"),
                             (ok(b"x", b"Connection: close"), "close"), ok(b"y")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).content == b"until the end"
                assert (await get(c, srv.url)).content == b"x"
                assert (await get(c, srv.url)).content == b"y"
            assert srv.connections == 3
    run(main())


def test_idle_connection_closed_by_the_server_is_replaced():
    async def main():
        async with Scripted([(ok(b"first"), "close"), ok(b"second")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).content == b"first"
                await asyncio.sleep(0.05)  # the server has closed the kept-alive connection
                assert (await get(c, srv.url)).content == b"second"
            assert srv.connections == 2
    run(main())


def test_connection_dropped_before_any_response_byte_is_retried_once_on_a_new_one():
    async def drop(writer):
        writer.transport.abort()

    async def main():
        async with Scripted([ok(b"a"), drop, ok(b"b")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).content == b"a"
                # the pooled connection is dropped on the second request: one new connection
                assert (await get(c, srv.url)).content == b"b"
            assert srv.connections == 2
    run(main())


def test_server_that_never_answers_on_a_new_connection_is_a_protocol_error():
    async def drop(writer):
        writer.transport.abort()

    async def main():
        async with Scripted([drop]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                    await get(c, srv.url)
    run(main())


@pytest.mark.parametrize("raw, match", [
    (b"HTTP/1.1 20 OK\r\n\r\n", "bad status line"),
    (b"SPDY/3 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", "not followed by CRLF"),
])
def test_malformed_responses_raise_protocol_errors(raw, match):
    async def main():
        async with Scripted([(raw, "close")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError, match=match):
                    await get(c, srv.url)
    run(main())


def test_body_shorter_than_content_length():
    async def main():
        async with Scripted([(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "close")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError, match="received 5 bytes, expected 10"):
                    await get(c, srv.url)
    run(main())


def test_endless_response_head_is_cut_at_the_limit():
    async def endless(writer):
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        await writer.drain()

    async def main():
        async with Scripted([endless]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError, match="response head longer than"):
                    await get(c, srv.url)
    run(main())


def test_read_timeout_between_bytes():
    async def stall(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    async def main():
        async with Scripted([stall]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport(), timeout=0.3) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await get(c, srv.url)
    run(main())


def test_connect_refused_is_a_connect_error():
    async def main():
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        async with httpx.AsyncClient(transport=LeanTransport()) as c:
            with pytest.raises(httpx.ConnectError):
                await get(c, f"http://127.0.0.1:{port}/")
    run(main())


def test_head_and_204_have_no_body():
    async def main():
        async with Scripted([b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                             ok(b"after")]) as srv:
            async with httpx.AsyncClient(transport=LeanTransport()) as c:
                assert (await get(c, srv.url)).status_code == 204
                r = await c.head(srv.url)
                assert (r.status_code, r.content) == (200, b"")
                assert (await get(c, srv.url)).content == b"after"
            assert srv.connections == 1
    run(main())


def test_abandoned_body_closes_the_connection_instead_of_pooling_it():
    async def main():
        async with Scripted([ok(b"x" * 100_000), ok(b"fresh")]) as srv:
            t = LeanTransport()
            async with httpx.AsyncClient(transport=t) as c:
                async with c.stream("GET", srv.url) as r:
                    async for _ in r.aiter_raw():
                        break  # a scraper over its body limit stops reading
                assert (await get(c, srv.url)).content == b"fresh"
            assert srv.connections == 2
    run(main())


@pytest.mark.parametrize("scheme", ["https", "HTTPS", "ws", "ftp"])
def test_open_refuses_any_scheme_but_http_before_connecting(scheme):
    # open() is the scraper's direct path (no fallback): an https:// URL handed to it must
    # not go out as plain HTTP, here to a plain server that would answer it
    async def main():
        async with Scripted([ok(b"cleartext")]) as srv:
            t = LeanTransport()
            url = srv.url.replace("http://", f"{scheme}://", 1) + "/metrics"
            req = httpx.Request("GET", url)
            with pytest.raises(httpx.UnsupportedProtocol, match=rf"plain http:// only.*{scheme.lower()}://"):
                await t.open(req)
            # the same transport still serves http://, on the server's first and only connection
            # (a connection or request from the refused call would have come before it)
            status, _, _, body = await t.open(httpx.Request("GET", srv.url + "/metrics"))
            assert status == 200 and b"".join([c async for c in body]) == b"cleartext"
            await body.aclose()
            await t.aclose()
            assert srv.connections == 1 and len(srv.requests) == 1
    run(main())
