"""deploy/kubernetes: the manifests parse, the ConfigMap's relay config and CSV load, the
workloads' command lines give the intended configuration, and every object passes a
server-side dry-run on a real kube-apiserver (v1.20) with nothing in it dropped."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from fixtures_kube import kube_apiserver  # noqa: F401

from dcgmrelay.config import PodMonitorConfig, add_run_arguments, config_from_args, load_config
from dcgmrelay.csvspec import load_csv

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = ["namespace.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml", "deployment-central.yaml"]
PROFILE_CSV = ROOT / "src" / "dcgmrelay" / "profiles" / "default-counters.csv"
NAMESPACE = "dcgmrelay"
CONFIG_PATH = "/etc/dcgmrelay/relay.yaml"
CSV_PATH = "/etc/dcgmrelay/collectors.csv"

# kind -> (API prefix, plural, namespaced)
REST = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
}


def _docs(name: str) -> List[Dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all_objects() -> List[Tuple[str, Dict[str, Any]]]:
    return [(name, d) for name in MANIFESTS for d in _docs(name)]


def _one(kind: str) -> Dict[str, Any]:
    found = [d for _, d in _all_objects() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _pod_spec(kind: str) -> Dict[str, Any]:
    return _one(kind)["spec"]["template"]["spec"]


# ------------------------------------------------------------------------------------ static checks


def test_files_exist() -> None:
    for name in MANIFESTS + ["README.md"]:
        assert (DEPLOY / name).is_file(), name
    assert (ROOT / "Dockerfile").is_file()


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_parses(name: str) -> None:
    docs = _docs(name)
    assert docs, f"{name} has no objects"
    for d in docs:
        assert isinstance(d, dict)
        assert d.get("apiVersion") and d.get("kind"), d
        assert isinstance(d.get("metadata"), dict) and d["metadata"].get("name"), d
        assert d["kind"] in REST, f"{name}: no REST path known for {d['kind']}"
        if REST[d["kind"]][2]:
            assert d["metadata"].get("namespace") == NAMESPACE, (name, d["kind"])


def test_expected_kinds() -> None:
    kinds = sorted(d["kind"] for _, d in _all_objects())
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                            "DaemonSet", "Service", "StatefulSet"])
    rules = _one("ClusterRole")["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    crb = _one("ClusterRoleBinding")
    assert crb["roleRef"]["name"] == _one("ClusterRole")["metadata"]["name"]
    sa = _one("ServiceAccount")["metadata"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    for kind in ("DaemonSet", "StatefulSet"):
        assert _pod_spec(kind)["serviceAccountName"] == sa["name"]


def _write_configmap(tmp_path: Path) -> Path:
    data = _one("ConfigMap")["data"]
    assert set(data) == {"relay.yaml", "collectors.csv"}
    csv_file = tmp_path / "collectors.csv"
    csv_file.write_text(data["collectors.csv"])
    text = data["relay.yaml"]
    assert f"csv: {CSV_PATH}" in text
    relay = tmp_path / "relay.yaml"
    relay.write_text(text.replace(CSV_PATH, str(csv_file)))
    return relay


def test_configmap_relay_config_loads(tmp_path: Path) -> None:
    cfg = load_config(_write_configmap(tmp_path))
    assert cfg.csv == str(tmp_path / "collectors.csv")
    pods = [t for t in cfg.targets if isinstance(t, PodMonitorConfig)]
    assert pods, "no podmonitor target"
    labels = [dict(t.selector.match_labels) for t in pods]
    assert {"app": "nvidia-dcgm-exporter"} in labels
    assert [o.type for o in cfg.outputs] == ["remote-write"]
    assert cfg.outputs[0].url.startswith("http://victoria-metrics.monitoring.svc")
    assert cfg.listen == "0.0.0.0:9500"
    assert cfg.spool.dir == "/var/lib/dcgmrelay/spool"
    assert cfg.relay.state_path == "/var/lib/dcgmrelay/state.json"
    assert cfg.kubernetes.node_name is None  # set per node by the DaemonSet's --node-name


def test_configmap_csv_is_default_counters(tmp_path: Path) -> None:
    text = _one("ConfigMap")["data"]["collectors.csv"]
    assert text == PROFILE_CSV.read_text()
    spec = load_csv(str(_write_configmap(tmp_path).parent / "collectors.csv"))
    assert len(spec) == len(load_csv(str(PROFILE_CSV))) > 10


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcgmrelay")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run")
    add_run_arguments(pr)
    pr.add_argument("--shutdown-timeout", type=float, default=10.0)
    return p


def _cfg_from_argv(argv: List[str], tmp_path: Path) -> Any:
    relay = _write_configmap(tmp_path)
    argv = [str(relay) if a == CONFIG_PATH else a for a in argv]
    args = _run_parser().parse_args(argv)
    assert args.cmd == "run"
    return config_from_args(args, env={})


def test_daemonset_command_line(tmp_path: Path) -> None:
    spec = _pod_spec("DaemonSet")
    c = spec["containers"][0]
    assert "command" not in c  # the image's ENTRYPOINT is dcgmrelay
    assert c["args"] == ["run", "--config", CONFIG_PATH, "--node-name", "$(NODE_NAME)"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # the kubelet expands $(NODE_NAME) from the env var
    argv = [a.replace("$(NODE_NAME)", "gpu-node-7") for a in c["args"]]
    cfg = _cfg_from_argv(argv, tmp_path)
    assert cfg.kubernetes.node_name == "gpu-node-7"
    assert cfg.shard is None
    tol = spec["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol
    assert {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"} in tol


@pytest.mark.skipif(not shutil.which("sh"), reason="no sh")
@pytest.mark.parametrize("ordinal", [0, 1])
def test_statefulset_shard_wrapper(tmp_path: Path, ordinal: int) -> None:
    sts = _one("StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["/bin/sh", "-c"] and len(c["args"]) == 1
    script = c["args"][0]
    assert script.startswith("exec dcgmrelay ")
    # the same shell expansion, printing the argv dcgmrelay would get
    probe = script.replace("exec dcgmrelay ", "exec printf '%s\\n' ", 1)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": f"dcgmrelay-central-{ordinal}"}
    out = subprocess.run(["sh", "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    argv = out.splitlines()
    n = sts["spec"]["replicas"]
    assert argv[argv.index("--shard") + 1] == f"{ordinal}/{n}"
    cfg = _cfg_from_argv(argv, tmp_path)
    assert cfg.kubernetes.node_name is None
    assert cfg.shard == (ordinal, n)


@pytest.mark.parametrize("kind", ["DaemonSet", "StatefulSet"])
def test_workload_hardening(kind: str) -> None:
    spec = _pod_spec(kind)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    c = spec["containers"][0]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(c["resources"]) == {"requests", "limits"}
    assert {p["containerPort"] for p in c["ports"]} == {9500}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/dcgmrelay"] == "config"
    assert "/var/lib/dcgmrelay" in mounts
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["config"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 2
    assert "pip wheel" in text and "/wheels" in text
    assert "USER 65532" in text
    assert 'ENTRYPOINT ["dcgmrelay"]' in text
    assert 'CMD ["run", "--config", "/etc/dcgmrelay/relay.yaml"]' in text
    assert "EXPOSE 9500" in text


# ------------------------------------------------------------------------------------ apiserver dry-run


def _collection_path(obj: Dict[str, Any]) -> str:
    prefix, plural, namespaced = REST[obj["kind"]]
    if namespaced:
        return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}"
    return f"{prefix}/{plural}"


def _missing(sent: Any, got: Any, path: str = "") -> List[str]:
    """Where ``got`` lacks or changes something of ``sent`` (defaults added by the server are fine)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected a mapping, got {got!r}"]
        out: List[str] = []
        for k, v in sent.items():
            if k not in got:
                out.append(f"{path}.{k}: dropped")
            else:
                out += _missing(v, got[k], f"{path}.{k}")
        return out
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [f"{path}: {sent!r} became {got!r}"]
        out = []
        for i, (s, g) in enumerate(zip(sent, got)):
            out += _missing(s, g, f"{path}[{i}]")
        return out
    return [] if sent == got else [f"{path}: {sent!r} became {got!r}"]


def _dry_run(client: Any, obj: Dict[str, Any]) -> Dict[str, Any]:
    r = client.post(_collection_path(obj), params={"dryRun": "All"}, json=obj)
    assert r.status_code in (200, 201), f"{obj['kind']}/{obj['metadata']['name']}: {r.status_code} {r.text}"
    return r.json()  # type: ignore[no-any-return]


def test_server_side_dry_run(kube_apiserver: Any) -> None:  # noqa: F811
    objs = [d for _, d in _all_objects()]
    with kube_apiserver.client() as c:
        ns = next(o for o in objs if o["kind"] == "Namespace")
        if c.get(f"/api/v1/namespaces/{ns['metadata']['name']}").status_code == 404:
            _dry_run(c, ns)  # the Namespace itself, before it exists
        # namespaced objects are only admitted into an existing namespace
        r = c.post("/api/v1/namespaces", json=ns)
        assert r.status_code in (201, 409), r.text
        for obj in objs:
            if obj["kind"] == "Namespace":
                continue
            got = _dry_run(c, obj)
            assert got["kind"] == obj["kind"]
            # v1.20 has no fieldValidation=Strict: unknown or misplaced fields are dropped
            # silently, so everything sent must come back (server defaults may be added).
            body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
            problems = _missing(body, got)
            assert not problems, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(problems)
        # dry-run really did not persist anything
        ds = _one("DaemonSet")
        r = c.get(f"{_collection_path(ds)}/{ds['metadata']['name']}")
        assert r.status_code == 404, r.text


def test_dry_run_comparison_catches_dropped_fields(kube_apiserver: Any) -> None:  # noqa: F811
    """The comparison above is what stands in for strict field validation: show it works."""
    import copy

    ds = copy.deepcopy(_one("DaemonSet"))
    c0 = ds["spec"]["template"]["spec"]["containers"][0]
    c0["livenessProbe"]["httpGet"]["pathh"] = "/typo"          # unknown field
    ds["spec"]["template"]["spec"]["toleration"] = [{"key": "x"}]  # misspelled field
    with kube_apiserver.client() as c:
        r = c.post("/api/v1/namespaces", json=_one("Namespace"))
        assert r.status_code in (201, 409), r.text
        got = _dry_run(c, ds)
    problems = _missing(ds["spec"], got["spec"], "spec")
    assert any("pathh: dropped" in p for p in problems), problems
    assert any(p.endswith(".toleration: dropped") for p in problems), problems
