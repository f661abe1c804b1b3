"""The relay's own /metrics: per-target scrape health kept as one record per target."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dcgmrelay.selfmetrics import SelfMetrics

A, B = "http://10.0.0.1:9400/metrics", "http://10.0.0.2:9400/metrics"


def _samples(m: SelfMetrics) -> dict:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_per_target_health_series() -> None:
    m = SelfMetrics()
    m.scraped(A, True, 0.02, 1700000000.0)
    m.scraped(A, False, 0.5, 1700000015.0)
    m.scraped(B, True, 0.01, 1700000001.0)
    m.target(B).rejected_lines += 3
    s = _samples(m)
    assert s[("dcgmrelay_scrapes_total", (("result", "ok"), ("target", A)))] == 1
    assert s[("dcgmrelay_scrapes_total", (("result", "failed"), ("target", A)))] == 1
    assert s[("dcgmrelay_target_up", (("target", A),))] == 0  # the last scrape failed
    assert s[("dcgmrelay_target_up", (("target", B),))] == 1
    assert s[("dcgmrelay_target_scrape_duration_seconds", (("target", A),))] == 0.5
    assert s[("dcgmrelay_target_last_scrape_timestamp_seconds", (("target", A),))] == 1700000015.0
    assert s[("dcgmrelay_parse_rejected_lines_total", (("target", B),))] == 3
    # one histogram over all targets
    assert s[("dcgmrelay_scrape_duration_seconds_count", ())] == 3
    assert not any(name == "dcgmrelay_scrape_duration_seconds_bucket" and dict(lb).get("target")
                   for name, lb in s)


def test_forgotten_targets_leave_no_series() -> None:
    m = SelfMetrics()
    m.scraped(A, True, 0.02, 1.0)
    m.scraped(B, True, 0.02, 1.0)
    m.forget_target(A)
    targets = {dict(lb).get("target") for _name, lb in _samples(m)}
    assert A not in targets and B in targets


def test_per_target_cost_of_the_exposition_is_a_few_lines() -> None:
    """At 1,000 targets /metrics stays small: six lines per target (two scrape counters,
    up, last duration, last timestamp, rejected lines), no per-target histogram or
    `_created` series."""
    m = SelfMetrics()
    base = generate_latest(m.registry).count(b"\n")
    for i in range(1000):
        m.scraped(f"http://10.0.{i // 250}.{i % 250}:9400/metrics", True, 0.01, 1.0)
    lines = generate_latest(m.registry).decode().splitlines()
    per_target = [ln for ln in lines if ln.startswith("dcgmrelay_") and 'target="' in ln]
    assert len(per_target) == 6 * 1000
    assert len(lines) - base <= 6 * 1000 + 10  # the histogram's buckets are counted, not per target
