"""Memory and timing under load: 1,000 simulated 8-GPU exporters → one relay → VictoriaMetrics.

    python benchmarks/scale.py [--targets 1000] [--gpus 8] [--interval 15s] [--seconds N] [--out docs/scale.md]

Starts, on 127.0.0.1:

* an exporter farm in its own process(es) (``--exporter-procs``): one listening port per
  simulated node, as real exporters are (one connection each). Every node's body is a
  precomputed template of a :class:`~dcgmrelay.simulate.SimulatedNode` with a few value
  snapshots rotated per request, and its counters rising on every request, so each scrape
  differs from the last and the relay's deltas do real work while serving costs little.
  The farm logs when each node was scraped;
* a real VictoriaMetrics (``tests/servers.py``);
* the real relay process, ``python -m dcgmrelay run --config ...`` with every node as a
  static target, remote write 1.0 into VictoriaMetrics.

After a warm-up (one interval plus the start) it measures for ``--seconds``, with nothing
talking to the relay: the gaps between consecutive scrapes of every target (from the farm's
log) and how late each scrape started against its target's phase, scrape durations (the relay's
``scrape_duration_seconds`` series), the relay's CPU (/proc/<pid>/stat) and RSS (VmRSS every
second, and VmHWM), samples relayed per second (those with timestamps in the window that
arrived in VictoriaMetrics). After the window it times one GET of the relay's own /metrics
(scrapes ok/failed, batches dropped/spooled), stops the relay (SIGTERM: flushes) and checks
VictoriaMetrics against what the farm served: for every target, every energy counter holds
exactly the values served, in order, nothing missing or doubled, and the DCGM sample count is
200 per relayed scrape. ``--out`` writes the measured section of the report (docs/scale.md);
``--py-spy FILE`` profiles the relay over the window. ``tests/test_scale.py`` runs a shorter
version through :func:`run_scale` and :func:`problems`.

Raises the soft RLIMIT_NOFILE to the hard limit in the farm and the relay (1,000 targets need
over 1,000 descriptors in each); fails with a message if the hard limit is too low.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import functools
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

TICKS = os.sysconf("SC_CLK_TCK")
#: Value snapshots per node that the farm rotates through.
ROTATE = 4
#: The counter checked value by value in VictoriaMetrics (rises on every request).
CHECK_COUNTER = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
#: Documented bound on the relay's peak RSS (VmHWM) for 1,000 targets × 8 GPUs (docs/scale.md).
RSS_BOUND_MIB = 400


# ------------------------------------------------------------------------------------------
# The exporter farm (its own process)


class NodeBody:
    """One simulated node's ``/metrics`` bodies: a template with a slot per value that changes.

    Request ``n`` gets gauge snapshot ``n % ROTATE`` and counters ``base + n * step``: every
    body differs from the one before, counters only rise, and a body costs one ``%``.
    """

    def __init__(self, index: int, gpus: int) -> None:
        from dcgmrelay import fields
        from dcgmrelay.kinds import Kind, builtin_kind
        from dcgmrelay.simulate import SimulatedNode

        node = SimulatedNode(gpus, seed=index, hostname=f"gpu-node-{index:04d}")
        snaps = [node.render(node.collect_interval * k).decode().split("\n") for k in range(ROTATE)]
        if len({len(s) for s in snaps}) != 1:
            raise RuntimeError(f"node {index}: the simulator's snapshots differ in shape")
        parts: List[str] = []
        gauge_slots: List[List[bytes]] = []  # per slot: one value per snapshot
        counters: List[Tuple[int, int, int]] = []  # (slot, base, step)
        self.samples = 0
        self.check_series: List[Tuple[str, int, int]] = []  # (gpu, base, step) of CHECK_COUNTER
        kinds: Dict[str, Any] = {}
        for lines in zip(*snaps):
            first = lines[0]
            if not first or first.startswith("#"):
                if any(x != first for x in lines):
                    raise RuntimeError(f"node {index}: comment lines differ between snapshots")
                parts.append(first.replace("%", "%%") + "\n")
                continue
            prefix, _, _ = first.rpartition(" ")
            values = [x.rpartition(" ")[2] for x in lines]
            if any(x.rpartition(" ")[0] != prefix for x in lines):
                raise RuntimeError(f"node {index}: series order differs between snapshots at {prefix[:80]}")
            self.samples += 1
            name = prefix.split("{", 1)[0]
            if name not in kinds:
                kinds[name] = builtin_kind(fields.by_name(name).id)
            head = prefix.replace("%", "%%") + " "
            slot = len(gauge_slots) + len(counters)
            if kinds[name] == Kind.COUNTER and all(v.isdigit() for v in values):
                base, step = int(values[0]), max(0, (int(values[-1]) - int(values[0])) // (ROTATE - 1))
                if step:
                    counters.append((slot, base, step))
                    parts.append(head + "%s\n")
                    if name == CHECK_COUNTER:
                        gpu = prefix.split('gpu="', 1)[1].split('"', 1)[0]
                        self.check_series.append((gpu, base, step))
                    continue
            if len(set(values)) == 1:
                parts.append(head + values[0].replace("%", "%%") + "\n")
            else:
                gauge_slots.append([v.encode() for v in values])
                parts.append(head + "%s\n")
        # one slot list: gauges and counters interleaved in body order
        self.template = "".join(parts).rstrip("\n").encode() + b"\n"
        n_slots = len(gauge_slots) + len(counters)
        counter_slots = {c[0] for c in counters}
        order: List[Any] = []
        gi = iter(gauge_slots)
        for s in range(n_slots):
            order.append(None if s in counter_slots else next(gi))
        self._snaps = [[None if o is None else o[r] for o in order] for r in range(ROTATE)]
        self._counters = counters
        if not self.check_series:
            raise RuntimeError(f"node {index}: {CHECK_COUNTER} does not rise in the simulator")

    def render(self, n: int) -> bytes:
        vals = list(self._snaps[n % ROTATE])
        for slot, base, step in self._counters:
            vals[slot] = b"%d" % (base + n * step)
        return self.template % tuple(vals)


class _ExporterProtocol(asyncio.Protocol):
    """A dcgm-exporter's HTTP/1.1 surface: GET /metrics (keep-alive), nothing else."""

    def __init__(self, farm: "_Farm", index: int) -> None:
        self.farm = farm
        self.index = index
        self.buf = b""
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()  # type: ignore[union-attr]
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            close = b"connection: close" in headers.lower()
            if len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = self.farm.serve(self.index)
                status = b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"404 page not found\n", b"404 Not Found", b"text/plain"
            self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"  # type: ignore[union-attr]
                                 % (status, ctype, len(body), b"Connection: close\r\n" if close else b""))
            self.transport.write(body)  # type: ignore[union-attr]
            if close:
                self.transport.close()  # type: ignore[union-attr]
                return


class _Farm:
    def __init__(self, first: int, count: int, gpus: int) -> None:
        self.first = first
        self.nodes = [NodeBody(first + i, gpus) for i in range(count)]
        self.times: List[List[float]] = [[] for _ in range(count)]

    def serve(self, index: int) -> bytes:
        log = self.times[index]
        log.append(time.time())  # wall clock: comparable with the relay's sample timestamps
        return self.nodes[index].render(len(log) - 1)


async def _farm_main(first: int, count: int, gpus: int, log_path: str) -> None:
    farm = _Farm(first, count, gpus)
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(count):
        servers.append(await loop.create_server(functools.partial(_ExporterProtocol, farm, i), "127.0.0.1", 0,
                                                backlog=128))
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(json.dumps({"ports": ports, "samples": [n.samples for n in farm.nodes]}), flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    out = {"first": first, "times": farm.times,
           "check": [n.check_series for n in farm.nodes], "samples": [n.samples for n in farm.nodes]}
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, log_path)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child when the driver dies (a killed test leaves no farm or relay behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def raise_nofile(need: int, who: str) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; SystemExit when even that is below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"{who}: needs {need} file descriptors, the hard RLIMIT_NOFILE is {hard} "
                         f"(raise it: ulimit -Hn, or fewer --targets)")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _farm_cli(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="scale.py --farm")
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    raise_nofile(2 * a.count + 64, "exporter farm")
    asyncio.run(_farm_main(a.first, a.count, a.gpus, a.log))
    return 0


class Farm:
    """The exporter farm, in ``procs`` processes; ``stop()`` returns the merged request log."""

    def __init__(self, targets: int, gpus: int, procs: int = 1) -> None:
        self.targets, self.gpus, self.procs = targets, gpus, max(1, min(procs, targets))
        self.dir = tempfile.mkdtemp(prefix="dcgmrelay-scale-farm-")
        self._procs: List[Tuple["subprocess.Popen[str]", str]] = []
        self.ports: List[int] = []
        self.samples: List[int] = []

    def start(self, timeout_s: float = 120.0) -> "Farm":
        per = math.ceil(self.targets / self.procs)
        for p in range(self.procs):
            first, count = p * per, min(per, self.targets - p * per)
            if count <= 0:
                break
            log = os.path.join(self.dir, f"farm{p}.json")
            proc = subprocess.Popen([sys.executable, __file__, "--farm", "--first", str(first), "--count", str(count),
                                     "--gpus", str(self.gpus), "--log", log],
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                    preexec_fn=_die_with_parent)
            self._procs.append((proc, log))
        deadline = time.monotonic() + timeout_s
        for proc, _ in self._procs:
            line = _readline(proc, deadline)
            if not line:
                self.stop()
                raise RuntimeError(f"exporter farm exited with {proc.poll()} before listening")
            info = json.loads(line)
            self.ports += info["ports"]
            self.samples += info["samples"]
        return self

    @property
    def pids(self) -> List[int]:
        return [p.pid for p, _ in self._procs]

    def stop(self) -> Dict[str, Any]:
        """Stop every farm process; the merged log ``{times, check, samples}`` by node index."""
        merged: Dict[str, Any] = {"times": [], "check": [], "samples": []}
        for proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        missing = [f"{log} (exit status {proc.returncode})" for proc, log in self._procs if not os.path.exists(log)]
        try:
            if missing:
                raise RuntimeError(f"exporter farm process(es) wrote no request log: {', '.join(missing)}")
            for _, log in self._procs:
                with open(log) as f:
                    part = json.load(f)
                for k in merged:
                    merged[k] += part[k]
        finally:
            self._procs = []
            shutil.rmtree(self.dir, ignore_errors=True)
        return merged


def _readline(proc: "subprocess.Popen[str]", deadline: float) -> str:
    box: List[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    return box[0] if box else ""


# ------------------------------------------------------------------------------------------
# Measuring the relay


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICKS  # utime + stime


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


class RssSampler(threading.Thread):
    """VmRSS of a process every ``every_s`` seconds (from outside: costs the process nothing)."""

    def __init__(self, pid: int, t0: float, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.every_s = pid, t0, every_s
        self.samples: List[Tuple[float, float]] = []  # (seconds since t0, MiB)
        self.cpu: List[Tuple[float, float]] = []  # (seconds since t0, CPU seconds used so far)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                t = time.time() - self.t0
                self.samples.append((t, proc_status_kib(self.pid, "VmRSS") / 1024))
                self.cpu.append((t, cpu_seconds(self.pid)))
            except (OSError, RuntimeError):
                return
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


Metrics = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def _metric_sum(m: Metrics, name: str, **match: str) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in match.items()))


def _q(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class ScaleResult:
    targets: int
    gpus: int
    interval_s: float
    timeout_s: float
    window_s: float
    output_options: Dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock: the relay was started
    ready_at: float = 0.0  # /readyz answered
    window: Tuple[float, float] = (0.0, 0.0)  # the measured window (wall clock)
    stop_at: float = 0.0  # SIGTERM sent
    relay_exit: Optional[int] = None
    relay_log: str = ""
    # scrape timing, from the farm's log
    first_scrape_after_ready_max_s: float = 0.0
    missed: Dict[int, int] = field(default_factory=dict)  # node -> missed intervals after its first scrape (-1: none)
    tail_missing: Dict[int, float] = field(default_factory=dict)  # node -> seconds from last scrape to stop
    scrapes_served: int = 0
    samples_served: int = 0
    gaps: List[float] = field(default_factory=list)  # between consecutive scrapes, ending in the window
    lateness: List[float] = field(default_factory=list)  # start vs the target's usual phase, in the window
    scrapes_in_window: List[int] = field(default_factory=list)
    # one GET of the relay's /metrics, after the window
    metrics_get_s: float = 0.0
    metrics_bytes: int = 0
    metrics_late_max_s: float = 0.0  # the latest scrape start while (and just after) it was served
    scrapes_ok: float = 0.0
    scrapes_failed: float = 0.0
    batches_dropped: float = 0.0
    dropped_by: Dict[str, float] = field(default_factory=dict)  # reason -> batches
    spooled: float = 0.0
    retries: float = 0.0
    # from /proc
    cpu_window_s: float = 0.0
    farm_cpu_window_s: float = 0.0
    vm_cpu_window_s: float = 0.0
    rss: List[Tuple[float, float]] = field(default_factory=list)  # (s since start, VmRSS MiB)
    cpu: List[Tuple[float, float]] = field(default_factory=list)  # (s since start, relay CPU s so far)
    rss_hwm_mib: float = 0.0
    # from VictoriaMetrics
    scrape_durations: List[float] = field(default_factory=list)  # the relay's scrape_duration_seconds, in the window
    vm_window_samples: int = 0  # samples with timestamps in the window
    vm_dcgm_samples: int = 0
    vm_problems: List[str] = field(default_factory=list)
    machine: Dict[str, str] = field(default_factory=dict)

    @property
    def relay_cpu_cores(self) -> float:
        return self.cpu_window_s / self.window_s if self.window_s else float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.vm_window_samples / self.window_s if self.window_s else float("nan")

    def rss_between(self, a: float, b: float) -> List[float]:
        """VmRSS samples (MiB) between two wall-clock times."""
        return [m for t, m in self.rss if a <= self.started_at + t <= b]


def _config_text(ports: Sequence[int], interval_s: float, timeout_s: float, rw_url: str, listen: str,
                 output_options: Dict[str, Any]) -> str:
    # JSON is YAML: no quoting questions for 1,000 endpoints
    cfg = {
        "global": {"interval": f"{interval_s:g}s", "timeout": f"{timeout_s:g}s"},
        "targets": [{"name": "scale", "endpoints": [{"url": f"http://127.0.0.1:{p}/metrics"} for p in ports]}],
        "outputs": [{"name": "vm", "type": "remote-write", "url": rw_url, **output_options}],
        "csv": "default",
        "listen": listen,
        "logging": {"level": "warning"},
    }
    return json.dumps(cfg, indent=1)


def _relay_preexec(need: int) -> None:  # pragma: no cover - runs in the child
    _die_with_parent()
    raise_nofile(need, "relay")


def _check_nofile(need: int, who: str) -> None:
    """Fail early, with the numbers, when the hard limit that children inherit is too low."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RuntimeError(f"{who} needs {need} file descriptors, the hard RLIMIT_NOFILE is {hard} "
                           f"(raise it with ulimit -Hn, or use fewer targets or more --exporter-procs)")


def machine_info() -> Dict[str, str]:
    cpu = "?"
    mem = float("nan")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        load = "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        load = "?"
    return {"cpus": str(os.cpu_count()), "cpu": cpu, "memory": f"{mem:.0f} GiB", "python": platform.python_version(),
            "kernel": platform.release(), "load": load,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_scale(targets: int = 1000, gpus: int = 8, interval_s: float = 15.0, seconds: Optional[float] = None,
              intervals: int = 4, timeout_s: Optional[float] = None, exporter_procs: int = 1,
              output_options: Optional[Dict[str, Any]] = None, py_spy: Optional[str] = None,
              log: Any = None) -> ScaleResult:
    """Run farm → relay → VictoriaMetrics and measure. The window is ``seconds`` (default
    ``intervals`` × interval) after a warm-up of one interval plus the relay's start.
    ``output_options`` are settings of the remote-write output (``max_samples_per_batch``, ...);
    ``py_spy`` a file for the relay's collapsed stacks over the window."""
    import httpx

    from servers import VictoriaMetricsServer, free_port, require_binaries

    say = log or (lambda msg: None)
    reason = require_binaries("victoria-metrics")  # raises in CI
    if reason:
        raise RuntimeError(reason)
    window_s = float(seconds) if seconds else intervals * interval_s
    timeout_s = min(timeout_s or min(10.0, interval_s), interval_s)
    res = ScaleResult(targets, gpus, interval_s, timeout_s, window_s, dict(output_options or {}),
                      machine=machine_info())
    _check_nofile(targets + 256, "the relay")
    _check_nofile(2 * math.ceil(targets / max(1, exporter_procs)) + 64, "an exporter farm process")
    t_setup = time.monotonic()
    with VictoriaMetricsServer(extra_args=["-search.maxUniqueTimeseries=10000000",
                                           "-search.maxSamplesPerQuery=10000000000"]) as vm:
        say(f"VictoriaMetrics on {vm.url}; starting {targets} exporters of {gpus} GPUs")
        farm = Farm(targets, gpus, exporter_procs).start()
        say(f"exporters listening ({time.monotonic() - t_setup:.1f}s); starting the relay")
        tmp = Path(tempfile.mkdtemp(prefix="dcgmrelay-scale-"))
        listen = f"127.0.0.1:{free_port()}"
        (tmp / "relay.yaml").write_text(_config_text(farm.ports, interval_s, timeout_s, vm.remote_write_url, listen,
                                                     res.output_options))
        err = open(tmp / "relay.log", "w+")
        relay_url = f"http://{listen}"
        relay: Optional["subprocess.Popen[bytes]"] = None
        spy: Optional["subprocess.Popen[bytes]"] = None
        log_data: Dict[str, Any] = {}
        try:
            res.started_at = time.time()
            relay = subprocess.Popen([sys.executable, "-m", "dcgmrelay", "run", "--config", str(tmp / "relay.yaml")],
                                     stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: _relay_preexec(targets + 256))
            sampler = RssSampler(relay.pid, res.started_at)
            sampler.start()
            deadline = time.monotonic() + 60
            while True:
                if relay.poll() is not None:
                    raise RuntimeError(f"relay exited with {relay.returncode}: {_tail(err)}")
                try:
                    if httpx.get(relay_url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay not ready after 60 s: {_tail(err)}")
                time.sleep(0.1)
            res.ready_at = time.time()
            say(f"relay ready; warm-up {interval_s + 1:g}s, then a {window_s:g}s window")
            time.sleep(interval_s + 1.0)
            pids = {"relay": relay.pid, "farm": farm.pids, "vm": vm._proc.pid if vm._proc else None}
            if py_spy:
                # collapsed stacks of the relay over the window, sampled without stopping it
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(relay.pid), "--rate", "100", "--nonblocking",
                                        "--format", "raw", "-o", py_spy, "--duration", str(int(window_s) + 30)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # nothing talks to the relay in the window: its own /metrics is read after it
            c0 = _cpus(pids)
            w0 = time.time()
            time.sleep(window_s)
            w1 = time.time()
            c1 = _cpus(pids)
            res.window = (w0, w1)
            res.window_s = w1 - w0
            res.cpu_window_s = c1["relay"] - c0["relay"]
            res.farm_cpu_window_s = c1["farm"] - c0["farm"]
            res.vm_cpu_window_s = c1["vm"] - c0["vm"]
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(30)
            say(f"window done: relay CPU {res.relay_cpu_cores:.2f} of a core; reading its /metrics")
            m1 = _probe_metrics(res, relay_url)
            res.scrapes_ok = _metric_sum(m1, "dcgmrelay_scrapes_total", result="ok")
            res.scrapes_failed = _metric_sum(m1, "dcgmrelay_scrapes_total", result="failed")
            res.batches_dropped = _metric_sum(m1, "dcgmrelay_output_batches_dropped_total")
            res.dropped_by = {dict(lab).get("reason", ""): v for (n, lab), v in m1.items()
                              if n == "dcgmrelay_output_batches_dropped_total" and v}
            res.spooled = _metric_sum(m1, "dcgmrelay_output_spooled_batches_total")
            res.retries = _metric_sum(m1, "dcgmrelay_output_retries_total")
            time.sleep(2.0)  # scrapes the GET delayed are in the farm's log before the stop
            res.rss_hwm_mib = proc_status_kib(relay.pid, "VmHWM") / 1024
            res.stop_at = time.time()
            relay.send_signal(signal.SIGTERM)
            try:
                res.relay_exit = relay.wait(60)
            except subprocess.TimeoutExpired:
                relay.kill()
                res.relay_exit = relay.wait(10)
            sampler.stop()
            res.rss, res.cpu = sampler.samples, sampler.cpu
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            if relay is not None and relay.poll() is None:
                relay.kill()
                relay.wait(10)
            res.relay_log = _tail(err, 4000)
            err.close()
            shutil.rmtree(tmp, ignore_errors=True)
            log_data = farm.stop()
        _timing(res, log_data)
        say("checking VictoriaMetrics against what was served")
        _check_vm(res, vm, log_data, farm.ports)
    return res


def _probe_metrics(res: ScaleResult, relay_url: str) -> Metrics:
    """One GET of the relay's /metrics, timed: what a Prometheus scraping the relay costs it."""
    import httpx

    import dcgmrelay

    t0 = time.time()
    body = httpx.get(relay_url + "/metrics", timeout=60, trust_env=False).content
    res.metrics_get_s = time.time() - t0
    res.metrics_bytes = len(body)
    s = dcgmrelay.parse(body)
    return {(n, tuple(sorted(lab.items()))): v for n, lab, v, _ in s.samples()}


def _cpus(pids: Dict[str, Any]) -> Dict[str, float]:
    out = {"relay": cpu_seconds(pids["relay"]), "farm": sum(cpu_seconds(p) for p in pids["farm"])}
    out["vm"] = cpu_seconds(pids["vm"]) if pids["vm"] else 0.0
    return out


def _tail(f: Any, n: int = 2000) -> str:
    f.flush()
    f.seek(0)
    return str(f.read()[-n:])


def _timing(res: ScaleResult, log: Dict[str, Any]) -> None:
    """Scrape regularity from the farm's log (wall-clock request times per node)."""
    iv = res.interval_s
    w0, w1 = res.window
    probe = (w1, res.stop_at)
    firsts = []
    probe_late = [0.0]
    for node, times in enumerate(log["times"]):
        res.scrapes_served += len(times)
        res.samples_served += len(times) * log["samples"][node]
        res.scrapes_in_window.append(sum(1 for t in times if w0 <= t < w1))
        if not times:
            res.missed[node] = -1
            continue
        firsts.append(times[0] - res.ready_at)
        missed = 0
        for a, b in zip(times, times[1:]):
            missed += max(0, round((b - a) / iv) - 1)
            if w0 <= b < w1:
                res.gaps.append(b - a)
        if missed:
            res.missed[node] = missed
        if res.stop_at - times[-1] > 1.5 * iv:
            res.tail_missing[node] = res.stop_at - times[-1]
        # the target's phase: the median offset of its scrapes from its first, modulo the interval
        dev = [((t - times[0] + iv / 2) % iv) - iv / 2 for t in times]
        phase = sorted(dev)[len(dev) // 2]
        for t, d in zip(times, dev):
            if w0 <= t < w1:
                res.lateness.append(d - phase)
            elif probe[0] <= t <= probe[1]:
                probe_late.append(d - phase)
    res.metrics_late_max_s = max(probe_late)
    res.first_scrape_after_ready_max_s = max(firsts) if firsts else float("nan")


def _check_vm(res: ScaleResult, vm: Any, log: Dict[str, Any], ports: Sequence[int]) -> None:
    """Every target: the checked counter holds exactly what was served, in order; the DCGM
    sample count is the per-scrape count times the scrapes relayed; scrape durations."""
    probs = res.vm_problems
    instance_node = {f"127.0.0.1:{p}": i for i, p in enumerate(ports)}
    # read a minute ahead: at "now" VictoriaMetrics leaves out the newest samples
    at = time.time() + 60
    got: Dict[Tuple[int, str], List[Tuple[int, Optional[float]]]] = {}
    for row in vm.export(CHECK_COUNTER, start=int(res.started_at) - 5, end=at):
        m = row["metric"]
        node = instance_node.get(m.get("instance", ""))
        if node is None:
            probs.append(f"{CHECK_COUNTER} from an unknown instance {m.get('instance')!r}")
            continue
        got[(node, m.get("gpu", ""))] = sorted(zip(row["timestamps"], row["values"]))
    relayed: Dict[int, int] = {}
    lost_scrapes = lost_targets = 0
    for node, times in enumerate(log["times"]):
        # a scrape served in the last second before SIGTERM may be cut by the shutdown
        must = sum(1 for t in times if t < res.stop_at - 1.0)
        msgs: Dict[str, List[str]] = {}  # problem -> the GPUs that have it
        lost = 0
        for gpu, base, step in log["check"][node]:
            series = got.get((node, gpu))
            if series is None:
                msgs.setdefault(f"no {CHECK_COUNTER} in VictoriaMetrics", []).append(gpu)
                lost = max(lost, must)
                continue
            stale = [n for n, (_, v) in enumerate(series) if v is None]  # a stale marker is exported as null
            if stale:
                msgs.setdefault(f"{len(stale)} stale marker(s), the first after {stale[0]} values", []).append(gpu)
            values = [v for _, v in series if v is not None]
            # which request each stored value came from: the counter is base + n × step
            idx = [round((v - base) / step) for v in values]
            bad = [k for k, (v, n) in enumerate(zip(values, idx))
                   if not 0 <= n < len(times) or abs(v - (base + n * step)) > 1e-11 * abs(v) + 1e-6]
            if bad:
                msgs.setdefault(f"stored value #{bad[0]} ({values[bad[0]]!r}) was never served ({len(bad)} such)",
                                []).append(gpu)
            elif idx != sorted(set(idx)):
                msgs.setdefault(f"values stored twice or out of order (requests {idx[:12]})", []).append(gpu)
            missing = sorted(set(range(must)) - set(idx))
            if missing:
                when = ", ".join(f"#{n} at +{times[n] - res.started_at:.1f}s" for n in missing[:4])
                msgs.setdefault(f"{len(missing)} of {must} scrapes served before the shutdown are not in "
                                f"VictoriaMetrics: {when}{' ...' if len(missing) > 4 else ''}", []).append(gpu)
                lost = max(lost, len(missing))
            relayed[node] = len(values)
        if lost:
            lost_scrapes += lost
            lost_targets += 1
        for msg, gpus in msgs.items():
            probs.append(f"node {node} (127.0.0.1:{ports[node]}) GPU {','.join(gpus)}: {msg}")
    if lost_scrapes:
        probs.insert(0, f"{lost_scrapes} scrape(s) of {lost_targets} target(s) served but not in VictoriaMetrics")
    # every target's DCGM sample count: exactly samples-per-scrape × scrapes relayed
    span = int(at - res.started_at) + 60
    counts = {}
    for row in vm.query(f'sum by (instance) (count_over_time({{__name__=~"DCGM_.+"}}[{span}s]))', time=at):
        counts[row["metric"].get("instance", "")] = int(float(row["value"][1]))
    res.vm_dcgm_samples = sum(counts.values())
    for inst, node in instance_node.items():
        want = log["samples"][node] * relayed.get(node, 0)
        if counts.get(inst, 0) != want:
            probs.append(f"node {node} ({inst}): {counts.get(inst, 0)} DCGM samples in VictoriaMetrics, "
                         f"{want} served in the {relayed.get(node, 0)} scrapes relayed")
    if len(probs) > 20:
        n = len(probs)
        del probs[20:]
        probs.append(f"... ({n - 20} more)")
    w0, w1 = res.window
    rows = vm.query(f'sum(count_over_time({{job="scale"}}[{max(1, round(w1 - w0))}s]))', time=w1)
    res.vm_window_samples = int(float(rows[0]["value"][1])) if rows else 0
    for row in vm.export("scrape_duration_seconds", start=int(res.started_at) - 5, end=at):
        res.scrape_durations.extend(float(v) for t, v in zip(row["timestamps"], row["values"])
                                    if v is not None and w0 <= t / 1000 < w1)


def problems(res: ScaleResult, rss_bound_mib: float = RSS_BOUND_MIB) -> List[str]:
    """What went wrong, if anything: missed intervals, failures, losses, RSS over the bound."""
    out: List[str] = []
    if res.relay_exit != 0:
        out.append(f"relay exited with {res.relay_exit}: {res.relay_log[-1500:]}")
    never = [n for n, m in res.missed.items() if m < 0]
    if never:
        out.append(f"{len(never)} target(s) never scraped, e.g. node {never[0]}")
    if res.first_scrape_after_ready_max_s > res.interval_s + 1.0:
        out.append(f"a target's first scrape came {res.first_scrape_after_ready_max_s:.2f}s after the relay was "
                   f"ready (interval {res.interval_s:g}s)")
    missed = {n: m for n, m in res.missed.items() if m > 0}
    if missed:
        worst = max(missed, key=lambda n: missed[n])
        out.append(f"{sum(missed.values())} missed interval(s) on {len(missed)} target(s); node {worst}: "
                   f"{missed[worst]} (interval {res.interval_s:g}s)")
    if res.tail_missing:
        n = next(iter(res.tail_missing))
        out.append(f"{len(res.tail_missing)} target(s) not scraped in their last interval before the stop, "
                   f"e.g. node {n}: {res.tail_missing[n]:.2f}s")
    if res.scrapes_failed:
        out.append(f"{res.scrapes_failed:g} failed scrape(s) in the relay's /metrics")
    if res.batches_dropped or res.spooled:
        out.append(f"the output dropped {res.batches_dropped:g} batch(es) (by reason: {res.dropped_by}) and "
                   f"spooled {res.spooled:g}")
    if not res.rss_hwm_mib or res.rss_hwm_mib > rss_bound_mib:
        out.append(f"relay peak RSS (VmHWM) {res.rss_hwm_mib:.1f} MiB exceeds the bound of {rss_bound_mib:g} MiB")
    out.extend(res.vm_problems)
    return out


# ------------------------------------------------------------------------------------------
# The report


def summary(res: ScaleResult) -> Dict[str, Any]:
    gaps, late, durs = res.gaps, res.lateness, res.scrape_durations
    w0, w1 = res.window
    first = res.rss_between(res.started_at, res.ready_at + res.interval_s)
    in_window = res.rss_between(w0, w1)
    # second quarter to last: RSS is still settling for an interval or two after the warm-up
    q = len(in_window) // 4
    growth = ((_mean(in_window[3 * q:]) - _mean(in_window[q:2 * q])) / ((w1 - w0) / 2) * 60
              if q >= 2 else float("nan"))
    return {
        "targets": res.targets, "gpus": res.gpus, "interval_s": res.interval_s, "window_s": round(res.window_s, 1),
        "output_options": res.output_options,
        "scrapes_served": res.scrapes_served, "samples_served": res.samples_served,
        "scrapes_per_target_in_window": [min(res.scrapes_in_window), max(res.scrapes_in_window)]
        if res.scrapes_in_window else [0, 0],
        "missed_intervals": sum(m for m in res.missed.values() if m > 0),
        "first_scrape_max_s": res.first_scrape_after_ready_max_s,
        "gap_mean_s": _mean(gaps), "gap_p99_s": _q(gaps, 0.99), "gap_max_s": max(gaps, default=float("nan")),
        "late_p50_s": _q(late, 0.5), "late_p99_s": _q(late, 0.99), "late_max_s": max(late, default=float("nan")),
        "scrape_duration_mean_s": _mean(durs), "scrape_duration_p50_s": _q(durs, 0.5),
        "scrape_duration_p99_s": _q(durs, 0.99), "scrape_duration_max_s": max(durs, default=float("nan")),
        "scrapes_ok": res.scrapes_ok, "scrapes_failed": res.scrapes_failed,
        "batches_dropped": res.batches_dropped, "batches_spooled": res.spooled, "retries": res.retries,
        "samples_per_s": res.samples_per_s,
        "relay_cpu_cores": res.relay_cpu_cores,
        "cpu_us_per_sample": res.cpu_window_s / res.vm_window_samples * 1e6 if res.vm_window_samples else float("nan"),
        "farm_cpu_cores": res.farm_cpu_window_s / res.window_s, "vm_cpu_cores": res.vm_cpu_window_s / res.window_s,
        "rss_first_interval_max_mib": max(first, default=float("nan")),
        "rss_window_min_mib": min(in_window, default=float("nan")),
        "rss_window_max_mib": max(in_window, default=float("nan")),
        "rss_window_growth_mib_per_min": growth,
        "rss_hwm_mib": res.rss_hwm_mib,
        "metrics_get_s": res.metrics_get_s, "metrics_bytes": res.metrics_bytes,
        "metrics_late_max_s": res.metrics_late_max_s,
        "vm_dcgm_samples": res.vm_dcgm_samples,
    }


BEGIN, END = "<!-- scale.py: begin -->", "<!-- scale.py: end -->"


def _ms(seconds: float) -> str:
    """Signed milliseconds, no "-0"."""
    v = round(seconds * 1e3)
    return f"{v:+d}" if v else "0"


def report_markdown(res: ScaleResult, rerun: str, probs: Sequence[str], rss_bound_mib: float) -> str:
    """The measured part of docs/scale.md (between the BEGIN/END markers)."""
    s = summary(res)
    mc = res.machine
    step = max(1, len(res.rss) // 12)
    rss_line = ", ".join(f"{t:.0f} s: {m:.0f}" for t, m in res.rss[::step])
    opts = ", ".join(f"`{k}: {v}`" for k, v in res.output_options.items()) or "defaults"
    lo, hi = s["scrapes_per_target_in_window"]
    lines = [
        BEGIN,
        f"Measured {mc.get('date')} with `{rerun}` on {mc.get('cpus')} CPUs ({mc.get('cpu')}), {mc.get('memory')}, "
        f"Linux {mc.get('kernel')}, Python {mc.get('python')}; load average at the start {mc.get('load')} (other "
        f"work shared the CPUs). {res.targets:,} targets × {res.gpus} GPUs, interval {res.interval_s:g} s, timeout "
        f"{res.timeout_s:g} s, output settings: {opts}; window {s['window_s']:g} s after a warm-up of one interval.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| scrapes / samples served (whole run) | {s['scrapes_served']:,} / {s['samples_served']:,} |",
        f"| scrapes per target in the window | {lo}–{hi} |",
        f"| missed intervals (after each target's first scrape) | {s['missed_intervals']} |",
        f"| first scrape of a target after the relay was ready, latest | {s['first_scrape_max_s']:.2f} s |",
        f"| gap between scrapes of a target: mean / p99 / max | {s['gap_mean_s']:.3f} / {s['gap_p99_s']:.3f} / "
        f"{s['gap_max_s']:.3f} s |",
        f"| scrape start vs the target's phase: p50 / p99 / max | {_ms(s['late_p50_s'])} / "
        f"{_ms(s['late_p99_s'])} / {_ms(s['late_max_s'])} ms |",
        f"| scrape duration (fetch + parse): mean / p50 / p99 / max | {s['scrape_duration_mean_s'] * 1e3:.1f} / "
        f"{s['scrape_duration_p50_s'] * 1e3:.1f} / {s['scrape_duration_p99_s'] * 1e3:.1f} / "
        f"{s['scrape_duration_max_s'] * 1e3:.1f} ms |",
        f"| scrapes ok / failed (relay's /metrics, whole run) | {s['scrapes_ok']:,.0f} / {s['scrapes_failed']:,.0f} |",
        f"| output batches dropped / spooled / retried | {s['batches_dropped']:,.0f} / {s['batches_spooled']:,.0f} / "
        f"{s['retries']:,.0f} |",
        f"| samples relayed per second (arrived in VictoriaMetrics) | {s['samples_per_s']:,.0f} |",
        f"| relay CPU | {s['relay_cpu_cores']:.2f} of a core, {s['cpu_us_per_sample']:.1f} µs per sample |",
        f"| exporter farm / VictoriaMetrics CPU | {s['farm_cpu_cores']:.2f} / {s['vm_cpu_cores']:.2f} of a core |",
        f"| relay RSS: first interval max / window min–max / growth, window's 2nd quarter to its end | "
        f"{s['rss_first_interval_max_mib']:.0f} / {s['rss_window_min_mib']:.0f}–{s['rss_window_max_mib']:.0f} MiB / "
        f"{s['rss_window_growth_mib_per_min']:+.2f} MiB/min |",
        f"| relay peak RSS (VmHWM) | **{s['rss_hwm_mib']:.0f} MiB** (bound {rss_bound_mib:g} MiB) |",
        f"| one GET of the relay's /metrics: time / size / latest scrape start meanwhile | {s['metrics_get_s']:.2f} s / "
        f"{s['metrics_bytes'] / 2**20:.1f} MiB / {_ms(s['metrics_late_max_s'])} ms |",
        "",
        f"Relay RSS over the run (s since start: MiB): {rss_line}.",
        "",
        "Checks: " + ("passed (every target scraped every interval from its first scrape on, no failed scrape, "
                      "nothing dropped or spooled, every energy counter in VictoriaMetrics holds exactly the values "
                      "served, in order, every target's DCGM sample count is its samples per scrape × its scrapes "
                      f"relayed, peak RSS within {rss_bound_mib:g} MiB)."
                      if not probs else "**failed**:\n\n" + "\n".join(f"- {p}" for p in probs)),
        END,
    ]
    return "\n".join(lines) + "\n"


def write_report(path: str, section: str) -> None:
    """Replace the measured section of ``path`` (between the markers), keeping the rest."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = (text + "\n" if text else "# Scale: 1,000 targets of 8 GPUs\n\n") + section
    p.write_text(text)


def _options(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--output-option {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--farm"]:
        return _farm_cli(argv[1:])
    from dcgmrelay.config import parse_duration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--interval", default="15s", help="scrape interval (default 15s)")
    ap.add_argument("--timeout", default=None, help="scrape timeout (default min(10s, interval))")
    ap.add_argument("--seconds", type=float, default=None,
                    help="measured window after the warm-up (default 4 intervals)")
    ap.add_argument("--exporter-procs", type=int, default=1, help="processes for the exporter farm (default 1)")
    ap.add_argument("--output-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the remote-write output, e.g. max_samples_per_batch=10000 (repeatable)")
    ap.add_argument("--rss-bound", type=float, default=RSS_BOUND_MIB, help="MiB (default %(default)s)")
    ap.add_argument("--py-spy", default=None, metavar="FILE",
                    help="record the relay over the window with py-spy (collapsed stacks)")
    ap.add_argument("--out", default=None,
                    help="write the report's measured section into this Markdown file (e.g. docs/scale.md)")
    ap.add_argument("--json", default=None, help="write the figures, the RSS and CPU series and the problems here")
    a = ap.parse_args(argv)
    res = run_scale(a.targets, a.gpus, parse_duration(a.interval), a.seconds,
                    timeout_s=parse_duration(a.timeout) if a.timeout else None, exporter_procs=a.exporter_procs,
                    output_options=_options(a.output_option), py_spy=a.py_spy,
                    log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    probs = problems(res, a.rss_bound)
    s = summary(res)
    for k, v in s.items():
        print(f"{k:<34} {v:.4g}" if isinstance(v, float) else f"{k:<34} {v}")
    print("checks: " + ("ok" if not probs else "FAILED"))
    for p in probs:
        print("  - " + p)
    if a.out:
        shown = [x for x, prev in zip(argv, [""] + argv) if x != "--json" and prev != "--json"]
        write_report(a.out, report_markdown(res, "python benchmarks/scale.py " + " ".join(shown), probs, a.rss_bound))
        print(f"report written to {a.out}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": s, "problems": probs, "rss": res.rss, "cpu": res.cpu,
                                            "relay_log_tail": res.relay_log, "machine": res.machine}, indent=1))
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())
