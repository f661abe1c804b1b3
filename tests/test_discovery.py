"""Kubernetes PodMonitor discovery: unit tests (no server) and end-to-end scenarios
against a real kube-apiserver + etcd (``kube_apiserver`` fixture, tests/kube.py).

End-to-end: pods are created through the API, get 127.77.x.y IPs through the
status subresource, and a simulated exporter is bound to each address; every
discovered target URL is fetched and must return the body of *its* pod's exporter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import httpx
import pytest

from dcgmrelay.discovery import (
    KubeConfigError,
    KubeCredentials,
    KubeForbiddenError,
    LabelSelector,
    NamespaceSelector,
    PodMetricsEndpoint,
    PodMonitor,
    PodMonitorDiscovery,
    add_kube_arguments,
    credentials_from_args,
    label_selector_string,
    monitors_from_targets,
    parse_duration,
    pod_targets,
    resolve_node_name,
)
from dcgmrelay.targets import Target, TargetSource

from fixtures_kube import kube_apiserver  # noqa: F401  (pytest fixture)

# The WhatapAgent openAgent targets of the seed document (inline: tests never read shared notes).
SEED_TARGETS = [
    {"targetName": "whatap-dcgm-exporter", "type": "PodMonitor", "enabled": True,
     "namespaceSelector": {"matchNames": ["whatap-monitoring"]},
     "selector": {"matchLabels": {"name": "whatap-node-agent"}},
     "endpoints": [{"port": "9400", "path": "/metrics", "interval": "15s", "scheme": "http"}]},
    {"targetName": "customer-dcgm-exporter", "type": "PodMonitor", "enabled": True,
     "namespaceSelector": {"matchNames": ["gpu-monitoring", "default"]},
     "selector": {"matchLabels": {"app": "custom-dcgm", "component": "gpu-exporter"}},
     "endpoints": [{"port": "9400", "path": "/metrics", "interval": "15s", "scheme": "http"}]},
]


# =========================================================================== unit: selectors


def test_label_selector_string_seed():
    assert label_selector_string(SEED_TARGETS[1]["selector"]) == "app=custom-dcgm,component=gpu-exporter"
    assert label_selector_string(SEED_TARGETS[0]["selector"]) == "name=whatap-node-agent"


def test_label_selector_string_expressions():
    sel = {"matchLabels": {"run": "x1"},
           "matchExpressions": [
               {"key": "app", "operator": "In", "values": ["dcgm-exporter", "custom-dcgm", "custom-dcgm"]},
               {"key": "tier", "operator": "NotIn", "values": ["canary"]},
               {"key": "nvidia.com/gpu.present", "operator": "Exists"},
               {"key": "batch", "operator": "DoesNotExist"}]}
    assert label_selector_string(sel) == (
        "app in (custom-dcgm,dcgm-exporter),!batch,nvidia.com/gpu.present,run=x1,tier notin (canary)")
    assert label_selector_string({}) == ""
    assert label_selector_string(None) == ""
    assert label_selector_string(LabelSelector(match_labels={"a": ""})) == "a="


@pytest.mark.parametrize("bad", [
    {"matchLabels": {"app": "a,b"}},                                         # injection
    {"matchLabels": {"app": "x) or (y"}},
    {"matchLabels": {"bad key": "v"}},
    {"matchLabels": {"/x": "v"}},
    {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]},
    {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
    {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
    {"matchExpressions": [{"key": "a", "operator": "NotIn"}]},
])
def test_label_selector_rejects(bad):
    with pytest.raises(ValueError):
        label_selector_string(bad)


@pytest.mark.parametrize("labels,expected", [
    ({"app": "custom-dcgm", "gpu": "1"}, True),
    ({"app": "dcgm-exporter", "gpu": "1", "tier": "prod"}, True),
    ({"app": "custom-dcgm", "gpu": "1", "tier": "canary"}, False),   # NotIn
    ({"app": "custom-dcgm"}, False),                                 # Exists
    ({"app": "custom-dcgm", "gpu": "1", "batch": ""}, False),        # DoesNotExist
    ({"app": "other", "gpu": "1"}, False),                           # In
    ({"gpu": "1"}, False),
])
def test_label_selector_matches(labels, expected):
    sel = LabelSelector.from_dict({"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["custom-dcgm", "dcgm-exporter"]},
        {"key": "tier", "operator": "NotIn", "values": ["canary"]},
        {"key": "gpu", "operator": "Exists"},
        {"key": "batch", "operator": "DoesNotExist"}]})
    assert sel.matches(labels) is expected


def test_label_selector_yaml_scalars():
    # YAML turns `gpu: 1` / `on: true` into int / bool; the API wants strings.
    assert label_selector_string({"matchLabels": {"gpu": 1, "enabled": True}}) == "enabled=true,gpu=1"


def test_parse_duration():
    assert parse_duration("15s") == 15.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1h") == 3600.0
    assert parse_duration(7) == 7.0
    assert parse_duration(None) is None
    for bad in ("x", "1s1m", "s", "15 s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_duration("15") == 15.0  # a bare number is seconds
    assert parse_duration("") is None


# =========================================================================== unit: PodMonitor


def test_monitors_from_seed_targets():
    mons = monitors_from_targets(SEED_TARGETS + [{"targetName": "off", "type": "PodMonitor", "enabled": False},
                                                 {"targetName": "svc", "type": "ServiceMonitor"}],
                                 namespace="whatap-monitoring")
    assert [m.name for m in mons] == ["whatap-dcgm-exporter", "customer-dcgm-exporter"]
    m = mons[1]
    assert m.namespace == "whatap-monitoring"
    assert m.namespaces() == ["gpu-monitoring", "default"]
    assert m.selector.match_labels == {"app": "custom-dcgm", "component": "gpu-exporter"}
    ep = m.endpoints[0]
    assert (ep.port, ep.path, ep.scheme, ep.interval) == ("9400", "/metrics", "http", 15.0)
    assert ep.port_rule() == ("number", 9400)  # the documented deviation


def test_podmonitor_shapes_and_namespaces():
    crd = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
           "metadata": {"name": "dcgm", "namespace": "gpu-operator"},
           "spec": {"selector": {"matchLabels": {"app": "nvidia-dcgm-exporter"}}, "jobLabel": "app",
                    "podMetricsEndpoints": [{"port": "metrics", "interval": "30s", "scrapeTimeout": "5s",
                                             "params": {"collect[]": ["a", "b"]}}]}}
    m = PodMonitor.from_dict(crd)
    assert (m.name, m.namespace, m.job_label) == ("dcgm", "gpu-operator", "app")
    assert m.namespaces() == ["gpu-operator"]          # neither any nor matchNames: own namespace
    assert m.endpoints[0].port_rule() == ("name", "metrics")
    assert m.endpoints[0].params == {"collect[]": ["a", "b"]}
    assert PodMonitor.from_dict({"name": "a", "namespaceSelector": {"any": True}}).namespaces() == [None]
    assert PodMonitor("x", namespace_selector=NamespaceSelector(match_names=["b", "a", "b"])).namespaces() == ["b", "a"]
    with pytest.raises(ValueError):
        NamespaceSelector(match_names=["Not_A_Namespace"])
    assert PodMetricsEndpoint(port_number=9400).port_rule() == ("number", 9400)
    assert PodMetricsEndpoint(target_port="metrics").port_rule() == ("name", "metrics")
    assert PodMetricsEndpoint(target_port=9400).port_rule() == ("number", 9400)
    assert PodMetricsEndpoint().port_rule() == ("any", None)
    assert PodMetricsEndpoint(port="metrics", port_number=1).port_rule() == ("name", "metrics")  # precedence


def test_podmonitor_limits_are_spec_level_and_reach_every_target():
    """prometheus-operator's PodMonitor has sampleLimit, labelLimit, labelNameLengthLimit and
    labelValueLengthLimit in its spec (not per endpoint): every target of every endpoint
    carries them; unset ones stay None (the relay's global limits apply); a value that is no
    integer >= 0 is refused."""
    from dcgmrelay.targets import ScrapeLimits

    crd = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
           "metadata": {"name": "dcgm", "namespace": "gpu-monitoring"},
           "spec": {"selector": {"matchLabels": {"app": "custom-dcgm"}}, "sampleLimit": 4000, "labelLimit": 0,
                    "labelValueLengthLimit": 128,
                    "podMetricsEndpoints": [{"port": "metrics"}, {"port": "metrics", "path": "/other"}]}}
    m = PodMonitor.from_dict(crd)
    assert m.limits == ScrapeLimits(sample_limit=4000, label_limit=0, label_value_length_limit=128)
    targets = pod_targets(_pod(), m)
    assert len(targets) == 2 and all(t.limits == m.limits for t in targets)
    assert SEED_MON.limits == ScrapeLimits()
    assert all(t.limits == ScrapeLimits() for t in pod_targets(_pod(), SEED_MON))
    for bad in (-1, "10", 2.5, True):
        with pytest.raises(ValueError, match="sampleLimit must be an integer >= 0"):
            PodMonitor.from_dict({**crd, "spec": {**crd["spec"], "sampleLimit": bad}})


def _pod(name="dcgm-0", ns="gpu-monitoring", labels=None, ip="10.0.0.5", phase="Running", node="gpu-node-1",
         containers=None, init_containers=None):
    spec: Dict[str, Any] = {"nodeName": node, "containers": containers if containers is not None else [
        {"name": "exporter", "ports": [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]}]}
    if init_containers:
        spec["initContainers"] = init_containers
    if labels is None:
        labels = {"app": "custom-dcgm", "component": "gpu-exporter"}
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec, "status": {"phase": phase, "podIP": ip}}


SEED_MON = PodMonitor.from_dict(SEED_TARGETS[1], namespace="whatap-monitoring")


def test_pod_targets_seed_rule():
    (t,) = pod_targets(_pod(), SEED_MON)
    assert t.url == "http://10.0.0.5:9400/metrics"
    assert dict(t.labels) == {"namespace": "gpu-monitoring", "pod": "dcgm-0", "container": "exporter",
                              "job": "customer-dcgm-exporter",
                              "instance": "10.0.0.5:9400", "endpoint": "9400"}  # no addNodeLabel: no node
    assert (t.interval_s, t.timeout_s, t.job) == (15.0, 10.0, "customer-dcgm-exporter")


def test_pod_targets_no_ip_and_phases():
    assert pod_targets(_pod(ip=""), SEED_MON) == []
    assert pod_targets(_pod(ip=None), SEED_MON) == []
    assert pod_targets(_pod(phase="Failed"), SEED_MON) == []
    assert pod_targets(_pod(phase="Succeeded"), SEED_MON) == []
    assert len(pod_targets(_pod(phase="Pending"), SEED_MON)) == 1   # Pending with an IP is kept
    assert len(pod_targets(_pod(phase="Unknown"), SEED_MON)) == 1


def test_pod_targets_ports():
    by_name = PodMonitor("m", endpoints=[PodMetricsEndpoint(port="metrics")])
    two = [{"name": "exporter", "ports": [{"name": "metrics", "containerPort": 9400}]},
           {"name": "sidecar", "ports": [{"name": "http", "containerPort": 8080},
                                         {"name": "metrics", "containerPort": 9400}]}]
    # port by number: declared by a container, any name; duplicate number: one target (first container)
    assert [t.labels["container"] for t in pod_targets(_pod(containers=two), SEED_MON)] == ["exporter"]
    # not declared -> nothing (like portNumber)
    assert pod_targets(_pod(containers=[{"name": "c", "ports": [{"name": "metrics", "containerPort": 9500}]}]),
                       SEED_MON) == []
    assert pod_targets(_pod(containers=[{"name": "c"}]), SEED_MON) == []
    # by name
    assert [t.url for t in pod_targets(_pod(), by_name)] == ["http://10.0.0.5:9400/metrics"]
    assert pod_targets(_pod(containers=[{"name": "c", "ports": [{"name": "http", "containerPort": 9400}]}]),
                       by_name) == []
    # no port at all: every declared port
    allp = PodMonitor("m", endpoints=[PodMetricsEndpoint(path="/m")])
    assert sorted(t.url for t in pod_targets(_pod(containers=two), allp)) == [
        "http://10.0.0.5:8080/m", "http://10.0.0.5:9400/m"]
    # init containers (sidecars) are searched too
    init = [{"name": "init-exp", "ports": [{"name": "metrics", "containerPort": 9401}]}]
    assert [t.labels["container"] for t in pod_targets(
        _pod(containers=[{"name": "main"}], init_containers=init), by_name)] == ["init-exp"]


def test_pod_targets_endpoint_options():
    mon = PodMonitor("m", job_label="app", endpoints=[
        PodMetricsEndpoint(port="metrics", scheme="HTTPS", path="metrics", interval="5s",
                           params={"collect[]": "gpu"}, add_node_label=True)])
    (t,) = pod_targets(_pod(ip="fd00::5", node=""), mon)
    assert t.url == "https://[fd00::5]:9400/metrics"
    assert t.key == "https://[fd00::5]:9400/metrics?collect[]=gpu"
    assert (t.interval_s, t.timeout_s, t.job) == (5.0, 5.0, "custom-dcgm")  # jobLabel; timeout <= interval
    assert "node" not in t.labels  # empty labels are absent
    # the selector is re-checked client-side
    assert pod_targets(_pod(labels={"app": "other"}), SEED_MON) == []


def test_pod_targets_relabel_configs():
    """relabelConfigs see the target labels and kubernetes_sd's pod meta labels, with
    Prometheus semantics: keep/drop select targets, replace rewrites labels and the
    __address__/__scheme__/__metrics_path__/__param_* of the scrape, labelmap copies,
    labeldrop/labelkeep prune; __* labels go, instance defaults to the address."""
    rules = [
        {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"], "regex": "gpu-.*",
         "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "debug", "action": "drop"},
        {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "gpu_node"},
        {"regex": "__meta_kubernetes_pod_label_(team)", "action": "labelmap"},
        {"source_labels": ["__address__"], "regex": "(.+):9400", "replacement": "${1}:9500",
         "target_label": "__address__"},
        {"target_label": "__metrics_path__", "replacement": "/v2/metrics"},
        {"target_label": "__param_collect", "replacement": "gpu"},
        {"regex": "container", "action": "labeldrop"},
    ]
    mon = PodMonitor.from_dict({"name": "m", "relabelConfigs": rules,
                                "endpoints": [{"port": "metrics"}, {"port": "debug"}]})
    ports = [{"name": "metrics", "containerPort": 9400}, {"name": "debug", "containerPort": 9401}]
    labels = {"app.kubernetes.io/part-of": "gpu-telemetry", "team": "ml"}
    (t,) = pod_targets(_pod(labels=labels, containers=[{"name": "exporter", "ports": ports}]), mon,
                       check_selector=False)
    assert t.url == "http://10.0.0.5:9500/v2/metrics" and t.params == {"collect": ["gpu"]}
    assert dict(t.labels) == {"namespace": "gpu-monitoring", "pod": "dcgm-0", "job": "m",
                              "endpoint": "metrics", "gpu_node": "gpu-node-1", "team": "ml",
                              "instance": "10.0.0.5:9500"}
    # keep: a pod outside the regex gives no target at all
    assert pod_targets(_pod(labels={"team": "ml"}), mon, check_selector=False) == []
    # interval and timeout from the rules
    slow = PodMonitor.from_dict({"name": "m", "endpoints": [{"port": "metrics", "interval": "15s"}], "relabelConfigs": [
        {"target_label": "__scrape_interval__", "replacement": "1m"},
        {"target_label": "__scrape_timeout__", "replacement": "20s"}]})
    (t,) = pod_targets(_pod(), slow, check_selector=False)
    assert (t.interval_s, t.timeout_s) == (60.0, 20.0)


def test_pod_targets_node_label_only_with_add_node_label():
    """addNodeLabel (add_node_label) gives the targets a node label; without it (the default)
    they have none, and relabeling still sees __meta_kubernetes_pod_node_name."""
    def mon(**ep):
        return PodMonitor.from_dict({"name": "m", "endpoints": [dict(port="metrics", **ep)]})

    assert [mon(**kw).endpoints[0].add_node_label for kw in ({}, {"addNodeLabel": True}, {"addNodeLabel": False},
                                                            {"add_node_label": True})] == [False, True, False, True]
    (t,) = pod_targets(_pod(), mon(addNodeLabel=True), check_selector=False)
    assert t.labels["node"] == "gpu-node-1"
    (t,) = pod_targets(_pod(), mon(addNodeLabel=False), check_selector=False)
    assert "node" not in t.labels and t.labels["pod"] == "dcgm-0"
    (t,) = pod_targets(_pod(), mon(), check_selector=False)
    assert "node" not in t.labels
    (t,) = pod_targets(_pod(node=""), mon(addNodeLabel=True), check_selector=False)
    assert "node" not in t.labels  # unscheduled: empty, so absent
    # the meta label stays for the rules: a replace rule gives the node label without the flag
    by_rule = PodMonitor.from_dict({"name": "m", "endpoints": [{"port": "metrics"}], "relabelConfigs": [
        {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]})
    (t,) = pod_targets(_pod(), by_rule, check_selector=False)
    assert t.labels["node"] == "gpu-node-1"
    # the WhatapAgent field is a boolean
    with pytest.raises(ValueError, match="addNodeLabel must be true or false"):
        mon(addNodeLabel="yes")


def test_pod_targets_relabeling_sees_prometheus_durations_and_bad_results_are_dropped(caplog):
    """The rules see __scrape_interval__/__scrape_timeout__ as Prometheus writes them (500ms,
    1m30s); a result that cannot be scraped (here a bad interval) is no target and a warning
    naming the pod and port, the other targets stay."""
    mon = PodMonitor.from_dict({"name": "m", "endpoints": [{"port": "metrics", "interval": "90s",
                                                            "scrapeTimeout": "500ms"}],
                                "relabelConfigs": [
        {"source_labels": ["__scrape_interval__", "__scrape_timeout__"], "target_label": "seen"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "regex": "bad", "target_label": "__scrape_interval__",
         "replacement": "often"}]})
    (t,) = pod_targets(_pod(), mon, check_selector=False)
    assert (t.labels["seen"], t.interval_s, t.timeout_s) == ("1m30s;500ms", 90.0, 0.5)
    with caplog.at_level("WARNING", logger="dcgmrelay.discovery.kubernetes"):
        assert pod_targets(_pod(name="bad"), mon, check_selector=False) == []
    [msg] = [r.getMessage() for r in caplog.records]
    assert msg.startswith("target m pod gpu-monitoring/bad port 9400: __scrape_interval__ 'often' is not a duration")


def test_pod_targets_carry_endpoint_auth_tls_and_metric_relabeling():
    """What a PodMonitor endpoint says about how to scrape reaches every discovered target:
    the config's basicAuth/authorization/tlsConfig (secrets stay Secret objects) and its
    metricRelabelConfigs (the relay applies them to the samples)."""
    from dcgmrelay.config import load_config, pod_monitor_dicts
    from dcgmrelay.transport import Secret

    cfg = load_config("""
targets:
  - name: dcgm
    type: podmonitor
    selector: {match_labels: {app: custom-dcgm}}
    relabel_configs:
      - {source_labels: [__meta_kubernetes_pod_label_component], target_label: component}
    endpoints:
      - port: metrics
        scheme: https
        tls: {ca_file: /etc/dcgm/ca.pem, server_name: dcgm.local}
        basic_auth: {username: relay, password: s3cret}
        metric_relabel_configs:
          - {source_labels: [__name__], regex: DCGM_FI_DEV_ECC_.*, action: drop}
outputs:
  - {type: remote-write, url: "http://127.0.0.1:8428/api/v1/write"}
""")
    (mon,) = [PodMonitor.from_dict(d) for d in pod_monitor_dicts(cfg, env={})]
    (t,) = pod_targets(_pod(), mon, check_selector=False)
    assert t.url == "https://10.0.0.5:9400/metrics"
    assert dict(t.tls) == {"ca_file": "/etc/dcgm/ca.pem", "server_name": "dcgm.local"}
    user, password = t.auth["basic"]
    assert user == "relay" and isinstance(password, Secret) and password.reveal() == "s3cret"
    assert "s3cret" not in repr(t)
    assert [dict(r) for r in t.metric_relabel] == [
        {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_ECC_.*", "action": "drop"}]
    assert t.labels["component"] == "gpu-exporter"


# =========================================================================== unit: credentials


def test_token_file_reread_on_rotation(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("one\n")
    creds = KubeCredentials("https://127.0.0.1:1", token_file=str(tok))
    assert creds.headers() == {"Authorization": "Bearer one"}
    # kubelet rotates projected tokens by an atomic rename: new inode
    (tmp_path / "token.new").write_text("two-longer\n")
    os.replace(tmp_path / "token.new", tok)
    assert creds.get_token() == "two-longer"
    assert "two" not in repr(creds)


def test_credentials_resolve(tmp_path):
    tok = tmp_path / "t"
    tok.write_text("x")
    ca = tmp_path / "ca.crt"
    ca.write_text("-")
    env = {"DCGMRELAY_KUBE_API_URL": "https://10.1.2.3:6443/", "DCGMRELAY_KUBE_TOKEN_FILE": str(tok),
           "DCGMRELAY_KUBE_CA_FILE": str(ca), "NODE_NAME": "n1"}
    c = KubeCredentials.resolve(env=env)
    assert (c.api_url, c.token_file, c.ca_file, c.insecure) == ("https://10.1.2.3:6443", str(tok), str(ca), False)
    assert resolve_node_name(env=env) == "n1"
    assert resolve_node_name(env={**env, "DCGMRELAY_NODE_NAME": "n2"}) == "n2"
    assert resolve_node_name("n3", env=env) == "n3"
    # in-cluster
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_text("-")
    (sa / "namespace").write_text("whatap-monitoring")
    c = KubeCredentials.resolve(env={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
                                sa_dir=str(sa))
    assert (c.api_url, c.get_token(), c.namespace) == ("https://[fd00::1]:443", "sa-token", "whatap-monitoring")
    with pytest.raises(KubeConfigError, match="--kube-api-url"):
        KubeCredentials.resolve(env={}, sa_dir=str(sa))
    with pytest.raises(KubeConfigError, match="no such file"):
        KubeCredentials.resolve(api_url="https://x", token_file=str(tmp_path / "missing"), env={})
    # CLI flags win over the environment
    p = argparse.ArgumentParser()
    add_kube_arguments(p)
    args = p.parse_args(["--kube-api-url", "https://127.0.0.1:9", "--kube-token-file", str(tok), "--node-name", "n9"])
    c, node = credentials_from_args(args, env=env)
    assert (c.api_url, c.token_file, c.ca_file, node) == ("https://127.0.0.1:9", str(tok), str(ca), "n9")


# =========================================================================== unit: list/watch loop (mock server)


def _podlist(rv, pods, cont=None):
    meta = {"resourceVersion": str(rv)}
    if cont:
        meta["continue"] = cont
    return httpx.Response(200, json={"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": pods})


def _events(*evs, linger=0.2):
    """A watch response: the events, then the stream stays open ``linger`` seconds and ends."""
    async def body():
        for t, o in evs:
            yield json.dumps({"type": t, "object": o}).encode() + b"\n"
            await asyncio.sleep(0.01)
        await asyncio.sleep(linger)
    return httpx.Response(200, content=body())


async def _hang():
    await asyncio.sleep(3600)
    yield b""


class Script:
    """A scripted API server: answers requests in order; then keeps a watch open forever."""

    def __init__(self, *steps: Callable[[httpx.Request], httpx.Response]) -> None:
        self.steps = list(steps)
        self.requests: List[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.steps:
            return self.steps.pop(0)(request)
        return httpx.Response(200, content=_hang())


def _q(req: httpx.Request) -> Dict[str, str]:
    return dict(req.url.params)


def _mock_disc(script: Script, monitors, **kw) -> PodMonitorDiscovery:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return PodMonitorDiscovery(monitors, kw.pop("creds", KubeCredentials("https://k8s.test", token="t")),
                               transport=httpx.MockTransport(script), **kw)


async def _collect_until(disc: PodMonitorDiscovery, pred, timeout=5.0, *, for_s=None) -> List[List[Target]]:
    """Every update until ``pred`` holds (or, with ``for_s``, all updates during that many seconds)."""
    seen: List[List[Target]] = []

    async def run():
        async for ts in disc.updates():
            seen.append(ts)
            if pred(ts):
                return

    try:
        if for_s is not None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(run(), for_s)
        else:
            await asyncio.wait_for(run(), timeout)
    finally:
        await disc.aclose()
    return seen


def _pods_of(ts: Iterable[Target]) -> List[str]:
    return [t.labels["pod"] for t in ts]


def test_list_watch_410_relist_diff():
    mon = PodMonitor("m", namespace="ns", selector=LabelSelector({"app": "dcgm"}),
                     endpoints=[PodMetricsEndpoint(port="metrics")])
    a = _pod("a", "ns", {"app": "dcgm"}, "10.0.0.1")
    b = _pod("b", "ns", {"app": "dcgm"}, "10.0.0.2")
    c = _pod("c", "ns", {"app": "dcgm"}, "10.0.0.3")
    for p, rv in ((a, 10), (b, 11), (c, 30)):
        p["metadata"]["resourceVersion"] = str(rv)

    def first_list(req):
        q = _q(req)
        assert req.url.path == "/api/v1/namespaces/ns/pods"
        assert q["labelSelector"] == "app=dcgm" and "resourceVersion" not in q and "watch" not in q
        assert req.headers["authorization"] == "Bearer t"
        return _podlist(20, [a], cont="page2")

    def second_page(req):
        assert _q(req)["continue"] == "page2"
        return _podlist(20, [b])

    def watch1(req):
        q = _q(req)
        assert (q["watch"], q["allowWatchBookmarks"], q["resourceVersion"]) == ("1", "true", "20")
        return _events(("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "25"}}))

    def watch2(req):
        assert _q(req)["resourceVersion"] == "25"  # resumed from the bookmark
        return _events(("ERROR", {"kind": "Status", "status": "Failure", "code": 410, "reason": "Expired",
                                  "message": "too old resource version: 25 (40)"}))

    def relist(req):
        assert "resourceVersion" not in _q(req) and "watch" not in _q(req)
        return _podlist(40, [b, c])      # a was deleted in the gap, c created

    def watch3(req):
        assert _q(req)["resourceVersion"] == "40"
        return httpx.Response(200, content=_hang())

    script = Script(first_list, second_page, watch1, watch2, relist, watch3)
    disc = _mock_disc(script, [mon])
    assert isinstance(disc, TargetSource)
    seen = asyncio.run(_collect_until(disc, lambda ts: _pods_of(ts) == ["b", "c"]))
    assert [_pods_of(ts) for ts in seen] == [["a", "b"], ["b", "c"]]
    assert disc.stats["gone"] == 1 and disc.stats["lists"] == 2 and disc.stats["bookmarks"] == 1
    assert all(_q(r).get("resourceVersion") != "0" for r in script.requests)


def test_watch_events_and_node_field_selector():
    mon = PodMonitor("m", namespace_selector=NamespaceSelector(any=True),
                     endpoints=[PodMetricsEndpoint(port="9400")])
    a = _pod("a", "x", {}, "10.0.0.1", node="n1")

    def lst(req):
        assert req.url.path == "/api/v1/pods"
        assert _q(req)["fieldSelector"] == "spec.nodeName=n1" and "labelSelector" not in _q(req)
        return _podlist(5, [])

    def watch(req):
        assert _q(req)["fieldSelector"] == "spec.nodeName=n1"
        pending = _pod("a", "x", {}, "", phase="Pending", node="n1")
        gone = json.loads(json.dumps(a))
        gone["status"]["phase"] = "Failed"
        return _events(("ADDED", {**pending, "metadata": {**pending["metadata"], "resourceVersion": "6"}}),
                       ("MODIFIED", {**a, "metadata": {**a["metadata"], "resourceVersion": "7"}}),
                       ("MODIFIED", {**gone, "metadata": {**gone["metadata"], "resourceVersion": "8"}}))

    disc = _mock_disc(Script(lst, watch), [mon], node_name="n1")
    seen = asyncio.run(_collect_until(disc, lambda ts: False, for_s=1.0))
    assert [_pods_of(ts) for ts in seen] == [[], ["a"], []]


def test_one_target_per_key_first_monitor_wins():
    first = PodMonitor("first", namespace="ns", endpoints=[PodMetricsEndpoint(port="metrics")])
    second = PodMonitor("second", namespace_selector=NamespaceSelector(any=True),
                        endpoints=[PodMetricsEndpoint(port="9400")])
    pods = [_pod("a", "ns", {}, "10.0.0.1"), _pod("b", "ns", {}, "10.0.0.2")]

    def answer(req):
        if "watch" in _q(req):
            return httpx.Response(200, content=_hang())
        return _podlist(5, pods)

    class Forever(Script):
        def __call__(self, request):
            self.requests.append(request)
            return answer(request)

    disc = _mock_disc(Forever(), [first, second])
    (ts,) = asyncio.run(_collect_until(disc, lambda ts: True))
    assert [(t.labels["pod"], t.job) for t in ts] == [("a", "first"), ("b", "first")]


def test_forbidden_cluster_scope_message():
    mon = PodMonitor("dcgm", namespace="whatap-monitoring", namespace_selector=NamespaceSelector(any=True))
    status = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
              "message": 'pods is forbidden: User "dcgm-agent" cannot list resource "pods" in API group "" '
                         'at the cluster scope'}
    disc = _mock_disc(Script(lambda req: httpx.Response(403, json=status)), [mon])
    with pytest.raises(KubeForbiddenError) as ei:
        asyncio.run(_collect_until(disc, lambda ts: False))
    msg = str(ei.value)
    assert "cannot list pods at the cluster scope" in msg
    assert "grant get/list/watch on pods cluster-wide" in msg and "namespaceSelector.matchNames" in msg
    assert 'User "dcgm-agent"' in msg and "whatap-monitoring/dcgm" in msg


def test_errors_back_off_and_401_rereads_token(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("old")
    mon = PodMonitor("m", namespace="ns")

    def unauthorized(req):
        assert req.headers["authorization"] == "Bearer old"
        tok.write_text("new")  # rotated meanwhile (same size and maybe same mtime: 401 forces a re-read)
        return httpx.Response(401, json={"kind": "Status", "code": 401, "message": "Unauthorized"})

    def boom(req):
        raise httpx.ConnectError("connection refused", request=req)

    def ok(req):
        assert req.headers["authorization"] == "Bearer new"
        return _podlist(3, [_pod("p", "ns", {}, "10.1.1.1")])

    script = Script(unauthorized, boom, lambda req: httpx.Response(500, text="etcd down"), ok)
    disc = _mock_disc(script, [mon], creds=KubeCredentials("https://k8s.test", token_file=str(tok)))
    seen = asyncio.run(_collect_until(disc, lambda ts: bool(ts)))
    assert _pods_of(seen[-1]) == ["p"]
    assert disc.stats["errors"] == 3
    # the first failed attempt already released the initial (empty) update
    assert seen[0] == []


# =========================================================================== end to end (real apiserver)

_IP_LOCK = threading.Lock()
_IP_NEXT = [0]


class Exporters:
    """Simulated dcgm-exporters: one tiny HTTP server per pod address (127.77.x.y:port)."""

    def __init__(self) -> None:
        self.servers: List[ThreadingHTTPServer] = []
        self.bodies: Dict[Tuple[str, int], bytes] = {}

    def start(self, body: str, port: int = 9400) -> str:
        """Bind an exporter on a fresh loopback address; return the address (the pod IP to report)."""
        for _ in range(200):
            with _IP_LOCK:
                _IP_NEXT[0] += 1
                n = _IP_NEXT[0]
            ip = f"127.77.{(n >> 8) & 255}.{(n & 255) or 1}"
            payload = body.encode()

            class H(BaseHTTPRequestHandler):
                def do_GET(self, payload: bytes = payload) -> None:  # noqa: N802
                    self.send_response(200 if self.path.split("?")[0] == "/metrics" else 404)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

                def log_message(self, *a: Any) -> None:
                    pass

            try:
                srv = ThreadingHTTPServer((ip, port), H)
            except OSError:
                continue
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self.servers.append(srv)
            self.bodies[(ip, port)] = payload
            return ip
        raise RuntimeError("no free loopback address for an exporter")

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()


@pytest.fixture
def exporters():
    e = Exporters()
    yield e
    e.close()


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _body(ns: str, pod: str) -> str:
    return f'DCGM_FI_DEV_GPU_TEMP{{gpu="0",namespace="{ns}",pod="{pod}"}} 42\n'


def running_pod(kube, exporters: Exporters, ns: str, name: str, labels: Dict[str, str], *,
                ports=(("metrics", 9400),), containers=None, node: str = "gpu-node-1",
                phase: str = "Running", exporter_port: int = 9400) -> str:
    """Create a pod, bind its exporter, report its IP through /status. Returns the IP."""
    kube.create_pod(ns, name, labels=labels, ports=ports, containers=containers, node_name=node)
    ip = exporters.start(_body(ns, name), exporter_port)
    kube.set_pod_status(ns, name, pod_ip=ip, phase=phase)
    return ip


class Watch:
    """Consumes ``discovery.updates()`` in a task and records every yielded list."""

    def __init__(self, disc: PodMonitorDiscovery) -> None:
        self.disc = disc
        self.history: List[List[Target]] = []
        self._ev = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for ts in self.disc.updates():
                self.history.append(ts)
                self._ev.set()
        finally:
            self._ev.set()

    @property
    def last(self) -> List[Target]:
        return self.history[-1] if self.history else []

    async def until(self, pred: Callable[[List[Target]], bool], timeout: float = 20.0, what: str = "") -> List[Target]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.history and pred(self.last):
                return self.last
            if self.task.done():
                self.task.result()  # raises the discovery's error
                raise AssertionError(f"updates() ended while waiting for {what}")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; last targets: "
                                     f"{[(t.url, dict(t.labels)) for t in self.last]}; stats {self.disc.stats}; "
                                     f"errors {self.disc.errors}")
            self._ev.clear()
            try:
                await asyncio.wait_for(self._ev.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def until_pods(self, expected: Iterable[Tuple[str, str]], timeout: float = 20.0) -> List[Target]:
        want = sorted(expected)
        return await self.until(lambda ts: sorted((t.labels["namespace"], t.labels["pod"]) for t in ts) == want,
                                timeout, f"pods {want}")

    async def close(self) -> None:
        await self.disc.aclose()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


def admin_creds(kube, tmp_path=None) -> KubeCredentials:
    if tmp_path is not None:  # exercise the token-file path
        return KubeCredentials(kube.url, token_file=kube.write_token_file(str(tmp_path / "token")),
                               ca_file=kube.ca_file)
    return KubeCredentials(kube.url, token=kube.admin_token, ca_file=kube.ca_file)


def make_disc(kube, monitors, creds=None, **kw) -> PodMonitorDiscovery:
    kw.setdefault("backoff_initial_s", 0.2)
    kw.setdefault("backoff_max_s", 1.0)
    return PodMonitorDiscovery(monitors, creds or admin_creds(kube), **kw)


def scrape_check(targets: List[Target], exporters: Exporters) -> None:
    """GET every target URL: each must answer with the body of the exporter bound for that pod."""
    assert targets
    with httpx.Client(trust_env=False, timeout=5) as c:
        for t in targets:
            r = c.get(t.url, params={k: v for k, v in t.params.items()})
            assert r.status_code == 200, t.url
            assert r.text == _body(t.labels["namespace"], t.labels["pod"]), t.url


def no_duplicates(history: List[List[Target]]) -> None:
    for ts in history:
        idents = [(t.key, t.job) for t in ts]
        assert len(idents) == len(set(idents)), f"duplicate targets: {idents}"


def test_e2e_selectors_ports_and_scrape(kube_apiserver, exporters, tmp_path):
    """Only matching pods, only their declared metrics port; the seed's port "9400" is a number."""
    kube, run = kube_apiserver, _uid()
    ns = f"gpu-monitoring-{run}"
    kube.create_namespace(ns)
    seed = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]},
                selector={"matchLabels": {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}})
    exprs = {"targetName": "expr", "namespace": ns,
             "selector": {"matchLabels": {"run": run}, "matchExpressions": [
                 {"key": "app", "operator": "In", "values": ["custom-dcgm", "dcgm-exporter"]},
                 {"key": "tier", "operator": "NotIn", "values": ["canary"]},
                 {"key": "gpu", "operator": "Exists"},
                 {"key": "batch", "operator": "DoesNotExist"}]},
             "endpoints": [{"port": "metrics", "interval": "5s"}]}
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    ips = {
        "match": running_pod(kube, exporters, ns, "match", L),
        "two": running_pod(kube, exporters, ns, "two", L, containers=[
            {"name": "exporter", "ports": [("metrics", 9400)]}, {"name": "sidecar", "ports": [("http", 8080)]}]),
        "e1": running_pod(kube, exporters, ns, "e1",
                          {"app": "dcgm-exporter", "gpu": "a100", "tier": "prod", "run": run}),
        "e2": running_pod(kube, exporters, ns, "e2", {"app": "custom-dcgm", "gpu": "h100", "run": run}),
    }
    running_pod(kube, exporters, ns, "partial", {"app": "custom-dcgm", "run": run})
    running_pod(kube, exporters, ns, "other", {"app": "other", "component": "gpu-exporter", "run": run})
    running_pod(kube, exporters, ns, "wrongport", L, ports=[("metrics", 9500)], exporter_port=9500)
    running_pod(kube, exporters, ns, "canary", {"app": "dcgm-exporter", "gpu": "x", "tier": "canary", "run": run})
    running_pod(kube, exporters, ns, "batch", {"app": "dcgm-exporter", "gpu": "x", "batch": "1", "run": run})
    running_pod(kube, exporters, ns, "nogpu", {"app": "dcgm-exporter", "run": run})
    running_pod(kube, exporters, ns, "foreign", {"app": "custom-dcgm", "component": "gpu-exporter", "run": "other"})

    async def scenario():
        w = Watch(make_disc(kube, [seed, exprs], creds=admin_creds(kube, tmp_path)))
        try:
            ts = await w.until(lambda ts: len(ts) == 4, what="4 targets")
            await asyncio.sleep(0.5)
            assert w.last == ts
            return ts
        finally:
            await w.close()

    ts = asyncio.run(scenario())
    got = {(t.labels["pod"], t.job): (t.url, dict(t.labels), t.interval_s) for t in ts}

    def want(pod, job, endpoint, interval):
        ip = ips[pod]
        return (f"http://{ip}:9400/metrics",
                {"namespace": ns, "pod": pod, "container": "exporter", "job": job,  # no addNodeLabel: no node
                 "instance": f"{ip}:9400", "endpoint": endpoint}, interval)

    assert got == {("match", "customer-dcgm-exporter"): want("match", "customer-dcgm-exporter", "9400", 15.0),
                   ("two", "customer-dcgm-exporter"): want("two", "customer-dcgm-exporter", "9400", 15.0),
                   ("e1", "expr"): want("e1", "expr", "metrics", 5.0),
                   ("e2", "expr"): want("e2", "expr", "metrics", 5.0)}
    assert ts == sorted(ts, key=lambda t: (t.key, t.job, sorted(t.labels.items())))
    scrape_check(ts, exporters)


def test_e2e_relabel_out_and_delete(kube_apiserver, exporters):
    """A pod relabelled out of the selector loses its target at once; back in, it returns; delete removes."""
    kube, run = kube_apiserver, _uid()
    ns = f"relabel-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    running_pod(kube, exporters, ns, "a", L)
    running_pod(kube, exporters, ns, "b", L)

    async def scenario():
        w = Watch(make_disc(kube, [mon]))
        try:
            scrape_check(await w.until_pods([(ns, "a"), (ns, "b")]), exporters)
            kube.relabel(ns, "a", {"component": None})
            await w.until_pods([(ns, "b")])
            kube.relabel(ns, "a", {"component": "gpu-exporter"})
            scrape_check(await w.until_pods([(ns, "a"), (ns, "b")]), exporters)
            kube.relabel(ns, "b", {"run": "elsewhere"})
            await w.until_pods([(ns, "a")])
            kube.relabel(ns, "b", {"run": run})
            await w.until_pods([(ns, "a"), (ns, "b")])
            kube.delete_pod(ns, "b")
            scrape_check(await w.until_pods([(ns, "a")]), exporters)
            kube.delete_pod(ns, "a")
            await w.until_pods([])
            no_duplicates(w.history)
            assert w.disc.stats["lists"] == 1  # all of it through the watch
        finally:
            await w.close()

    asyncio.run(scenario())


def test_e2e_namespaces_vs_any(kube_apiserver, exporters):
    """matchNames watches exactly those namespaces, any: true all, neither: the monitor's own."""
    kube, run = kube_apiserver, _uid()
    nss = [f"ns{i}-{run}" for i in range(1, 5)]
    for ns in nss:
        kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    for ns in nss[:3]:
        running_pod(kube, exporters, ns, "dcgm", L)
    running_pod(kube, exporters, nss[3], "dcgm", {"app": "custom-dcgm", "run": run})  # not matching
    base = {"selector": {"matchLabels": L}, "endpoints": [{"port": "9400"}]}
    mons = [dict(base, targetName="names", namespace=nss[3], namespaceSelector={"matchNames": nss[:2]}),
            dict(base, targetName="any", namespace=nss[3], namespaceSelector={"any": True}),
            dict(base, targetName="own", namespace=nss[2])]

    def namespaces(ts):
        return {t.labels["namespace"] for t in ts}

    async def scenario():
        # one discovery per monitor: several monitors selecting one pod give one target (first wins)
        ws = {m["targetName"]: Watch(make_disc(kube, [m])) for m in mons}
        try:
            expected = {"names": set(nss[:2]), "any": set(nss[:3]), "own": {nss[2]}}
            for job, want in expected.items():
                ts = await ws[job].until(lambda ts, want=want: namespaces(ts) == want, what=f"{job}: {want}")
                assert {t.job for t in ts} == {job}
                scrape_check(ts, exporters)
            assert [len(w.disc._watchers) for w in ws.values()] == [2, 1, 1]  # one list/watch per namespace
            # a new matching pod in a namespace only `any` covers
            ns5 = f"ns5-{run}"
            kube.create_namespace(ns5)
            running_pod(kube, exporters, ns5, "late", L)
            running_pod(kube, exporters, nss[0], "late", L)  # barrier for "names"
            await ws["any"].until(lambda ts: namespaces(ts) == set(nss[:3]) | {ns5}, what="late pod in any")
            await ws["names"].until_pods([(nss[0], "dcgm"), (nss[0], "late"), (nss[1], "dcgm")])
            for w in ws.values():
                no_duplicates(w.history)
        finally:
            for w in ws.values():
                await w.close()

    asyncio.run(scenario())


def test_e2e_pending_without_ip_then_ip(kube_apiserver, exporters):
    """A Pending pod without an IP gives no target; once /status reports an IP it does (Pending or not)."""
    kube, run = kube_apiserver, _uid()
    ns = f"pending-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    kube.create_pod(ns, "slow", labels=L, node_name="gpu-node-1")
    assert kube.get_pod(ns, "slow")["status"]["phase"] == "Pending"

    async def scenario():
        w = Watch(make_disc(kube, [mon]))
        try:
            await w.until_pods([])
            kube.set_pod_status(ns, "slow", pod_ip="", phase="Pending")       # an event, still no IP
            running_pod(kube, exporters, ns, "barrier", L)                     # later in the same watch
            await w.until_pods([(ns, "barrier")])
            ip = exporters.start(_body(ns, "slow"))
            kube.set_pod_status(ns, "slow", pod_ip=ip, phase="Pending")        # IP while still Pending
            await w.until_pods([(ns, "barrier"), (ns, "slow")])
            kube.set_pod_status(ns, "slow", pod_ip=ip, phase="Running")
            await asyncio.sleep(0.3)
            scrape_check(w.last, exporters)
            assert [(h and _pods_of(h)) for h in w.history] == [[], ["barrier"], ["barrier", "slow"]]
        finally:
            await w.close()

    asyncio.run(scenario())


def test_e2e_failed_and_succeeded_pods(kube_apiserver, exporters):
    """Failed / Succeeded pods give no target, even with an IP; a running pod that fails loses it."""
    kube, run = kube_apiserver, _uid()
    ns = f"failed-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    running_pod(kube, exporters, ns, "ok", L)
    running_pod(kube, exporters, ns, "crashed", L, phase="Failed")
    ip = running_pod(kube, exporters, ns, "dies", L)

    async def scenario():
        w = Watch(make_disc(kube, [mon]))
        try:
            scrape_check(await w.until_pods([(ns, "dies"), (ns, "ok")]), exporters)
            kube.set_pod_status(ns, "dies", pod_ip=ip, phase="Failed")
            await w.until_pods([(ns, "ok")])
            running_pod(kube, exporters, ns, "job", L, phase="Succeeded")
            running_pod(kube, exporters, ns, "barrier", L)
            await w.until_pods([(ns, "barrier"), (ns, "ok")])
            assert all("job" not in _pods_of(h) and "crashed" not in _pods_of(h) for h in w.history)
        finally:
            await w.close()

    asyncio.run(scenario())


def test_e2e_per_node_field_selector(kube_apiserver, exporters):
    """Per-node mode (spec.nodeName field selector): only the pods on this node."""
    kube, run = kube_apiserver, _uid()
    ns = f"pernode-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L},
               endpoints=[dict(SEED_TARGETS[1]["endpoints"][0], addNodeLabel=True)])  # node labels to check
    running_pod(kube, exporters, ns, "on-a", L, node=f"node-a-{run}")
    running_pod(kube, exporters, ns, "on-b", L, node=f"node-b-{run}")

    async def scenario():
        w = Watch(make_disc(kube, [mon], node_name=f"node-a-{run}"))
        try:
            ts = await w.until_pods([(ns, "on-a")])
            assert ts[0].labels["node"] == f"node-a-{run}"
            running_pod(kube, exporters, ns, "on-b2", L, node=f"node-b-{run}")
            running_pod(kube, exporters, ns, "on-a2", L, node=f"node-a-{run}")   # barrier
            scrape_check(await w.until_pods([(ns, "on-a"), (ns, "on-a2")]), exporters)
            assert all(t.labels["node"] == f"node-a-{run}" for h in w.history for t in h)
        finally:
            await w.close()

    asyncio.run(scenario())


def test_e2e_bookmarks_and_watch_resume(kube_apiserver, exporters):
    """Short server-side watch timeouts: watches end and resume from the last RV without re-listing, and
    bookmarks carry the RV past pod events the selector filtered out.

    (kube-apiserver sends a bookmark about 2 s before timeoutSeconds, and only when the pod watch cache has
    seen an event newer than the watch's RV: hence the churn in another namespace.)
    """
    kube, run = kube_apiserver, _uid()
    ns, noise_ns = f"bookmark-{run}", f"bookmark-noise-{run}"
    for n in (ns, noise_ns):
        kube.create_namespace(n)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    running_pod(kube, exporters, ns, "a", L)
    kube.create_pod(noise_ns, "noise", labels={"n": "0"})

    async def scenario():
        w = Watch(make_disc(kube, [mon], watch_timeout_s=4))
        try:
            await w.until_pods([(ns, "a")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            i = 0
            while (w.disc.stats["bookmarks"] < 1 or w.disc.stats["watches"] < 3) and loop.time() < deadline:
                i += 1
                kube.relabel(noise_ns, "noise", {"n": str(i)})  # pod events the watch does not see
                await asyncio.sleep(0.3)
            assert w.disc.stats["bookmarks"] >= 1, w.disc.stats
            assert w.disc.stats["watches"] >= 3, w.disc.stats
            assert w.disc.stats["events"] == 0, w.disc.stats  # the noise was filtered server-side
            running_pod(kube, exporters, ns, "b", L)
            scrape_check(await w.until_pods([(ns, "a"), (ns, "b")]), exporters)
            assert w.disc.stats["lists"] == 1 and w.disc.stats["gone"] == 0, w.disc.stats
        finally:
            await w.close()

    asyncio.run(scenario())


class Gate:
    """A TCP proxy in front of the apiserver that can be shut: connections are cut and refused."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = True
        self.conns: Set[asyncio.StreamWriter] = set()
        self.tasks: Set["asyncio.Task[Any]"] = set()
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self._forward(r, w)
        except asyncio.CancelledError:
            w.close()
        finally:
            self.tasks.discard(task)

    async def _forward(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.open:
            w.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            w.close()
            return
        self.conns.update((w, uw))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while self.open:
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self.conns.difference_update((w, uw))

    def shut(self) -> None:
        self.open = False
        for c in list(self.conns):
            c.close()
        self.conns.clear()

    async def close(self) -> None:
        self.shut()
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


def test_e2e_apiserver_restart_410_relist(kube_apiserver, exporters):
    """Restart the apiserver (etcd kept, revision moved on): the resumed watch gets 410 Gone, discovery
    re-lists; no target is lost or duplicated at any point."""
    kube, run = kube_apiserver, _uid()
    ns = f"restart-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    for p in ("a", "b", "c"):
        running_pod(kube, exporters, ns, p, L)
    expected = [(ns, "a"), (ns, "b"), (ns, "c")]

    async def scenario():
        w = Watch(make_disc(kube, [mon]))
        try:
            before = await w.until_pods(expected)
            n_hist = len(w.history)
            took = await asyncio.to_thread(kube.restart)
            print(f"apiserver restart took {took:.1f} s")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while w.disc.stats["gone"] < 1 and loop.time() < deadline:
                await asyncio.sleep(0.1)
            assert w.disc.stats["gone"] >= 1 and w.disc.stats["lists"] >= 2, w.disc.stats
            after = await w.until_pods(expected)
            assert [(t.url, dict(t.labels)) for t in after] == [(t.url, dict(t.labels)) for t in before]
            assert len(w.history) == n_hist  # the re-list changed nothing, so nothing new was yielded
            scrape_check(after, exporters)
            # and the watch works after the re-list
            running_pod(kube, exporters, ns, "d", L)
            await w.until_pods(expected + [(ns, "d")])
            no_duplicates(w.history)
        finally:
            await w.close()

    asyncio.run(scenario())


def test_e2e_changes_during_outage_relist_diff(kube_apiserver, exporters):
    """Pods deleted and created while discovery cannot reach the apiserver, which restarts meanwhile
    (410 on resume): the re-list diff drops exactly the deleted one and adds the new one."""
    kube, run = kube_apiserver, _uid()
    ns = f"outage-{run}"
    kube.create_namespace(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    mon = dict(SEED_TARGETS[1], namespaceSelector={"matchNames": [ns]}, selector={"matchLabels": L})
    for p in ("keep", "doomed", "relabelled"):
        running_pod(kube, exporters, ns, p, L)

    async def scenario():
        gate = Gate(kube.port)
        url = await gate.start()
        w = Watch(make_disc(kube, [mon], creds=KubeCredentials(url, token=kube.admin_token, ca_file=kube.ca_file)))
        try:
            await w.until_pods([(ns, "doomed"), (ns, "keep"), (ns, "relabelled")])
            gate.shut()
            await asyncio.sleep(0.3)
            kube.delete_pod(ns, "doomed")
            kube.relabel(ns, "relabelled", {"component": "something-else"})
            running_pod(kube, exporters, ns, "born", L)
            await asyncio.to_thread(kube.restart)
            errors_while_shut = w.disc.stats["errors"]
            gate.open = True
            ts = await w.until_pods([(ns, "born"), (ns, "keep")])
            assert errors_while_shut >= 1 and w.disc.stats["gone"] >= 1, w.disc.stats
            scrape_check(ts, exporters)
            no_duplicates(w.history)
            # "keep" was never missing from any update
            assert all("keep" in _pods_of(h) for h in w.history)
            # the pods that went away during the outage stayed until the re-list, then went in one step
            assert [sorted(_pods_of(h)) for h in w.history] == [["doomed", "keep", "relabelled"], ["born", "keep"]]
        finally:
            await w.close()
            await gate.close()

    asyncio.run(scenario())


def test_e2e_namespaced_rbac_token(kube_apiserver, exporters, tmp_path):
    """A token with pod read access in one namespace only: matchNames works, a cluster-wide list is a
    403 with a clear message, and an ungranted namespace names itself."""
    kube, run = kube_apiserver, _uid()
    ns, other = f"rbac-{run}", f"rbac-other-{run}"
    for n in (ns, other):
        kube.create_namespace(n)
    kube.grant_pod_reader(ns)
    L = {"app": "custom-dcgm", "component": "gpu-exporter", "run": run}
    running_pod(kube, exporters, ns, "dcgm", L)
    running_pod(kube, exporters, other, "dcgm", L)
    tok = tmp_path / "agent-token"
    kube.write_token_file(str(tok), kube.agent_token)
    agent = KubeCredentials(kube.url, token_file=str(tok), ca_file=kube.ca_file)
    base = {"selector": {"matchLabels": L}, "endpoints": [{"port": "9400"}], "namespace": ns}

    async def scenario():
        # namespaced: fine
        w = Watch(make_disc(kube, [dict(base, targetName="ns", namespaceSelector={"matchNames": [ns]})], creds=agent))
        try:
            scrape_check(await w.until_pods([(ns, "dcgm")]), exporters)
        finally:
            await w.close()
        # cluster-wide: 403, clear error out of updates()
        w = Watch(make_disc(kube, [dict(base, targetName="all", namespaceSelector={"any": True})], creds=agent))
        with pytest.raises(KubeForbiddenError) as ei:
            await w.until(lambda ts: False, timeout=15, what="the 403")
        await w.close()
        msg = str(ei.value)
        assert "cannot list pods at the cluster scope" in msg, msg
        assert "grant get/list/watch on pods cluster-wide" in msg and "namespaceSelector.matchNames" in msg, msg
        assert f'User "{kube.agent_user}"' in msg, msg
        # an ungranted namespace, not fatal: the granted one still works, the error is kept
        w = Watch(make_disc(kube, [dict(base, targetName="two", namespaceSelector={"matchNames": [ns, other]})],
                            creds=agent, forbidden_is_fatal=False))
        try:
            await w.until_pods([(ns, "dcgm")])
            await w.until(lambda ts: bool(w.disc.errors), what="the 403 error")
            (err,) = w.disc.errors
            assert isinstance(err, KubeForbiddenError)
            assert f"cannot list pods in namespace '{other}'" in str(err)
        finally:
            await w.close()

    asyncio.run(scenario())
