"""The floor of any asyncio relay in Python: the two HTTP exchanges a cycle and nothing else.

    python benchmarks/floor_agent.py SCRAPE_URL WRITE_URL BODY_FILE [--interval 1]

Every interval: GET the page over a kept-alive connection (asyncio streams, read to the end
by Content-Length), then POST a fixed, already encoded remote-write body (``BODY_FILE``:
what the relay would send for that page) to the receiver, read the answer, sleep. No
parsing, relaying, encoding, self-telemetry or httpx: what is left is the interpreter, the
event loop and the sockets. process_bench.py runs it beside dcgmrelay and vmagent (``--floor``)
so the relay's cost can be read against the least a Python/asyncio design can spend.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from urllib.parse import urlsplit


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def run(scrape_url: str, write_url: str, body: bytes, interval: float) -> None:
    s, w = urlsplit(scrape_url), urlsplit(write_url)
    get = (f"GET {s.path or '/'} HTTP/1.1\r\nHost: {s.netloc}\r\nUser-Agent: floor/1\r\n"
           f"Accept: text/plain\r\n\r\n").encode()
    post = (f"POST {w.path} HTTP/1.1\r\nHost: {w.netloc}\r\nUser-Agent: floor/1\r\n"
            f"Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n"
            f"X-Prometheus-Remote-Write-Version: 0.1.0\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    sr, sw = await asyncio.open_connection(s.hostname, s.port)
    wr, ww = await asyncio.open_connection(w.hostname, w.port)
    next_t = time.monotonic()
    while True:
        await _exchange(sr, sw, get)
        await _exchange(wr, ww, post)
        next_t += interval
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scrape_url")
    ap.add_argument("write_url")
    ap.add_argument("body_file")
    ap.add_argument("--interval", type=float, default=1.0)
    a = ap.parse_args()
    with open(a.body_file, "rb") as fh:
        body = fh.read()
    asyncio.run(run(a.scrape_url, a.write_url, body, a.interval))


if __name__ == "__main__":
    main()
