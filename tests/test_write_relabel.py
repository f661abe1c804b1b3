"""Per-output write_relabel_configs: the batch transform, its config, and two real collectors.

The reference for every batch is the rules applied sample by sample to the un-relabeled
batch (`RelabelRules.apply` on a dict per sample): what the vectorised transform must equal.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import pytest

import dcgmrelay
from dcgmrelay import config as C
from dcgmrelay.app import RelayApp
from dcgmrelay.csvspec import load_csv
from dcgmrelay.encode import DecoderState, Encoder, decode_batch
from dcgmrelay.relabel import RelabelRules, compile_rules
from dcgmrelay.relay import Relay, RelayBatch
from dcgmrelay.simulate import ExporterServer, SimulatedNode
from dcgmrelay.write_relabel import WriteRelabeler

SPEC = load_csv("default")
UTIL, FB, TEMP = "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP"

RULES: List[Dict[str, Any]] = [
    {"source_labels": ["__name__"], "regex": f"{UTIL}|{FB}|{TEMP}", "action": "keep"},
    {"action": "labeldrop", "regex": "modelName|pci_bus_id"},
    {"source_labels": ["__name__"], "regex": UTIL, "target_label": "__name__", "replacement": "gpu_util_percent"},
    {"source_labels": ["gpu"], "regex": "(.*)", "target_label": "card", "replacement": "card-$1"},
]

Row = Tuple[str, Tuple[Tuple[str, str], ...], float, str]


def rows(batch: RelayBatch) -> List[Row]:
    return sorted((n, tuple(sorted(lab.items())), v, k) for n, lab, v, k, _, _ in batch.samples())


def reference(batch: RelayBatch, rules: RelabelRules) -> List[Row]:
    out = []
    for n, lab, v, k, _, _ in batch.samples():
        r = rules.apply({"__name__": n, **lab}, drop_meta=False)
        if r is not None:
            name = r.pop("__name__")
            out.append((name, tuple(sorted(r.items())), v, k))
    return sorted(out)


def stale_ref(batch: RelayBatch, rules: RelabelRules) -> Set[Tuple[str, Tuple[Tuple[str, str], ...]]]:
    out = set()
    for n, lab in batch.stale_series():
        r = rules.apply({"__name__": n, **lab}, drop_meta=False)
        if r is not None:
            name = r.pop("__name__")
            out.add((name, tuple(sorted(r.items()))))
    return out


def feed(node: SimulatedNode, relay: Relay, t: float, target: str = "node-0:9400") -> RelayBatch:
    return relay.ingest(dcgmrelay.parse(node.render(t)), target=target, timestamp_ms=int(1000 + t * 1000))


def test_a_batch_relabeled_equals_the_rules_applied_sample_by_sample() -> None:
    node = SimulatedNode(4, seed=3, pods="some")
    relay = Relay(SPEC, include_non_dcgm=True, output="both")
    rules = compile_rules(RULES, path="t")
    w = WriteRelabeler(compile_rules(RULES, path="t"), output="o")
    total_dropped = 0
    for t in (0, 15, 30, 45):
        b = feed(node, relay, t)
        got = w.apply(b)
        want = reference(b, rules)
        assert rows(got) == want and want
        assert {n for n, *_ in want} == {"gpu_util_percent", FB, TEMP}
        assert not any(k in ("modelName", "pci_bus_id") for _, lab, _, _ in want for k, _ in lab)
        total_dropped += len(b) - len(want)
        assert w.dropped == total_dropped
        # the columns that are not relabeled travel with their samples
        assert set(got.field_ids.tolist()) <= set(b.field_ids.tolist())
        assert len(got.deltas) == len(got.kinds) == len(got.timestamps) == len(got)


def test_renamed_series_keep_their_family_and_entities_lose_dropped_labels() -> None:
    node = SimulatedNode(2, seed=5)
    relay = Relay(SPEC)
    b = feed(node, relay, 0)
    got = WriteRelabeler(compile_rules(RULES, path="t")).apply(b)
    assert got.families["gpu_util_percent"] == b.families[UTIL]
    assert UTIL not in got.families
    assert got.entities and all(e.model_name is None and e.pci_bus_id is None for e in got.entities)
    uuids = {dict(got.labelsets[i])["UUID"] for i in got.labelset_ids.tolist()}
    assert {got.entities[e].uuid for e in got.entity_ids.tolist()} == uuids


def test_a_steady_scrape_runs_no_rules_and_keeps_the_output_tables() -> None:
    node = SimulatedNode(4, seed=7, collect_interval=3600)
    relay = Relay(SPEC)
    w = WriteRelabeler(compile_rules(RULES, path="t"))
    feed(node, relay, 0)
    first = w.apply(feed(node, relay, 15))
    calls = w.rules.hits + w.rules.misses
    second = w.apply(feed(node, relay, 30))
    assert w.rules.hits + w.rules.misses == calls  # no rule ran: numpy lookups only
    # same objects: the encoders' per-table caches hit
    assert second.names is first.names and second.labelsets is first.labelsets
    assert np.array_equal(second.name_ids, first.name_ids)
    assert second.families is first.families  # the relay's families dict unchanged: the same one


def test_new_and_changed_tables_map_correctly() -> None:
    node = SimulatedNode(4, seed=9, pods="some")
    relay = Relay(SPEC, include_non_dcgm=True)
    rules = compile_rules(RULES, path="t")
    w = WriteRelabeler(compile_rules(RULES, path="t"))
    for t in (0, 15):
        w.apply(feed(node, relay, t))
    node.remove_gpu(1)  # its series end: stale markers, for the kept ones only
    b = feed(node, relay, 30)
    got = w.apply(b)
    assert rows(got) == reference(b, rules)
    stale = {(n, tuple(sorted(lab.items()))) for n, lab in got.stale_series()}
    assert stale == stale_ref(b, rules) and stale
    assert len(stale) < len(b.stale_name_ids)  # the dropped names' series end nowhere
    node.restore_gpu(1)
    b = feed(node, relay, 45)
    assert rows(w.apply(b)) == reference(b, rules)
    # another target through the same output: its own tables
    other = feed(SimulatedNode(2, seed=1), relay, 45, target="node-1:9400")
    assert rows(w.apply(other)) == reference(other, rules)


def test_everything_dropped_and_nothing_dropped() -> None:
    node = SimulatedNode(2, seed=2)
    relay = Relay(SPEC)
    b = feed(node, relay, 0)
    none = WriteRelabeler(compile_rules([{"source_labels": ["__name__"], "regex": ".+", "action": "drop"}],
                                        path="t")).apply(b)
    assert len(none) == 0 and none.entities == () and len(none.entity_ids) == 0
    w = WriteRelabeler(compile_rules([{"action": "labeldrop", "regex": "nothing_has_this"}], path="t"))
    same = w.apply(b)
    assert rows(same) == rows(b) and w.dropped == 0
    assert same.values is b.values  # nothing dropped: no copy of the columns


def test_relabeled_batches_encode_to_what_they_hold() -> None:
    from test_encode import expected_samples, rw1_decode

    node = SimulatedNode(2, seed=4)
    relay = Relay(SPEC, output="both")
    w = WriteRelabeler(compile_rules(RULES, path="t"))
    rw1, compact = Encoder("remote-write-1"), Encoder("compact")
    state = DecoderState()
    for t in (0, 15, 30):
        raw = feed(node, relay, t)
        b = w.apply(raw)
        got, meta, _ = rw1_decode(rw1.encode(b)[0])
        assert sorted(got) == sorted((k, v, ts) for k, v, ts, _ in expected_samples(b))
        if t == 0:  # metadata goes with the first batch (then when it changes)
            assert meta["gpu_util_percent"] == raw.families[UTIL] == b.families["gpu_util_percent"]
        d = decode_batch(compact.encode(b)[0], state=state)
        assert len(d.values) == len(b) and np.array_equal(d.values, b.values, equal_nan=True)
        # the entity rows carry no label the rules removed
        assert all(e.model_name is None for e in d.entities)


def test_external_labels_are_added_where_absent_and_before_the_output_rules() -> None:
    from dcgmrelay.write_relabel import external_label_rules

    node = SimulatedNode(2, seed=6, pods="some")
    relay = Relay(SPEC)
    b = feed(node, relay, 0)
    assert any("namespace" in dict(ls) for ls in b.labelsets)
    rules = external_label_rules({"cluster": "gpu-$1", "namespace": "fallback"}) + [
        {"source_labels": ["cluster", "__name__"], "regex": f"gpu-.*;{TEMP}", "action": "keep"}]
    got = rows(WriteRelabeler(compile_rules(rules, path="t")).apply(b))
    assert got and {n for n, *_ in got} == {TEMP}  # the output's rules see the external labels
    own = {dict(lab)["namespace"] for n, lab, _, _ in rows(b) if n == TEMP and "namespace" in dict(lab)}
    assert own and own != {"fallback"}
    for _, lab, _, _ in got:
        d = dict(lab)
        assert d["cluster"] == "gpu-$1"  # literal: no group reference
        assert d["namespace"] in own | {"fallback"}  # a series' own label wins
    assert {dict(lab)["namespace"] for _, lab, _, _ in got} == own | {"fallback"}


# -- config ----------------------------------------------------------------------------------------
def test_config_reads_write_relabel_configs_and_prints_them_back() -> None:
    cfg = C.load_config(textwrap.dedent("""
        targets: [{name: t, endpoints: [{url: "http://127.0.0.1:9400/metrics"}]}]
        outputs:
          - name: subset
            type: remote-write
            url: http://127.0.0.1:9090/api/v1/write
            write_relabel_configs:
              - {source_labels: [__name__], regex: "DCGM_FI_DEV_GPU_UTIL", action: keep}
              - {action: labeldrop, regex: pod|namespace}
    """))
    (o,) = cfg.outputs
    assert [r["action"] for r in o.write_relabel_configs] == ["keep", "labeldrop"]
    again = C.load_config(C.effective_config_text(cfg))
    assert again.outputs[0].write_relabel_configs == o.write_relabel_configs


def test_a_bad_write_relabel_rule_names_its_yaml_path() -> None:
    with pytest.raises(C.ConfigError) as e:
        C.load_config(textwrap.dedent("""
            targets: [{name: t, endpoints: [{url: "http://127.0.0.1:9400/metrics"}]}]
            outputs:
              - type: remote-write
                url: http://127.0.0.1:9090/api/v1/write
                write_relabel_configs:
                  - {action: keep, regex: "("}
        """))
    msg = str(e.value)
    assert "outputs[0].write_relabel_configs[0].regex" in msg and "<text>:7:" in msg, msg


# -- end to end: one exporter, two collectors, one of them gets a relabeled subset -------------------
def test_each_output_gets_what_its_rules_let_through(victoria_metrics_server, prometheus_server, tmp_path) -> None:
    node = SimulatedNode(4, seed=12, collect_interval=3600)  # values frozen

    async def main() -> Tuple[str, RelayApp, str]:
        async with ExporterServer(node) as ex:
            path = tmp_path / "relay.yaml"
            path.write_text(textwrap.dedent(f"""
                global: {{interval: 500ms, timeout: 500ms}}
                targets: [{{name: dcgm-exporter, endpoints: [{{url: "{ex.url}"}}]}}]
                outputs:
                  - name: all
                    type: remote-write
                    url: {victoria_metrics_server.remote_write_url}
                  - name: subset
                    type: remote-write
                    url: {prometheus_server.remote_write_url}
                    write_relabel_configs:
                      - {{source_labels: [__name__], regex: "{UTIL}|{TEMP}|up", action: keep}}
                      - {{action: labeldrop, regex: modelName}}
                      - {{source_labels: [__name__], regex: {UTIL}, target_label: __name__,
                          replacement: gpu_util_percent}}
                listen: 127.0.0.1:0
            """))
            app = RelayApp(C.load_config(str(path)))
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(2.2)
            import httpx
            async with httpx.AsyncClient() as c:
                metrics = (await c.get(app.url + "/metrics")).text
            app.stop()
            await task
            return ex.url, app, metrics

    url, app, metrics = asyncio.run(main())
    instance = url.split("/")[2]
    s = dcgmrelay.parse(node.render(0.0))
    keep = load_csv("default").mask(s.field_ids)
    everything = {(n, tuple(sorted(lab.items()))): v for (n, lab, v, _), k in zip(s.samples(), keep) if k}

    def read(server: Any) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
        got = {}
        for row in server.query(f'{{instance="{instance}"}}'):
            labels = dict(row["metric"])
            name = labels.pop("__name__")
            if name.startswith("scrape_"):
                continue
            labels.pop("job"), labels.pop("instance")
            got[(name, tuple(sorted(labels.items())))] = float(row["value"][1])
        return got

    vm = read(victoria_metrics_server)
    assert {k: v for k, v in vm.items() if k[0] != "up"} == pytest.approx(everything, rel=1e-12)
    want = {}
    for (n, lab), v in everything.items():
        if n in (UTIL, TEMP):
            want[("gpu_util_percent" if n == UTIL else n, tuple(p for p in lab if p[0] != "modelName"))] = v
    want[("up", ())] = 1.0
    assert read(prometheus_server) == want
    sent = app.outputs["subset"].output.stats.samples_sent
    dropped = app.outputs["subset"].relabel.dropped  # type: ignore[union-attr]
    assert sent > 0 and dropped > sent
    line = [ln for ln in metrics.splitlines()
            if ln.startswith('dcgmrelay_output_samples_dropped_total{output="subset",reason="write_relabel"}')]
    assert line and float(line[0].split()[-1]) > 0
    assert 'dcgmrelay_output_samples_dropped_total{output="all",reason="write_relabel"} 0.0' in metrics



def test_an_outputs_dropped_samples_keep_the_transports_reasons() -> None:
    from dcgmrelay.app import _OutputSlot
    from dcgmrelay.selfmetrics import output_families

    oc = C.load_config(textwrap.dedent("""
        targets: [{name: t, endpoints: [{url: "http://127.0.0.1:9400/metrics"}]}]
        outputs: [{name: o, type: remote-write, url: "http://127.0.0.1:9/api/v1/write",
                   write_relabel_configs: [{action: drop, source_labels: [__name__], regex: up}]}]
    """)).outputs[0]
    slot = _OutputSlot(oc, C.SpoolConfig())
    slot.output.stats.dropped_samples["http_400"] = 7  # as the transport counts a rejected batch
    assert slot.relabel is not None
    slot.relabel.dropped = 3
    fams = {f.name: f for f in output_families({"o": {**slot.output.stats.as_dict(),
                                                       "dropped_samples": slot.dropped_samples()}})}
    got = {s.labels["reason"]: s.value for s in fams["dcgmrelay_output_samples_dropped"].samples}
    assert got == {"http_400": 7, "write_relabel": 3}


# -- global.external_labels -----------------------------------------------------------------------
def test_external_labels_from_file_flags_and_environment() -> None:
    text = textwrap.dedent("""
        global: {external_labels: {cluster: gpu-a, region: eu}}
        targets: [{name: t, endpoints: [{url: "http://127.0.0.1:9400/metrics"}]}]
        outputs: [{type: remote-write, url: "http://127.0.0.1:9090/api/v1/write"}]
    """)
    cfg = C.load_config(text)
    assert cfg.global_external_labels == {"cluster": "gpu-a", "region": "eu"}
    assert C.load_config(C.effective_config_text(cfg)).global_external_labels == cfg.global_external_labels
    base = {"target": ["127.0.0.1:9400"], "remote_write": ["http://127.0.0.1:9090/api/v1/write"]}
    flags = C.config_from_args({**base, "external_label": ["cluster=b", "note=x=y"]},
                               env={"DCGMRELAY_EXTERNAL_LABELS": "cluster=env"})
    assert flags.global_external_labels == {"cluster": "b", "note": "x=y"}  # the flag wins
    env = C.config_from_args(base, env={"DCGMRELAY_EXTERNAL_LABELS": "cluster=env, rack=r1"})
    assert env.global_external_labels == {"cluster": "env", "rack": "r1"}
    for bad, why in (("cluster", "expected NAME=VALUE"), ("__x=1", "reserved"), ("c=", "needs a value"),
                     ("1c=2", "invalid label name")):
        with pytest.raises(C.ConfigError, match=why) as e:
            C.config_from_args({**base, "external_label": [bad]}, env={})
        assert "--external-label" in str(e.value)
    with pytest.raises(C.ConfigError) as e:
        C.load_config(text.replace("region: eu", "__region: eu"))
    assert "global.external_labels.__region" in str(e.value) and "<text>:2:" in str(e.value)


def test_external_labels_reach_the_collector_where_a_series_lacks_them(victoria_metrics_server, tmp_path) -> None:
    async def main() -> Tuple[str, str, RelayApp]:
        async with ExporterServer(SimulatedNode(2, seed=21)) as a, ExporterServer(SimulatedNode(2, seed=22)) as b:
            text = textwrap.dedent(f"""
                global: {{interval: 500ms, timeout: 500ms, external_labels: {{cluster: EXT, site: s1}}}}
                targets:
                  - name: dcgm-exporter
                    endpoints: [{{url: "{a.url}"}}, {{url: "{b.url}", labels: {{cluster: own}}}}]
                outputs: [{{name: vm, type: remote-write, url: {victoria_metrics_server.remote_write_url}}}]
                listen: 127.0.0.1:0
            """)
            configs = iter([C.load_config(text.replace("EXT", "gpu-b"))])
            app = RelayApp(C.load_config(text.replace("EXT", "gpu-a")), loader=lambda: next(configs))
            task = asyncio.create_task(app.run(install_signals=False))
            await asyncio.sleep(1.6)
            first = app.outputs["vm"]
            assert await app.reload()  # external labels changed: the output is rebuilt with them
            assert app.outputs["vm"] is not first and app.outputs["vm"].external_labels["cluster"] == "gpu-b"
            await asyncio.sleep(1.2)
            app.stop()
            await task
            return a.url.split("/")[2], b.url.split("/")[2], app

    ia, ib, app = asyncio.run(main())
    for inst, clusters in ((ia, {"gpu-a", "gpu-b"}), (ib, {"own"})):  # gpu-b: after the reload
        deadline = time.monotonic() + 10
        while True:  # VictoriaMetrics may take a moment to make series it just indexed searchable
            rows = victoria_metrics_server.query(f'{{instance="{inst}"}}')
            got = {row["metric"].get("cluster") for row in rows}
            if got == clusters or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert len(rows) > 10
        assert got == clusters
        # up and the scrape_* series too
        assert all(row["metric"].get("site") == "s1" for row in rows), rows
