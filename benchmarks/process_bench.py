"""Whole-process cost: dcgmrelay vs vmagent, side by side, on the same payloads.

    python benchmarks/process_bench.py [--seconds 30] [--payloads gpu8.prom,gpu1024.prom]

For each payload: serve it on 127.0.0.1 (a separate process, not measured), start
a real VictoriaMetrics as the receiver, then run each relay in turn scraping the
payload every 1 s and shipping by remote write 1.0 (with ``--floor``, floor_agent.py as a
third: the same two HTTP exchanges in plain asyncio, nothing else). After a warm-up, CPU seconds
(user + system, from /proc/<pid>/stat) over the measured window are divided by
the samples scraped in it; peak RSS is VmHWM from /proc/<pid>/status. The table
gives the ratio dcgmrelay / vmagent (lower is better). vmagent comes with
Debian's victoria-metrics package (.ci/install-servers.sh installs it).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from servers import VictoriaMetricsServer  # noqa: E402



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(name: str) -> bytes:
    for p in (HERE / "payloads" / name, HERE / "payloads" / f"{name}.gz"):
        if p.exists():
            data = p.read_bytes()
            return gzip.decompress(data) if p.suffix == ".gz" else data
    raise SystemExit(f"no payload {name}")


def serve(body: bytes, port: int) -> subprocess.Popen:
    """A static exporter in its own process, counting requests (per User-Agent)."""
    tmp = tempfile.NamedTemporaryFile(delete=False, suffix=".prom")
    tmp.write(body)
    tmp.close()
    code = textwrap.dedent(f"""
        import http.server, sys
        body = open({tmp.name!r}, 'rb').read()
        counts = {{}}
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            def do_GET(self):
                if self.path == '/counts':
                    out = repr(counts).encode()
                else:
                    ua = self.headers.get('User-Agent', '').split('/')[0]
                    counts[ua] = counts.get(ua, 0) + 1
                    out = body
                self.send_response(200)
                self.send_header('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')
                self.send_header('Content-Length', str(len(out)))
                self.end_headers()
                self.wfile.write(out)
            def log_message(self, *a):
                pass
        http.server.ThreadingHTTPServer(('127.0.0.1', {port}), H).serve_forever()
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def counts(port: int) -> dict:
    import httpx

    return eval(httpx.get(f"http://127.0.0.1:{port}/counts").text)  # noqa: S307 - our own server's repr


def cpu_seconds(pid: int) -> float:
    """CPU seconds the process has used: the scheduler's nanosecond count summed over its
    live threads (/proc/<pid>/stat's utime+stime tick at 10 ms, too coarse for a few ms a
    second). Both agents keep their threads for their whole life (asyncio's executor
    threads and Go's runtime threads idle rather than exit), so nothing is missed."""
    ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return ns / 1e9


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cmd: list[str], agent: str, port: int, samples_per_scrape: int, warmup: float, seconds: float) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(warmup)
        # the agents run one after the other, so every request in the window is this agent's
        # (vmagent's User-Agent changes once it streams large bodies)
        c0, n0 = cpu_seconds(proc.pid), sum(counts(port).values())
        time.sleep(seconds)
        c1, n1 = cpu_seconds(proc.pid), sum(counts(port).values())
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    scrapes = n1 - n0
    cpu = c1 - c0
    return {"scrapes": scrapes, "cpu_s": cpu, "us_per_sample": cpu / max(1, scrapes * samples_per_scrape) * 1e6,
            "rss_mib": rss}


def steady_rw1_body(body: bytes) -> bytes:
    """The remote write 1.0 body dcgmrelay sends for this page once steady (no metadata)."""
    import dcgmrelay
    from dcgmrelay.csvspec import load_csv
    from dcgmrelay.encode import Encoder
    from dcgmrelay.relay import Relay

    relay, enc = Relay(load_csv("default"), include_non_dcgm=True, first_observation="full"), Encoder("rw1")
    for t in (1000, 2000):
        out, _ = enc.encode(relay.ingest(dcgmrelay.parse(body), target="bench", timestamp_ms=t))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window per run (default 30)")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--payloads", default="gpu8.prom,gpu1024.prom")
    ap.add_argument("--relay-args", default="",
                    help="extra flags for dcgmrelay run, e.g. \"--spool-dir /tmp/spool\" (a write-ahead output)")
    ap.add_argument("--floor", action="store_true",
                    help="also run floor_agent.py: the two HTTP exchanges a cycle in plain asyncio, nothing "
                         "else (the least a Python/asyncio relay can spend)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that runs the relay: e.g. a clean venv where `pip install .` put "
                         "dcgmrelay, to measure what a user gets (default: this one)")
    args = ap.parse_args()
    vmagent = shutil.which("vmagent")
    if vmagent is None:
        raise SystemExit("vmagent not found: run .ci/install-servers.sh")
    import dcgmrelay

    rows = []
    with VictoriaMetricsServer() as vm:
        for name in args.payloads.split(","):
            body = load(name)
            n = len(dcgmrelay.parse(body))
            port = free_port()
            exporter = serve(body, port)
            time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/metrics"
            tmp = Path(tempfile.mkdtemp())
            try:
                ours = measure([args.python, "-m", "dcgmrelay", "run", "--target", url, "--remote-write",
                                vm.remote_write_url, "--interval", "1s", "--timeout", "1s",
                                "--include-non-dcgm", "--listen", f"127.0.0.1:{free_port()}",
                                "--log-level", "warning", *shlex.split(args.relay_args)],
                               "dcgmrelay", port, n, args.warmup, args.seconds)
                (tmp / "scrape.yml").write_text(textwrap.dedent(f"""
                    scrape_configs:
                      - job_name: dcgm
                        scrape_interval: 1s
                        scrape_timeout: 1s
                        static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
                """))
                theirs = measure([vmagent, f"-promscrape.config={tmp / 'scrape.yml'}",
                                  f"-remoteWrite.url={vm.remote_write_url}", f"-remoteWrite.tmpDataPath={tmp / 'q'}",
                                  f"-httpListenAddr=127.0.0.1:{free_port()}", "-loggerLevel=ERROR"],
                                 "vm_promscrape", port, n, args.warmup, args.seconds)
                floor = None
                if args.floor:
                    (tmp / "rw1.bin").write_bytes(steady_rw1_body(body))
                    floor = measure([args.python, str(HERE / "floor_agent.py"), url, vm.remote_write_url,
                                     str(tmp / "rw1.bin")], "floor", port, n, args.warmup, args.seconds)
            finally:
                exporter.terminate()
                shutil.rmtree(tmp, ignore_errors=True)
            rows.append((name, n, ours, theirs, floor))
    print(f"\nwhole process, 1 s scrape interval, remote write 1.0 into VictoriaMetrics, {args.seconds:.0f} s window")
    print(f"{'payload':<16} {'samples':>8} {'agent':<10} {'scrapes':>7} {'CPU s':>7} {'µs/sample':>10} "
          f"{'peak RSS MiB':>13} {'CPU ratio':>10} {'RSS ratio':>10}")
    for name, n, ours, theirs, floor in rows:
        agents = [("dcgmrelay", ours), ("vmagent", theirs)] + ([("floor", floor)] if floor else [])
        for agent, r in agents:
            ratio = (f"{r['us_per_sample'] / theirs['us_per_sample']:.2f}x" if agent != "vmagent" else "")
            rss = f"{r['rss_mib'] / theirs['rss_mib']:.2f}x" if agent != "vmagent" else ""
            print(f"{name:<16} {n:>8} {agent:<10} {r['scrapes']:>7} {r['cpu_s']:>7.2f} {r['us_per_sample']:>10.2f} "
                  f"{r['rss_mib']:>13.1f} {ratio:>10} {rss:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
