"""Benchmark fixtures (the recorded payloads) and the side-by-side summary.

Each benchmark records ``payload``, ``bytes`` and ``samples`` in ``extra_info``;
at the end of the run a table gives MB/s, samples/s and the ratio of every
parser to prometheus_client's on the same payload, from the medians.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

PAYLOAD_DIR = Path(__file__).parent / "payloads"
REAL_DIR = Path(__file__).parent.parent / "tests" / "data" / "payloads" / "real"


def load_payload(name: str) -> bytes:
    for candidate in (PAYLOAD_DIR / name, PAYLOAD_DIR / f"{name}.gz", REAL_DIR / name):
        if candidate.exists():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == ".gz" else data
    raise FileNotFoundError(name)


def real_payloads_concatenated() -> bytes:
    """All valid real payload excerpts, as one body (each alone is too small to time well)."""
    parts = [p.read_bytes() for p in sorted(REAL_DIR.glob("*.prom")) if not p.name.startswith("10-")]
    return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)


def pytest_terminal_summary(terminalreporter, config):  # type: ignore[no-untyped-def]
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows: dict[tuple[str, str], dict[str, float]] = {}
    meta: dict[str, tuple[int, int]] = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "payload" not in info or not bench.stats:
            continue
        rows.setdefault((bench.group or "", info["payload"]), {})[info.get("impl", bench.name)] = bench.stats.median
        meta[info["payload"]] = (info["bytes"], info["samples"])
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "dcgmrelay: throughput from medians, ratios against prometheus_client in the same run")
    tr.write_line(f"{'group':<8} {'payload':<22} {'impl':<22} {'median ms':>10} {'MB/s':>9} {'samples/s':>12} {'vs prom_client':>15}")
    for (group, payload), impls in sorted(rows.items()):
        nbytes, nsamples = meta[payload]
        base = impls.get("prometheus_client")
        for impl, median in sorted(impls.items(), key=lambda kv: kv[1]):
            ratio = f"{base / median:,.0f}x" if base else "-"
            tr.write_line(f"{group:<8} {payload:<22} {impl:<22} {median * 1e3:>10.3f} {nbytes / median / 1e6:>9.1f} "
                          f"{nsamples / median:>12,.0f} {ratio:>15}")
