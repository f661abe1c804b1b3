"""The scraper: real HTTP on 127.0.0.1, a simulated exporter beside hostile ones."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import zlib

import pytest

from dcgmrelay.scraper import Scraper, phase_offset
from dcgmrelay.simulate import ExporterServer, SimulatedNode
from dcgmrelay.targets import Target


_BOMB = gzip.compress(b"a" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB that gzip to ~64 KiB


async def _hostile_server(behaviour: str):
    """A raw TCP server that misbehaves in one way after reading the request."""

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            if behaviour == "hang":
                await asyncio.sleep(3600)
            elif behaviour == "endless":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                line = b'x{a="' + b"b" * 1000 + b'"} 1\n'
                chunk = b"%x\r\n%s\r\n" % (len(line) * 64, line * 64)
                while True:
                    writer.write(chunk)
                    await writer.drain()
            elif behaviour == "trickle":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while True:
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            elif behaviour == "garbage":
                body = os.urandom(20000) + b"\nok_metric 1\n"
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
            elif behaviour == "gzip-bomb":
                body = _BOMB
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
            elif behaviour == "500":
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 22\r\n\r\ninternal server error\n")
                await writer.drain()
            if behaviour in ("hang", "endless", "trickle"):
                await asyncio.sleep(3600)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"


def test_phase_offset_is_deterministic_and_within_interval():
    assert phase_offset("http://a:9400/metrics", 15) == phase_offset("http://a:9400/metrics", 15)
    offs = [phase_offset(f"http://10.0.0.{i}:9400/metrics", 15) for i in range(200)]
    assert all(0 <= o < 15 for o in offs)
    assert len({round(o, 3) for o in offs}) > 150  # spread, not bunched


def test_hostile_targets_do_not_delay_or_break_a_good_one():
    async def main():
        results = []

        async def on_result(r):
            results.append(r)

        hostile = {}
        servers = []
        for b in ("hang", "endless", "trickle", "garbage", "gzip-bomb", "500"):
            srv, url = await _hostile_server(b)
            servers.append(srv)
            hostile[url] = b
        async with ExporterServer(SimulatedNode(8, seed=3)) as good:
            targets = [Target(good.url, interval_s=0.5, timeout_s=0.4)]
            targets += [Target(u, interval_s=0.5, timeout_s=0.4) for u in hostile]
            scraper = Scraper(on_result, body_limit_bytes=8 * 1024 * 1024)
            assert scraper.update(targets) == (len(targets), 0)
            await asyncio.sleep(2.6)
            await scraper.aclose()
        for s in servers:
            s.close()
        return results, hostile, good.url

    results, hostile, good_url = asyncio.run(main())
    good = [r for r in results if r.target.url == good_url]
    # it keeps its interval (5 ticks in 2.6 s; one may be lost to a loaded machine), every scrape whole
    assert len(good) >= 4
    assert all(r.up and len(r.scrape) == 200 and r.scrape.n_errors == 0 for r in good)
    by = {}
    for r in results:
        if r.target.url in hostile:
            by.setdefault(hostile[r.target.url], []).append(r)
    assert set(by) == {"hang", "endless", "trickle", "garbage", "gzip-bomb", "500"}
    assert all(not r.up and "timed out" in r.error for r in by["hang"] + by["trickle"])
    assert all(not r.up and ("limit" in r.error or "timed out" in r.error) for r in by["endless"])
    # a loaded machine may time the bomb out before it reaches the limit: both stop it
    # (test_gzip_bomb_is_cut_at_the_decoded_limit checks the limit itself)
    assert all(not r.up and ("limit" in r.error or "timed out" in r.error) for r in by["gzip-bomb"])
    assert all(r.up and r.scrape.n_errors > 0 and "ok_metric" in r.scrape.names for r in by["garbage"]), [(r.error, r.scrape and r.scrape.names) for r in by["garbage"]]
    assert all(not r.up and r.error.startswith("HTTP 500") for r in by["500"])


def test_target_updates_start_and_stop_loops():
    async def main():
        seen = []

        async def on_result(r):
            seen.append(r.target.url)

        async with ExporterServer(SimulatedNode(2, seed=1)) as a, ExporterServer(SimulatedNode(2, seed=2)) as b:
            sc = Scraper(on_result)
            assert sc.update([Target(a.url, interval_s=0.2, timeout_s=0.2)]) == (1, 0)
            await asyncio.sleep(0.5)
            assert sc.update([Target(b.url, interval_s=0.2, timeout_s=0.2)]) == (1, 1)
            seen.clear()
            await asyncio.sleep(0.5)
            await sc.aclose()
            return seen, a.url, b.url

    seen, a, b = asyncio.run(main())
    assert seen and set(seen) == {b}


def test_a_target_changed_in_anything_a_scrape_uses_is_restarted():
    """Same URL and labels, another timeout / relabeling / credentials / limit: the loop is
    restarted with the new target (a reload must take effect); an equal target is left running."""
    from dcgmrelay.targets import ScrapeLimits

    async def main():
        async def on_result(r):
            pass

        async with ExporterServer(SimulatedNode(1, seed=1)) as a:
            base = Target(a.url, labels={"job": "j"}, interval_s=0.5, timeout_s=0.4)
            sc = Scraper(on_result)
            assert sc.update([base]) == (1, 0)
            results = [sc.update([Target(a.url, labels={"job": "j"}, interval_s=0.5, timeout_s=0.4)])]
            for changed in (dict(timeout_s=0.3), dict(metric_relabel=({"action": "labeldrop", "regex": "x"},)),
                            dict(auth={"bearer_token": "t"}), dict(tls={"insecure_skip_verify": True}),
                            dict(limits=ScrapeLimits(sample_limit=5)), dict(job="other")):
                results.append(sc.update([dataclasses.replace(base, **changed)]))
                assert sc.targets[0] == base and sc.update([sc.targets[0]]) == (0, 0)
                base = sc.targets[0]
            await sc.aclose()
            return results

    results = asyncio.run(main())
    assert results == [(0, 0)] + [(1, 1)] * 6


def test_openmetrics_content_type_and_gzip_are_handled():
    from dcgmrelay._http import HttpServer

    body = b'# TYPE c counter\nc_total{gpu="0",UUID="GPU-1"} 5 1700000000.5\n# EOF\n'

    async def handler(method, path, query, headers, data):
        assert "application/openmetrics-text" in headers["accept"]
        return 200, {"Content-Type": "application/openmetrics-text; version=1.0.0",
                     "Content-Encoding": "gzip"}, gzip.compress(body)

    async def main():
        async with HttpServer(handler) as srv:
            sc = Scraper(lambda r: None)
            r = await sc.scrape_once(Target(srv.url + "/metrics", timeout_s=2))
            await sc.aclose()
            return r

    r = asyncio.run(main())
    assert r.up and r.scrape.format == "openmetrics"
    assert r.scrape.timestamps.tolist() == [1700000000500]


def _scrape_once_from(handle):
    """One scrape of a raw TCP server whose connections ``handle(reader, writer)`` answers."""
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
        try:
            sc = Scraper(lambda r: None)
            r = await sc.scrape_once(Target(url, timeout_s=5))
            await sc.aclose()
            return r
        finally:
            server.close()

    return asyncio.run(main())


@pytest.mark.parametrize("coding, encode, chunked", [
    ("gzip", gzip.compress, False),
    ("x-gzip", gzip.compress, True),
    ("deflate", zlib.compress, False),  # RFC 9110's deflate: zlib-wrapped
    ("deflate", lambda b: zlib.compress(b)[2:-4], True),  # raw deflate, as some servers send it
    ("identity", lambda b: b, True),
    ("br-unknown", lambda b: b, False),  # a coding nobody knows passes through, as with httpx
])
def test_content_codings_are_decoded(coding, encode, chunked):
    """The scraper reads plain-http pages without httpx's response model: it decodes what
    httpx would (gzip, deflate zlib-wrapped or raw), in one piece or chunked."""
    body = b"".join(b'DCGM_FI_DEV_GPU_TEMP{gpu="%d",UUID="GPU-%d"} %d\n' % (i, i, 40 + i) for i in range(500))

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        data = encode(body)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Encoding: %s\r\n" % coding.encode()
        if chunked:
            parts = [data[i:i + 700] for i in range(0, len(data), 700)]
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in parts) + b"0\r\n\r\n")
        else:
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
        await writer.drain()
        writer.close()

    r = _scrape_once_from(handle)
    assert r.up, r.error
    assert r.body_bytes == len(body)
    assert r.scrape.values.tolist() == [40.0 + i for i in range(500)]


@pytest.mark.parametrize("coding, data, message", [
    ("gzip", b"\x1f\x8b not gzip at all", "bad gzip body"),
    ("gzip, deflate", b"whatever", "unsupported Content-Encoding 'gzip, deflate'"),
])
def test_undecodable_bodies_fail_the_scrape_with_a_reason(coding, data, message):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                     % (coding.encode(), len(data)) + data)
        await writer.drain()
        writer.close()

    r = _scrape_once_from(handle)
    assert not r.up and message in r.error, r.error


def test_gzip_bomb_is_cut_at_the_decoded_limit():
    """The body limit counts decoded bytes: a small gzip body that inflates past it fails with
    the limit (not a timeout, not memory), and the next scrape of a good target still works."""
    async def main():
        srv, url = await _hostile_server("gzip-bomb")
        try:
            scraper = Scraper(lambda r: asyncio.sleep(0), body_limit_bytes=1024 * 1024)
            r = await scraper.scrape_once(Target(url, interval_s=30, timeout_s=20))
            async with ExporterServer(SimulatedNode(2, seed=1)) as good:
                ok = await scraper.scrape_once(Target(good.url, interval_s=30, timeout_s=20))
            await scraper.aclose()
            return r, ok
        finally:
            srv.close()

    r, ok = asyncio.run(main())
    assert not r.up and "exceeds the limit of 1048576 bytes" in r.error, r.error
    assert ok.up and len(ok.scrape) > 0
