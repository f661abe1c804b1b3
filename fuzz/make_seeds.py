"""Seed corpora of the fuzz harnesses, made from the repository's own data.

    python fuzz/make_seeds.py                  # all targets into fuzz/seeds/<target>/
    python fuzz/make_seeds.py parser --out DIR

* parser: the recorded exporter payloads (tests/data/payloads/real/, cut benchmarks/payloads/),
  the same scrapes as the relay writes them in Prometheus text and OpenMetrics, and a few
  hand-written bodies for what the recordings lack (OpenMetrics types, exemplars, escapes);
* csv: the built-in profiles (src/dcgmrelay/profiles/) and hand-written edge cases;
* config: tests/data/config/ (native and WhatapAgent) and small hand-written ones;
* compact: streams made by the encoder from simulated and recorded scrapes, in the
  harness' record format (fuzz_compact.py): the payloads uncompressed, so the fuzzer
  mutates what the decoder reads.

Files are named by content (sha1), so rerunning is idempotent; fuzz/regressions/<target>/
(committed inputs that once found a bug) are added too. Nothing here is committed: the
seeds are made again from the data they come from.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
TARGETS = ("parser", "csv", "config", "compact")
#: Cut of a long recorded body: its first lines up to this many bytes (a whole line).
CUT = 6000

_PARSER_EXTRA: List[bytes] = [
    # OpenMetrics: every metric type, units, exemplars, created, timestamps in seconds
    b"# TYPE a counter\n# UNIT a seconds\n# HELP a help \\\" \\\\ \\n\na_total{x=\"1\"} 3 1700000000.5 "
    b"# {trace_id=\"abc\"} 1 1700000000\na_created{x=\"1\"} 1600000000\n"
    b"# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 0.7\n"
    b"# TYPE s summary\ns{quantile=\"0.9\"} 1\ns_count 3\ns_sum 4\n"
    b"# TYPE st stateset\nst{st=\"a\"} 1\nst{st=\"b\"} 0\n"
    b"# TYPE i info\ni_info{version=\"1\"} 1\n"
    b"# TYPE g gaugehistogram\ng_bucket{le=\"+Inf\"} 1\ng_gcount 1\ng_gsum 1\n"
    b"# TYPE u unknown\nu NaN\n# EOF\n",
    # text: escapes, unescaped exporter output, odd floats, timestamps, CRLF, trailing comma
    b"# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error \\\\ \\n.\n# TYPE DCGM_FI_DEV_XID_ERRORS gauge\r\n"
    b"DCGM_FI_DEV_XID_ERRORS{gpu=\"0\",UUID=\"GPU-1\",err_code=\"0\",err_msg=\"No Error: a, b}c\",} 0\r\n"
    b"DCGM_FI_DEV_GPU_TEMP{ gpu=\"0\" , UUID=\"GPU-1\" } 1.28996013e+08 -1700000000000\n"
    b"m{a=\"\\\"q\\\"\",b=\"\xc3\xa9\\n\"} -Inf 0\nm NaN\nm +Inf 9223372036854775807\n"
    b"# TYPE empty gauge\n# HELP nohelp\nx{} -0\ny 0x1p3\n",
    b"",
    b"\n",
    b"# EOF\n",
    b"a 1\n# EOF",
    b"a{x=\"\x00\"} 1\nb\x00 2\nc{x=\"\xc3\x28\"} 3\n\xff\xfe 4\n",
]

_CSV_EXTRA: List[bytes] = [
    b"# comment\nDCGM_FI_DEV_GPU_TEMP, gauge, \"quoted, with \"\"quote\"\"\"\n"
    b"DCGM_FI_DEV_XID_ERRORS,gauge,\"multi\nline\"\nDCGM_FI_DRIVER_VERSION, label, driver\n",
    b"\xef\xbb\xbfDCGM_FI_DEV_SM_CLOCK, gauge, SM clock\r\nDCGM_FI_DEV_SM_CLOCK, gauge, again\r\n",
    b"  DCGM_FI_DEV_WEIGHTED_GPU_UTIL, gauge, weighted   # code 9005\n    # indented comment\n"
    b"dcgm_gpu_temp, gauge, 1.x name\nDCGM_EXP_XID_ERRORS_COUNT, gauge, exp\n",
    b"DCGM_FI_DEV_GPU_TEMP, gauge\n",
    b"NOT_A_FIELD, gauge, x\n",
    b"DCGM_FI_DEV_GPU_TEMP, temperature, x\n",
    b"DCGM_FI_DEV_GPU_TEMP, gauge, x\"y\n",
]

_CONFIG_EXTRA: List[bytes] = [
    b"targets:\n  - name: a\n    endpoints:\n      - url: http://127.0.0.1:9400/metrics\n"
    b"outputs:\n  - type: remote_write\n    url: http://127.0.0.1:8428/api/v1/write\n"
    b"    bearer_token: s3cret\n    headers: {X-License: abc}\n",
    b"targets:\n  - name: k\n    type: podmonitor\n    selector:\n      match_labels: {app: dcgm-exporter}\n"
    b"    endpoints:\n      - port: 9400\n        path: /metrics\n"
    b"outputs:\n  - type: compact\n    url: http://127.0.0.1:9600/api/v1/compact\n"
    b"relay: {output: both, first_observation: zero, kind_overrides: {DCGM_FI_PROF_PCIE_TX_BYTES: counter}}\n"
    b"spool: {dir: /tmp/x, max_bytes: 64MiB}\nshard: 0/2\nlogging: {level: debug, format: json}\n",
    b"a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    b"apiVersion: monitoring.whatap.com/v2alpha1\nkind: WhatapAgent\nmetadata: {name: w}\n"
    b"spec:\n  license: abc\n  host: 127.0.0.1\n  port: 6600\n",
    b"{}\n",
    b"- 1\n",
]


def _cut(data: bytes, limit: int = CUT) -> bytes:
    if len(data) <= limit:
        return data
    end = data.rfind(b"\n", 0, limit)
    return data[:end + 1] if end > 0 else data[:limit]


def _recorded() -> List[Tuple[str, bytes]]:
    out = [(p.name, p.read_bytes()) for p in sorted((REPO / "tests" / "data" / "payloads" / "real").glob("*.prom"))]
    for p in sorted((REPO / "benchmarks" / "payloads").glob("*.prom*")):
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
        out.append((p.name, _cut(data)))
    return out


def _parser_seeds() -> Iterator[bytes]:
    import dcgmrelay
    from dcgmrelay.encode import encode

    spec = dcgmrelay.load_csv("default")
    for _, data in _recorded():
        yield data
        scrape = dcgmrelay.parse(data)
        if not len(scrape):
            continue
        relay = dcgmrelay.Relay(spec, include_non_dcgm=True, first_observation="full", output="both")
        relay.ingest(scrape, target="seed", timestamp_ms=1_700_000_000_000)
        batch = relay.ingest(scrape, target="seed", timestamp_ms=1_700_000_015_000)
        for fmt in ("prometheus", "openmetrics"):
            yield _cut(encode(batch, fmt)[0])
    yield from _PARSER_EXTRA


def _csv_seeds() -> Iterator[bytes]:
    for p in sorted((REPO / "src" / "dcgmrelay" / "profiles").glob("*.csv")):
        yield p.read_bytes()
    yield from _CSV_EXTRA


def _config_seeds() -> Iterator[bytes]:
    for p in sorted((REPO / "tests" / "data" / "config").glob("*.yaml")):
        yield p.read_bytes()
    yield from _CONFIG_EXTRA


def _stream_records(bodies: List[bytes]) -> bytes:
    """Bodies of one encoder as a fuzz_compact input (payloads uncompressed)."""
    import cramjam

    sys.path.insert(0, str(FUZZ_DIR))
    from fuzz_compact import C_FULL, HEADER, record

    out = b""
    for body in bodies:
        _, _, flags, _, _, _, raw_len, crc = HEADER.unpack_from(body)
        comp = body[HEADER.size:]
        assert zlib.crc32(comp) == crc
        payload = bytes(cramjam.zstd.decompress(comp))
        assert len(payload) == raw_len
        out += record(C_FULL if flags & 1 else 0, payload)
    return out


def _compact_seeds() -> Iterator[bytes]:
    import dcgmrelay
    from dcgmrelay.encode import Encoder
    from dcgmrelay.simulate import SimulatedNode

    spec = dcgmrelay.load_csv("default")
    for output in ("cumulative", "delta", "both"):
        node = SimulatedNode(2, pods="some", xid=True, seed=1, mig_instances=2 if output == "both" else 0)
        relay = dcgmrelay.Relay(spec, output=output, first_observation="full")
        enc = Encoder("compact")
        bodies = []
        for k, t in enumerate((600, 615, 630, 645)):
            if k == 2:
                node.reset_counters(1)
                node.remove_gpu(0)
            bodies.append(enc.encode(relay.ingest(dcgmrelay.parse(node.render(t)), target="node-0:9400",
                                                  timestamp_ms=1_700_000_000_000 + t * 1000))[0])
        bodies.append(enc.encode(relay.target_down("node-0:9400", 1_700_000_700_000))[0])
        yield _stream_records(bodies)
        yield _stream_records(bodies[:1])
    for name, data in _recorded()[:10]:
        scrape = dcgmrelay.parse(data)
        relay = dcgmrelay.Relay(spec, include_non_dcgm=True, first_observation="full", output="both")
        enc = Encoder("compact")
        bodies = [enc.encode(relay.ingest(scrape, target=name, timestamp_ms=1_700_000_000_000 + 15_000 * i))[0]
                  for i in range(2)]
        yield _stream_records(bodies)


_MAKERS = {"parser": _parser_seeds, "csv": _csv_seeds, "config": _config_seeds, "compact": _compact_seeds}


def seeds(target: str) -> Dict[str, bytes]:
    """``{file name: input}`` of a target's seeds (regressions included)."""
    out = {}
    for data in _MAKERS[target]():
        out[hashlib.sha1(data).hexdigest()] = data
    reg = FUZZ_DIR / "regressions" / target
    if reg.is_dir():
        for p in sorted(reg.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                out["regression-" + p.name] = p.read_bytes()
    return out


def write(target: str, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = seeds(target)
    for name, data in made.items():
        (out_dir / name).write_bytes(data)
    return len(made)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", metavar="TARGET", help=f"{', '.join(TARGETS)} (default: all)")
    ap.add_argument("--out", type=Path, help="directory (default fuzz/seeds/<target>/)")
    args = ap.parse_args(argv)
    for t in args.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}: {', '.join(TARGETS)}")
    for t in args.targets or TARGETS:
        d = args.out if args.out else FUZZ_DIR / "seeds" / t
        print(f"{t}: {write(t, d)} seeds in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
