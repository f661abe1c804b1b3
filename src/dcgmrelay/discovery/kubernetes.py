"""Kubernetes pod discovery with prometheus-operator ``PodMonitor`` semantics.

:class:`PodMonitorDiscovery` is a :class:`~dcgmrelay.targets.TargetSource`: for
every :class:`PodMonitor` it lists and then watches pods through the
Kubernetes API (plain async httpx, no Kubernetes client library) and yields the
whole, sorted target list each time it changes::

    creds = KubeCredentials.resolve()            # flags / env / in-cluster
    disc = PodMonitorDiscovery([PodMonitor.from_dict(t) for t in targets], creds,
                               node_name=resolve_node_name())
    async for targets in disc.updates():
        ...                                      # hand to the scrape manager
    await disc.aclose()

The list/watch contract (Kubernetes "API concepts"):

* one list/watch per ``namespaceSelector.matchNames`` entry, one cluster-wide
  list/watch for ``any: true``, the PodMonitor's own namespace when neither is
  set; the selector goes to the server as ``labelSelector`` (and, in per-node
  mode, ``fieldSelector=spec.nodeName=<node>``) on both list and watch;
* the list is paginated (``limit``/``continue``) and is a consistent read (no
  ``resourceVersion`` parameter), so the watch never starts at
  ``resourceVersion=0`` (which may serve stale cache data);
* the watch asks for bookmarks (``allowWatchBookmarks=true``) and a server-side
  ``timeoutSeconds``; the resourceVersion of every event, bookmarks included, is
  remembered and a watch that ends normally is re-opened from it;
* ``410 Gone`` (HTTP status or an ``ERROR`` event with code 410, "too old
  resource version") makes the watcher re-list and *replace* its pod cache with
  the new list (a diff: nothing in the gap is lost, nothing is duplicated);
* other errors (connection refused or reset, 5xx, 429, 401 ...) are retried
  from the last resourceVersion after an exponential backoff with jitter,
  bounded by ``backoff_max_s``;
* ``403 Forbidden`` is a configuration error: :class:`KubeForbiddenError` says
  which permission is missing (and is raised out of :meth:`updates` unless
  ``forbidden_is_fatal=False``, in which case it is logged and retried).

Target rules (prometheus-operator ``generatePodMonitorConfig`` + Prometheus
``kubernetes_sd`` role ``pod``):

* pods without ``status.podIP`` and pods in phase ``Failed`` / ``Succeeded``
  give no target; ``Pending`` / ``Unknown`` pods with an IP do (like Prometheus);
* a pod that stops matching the selector is reported by the server as
  ``DELETED`` on the filtered watch and loses its targets at once;
* ``port`` is a container port *name*; ``portNumber`` a declared container port
  number; ``targetPort`` (deprecated) either; precedence port > portNumber >
  targetPort; with none of them every declared container port is a target;
  ``spec.containers`` and ``spec.initContainers`` are both searched;
* **deviation**: an all-digit ``port`` (the WhatapAgent example writes
  ``port: "9400"``) is taken as the port *number*, as ``portNumber`` would be.
  Kubernetes port names must contain a letter, so under strict PodMonitor rules
  such a port could never match and the example would find no target. As with
  ``portNumber``, the number must be declared by one of the pod's containers;
* containers without any declared port give no target (Prometheus would give an
  address without a port, which is only useful with relabelling);
* labels: ``namespace``, ``pod``, ``container``, ``job`` (the PodMonitor name,
  or the value of the pod label named by ``jobLabel``), ``instance``
  (``podIP:port``), ``endpoint`` (the ``port`` as written, when set) and, only
  for an endpoint with ``addNodeLabel: true`` (default false, as in the
  WhatapAgent resource), ``node`` (``spec.nodeName``); relabeling sees
  ``__meta_kubernetes_pod_node_name`` either way. Labels with an empty value are
  left out (Prometheus semantics: an empty label is an absent label), e.g.
  ``node`` of an unscheduled pod;
* ``relabelConfigs`` then choose and rewrite the targets as Prometheus' target
  relabeling does, with kubernetes_sd's pod meta labels (:func:`pod_targets`);
  each target carries its endpoint's auth, TLS and ``metricRelabelConfigs``, and the
  monitor's ``sampleLimit``, ``labelLimit``, ``labelNameLengthLimit`` and
  ``labelValueLengthLimit`` (spec-level, as in prometheus-operator; unset: the relay's
  global ones).

Credentials: :class:`KubeCredentials` -- in-cluster (service-account token,
re-read whenever the file changes, since bound tokens rotate; the cluster CA) or
explicit ones for running outside a cluster (``--kube-api-url``,
``--kube-token-file``, ``--kube-ca-file``, ``--node-name`` or the
``DCGMRELAY_KUBE_API_URL``, ``DCGMRELAY_KUBE_TOKEN_FILE``,
``DCGMRELAY_KUBE_CA_FILE``, ``DCGMRELAY_NODE_NAME`` / ``NODE_NAME`` environment
variables). The agent needs ``get``, ``list`` and ``watch`` on ``pods``: a
ClusterRole bound cluster-wide for ``any: true``, or per-namespace RoleBindings
for ``matchNames``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Dict,
    Iterable,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import quote

import httpx

from ..relabel import compile_rules
from ..targets import ScrapeLimits, Target, TargetLabelError, scrape_labels, target_from_labels
from ..targets import parse_duration as _parse_duration

__all__ = [
    "KubeAPIError",
    "KubeConfigError",
    "KubeCredentials",
    "KubeError",
    "KubeForbiddenError",
    "LabelSelector",
    "LabelSelectorRequirement",
    "NamespaceSelector",
    "PodMetricsEndpoint",
    "PodMonitor",
    "PodMonitorDiscovery",
    "add_kube_arguments",
    "credentials_from_args",
    "label_selector_string",
    "monitors_from_targets",
    "parse_duration",
    "pod_targets",
    "resolve_node_name",
]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ENV_API_URL = "DCGMRELAY_KUBE_API_URL"
ENV_TOKEN_FILE = "DCGMRELAY_KUBE_TOKEN_FILE"
ENV_CA_FILE = "DCGMRELAY_KUBE_CA_FILE"
ENV_INSECURE = "DCGMRELAY_KUBE_INSECURE_SKIP_TLS_VERIFY"
ENV_NODE_NAMES = ("DCGMRELAY_NODE_NAME", "NODE_NAME")


# --------------------------------------------------------------------------- errors


class KubeError(Exception):
    """Base class of Kubernetes discovery errors."""


class KubeConfigError(KubeError):
    """No usable API server / credentials, or an invalid PodMonitor."""


class KubeAPIError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}{' ' + reason if reason else ''}: {message}")
        self.status = status
        self.reason = reason
        self.api_message = message


class KubeForbiddenError(KubeAPIError):
    """403: the credentials lack a permission; the message says which."""


class _Gone(Exception):
    """410: the resourceVersion is too old (or a continue token expired): re-list."""


# --------------------------------------------------------------------------- selectors

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_OPERATORS = {"in": "In", "notin": "NotIn", "exists": "Exists", "doesnotexist": "DoesNotExist"}


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid label key {key!r}: empty")
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        raise ValueError(f"invalid label key {key!r}: bad prefix {prefix!r}")
    if len(name) > 63 or not _NAME_RE.match(name):
        raise ValueError(f"invalid label key {key!r}")
    return key


def _check_value(key: str, value: object) -> str:
    if not isinstance(value, str):
        # YAML turns `gpu: 1` / `enabled: true` into non-strings; Kubernetes wants strings.
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        else:
            raise ValueError(f"invalid value {value!r} for label {key!r}")
    if value and (len(value) > 63 or not _NAME_RE.match(value)):
        raise ValueError(f"invalid value {value!r} for label {key!r}")
    return value


@dataclass
class LabelSelectorRequirement:
    """One ``matchExpressions`` entry: ``key`` ``operator`` (In, NotIn, Exists, DoesNotExist) ``values``."""

    key: str
    operator: str
    values: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_key(self.key)
        op = _OPERATORS.get(str(self.operator).lower())
        if op is None:
            raise ValueError(f"matchExpressions: unknown operator {self.operator!r} for key {self.key!r} "
                             f"(In, NotIn, Exists, DoesNotExist)")
        self.operator = op
        self.values = [_check_value(self.key, v) for v in (self.values or [])]
        if op in ("In", "NotIn") and not self.values:
            raise ValueError(f"matchExpressions: {op} on {self.key!r} needs at least one value")
        if op in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"matchExpressions: {op} on {self.key!r} takes no values")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelSelectorRequirement":
        return cls(key=d["key"], operator=d["operator"], values=list(d.get("values") or []))

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present

    def __str__(self) -> str:
        if self.operator == "In":
            return f"{self.key} in ({','.join(sorted(set(self.values)))})"
        if self.operator == "NotIn":
            return f"{self.key} notin ({','.join(sorted(set(self.values)))})"
        if self.operator == "Exists":
            return self.key
        return f"!{self.key}"


@dataclass
class LabelSelector:
    """A ``metav1.LabelSelector``: all ``match_labels`` and all ``match_expressions`` must hold.

    An empty selector matches every pod (``LabelSelectorAsSelector``).
    """

    match_labels: Dict[str, str] = field(default_factory=dict)
    match_expressions: List[LabelSelectorRequirement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.match_labels = {_check_key(k): _check_value(k, v) for k, v in (self.match_labels or {}).items()}
        self.match_expressions = [
            e if isinstance(e, LabelSelectorRequirement) else LabelSelectorRequirement.from_dict(e)
            for e in (self.match_expressions or [])
        ]

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "LabelSelector":
        d = d or {}
        return cls(
            match_labels=dict(d.get("matchLabels") or d.get("match_labels") or {}),
            match_expressions=list(d.get("matchExpressions") or d.get("match_expressions") or []),
        )

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Client-side evaluation, with the API server's semantics."""
        labels = labels or {}
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        return all(e.matches(labels) for e in self.match_expressions)


def label_selector_string(selector: Union[LabelSelector, Mapping[str, Any], None]) -> str:
    """The ``labelSelector`` query string of a LabelSelector, like ``LabelSelectorAsSelector(...).String()``.

    ``matchLabels`` become ``k=v``, ``In`` ``k in (a,b)``, ``NotIn`` ``k notin (a,b)``,
    ``Exists`` ``k``, ``DoesNotExist`` ``!k``; requirements are sorted by key (stable),
    values sorted and de-duplicated. Keys and values are validated, so nothing can
    be injected into the selector. An empty selector gives ``""`` (everything).
    """
    if selector is None:
        return ""
    if not isinstance(selector, LabelSelector):
        selector = LabelSelector.from_dict(selector)
    reqs: List[Tuple[str, str]] = [(k, f"{k}={v}") for k, v in selector.match_labels.items()]
    reqs += [(e.key, str(e)) for e in selector.match_expressions]
    reqs.sort(key=lambda r: r[0])
    return ",".join(r for _, r in reqs)


# --------------------------------------------------------------------------- PodMonitor

def parse_duration(value: Union[str, int, float, None]) -> Optional[float]:
    """Seconds of a Prometheus duration (``"15s"``, ``"1m30s"``, ``"500ms"``) or a number of
    seconds (:func:`dcgmrelay.targets.parse_duration`); None for None or ``""`` (not set)."""
    if value is None or value == "":
        return None
    return _parse_duration(value)


@dataclass
class NamespaceSelector:
    """``namespaceSelector``: ``any`` (all namespaces) or ``match_names``; neither = the PodMonitor's own."""

    any: bool = False
    match_names: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names: List[str] = []
        for n in self.match_names or []:
            if not isinstance(n, str) or len(n) > 63 or not _DNS_LABEL_RE.match(n):
                raise ValueError(f"namespaceSelector.matchNames: invalid namespace {n!r}")
            if n not in names:
                names.append(n)
        self.match_names = names
        self.any = bool(self.any)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "NamespaceSelector":
        d = d or {}
        return cls(any=bool(d.get("any", False)),
                   match_names=list(d.get("matchNames") or d.get("match_names") or []))


@dataclass
class PodMetricsEndpoint:
    """One ``podMetricsEndpoints`` entry (``endpoints`` in the WhatapAgent target).

    ``port`` is a container port name -- except that an all-digit ``port`` means
    the port number (see the module docstring: a documented deviation).
    """

    port: Optional[str] = None
    port_number: Optional[int] = None
    target_port: Optional[Union[int, str]] = None
    path: str = "/metrics"
    scheme: str = "http"
    interval: Optional[float] = None  # seconds; None = the discovery's default
    scrape_timeout: Optional[float] = None  # seconds; None = min(10 s, interval)
    params: Dict[str, List[str]] = field(default_factory=dict)
    #: What every target of this endpoint is scraped with, in :class:`Target` form (the
    #: config's ``basic_auth`` / ``authorization`` / ``tls``, secrets as ``Secret``).
    auth: Dict[str, Any] = field(default_factory=dict)
    tls: Dict[str, Any] = field(default_factory=dict)
    #: ``metricRelabelConfigs``: applied to the samples scraped from each target.
    metric_relabel_configs: List[Mapping[str, Any]] = field(default_factory=list)
    #: ``addNodeLabel``: the targets carry a ``node`` label (the pod's ``spec.nodeName``).
    add_node_label: bool = False

    def __post_init__(self) -> None:
        if self.port is not None:
            self.port = str(self.port)
        if self.port_number is not None:
            self.port_number = int(self.port_number)
        self.scheme = (self.scheme or "http").lower()
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, not {self.scheme!r}")
        if not isinstance(self.add_node_label, bool):
            raise ValueError(f"addNodeLabel must be true or false, not {self.add_node_label!r}")
        self.path = self.path or "/metrics"
        if not self.path.startswith("/"):
            self.path = "/" + self.path
        self.interval = parse_duration(self.interval) if not isinstance(self.interval, float) else self.interval
        self.scrape_timeout = (parse_duration(self.scrape_timeout)
                               if not isinstance(self.scrape_timeout, float) else self.scrape_timeout)
        self.params = {str(k): ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
                       for k, v in (self.params or {}).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, default_interval: Any = None,
                  default_path: Optional[str] = None) -> "PodMetricsEndpoint":
        port = d.get("port")
        return cls(
            port=None if port is None else str(port),
            port_number=d.get("portNumber", d.get("port_number")),
            target_port=d.get("targetPort", d.get("target_port")),
            path=d.get("path") or default_path or "/metrics",
            scheme=d.get("scheme") or "http",
            interval=d.get("interval") or default_interval,
            scrape_timeout=d.get("scrapeTimeout", d.get("scrape_timeout")),
            params=dict(d.get("params") or {}),
            auth=dict(d.get("auth") or {}),
            tls=dict(d.get("tls") or {}),
            metric_relabel_configs=list(d.get("metricRelabelConfigs", d.get("metric_relabel_configs")) or []),
            add_node_label=d.get("addNodeLabel", d.get("add_node_label", False)),
        )

    def port_rule(self) -> Tuple[str, Union[str, int, None]]:
        """``("name", n)``, ``("number", n)`` or ``("any", None)`` -- which container ports are targets."""
        if self.port:
            if self.port.isdigit():
                return ("number", int(self.port))  # deviation: see the module docstring
            return ("name", self.port)
        if self.port_number is not None:
            return ("number", self.port_number)
        if self.target_port is not None and self.target_port != "":
            tp = self.target_port
            if isinstance(tp, int) or str(tp).isdigit():
                return ("number", int(tp))
            return ("name", str(tp))
        return ("any", None)


@dataclass
class PodMonitor:
    """A PodMonitor: which pods (namespaces + label selector) and which endpoints on them."""

    name: str
    namespace: str = "default"
    namespace_selector: NamespaceSelector = field(default_factory=NamespaceSelector)
    selector: LabelSelector = field(default_factory=LabelSelector)
    endpoints: List[PodMetricsEndpoint] = field(default_factory=lambda: [PodMetricsEndpoint()])
    #: Pod label whose value becomes ``job`` (``jobLabel``); default: the monitor name.
    job_label: Optional[str] = None
    #: ``relabelConfigs``: Prometheus target relabeling of every discovered target (see
    #: :func:`pod_targets` for the labels that go in).
    relabel_configs: List[Mapping[str, Any]] = field(default_factory=list)
    #: ``sampleLimit``, ``labelLimit``, ``labelNameLengthLimit``, ``labelValueLengthLimit``:
    #: carried by every target of the monitor (None where unset: the relay's global limits).
    limits: ScrapeLimits = field(default_factory=ScrapeLimits)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PodMonitor needs a name")
        for fname, n in zip(_LIMIT_FIELDS, self.limits.as_tuple()):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"PodMonitor {self.name}: {fname} must be an integer >= 0, not {n!r}")
        self.rules = (compile_rules(list(self.relabel_configs), path=f"{self.name}.relabel_configs")
                      if self.relabel_configs else None)
        if isinstance(self.namespace_selector, Mapping):
            self.namespace_selector = NamespaceSelector.from_dict(self.namespace_selector)
        if isinstance(self.selector, Mapping):
            self.selector = LabelSelector.from_dict(self.selector)
        self.endpoints = [e if isinstance(e, PodMetricsEndpoint) else PodMetricsEndpoint.from_dict(e)
                          for e in self.endpoints]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, namespace: Optional[str] = None,
                  default_interval: Any = None, default_path: Optional[str] = None) -> "PodMonitor":
        """From a PodMonitor resource (``metadata`` + ``spec.podMetricsEndpoints``), a WhatapAgent
        ``openAgent.targets`` entry (``targetName``, ``endpoints``) or the flat field names.

        ``namespace`` is the own namespace when the mapping has none.
        """
        if "spec" in d and isinstance(d["spec"], Mapping):
            meta = d.get("metadata") or {}
            spec = d["spec"]
            name = meta.get("name")
            ns = meta.get("namespace") or namespace or "default"
            eps = spec.get("podMetricsEndpoints") or spec.get("endpoints") or []
        else:
            spec = d
            name = d.get("targetName") or d.get("name")
            ns = d.get("namespace") or namespace or "default"
            eps = d.get("endpoints") or d.get("podMetricsEndpoints") or []
        if not eps:
            eps = [{}]
        return cls(
            name=str(name or ""),
            namespace=str(ns),
            namespace_selector=NamespaceSelector.from_dict(
                spec.get("namespaceSelector") or spec.get("namespace_selector")),
            selector=LabelSelector.from_dict(spec.get("selector")),
            endpoints=[PodMetricsEndpoint.from_dict(e, default_interval=default_interval, default_path=default_path)
                       for e in eps],
            job_label=spec.get("jobLabel") or spec.get("job_label") or None,
            relabel_configs=list(spec.get("relabelConfigs", spec.get("relabel_configs")) or []),
            limits=ScrapeLimits(*(spec.get(f, spec.get(k)) for f, k in zip(_LIMIT_FIELDS, ScrapeLimits.KEYS))),
        )

    def namespaces(self) -> List[Optional[str]]:
        """Where to list/watch: ``[None]`` (cluster-wide) for ``any``, else namespace names."""
        if self.namespace_selector.any:
            return [None]
        if self.namespace_selector.match_names:
            return list(self.namespace_selector.match_names)
        return [self.namespace]


#: the PodMonitor spec fields of :class:`ScrapeLimits`, in its order
_LIMIT_FIELDS = ("sampleLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit")


def monitors_from_targets(targets: Iterable[Mapping[str, Any]], *, namespace: str = "default",
                          global_interval: Any = None, global_path: Optional[str] = None) -> List[PodMonitor]:
    """PodMonitors from a WhatapAgent ``spec.features.openAgent.targets`` list.

    Keeps the ``type: PodMonitor`` entries that are not ``enabled: false``;
    ``globalInterval`` / ``globalPath`` fill endpoints that set none.
    """
    out = []
    for t in targets:
        if str(t.get("type", "PodMonitor")).lower() != "podmonitor":
            continue
        if t.get("enabled", True) is False:
            continue
        out.append(PodMonitor.from_dict(t, namespace=namespace, default_interval=global_interval,
                                        default_path=global_path))
    return out


# --------------------------------------------------------------------------- pod -> targets

_DROP_PHASES = ("Failed", "Succeeded")


def _slim_pod(pod: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of a Pod that target building needs (keeps the watch cache small)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}

    def containers(key: str) -> List[Dict[str, Any]]:
        return [{"name": c.get("name", ""),
                 "ports": [{"name": p.get("name", ""), "containerPort": p.get("containerPort")}
                           for p in (c.get("ports") or [])]}
                for c in (spec.get(key) or [])]

    return {
        "metadata": {"name": meta.get("name", ""), "namespace": meta.get("namespace", ""),
                     "labels": dict(meta.get("labels") or {})},
        "spec": {"nodeName": spec.get("nodeName", ""), "containers": containers("containers"),
                 "initContainers": containers("initContainers")},
        "status": {"phase": status.get("phase", ""), "podIP": status.get("podIP", "")},
    }


def _label_name(s: str) -> str:
    """A Kubernetes label key as a Prometheus label name suffix (``app.kubernetes.io/name``
    -> ``app_kubernetes_io_name``), as kubernetes_sd writes ``__meta_kubernetes_pod_label_*``."""
    return _NOT_LABEL_CHAR.sub("_", s)


_NOT_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def pod_targets(pod: Mapping[str, Any], monitor: PodMonitor, *, default_interval_s: float = 15.0,
                check_selector: bool = True) -> List[Target]:
    """The targets one pod gives under one PodMonitor (the rules are in the module docstring).

    With ``relabelConfigs`` each target's label set goes through them first, with
    Prometheus semantics: in go ``job``, ``__address__``, ``__scheme__``,
    ``__metrics_path__``, ``__scrape_interval__``, ``__scrape_timeout__``,
    ``__param_<name>``, the target labels (``namespace``, ``pod``, ``container``,
    ``endpoint``, and ``node`` with ``addNodeLabel``) and kubernetes_sd's pod meta labels
    (``__meta_kubernetes_namespace``, ``__meta_kubernetes_pod_name``, ``_ip``,
    ``_node_name``, ``_phase``, ``_label_<name>``, ``_labelpresent_<name>``,
    ``_container_name``, ``_container_port_name``, ``_container_port_number``); a dropped
    set gives no target. What the resulting set means is :func:`dcgmrelay.targets.target_from_labels`'
    business, as for static targets: labels with an empty value are left out, ``instance``
    defaults to ``__address__``, ``__*`` labels go, and a set whose address, scheme, interval or
    timeout cannot be used gives no target and a logged warning.
    Each target carries its endpoint's ``auth``, ``tls`` and ``metricRelabelConfigs``, and
    the monitor's limits.

    ``check_selector`` re-checks the monitor's label selector client-side (the
    server already filtered; this is a guard and makes the function usable alone).
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP") or ""
    if not ip or status.get("phase") in _DROP_PHASES:
        return []
    labels = meta.get("labels") or {}
    if check_selector and not monitor.selector.matches(labels):
        return []
    host = f"[{ip}]" if ":" in ip else ip
    job = monitor.name
    if monitor.job_label and labels.get(monitor.job_label):
        job = labels[monitor.job_label]
    rules = monitor.rules
    pod_meta: Dict[str, str] = {}
    if rules is not None:
        pod_meta = {"__meta_kubernetes_namespace": meta.get("namespace", ""),
                    "__meta_kubernetes_pod_name": meta.get("name", ""),
                    "__meta_kubernetes_pod_ip": ip,
                    "__meta_kubernetes_pod_node_name": spec.get("nodeName") or "",
                    "__meta_kubernetes_pod_phase": status.get("phase") or ""}
        for k, v in labels.items():
            pod_meta[f"__meta_kubernetes_pod_label_{_label_name(str(k))}"] = str(v)
            pod_meta[f"__meta_kubernetes_pod_labelpresent_{_label_name(str(k))}"] = "true"
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    where = f"{monitor.name} pod {meta.get('namespace', '')}/{meta.get('name', '')}"
    out: List[Target] = []
    seen = set()
    for ep in monitor.endpoints:
        kind, want = ep.port_rule()
        interval = float(ep.interval if ep.interval else default_interval_s)
        timeout = float(ep.scrape_timeout if ep.scrape_timeout else min(10.0, interval))
        for c in containers:
            for p in c.get("ports") or []:
                number = p.get("containerPort")
                if not isinstance(number, int):
                    continue
                if kind == "name" and p.get("name") != want:
                    continue
                if kind == "number" and number != want:
                    continue
                lb: Dict[str, str] = dict(pod_meta)
                if rules is not None:
                    lb.update({"__meta_kubernetes_pod_container_name": c.get("name", ""),
                               "__meta_kubernetes_pod_container_port_name": p.get("name") or "",
                               "__meta_kubernetes_pod_container_port_number": str(number)})
                lb.update(scrape_labels(job=job, address=f"{host}:{number}", scheme=ep.scheme, path=ep.path,
                                        interval_s=interval, timeout_s=timeout, params=ep.params))
                lb.update({
                    "namespace": meta.get("namespace", ""),
                    "pod": meta.get("name", ""),
                    "container": c.get("name", ""),
                    "node": (spec.get("nodeName") or "") if ep.add_node_label else "",
                    "endpoint": ep.port or (str(ep.target_port) if ep.target_port not in (None, "") else ""),
                })
                if rules is not None:
                    res = rules.apply(lb)
                    if res is None:
                        continue  # dropped by the rules
                    lb = res
                try:
                    t = target_from_labels(lb, name=f"{where} port {number}", job=job, scheme=ep.scheme,
                                           interval_s=interval, timeout_s=timeout, params=ep.params,
                                           auth=ep.auth, tls=ep.tls, metric_relabel=ep.metric_relabel_configs,
                                           limits=monitor.limits)
                except TargetLabelError as exc:
                    log.warning("%s; it is not scraped", exc)
                    continue
                if t is None:
                    continue  # the rules left it without an address
                ident = (t.url, tuple(sorted((k, tuple(v)) for k, v in t.params.items())), t.job)
                if ident in seen:  # duplicate same-name / same-number ports: one target
                    continue
                seen.add(ident)
                out.append(t)
    return out


def _target_sort_key(t: Target) -> Tuple[Any, ...]:
    return (t.key, t.job, tuple(sorted(t.labels.items())))


def _target_signature(t: Target) -> Tuple[Any, ...]:
    return (t.url, t.key, t.job, tuple(sorted(t.labels.items())), t.interval_s, t.timeout_s)


# --------------------------------------------------------------------------- credentials


class KubeCredentials:
    """Where the API server is and how to authenticate to it.

    ``token_file`` is re-read whenever it changes (checked with ``stat`` before
    each request, and forced after a 401), so a rotating bound service-account
    token keeps working. ``token`` is a fixed token (tests, ``kubectl proxy``
    needs none).
    """

    def __init__(self, api_url: str, *, token: Optional[str] = None, token_file: Optional[str] = None,
                 ca_file: Optional[str] = None, insecure: bool = False,
                 namespace: Optional[str] = None) -> None:
        if not api_url:
            raise KubeConfigError("no Kubernetes API URL")
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.ca_file = ca_file
        self.insecure = bool(insecure)
        #: The namespace of the service account (in-cluster), if known.
        self.namespace = namespace
        self._token_stat: Optional[Tuple[int, int, int]] = None
        self._token_cached: Optional[str] = None

    def __repr__(self) -> str:
        return (f"KubeCredentials(api_url={self.api_url!r}, token={'***' if self.token else None}, "
                f"token_file={self.token_file!r}, ca_file={self.ca_file!r}, insecure={self.insecure})")

    @classmethod
    def from_in_cluster(cls, sa_dir: str = SERVICE_ACCOUNT_DIR,
                        env: Optional[Mapping[str, str]] = None) -> "KubeCredentials":
        """In a pod: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the mounted service-account token and CA."""
        env = os.environ if env is None else env
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset); "
                                  "use --kube-api-url/--kube-token-file/--kube-ca-file "
                                  f"(or {ENV_API_URL}, {ENV_TOKEN_FILE}, {ENV_CA_FILE})")
        token_file = os.path.join(sa_dir, "token")
        if not os.path.exists(token_file):
            raise KubeConfigError(f"in-cluster: no service-account token at {token_file} "
                                  "(automountServiceAccountToken: false?)")
        ca_file = os.path.join(sa_dir, "ca.crt")
        ns = None
        with contextlib.suppress(OSError):
            with open(os.path.join(sa_dir, "namespace")) as f:
                ns = f.read().strip() or None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token_file=token_file,
                   ca_file=ca_file if os.path.exists(ca_file) else None, namespace=ns)

    @classmethod
    def resolve(cls, api_url: Optional[str] = None, token_file: Optional[str] = None,
                ca_file: Optional[str] = None, insecure: Optional[bool] = None,
                env: Optional[Mapping[str, str]] = None,
                sa_dir: str = SERVICE_ACCOUNT_DIR) -> "KubeCredentials":
        """Explicit arguments, else ``DCGMRELAY_KUBE_*`` environment variables, else in-cluster."""
        env = os.environ if env is None else env
        api_url = api_url or env.get(ENV_API_URL)
        if insecure is None:
            insecure = env.get(ENV_INSECURE, "").lower() in ("1", "true", "yes")
        if api_url:
            token_file = token_file or env.get(ENV_TOKEN_FILE) or None
            ca_file = ca_file or env.get(ENV_CA_FILE) or None
            if token_file and not os.path.exists(token_file):
                raise KubeConfigError(f"--kube-token-file {token_file}: no such file")
            if ca_file and not os.path.exists(ca_file):
                raise KubeConfigError(f"--kube-ca-file {ca_file}: no such file")
            return cls(api_url, token_file=token_file, ca_file=ca_file, insecure=insecure)
        creds = cls.from_in_cluster(sa_dir, env)
        if token_file:
            creds.token_file = token_file
        if ca_file:
            creds.ca_file = ca_file
        creds.insecure = insecure
        return creds

    def get_token(self, force: bool = False) -> Optional[str]:
        """The bearer token; the file is re-read when its inode, size or mtime changed."""
        if self.token_file is None:
            return self.token
        try:
            st = os.stat(self.token_file)
        except OSError as exc:
            if self._token_cached is not None:
                log.warning("kube token file %s unreadable (%s); using the last token", self.token_file, exc)
                return self._token_cached
            raise KubeConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if force or sig != self._token_stat or self._token_cached is None:
            with open(self.token_file) as f:
                self._token_cached = f.read().strip()
            self._token_stat = sig
        return self._token_cached

    def headers(self, force_token_reload: bool = False) -> Dict[str, str]:
        tok = self.get_token(force_token_reload)
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def verify(self) -> Union[ssl.SSLContext, bool]:
        """The ``verify`` argument for httpx: the CA file, none (insecure) or the system store."""
        if self.insecure:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True


def resolve_node_name(explicit: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``--node-name``, else ``DCGMRELAY_NODE_NAME``, else ``NODE_NAME`` (the downward-API convention)."""
    if explicit:
        return explicit
    env = os.environ if env is None else env
    for name in ENV_NODE_NAMES:
        if env.get(name):
            return env[name]
    return None


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--kube-api-url``, ``--kube-token-file``, ``--kube-ca-file``, ``--kube-insecure-skip-tls-verify``
    and ``--node-name`` to a CLI parser (all default to the environment, then in-cluster)."""
    g = parser.add_argument_group("Kubernetes discovery")
    g.add_argument("--kube-api-url", metavar="URL", default=None,
                   help=f"API server URL when running outside the cluster (env {ENV_API_URL}); "
                        "default: in-cluster")
    g.add_argument("--kube-token-file", metavar="FILE", default=None,
                   help=f"bearer token file, re-read when it changes (env {ENV_TOKEN_FILE})")
    g.add_argument("--kube-ca-file", metavar="FILE", default=None,
                   help=f"CA bundle of the API server (env {ENV_CA_FILE})")
    g.add_argument("--kube-insecure-skip-tls-verify", action="store_true", default=None,
                   help=f"do not verify the API server certificate (env {ENV_INSECURE})")
    g.add_argument("--node-name", metavar="NODE", default=None,
                   help="per-node mode: only pods with spec.nodeName=NODE "
                        "(env DCGMRELAY_NODE_NAME or NODE_NAME)")


def credentials_from_args(args: argparse.Namespace, env: Optional[Mapping[str, str]] = None
                          ) -> Tuple[KubeCredentials, Optional[str]]:
    """(credentials, node name) from :func:`add_kube_arguments`' options, the environment or in-cluster."""
    creds = KubeCredentials.resolve(
        api_url=getattr(args, "kube_api_url", None),
        token_file=getattr(args, "kube_token_file", None),
        ca_file=getattr(args, "kube_ca_file", None),
        insecure=getattr(args, "kube_insecure_skip_tls_verify", None),
        env=env,
    )
    return creds, resolve_node_name(getattr(args, "node_name", None), env)


# --------------------------------------------------------------------------- list / watch


class _Backoff:
    """Exponential backoff with jitter in [d/2, d], d = min(max, initial * 2**n)."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def next_delay(self) -> float:
        d = min(self.maximum, self.initial * (2 ** min(self.n, 30)))
        self.n += 1
        return random.uniform(d / 2, d)


def _status_of(resp_json: Any) -> Tuple[str, str, int]:
    if isinstance(resp_json, Mapping):
        return (str(resp_json.get("message", "")), str(resp_json.get("reason", "")), int(resp_json.get("code") or 0))
    return ("", "", 0)


class _Watcher:
    """List + watch of the pods of one PodMonitor in one namespace (or cluster-wide)."""

    def __init__(self, disc: "PodMonitorDiscovery", monitor: PodMonitor, namespace: Optional[str]) -> None:
        self.disc = disc
        self.monitor = monitor
        self.namespace = namespace
        self.scope = f"namespace {namespace!r}" if namespace else "the cluster scope"
        self.where = f"podmonitor {monitor.namespace}/{monitor.name}, {self.scope}"
        base = disc.credentials.api_url
        self.path = (f"{base}/api/v1/namespaces/{quote(namespace, safe='')}/pods" if namespace
                     else f"{base}/api/v1/pods")
        self.params: Dict[str, str] = {}
        sel = label_selector_string(monitor.selector)
        if sel:
            self.params["labelSelector"] = sel
        if disc.node_name:
            self.params["fieldSelector"] = f"spec.nodeName={disc.node_name}"
        #: "ns/name" -> slim pod; targets per pod
        self.pods: Dict[str, Dict[str, Any]] = {}
        self.targets: Dict[str, List[Target]] = {}
        self.synced = False
        self.attempted = False
        self.seen = 0  # watch events received (bookmarks included)
        self.last_error: Optional[BaseException] = None

    # -- cache ----------------------------------------------------------------

    def _put(self, pod: Mapping[str, Any]) -> bool:
        slim = _slim_pod(pod)
        key = f"{slim['metadata']['namespace']}/{slim['metadata']['name']}"
        self.pods[key] = slim
        new = pod_targets(slim, self.monitor, default_interval_s=self.disc.default_interval_s)
        old = self.targets.get(key)
        if new:
            self.targets[key] = new
        else:
            self.targets.pop(key, None)
        return [_target_signature(t) for t in (old or [])] != [_target_signature(t) for t in new]

    def _delete(self, pod: Mapping[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        self.pods.pop(key, None)
        return self.targets.pop(key, None) is not None

    # -- HTTP -----------------------------------------------------------------

    def _raise_for(self, status: int, body: Any, verb: str) -> None:
        message, reason, _ = _status_of(body)
        if not message:
            message = str(body)[:300] if body else f"HTTP {status}"
        if status == 410:
            raise _Gone(message)
        if status == 403:
            if self.namespace:
                hint = (f"cannot {verb} pods in namespace {self.namespace!r} -- grant get/list/watch on pods "
                        f"in that namespace (a Role or ClusterRole bound by a RoleBinding in "
                        f"{self.namespace!r}), or remove it from namespaceSelector.matchNames")
            else:
                hint = ("cannot " + verb + " pods at the cluster scope -- grant get/list/watch on pods "
                        "cluster-wide (a ClusterRole bound by a ClusterRoleBinding) or use "
                        "namespaceSelector.matchNames with per-namespace RoleBindings")
            raise KubeForbiddenError(
                403, f"pods is forbidden ({self.where}): {hint}. API server said: {message}", reason or "Forbidden")
        if status == 401:
            tf = self.disc.credentials.token_file
            raise KubeAPIError(401, f"unauthorized ({self.where}): the API server rejected the token"
                                    f"{' from ' + tf if tf else ''}; it will be re-read. API server said: {message}",
                               reason or "Unauthorized")
        raise KubeAPIError(status, f"{verb} pods ({self.where}): {message}", reason)

    async def list(self) -> str:
        """Full (paginated) list; replaces the cache; returns the list's resourceVersion."""
        client = self.disc._client
        assert client is not None
        pods: List[Mapping[str, Any]] = []
        cont: Optional[str] = None
        rv = ""
        while True:
            params = dict(self.params)
            params["limit"] = str(self.disc.page_size)
            if cont:
                params["continue"] = cont
            resp = await client.get(self.path, params=params, headers=self.disc._headers(),
                                    timeout=self.disc.request_timeout_s)
            body: Any
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            if resp.status_code != 200:
                self._raise_for(resp.status_code, body, "list")
            if not isinstance(body, Mapping):
                raise KubeAPIError(resp.status_code, f"list pods ({self.where}): not a PodList")
            meta = body.get("metadata") or {}
            if not rv:
                rv = str(meta.get("resourceVersion") or "")
            pods.extend(body.get("items") or [])
            cont = meta.get("continue") or None
            if not cont:
                break
        if not rv or rv == "0":
            raise KubeAPIError(200, f"list pods ({self.where}): the list has no usable resourceVersion ({rv!r})")
        self.disc.stats["lists"] += 1
        before = {k: [_target_signature(t) for t in v] for k, v in self.targets.items()}
        self.pods.clear()
        self.targets.clear()
        for p in pods:
            self._put(p)
        after = {k: [_target_signature(t) for t in v] for k, v in self.targets.items()}
        if self.synced and before != after:
            gone = sorted(set(before) - set(after))
            new = sorted(set(after) - set(before))
            log.info("re-list (%s): %d pods, targets of %s removed, of %s added", self.where,
                     len(self.pods), gone or "none", new or "none")
        self.synced = True
        self.disc._notify()
        return rv

    async def watch(self, rv: str) -> str:
        """Watch from ``rv`` until the server ends the stream; returns the last resourceVersion."""
        if not rv or rv == "0":
            raise AssertionError("never watch at resourceVersion 0")
        client = self.disc._client
        assert client is not None
        timeout_s = max(1, int(self.disc.watch_timeout_s * random.uniform(1.0, 1.25)))
        params = dict(self.params)
        params.update({"watch": "1", "allowWatchBookmarks": "true", "resourceVersion": rv,
                       "timeoutSeconds": str(timeout_s)})
        timeout = httpx.Timeout(self.disc.request_timeout_s, read=timeout_s + 30.0)
        self.disc.stats["watches"] += 1
        async with client.stream("GET", self.path, params=params, headers=self.disc._headers(),
                                 timeout=timeout) as resp:
            if resp.status_code != 200:
                await resp.aread()
                try:
                    body: Any = resp.json()
                except ValueError:
                    body = resp.text
                self._raise_for(resp.status_code, body, "watch")
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                ev = json.loads(line)
                typ = ev.get("type")
                obj = ev.get("object") or {}
                if typ == "ERROR":
                    message, reason, code = _status_of(obj)
                    if code == 410 or reason in ("Expired", "Gone"):
                        raise _Gone(message)
                    self._raise_for(code or 500, obj, "watch")
                self.seen += 1
                new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if typ == "BOOKMARK":
                    self.disc.stats["bookmarks"] += 1
                elif typ in ("ADDED", "MODIFIED"):
                    self.disc.stats["events"] += 1
                    if self._put(obj):
                        self.disc._notify()
                elif typ == "DELETED":
                    self.disc.stats["events"] += 1
                    if self._delete(obj):
                        self.disc._notify()
                if new_rv and new_rv != "0":
                    rv = new_rv
        return rv

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        backoff = _Backoff(self.disc.backoff_initial_s, self.disc.backoff_max_s)
        rv: Optional[str] = None
        gone_in_a_row = 0
        while not self.disc._closed:
            try:
                if rv is None:
                    rv = await self.list()
                    self.last_error = None
                    self.attempted = True
                    self.disc._notify()
                    backoff.reset()
                started = time.monotonic()
                seen_before = self.seen
                rv = await self.watch(rv)
                gone_in_a_row = 0
                self.last_error = None
                if time.monotonic() - started < 1.0 and self.seen == seen_before:
                    # A watch that ends at once with nothing in it: do not spin.
                    await asyncio.sleep(backoff.next_delay())
                else:
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except _Gone as exc:
                self.disc.stats["gone"] += 1
                gone_in_a_row += 1
                log.info("watch expired (%s): %s; re-listing", self.where, exc)
                rv = None
                if gone_in_a_row > 1:
                    await asyncio.sleep(backoff.next_delay())
            except KubeForbiddenError as exc:
                self.disc.stats["errors"] += 1
                self.last_error = exc
                self.attempted = True
                log.error("%s", exc)
                if self.disc.forbidden_is_fatal:
                    self.disc._fail(exc)
                    return
                self.disc._notify()
                await asyncio.sleep(backoff.next_delay())
            except (httpx.HTTPError, KubeAPIError, ValueError, OSError, KubeConfigError) as exc:
                self.disc.stats["errors"] += 1
                self.last_error = exc
                was_attempted = self.attempted
                self.attempted = True
                if not was_attempted:
                    self.disc._notify()
                delay = backoff.next_delay()
                force = isinstance(exc, KubeAPIError) and exc.status == 401
                if force:
                    with contextlib.suppress(Exception):
                        self.disc._headers(force_token_reload=True)
                log.warning("%s %s (%s); retrying in %.1f s%s", "list" if rv is None else "watch",
                            f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                            self.where, delay, "" if rv is None else f" from resourceVersion {rv}")
                await asyncio.sleep(delay)


class PodMonitorDiscovery:
    """Pods selected by PodMonitors, as scrape targets (a :class:`~dcgmrelay.targets.TargetSource`).

    ``updates()`` yields the full sorted target list once every watcher has made
    its first list attempt, and again after every change. ``stats`` counts
    ``lists``, ``watches``, ``events``, ``bookmarks``, ``gone`` (410s) and ``errors``.
    """

    def __init__(
        self,
        monitors: Sequence[Union[PodMonitor, Mapping[str, Any]]],
        credentials: KubeCredentials,
        *,
        node_name: Optional[str] = None,
        default_interval_s: float = 15.0,
        watch_timeout_s: float = 300.0,
        request_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        page_size: int = 500,
        forbidden_is_fatal: bool = True,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.monitors = [m if isinstance(m, PodMonitor) else PodMonitor.from_dict(m) for m in monitors]
        names = [(m.namespace, m.name) for m in self.monitors]
        if len(set(names)) != len(names):
            raise KubeConfigError(f"PodMonitor names must be unique per namespace: {names}")
        self.credentials = credentials
        self.node_name = node_name or None
        self.default_interval_s = float(default_interval_s)
        self.watch_timeout_s = float(watch_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.page_size = int(page_size)
        self.forbidden_is_fatal = forbidden_is_fatal
        self._transport = transport
        self.stats: MutableMapping[str, int] = {
            "lists": 0, "watches": 0, "events": 0, "bookmarks": 0, "gone": 0, "errors": 0}
        self._watchers = [_Watcher(self, m, ns) for m in self.monitors for ns in m.namespaces()]
        self._client: Optional[httpx.AsyncClient] = None
        self._tasks: List["asyncio.Task[None]"] = []
        self._waiters: List[asyncio.Event] = []
        self._closed = False
        self._fatal: Optional[BaseException] = None
        self._shadowed: "set[Tuple[str, str]]" = set()

    # -- internals ----------------------------------------------------------------

    def _headers(self, force_token_reload: bool = False) -> Dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "dcgmrelay-discovery"}
        h.update(self.credentials.headers(force_token_reload))
        return h

    def _notify(self) -> None:
        for ev in self._waiters:
            ev.set()

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self._notify()

    def _start(self) -> None:
        if self._client is not None or self._closed:
            return
        kwargs: Dict[str, Any] = {
            "limits": httpx.Limits(max_connections=2 * len(self._watchers) + 4,
                                   max_keepalive_connections=len(self._watchers) + 2),
            "timeout": httpx.Timeout(self.request_timeout_s),
            "trust_env": False,
        }
        if self._transport is not None:
            kwargs["transport"] = self._transport
        else:
            kwargs["verify"] = self.credentials.verify()
        self._client = httpx.AsyncClient(**kwargs)
        self._tasks = [asyncio.ensure_future(w.run()) for w in self._watchers]

    # -- public -------------------------------------------------------------------

    def current(self) -> List[Target]:
        """The current target list, sorted, one target per :attr:`Target.key`.

        When several PodMonitors select the same endpoint, the first monitor (in
        the order given) owns it: the scrape manager identifies targets by key.
        """
        by_key: Dict[str, Target] = {}
        for w in self._watchers:
            for ts in w.targets.values():
                for t in ts:
                    have = by_key.get(t.key)
                    if have is None:
                        by_key[t.key] = t
                    elif have.job != t.job and (t.key, t.job) not in self._shadowed:
                        self._shadowed.add((t.key, t.job))
                        log.warning("target %s is selected by PodMonitors %r and %r; keeping %r",
                                    t.key, have.job, t.job, have.job)
        return sorted(by_key.values(), key=_target_sort_key)

    @property
    def synced(self) -> bool:
        """Every watcher has completed a list."""
        return all(w.synced for w in self._watchers)

    @property
    def errors(self) -> List[BaseException]:
        """The last error of each watcher that is currently failing."""
        return [w.last_error for w in self._watchers if w.last_error is not None]

    async def updates(self) -> AsyncIterator[List[Target]]:
        """Yield the complete target list at start and after every change (raises a fatal error)."""
        ev = asyncio.Event()
        self._waiters.append(ev)
        try:
            self._start()
            last: Optional[List[Tuple[Any, ...]]] = None
            while True:
                ev.clear()
                if self._fatal is not None:
                    raise self._fatal
                if self._closed:
                    return
                if all(w.attempted for w in self._watchers):
                    cur = self.current()
                    sig = [_target_signature(t) for t in cur]
                    if sig != last:
                        last = sig
                        yield cur
                        continue  # re-check: something may have changed while the consumer ran
                await ev.wait()
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(ev)

    async def aclose(self) -> None:
        """Stop all watches and close the HTTP client."""
        self._closed = True
        self._notify()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> "PodMonitorDiscovery":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
