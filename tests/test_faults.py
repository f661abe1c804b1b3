"""Fault injection against the relay process, through benchmarks/reliability.py (quick mode).

One run of every scenario (the independent ones in parallel, each with its own relay process,
exporters and fault proxy, sharing one VictoriaMetrics and one Prometheus), then one test per
scenario asserting its properties on the figures: what the exporters served against what the
receiver holds, duplicates against the documented bound, drops counted, memory bounded. The
figures themselves are what ``python benchmarks/reliability.py`` prints and docs/reliability.md
records.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability as R  # noqa: E402
from servers import BinaryMissingError, require_binaries  # noqa: E402

pytestmark = pytest.mark.integration

CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    try:
        reason = require_binaries("victoria-metrics", "prometheus")
    except BinaryMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    if reason:
        pytest.skip(reason)
    names = list(R.SCENARIOS)
    why = R.tmpfs_available()
    if why is not None:
        if CI:
            pytest.fail(f"the disk-full scenario cannot mount a private tmpfs here: {why}", pytrace=False)
        names.remove("disk-full")  # the disk-full test skips, naming why
    log: List[str] = []
    with R.Harness("quick", workdir=tmp_path_factory.mktemp("reliability")) as h:
        out = R.run_all(h, names, progress=log.append)
    out["_progress"] = log
    out["_tmpfs"] = why
    return out


def _one(results: Dict[str, Any], name: str, receiver: str = "VictoriaMetrics") -> R.ScenarioResult:
    rs = results.get(name)
    if rs is None and name == "disk-full":
        pytest.skip(f"cannot mount a private tmpfs here: {results['_tmpfs']}")
    if isinstance(rs, BaseException):
        raise AssertionError(f"scenario {name} failed: {rs}\n" + "\n".join(results["_progress"])) from rs
    r = next(r for r in rs if r.receiver == receiver)
    print(R.table({name: [r]}))
    print(r.metrics, r.facts.get("proxy_requests"))
    return r


def _whole(r: R.ScenarioResult) -> None:
    """Every served sample is in the receiver (scrapes the relay reported failed aside), and every
    received timestamp is a served scrape."""
    assert r.sent > 0 and r.received > 0
    kept = r.facts["kept_per_scrape"]
    assert r.facts["series"] == kept, "each exporter's series all reached the receiver"
    assert r.lost == 0, (r.lost, sorted(r.facts["lost_at_ms"]), r.log[-3000:])
    assert r.unmatched == 0
    # a scrape in progress at SIGTERM is abandoned, not relayed: at most one per exporter per stop
    assert len(r.facts["abandoned_at_stop_ms"]) <= len(kept) * r.facts["stops"], r.facts["abandoned_at_stop_ms"]
    assert r.received + r.failed_samples + r.facts["abandoned_at_stop_samples"] == r.sent


def test_collector_down_60s_then_back_loses_nothing(results):
    r = _one(results, "collector-down")
    _whole(r)
    assert r.duplicated == 0 and r.duplicated_receiver == 0
    assert r.metrics["spooled_batches"] > 0, "the outage reached the spool"
    assert r.metrics["dropped_batches"] == 0 and r.metrics["spool_dropped_records"] == 0
    assert r.exit_codes == [0]


def test_collector_down_prometheus_gets_everything_in_order(results):
    """Prometheus (no out-of-order window) refuses samples older than ones it already has: the
    write-ahead output delivers oldest first through the outage, so it takes them all."""
    r = _one(results, "collector-down", "Prometheus")
    _whole(r)
    assert r.facts["dropped_by_reason"] == {}, r.facts["dropped_by_reason"]


def test_429_storm_with_retry_after_loses_nothing(results):
    r = _one(results, "429-storm")
    _whole(r)
    assert r.facts["proxy_requests"].get("429", 0) > 0
    assert r.duplicated == 0 and r.duplicated_receiver == 0
    assert r.metrics["dropped_batches"] == 0


def test_500s_lose_nothing(results):
    r = _one(results, "500s")
    _whole(r)
    assert r.facts["proxy_requests"].get("500", 0) > 0
    assert r.duplicated == 0 and r.duplicated_receiver == 0
    assert r.metrics["retries"] > 0 and r.metrics["dropped_batches"] == 0


def test_slow_collector_loses_nothing_and_duplicates_only_what_timed_out(results):
    r = _one(results, "slow-collector")
    _whole(r)
    # a copy beyond the first only comes from a request the relay gave up on (timeout) that
    # the collector stored anyway: the samples the receiver took beyond those the relay counts
    # as delivered (the at-least-once bound)
    assert r.facts["duplicated_all_samples"] <= r.facts["unacked_samples"], r.facts
    assert r.duplicated <= r.dup_bound
    assert r.duplicated_receiver == r.duplicated
    assert r.metrics["retries"] > 0


def test_kill_9_at_random_moments_duplicates_within_bound(results):
    r = _one(results, "kill-9")
    kills = r.facts["kills"]
    assert kills >= 10 and r.relay_runs == kills + 1
    assert r.exit_codes == [-9] * kills + [0]
    assert r.unmatched == 0 and r.facts["series"] == r.facts["kept_per_scrape"]
    # the spool's bound: at most the requests in flight at each kill come twice (max_in_flight 1)
    assert r.facts["dup_requests"] <= r.facts["dup_request_bound"]
    assert r.duplicated <= r.dup_bound
    assert r.duplicated_receiver == r.duplicated
    # write-ahead: whatever reached the spool survived the kills, and the only scrapes that
    # can be missing are those in progress at a kill (requested but not yet on disk)
    assert r.facts["lost_scrapes_outside_memory_window"] == 0, r.facts


def test_kill_9_at_random_moments_loses_nothing_that_was_scraped(results):
    r = _one(results, "kill-9")
    in_progress = r.facts["lost_scrapes_in_memory_window"]
    assert r.facts["lost_scrapes_outside_memory_window"] == 0
    # a scrape cut by a kill costs at most its own samples: one scrape per exporter per kill
    assert in_progress <= r.facts["kills"] * 2, r.facts
    assert r.lost <= in_progress * max(r.facts["kept_per_scrape"]), (r.lost, in_progress)


def test_disk_full_keeps_running_counts_drops_and_recovers(results):
    r = _one(results, "disk-full")
    assert r.exit_codes == [0] and r.relay_runs == 1, "the relay kept running through ENOSPC"
    full = r.facts["dropped_when_full"]
    assert full["batches_dropped_spool_error"] > 0 and full["spool_disk_full_records"] > 0, full
    assert "No space left on device" in r.log
    # what is missing is exactly what the relay counted as refused by the full disk
    assert r.lost > 0 and r.unmatched == 0
    assert r.lost <= r.facts["dropped_batches_spool_error"] * r.facts["max_samples_per_request"]
    assert r.metrics["dropped_batches"] == r.facts["dropped_batches_spool_error"], r.metrics
    # space returned: the spool took batches again, and they arrived
    assert r.facts["spooled_after_growth"] > 0
    assert r.duplicated == 0


def test_hostile_exporters_leave_healthy_ones_alone_and_memory_bounded(results):
    r = _one(results, "hostile")
    _whole(r)
    assert r.failed_scrapes == 0
    ticks = r.facts["ticks_in_window"]
    for inst, h in r.facts["healthy"].items():
        assert h["failed"] == 0, (inst, h)
        assert h["ok"] >= 0.9 * ticks, (inst, h, ticks)
    hostile = r.facts["hostile"]
    for kind in ("1gb-body", "endless-line", "slowloris"):
        assert hostile[kind]["failed"] > 0 and hostile[kind]["ok"] == 0, (kind, hostile[kind])
    assert hostile["garbage"]["rejected_lines"] > 0
    assert r.peak_rss_mib <= r.facts["rss_bound_mib"], (r.peak_rss_mib, r.facts["rss_bound_mib"])
