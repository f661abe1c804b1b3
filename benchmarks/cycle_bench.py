"""One scrape cycle's in-process stages, back to back and after an idle pause.

    python benchmarks/cycle_bench.py [--payload gpu8.prom] [--cycles 400] [--pause 0.01]

What the relay process does with one page between the GET and the POST: parse (a reused
Parser), the per-target bookkeeping, the target's labels, the health series, the relay step
and the remote-write encoding, each timed (CPU, medians) on the same RelayApp objects the
process uses. Run twice: cycles back to back, then each after a pause (``--pause``, spent
spinning, so the process never sleeps). A node relay runs one cycle a second and waits for
the network in between: the pause is what it sees, and what process_bench.py measures.
On the shared 2-core machines here the paused cycle costs 2-4x the back-to-back one, for the
same code and data: caches and branch predictors have been taken over by the neighbours in
between. So at one node what matters is how much code and memory a cycle touches (Python
calls, numpy calls, objects), not only how many instructions it runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from process_bench import load  # the payloads, as the process benchmark reads them

STAGES = ("parse", "bookkeeping", "labels", "health", "extend", "relay", "encode", "cycle")


def run(body: bytes, cycles: int, pause: float) -> dict[str, float]:
    from dcgmrelay import config
    from dcgmrelay.app import RelayApp, _health_scrape
    from dcgmrelay.cli import build_parser
    from dcgmrelay.scrape import Parser
    from dcgmrelay.scraper import ScrapeResult
    from dcgmrelay.transport import _Piece

    # the process benchmark's relay: one static target, remote write 1.0, non-DCGM names kept
    args = build_parser().parse_args(["run", "--target", "http://127.0.0.1:9400/metrics", "--remote-write",
                                      "http://127.0.0.1:8428/api/v1/write", "--interval", "1s",
                                      "--include-non-dcgm"])
    cfg = config.config_from_args(args, {})
    app = RelayApp(cfg, env={})
    output = next(iter(app.outputs.values())).output
    target = config.static_targets(cfg, {})[0]
    parser = Parser()
    memo: dict = {}
    clock = time.thread_time_ns
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    ts = 1_700_000_000_000
    page = bytearray(body)  # as the scraper hands it on
    for _ in range(cycles):
        ts += 1000
        if pause:
            end = time.perf_counter() + pause
            while time.perf_counter() < end:
                pass
        t0 = clock()
        scrape = parser.parse(page, source=target.key, content_type="text/plain; version=0.0.4")
        t1 = clock()
        r = ScrapeResult(target, ts, 0.01, scrape, None, 200, len(page))
        app.metrics.scraped(target.key, r.up, r.duration_s, r.timestamp_ms / 1000)
        labels = dict(target.labels)
        t2 = clock()
        labelled = scrape.with_labels(labels, memo=memo)
        t3 = clock()
        health = _health_scrape(labels, r.up, r.duration_s, len(scrape), len(labelled))
        t4 = clock()
        whole = labelled.extended(health)
        t5 = clock()
        batch = app.relay.ingest(whole, target=target.key, timestamp_ms=ts)
        t6 = clock()
        output._encode([_Piece(batch, len(batch), target.key, 0.0)])
        t7 = clock()
        for stage, ns in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t7 - t0)):
            times[stage].append(ns / 1000)
    warm = cycles // 4  # the first cycles build the tables
    return {s: statistics.median(v[warm:]) for s, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--payload", default="gpu8.prom")
    ap.add_argument("--cycles", type=int, default=400)
    ap.add_argument("--pause", type=float, default=0.01, help="seconds between cycles in the second run (default 0.01)")
    args = ap.parse_args()
    body = load(args.payload)
    back = run(body, args.cycles, 0.0)
    paused = run(body, args.cycles, args.pause)
    print(f"\none scrape cycle in process, {args.payload}, CPU µs (medians of {args.cycles - args.cycles // 4})")
    print(f"{'stage':<12} {'back to back':>13} {f'after {args.pause * 1000:g} ms':>14} {'ratio':>6}")
    for s in STAGES:
        print(f"{s:<12} {back[s]:>13.1f} {paused[s]:>14.1f} {paused[s] / max(back[s], 1e-9):>5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
