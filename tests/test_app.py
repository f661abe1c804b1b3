"""The relay process end to end on 127.0.0.1: simulated exporters → dcgmrelay → real collectors.

In-process (RelayApp) for the pipeline and the collectors; as a subprocess
(`dcgmrelay run`) for signals: SIGTERM, SIGHUP and kill -9.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import dcgmrelay
from dcgmrelay import config as C
from dcgmrelay.app import RelayApp
from dcgmrelay.receiver import CompactReceiver
from dcgmrelay.simulate import ExporterServer, SimulatedNode


def _cfg(**flags):
    flags.setdefault("listen", "127.0.0.1:0")
    flags.setdefault("interval", "500ms")
    flags.setdefault("timeout", "500ms")
    return C.config_from_args(flags, env={})


async def _run_for(app: RelayApp, seconds: float) -> None:
    task = asyncio.create_task(app.run(install_signals=False))
    await asyncio.sleep(seconds)
    app.stop()
    await task


async def _run_and_collect(app: RelayApp, rx: CompactReceiver, seconds: float):
    """Run ``app`` for ``seconds``; what ``rx`` received and the relay's /metrics text."""
    from prometheus_client import generate_latest

    await _run_for(app, seconds)
    rx.flush()
    return rx.received_samples(), generate_latest(app.metrics.registry).decode()


def _expected_last(node_bodies, spec="default"):
    """(name, sorted labels) -> value of the last scrape, as the relay keeps them."""
    s = dcgmrelay.parse(node_bodies)
    keep = dcgmrelay.load_csv(spec).mask(s.field_ids)
    return {(n, tuple(sorted(lab.items()))): v for (n, lab, v, _), k in zip(s.samples(), keep) if k}


def test_relay_into_victoriametrics_and_prometheus_reads_back_every_sample(victoria_metrics_server,
                                                                            prometheus_server):
    node = SimulatedNode(8, seed=11, collect_interval=3600)  # values frozen: every scrape identical

    async def main():
        async with ExporterServer(node) as ex:
            cfg = _cfg(target=[ex.url], remote_write=[victoria_metrics_server.remote_write_url,
                                                      prometheus_server.remote_write_url])
            app = RelayApp(cfg)
            await _run_for(app, 2.2)
            return ex.url, app

    url, app = asyncio.run(main())
    stats = {n: s.output.stats for n, s in app.outputs.items()}
    assert all(st.batches_sent > 0 and not st.dropped_batches for st in stats.values()), stats
    expected = _expected_last(node.render(0.0))
    assert len(expected) == 200
    instance = url.split("/")[2]
    for server in (victoria_metrics_server, prometheus_server):
        got = {}
        for row in server.query(f'{{__name__=~"DCGM_.*",instance="{instance}"}}'):
            labels = dict(row["metric"])
            name = labels.pop("__name__")
            assert labels.pop("job") == "dcgm-exporter" and labels.pop("instance") == instance
            got[(name, tuple(sorted(labels.items())))] = float(row["value"][1])
        assert got.keys() == expected.keys(), type(server).__name__
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-12), k  # VictoriaMetrics keeps ~12 digits
        up = server.query(f'up{{instance="{instance}"}}')
        assert [r["value"][1] for r in up] == ["1"]


def test_collector_down_then_back_loses_nothing(tmp_path):
    """Outputs fail while the collector is away; batches spool; all arrive after it returns."""
    from dcgmrelay._http import HttpServer

    rx = CompactReceiver().start()
    state = {"up": False}

    async def proxy(method, path, query, headers, body):  # a collector that is down, then up
        if not state["up"]:
            return 503, {"Content-Type": "text/plain"}, b"down for maintenance\n"
        r = httpx.post(rx.compact_url, content=body, headers={k: v for k, v in headers.items()
                                                              if k.lower().startswith(("content-", "x-"))})
        return r.status_code, {"Content-Type": r.headers.get("content-type", "text/plain")}, r.content

    node = SimulatedNode(4, seed=2, collect_interval=0.5)

    async def main():
        async with HttpServer(proxy) as px, ExporterServer(node) as ex:
            cfg = _cfg(target=[ex.url], compact=[px.url + "/api/v1/compact"], spool_dir=str(tmp_path / "spool"),
                       first_observation="zero")
            cfg = C.merge(cfg, {"outputs": [{**C.config_to_dict(cfg, reveal_secrets=True)["outputs"][0],
                                             "retry": {"min_backoff": "50ms", "max_backoff": "100ms",
                                                       "max_elapsed": "300ms"}}]})
            app = RelayApp(cfg)
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(2.5)  # collector down: everything spools
            spooled = app.outputs[cfg.outputs[0].name].output.stats.spooled_batches
            state["up"] = True
            await asyncio.sleep(4.0)  # back: the spool drains, new batches flow
            app.stop()
            await task
            return app, spooled

    try:
        app, spooled = asyncio.run(main())
        st = app.outputs[app.cfg.outputs[0].name].output.stats
        assert spooled > 0
        assert st.replayed_batches >= spooled and not st.dropped_batches
        rx.flush()
        got = rx.received_samples()
        # every scrape made while the collector was down arrived: one sample per series per scrape
        per_ts = {}
        for target, name, labels, value, ts in got:
            if name.startswith("DCGM_"):
                per_ts[ts] = per_ts.get(ts, 0) + 1
        scrapes = app.scraper  # noqa: F841
        assert len(per_ts) >= 10  # ~13 scrapes at 0.5 s in 6.5 s
        assert set(per_ts.values()) == {100}  # 4 GPUs × 25 fields, every scrape complete
        # the receiver asked (409) for the live stream's dictionaries, which were in a spooled
        # batch; the output resent with full ones: rejections of that kind only, nothing dropped
        assert set(rx.stats["rejected"]) <= {"unknown-stream"}
        assert not st.dropped_batches
    finally:
        rx.stop()


def test_a_reload_that_adds_a_spool_replays_it(tmp_path):
    """Without a spool the replay loop waits (no wake-up a second for nothing); a reload that
    configures one starts replaying it: here the records a first run left while its collector
    was down reach the collector through the second run, which started without a spool."""
    rx = CompactReceiver().start()
    node = SimulatedNode(2, seed=5, collect_interval=0.5)
    spool = str(tmp_path / "spool")
    fast_retry = {"retry": {"min_backoff": "50ms", "max_backoff": "100ms", "max_elapsed": "200ms"}}

    def with_retry(cfg):
        return C.merge(cfg, {"outputs": [{**C.config_to_dict(cfg, reveal_secrets=True)["outputs"][0],
                                          **fast_retry}]})

    async def main():
        async with ExporterServer(node) as ex:
            # run 1: the collector's port is closed, everything goes to the spool
            down = with_retry(_cfg(target=[ex.url], compact=[f"http://127.0.0.1:{_free_port()}/api/v1/compact"],
                                   spool_dir=spool))
            first = RelayApp(down)
            await _run_for(first, 1.6)
            left = first.outputs[down.outputs[0].name].output.stats.spooled_batches
            # run 2: no spool at first; the reload points it at run 1's spool and a live collector
            plain = _cfg(target=[ex.url], compact=[rx.compact_url])
            spooled = with_retry(_cfg(target=[ex.url], compact=[rx.compact_url], spool_dir=spool))
            configs = iter([spooled])
            second = RelayApp(plain, loader=lambda: next(configs))
            task = asyncio.create_task(second.run(install_signals=False))
            await asyncio.sleep(1.2)
            before = len(rx.received_samples())
            assert await second.reload()
            await asyncio.sleep(3.0)
            second.stop()
            await task
            return left, before, second

    try:
        left, before, second = asyncio.run(main())
        assert left > 0
        st = second.outputs[second.cfg.outputs[0].name].output.stats
        assert st.replayed_batches >= left, (st.replayed_batches, left)
        rx.flush()
        assert len(rx.received_samples()) > before
    finally:
        rx.stop()


@pytest.mark.parametrize("what", ["credentials_env", "spool_dir"])
def test_a_reload_that_cannot_build_its_targets_keeps_the_running_ones(tmp_path, what):
    """A reload whose targets only fail when built (an authorization credentials_env that is
    not set) or whose spool directory cannot be made (a file is in the way) is refused before
    anything running is touched: the old target keeps being scraped and relayed to the old
    output, and the reload counts as failed."""
    rx = CompactReceiver().start()
    node = SimulatedNode(1, seed=3, collect_interval=0.5)
    (tmp_path / "file").write_text("not a directory")

    async def main():
        async with ExporterServer(node) as ex:
            good = _cfg(target=[ex.url], compact=[rx.compact_url])
            if what == "credentials_env":
                endpoint = {"url": ex.url, "authorization": {"credentials_env": "DCGMRELAY_TEST_NOT_SET"}}
                bad = C.merge(good, {"targets": [{"name": "dcgm", "endpoints": [endpoint]}]})
            else:
                bad = C.merge(good, {"spool": {"dir": str(tmp_path / "file" / "spool")}})
            app = RelayApp(good, loader=lambda: bad, env={})
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(1.0)
            ok = await app.reload()
            await asyncio.sleep(1.0)
            rx.flush()
            before = len(rx.received_samples())
            await asyncio.sleep(2.0)
            rx.flush()
            after = len(rx.received_samples())
            scraped = [t.url for t in app.scraper.targets]
            app.stop()
            await task
            return ok, before, after, app, scraped

    try:
        ok, before, after, app, scraped = asyncio.run(main())
        assert ok is False
        assert app.metrics.config_reloads.labels("failed")._value.get() == 1
        assert app.metrics.config_reloads.labels("ok")._value.get() == 0
        assert before > 0 and after > before, (before, after)  # still scraping the old target
        assert scraped == [app.cfg.targets[0].endpoints[0].url]
    finally:
        rx.stop()


def test_an_output_a_reload_could_not_start_starts_once_it_can(tmp_path, monkeypatch, caplog):
    """A reload adds an output whose spool directory is blocked (a file in the way): the reload
    counts as failed, the other output runs on, and the new one starts by itself (no second
    reload) once the obstacle is gone, then delivers."""
    import dcgmrelay.app as app_mod

    monkeypatch.setattr(app_mod, "OUTPUT_RETRY_S", 0.2)
    rx_a, rx_b = CompactReceiver().start(), CompactReceiver().start()
    node = SimulatedNode(1, seed=3)
    spool = tmp_path / "spool"
    spool.mkdir()

    async def main():
        async with ExporterServer(node) as ex:
            first = _cfg(target=[ex.url], compact=[rx_a.compact_url])
            second = C.merge(first, {"outputs": [{"name": "a", "type": "compact", "url": rx_a.compact_url},
                                                 {"name": "b", "type": "compact", "url": rx_b.compact_url}],
                                     "spool": {"dir": str(spool)}})
            (spool / "b").write_text("in the way of output b's spool directory")
            app = RelayApp(first, loader=lambda: second, env={})
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(0.8)
            ok = await app.reload()
            await asyncio.sleep(0.8)
            missing = sorted(app.outputs)
            (spool / "b").unlink()
            await asyncio.sleep(1.5)
            started = sorted(app.outputs)
            app.stop()
            await task
            rx_a.flush()
            rx_b.flush()
            return ok, missing, started, app

    try:
        with caplog.at_level("INFO", logger="dcgmrelay"):
            ok, missing, started, app = asyncio.run(main())
        assert ok is False and app.metrics.config_reloads.labels("failed")._value.get() == 1
        assert missing == ["a"] and started == ["a", "b"]
        assert rx_a.received_samples() and rx_b.received_samples()
        assert "output b not started (retried every" in caplog.text and "output b started" in caplog.text
    finally:
        rx_a.stop()
        rx_b.stop()


def test_a_failing_target_is_logged_again_only_when_its_failure_changes_kind(caplog):
    """503 with a different body every time: one warning; then 404s: one more; back up and
    down again: one more. Not a line per scrape."""
    from dcgmrelay._http import HttpServer

    calls = [0]

    async def handler(method, path, query, headers, data):
        calls[0] += 1
        n = calls[0]
        if n <= 4:
            return 503, {}, f"overloaded, request id {n * 7919:x}".encode()
        if n <= 8:
            return 404, {}, b"no such page"
        if n <= 10:
            return 200, {"Content-Type": "text/plain"}, b"up_metric 1\n"
        return 503, {}, b"overloaded again"

    async def main():
        async with HttpServer(handler) as srv:
            rx = CompactReceiver().start()
            try:
                app = RelayApp(_cfg(target=[srv.url + "/metrics"], compact=[rx.compact_url],
                                    interval="100ms", timeout="100ms"))
                await _run_for(app, 1.6)
            finally:
                rx.stop()

    with caplog.at_level("WARNING", logger="dcgmrelay"):
        asyncio.run(main())
    assert calls[0] >= 12
    said = [r.getMessage().split("scrape failed: ", 1)[1] for r in caplog.records
            if "scrape failed" in r.getMessage()]
    assert [m.split(":", 1)[0] for m in said] == ["HTTP 503", "HTTP 404", "HTTP 503"], said


def test_the_app_makes_its_asyncio_objects_on_the_loop_that_runs_it(monkeypatch):
    """`dcgmrelay run` builds the RelayApp before asyncio.run() starts a loop. On Python 3.9 an
    asyncio.Event made then binds another loop, and run() failed at once ("attached to a
    different loop"); here an Event made outside a running loop fails on any Python."""
    made_outside = []

    class LoopBoundEvent(asyncio.Event):
        def __init__(self) -> None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                made_outside.append(True)
            super().__init__()

    monkeypatch.setattr(asyncio, "Event", LoopBoundEvent)
    app = RelayApp(_cfg(target=["http://127.0.0.1:9/metrics"], remote_write=["http://127.0.0.1:9/api/v1/write"]))
    app.stop()  # asked to stop before it runs: run() returns at once
    assert asyncio.run(asyncio.wait_for(app.run(install_signals=False), 15)) == 0
    assert not made_outside


def test_self_metrics_health_and_readiness():
    node = SimulatedNode(2, seed=4)

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                app = RelayApp(_cfg(target=[ex.url, "http://127.0.0.1:9/metrics"], compact=[rx.compact_url]))
                task = asyncio.create_task(app.run(install_signals=False))
                await asyncio.sleep(1.6)
                async with httpx.AsyncClient() as c:
                    metrics = (await c.get(app.url + "/metrics")).text
                    health = await c.get(app.url + "/healthz")
                    ready = await c.get(app.url + "/readyz")
                app.stop()
                await task
                return metrics, health.status_code, ready.status_code, ex.url
            finally:
                rx.stop()

    metrics, health, ready, url = asyncio.run(main())
    assert health == 200 and ready == 200
    fams = {f.name: f for f in __import__("prometheus_client.parser", fromlist=["x"]).text_string_to_metric_families(metrics)}
    ok = {s.labels["target"]: s.value for s in fams["dcgmrelay_scrapes"].samples
          if s.name.endswith("_total") and s.labels["result"] == "ok"}
    failed = {s.labels["target"]: s.value for s in fams["dcgmrelay_scrapes"].samples
              if s.name.endswith("_total") and s.labels["result"] == "failed"}
    assert ok[url] >= 2 and failed["http://127.0.0.1:9/metrics"] >= 2
    dropped = {s.labels["reason"]: s.value for s in fams["dcgmrelay_samples_dropped"].samples
               if s.name.endswith("_total")}
    assert set(dropped) >= {"not_in_spec", "non_dcgm", "first_observation"}
    for name in ("dcgmrelay_output_bytes_sent", "dcgmrelay_output_retries", "dcgmrelay_counter_resets",
                 "dcgmrelay_targets", "dcgmrelay_parse_seconds", "dcgmrelay_target_up"):
        assert name in fams, name


def test_body_size_limit_fails_the_scrape_and_says_why(caplog):
    """A page over global.body_size_limit (--body-size-limit) is a failed scrape: up 0,
    counted per target, logged with the limit; nothing of it is relayed."""
    node = SimulatedNode(2, seed=5)

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                app = RelayApp(_cfg(target=[ex.url], compact=[rx.compact_url], body_size_limit="4KiB"))
                await _run_for(app, 1.6)
                rx.flush()
                return rx.received_samples()
            finally:
                rx.stop()

    with caplog.at_level("WARNING", logger="dcgmrelay"):
        samples = asyncio.run(main())
    names = {name for _t, name, _l, _v, _ts in samples}
    ups = [v for _t, name, _l, v, _ts in samples if name == "up"]
    assert names <= {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                     "scrape_samples_post_metric_relabeling"}, names
    assert ups and set(ups) == {0.0}
    assert any("body exceeds the limit of 4096 bytes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("relabel", [False, True])
def test_sample_limit_fails_the_scrape_counts_and_says_why(caplog, relabel):
    """global.sample_limit (--sample-limit), as Prometheus' sample_limit: a scrape with more
    samples than the limit after metric relabeling fails as a whole (up 0, only the health
    series relayed, its samples counted as dropped by reason sample_limit, the failure
    counted per target and logged once); metric relabeling that brings it under the limit
    lets it through."""
    node = SimulatedNode(2, seed=5)
    scraped = len(dcgmrelay.parse(node.render(0.0)))  # the same number every scrape
    keep = {"source_labels": ["gpu"], "regex": "0", "action": "keep"}

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                cfg = _cfg(target=[ex.url], compact=[rx.compact_url], sample_limit=str(scraped - 1))
                if relabel:  # keeps GPU 0's series only: about half, under the limit
                    target = C.config_to_dict(cfg)["targets"][0]
                    target["endpoints"][0]["metric_relabel_configs"] = [keep]
                    cfg = C.merge(cfg, {"targets": [target]})
                app = RelayApp(cfg)
                await _run_for(app, 1.6)
                rx.flush()
                from prometheus_client import generate_latest

                return rx.received_samples(), app, generate_latest(app.metrics.registry).decode()
            finally:
                rx.stop()

    with caplog.at_level("WARNING", logger="dcgmrelay"):
        samples, app, metrics = asyncio.run(main())
    names = {name for _t, name, _l, _v, _ts in samples}
    ups = [v for _t, name, _l, v, _ts in samples if name == "up"]
    health = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling"}
    failed = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("dcgmrelay_scrapes_total{") and 'result="failed"' in line]
    dropped = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('dcgmrelay_samples_dropped_total{reason="sample_limit"}')]
    warnings = [r.getMessage() for r in caplog.records if "sample limit" in r.getMessage()]
    if relabel:
        assert ups and set(ups) == {1.0}
        assert names - health, "the relabeled scrape is relayed"
        assert failed == [0.0] and dropped == [0.0] and not warnings
    else:
        assert names <= health, names
        assert ups and set(ups) == {0.0}
        posts = {v for _t, name, _l, v, _ts in samples if name == "scrape_samples_post_metric_relabeling"}
        assert posts == {float(scraped)}
        assert failed and failed[0] >= 2, failed
        assert dropped and dropped[0] == failed[0] * scraped, (dropped, failed)
        assert len(warnings) == 1, warnings
        assert f"sample limit {scraped - 1} exceeded: {scraped} samples after metric relabeling" in warnings[0]


def _scrape_metrics(metrics: str, prefix: str) -> list:
    return [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix)]


# Every series of SimulatedNode(2, seed=5) has 10 labels (7 of the exporter, job, instance,
# __name__); its longest label name is DCGM_FI_DRIVER_VERSION (22 bytes), its longest value
# a UUID (40 bytes); its metric names are shorter than that (39 at most).
_LABEL_CASES = {
    "label_limit": (10, "label limit 9 exceeded: series '{}' has 10 labels (__name__ counted)"),
    "label_name_length_limit": (22, "label name length limit 21 exceeded: series '{}' has label name "
                                    "'DCGM_FI_DRIVER_VERSION' (22 bytes)"),
    "label_value_length_limit": (40, "label value length limit 39 exceeded: series '{}' label 'UUID' has a value "
                                     "of 40 bytes"),
}


@pytest.mark.parametrize("over", [True, False], ids=["over", "at"])
@pytest.mark.parametrize("key", list(_LABEL_CASES))
def test_label_limits_fail_the_scrape_count_and_say_why(caplog, key, over):
    """global.label_limit / label_name_length_limit / label_value_length_limit (flags), as
    Prometheus' limits of the same names: a scrape with a series (after metric relabeling,
    target labels and __name__ included) past one fails as a whole, as with sample_limit:
    up 0, only the health series relayed, its samples counted as dropped by reason
    label_limit, logged once naming the series and the label. At the limit exactly, the
    scrape is relayed as it is and nothing is counted."""
    node = SimulatedNode(2, seed=5)
    scraped = len(dcgmrelay.parse(node.render(0.0)))
    at, says = _LABEL_CASES[key]
    limit = at - 1 if over else at

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                app = RelayApp(_cfg(target=[ex.url], compact=[rx.compact_url], **{key: str(limit)}))
                return await _run_and_collect(app, rx, 1.6)
            finally:
                rx.stop()

    with caplog.at_level("WARNING", logger="dcgmrelay"):
        samples, metrics = asyncio.run(main())
    names = {name for _t, name, _l, _v, _ts in samples}
    ups = [v for _t, name, _l, v, _ts in samples if name == "up"]
    health = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling"}
    failed = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("dcgmrelay_scrapes_total{") and 'result="failed"' in line]
    dropped = _scrape_metrics(metrics, 'dcgmrelay_samples_dropped_total{reason="label_limit"}')
    assert _scrape_metrics(metrics, 'dcgmrelay_samples_dropped_total{reason="sample_limit"}') == [0.0]
    warnings = [r.getMessage() for r in caplog.records if "scrape failed" in r.getMessage()]
    if not over:
        assert ups and set(ups) == {1.0}
        assert names - health, "a scrape at the limit is relayed"
        assert failed == [0.0] and dropped == [0.0] and not warnings
        return
    assert names <= health, names
    assert ups and set(ups) == {0.0}
    posts = {v for _t, name, _l, v, _ts in samples if name == "scrape_samples_post_metric_relabeling"}
    assert posts == {float(scraped)}
    assert failed and failed[0] >= 2, failed
    assert dropped and dropped[0] == failed[0] * scraped, (dropped, failed)
    assert len(warnings) == 1, warnings  # once per target, not once per scrape
    prefix, _, suffix = says.partition("'{}'")
    assert prefix in warnings[0] and suffix in warnings[0], warnings[0]
    series = warnings[0].split(prefix, 1)[1].split("'")[1]
    assert series.startswith("DCGM_FI_"), warnings[0]


def test_a_jobs_limits_win_over_the_global_ones(caplog):
    """A target's (job's) sample_limit / label_limit override global's: 0 there lifts the
    global limit for that job, an unset one inherits it, a set one applies even with no
    global limit. Each failure is counted under its own reason."""
    node = SimulatedNode(2, seed=5)
    scraped = len(dcgmrelay.parse(node.render(0.0)))

    async def main():
        async with ExporterServer(node) as a, ExporterServer(node) as b, ExporterServer(node) as c:
            rx = CompactReceiver().start()
            try:
                cfg = C.load_config(textwrap.dedent(f"""
                    global: {{interval: 500ms, timeout: 500ms, label_limit: 9}}
                    targets:
                      - name: relaxed                   # label_limit 0: none, whatever global says
                        label_limit: 0
                        endpoints: [{{url: "{a.url}"}}]
                      - name: inherits                  # global's label_limit 9: fails
                        endpoints: [{{url: "{b.url}"}}]
                      - name: capped                    # its own limits: labels fine, samples not
                        label_limit: 10
                        sample_limit: {scraped - 1}
                        endpoints: [{{url: "{c.url}"}}]
                    outputs: [{{type: compact, url: "{rx.compact_url}"}}]
                    listen: 127.0.0.1:0
                    """))
                app = RelayApp(cfg)
                return await _run_and_collect(app, rx, 1.6)
            finally:
                rx.stop()

    with caplog.at_level("WARNING", logger="dcgmrelay"):
        samples, metrics = asyncio.run(main())
    ups: dict = {}
    for _t, name, labels, v, _ts in samples:
        if name == "up":
            ups.setdefault(labels["job"], set()).add(v)
    assert ups == {"relaxed": {1.0}, "inherits": {0.0}, "capped": {0.0}}, ups
    failed = {line.split('target="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines()
              if line.startswith("dcgmrelay_scrapes_total{") and 'result="failed"' in line}
    by_url = {s[0]: s[2]["job"] for s in samples}
    failed = {by_url[k]: v for k, v in failed.items()}
    assert failed["relaxed"] == 0 and failed["inherits"] >= 2 and failed["capped"] >= 2, failed
    assert _scrape_metrics(metrics, 'dcgmrelay_samples_dropped_total{reason="label_limit"}') == [
        failed["inherits"] * scraped]
    assert _scrape_metrics(metrics, 'dcgmrelay_samples_dropped_total{reason="sample_limit"}') == [
        failed["capped"] * scraped]
    warnings = sorted(r.getMessage() for r in caplog.records if "scrape failed" in r.getMessage())
    assert len(warnings) == 2, warnings
    assert any("label limit 9 exceeded" in w for w in warnings), warnings
    assert any(f"sample limit {scraped - 1} exceeded" in w for w in warnings), warnings


def test_a_reload_that_changes_only_a_jobs_limit_applies_it():
    """SIGHUP with a target whose URL and labels stay the same but whose label_limit is new:
    the scraper restarts its loop with the changed target, and the new limit applies from
    the next scrape on."""
    node = SimulatedNode(2, seed=5)

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                text = textwrap.dedent(f"""
                    global: {{interval: 300ms, timeout: 300ms}}
                    targets: [{{name: dcgm, endpoints: [{{url: "{ex.url}"}}]LIMIT}}]
                    outputs: [{{type: compact, url: "{rx.compact_url}"}}]
                    listen: 127.0.0.1:0
                    """)
                configs = iter([C.load_config(text.replace("LIMIT", ", label_limit: 9"))])
                app = RelayApp(C.load_config(text.replace("LIMIT", "")), loader=lambda: next(configs))
                task = asyncio.create_task(app.run(install_signals=False))
                await asyncio.sleep(1.0)
                assert await app.reload()
                reloaded_ms = time.time() * 1000
                await asyncio.sleep(1.0)
                app.stop()
                await task
                rx.flush()
                return rx.received_samples(), reloaded_ms
            finally:
                rx.stop()

    samples, reloaded_ms = asyncio.run(main())
    ups = [(ts, v) for _t, name, _l, v, ts in samples if name == "up"]
    before = {v for ts, v in ups if ts < reloaded_ms - 350}
    after = {v for ts, v in ups if ts > reloaded_ms + 50}
    assert before == {1.0} and after == {0.0}, ups


def test_changed_metric_relabeling_applies_from_the_next_scrape():
    """A reload that changes only an endpoint's metric_relabel_configs takes effect, and so
    does a target source handing over the same target with other rules (an edited PodMonitor)."""
    node = SimulatedNode(2, seed=5)

    async def main():
        async with ExporterServer(node) as ex:
            rx = CompactReceiver().start()
            try:
                text = textwrap.dedent(f"""
                    global: {{interval: 300ms, timeout: 300ms}}
                    targets: [{{name: dcgm, endpoints: [{{url: "{ex.url}"RULES}}]}}]
                    outputs: [{{type: compact, url: "{rx.compact_url}"}}]
                    listen: 127.0.0.1:0
                    """)
                keep = ', metric_relabel_configs: [{{source_labels: [gpu], regex: "{}|", action: keep}}]'
                configs = iter([C.load_config(text.replace("RULES", keep.format(0)))])
                app = RelayApp(C.load_config(text.replace("RULES", "")), loader=lambda: next(configs))
                task = asyncio.create_task(app.run(install_signals=False))
                marks = []
                await asyncio.sleep(1.0)
                assert await app.reload()
                marks.append(time.time() * 1000)
                await asyncio.sleep(1.0)
                edited = C.static_targets(C.load_config(text.replace("RULES", keep.format(1))), {})
                app._source_targets = {0: edited}
                await app._apply_targets()
                marks.append(time.time() * 1000)
                await asyncio.sleep(1.0)
                app.stop()
                await task
                rx.flush()
                return rx.received_samples(), marks
            finally:
                rx.stop()

    samples, (reloaded, edited) = asyncio.run(main())
    gpus = [(ts, dict(labels).get("gpu")) for _t, name, labels, _v, ts in samples if name.startswith("DCGM_")]

    def seen(lo, hi):
        return {g for ts, g in gpus if lo < ts < hi}

    assert seen(0, reloaded - 350) == {"0", "1"}
    assert seen(reloaded + 350, edited - 350) == {"0"}
    assert seen(edited + 350, float("inf")) == {"1"}


# -- label limits, unit: what counts ---------------------------------------------------------------
def _limited(body: str, **limits):
    from dcgmrelay.app import _label_limit_problem
    from dcgmrelay.targets import ScrapeLimits

    return _label_limit_problem(dcgmrelay.parse(body.encode()), ScrapeLimits(**limits), {})


def test_label_limit_counts_name_and_set_labels_as_prometheus():
    """label_limit counts every label of a series, __name__ included (Prometheus'
    verifyLabelLimits: lset.Len() of the series with its name); a label with an empty value is
    no label (Prometheus drops it; so do the encoders) and does not count."""
    body = 'm{a="1",b="2"} 1\nm{a="1",b="2",c=""} 2\n'
    assert _limited(body, label_limit=3) is None  # a, b, __name__
    assert _limited(body, label_limit=2) == "label limit 2 exceeded: series 'm' has 3 labels (__name__ counted)"
    assert _limited(body, label_limit=0) is None and _limited(body) is None  # 0 / None: no limit


def test_label_length_limits_count_bytes_and_include_the_metric_name():
    """Name and value lengths are UTF-8 bytes (Go's len, as Prometheus measures); __name__ is a
    label like the others: its value (the metric name) meets label_value_length_limit and its
    name (8 bytes) label_name_length_limit."""
    body = 'm{gpu="\u00e9\u00e9\u00e9"} 1\n'  # the value is 3 characters, 6 bytes
    assert _limited(body, label_value_length_limit=6) is None
    assert _limited(body, label_value_length_limit=5) == (
        "label value length limit 5 exceeded: series 'm' label 'gpu' has a value of 6 bytes")
    assert _limited('a_very_long_metric_name{gpu="0"} 1\n', label_value_length_limit=10) == (
        "label value length limit 10 exceeded: series 'a_very_long_metric_name' label '__name__' has a value "
        "of 23 bytes")
    assert _limited(body, label_name_length_limit=8) is None
    assert _limited(body, label_name_length_limit=7) == (
        "label name length limit 7 exceeded: series 'm' has label name '__name__' (8 bytes)")
    assert _limited('m{a_long_label="0"} 1\n', label_name_length_limit=10) == (
        "label name length limit 10 exceeded: series 'm' has label name 'a_long_label' (12 bytes)")
    long_name = "n" * 80  # shown cut to 50 characters, as Prometheus' %.50s
    said = _limited(f'm{{{long_name}="0"}} 1\n', label_name_length_limit=60)
    assert said is not None and "'" + "n" * 50 + "...'" in said and "(80 bytes)" in said


def test_label_limits_only_count_label_sets_a_sample_uses():
    """A label set of the table that no sample uses (its samples dropped) is not checked;
    the verdict per table entry is memoised while the tables and limits stay the same."""
    import numpy as np

    from dcgmrelay._parser_py import TS_ABSENT, RawScrape
    from dcgmrelay.app import _label_limit_problem
    from dcgmrelay.scrape import Scrape
    from dcgmrelay.targets import ScrapeLimits

    labelsets = ((("a", "1"),), (("a", "1"), ("b", "2"), ("c", "3")))
    def scrape(labelset_ids):
        n = len(labelset_ids)
        raw = RawScrape(np.ones(n), np.full(n, TS_ABSENT, dtype=np.int64), np.zeros(n, dtype=np.int32),
                        np.array(labelset_ids, dtype=np.int32), ("m",), labelsets, {}, (), 0, 0)
        return Scrape(raw, format="prometheus")

    limits = ScrapeLimits(label_limit=3)
    memo: dict = {}
    assert _label_limit_problem(scrape([0, 0]), limits, memo) is None  # the 4-label set is unused
    assert memo["bad_ls"] == {1: ("count", "", 4)}
    table = memo["labelsets"]
    assert _label_limit_problem(scrape([0, 1]), limits, memo) == (
        "label limit 3 exceeded: series 'm' has 4 labels (__name__ counted)")
    assert memo["labelsets"] is table  # same tables: not checked again
    assert _label_limit_problem(scrape([]), limits, {}) is None


# -- the process: signals -------------------------------------------------------------------------
def _start_exporter_process(tmp_path: Path, n_gpus: int = 4, seed: int = 1) -> tuple[subprocess.Popen, str]:
    code = textwrap.dedent(f"""
        import asyncio, sys
        from dcgmrelay.simulate import ExporterServer, SimulatedNode
        async def main():
            async with ExporterServer(SimulatedNode({n_gpus}, seed={seed}, collect_interval=0.5)) as ex:
                print(ex.url, flush=True)
                await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def _relay_process(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dcgmrelay", "run", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _wait_ready(listen: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{listen}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("relay did not become ready")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_flushes_and_exits_in_bounded_time(tmp_path):
    exp, url = _start_exporter_process(tmp_path)
    rx = CompactReceiver().start()
    listen = f"127.0.0.1:{_free_port()}"
    try:
        p = _relay_process(["--target", url, "--compact", rx.compact_url, "--interval", "500ms",
                            "--listen", listen, "--shutdown-timeout", "5"], tmp_path / "relay.log")
        _wait_ready(listen)
        time.sleep(1.5)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=15)
        took = time.monotonic() - t0
        log = (tmp_path / "relay.log").read_text()
        assert rc == 0, log
        assert took < 8, took  # the shutdown timeout (5 s) plus process exit
        assert "stopped" in log
        assert rx.stats["batches_received"] >= 2
    finally:
        exp.kill()
        rx.stop()


def test_sighup_reloads_targets_without_losing_delta_state(tmp_path):
    exp_a, url_a = _start_exporter_process(tmp_path, seed=1)
    exp_b, url_b = _start_exporter_process(tmp_path, seed=2)
    rx = CompactReceiver().start()
    listen = f"127.0.0.1:{_free_port()}"
    conf = tmp_path / "relay.yaml"

    def write(targets):
        conf.write_text(yaml_config(targets, rx.compact_url, listen))

    try:
        write([url_a])
        p = _relay_process(["--config", str(conf)], tmp_path / "relay.log")
        _wait_ready(listen)
        time.sleep(1.5)
        write([url_a, url_b])
        p.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
        log = (tmp_path / "relay.log").read_text()
        assert "config reloaded" in log, log
        targets = {s[0] for s in rx.received_samples()}
        assert {url_a, url_b} <= targets
        # target A kept its delta state across the reload: no second first observation
        energy = [(ts, d) for b in list(rx.batches) if b.target == url_a
                  for n, d, ts in zip([b.names[i] for i in b.name_ids.tolist()], b.deltas.tolist(),
                                      b.timestamps.tolist())
                  if n == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
        first_ts = min(ts for ts, _ in energy)
        assert all(d == d for ts, d in energy if ts > first_ts)  # a delta on every later scrape
    finally:
        exp_a.kill()
        exp_b.kill()
        rx.stop()


def yaml_config(targets, compact_url, listen, extra=""):
    return textwrap.dedent(f"""
        targets:
          - name: dcgm
            endpoints:
        """) + "".join(f"      - url: {u}\n" for u in targets) + textwrap.dedent(f"""
        global:
          interval: 500ms
          timeout: 500ms
        outputs:
          - name: collector
            type: compact
            url: {compact_url}
        listen: "{listen}"
        """) + extra


def test_kill_9_and_restart_loses_nothing(tmp_path):
    """kill -9 while the collector is down (batches spooled), restart: everything arrives."""
    from dcgmrelay._http import HttpServer

    exp, url = _start_exporter_process(tmp_path)
    rx = CompactReceiver().start()
    listen = f"127.0.0.1:{_free_port()}"
    conf = tmp_path / "relay.yaml"
    gate = {"up": False}

    async def proxy(method, path, query, headers, body):
        if not gate["up"]:
            return 503, {}, b"down\n"
        r = httpx.post(rx.compact_url, content=body, headers={k: v for k, v in headers.items()
                                                              if k.lower().startswith(("content-", "x-"))})
        return r.status_code, {"Content-Type": r.headers.get("content-type", "text/plain")}, r.content

    async def run_proxy(stop):
        async with HttpServer(proxy) as px:
            stop["url"] = px.url
            while not stop.get("done"):
                await asyncio.sleep(0.05)

    import threading

    ctl: dict = {}
    th = threading.Thread(target=lambda: asyncio.run(run_proxy(ctl)), daemon=True)
    th.start()
    while "url" not in ctl:
        time.sleep(0.01)
    extra = textwrap.dedent(f"""
        spool:
          dir: {tmp_path / 'spool'}
          fsync: batch
        relay:
          state_path: {tmp_path / 'state.npz'}
          first_observation: zero
        """)
    conf.write_text(yaml_config([url], ctl["url"] + "/api/v1/compact", listen, extra).replace(
        "    url: " + ctl["url"], "    retry: {min_backoff: 50ms, max_backoff: 100ms, max_elapsed: 200ms}\n"
        "    url: " + ctl["url"]))
    try:
        p = _relay_process(["--config", str(conf)], tmp_path / "relay1.log")
        _wait_ready(listen)
        time.sleep(3.0)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        spooled = sorted((tmp_path / "spool").rglob("*.seg"))
        assert spooled, (tmp_path / "relay1.log").read_text()
        gate["up"] = True
        p2 = _relay_process(["--config", str(conf)], tmp_path / "relay2.log")
        _wait_ready(listen)
        time.sleep(3.0)
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(timeout=15) == 0
        rx.flush()
        per_ts: dict = {}
        for target, name, labels, value, ts in rx.received_samples():
            if name.startswith("DCGM_"):
                per_ts[ts] = per_ts.get(ts, 0) + 1
        # scrapes from before the kill (spooled) and after the restart both arrived, each whole
        assert len(per_ts) >= 8, per_ts
        assert set(per_ts.values()) <= {100, 200}  # 200: a batch delivered twice (in flight at the kill)
        dup = sum(1 for v in per_ts.values() if v == 200)
        assert dup <= 2, per_ts
        times = sorted(per_ts)
        gaps = [b - a for a, b in zip(times, times[1:])]
        # no scrape interval missing except across the restart itself (whose length is the
        # process start-up time: not asserted, it depends on the machine's load)
        assert len([g for g in gaps if g > 750]) <= 1, gaps
    finally:
        ctl["done"] = True
        exp.kill()
        rx.stop()


def test_spool_cap_reached_drops_oldest_and_counts_it(tmp_path, caplog):
    """Collector down long enough to fill a small spool: the oldest records go, counted and logged."""
    import logging

    from prometheus_client.parser import text_string_to_metric_families

    from dcgmrelay._http import HttpServer

    async def down(method, path, query, headers, body):
        return 503, {}, b"down\n"

    node = SimulatedNode(8, seed=9, collect_interval=0.2)

    async def main():
        async with HttpServer(down) as px, ExporterServer(node) as ex:
            cfg = _cfg(target=[ex.url], remote_write=[px.url + "/api/v1/write"], spool_dir=str(tmp_path / "spool"),
                       interval="200ms", timeout="200ms")
            out = C.config_to_dict(cfg, reveal_secrets=True)["outputs"][0]
            cfg = C.merge(cfg, {"outputs": [{**out, "retry": {"min_backoff": "20ms", "max_backoff": "50ms",
                                                              "max_elapsed": "100ms"}}],
                                "spool": {"dir": str(tmp_path / "spool"), "max_bytes": "96KiB",
                                          "segment_bytes": "16KiB"}})
            app = RelayApp(cfg)
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(4.0)
            async with httpx.AsyncClient() as c:
                metrics = (await c.get(app.url + "/metrics")).text
            app.stop()
            await task
            return metrics

    with caplog.at_level(logging.WARNING, logger="dcgmrelay.spool"):
        metrics = asyncio.run(main())
    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    dropped = {s.labels["reason"]: s.value for s in fams["dcgmrelay_spool_dropped_records"].samples
               if s.name.endswith("_total")}
    assert dropped["size_cap"] > 0
    pending = [s.value for s in fams["dcgmrelay_spool_bytes"].samples]
    assert pending and 0 < pending[0] <= 96 * 1024
    assert any("drop" in r.getMessage() for r in caplog.records)
