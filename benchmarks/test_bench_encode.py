"""Encode + compress throughput and bytes per sample of every wire format, same run.

The batches are relayed (``Relay(load_csv("default"))``, cumulative) from the recorded
payloads ``gpu8.prom`` and ``gpu1024.prom.gz``. Per format and payload:

* ``<format>``: a warm :class:`~dcgmrelay.encode.Encoder` (per-series caches filled, the
  compact stream's dictionaries sent) encoding the batch again: the steady state of a relay
  that scrapes the same exporter;
* ``<format> cold``: ``encode(batch, fmt)`` with a fresh encoder each time (every series
  new; compact: full dictionaries);
* ``<format> py``: the warm encoder on the pure-Python loops (``DCGMRELAY_NO_EXTENSIONS``).

``extra_info``: ``payload`` (``gpu8:<format>``, so the summary of benchmarks/conftest.py
computes MB/s from this format's body), ``bytes`` (body size), ``samples``, ``impl``, and
``bytes_per_sample``. Compact's warm body is a scrape with the *same* values (what
dcgm-exporter serves between its 30 s collections); the module's own summary at the end
also gives compact's size for the next scrape with new values (``SimulatedNode`` of the
same seed rendered 15 and 30 s later), next to remote write's, side by side.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

import dcgmrelay
from dcgmrelay.csvspec import load_csv
from dcgmrelay.encode import Encoder, encode
from dcgmrelay.relay import Relay
from dcgmrelay.simulate import SimulatedNode

from conftest import load_payload

FORMATS = ["compact", "remote-write-1", "remote-write-2", "prometheus", "openmetrics"]
SHORT = {"compact": "compact", "remote-write-1": "rw1", "remote-write-2": "rw2", "prometheus": "text",
         "openmetrics": "om"}
# payload -> (file, the simulator that recorded it: tools/gen_payloads.py)
PAYLOADS = {
    "gpu8": ("gpu8.prom", lambda: SimulatedNode(8, pods="some", xid=True)),
    "gpu1024": ("gpu1024.prom", lambda: SimulatedNode(1024, pods="some", xid=True, seed=1024)),
}
T0 = 1_700_000_000_000

_batches: Dict[str, Any] = {}
_results: List[Tuple[str, str, str, float, int, int]] = []  # payload, format, variant, median s, bytes, samples


def batch_of(name: str) -> Any:
    if name not in _batches:
        relay = Relay(load_csv("default"))
        _batches[name] = relay.ingest(dcgmrelay.parse(load_payload(PAYLOADS[name][0])), target=name, timestamp_ms=T0)
    return _batches[name]


def _record(benchmark: Any, name: str, fmt: str, variant: str, body: bytes, n: int) -> None:
    impl = fmt if variant == "warm" else f"{fmt} {variant}"
    benchmark.group = "encode"
    benchmark.extra_info.update(payload=f"{name}:{SHORT[fmt]}", bytes=len(body), samples=n, impl=impl,
                                bytes_per_sample=round(len(body) / n, 3))


def _keep(benchmark: Any, name: str, fmt: str, variant: str, body: bytes, n: int) -> None:
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["samples_per_s"] = round(n / median)
        _results.append((name, fmt, variant, median, len(body), n))


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_warm(benchmark: Any, fmt: str, name: str) -> None:
    batch = batch_of(name)
    enc = Encoder(fmt)
    enc.encode(batch)
    body, _ = enc.encode(batch)
    _record(benchmark, name, fmt, "warm", body, len(batch))
    benchmark(enc.encode, batch)
    _keep(benchmark, name, fmt, "warm", body, len(batch))


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_cold(benchmark: Any, fmt: str, name: str) -> None:
    batch = batch_of(name)
    body, _ = encode(batch, fmt)
    _record(benchmark, name, fmt, "cold", body, len(batch))
    benchmark.pedantic(encode, args=(batch, fmt), rounds=5 if name == "gpu1024" else 20, warmup_rounds=1)
    _keep(benchmark, name, fmt, "cold", body, len(batch))


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "compact"])
def test_encode_pure_twin(benchmark: Any, fmt: str, name: str) -> None:
    batch = batch_of(name)
    enc = Encoder(fmt, implementation="py")
    body, _ = enc.encode(batch)
    _record(benchmark, name, fmt, "py", body, len(batch))
    benchmark.pedantic(enc.encode, args=(batch,), rounds=3 if name == "gpu1024" else 10, warmup_rounds=1)
    _keep(benchmark, name, fmt, "py", body, len(batch))


def _steady_sizes(name: str) -> Dict[str, Dict[str, float]]:
    """Bytes per sample of the scrapes 15 s (same values) and 30 s (new values) after the
    recorded one, each format's encoder warm from the scrapes before."""
    make = PAYLOADS[name][1]
    node = make()
    t = 0.0
    body = b""
    while t <= 600.0:  # as tools/gen_payloads.py renders it
        body = node.render(t)
        t += 15.0
    if body != load_payload(PAYLOADS[name][0]):
        return {}
    relay = Relay(load_csv("default"))
    encs = {f: Encoder(f) for f in FORMATS}
    out: Dict[str, Dict[str, float]] = {}
    for label, when, data in (("first", 600.0, body), ("same values", 615.0, None), ("new values", 630.0, None)):
        b = relay.ingest(dcgmrelay.parse(data if data is not None else node.render(when)), target=name,
                         timestamp_ms=T0 + int(when * 1000))
        out[label] = {f: len(e.encode(b)[0]) / len(b) for f, e in encs.items()}
    return out


class _SummaryPlugin:
    """Prints this module's table in the terminal summary (after conftest.py's)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        _print_summary(terminalreporter)


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Any:
    plugin = _SummaryPlugin()
    yield
    # registered at module teardown: the terminal summary runs after every test
    if _results and not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "dcgmrelay-encode-summary")


def _print_summary(tr: Any) -> None:
    if not _results:
        return
    tr.write_line("")
    tr.write_sep("=", "dcgmrelay encode: samples/s (median) and bytes per sample on the wire")
    tr.write_line(f"{'payload':<8} {'format':<15} {'variant':<6} {'median ms':>10} {'samples/s':>13} "
                  f"{'body bytes':>11} {'B/sample':>9}")
    for name, fmt, variant, median, nbytes, n in sorted(_results, key=lambda r: (r[0], FORMATS.index(r[1]), r[2])):
        tr.write_line(f"{name:<8} {fmt:<15} {variant:<6} {median * 1e3:>10.3f} {n / median:>13,.0f} "
                      f"{nbytes:>11,} {nbytes / n:>9.2f}")
    for name in sorted({r[0] for r in _results}):
        sizes = _steady_sizes(name)
        if not sizes:
            continue
        tr.write_line("")
        tr.write_line(f"{name}: bytes per sample, scrapes of the recorded node (t = 600 s) and after it")
        tr.write_line(f"  {'scrape':<26}" + "".join(f"{SHORT[f]:>10}" for f in FORMATS))
        for label, row in sizes.items():
            what = {"first": "first (full dictionaries)", "same values": "+15 s, same values",
                    "new values": "+30 s, new values"}[label]
            tr.write_line(f"  {what:<26}" + "".join(f"{row[f]:>10.2f}" for f in FORMATS))
