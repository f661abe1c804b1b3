"""The relay process with PodMonitor discovery on a real kube-apiserver, and target sharding."""

from __future__ import annotations

import asyncio
import textwrap
import time

from dcgmrelay import config as C
from dcgmrelay.app import RelayApp
from dcgmrelay.receiver import CompactReceiver
from dcgmrelay.targets import Target, shard_of, shard_targets

from fixtures_kube import kube_apiserver  # noqa: F401  (pytest fixture)
from test_discovery import Exporters, _uid, running_pod


def _relay_over_podmonitor(kube, tmp_path, ns: str, target_yaml: str, rx: CompactReceiver, *,
                           seconds: float = 3.0, during=None) -> None:
    """Run the relay in-process with one PodMonitor target (``target_yaml``: its keys after
    ``type``, indented for the list item) into ``rx`` for ``seconds``; ``during()``, a
    coroutine function, runs once the first ``seconds`` have passed, then two more seconds."""
    token = kube.write_token_file(str(tmp_path / "token"))
    conf = tmp_path / "relay.yaml"
    conf.write_text(textwrap.dedent(f"""
        global: {{interval: 500ms, timeout: 500ms}}
        targets:
          - name: gpu-exporters
            type: podmonitor
            namespace_selector: {{match_names: [{ns}]}}
            selector: {{match_labels: {{app: custom-dcgm}}}}
        """) + textwrap.indent(textwrap.dedent(target_yaml), " " * 4) + textwrap.dedent(f"""
        outputs:
          - {{name: collector, type: compact, url: {rx.compact_url}}}
        relay: {{include_non_dcgm: true}}
        kubernetes: {{api_url: {kube.url}, token_file: {token}, ca_file: {kube.ca_file}}}
        listen: "127.0.0.1:0"
        """))
    cfg = C.load_config(str(conf))

    async def main():
        app = RelayApp(cfg)
        task = asyncio.create_task(app.run(install_signals=False))
        await asyncio.sleep(seconds)
        if during is not None:
            await during()
            await asyncio.sleep(2.0)
        app.stop()
        await task

    asyncio.run(main())
    rx.flush()


def test_relay_scrapes_exactly_the_pods_the_podmonitor_selects(kube_apiserver, tmp_path):  # noqa: F811
    kube = kube_apiserver
    ns = f"gpu-{_uid()}"
    kube.create_namespace(ns)
    exporters = Exporters()
    rx = CompactReceiver().start()
    try:
        matching = [running_pod(kube, exporters, ns, f"dcgm-{i}", {"app": "custom-dcgm"}) for i in range(3)]
        running_pod(kube, exporters, ns, "other", {"app": "something-else"})

        async def relabel_one_out():
            # relabel one pod out of the selector: its target goes, its series end
            await asyncio.to_thread(kube.relabel, ns, "dcgm-0", {"app": "retired"})

        t_relabel = time.time() + 3.0
        _relay_over_podmonitor(kube, tmp_path, ns, 'endpoints: [{port: "9400", path: /metrics}]\n', rx,
                               during=relabel_one_out)
        samples = rx.received_samples()
        pods = {labels.get("pod") for _t, name, labels, _v, _ts in samples if name == "DCGM_FI_DEV_GPU_TEMP"}
        assert pods == {"dcgm-0", "dcgm-1", "dcgm-2"}  # never "other"
        scraped_ips = {t.split("//")[1].split(":")[0] for t, *_ in samples}
        assert scraped_ips == set(matching)
        late = {labels.get("pod") for _t, name, labels, _v, ts in samples
                if name == "DCGM_FI_DEV_GPU_TEMP" and ts > (t_relabel + 1.0) * 1000}
        assert "dcgm-0" not in late and late  # relabelled out: no longer scraped, the others are
        # the endpoint does not set add_node_label: no node label on any series (up included)
        assert samples and not any("node" in labels for _t, _n, labels, _v, _ts in samples)
    finally:
        exporters.close()
        rx.stop()


def test_relay_applies_podmonitor_relabel_and_metric_relabel_configs(kube_apiserver, tmp_path):  # noqa: F811
    """relabelConfigs choose and label the discovered targets (pod meta labels), an
    endpoint's metricRelabelConfigs filter what is scraped from each of them, its
    add_node_label gives every series the pod's node."""
    kube = kube_apiserver
    ns = f"gpu-{_uid()}"
    kube.create_namespace(ns)
    exporters = Exporters()
    rx = CompactReceiver().start()
    try:
        for i in range(3):
            running_pod(kube, exporters, ns, f"dcgm-{i}", {"app": "custom-dcgm", "pool": f"pool-{i}"})
        _relay_over_podmonitor(kube, tmp_path, ns, """
            relabel_configs:
              - {source_labels: [__meta_kubernetes_pod_name], regex: dcgm-2, action: drop}
              - {source_labels: [__meta_kubernetes_pod_label_pool], target_label: gpu_pool}
            endpoints:
              - port: "9400"
                add_node_label: true
                metric_relabel_configs:
                  - {source_labels: [pod], regex: dcgm-1, action: drop}
            """, rx)
        samples = rx.received_samples()
        temps = [labels for _t, name, labels, _v, _ts in samples if name == "DCGM_FI_DEV_GPU_TEMP"]
        ups = {labels.get("pod"): labels for _t, name, labels, _v, _ts in samples if name == "up"}
        assert {lb["pod"] for lb in temps} == {"dcgm-0"}  # dcgm-1's samples relabelled away
        assert {lb["gpu_pool"] for lb in temps} == {"pool-0"}
        assert set(ups) == {"dcgm-0", "dcgm-1"}  # dcgm-2 is no target; dcgm-1 is scraped
        assert ups["dcgm-1"]["gpu_pool"] == "pool-1"
        assert {lb.get("node") for lb in temps} | {lb.get("node") for lb in ups.values()} == {"gpu-node-1"}
    finally:
        exporters.close()
        rx.stop()


def _targets(n):
    return [Target(f"http://10.{i // 250}.{i % 250}.7:9400/metrics") for i in range(n)]


def test_shards_scrape_every_target_exactly_once():
    ts = _targets(1000)
    for n in (1, 2, 3, 7):
        shards = [shard_targets(ts, i, n) for i in range(n)]
        keys = [t.key for s in shards for t in s]
        assert sorted(keys) == sorted(t.key for t in ts)  # each exactly once
        assert min(len(s) for s in shards) > 1000 / n * 0.7  # and spread evenly


def test_changing_shard_count_moves_few_targets():
    ts = _targets(2000)
    before = {t.key: shard_of(t.key, 4) for t in ts}
    after = {t.key: shard_of(t.key, 5) for t in ts}
    moved = sum(before[k] != after[k] for k in before)
    assert moved < 2000 * (1 / 5) * 1.25  # ~1/n move (rendezvous hashing), not a reshuffle
    assert all(after[k] == 4 for k in before if before[k] != after[k])  # only to the new shard


def test_shard_flag_reaches_the_config():
    cfg = C.config_from_args({"target": ["http://127.0.0.1:9400/metrics"], "remote_write": ["http://127.0.0.1:1/w"],
                              "shard": "1/3"}, env={})
    assert cfg.shard == (1, 3)
