"""Target discovery: sources of :class:`dcgmrelay.targets.Target` lists.

:mod:`dcgmrelay.discovery.kubernetes` finds dcgm-exporter pods with
prometheus-operator ``PodMonitor`` semantics (list + watch against the
Kubernetes API with plain async httpx).
"""

from __future__ import annotations

from .kubernetes import (
    KubeAPIError,
    KubeConfigError,
    KubeCredentials,
    KubeError,
    KubeForbiddenError,
    LabelSelector,
    LabelSelectorRequirement,
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
