"""Configuration: the native YAML schema, the WhaTap WhatapAgent resource read as-is, error paths,
secret redaction, the secret-file warning, and flag / environment / file precedence."""

from __future__ import annotations

import argparse
import os
import pickle
import stat
import textwrap
from pathlib import Path

import pytest
import yaml

from dcgmrelay.config import (
    ENV_VARS,
    Authorization,
    BasicAuth,
    ConfigError,
    EndpointConfig,
    LabelSelectorConfig,
    LabelSelectorRequirementConfig,
    NamespaceSelectorConfig,
    OutputConfig,
    PodMonitorConfig,
    RelayConfig,
    RetryConfig,
    Secret,
    StaticTargetConfig,
    TLSConfig,
    add_run_arguments,
    check_complete,
    config_from_args,
    config_to_dict,
    config_warnings,
    effective_config_text,
    format_duration,
    load_config,
    merge,
    parse_duration,
    parse_size,
    pod_monitor_dicts,
    reveal,
    secret_file_warnings,
    static_targets,
)
from dcgmrelay.errors import DcgmRelayError
from dcgmrelay.relabel import compile_rules

DATA = Path(__file__).parent / "data" / "config"
NATIVE = DATA / "native-full.yaml"

# The fake secrets of native-full.yaml; none of them may ever be printed.
NATIVE_SECRETS = ("scrape-CREDENTIAL-0451", "basic-PASSWORD-7781", "license-HEADER-3141", "output-BEARER-2718",
                  "x41pl-WHATAP-LICENSE-x9", "team-gpu")


def errors(source):
    with pytest.raises(ConfigError) as ei:
        load_config(source)
    return ei.value


def problems(source):
    """[(path, line, message)] of a configuration that must fail."""
    return [(p.path, p.line, p.message) for p in errors(source).problems]


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# ================================================================================== values


@pytest.mark.parametrize("text, seconds", [
    ("15s", 15.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0), ("1d", 86400.0), ("1h2m3s4ms", 3723.004),
    ("0s", 0.0), (15, 15.0), (2.5, 2.5), ("30", 30.0), ("0.25", 0.25),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["15 sec", "1.5s", "s", "", "-5s", -1, True, None, [15], "15S"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration():
    assert [format_duration(x) for x in (15, 90, 0.5, 3600, 86400 + 1, 1.25, 0)] == [
        "15s", "1m30s", "500ms", "1h", "1d1s", "1s250ms", "0s"]


@pytest.mark.parametrize("text, n", [
    ("64MiB", 64 * 2 ** 20), ("1GB", 10 ** 9), ("512Ki", 512 * 1024), ("1.5GiB", 3 * 2 ** 29), (4096, 4096),
    ("100", 100), ("2kb", 2000), ("1 TiB", 2 ** 40), ("10B", 10),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["64 MiBs", "1.5B", "-1", -1, "lots", True, "1e3"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


# ================================================================================== native schema


def test_native_config_every_section():
    cfg = load_config(NATIVE)
    assert cfg.origin == "native" and cfg.source == str(NATIVE)
    assert (cfg.global_interval, cfg.global_timeout) == (30.0, 5.0)
    assert [type(t).__name__ for t in cfg.targets] == ["StaticTargetConfig", "PodMonitorConfig"]  # disabled-one
    local, pods = cfg.targets

    assert local.name == "local-dcgm"
    assert local.relabel_configs == ({"source_labels": ["__address__"], "regex": "([^:]+):\\d+",
                                      "target_label": "host", "action": "replace"},)
    e0, e1, e2 = local.endpoints
    assert e0 == EndpointConfig(address="127.0.0.1:9400", path="/metrics", scheme="http", interval=30.0,
                                timeout=5.0)
    assert e0.url == "http://127.0.0.1:9400/metrics"
    assert e1.url == "https://gpu-node-2:9400/custom/metrics"
    assert (e1.interval, e1.timeout) == (60.0, 20.0)
    assert e1.params == {"collect": ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"), "format": ("text",)}
    assert e1.labels == {"rack": "r12"}
    # a relative path in a file is relative to the file's directory
    assert e1.tls == TLSConfig(ca_file=str(DATA / "certs" / "ca.pem"), cert_file="/etc/dcgmrelay/client.pem",
                               key_file="/etc/dcgmrelay/client.key", server_name="gpu-node-2.internal")
    assert e1.authorization == Authorization(type="Bearer", credentials=Secret("scrape-CREDENTIAL-0451"))
    assert e1.metric_relabel_configs == (
        {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_(GPU_TEMP|POWER_USAGE)", "action": "keep"},
        {"regex": "pci_bus_id", "action": "labeldrop"})
    assert e2.basic_auth == BasicAuth(username="scraper", password=Secret("basic-PASSWORD-7781"))
    assert (e2.interval, e2.timeout) == (30.0, 5.0)  # inherited from global

    assert pods == PodMonitorConfig(
        name="dcgm-pods", namespace="monitoring",
        namespace_selector=NamespaceSelectorConfig(any=False, match_names=("gpu-operator", "default")),
        selector=LabelSelectorConfig(
            match_labels={"app": "nvidia-dcgm-exporter"},
            match_expressions=(LabelSelectorRequirementConfig("tier", "In", ("gpu", "gpu-mig")),
                               LabelSelectorRequirementConfig("canary", "DoesNotExist", ()))),
        endpoints=(
            EndpointConfig(port="metrics", interval=15.0, timeout=5.0, add_node_label=True),
            EndpointConfig(port="9400", interval=30.0, timeout=5.0,
                           authorization=Authorization(credentials_file="/var/run/secrets/dcgm/token")),
        ),
        relabel_configs=({"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node",
                          "action": "replace"},),
        job_label="app")

    vm, om, compact = cfg.outputs
    assert vm == OutputConfig(
        name="vm", type="remote-write", version=2, url="https://vm.example.com:8428/api/v1/write",
        headers={"X-Scope-OrgID": Secret("team-gpu"), "X-License-Key": Secret("license-HEADER-3141")},
        bearer_token=Secret("output-BEARER-2718"), tls=TLSConfig(ca_file="/etc/ssl/vm-ca.pem"), timeout=15.0,
        compression="snappy", max_samples_per_batch=5000, max_bytes_per_batch=4 * 2 ** 20, flush_interval=0.5,
        max_in_flight=2, retry=RetryConfig(min_backoff=0.25, max_backoff=60.0, max_elapsed=600.0,
                                           retry_on_429=False),
        send_metadata=False)
    assert (om.name, om.type, om.version, om.compression) == ("openmetrics", "openmetrics", None, "gzip")
    assert om.basic_auth == BasicAuth(username="pusher", password_file="/etc/dcgmrelay/push-password")
    assert (om.timeout, om.max_samples_per_batch, om.max_bytes_per_batch, om.flush_interval, om.max_in_flight,
            om.retry, om.send_metadata) == (30.0, 2000, 8 * 2 ** 20, 1.0, 1, RetryConfig(), True)
    assert (compact.name, compact.compression, compact.bearer_token_file) == (
        "compact", "zstd", "/etc/dcgmrelay/compact-token")

    assert cfg.csv == "whatap"
    assert (cfg.relay.include_non_dcgm, cfg.relay.first_observation, cfg.relay.output, cfg.relay.evict_after) == (
        True, "zero", "both", 7200.0)
    assert cfg.relay.kind_overrides == {"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "rate", 230: "event"}
    assert cfg.relay.state_path == str(DATA / "state" / "relay-state.json")
    assert (cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes, cfg.spool.fsync,
            cfg.spool.fsync_interval) == ("/var/spool/dcgmrelay", 2 * 2 ** 30, 32 * 2 ** 20, "always", 2.0)
    assert cfg.listen == "0.0.0.0:9500"
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "json")
    assert cfg.shard == (1, 3)
    k = cfg.kubernetes
    assert (k.api_url, k.token_file, k.ca_file, k.node_name, k.in_cluster, k.insecure_skip_verify) == (
        "https://k8s.example.com:6443", "/etc/dcgmrelay/kube-token", "/etc/dcgmrelay/kube-ca.pem", "gpu-node-2",
        False, False)
    assert cfg.whatap is not None and cfg.whatap.license == Secret("x41pl-WHATAP-LICENSE-x9")
    assert (cfg.whatap.host, cfg.whatap.port) == ("10.21.0.5/10.21.0.6", 6600)


def test_defaults():
    cfg = load_config("targets:\n  - name: a\n    endpoints: [{url: 'http://h:9400/metrics'}]\n")
    assert cfg == RelayConfig(targets=[StaticTargetConfig(name="a", endpoints=(
        EndpointConfig(address="h:9400", interval=15.0, timeout=10.0),))])
    assert (cfg.csv, cfg.listen, cfg.shard, cfg.spool.dir, cfg.logging.level) == (
        "default", "127.0.0.1:9500", None, None, "info")
    # a short interval caps the default timeout (Prometheus: timeout = min(10s, interval))
    cfg = load_config("global: {interval: 5s}\ntargets: [{name: a, endpoints: [{address: 'h:1'}]}]\n")
    assert (cfg.global_timeout, cfg.targets[0].endpoints[0].timeout) == (5.0, 5.0)
    cfg = load_config("targets: [{name: a, endpoints: [{address: 'h:1', interval: 2s}]}]\n")
    assert cfg.targets[0].endpoints[0].timeout == 2.0
    # output names default to the type, numbered when a type repeats
    cfg = load_config("outputs: [{type: remote-write, url: 'http://a/w'}, {type: remote-write, url: 'http://b/w'},"
                      " {type: compact, url: 'http://c/'}]\n")
    assert [(o.name, o.version) for o in cfg.outputs] == [("remote-write-1", 1), ("remote-write-2", 1),
                                                          ("compact", None)]


def test_round_trip_through_the_effective_mapping():
    cfg = load_config(NATIVE)
    again = load_config(config_to_dict(cfg, reveal_secrets=True))
    assert again == cfg
    wa = load_config(DATA / "whatap-agent-customer.yaml")
    assert load_config(config_to_dict(wa, reveal_secrets=True)) == wa


def test_load_from_text_bytes_mapping_and_path_like():
    text = NATIVE.read_text()
    assert load_config(text).outputs == load_config(NATIVE).outputs
    assert load_config(text.encode()).listen == "0.0.0.0:9500"
    assert load_config(str(NATIVE)).shard == (1, 3)
    assert load_config({"listen": ":9600"}).listen == ":9600"


def test_unreadable_empty_and_multi_document_sources():
    err = errors(DATA / "does-not-exist.yaml")
    assert "cannot read the configuration file" in str(err) and isinstance(err, DcgmRelayError)
    assert "the configuration is empty" in str(errors("# nothing\n"))
    assert "2 YAML documents" in str(errors("listen: ':1'\n---\nlisten: ':2'\n"))
    err = errors("targets:\n  - name: [unclosed\n")
    assert err.problems[0].line is not None and "YAML syntax error" in err.message


def test_static_targets_with_relabeling_auth_and_tls():
    cfg = load_config(NATIVE)
    t0, t1, t2 = static_targets(cfg)
    assert t0.url == "http://127.0.0.1:9400/metrics"
    assert dict(t0.labels) == {"job": "local-dcgm", "instance": "127.0.0.1:9400", "host": "127.0.0.1"}
    assert (t0.interval_s, t0.timeout_s, t0.job, dict(t0.auth), dict(t0.tls)) == (30.0, 5.0, "local-dcgm", {}, {})
    assert t1.url == "https://gpu-node-2:9400/custom/metrics"
    assert dict(t1.labels) == {"job": "local-dcgm", "instance": "gpu-node-2:9400", "host": "gpu-node-2",
                               "rack": "r12"}
    assert dict(t1.params) == {"collect": ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"], "format": ["text"]}
    assert t1.key == ("https://gpu-node-2:9400/custom/metrics?collect=DCGM_FI_DEV_GPU_TEMP&"
                      "collect=DCGM_FI_DEV_POWER_USAGE&format=text")
    assert reveal(t1.auth["bearer_token"]) == "scrape-CREDENTIAL-0451"
    assert t1.tls == {"ca_file": str(DATA / "certs" / "ca.pem"), "cert_file": "/etc/dcgmrelay/client.pem",
                      "key_file": "/etc/dcgmrelay/client.key", "server_name": "gpu-node-2.internal"}
    rules = compile_rules(t1.metric_relabel)
    assert rules.apply({"__name__": "DCGM_FI_DEV_GPU_TEMP", "pci_bus_id": "x"}) == {"__name__": "DCGM_FI_DEV_GPU_TEMP"}
    assert reveal(t2.auth["basic"]) == ("scraper", "basic-PASSWORD-7781")
    # the secrets stay wrapped inside the Target, so a logged Target shows none
    assert not any(s in repr([t0, t1, t2]) for s in NATIVE_SECRETS)


def test_static_target_relabeling_follows_prometheus():
    cfg = load_config(yml("""
        targets:
          - name: dcgm
            relabel_configs:
              - {source_labels: [__address__], regex: "10\\\\.0\\\\.0\\\\.9:.*", action: drop}
              - {source_labels: [__address__], regex: "(.*):9400", target_label: __address__,
                 replacement: "${1}:9500"}
              - {target_label: instance, replacement: "gpu-box"}
              - {source_labels: [__param_format], target_label: __metrics_path__, replacement: "/m/$1"}
            endpoints:
              - url: http://10.0.0.1:9400/metrics?format=om
              - address: 10.0.0.9:9400
              - address: 10.0.0.2:9400
                interval: 1m
                labels: {__scheme__: https}
        """))
    a, b = static_targets(cfg)
    assert (a.url, dict(a.labels), dict(a.params)) == ("http://10.0.0.1:9500/m/om",
                                                       {"job": "dcgm", "instance": "gpu-box"}, {"format": ["om"]})
    assert (b.url, b.interval_s, b.timeout_s) == ("https://10.0.0.2:9500/m/", 60.0, 10.0)


def test_static_target_empty_valued_labels_are_left_out():
    """As in Prometheus (and for discovered targets): a label with an empty value is no label,
    with relabeling or without."""
    cfg = load_config(yml("""
        targets:
          - name: plain
            endpoints: [{address: "10.0.0.1:9400", labels: {rack: "", zone: a}}]
          - name: relabeled
            relabel_configs: [{target_label: zone, replacement: b}]
            endpoints: [{address: "10.0.0.2:9400", labels: {rack: ""}}]
        """))
    a, b = static_targets(cfg)
    assert dict(a.labels) == {"job": "plain", "zone": "a", "instance": "10.0.0.1:9400"}
    assert dict(b.labels) == {"job": "relabeled", "zone": "b", "instance": "10.0.0.2:9400"}


def test_static_target_with_unusable_relabeled_labels_is_dropped_with_a_warning(caplog):
    cfg = load_config(yml("""
        targets:
          - name: dcgm
            relabel_configs:
              - {source_labels: [__address__], regex: "10\\\\.0\\\\.0\\\\.1:.*", target_label: __scrape_interval__,
                 replacement: soon}
            endpoints:
              - address: 10.0.0.1:9400
              - address: 10.0.0.2:9400
        """))
    with caplog.at_level("WARNING", logger="dcgmrelay.config"):
        [t] = static_targets(cfg)
    assert t.url == "http://10.0.0.2:9400/metrics"
    [msg] = [r.getMessage() for r in caplog.records]
    assert msg.startswith("target targets[0].endpoints[0] (job dcgm): __scrape_interval__ 'soon' is not a duration")


def test_credentials_env_is_read_when_targets_are_built():
    cfg = load_config("targets: [{name: a, endpoints: [{address: 'h:1', authorization: "
                      "{credentials_env: DCGM_TOKEN}}]}]\n")
    [t] = static_targets(cfg, env={"DCGM_TOKEN": "env-TOKEN-99"})
    assert isinstance(t.auth["bearer_token"], Secret) and reveal(t.auth["bearer_token"]) == "env-TOKEN-99"
    with pytest.raises(ConfigError) as ei:
        static_targets(cfg, env={})
    assert ei.value.path == "targets[0].endpoints[0].authorization.credentials_env"


def test_pod_monitors_feed_the_discovery():
    cfg = load_config(NATIVE)
    [d] = pod_monitor_dicts(cfg)
    assert d["name"] == "dcgm-pods" and d["namespaceSelector"] == {"any": False,
                                                                  "matchNames": ["gpu-operator", "default"]}
    assert d["endpoints"][0] == {"path": "/metrics", "scheme": "http", "interval": 15.0, "scrapeTimeout": 5.0,
                                 "params": {}, "port": "metrics", "auth": {}, "tls": {},
                                 "metricRelabelConfigs": [], "addNodeLabel": True}
    assert d["endpoints"][1]["auth"] == {"bearer_token_file": "/var/run/secrets/dcgm/token"}
    assert d["relabelConfigs"] == [{"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node",
                                    "action": "replace"}]
    discovery = pytest.importorskip("dcgmrelay.discovery")
    pm = discovery.PodMonitor.from_dict(d)
    assert pm.namespaces() == ["gpu-operator", "default"]
    assert pm.job_label == "app" and pm.endpoints[1].port_rule() == ("number", 9400)
    # add_node_label reaches the discovery per endpoint (the second endpoint leaves it false)
    assert [e.add_node_label for e in pm.endpoints] == [True, False]


# ================================================================================== WhatapAgent


def test_seed_whatap_agent_loads_as_is():
    cfg = load_config(DATA / "whatap-agent.yaml")
    assert cfg.origin == "WhatapAgent"
    assert cfg.targets == [PodMonitorConfig(
        name="dcgm-exporter", namespace="whatap-monitoring",
        namespace_selector=NamespaceSelectorConfig(match_names=("whatap-monitoring",)),
        selector=LabelSelectorConfig(match_labels={"name": "whatap-node-agent"}),
        endpoints=(EndpointConfig(port="9400", path="/metrics", interval=15.0, timeout=10.0, scheme="http"),))]
    assert cfg.outputs == []  # a WhatapAgent has no outputs: they come from flags/env
    assert cfg.global_interval == 15.0 and cfg.csv == "whatap"
    assert cfg.whatap is None and cfg.notes == ()
    warnings = config_warnings(cfg)
    assert any("no outputs" in w and "--remote-write" in w for w in warnings)


def test_seed_whatap_agent_customer_targets():
    cfg = load_config(DATA / "whatap-agent-customer.yaml")
    assert [t.name for t in cfg.targets] == ["whatap-dcgm-exporter", "customer-dcgm-exporter"]
    customer = cfg.targets[1]
    assert customer.namespace_selector.match_names == ("gpu-monitoring", "default")
    assert customer.selector.match_labels == {"app": "custom-dcgm", "component": "gpu-exporter"}
    assert [(e.port, e.path, e.scheme, e.interval) for e in customer.endpoints] == [("9400", "/metrics", "http", 15.0)]


def test_seed_whatap_agent_simple_setup_scrapes_the_builtin_exporter():
    cfg = load_config(DATA / "whatap-agent-simple.yaml")
    assert cfg.targets == [PodMonitorConfig(
        name="whatap-dcgm-exporter", namespace="whatap-monitoring",
        namespace_selector=NamespaceSelectorConfig(match_names=("whatap-monitoring",)),
        selector=LabelSelectorConfig(match_labels={"name": "whatap-node-agent"}),
        endpoints=(EndpointConfig(port="9400"),))]
    assert "k8sAgent.gpuMonitoring is enabled" in cfg.notes[0]


def test_seed_whatap_agent_without_open_agent_has_no_targets():
    cfg = load_config(DATA / "whatap-agent-tolerations.yaml")
    assert cfg.targets == [] and "openAgent is missing" in cfg.notes[0]


WHATAP_FULL = yml("""
    apiVersion: monitoring.whatap.com/v2alpha1
    kind: WhatapAgent
    metadata:
      name: whatap
      namespace: observability
    spec:
      license: "x41pl-LICENSE-abc123"
      host: 13.124.11.223/13.209.172.35
      port: 6600
      features:
        apm: {instrumentation: {enabled: false}}
        k8sAgent: {nodeAgent: {enabled: true}}
        openAgent:
          enabled: true
          globalInterval: "30s"
          globalPath: "/dcgm/metrics"
          imageName: whatap/open_agent
          imageVersion: "1.8.4"
          tolerations: [{key: nvidia.com/gpu, operator: Exists}]
          nodeSelector: {gpu: "true"}
          envs: [{name: X, value: "y"}]
          disableForeground: true
          targets:
            - targetName: "static-dcgm"
              type: "StaticEndpoints"
              endpoints:
                - address: "10.0.0.5:9400"
                - address: "10.0.0.6"
                  port: 9401
                  path: "/metrics"
                  scheme: "https"
                  interval: "1m"
                  tlsConfig: {insecureSkipVerify: true, caFile: /etc/ca.pem, serverName: dcgm.local}
                  authorization: {type: Bearer, credentialsFile: /var/run/token}
                  params: {collect: [a, b]}
                  metricRelabelConfigs:
                    - {source_labels: [__name__], regex: "DCGM_FI_DEV_.*", action: keep}
            - targetName: "pods"
              type: "PodMonitor"
              namespaceSelector: {any: true}
              selector:
                matchExpressions:
                  - {key: app, operator: In, values: [dcgm-exporter, nvidia-dcgm-exporter]}
              relabelConfigs:
                - {sourceLabels: [__meta_kubernetes_pod_node_name], targetLabel: node}
              endpoints:
                - port: metrics
                  scrapeTimeout: "5s"
                  addNodeLabel: true
                  basicAuth: {username: u, password: "pod-PASSWORD-1"}
            - targetName: "off"
              type: "PodMonitor"
              enabled: false
              endpoints: [{port: "9400"}]
            - targetName: "svc-off"
              type: "ServiceMonitor"
              enabled: false
    """)


def test_whatap_agent_every_target_feature():
    cfg = load_config(WHATAP_FULL)
    assert cfg.whatap is not None and cfg.whatap.license == Secret("x41pl-LICENSE-abc123")
    assert (cfg.whatap.host, cfg.whatap.port, cfg.global_interval) == ("13.124.11.223/13.209.172.35", 6600, 30.0)
    static, pods = cfg.targets  # disabled ones skipped, ServiceMonitor too when disabled
    assert static == StaticTargetConfig(name="static-dcgm", endpoints=(
        EndpointConfig(address="10.0.0.5:9400", path="/dcgm/metrics", interval=30.0, timeout=10.0),
        EndpointConfig(address="10.0.0.6:9401", path="/metrics", scheme="https", interval=60.0, timeout=10.0,
                       tls=TLSConfig(ca_file="/etc/ca.pem", insecure_skip_verify=True, server_name="dcgm.local"),
                       authorization=Authorization(credentials_file="/var/run/token"),
                       params={"collect": ("a", "b")},
                       metric_relabel_configs=({"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_.*",
                                                "action": "keep"},)),
    ))
    assert pods == PodMonitorConfig(
        name="pods", namespace="observability",
        namespace_selector=NamespaceSelectorConfig(any=True),
        selector=LabelSelectorConfig(match_expressions=(
            LabelSelectorRequirementConfig("app", "In", ("dcgm-exporter", "nvidia-dcgm-exporter")),)),
        endpoints=(EndpointConfig(port="metrics", path="/dcgm/metrics", interval=30.0, timeout=5.0,
                                  add_node_label=True,
                                  basic_auth=BasicAuth(username="u", password=Secret("pod-PASSWORD-1"))),),
        relabel_configs=({"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node",
                          "action": "replace"},))
    targets = static_targets(cfg)
    assert [t.url for t in targets] == ["http://10.0.0.5:9400/dcgm/metrics", "https://10.0.0.6:9401/metrics"]
    assert dict(targets[0].labels) == {"job": "static-dcgm", "instance": "10.0.0.5:9400"}
    text = effective_config_text(cfg)
    assert "x41pl-LICENSE-abc123" not in text and "pod-PASSWORD-1" not in text
    assert "license: <secret>" in text


def test_whatap_agent_disabled_open_agent():
    text = WHATAP_FULL.replace("      enabled: true\n      globalInterval", "      enabled: false\n"
                                                                            "      globalInterval")
    cfg = load_config(text)
    assert cfg.targets == [] and "enabled is false" in cfg.notes[0]


def test_whatap_agent_errors_name_the_resource_paths():
    got = problems(DATA / "errors-whatap-agent.yaml")
    assert [(p, line) for p, line, _ in got] == [
        ("spec.licence", 7),
        ("spec.features.openAgent.globalIntervall", 11),
        ("spec.features.openAgent.targets[1].type", 18),
        ("spec.features.openAgent.targets[2].selector.matchLabel", 22),
        ("spec.features.openAgent.targets[2].endpoints[0].interval", 26),
        ("spec.features.openAgent.targets[2].endpoints[1].scrapeTimeout", 29),
        ("spec.features.openAgent.targets[2].endpoints[1].tlsConfig.caSecret", 31),
        ("spec.features.openAgent.targets[2].endpoints[1].metricRelabelConfigs[0].action", 34),
        ("spec.features.openAgent.targets[3].endpoints[0].intervall", 39),
    ]
    msgs = [m for _, _, m in got]
    assert msgs[0].startswith("unknown key 'licence' (did you mean 'license'?)")
    assert msgs[1].startswith("unknown key 'globalIntervall' (did you mean 'globalInterval'?)")
    assert "ServiceMonitor is not supported" in msgs[2]
    assert msgs[3].startswith("unknown key 'matchLabel' (did you mean 'matchLabels'?)")
    assert msgs[4].startswith("invalid duration '15x'")
    assert msgs[5] == "timeout 30s is longer than the interval 10s; it must be <= the interval"
    assert "mount the Secret" in msgs[6] and "caFile" in msgs[6]
    assert msgs[7].startswith("unknown action 'keepp' (did you mean 'keep'?)")
    assert msgs[8].startswith("unknown key 'intervall' (did you mean 'interval'?)")
    # the misspelt license key's value is a secret: never echoed
    assert "LICENSE-IN-A-TYPO" not in str(errors(DATA / "errors-whatap-agent.yaml"))


def test_whatap_agent_structure_errors():
    base = "apiVersion: monitoring.whatap.com/v2alpha1\nkind: WhatapAgent\n"
    assert problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n"
                           "        - type: StaticEndpoints\n          targetName: s\n") == [
        ("spec.features.openAgent.targets[0]", 7, "a static target needs at least one endpoint")]
    assert problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n        - type: PodMonitor\n") == [
        ("spec.features.openAgent.targets[0]", 7, "missing required key 'targetName'")]
    got = problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n"
                          "        - {targetName: s, type: StaticEndpoints, endpoints: [{port: '9400'}],"
                          " selector: {}}\n")
    assert [m for _, _, m in got] == ["missing required key 'address' (host:port)",  # sorted by column
                                      "selector applies to PodMonitor targets only"]
    got = problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n"
                          "        - {targetName: p, type: podmonitor, endpoints: [{address: 'h:1'}]}\n")
    assert got[0][0] == "spec.features.openAgent.targets[0].endpoints[0].address"
    assert "static targets only" in got[0][2]
    assert problems(base.replace("v2alpha1", "v1") + "spec: {}\n")[0][:2] == ("apiVersion", 1)
    assert problems("apiVersion: monitoring.whatap.com/v2alpha1\nkind: WhatapPodMonitor\nspec: {}\n") == [
        ("kind", 2, "kind 'WhatapPodMonitor' is not supported: dcgmrelay reads its own schema (no apiVersion/kind) "
                    "or a WhatapAgent (monitoring.whatap.com/v2alpha1)")]
    got = problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n"
                          "        - {targetName: p, endpoints: [{port: '9400', authorization: "
                          "{credentialsSecret: {name: s, key: t}}}]}\n")
    assert [path for path, _, _ in got] == [
        "spec.features.openAgent.targets[0].endpoints[0].authorization.credentialsSecret"]
    got = problems(base + "spec:\n  features:\n    openAgent:\n      targets:\n"
                          "        - {targetName: p, endpoints: [{port: '9400', basicAuth: "
                          "{username: u, password: {name: s, key: p}}}]}\n")
    assert [path for path, _, _ in got] == ["spec.features.openAgent.targets[0].endpoints[0].basicAuth.password"]
    assert "not supported" in got[0][2]


# ================================================================================== native errors


def test_native_errors_are_all_reported_with_paths_in_file_order():
    err = errors(DATA / "errors-native.yaml")
    got = [(p.path, p.line) for p in err.problems]
    assert got == [
        ("global.timeout", 4),
        ("targets[0].endpoints[0].intervall", 9),
        ("targets[0].endpoints[1].interval", 11),
        ("targets[0].endpoints[2].timeout", 14),
        ("targets[0].endpoints[2].tls.ca_fle", 16),
        ("targets[0].endpoints[2].metric_relabel_configs[0].action", 19),
        ("targets[0].endpoints[2].metric_relabel_configs[1].regex", 21),
        ("targets[1]", 23),
        ("targets[1].enabled", 24),
        ("targets[1].selector.matchLabels", 26),
        ("outputs[0].type", 28),
        ("outputs[1]", 30),
        ("outputs[1].max_in_flight", 31),
        ("outputs[1].retry.max_backof", 33),
        ("spool.max_bytes", 35),
        ("listn", 36),
        ("shard", 37),
    ]
    m = {p.path: p.message for p in err.problems}
    assert m["global.timeout"] == "timeout 20s is longer than the interval 15s; it must be <= the interval"
    assert m["targets[0].endpoints[0].intervall"].startswith("unknown key 'intervall' (did you mean 'interval'?); "
                                                             "allowed: url, address")
    assert m["targets[0].endpoints[1].interval"].startswith("invalid duration '15 sec': use a Prometheus duration")
    assert m["targets[0].endpoints[2].tls.ca_fle"].startswith("unknown key 'ca_fle' (did you mean 'ca_file'?)")
    assert m["targets[0].endpoints[2].metric_relabel_configs[1].regex"].startswith("invalid regex 'DCGM_(unclosed'")
    assert m["targets[1]"] == "missing required key 'name'"
    assert m["targets[1].enabled"] == "expected true or false, got a string"
    assert m["targets[1].selector.matchLabels"].startswith("unknown key 'matchLabels' (did you mean 'match_labels'?)")
    assert m["outputs[0].type"].startswith("'remote_write' is not allowed (did you mean 'remote-write'?); "
                                           "expected one of remote-write, openmetrics, compact")
    assert m["outputs[1]"] == "missing required key 'url'"
    assert m["outputs[1].max_in_flight"] == "expected an integer, got a string"
    assert m["listn"].startswith("unknown key 'listn' (did you mean 'listen'?)")
    assert "index must be in 0..n-1" in m["shard"]
    assert err.path == "global.timeout" and err.problems[0].column == 12
    text = str(err)
    assert text.startswith(f"17 configuration errors in {DATA / 'errors-native.yaml'}:\n")
    assert "  line 4, column 12: global.timeout: timeout 20s is longer" in text
    assert pickle.loads(pickle.dumps(err)).problems == err.problems


@pytest.mark.parametrize("text, path, message", [
    ("targets: {}\n", "targets", "expected a list of targets, got a mapping"),
    ("targets: [{name: a, endpoints: []}]\n", "targets[0].endpoints", "a static target needs at least one endpoint"),
    ("targets: [{name: a, endpoints: [{path: /m}]}]\n", "targets[0].endpoints[0]",
     "missing required key 'address' (host:port) or 'url'"),
    ("targets: [{name: a, endpoints: [{url: 'http://h/m', address: 'h:1'}]}]\n", "targets[0].endpoints[0].address",
     "give url or address, not both"),
    ("targets: [{name: a, endpoints: [{address: 'h:99999'}]}]\n", "targets[0].endpoints[0].address",
     "invalid address 'h:99999': port must be 1..65535"),
    ("targets: [{name: a, endpoints: [{url: 'ftp://h/m'}]}]\n", "targets[0].endpoints[0].url",
     "invalid URL: the scheme must be http:// or https://"),
    ("targets: [{name: a, type: static, namespace: x, endpoints: [{address: 'h:1'}]}]\n", "targets[0].namespace",
     "namespace applies to podmonitor targets only"),
    ("targets: [{name: a, endpoints: [{address: 'h:1', add_node_label: true}]}]\n",
     "targets[0].endpoints[0].add_node_label",
     "add_node_label applies to podmonitor targets only (a static endpoint has no node)"),
    ("targets: [{name: a, endpoints: [{address: 'h:1'}]}, {name: a, endpoints: [{address: 'h:2'}]}]\n",
     "targets[1]", "target name 'a' is already used by targets[0]; names must be unique"),
    ("targets: [{name: p, type: podmonitor, selector: {match_expressions: [{key: a, operator: In}]}}]\n",
     "targets[0].selector.match_expressions[0]", "operator In needs at least one value"),
    ("targets: [{name: p, type: podmonitor, namespace_selector: {match_names: [Bad_NS]}}]\n",
     "targets[0].namespace_selector.match_names[0]",
     "invalid namespace 'Bad_NS': lower-case alphanumerics and '-', at most 63 characters"),
    ("targets: [{name: p, type: podmonitor, selector: {match_labels: {app: true}}}]\n",
     "targets[0].selector.match_labels.app", "expected a string, got a boolean"),
    ("global: {interval: 0s}\n", "global.interval", "must be greater than 0, got 0s"),
    ("outputs: [{type: remote-write, url: 'http://h/w', headers: {Content-Type: x}}]\n",
     "outputs[0].headers.Content-Type",
     "header 'Content-Type' is set by the remote-write protocol and cannot be overridden"),
    ("outputs: [{type: openmetrics, url: 'http://h/w', version: 2}]\n", "outputs[0].version",
     "version applies to remote-write outputs only"),
    ("outputs: [{type: remote-write, url: 'http://h/w', version: 3}]\n", "outputs[0].version",
     "3 is out of range: must be between 1 and 2"),
    ("outputs: [{type: remote-write, url: 'http://h/w', compression: gzip}]\n", "outputs[0].compression",
     "'gzip' is not allowed; expected one of snappy"),
    ("outputs: [{type: compact, url: 'http://h/w', bearer_token: a, bearer_token_file: /f}]\n",
     "outputs[0].bearer_token_file", "give bearer_token or bearer_token_file, not both"),
    ("outputs: [{type: compact, url: 'http://h/w', tls: {cert_file: /c}}]\n", "outputs[0].tls.cert_file",
     "cert_file needs key_file too (a client certificate is a pair)"),
    ("outputs: [{type: compact, url: 'http://h/w', retry: {min_backoff: 10s, max_backoff: 1s}}]\n",
     "outputs[0].retry.max_backoff", "max_backoff 1s is shorter than min_backoff 10s"),
    ("outputs: [{type: compact, url: 'http://h/w', retry: {budget: 1m, max_elapsed: 2m}}]\n",
     "outputs[0].retry.max_elapsed", "'max_elapsed' and 'budget' are the same setting; give one"),
    ("relay: {kind_overrides: {DCGM_FI_DEV_GPU_TEMP: label}}\n", "relay.kind_overrides.DCGM_FI_DEV_GPU_TEMP",
     "'label' is not allowed; expected one of gauge, counter, rate, event"),
    ("relay: {first_observation: first}\n", "relay.first_observation",
     "'first' is not allowed; expected one of drop, zero, full"),
    ("spool: {max_bytes: 1MiB, segment_bytes: 2MiB}\n", "spool.segment_bytes",
     "segment_bytes (2MiB) must not exceed max_bytes (1MiB)"),
    ("listen: localhost\n", "listen",
     "invalid listen address 'localhost': expected host:port or :port (port 0..65535), e.g. 127.0.0.1:9500"),
    ("logging: {level: loud}\n", "logging.level",
     "'loud' is not allowed; expected one of debug, info, warning, error, critical, warn"),
    ("shard: half\n", "shard", "expected 'i/n' (this process is shard i of n, 0 <= i < n), e.g. 0/2"),
    ("kubernetes: {in_cluster: maybe}\n", "kubernetes.in_cluster", "expected auto, true or false, got a string"),
    ("csv: /no/such/file.csv\n", "csv",
     "no collectors CSV file '/no/such/file.csv' and not a built-in profile (default, dcp, whatap, 1.x)"),
    ("listen: ':1'\nlisten: ':2'\n", "listen", "duplicate key 'listen' (YAML keeps only the last one)"),
    ("- a\n- b\n", "", "expected a mapping at the top level, got a list"),
])
def test_single_errors(text, path, message):
    assert [(p, m) for p, _, m in problems(text)] == [(path, message)]


def test_unknown_keys_at_several_depths_suggest_the_right_key():
    text = yml("""
        glbal: {interval: 15s}
        targets:
          - name: a
            typ: static
            endpoints:
              - address: h:1
                basic_auth: {username: u, pasword: p}
        outputs:
          - {type: compact, url: 'http://h/', retry: {retry_on429: true}}
        relay: {statepath: /x}
        kubernetes: {apiurl: 'https://k'}
        """)
    got = [(p, m.split(";")[0]) for p, _, m in problems(text)]
    assert got == [
        ("glbal", "unknown key 'glbal' (did you mean 'global'?)"),
        ("targets[0].typ", "unknown key 'typ' (did you mean 'type'?)"),
        ("targets[0].endpoints[0].basic_auth.pasword", "unknown key 'pasword' (did you mean 'password'?)"),
        ("outputs[0].retry.retry_on429", "unknown key 'retry_on429' (did you mean 'retry_on_429'?)"),
        ("relay.statepath", "unknown key 'statepath' (did you mean 'state_path'?)"),
        ("kubernetes.apiurl", "unknown key 'apiurl' (did you mean 'api_url'?)"),
    ]


# ================================================================================== secrets


def test_secret_type():
    s = Secret("hunter2")
    assert repr(s) == str(s) == f"{s}" == "<secret>" and f"{s:>10}" == "  <secret>"
    assert s.reveal() == "hunter2" and reveal(s) == "hunter2" and reveal("plain") == "plain"
    assert s == Secret("hunter2") and s != Secret("other") and hash(s) == hash(Secret("hunter2"))
    assert bool(s) and not Secret("")
    assert pickle.loads(pickle.dumps(s)).reveal() == "hunter2"
    assert Secret(s).reveal() == "hunter2"
    with pytest.raises(AttributeError):
        s._value = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Secret(123)  # type: ignore[arg-type]


def test_secrets_never_appear_in_effective_config_or_repr():
    cfg = load_config(NATIVE)
    text = effective_config_text(cfg)
    for secret in NATIVE_SECRETS:
        assert secret not in text
        assert secret not in repr(cfg) and secret not in str(cfg)
        assert secret not in repr(config_to_dict(cfg))
    shown = yaml.safe_load(text)
    assert shown["outputs"][0]["bearer_token"] == "<secret>"
    assert shown["outputs"][0]["headers"] == {"X-Scope-OrgID": "<secret>", "X-License-Key": "<secret>"}
    assert shown["targets"][0]["endpoints"][1]["authorization"]["credentials"] == "<secret>"
    assert shown["targets"][0]["endpoints"][2]["basic_auth"]["password"] == "<secret>"
    assert shown["whatap"]["license"] == "<secret>"
    assert text.startswith("# dcgmrelay effective configuration (from ")
    # apart from the secrets, what is shown is what was loaded
    assert shown == config_to_dict(cfg)
    revealed = config_to_dict(cfg, reveal_secrets=True)
    assert revealed["outputs"][0]["bearer_token"] == "output-BEARER-2718"


def test_secrets_never_appear_in_exception_messages():
    cases = [
        # a secret of the wrong type
        "outputs: [{type: compact, url: 'http://h/', bearer_token: {token: SECRET-IN-MAPPING-1}}]\n",
        # a URL with credentials in it
        "outputs: [{type: compact, url: 'https://user:SECRET-IN-URL-2@h/'}]\n",
        # a misspelt secret key
        "whatap: {licens: SECRET-UNDER-TYPO-3}\n",
        # a YAML syntax error on the line of a secret
        "outputs:\n  - type: compact\n    bearer_token: \"SECRET-IN-BROKEN-YAML-4\n    url: x\n",
        # a header value with a line break
        "outputs: [{type: compact, url: 'http://h/', headers: {X-Key: \"SECRET-\\nHEADER-5\"}}]\n",
    ]
    for text in cases:
        err = errors(text)
        rendered = str(err) + repr(err) + repr(err.problems) + str(err.args)
        assert "SECRET" not in rendered, rendered
    err = errors(cases[1])
    assert err.problems[0].message.startswith("credentials in the URL (user:password@) are not allowed")


def test_secrets_given_as_flags_are_not_shown_in_errors():
    with pytest.raises(ConfigError) as ei:
        config_from_args({"header": ["NoColonSECRET-HEADER"]}, env={}, require_complete=False)
    assert "SECRET" not in str(ei.value) and ei.value.path == "--header"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_world_readable_secret_file_warning(tmp_path):
    cfg_file = tmp_path / "relay.yaml"
    token = tmp_path / "token"
    token.write_text("file-TOKEN-77\n")
    cfg_file.write_text("outputs:\n  - {type: compact, url: 'http://h/', bearer_token: inline-TOKEN-88}\n"
                        "  - {type: openmetrics, url: 'http://h/', bearer_token_file: token}\n")
    os.chmod(cfg_file, 0o644)
    os.chmod(token, 0o640)
    warnings = secret_file_warnings(cfg_file)
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{cfg_file} holds secrets (outputs[0].bearer_token) and is readable by group "
                                  "and others (mode 0644): chmod 600 it")
    assert warnings[1].startswith(f"{token} (outputs[1].bearer_token_file) is readable by group (mode 0640)")
    assert not any("TOKEN-" in w for w in warnings)
    assert not any("holds secrets" in w for w in config_warnings(load_config(cfg_file)))  # not twice
    os.chmod(cfg_file, 0o600)
    os.chmod(token, 0o600)
    assert secret_file_warnings(cfg_file) == []
    # a file without secrets may be world-readable
    plain = tmp_path / "plain.yaml"
    plain.write_text("outputs: [{type: compact, url: 'http://h/'}]\n")
    os.chmod(plain, 0o644)
    assert secret_file_warnings(plain) == []
    # a WhatapAgent holds its license
    wa = tmp_path / "wa.yaml"
    wa.write_text(WHATAP_FULL)
    os.chmod(wa, 0o604)
    [w] = secret_file_warnings(wa)
    assert "spec.license" in w and "readable by others (mode 0604)" in w
    assert stat.S_IMODE(os.stat(wa).st_mode) == 0o604


# ================================================================================== flags and env


def test_fileless_run_from_flags():
    cfg = config_from_args(["--target", "http://127.0.0.1:9400/metrics", "--remote-write",
                            "http://vm:8428/api/v1/write", "--interval", "15s"], env={})
    assert cfg.targets == [StaticTargetConfig(name="dcgm-exporter", endpoints=(
        EndpointConfig(address="127.0.0.1:9400", interval=15.0, timeout=10.0),))]
    assert [(o.name, o.type, o.url, o.version) for o in cfg.outputs] == [
        ("remote-write", "remote-write", "http://vm:8428/api/v1/write", 1)]
    [t] = static_targets(cfg)
    assert (t.url, dict(t.labels)) == ("http://127.0.0.1:9400/metrics",
                                       {"job": "dcgm-exporter", "instance": "127.0.0.1:9400"})


def test_every_flag_through_argparse(tmp_path):
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    ns = parser.parse_args([
        "--target", "10.0.0.1:9400", "--target", "https://10.0.0.2:9400/m",
        "--remote-write", "http://vm/api/v1/write", "--remote-write-version", "2",
        "--openmetrics-push", "http://vm/api/v1/import/prometheus", "--compact", "http://c/ingest",
        "--interval", "30s", "--timeout", "5s", "--body-size-limit", "16MiB", "--csv", "whatap", "--listen", ":9600",
        "--spool-dir", str(tmp_path / "spool"), "--spool-max-bytes", "256MiB", "--spool-fsync", "always",
        "--state-path", str(tmp_path / "state.json"), "--first-observation", "zero", "--relay-output", "both",
        "--include-non-dcgm", "--bearer-token-file", str(tmp_path / "tok"), "--header", "X-License-Key: lic-1",
        "--header", "X-Scope-OrgID: t", "--insecure-skip-verify", "--ca-file", "/etc/ca.pem",
        "--log-level", "debug", "--log-format", "json", "--shard", "1/4",
        "--kube-api-url", "https://k8s:6443", "--kube-token-file", "/t", "--kube-ca-file", "/ca",
        "--kube-insecure-skip-tls-verify", "--node-name", "n1",
    ])
    cfg = config_from_args(ns, env={})
    assert [e.url for e in cfg.targets[0].endpoints] == ["http://10.0.0.1:9400/metrics", "https://10.0.0.2:9400/m"]
    assert [(o.type, o.version) for o in cfg.outputs] == [("remote-write", 2), ("openmetrics", None),
                                                          ("compact", None)]
    for o in cfg.outputs:
        assert o.bearer_token_file == str(tmp_path / "tok")
        assert o.headers == {"X-License-Key": Secret("lic-1"), "X-Scope-OrgID": Secret("t")}
        assert o.tls == TLSConfig(ca_file="/etc/ca.pem", insecure_skip_verify=True)
    assert (cfg.global_interval, cfg.global_timeout, cfg.csv, cfg.listen) == (30.0, 5.0, "whatap", ":9600")
    assert cfg.global_body_size_limit == 16 * 2 ** 20
    assert (cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.fsync) == (str(tmp_path / "spool"), 256 * 2 ** 20,
                                                                     "always")
    assert (cfg.relay.state_path, cfg.relay.first_observation, cfg.relay.output, cfg.relay.include_non_dcgm) == (
        str(tmp_path / "state.json"), "zero", "both", True)
    assert (cfg.logging.level, cfg.logging.format, cfg.shard) == ("debug", "json", (1, 4))
    k = cfg.kubernetes
    assert (k.api_url, k.token_file, k.ca_file, k.insecure_skip_verify, k.node_name) == (
        "https://k8s:6443", "/t", "/ca", True, "n1")
    assert "lic-1" not in effective_config_text(cfg)
    # kube=False leaves the Kubernetes flags to dcgmrelay.discovery.add_kube_arguments
    p2 = argparse.ArgumentParser()
    add_run_arguments(p2, kube=False)
    assert "--kube-api-url" not in p2.format_help() and "--target" in p2.format_help()


def test_environment_only():
    env = {"DCGMRELAY_TARGET": "http://a:9400/metrics, http://b:9400/metrics",
           "DCGMRELAY_REMOTE_WRITE": "http://vm/api/v1/write", "DCGMRELAY_INTERVAL": "1m",
           "DCGMRELAY_BEARER_TOKEN": "env-BEARER-5", "DCGMRELAY_HEADER": "X-A: 1\nX-B: 2",
           "DCGMRELAY_INSECURE_SKIP_VERIFY": "true", "DCGMRELAY_LOG_LEVEL": "warning", "DCGMRELAY_SHARD": "0/2"}
    cfg = config_from_args({}, env=env)
    assert [e.address for e in cfg.targets[0].endpoints] == ["a:9400", "b:9400"]
    [o] = cfg.outputs
    assert o.bearer_token == Secret("env-BEARER-5") and set(o.headers) == {"X-A", "X-B"}
    assert o.tls.insecure_skip_verify is True
    assert (cfg.global_interval, cfg.logging.level, cfg.shard) == (60.0, "warning", (0, 2))


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    f = tmp_path / "relay.yaml"
    f.write_text(yml("""
        global: {interval: 20s}
        targets: [{name: file-job, endpoints: [{address: 'f:9400'}, {address: 'g:9400', interval: 1m}]}]
        outputs: [{name: file-out, type: remote-write, url: 'http://file/w'}]
        logging: {level: error, format: json}
        listen: ':7000'
        """))
    env = {"DCGMRELAY_CONFIG": str(f), "DCGMRELAY_INTERVAL": "45s", "DCGMRELAY_LOG_LEVEL": "debug"}
    cfg = config_from_args({}, env=env)
    assert cfg.source == str(f)
    assert cfg.global_interval == 45.0  # env over file
    # an endpoint that inherits the interval follows the override; an explicit one keeps its own
    assert [e.interval for e in cfg.targets[0].endpoints] == [45.0, 60.0]
    assert (cfg.logging.level, cfg.logging.format, cfg.listen) == ("debug", "json", ":7000")
    assert [o.name for o in cfg.outputs] == ["file-out"]
    cfg = config_from_args({"interval": "10s", "log_level": "info"}, env=env)
    assert (cfg.global_interval, cfg.logging.level) == (10.0, "info")  # flag over env
    # --config beats DCGMRELAY_CONFIG
    other = tmp_path / "other.yaml"
    other.write_text("targets: [{name: other, endpoints: [{address: 'o:1'}]}]\n"
                     "outputs: [{type: compact, url: 'http://o/'}]\n")
    assert config_from_args({"config": str(other)}, env=env).targets[0].name == "other"
    # list settings replace the file's list
    cfg = config_from_args({"target": ["http://x:9400/metrics"], "openmetrics_push": ["http://p/"]}, env=env)
    assert [t.name for t in cfg.targets] == ["dcgm-exporter"]
    assert [(o.type, o.url) for o in cfg.outputs] == [("openmetrics", "http://p/")]
    # output settings without output URLs apply to the file's outputs
    cfg = config_from_args({"header": ["X-License-Key: k"], "remote_write_version": "2"}, env=env)
    assert [(o.name, o.version, o.headers) for o in cfg.outputs] == [
        ("file-out", 2, {"X-License-Key": Secret("k")})]


def test_whatap_agent_with_outputs_from_flags():
    cfg = config_from_args(["--config", str(DATA / "whatap-agent.yaml"), "--remote-write", "http://vm/w",
                            "--interval", "30s"], env={})
    assert cfg.origin == "WhatapAgent"
    assert [t.name for t in cfg.targets] == ["dcgm-exporter"] and cfg.csv == "whatap"
    assert cfg.global_interval == 30.0
    assert cfg.targets[0].endpoints[0].interval == 15.0  # the seed sets it explicitly
    assert [o.url for o in cfg.outputs] == ["http://vm/w"]
    with pytest.raises(ConfigError) as ei:
        config_from_args(["--config", str(DATA / "whatap-agent.yaml")], env={})
    assert ei.value.path == "outputs" and "--remote-write" in ei.value.message


def test_flag_and_env_errors_name_the_flag_or_variable():
    with pytest.raises(ConfigError) as ei:
        config_from_args({"interval": "soon", "target": ["http://a/"], "remote_write": ["http://b/"]}, env={})
    assert (ei.value.path, ei.value.source) == ("--interval", "command line")
    assert ei.value.message.startswith("invalid duration 'soon'")
    with pytest.raises(ConfigError) as ei:
        config_from_args({}, env={"DCGMRELAY_SPOOL_MAX_BYTES": "lots", "DCGMRELAY_TARGET": "ftp://x/"})
    assert [p.path for p in ei.value.problems] == ["DCGMRELAY_TARGET", "DCGMRELAY_SPOOL_MAX_BYTES"]
    with pytest.raises(ConfigError) as ei:
        config_from_args({"shard": "2/2"}, env={}, require_complete=False)
    assert ei.value.path == "--shard"
    # a timeout longer than the interval is caught after merging
    with pytest.raises(ConfigError) as ei:
        config_from_args({"interval": "5s", "timeout": "6s"}, env={}, require_complete=False)
    assert ei.value.path == "global.timeout"


def test_check_complete():
    with pytest.raises(ConfigError) as ei:
        config_from_args({}, env={})
    assert [p.path for p in ei.value.problems] == ["targets", "outputs"]
    cfg = config_from_args({}, env={}, require_complete=False)
    assert cfg == RelayConfig()
    check_complete(load_config(NATIVE))


def test_merge():
    cfg = load_config(NATIVE)
    m = merge(cfg, {"logging": {"level": "warning"}, "global": {"interval": "1m"}})
    assert m.logging.level == "warning" and m.logging.format == "json"
    assert m.global_interval == 60.0
    assert m.targets[0].endpoints[2].interval == 60.0  # inherited
    assert m.targets[0].endpoints[1].interval == 60.0  # explicit 1m
    assert m.outputs == cfg.outputs and m.source == cfg.source
    with pytest.raises(ConfigError) as ei:
        merge(cfg, {"global": {"interval": "4s"}})  # explicit 5s timeouts are now too long
    assert ei.value.problems[0].path == "global.timeout"
    # a merge keeps the WhatapAgent paths of what it did not replace
    wa = load_config(WHATAP_FULL)
    with pytest.raises(ConfigError) as ei:
        merge(wa, {"global": {"interval": "4s"}})
    [p] = ei.value.problems
    assert p.path == "spec.features.openAgent.targets[1].endpoints[0].scrapeTimeout"
    assert p.message == "timeout 5s is longer than the interval 4s; it must be <= the interval"
    assert p.line == [i for i, line in enumerate(WHATAP_FULL.splitlines(), 1) if "scrapeTimeout" in line][0]


def test_sample_limit_from_file_env_and_flag(tmp_path):
    """global.sample_limit (Prometheus' name), DCGMRELAY_SAMPLE_LIMIT, --sample-limit: default 0
    (no limit), shown by check-config and loaded back, refused with the path when negative or
    no integer."""
    base = "targets: [{name: t, endpoints: [{address: 'a:9400'}]}]\noutputs: [{type: compact, url: 'http://c/'}]\n"
    assert load_config(base).global_sample_limit == 0
    f = tmp_path / "relay.yaml"
    f.write_text("global: {sample_limit: 5000}\n" + base)
    cfg = load_config(str(f))
    assert cfg.global_sample_limit == 5000
    assert "sample_limit: 5000" in effective_config_text(cfg)
    assert load_config(effective_config_text(cfg)).global_sample_limit == 5000  # round trip
    env = {"DCGMRELAY_CONFIG": str(f), "DCGMRELAY_SAMPLE_LIMIT": "300"}
    assert config_from_args({}, env=env).global_sample_limit == 300
    assert config_from_args({"sample_limit": "0"}, env=env).global_sample_limit == 0
    for bad in ("-1", "many", "1.5", "true"):
        with pytest.raises(ConfigError) as e:
            load_config(f"global: {{sample_limit: {bad}}}\n" + base)
        assert "global.sample_limit" in str(e.value), bad
    with pytest.raises(ConfigError) as e:
        config_from_args({}, env={**env, "DCGMRELAY_SAMPLE_LIMIT": "-5"})
    assert "DCGMRELAY_SAMPLE_LIMIT" in str(e.value)


def test_label_limits_from_file_env_and_flag(tmp_path):
    """global.label_limit / label_name_length_limit / label_value_length_limit (Prometheus'
    names), DCGMRELAY_LABEL_LIMIT ..., --label-limit ...: default 0 (no limit), shown by
    check-config and loaded back, refused with the path (or flag / variable) when negative or
    no integer."""
    base = "targets: [{name: t, endpoints: [{address: 'a:9400'}]}]\noutputs: [{type: compact, url: 'http://c/'}]\n"
    keys = ("label_limit", "label_name_length_limit", "label_value_length_limit")
    cfg = load_config(base)
    assert [getattr(cfg, f"global_{k}") for k in keys] == [0, 0, 0]
    f = tmp_path / "relay.yaml"
    f.write_text("global: {label_limit: 30, label_name_length_limit: 64, label_value_length_limit: 256}\n" + base)
    cfg = load_config(str(f))
    assert [getattr(cfg, f"global_{k}") for k in keys] == [30, 64, 256]
    text = effective_config_text(cfg)
    assert "label_limit: 30" in text and "label_name_length_limit: 64" in text
    assert "label_value_length_limit: 256" in text
    assert load_config(text) == cfg  # round trip
    env = {"DCGMRELAY_CONFIG": str(f), "DCGMRELAY_LABEL_LIMIT": "20", "DCGMRELAY_LABEL_NAME_LENGTH_LIMIT": "32",
           "DCGMRELAY_LABEL_VALUE_LENGTH_LIMIT": "128"}
    cfg = config_from_args({}, env=env)
    assert [getattr(cfg, f"global_{k}") for k in keys] == [20, 32, 128]
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    ns = parser.parse_args(["--label-limit", "0", "--label-name-length-limit", "16",
                            "--label-value-length-limit", "1024"])
    cfg = config_from_args(ns, env=env)  # flags win over the environment
    assert [getattr(cfg, f"global_{k}") for k in keys] == [0, 16, 1024]
    for k in keys:
        for bad in ("-1", "many", "1.5", "true"):
            with pytest.raises(ConfigError) as e:
                load_config(f"global: {{{k}: {bad}}}\n" + base)
            assert f"global.{k}" in str(e.value), (k, bad)
        var = f"DCGMRELAY_{k.upper()}"
        with pytest.raises(ConfigError) as e:
            config_from_args({}, env={**env, var: "-5"})
        assert var in str(e.value)
        with pytest.raises(ConfigError) as e:
            config_from_args({k: "x"}, env={})
        assert "--" + k.replace("_", "-") in str(e.value)


def test_per_target_limits_override_the_global_ones():
    """sample_limit and the three label limits on a target (a job, as Prometheus' scrape_config):
    a value set there, 0 (no limit) included, wins over global's; an unset one is None on the
    Target and the global one applies. check-config prints only those set, and loads back."""
    from dcgmrelay.targets import ScrapeLimits

    text = yml("""
        global: {sample_limit: 1000, label_limit: 20, label_value_length_limit: 100}
        targets:
          - name: capped
            sample_limit: 50
            label_limit: 0
            label_name_length_limit: 40
            endpoints: [{address: 'a:9400'}, {address: 'b:9400'}]
          - name: inherits
            endpoints: [{address: 'c:9400'}]
          - name: pods
            type: podmonitor
            sample_limit: 7
            label_value_length_limit: 63
            endpoints: [{port: metrics}]
        outputs: [{type: compact, url: 'http://c/'}]
        """)
    cfg = load_config(text)
    capped, inherits, pods = cfg.targets
    assert capped.limits == ScrapeLimits(sample_limit=50, label_limit=0, label_name_length_limit=40)
    assert inherits.limits == ScrapeLimits()
    assert pods.limits == ScrapeLimits(sample_limit=7, label_value_length_limit=63)
    ta, tb, tc = static_targets(cfg)
    assert ta.limits == tb.limits == capped.limits and tc.limits == ScrapeLimits()
    g = cfg.global_limits
    assert g == ScrapeLimits(1000, 20, 0, 100)
    assert ta.limits.over(g) == ScrapeLimits(50, 0, 40, 100)  # 0 set on the job: no label limit for it
    assert tc.limits.over(g) == g
    # the discovery gets the PodMonitor spelling, only what is set
    [d] = pod_monitor_dicts(cfg, env={})
    assert (d["sampleLimit"], d["labelValueLengthLimit"]) == (7, 63)
    assert "labelLimit" not in d and "labelNameLengthLimit" not in d
    out = config_to_dict(cfg)
    assert {k: out["targets"][0].get(k) for k in ScrapeLimits.KEYS} == {
        "sample_limit": 50, "label_limit": 0, "label_name_length_limit": 40, "label_value_length_limit": None}
    assert not set(ScrapeLimits.KEYS) & set(out["targets"][1])
    assert load_config(effective_config_text(cfg)) == cfg
    assert load_config(config_to_dict(cfg, reveal_secrets=True)) == cfg


def test_per_target_limit_errors_name_the_path():
    """A target's limit that is no integer >= 0 is refused at its YAML path and line, in the
    native schema and in a WhatapAgent (there at the PodMonitor field's path)."""
    got = problems(yml("""
        targets:
          - name: a
            sample_limit: -1
            endpoints: [{address: 'a:9400'}]
          - name: b
            type: podmonitor
            label_limit: lots
            label_name_length_limit: 2.5
            label_value_length_limit: true
        """))
    assert got == [
        ("targets[0].sample_limit", 3, "-1 is out of range: must be >= 0"),
        ("targets[1].label_limit", 7, "expected an integer, got a string"),
        ("targets[1].label_name_length_limit", 8, "expected an integer, got a number"),
        ("targets[1].label_value_length_limit", 9, "expected an integer, got a boolean"),
    ]
    assert problems(yml("""
        targets:
          - name: a
            sample_limt: 5
            endpoints: [{address: 'a:9400'}]
        """))[0][2].startswith("unknown key 'sample_limt' (did you mean 'sample_limit'?)")
    wa = yml("""
        apiVersion: monitoring.whatap.com/v2alpha1
        kind: WhatapAgent
        spec:
          features:
            openAgent:
              targets:
                - targetName: pods
                  type: PodMonitor
                  sampleLimit: -3
                  labelValueLengthLimit: x
                  endpoints: [{port: "9400"}]
        """)
    got = problems(wa)
    assert got == [
        ("spec.features.openAgent.targets[0].sampleLimit", 9, "-3 is out of range: must be >= 0"),
        ("spec.features.openAgent.targets[0].labelValueLengthLimit", 10, "expected an integer, got a string"),
    ]


def test_whatap_agent_pod_monitor_limits_reach_the_targets():
    """A WhatapAgent target's sampleLimit / labelLimit / labelNameLengthLimit /
    labelValueLengthLimit (the PodMonitor spec fields) become the target's limits, and every
    target the discovery makes from it carries them."""
    from dcgmrelay.targets import ScrapeLimits

    pods_at = '        - targetName: "pods"\n          type: "PodMonitor"\n'
    assert pods_at in WHATAP_FULL
    cfg = load_config(WHATAP_FULL.replace(pods_at, pods_at + '          sampleLimit: 5000\n          labelLimit: 25\n'
                                          '          labelNameLengthLimit: 60\n          labelValueLengthLimit: 200\n'))
    static, pods = cfg.targets
    assert static.limits == ScrapeLimits()
    assert pods.limits == ScrapeLimits(5000, 25, 60, 200)
    [d] = pod_monitor_dicts(cfg, env={})
    assert [d[k] for k in ("sampleLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit")] == [
        5000, 25, 60, 200]
    text = effective_config_text(cfg)
    assert "sample_limit: 5000" in text and "label_value_length_limit: 200" in text
    assert load_config(config_to_dict(cfg, reveal_secrets=True)) == cfg
    discovery = pytest.importorskip("dcgmrelay.discovery")
    mon = discovery.PodMonitor.from_dict(d)
    assert mon.limits == ScrapeLimits(5000, 25, 60, 200)
    pod = {"metadata": {"name": "p", "namespace": "gpu", "labels": {"app": "dcgm-exporter"}},
           "spec": {"nodeName": "n", "containers": [{"name": "c", "ports": [{"name": "metrics",
                                                                            "containerPort": 9400}]}]},
           "status": {"phase": "Running", "podIP": "10.0.0.9"}}
    (t,) = discovery.pod_targets(pod, mon)
    assert t.limits == ScrapeLimits(5000, 25, 60, 200)


def test_body_size_limit_from_file_env_and_flag(tmp_path):
    """global.body_size_limit (Prometheus' name), DCGMRELAY_BODY_SIZE_LIMIT, --body-size-limit:
    default 64MiB, shown by check-config, refused with the path when it is no size."""
    base = "targets: [{name: t, endpoints: [{address: 'a:9400'}]}]\noutputs: [{type: compact, url: 'http://c/'}]\n"
    assert load_config(base).global_body_size_limit == 64 * 2 ** 20
    f = tmp_path / "relay.yaml"
    f.write_text("global: {body_size_limit: 8MiB}\n" + base)
    cfg = load_config(str(f))
    assert cfg.global_body_size_limit == 8 * 2 ** 20
    assert "body_size_limit: 8MiB" in effective_config_text(cfg)
    assert load_config(effective_config_text(cfg)).global_body_size_limit == 8 * 2 ** 20  # round trip
    env = {"DCGMRELAY_CONFIG": str(f), "DCGMRELAY_BODY_SIZE_LIMIT": "2MB"}
    assert config_from_args({}, env=env).global_body_size_limit == 2_000_000
    assert config_from_args({"body_size_limit": "1KiB"}, env=env).global_body_size_limit == 1024
    with pytest.raises(ConfigError) as e:
        load_config("global: {body_size_limit: lots}\n" + base)
    assert "global.body_size_limit" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_args({}, env={**env, "DCGMRELAY_BODY_SIZE_LIMIT": "0"})
    assert "DCGMRELAY_BODY_SIZE_LIMIT" in str(e.value)


def test_env_var_list():
    assert ENV_VARS == {
        "DCGMRELAY_CONFIG": "--config", "DCGMRELAY_TARGET": "--target", "DCGMRELAY_REMOTE_WRITE": "--remote-write",
        "DCGMRELAY_REMOTE_WRITE_VERSION": "--remote-write-version",
        "DCGMRELAY_OPENMETRICS_PUSH": "--openmetrics-push", "DCGMRELAY_COMPACT": "--compact",
        "DCGMRELAY_INTERVAL": "--interval", "DCGMRELAY_TIMEOUT": "--timeout",
        "DCGMRELAY_BODY_SIZE_LIMIT": "--body-size-limit", "DCGMRELAY_SAMPLE_LIMIT": "--sample-limit",
        "DCGMRELAY_LABEL_LIMIT": "--label-limit", "DCGMRELAY_LABEL_NAME_LENGTH_LIMIT": "--label-name-length-limit",
        "DCGMRELAY_LABEL_VALUE_LENGTH_LIMIT": "--label-value-length-limit",
        "DCGMRELAY_EXTERNAL_LABELS": "--external-label",
        "DCGMRELAY_CSV": "--csv",
        "DCGMRELAY_LISTEN": "--listen", "DCGMRELAY_SPOOL_DIR": "--spool-dir",
        "DCGMRELAY_SPOOL_MAX_BYTES": "--spool-max-bytes", "DCGMRELAY_SPOOL_FSYNC": "--spool-fsync",
        "DCGMRELAY_STATE_PATH": "--state-path", "DCGMRELAY_FIRST_OBSERVATION": "--first-observation",
        "DCGMRELAY_RELAY_OUTPUT": "--relay-output", "DCGMRELAY_INCLUDE_NON_DCGM": "--include-non-dcgm",
        "DCGMRELAY_BEARER_TOKEN_FILE": "--bearer-token-file", "DCGMRELAY_BEARER_TOKEN": "",
        "DCGMRELAY_HEADER": "--header", "DCGMRELAY_INSECURE_SKIP_VERIFY": "--insecure-skip-verify",
        "DCGMRELAY_CA_FILE": "--ca-file", "DCGMRELAY_LOG_LEVEL": "--log-level",
        "DCGMRELAY_LOG_FORMAT": "--log-format", "DCGMRELAY_SHARD": "--shard",
        "DCGMRELAY_KUBE_API_URL": "--kube-api-url", "DCGMRELAY_KUBE_TOKEN_FILE": "--kube-token-file",
        "DCGMRELAY_KUBE_CA_FILE": "--kube-ca-file",
        "DCGMRELAY_KUBE_INSECURE_SKIP_TLS_VERIFY": "--kube-insecure-skip-tls-verify",
        "DCGMRELAY_NODE_NAME": "--node-name",
    }
