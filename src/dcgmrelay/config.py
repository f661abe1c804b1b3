"""Configuration: the YAML file, the WhaTap ``WhatapAgent`` resource, flags and environment.

Three ways in, one :class:`RelayConfig` out::

    cfg = load_config("relay.yaml")            # native schema, or a WhatapAgent resource as-is
    cfg = config_from_args(args)               # `dcgmrelay run` flags + DCGMRELAY_* env (+ --config FILE)
    print(effective_config_text(cfg))          # `dcgmrelay check-config FILE`

Native schema (every key optional unless marked; durations are Prometheus strings
``"15s"``, ``"1m30s"``, ``"500ms"``, ``"2h"`` or numbers of seconds; sizes are
``"64MiB"``, ``"1GB"``, ``"512Ki"`` or integers of bytes)::

    global:
      interval: 15s                  # default scrape interval of every endpoint
      timeout: 10s                   # default scrape timeout (min(timeout, interval)); must be <= interval
      body_size_limit: 64MiB         # a target's body (after decompression) past this fails the scrape
      sample_limit: 0                # a scrape with more samples (after metric relabeling) fails; 0 = none
      external_labels: {cluster: gpu-a}   # added to every shipped series that lacks the label
      label_limit: 0                 # ... with a series of more labels (__name__ counted); 0 = none
      label_name_length_limit: 0     # ... with a label name longer than this (bytes); 0 = none
      label_value_length_limit: 0    # ... with a label value longer than this (bytes); 0 = none
    targets:
      - name: local-dcgm             # REQUIRED: the job label
        type: static                 # static (default) | podmonitor
        enabled: true                # false: validated, then skipped
        relabel_configs: []          # Prometheus target relabeling (job, __address__, __scheme__, ...)
        sample_limit: 5000           # this job's limits (any of the four above): a set one, 0 included,
        label_limit: 30              #   wins over global's; unset: global's
        endpoints:                   # REQUIRED for static
          - url: http://127.0.0.1:9400/metrics   # or address: host:port (+ scheme, path)
            interval: 15s
            timeout: 5s              # <= interval
            params: {collect: [a, b]}
            labels: {cluster: gpu-a} # extra target labels (static only; an empty value adds none)
            tls: {ca_file, cert_file, key_file, insecure_skip_verify, server_name}
            basic_auth: {username, password | password_file}
            authorization: {type: Bearer, credentials | credentials_file | credentials_env}
            metric_relabel_configs: []           # applied to every scraped sample
      - name: dcgm-pods
        type: podmonitor             # Kubernetes discovery, prometheus-operator PodMonitor semantics
        namespace: monitoring        # the "own" namespace when namespace_selector is empty
        namespace_selector: {any: false, match_names: [gpu-operator]}
        selector: {match_labels: {app: nvidia-dcgm-exporter},
                   match_expressions: [{key: tier, operator: In, values: [gpu]}]}
        job_label: app               # optional: job = the value of this pod label
        endpoints:
          - port: metrics            # container port name, or an all-digit port number
            path: /metrics
            scheme: http
            add_node_label: false    # true: a `node` target label (the pod's spec.nodeName)
    outputs:
      - name: vm                     # default: the type (numbered when repeated)
        type: remote-write           # REQUIRED: remote-write | openmetrics | compact
        version: 1                   # remote-write only: 1 or 2
        url: https://vm:8428/api/v1/write      # REQUIRED, http(s), no user:pass@ in it
        headers: {X-Scope-OrgID: team-a}        # every value is a secret (<secret> in output)
        bearer_token: ...            # or bearer_token_file; or basic_auth {username, password|password_file}
        tls: {ca_file, cert_file, key_file, insecure_skip_verify, server_name}
        timeout: 30s
        compression: snappy          # remote-write: snappy; openmetrics: gzip|none; compact: zstd|snappy|gzip|none
        max_samples_per_batch: 2000
        max_bytes_per_batch: 8MiB
        flush_interval: 1s
        max_in_flight: 1
        retry: {min_backoff: 1s, max_backoff: 30s, max_elapsed: 5m, retry_on_429: true}  # max_elapsed alias: budget
        send_metadata: true
        write_relabel_configs: []    # relabel rules for this output only (keep, drop, labeldrop, ...)
    csv: default                     # collectors CSV path or built-in profile (default, dcp, whatap, 1.x)
    relay:
      include_non_dcgm: false
      first_observation: drop        # drop | zero | full
      output: cumulative             # cumulative | delta | both
      evict_after: 1h
      kind_overrides: {DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL: rate}   # gauge|counter|rate|event
      state_path: /var/lib/dcgmrelay/state.json
    spool: {dir: null, max_bytes: 1GiB, segment_bytes: 64MiB, fsync: batch, fsync_interval: 1s}
    listen: 127.0.0.1:9500           # "" = no listener
    logging: {level: info, format: plain}     # level debug|info|warning|error|critical; format plain|json
    shard: 0/2                       # this process scrapes shard i of n
    kubernetes: {api_url, token_file, ca_file, node_name, in_cluster: auto, insecure_skip_verify: false}
    whatap: {license, host, port}    # filled from a WhatapAgent (license is a secret)

Relative file paths in a config *file* are relative to the file's directory.
Unknown keys are errors (with a "did you mean" suggestion), every error names its
YAML path and line, and all errors are reported at once in one :class:`ConfigError`.

A ``WhatapAgent`` (``apiVersion: monitoring.whatap.com/v2alpha1``, ``kind:
WhatapAgent``) is read as it is: ``spec.features.openAgent.targets[]`` become
targets (``targetName`` = job; ``enabled: false`` skipped; ``globalInterval`` /
``globalPath`` are the defaults; ``StaticEndpoints`` endpoints give ``address``
(host:port, plus ``port`` if the address has none), ``path``, ``scheme``;
``PodMonitor`` targets keep ``namespaceSelector`` {any, matchNames}, ``selector``
{matchLabels, matchExpressions}, ``relabelConfigs`` and endpoints with ``port``,
``path``, ``interval``, ``scheme``, ``params``, ``tlsConfig``, ``basicAuth``,
``authorization``, ``metricRelabelConfigs``, ``addNodeLabel``; ``scrapeTimeout``
is accepted as in prometheus-operator). The PodMonitor spec fields ``sampleLimit``,
``labelLimit``, ``labelNameLengthLimit`` and ``labelValueLengthLimit`` on a target
are its ``sample_limit`` ... (on a ``StaticEndpoints`` target too: a target is a
job). The PodMonitors' own namespace is ``metadata.namespace``, else
``whatap-monitoring``. ``openAgent`` enabled with no ``targets`` and
``k8sAgent.gpuMonitoring.enabled: true`` is the seed's "simple setup": one
PodMonitor ``whatap-dcgm-exporter`` on the node agent's sidecar (namespace above,
``name: whatap-node-agent``, port 9400). ``spec.license``
becomes a :class:`Secret` (``whatap.license``), ``spec.host``/``port`` are kept.
The operator-only fields (images, labels, scheduling, ``apm``, ``k8sAgent`` ...)
are known and ignored; anything else is an error. Kubernetes Secret references
(``caSecret``, ``credentialsSecret``, ``basicAuth`` selectors) are refused with
a hint: mount the Secret and use ``caFile`` / ``credentialsFile``. The collectors
CSV defaults to the ``whatap`` profile. **A WhatapAgent has no output section:
outputs (and the relay, spool, listen and logging settings) come from flags or
``DCGMRELAY_*`` variables**, e.g. ``dcgmrelay run --config whatap-agent.yaml
--remote-write URL``.

Flags and environment (:func:`add_run_arguments`, :func:`config_from_args`):
precedence is flag > environment variable > config file > default, per setting.
List-valued settings replace the file's list (``--target`` replaces the file's
targets, any output flag replaces the file's outputs); the output settings
(``--remote-write-version``, ``--bearer-token-file``, ``--header``,
``--insecure-skip-verify``, ``--ca-file``) apply to the outputs given by flags,
or to every output of the file when no output flag is given. See :data:`ENV_VARS`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hmac
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import parse_qsl, urlsplit

from ._secret import Secret, reveal
from .errors import DcgmRelayError
from .relabel import RelabelError, compile_rules
from .targets import (
    DEFAULT_BODY_SIZE_LIMIT,
    ScrapeLimits,
    Target,
    TargetLabelError,
    format_duration,
    parse_duration,
    scrape_labels,
    target_from_labels,
)

__all__ = [
    "Authorization",
    "BasicAuth",
    "ConfigError",
    "ConfigProblem",
    "ENV_VARS",
    "EndpointConfig",
    "KubeConfig",
    "LabelSelectorConfig",
    "LabelSelectorRequirementConfig",
    "LoggingConfig",
    "NamespaceSelectorConfig",
    "OutputConfig",
    "PodMonitorConfig",
    "RelayConfig",
    "RelayOptions",
    "RetryConfig",
    "Secret",
    "SpoolConfig",
    "StaticTargetConfig",
    "TLSConfig",
    "WhatapConfig",
    "add_run_arguments",
    "check_complete",
    "config_from_args",
    "config_to_dict",
    "config_warnings",
    "effective_config_text",
    "format_duration",
    "load_config",
    "merge",
    "overrides_from_args",
    "parse_duration",
    "parse_size",
    "pod_monitor_dicts",
    "reveal",
    "secret_file_warnings",
    "static_targets",
]

log = logging.getLogger(__name__)

WHATAP_API_VERSION = "monitoring.whatap.com/v2alpha1"
WHATAP_DEFAULT_NAMESPACE = "whatap-monitoring"
FLAG_TARGET_JOB = "dcgm-exporter"

# ------------------------------------------------------------------------------------ secrets


# Secret and reveal() live in _secret (shared with the transport); re-exported here.


# ------------------------------------------------------------------------------------ errors


class ConfigProblem(NamedTuple):
    """One thing wrong with a configuration: where (``path``, 1-based ``line``/``column``) and what."""

    path: str
    message: str
    line: Optional[int] = None
    column: Optional[int] = None

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ConfigError(DcgmRelayError, ValueError):
    """An invalid configuration. ``problems`` lists every problem found (sorted by position);
    ``path`` and ``message`` are the first one's; ``source`` is the file (or ``<text>``, a flag ...)."""

    def __init__(self, problems: Union[str, Sequence[ConfigProblem]], *, path: str = "",
                 source: Optional[str] = None) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(path, problems)]
        self.problems: List[ConfigProblem] = list(problems) or [ConfigProblem(path, "invalid configuration")]
        self.source = source
        self.path = self.problems[0].path
        self.message = self.problems[0].message
        super().__init__(str(self))

    @property
    def errors(self) -> List[ConfigProblem]:
        """Alias of ``problems``."""
        return self.problems

    def __str__(self) -> str:
        src = self.source
        if len(self.problems) == 1:
            p = self.problems[0]
            where = f"{src}:" if src else ""
            if p.line is not None:
                where += f"{p.line}:{p.column}:"
            head = f"{where} " if where else ""
            return f"{head}{p.path}: {p.message}" if p.path else f"{head}{p.message}"
        lines = [f"{len(self.problems)} configuration errors" + (f" in {src}" if src else "") + ":"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def __reduce__(self) -> Tuple[Callable[..., ConfigError], Tuple[List[ConfigProblem], Optional[str]]]:
        return (_rebuild_config_error, (self.problems, self.source))


def _rebuild_config_error(problems: List[ConfigProblem], source: Optional[str]) -> ConfigError:
    return ConfigError(problems, source=source)


# ------------------------------------------------------------------------------------ YAML with positions

_Mark = Optional[Tuple[int, int]]


class _Map(Dict[Any, Any]):
    """A YAML mapping that remembers where its keys and values are (and, after a
    WhatapAgent translation, the original path of each value)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.mark: _Mark = None
        self.key_marks: Dict[Any, _Mark] = {}
        self.val_marks: Dict[Any, _Mark] = {}
        self.origins: Dict[Any, str] = {}
        self.key_names: Dict[Any, str] = {}  # native key -> the key as written (WhatapAgent)
        self.dups: List[Tuple[Any, _Mark]] = []


class _Seq(List[Any]):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.mark: _Mark = None
        self.item_marks: List[_Mark] = []
        self.origins: List[Optional[str]] = []


def _m(node: Any) -> Tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _yaml_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any) -> _Map:
        loader.flatten_mapping(node)
        out = _Map()
        out.mark = _m(node)
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            try:
                hash(key)
            except TypeError:
                key = f"<{type(key).__name__} key>"
            if key in out:
                out.dups.append((key, _m(knode)))
            out[key] = loader.construct_object(vnode, deep=True)
            out.key_marks[key] = _m(knode)
            out.val_marks[key] = _m(vnode)
        return out

    def sequence(loader: Any, node: Any) -> _Seq:
        out = _Seq(loader.construct_object(n, deep=True) for n in node.value)
        out.mark = _m(node)
        out.item_marks = [_m(n) for n in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def _parse_yaml(text: str, source: str) -> Any:
    import yaml

    loader_cls = _yaml_loader()
    try:
        docs = [d for d in yaml.load_all(text, Loader=loader_cls)]  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # No snippet of the offending line: it could hold a secret.
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([ConfigProblem("", f"YAML syntax error: {what}",
                                         mark.line + 1 if mark else None,
                                         mark.column + 1 if mark else None)], source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {type(exc).__name__}", source=source) from None
    docs = [d for d in docs if d is not None]
    if not docs:
        raise ConfigError("the configuration is empty", source=source)
    if len(docs) > 1:
        raise ConfigError(f"{len(docs)} YAML documents; a configuration is exactly one "
                          "(put other Kubernetes objects in another file)", source=source)
    return docs[0]


# ------------------------------------------------------------------------------------ value parsers

_BAD = object()

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
    "t": 1000 ** 4, "tb": 1000 ** 4,
    "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2, "gi": 1024 ** 3, "gib": 1024 ** 3,
    "ti": 1024 ** 4, "tib": 1024 ** 4,
}


def parse_size(value: Union[str, int]) -> int:
    """Bytes of ``"64MiB"``, ``"1GB"``, ``"512Ki"``, ``"1.5GiB"`` or an integer. ValueError if invalid."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {_type_name(value)}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use bytes or a number with a unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 64MiB")
    n = float(m.group(1)) * _SIZE_UNITS[unit]
    if not n.is_integer():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(n)


def _format_size(n: int) -> Union[str, int]:
    for unit, size in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return n


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return f"a {type(v).__name__}"


def _suggest(word: object, choices: Iterable[str]) -> str:
    word = str(word)
    choices = [c for c in choices]
    squash = {c.lower().replace("_", "").replace("-", ""): c for c in choices}
    hit = squash.get(word.lower().replace("_", "").replace("-", ""))
    if hit is None:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        hit = close[0] if close else None
    return f" (did you mean {hit!r}?)" if hit else ""


_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str) and _SIMPLE_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{str(key)!r}]"


class _V:
    """Collects problems while a configuration is walked."""

    def __init__(self, source: Optional[str]) -> None:
        self.source = source
        self.problems: List[Tuple[int, ConfigProblem]] = []

    def err(self, path: str, msg: str, mark: _Mark = None) -> None:
        self.problems.append((len(self.problems),
                              ConfigProblem(path, msg, mark[0] if mark else None, mark[1] if mark else None)))

    def raise_if_any(self) -> None:
        if self.problems:
            ordered = sorted(self.problems, key=lambda e: (
                e[1].line is None, e[1].line or 0, e[1].column or 0, e[0]))
            # The same problem can be found twice (e.g. after a merge); report it once.
            seen, out = set(), []
            for _, p in ordered:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
            raise ConfigError(out, source=self.source)

    # -- containers ------------------------------------------------------------------------
    def mapping(self, value: Any, path: str, mark: _Mark, keys: Sequence[str], *,
                required: Sequence[str] = (), aliases: Optional[Mapping[str, str]] = None,
                what: str = "") -> Optional["_M"]:
        if value is None:
            value = _Map()
        if not isinstance(value, Mapping):
            self.err(path, f"expected a mapping{what}, got {_type_name(value)}", mark)
            return None
        return _M(self, value, path, mark, keys, required, aliases or {})

    def seq(self, value: Any, path: str, mark: _Mark, what: str = "a list") -> Optional[List[Tuple[Any, str, _Mark]]]:
        """[(item, path, mark)] of a list, or None (error reported)."""
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.err(path, f"expected {what}, got {_type_name(value)}", mark)
            return None
        out = []
        for i, item in enumerate(value):
            out.append((item, _child_path(value, path, i), _child_mark(value, i, mark)))
        return out


def _child_path(container: Any, path: str, key: Any) -> str:
    if isinstance(container, _Seq):
        if isinstance(key, int) and key < len(container.origins):
            origin = container.origins[key]
            if origin:
                return origin
    elif isinstance(container, _Map) and key in container.origins:
        return container.origins[key]
    return _join(path, key)


def _child_mark(container: Any, key: Any, default: _Mark) -> _Mark:
    if isinstance(container, _Map):
        return container.val_marks.get(key) or container.mark or default
    if isinstance(container, _Seq):
        if isinstance(key, int) and key < len(container.item_marks):
            return container.item_marks[key]
        return container.mark or default
    return default


def _key_mark(container: Any, key: Any, default: _Mark) -> _Mark:
    if isinstance(container, _Map):
        return container.key_marks.get(key) or container.mark or default
    return default


class _M:
    """A mapping being validated: known keys, aliases, typed getters."""

    def __init__(self, v: _V, data: Mapping[Any, Any], path: str, mark: _Mark, keys: Sequence[str],
                 required: Sequence[str], aliases: Mapping[str, str]) -> None:
        self.v, self.data, self.path = v, data, path
        self.mark = getattr(data, "mark", None) or mark
        self.keys: Dict[str, Any] = {}  # canonical -> key as written
        for key, kmark in getattr(data, "dups", []):
            v.err(_child_path(data, path, key), f"duplicate key {key!r} (YAML keeps only the last one)", kmark)
        allowed = list(keys) + list(aliases)
        for key in data:
            if not isinstance(key, str):
                v.err(_join(path, key), f"keys must be strings, not {_type_name(key)}",
                      _key_mark(data, key, self.mark))
                continue
            canon = aliases.get(key, key)
            if key not in keys and key not in aliases:
                v.err(_child_path(data, path, key), f"unknown key {key!r}{_suggest(key, allowed)}; "
                      f"allowed: {', '.join(keys)}", _key_mark(data, key, self.mark))
                continue
            if canon in self.keys:
                v.err(_child_path(data, path, key), f"{key!r} and {self.keys[canon]!r} are the same "
                      "setting; give one", _key_mark(data, key, self.mark))
                continue
            self.keys[canon] = key
        for r in required:
            if r not in self.keys or data[self.keys[r]] is None:
                v.err(path, f"missing required key {self.name(r)!r}", self.mark)

    def name(self, k: str) -> str:
        """The key as the user wrote it (the WhatapAgent spelling of a translated key)."""
        written = self.data.key_names.get(k) if isinstance(self.data, _Map) else None
        return written if written is not None else str(self.keys.get(k, k))

    def has(self, k: str) -> bool:
        return k in self.keys and self.data[self.keys[k]] is not None

    def raw(self, k: str, default: Any = None) -> Any:
        if k not in self.keys:
            return default
        val = self.data[self.keys[k]]
        return default if val is None else val

    def p(self, k: str) -> str:
        return _child_path(self.data, self.path, self.keys.get(k, k))

    def m(self, k: str) -> _Mark:
        return _child_mark(self.data, self.keys.get(k, k), self.mark)

    def get(self, k: str, parser: Callable[..., Any], default: Any = None, **kw: Any) -> Any:
        if not self.has(k):
            return default
        return parser(self.v, self.raw(k), self.p(k), self.m(k), **kw)


# Parsers: (validator, value, path, mark, **options) -> parsed value or _BAD (problem recorded).

def _p_str(v: _V, x: Any, path: str, mark: _Mark, *, empty: bool = False, numbers: bool = False) -> Any:
    if numbers and isinstance(x, (int, float)) and not isinstance(x, bool):
        x = str(x)
    if not isinstance(x, str):
        v.err(path, f"expected a string, got {_type_name(x)}", mark)
        return _BAD
    if not empty and not x.strip():
        v.err(path, "must not be empty", mark)
        return _BAD
    return x


def _p_secret(v: _V, x: Any, path: str, mark: _Mark) -> Any:
    if isinstance(x, Secret):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = str(x)
    if not isinstance(x, str):  # never show the value
        v.err(path, f"expected a string (a secret), got {_type_name(x)}", mark)
        return _BAD
    return Secret(x)


def _p_bool(v: _V, x: Any, path: str, mark: _Mark) -> Any:
    if isinstance(x, bool):
        return x
    if isinstance(x, str) and x.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return x.strip().lower() in ("true", "yes", "on", "1")
    v.err(path, f"expected true or false, got {_type_name(x)}", mark)
    return _BAD


def _p_int(v: _V, x: Any, path: str, mark: _Mark, *, lo: Optional[int] = None, hi: Optional[int] = None) -> Any:
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        x = int(x.strip())
    if isinstance(x, bool) or not isinstance(x, int):
        v.err(path, f"expected an integer, got {_type_name(x)}", mark)
        return _BAD
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        v.err(path, f"{x} is out of range: must be {rng}", mark)
        return _BAD
    return x


def _p_duration(v: _V, x: Any, path: str, mark: _Mark, *, positive: bool = True) -> Any:
    try:
        d = parse_duration(x)
    except ValueError as exc:
        v.err(path, str(exc), mark)
        return _BAD
    if positive and d <= 0:
        v.err(path, f"must be greater than 0, got {format_duration(d)}", mark)
        return _BAD
    return d


def _p_size(v: _V, x: Any, path: str, mark: _Mark, *, positive: bool = True) -> Any:
    try:
        n = parse_size(x)
    except ValueError as exc:
        v.err(path, str(exc), mark)
        return _BAD
    if positive and n <= 0:
        v.err(path, "must be greater than 0", mark)
        return _BAD
    return n


def _p_enum(v: _V, x: Any, path: str, mark: _Mark, *, choices: Sequence[str], fold: bool = True) -> Any:
    if not isinstance(x, str):
        v.err(path, f"expected one of {', '.join(choices)}, got {_type_name(x)}", mark)
        return _BAD
    key = x.strip().lower() if fold else x
    for c in choices:
        if (c.lower() if fold else c) == key:
            return c
    v.err(path, f"{x!r} is not allowed{_suggest(x, choices)}; expected one of {', '.join(choices)}", mark)
    return _BAD


def _p_str_list(v: _V, x: Any, path: str, mark: _Mark, *, check: Optional[Callable[[str], Optional[str]]] = None
                ) -> Any:
    items = v.seq(x, path, mark, "a list of strings")
    if items is None:
        return _BAD
    out, ok = [], True
    for item, ipath, imark in items:
        s = _p_str(v, item, ipath, imark)
        if s is _BAD:
            ok = False
            continue
        if check is not None:
            problem = check(s)
            if problem:
                v.err(ipath, problem, imark)
                ok = False
                continue
        out.append(s)
    return tuple(out) if ok else _BAD


def _p_str_map(v: _V, x: Any, path: str, mark: _Mark, *, check_key: Optional[Callable[[str], Optional[str]]] = None,
               check_value: Optional[Callable[[str], Optional[str]]] = None) -> Any:
    if not isinstance(x, Mapping):
        v.err(path, f"expected a mapping of strings, got {_type_name(x)}", mark)
        return _BAD
    out, ok = {}, True
    for key, val in x.items():
        kpath = _child_path(x, path, key)
        if not isinstance(key, str):
            v.err(kpath, f"keys must be strings, not {_type_name(key)}", _key_mark(x, key, mark))
            ok = False
            continue
        if check_key is not None:
            problem = check_key(key)
            if problem:
                v.err(kpath, problem, _key_mark(x, key, mark))
                ok = False
                continue
        s = _p_str(v, val, kpath, _child_mark(x, key, mark), empty=True)
        if s is _BAD:
            ok = False
            continue
        if check_value is not None:
            problem = check_value(s)
            if problem:
                v.err(kpath, problem, _child_mark(x, key, mark))
                ok = False
                continue
        out[key] = s
    return out if ok else _BAD


def _p_params(v: _V, x: Any, path: str, mark: _Mark) -> Any:
    if not isinstance(x, Mapping):
        v.err(path, f"expected a mapping of parameter name to value or list of values, got {_type_name(x)}", mark)
        return _BAD
    out: Dict[str, Tuple[str, ...]] = {}
    ok = True
    for key, val in x.items():
        kpath = _child_path(x, path, key)
        kmark = _child_mark(x, key, mark)
        if not isinstance(key, str) or not key:
            v.err(kpath, "parameter names must be non-empty strings", kmark)
            ok = False
            continue
        if isinstance(val, (list, tuple)):
            vals = _p_str_list(v, val, kpath, kmark)
            if vals is _BAD:
                ok = False
                continue
            out[key] = vals
        else:
            s = _p_str(v, val, kpath, kmark, empty=True, numbers=True)
            if s is _BAD:
                ok = False
                continue
            out[key] = (s,)
    return out if ok else _BAD


_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$")


def _check_address(s: str) -> Optional[str]:
    m = _HOST_PORT_RE.match(s.strip())
    if not m:
        return f"invalid address {s!r}: expected host:port (e.g. 10.0.0.5:9400 or [::1]:9400)"
    if m.group(2) is not None and not 0 < int(m.group(2)) <= 65535:
        return f"invalid address {s!r}: port must be 1..65535"
    return None


class _URL(NamedTuple):
    scheme: str
    address: str
    path: str
    params: Dict[str, Tuple[str, ...]]


def _p_url(v: _V, x: Any, path: str, mark: _Mark, *, query_params: bool = False) -> Any:
    """An http(s) URL. Values are not echoed in messages (a URL may carry a token)."""
    s = _p_str(v, x, path, mark)
    if s is _BAD:
        return _BAD
    s = s.strip()
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError:
        v.err(path, "invalid URL: bad port or IPv6 address", mark)
        return _BAD
    if u.scheme.lower() not in ("http", "https"):
        v.err(path, "invalid URL: the scheme must be http:// or https://", mark)
        return _BAD
    if not u.hostname:
        v.err(path, "invalid URL: no host", mark)
        return _BAD
    if u.username is not None or u.password is not None:
        v.err(path, "credentials in the URL (user:password@) are not allowed: use basic_auth "
              "(with password_file) so they stay secret", mark)
        return _BAD
    if u.fragment:
        v.err(path, "invalid URL: a #fragment is not allowed", mark)
        return _BAD
    if port == 0:
        v.err(path, "invalid URL: port 0", mark)
        return _BAD
    params: Dict[str, Tuple[str, ...]] = {}
    if query_params:
        for k, val in parse_qsl(u.query, keep_blank_values=True):
            params[k] = params.get(k, ()) + (val,)
    return _URL(u.scheme.lower(), u.netloc, u.path, params)


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_RW_RESERVED = ("content-encoding", "content-type", "x-prometheus-remote-write-version", "user-agent")

_K8S_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_K8S_PREFIX_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _check_k8s_key(k: str) -> Optional[str]:
    prefix, _, name = k.rpartition("/")
    if prefix and (len(prefix) > 253 or not _K8S_PREFIX_RE.match(prefix)):
        return f"invalid label key {k!r}: bad prefix"
    if not name or len(name) > 63 or not _K8S_NAME_RE.match(name):
        return (f"invalid label key {k!r}: at most 63 characters, alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def _check_k8s_value(s: str) -> Optional[str]:
    if s == "" or (len(s) <= 63 and _K8S_NAME_RE.match(s)):
        return None
    return (f"invalid label value {s!r}: at most 63 characters, alphanumerics, '-', '_' or '.', "
            "starting and ending with an alphanumeric")


def _check_namespace(s: str) -> Optional[str]:
    if len(s) <= 63 and _DNS_LABEL_RE.match(s):
        return None
    return f"invalid namespace {s!r}: lower-case alphanumerics and '-', at most 63 characters"


def _check_external_label_name(s: str) -> Optional[str]:
    if not _LABEL_NAME_RE.match(s):
        return f"invalid label name {s!r}: [a-zA-Z_][a-zA-Z0-9_]*"
    if s.startswith("__"):
        return f"label names starting with '__' are reserved: {s!r}"
    return None


def _check_label_name(s: str) -> Optional[str]:
    # "__" labels are allowed, as in Prometheus' static_configs: they feed relabeling and are removed after it.
    if _LABEL_NAME_RE.match(s):
        return None
    return f"invalid label name {s!r}: [a-zA-Z_][a-zA-Z0-9_]*"


# ------------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True)
class TLSConfig:
    """TLS client settings (files are paths; nothing here is secret)."""

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    insecure_skip_verify: bool = False
    server_name: Optional[str] = None


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth: ``password`` (a :class:`Secret`) or ``password_file``."""

    username: str
    password: Optional[Secret] = None
    password_file: Optional[str] = None


@dataclass(frozen=True)
class Authorization:
    """``Authorization: <type> <credentials>``; credentials inline (a :class:`Secret`), from a file
    (re-read by the scraper) or from an environment variable (read by :func:`static_targets`)."""

    type: str = "Bearer"
    credentials: Optional[Secret] = None
    credentials_file: Optional[str] = None
    credentials_env: Optional[str] = None


@dataclass(frozen=True)
class EndpointConfig:
    """One scrape endpoint. Static: ``address`` (host[:port]); PodMonitor: ``port`` (name or number)."""

    address: Optional[str] = None
    port: Optional[str] = None
    path: str = "/metrics"
    scheme: str = "http"
    interval: float = 15.0
    timeout: float = 10.0
    params: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    tls: Optional[TLSConfig] = None
    basic_auth: Optional[BasicAuth] = None
    authorization: Optional[Authorization] = None
    metric_relabel_configs: Tuple[Mapping[str, Any], ...] = ()
    add_node_label: bool = False

    @property
    def url(self) -> Optional[str]:
        """``scheme://address/path`` of a static endpoint (None for a PodMonitor endpoint)."""
        if self.address is None:
            return None
        return f"{self.scheme}://{self.address}{self.path}"


@dataclass(frozen=True)
class StaticTargetConfig:
    """A job scraping fixed endpoints (``--target``, ``StaticEndpoints``)."""

    name: str
    endpoints: Tuple[EndpointConfig, ...] = ()
    relabel_configs: Tuple[Mapping[str, Any], ...] = ()
    #: the job's ``sample_limit`` / ``label_limit`` / ``label_*_length_limit`` (None: global's)
    limits: ScrapeLimits = ScrapeLimits()


@dataclass(frozen=True)
class NamespaceSelectorConfig:
    """``any`` = every namespace; ``match_names``; neither = the PodMonitor's own namespace."""

    any: bool = False
    match_names: Tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelectorRequirementConfig:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: Tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelectorConfig:
    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: Tuple[LabelSelectorRequirementConfig, ...] = ()


@dataclass(frozen=True)
class PodMonitorConfig:
    """Kubernetes pod discovery with prometheus-operator PodMonitor semantics."""

    name: str
    namespace: str = "default"
    namespace_selector: NamespaceSelectorConfig = field(default_factory=NamespaceSelectorConfig)
    selector: LabelSelectorConfig = field(default_factory=LabelSelectorConfig)
    endpoints: Tuple[EndpointConfig, ...] = (EndpointConfig(),)
    relabel_configs: Tuple[Mapping[str, Any], ...] = ()
    job_label: Optional[str] = None
    #: the job's ``sample_limit`` / ``label_limit`` / ``label_*_length_limit`` (None: global's)
    limits: ScrapeLimits = ScrapeLimits()

    def to_discovery_dict(self, env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        """The camelCase mapping :meth:`dcgmrelay.discovery.PodMonitor.from_dict` reads.

        Besides the PodMonitor fields it carries what the discovered
        :class:`~dcgmrelay.targets.Target` objects need: per endpoint ``auth`` and ``tls``
        (in ``Target`` form, secrets as :class:`Secret`; ``credentials_env`` read from
        ``env``), ``metricRelabelConfigs`` and ``addNodeLabel``; ``relabelConfigs`` for the
        target relabeling; ``sampleLimit``, ``labelLimit``, ``labelNameLengthLimit`` and
        ``labelValueLengthLimit`` where set.
        """
        env = os.environ if env is None else env
        eps = []
        for i, e in enumerate(self.endpoints):
            d: Dict[str, Any] = {"path": e.path, "scheme": e.scheme, "interval": e.interval,
                                 "scrapeTimeout": e.timeout,
                                 "params": {k: list(v) for k, v in e.params.items()},
                                 "auth": _auth_of(e, f"{self.name}.endpoints[{i}]", env),
                                 "tls": _tls_target(e.tls),
                                 "metricRelabelConfigs": [dict(r) for r in e.metric_relabel_configs],
                                 "addNodeLabel": e.add_node_label}
            if e.port is not None:
                d["port"] = e.port
            eps.append(d)
        out: Dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "namespaceSelector": {"any": self.namespace_selector.any,
                                  "matchNames": list(self.namespace_selector.match_names)},
            "selector": {"matchLabels": dict(self.selector.match_labels),
                         "matchExpressions": [{"key": r.key, "operator": r.operator, "values": list(r.values)}
                                              for r in self.selector.match_expressions]},
            "endpoints": eps,
        }
        if self.job_label:
            out["jobLabel"] = self.job_label
        out["relabelConfigs"] = [dict(r) for r in self.relabel_configs]
        for k, n in self.limits.set_items().items():
            out[_POD_MONITOR_LIMIT_KEYS[k]] = n
        return out


#: native config key -> PodMonitor (prometheus-operator) spec field
_POD_MONITOR_LIMIT_KEYS = {"sample_limit": "sampleLimit", "label_limit": "labelLimit",
                           "label_name_length_limit": "labelNameLengthLimit",
                           "label_value_length_limit": "labelValueLengthLimit"}


@dataclass(frozen=True)
class RetryConfig:
    """Retry policy of an output: exponential backoff in [min, max], give up (spool) after ``max_elapsed``."""

    min_backoff: float = 1.0
    max_backoff: float = 30.0
    max_elapsed: float = 300.0
    retry_on_429: bool = True


OUTPUT_TYPES = ("remote-write", "openmetrics", "compact")
_COMPRESSION = {
    "remote-write": ("snappy",),
    "openmetrics": ("gzip", "none"),
    "compact": ("zstd", "snappy", "gzip", "none"),
}


@dataclass(frozen=True)
class OutputConfig:
    """Where relayed samples go. ``type``: remote-write (``version`` 1 or 2), openmetrics (text push,
    e.g. VictoriaMetrics /api/v1/import/prometheus or a Pushgateway), compact."""

    name: str
    type: str
    url: str
    version: Optional[int] = None
    headers: Mapping[str, Secret] = field(default_factory=dict)
    bearer_token: Optional[Secret] = None
    bearer_token_file: Optional[str] = None
    basic_auth: Optional[BasicAuth] = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    timeout: float = 30.0
    compression: str = "snappy"
    max_samples_per_batch: int = 2000
    max_bytes_per_batch: int = 8 * 1024 * 1024
    flush_interval: float = 1.0
    max_in_flight: int = 1
    retry: RetryConfig = field(default_factory=RetryConfig)
    send_metadata: bool = True
    write_relabel_configs: Tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class RelayOptions:
    """Options of :class:`dcgmrelay.relay.Relay` (``evict_after`` in seconds)."""

    include_non_dcgm: bool = False
    first_observation: str = "drop"
    output: str = "cumulative"
    evict_after: float = 3600.0
    kind_overrides: Mapping[Union[str, int], str] = field(default_factory=dict)
    state_path: Optional[str] = None


@dataclass(frozen=True)
class SpoolConfig:
    """On-disk spool for when a collector is down; ``dir=None`` disables it."""

    dir: Optional[str] = None
    max_bytes: int = 1024 ** 3
    segment_bytes: int = 64 * 1024 ** 2
    fsync: str = "batch"  # always | batch | never
    fsync_interval: float = 1.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error | critical
    format: str = "plain"  # plain | json


@dataclass(frozen=True)
class KubeConfig:
    """Kubernetes API access for PodMonitor targets. ``in_cluster``: ``"auto"`` (when no ``api_url``), True, False."""

    api_url: Optional[str] = None
    token_file: Optional[str] = None
    ca_file: Optional[str] = None
    node_name: Optional[str] = None
    in_cluster: Union[bool, str] = "auto"
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class WhatapConfig:
    """``spec.license`` / ``host`` / ``port`` of a WhatapAgent."""

    license: Optional[Secret] = None
    host: Optional[str] = None
    port: Optional[int] = None


@dataclass(frozen=True)
class RelayConfig:
    """The whole configuration. ``source`` is where it came from; ``origin`` ``"native"`` or ``"WhatapAgent"``;
    ``notes`` are remarks made while reading it (see :func:`config_warnings`)."""

    targets: List[Union[StaticTargetConfig, PodMonitorConfig]] = field(default_factory=list)
    outputs: List[OutputConfig] = field(default_factory=list)
    csv: str = "default"
    relay: RelayOptions = field(default_factory=RelayOptions)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    listen: str = "127.0.0.1:9500"
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shard: Optional[Tuple[int, int]] = None
    kubernetes: KubeConfig = field(default_factory=KubeConfig)
    global_interval: float = 15.0
    global_timeout: float = 10.0
    #: Bytes of one scrape's body (after decompression) past which the scrape fails (Prometheus'
    #: ``body_size_limit``): a runaway or hostile exporter cannot make the relay hold more.
    global_body_size_limit: int = DEFAULT_BODY_SIZE_LIMIT
    #: Samples of one scrape (after metric relabeling) past which the whole scrape fails
    #: (Prometheus' ``sample_limit``: ``up`` 0, nothing of it relayed); 0 = no limit.
    global_sample_limit: int = 0
    #: Prometheus' ``label_limit``, ``label_name_length_limit``, ``label_value_length_limit``: a
    #: scrape with a series (after metric relabeling, target labels and ``__name__`` included)
    #: of more labels, or a label name / value of more bytes, fails as a whole; 0 = no limit.
    global_label_limit: int = 0
    global_label_name_length_limit: int = 0
    global_label_value_length_limit: int = 0
    #: Prometheus' ``external_labels``: added to every series an output ships that does not
    #: have the label already, before the output's ``write_relabel_configs``.
    global_external_labels: Mapping[str, str] = field(default_factory=dict)
    whatap: Optional[WhatapConfig] = None
    source: Optional[str] = field(default=None, compare=False)
    origin: str = field(default="native", compare=False)
    notes: Tuple[str, ...] = field(default=(), compare=False)
    # What was written (native schema), for merge(): inherited settings stay inherited.
    _raw: Any = field(default=None, repr=False, compare=False)
    _base_dir: Optional[str] = field(default=None, repr=False, compare=False)

    @property
    def global_limits(self) -> ScrapeLimits:
        """The ``global.*`` scrape limits (every one set; 0 = none)."""
        return ScrapeLimits(self.global_sample_limit, self.global_label_limit, self.global_label_name_length_limit,
                            self.global_label_value_length_limit)

    @property
    def static_targets(self) -> List[StaticTargetConfig]:
        return [t for t in self.targets if isinstance(t, StaticTargetConfig)]

    @property
    def pod_monitors(self) -> List[PodMonitorConfig]:
        return [t for t in self.targets if isinstance(t, PodMonitorConfig)]


# ------------------------------------------------------------------------------------ native schema

_GLOBAL_KEYS = ("interval", "timeout", "body_size_limit", "external_labels") + ScrapeLimits.KEYS
_TOP_KEYS = ("global", "targets", "outputs", "csv", "relay", "spool", "listen", "logging", "shard",
             "kubernetes", "whatap")
_TARGET_KEYS = ("name", "type", "enabled", "endpoints", "relabel_configs", "namespace", "namespace_selector",
                "selector", "job_label") + ScrapeLimits.KEYS
_ENDPOINT_KEYS = ("url", "address", "port", "path", "scheme", "interval", "timeout", "params", "labels", "tls",
                  "basic_auth", "authorization", "metric_relabel_configs", "add_node_label")
_TLS_KEYS = ("ca_file", "cert_file", "key_file", "insecure_skip_verify", "server_name")
_BASIC_KEYS = ("username", "password", "password_file")
_AUTHZ_KEYS = ("type", "credentials", "credentials_file", "credentials_env")
_OUTPUT_KEYS = ("name", "type", "version", "url", "headers", "bearer_token", "bearer_token_file", "basic_auth",
                "tls", "timeout", "compression", "max_samples_per_batch", "max_bytes_per_batch",
                "flush_interval", "max_in_flight", "retry", "send_metadata", "write_relabel_configs")
_RETRY_KEYS = ("min_backoff", "max_backoff", "max_elapsed", "retry_on_429")
_RELAY_KEYS = ("include_non_dcgm", "first_observation", "output", "evict_after", "kind_overrides", "state_path")
_SPOOL_KEYS = ("dir", "max_bytes", "segment_bytes", "fsync", "fsync_interval")
_LOG_KEYS = ("level", "format")
_KUBE_KEYS = ("api_url", "token_file", "ca_file", "node_name", "in_cluster", "insecure_skip_verify")
_WHATAP_KEYS = ("license", "host", "port")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _Native:
    """Builds a RelayConfig from a native-schema mapping."""

    def __init__(self, v: _V, base_dir: Optional[str]) -> None:
        self.v = v
        self.base_dir = base_dir

    def path_of(self, x: Any) -> Any:
        if x is _BAD or x is None or self.base_dir is None or os.path.isabs(x):
            return x
        return os.path.normpath(os.path.join(self.base_dir, x))

    def file(self, m: _M, k: str) -> Any:
        return self.path_of(m.get(k, _p_str))

    def build(self, data: Any) -> Dict[str, Any]:
        v = self.v
        top = v.mapping(data, "", None, _TOP_KEYS, what=" at the top level")
        if top is None:
            return {}
        out: Dict[str, Any] = {}
        g = v.mapping(top.raw("global"), top.p("global"), top.m("global"), _GLOBAL_KEYS)
        gi, gt, gb = 15.0, None, DEFAULT_BODY_SIZE_LIMIT
        glimits = {k: 0 for k in ScrapeLimits.KEYS}
        ext: Any = {}
        if g is not None:
            ext = g.get("external_labels", _p_str_map, {}, check_key=_check_external_label_name,
                        check_value=lambda x: "an external label needs a value" if x == "" else None)
            if ext is _BAD:
                ext = {}
            for k in ScrapeLimits.KEYS:
                n = g.get(k, _p_int, 0, lo=0)
                glimits[k] = 0 if n is _BAD else n
            gi = g.get("interval", _p_duration, 15.0)
            gt = g.get("timeout", _p_duration, None)
            gb = g.get("body_size_limit", _p_size, DEFAULT_BODY_SIZE_LIMIT)
            if gb is _BAD:
                gb = DEFAULT_BODY_SIZE_LIMIT
            if gi is _BAD:
                gi = 15.0
            if gt is not _BAD and gt is not None and gt > gi:
                v.err(g.p("timeout"), f"timeout {format_duration(gt)} is longer than the interval "
                      f"{format_duration(gi)}; it must be <= the interval", g.m("timeout"))
                gt = _BAD
        if gt is None or gt is _BAD:
            gt = min(10.0, gi)
        out["global_interval"], out["global_timeout"] = gi, gt
        out["global_body_size_limit"] = gb
        out["global_external_labels"] = ext
        for k, n in glimits.items():
            out[f"global_{k}"] = n

        targets = []
        names: Dict[str, str] = {}
        items = v.seq(top.raw("targets"), top.p("targets"), top.m("targets"), "a list of targets")
        for item, ipath, imark in items or []:
            t = self.target(item, ipath, imark, gi, gt)
            if t is None or t is _BAD:
                continue
            if t.name in names:
                v.err(ipath, f"target name {t.name!r} is already used by {names[t.name]}; names must be unique",
                      _child_mark(item, "name", imark) if isinstance(item, _Map) else imark)
                continue
            names[t.name] = ipath
            targets.append(t)
        out["targets"] = targets

        outputs = []
        items = v.seq(top.raw("outputs"), top.p("outputs"), top.m("outputs"), "a list of outputs")
        raw_outputs = items or []
        types = [o.get("type") if isinstance(o, Mapping) else None for o, _, _ in raw_outputs]
        seen_names: Dict[str, str] = {}
        for n, (item, ipath, imark) in enumerate(raw_outputs):
            default_name = str(types[n]) if isinstance(types[n], str) else "output"
            same = [i for i, t in enumerate(types) if t == types[n]]
            if len(same) > 1:
                default_name = f"{default_name}-{same.index(n) + 1}"
            o = self.output(item, ipath, imark, default_name)
            if o is None:
                continue
            if o.name in seen_names:
                v.err(ipath, f"output name {o.name!r} is already used by {seen_names[o.name]}; "
                      "names must be unique", imark)
                continue
            seen_names[o.name] = ipath
            outputs.append(o)
        out["outputs"] = outputs

        csv = top.get("csv", _p_str, "default")
        if csv is not _BAD:
            out["csv"] = self.csv(csv, top.p("csv"), top.m("csv"))
        out["relay"] = self.relay(top)
        out["spool"] = self.spool(top)
        listen = top.get("listen", _p_str, "127.0.0.1:9500", empty=True)
        if listen is not _BAD:
            if listen.strip():
                problem = _check_listen(listen)
                if problem:
                    v.err(top.p("listen"), problem, top.m("listen"))
            out["listen"] = listen.strip()
        lg = v.mapping(top.raw("logging"), top.p("logging"), top.m("logging"), _LOG_KEYS)
        if lg is not None:
            level = lg.get("level", _p_enum, "info", choices=_LOG_LEVELS + ("warn",))
            fmt = lg.get("format", _p_enum, "plain", choices=("plain", "json"))
            out["logging"] = LoggingConfig(level="warning" if level == "warn" else
                                           (level if level is not _BAD else "info"),
                                           format=fmt if fmt is not _BAD else "plain")
        if top.has("shard"):
            out["shard"] = self.shard(top.raw("shard"), top.p("shard"), top.m("shard"))
        out["kubernetes"] = self.kube(top)
        if top.has("whatap"):
            w = v.mapping(top.raw("whatap"), top.p("whatap"), top.m("whatap"), _WHATAP_KEYS)
            if w is not None:
                lic = w.get("license", _p_secret)
                host = w.get("host", _p_str)
                port = w.get("port", _p_int, None, lo=1, hi=65535)
                out["whatap"] = WhatapConfig(license=None if lic is _BAD else lic,
                                             host=None if host is _BAD else host,
                                             port=None if port is _BAD else port)
        return out

    def shard(self, x: Any, path: str, mark: _Mark) -> Any:
        s = str(x).strip() if isinstance(x, (str, int)) and not isinstance(x, bool) else None
        m = re.match(r"^(\d+)\s*/\s*(\d+)$", s or "")
        if not m:
            self.v.err(path, "expected 'i/n' (this process is shard i of n, 0 <= i < n), e.g. 0/2", mark)
            return None
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or i >= n:
            self.v.err(path, f"shard {i}/{n}: the index must be in 0..n-1 and n >= 1", mark)
            return None
        return (i, n)

    def csv(self, csv: str, path: str, mark: _Mark) -> str:
        from .csvspec import builtin_profiles

        profiles = builtin_profiles()
        if csv in profiles:
            return csv
        resolved: str = self.path_of(csv)  # a str for a str
        if not os.path.isfile(resolved):
            self.v.err(path, f"no collectors CSV file {resolved!r} and not a built-in profile "
                       f"({', '.join(profiles)})", mark)
        return resolved

    # -- targets ------------------------------------------------------------------------------
    def target(self, x: Any, path: str, mark: _Mark, gi: float, gt: float) -> Any:
        v = self.v
        m = v.mapping(x, path, mark, _TARGET_KEYS, required=("name",))
        if m is None:
            return None
        name = m.get("name", _p_str)
        ttype = m.get("type", _p_enum, "static", choices=("static", "podmonitor"))
        enabled = m.get("enabled", _p_bool, True)
        pod = ttype == "podmonitor"
        if ttype is not _BAD and not pod:
            for k in ("namespace", "namespace_selector", "selector", "job_label"):
                if m.has(k):
                    v.err(m.p(k), f"{k} applies to podmonitor targets only", m.m(k))
        relabel = self.relabel(m, "relabel_configs")
        limits = self.limits(m)
        if pod:
            if m.has("endpoints"):
                eps_raw = v.seq(m.raw("endpoints"), m.p("endpoints"), m.m("endpoints"), "a list of endpoints")
            else:
                eps_raw = [(_Map(), m.p("endpoints") + "[0]", m.mark)]
        else:
            eps_raw = v.seq(m.raw("endpoints"), m.p("endpoints"), m.m("endpoints"), "a list of endpoints")
            if ttype is not _BAD and eps_raw == [] and enabled:
                v.err(m.p("endpoints") if m.has("endpoints") else path,
                      "a static target needs at least one endpoint",
                      m.m("endpoints") if m.has("endpoints") else m.mark)
        endpoints = []
        for item, ipath, imark in eps_raw or []:
            e = self.endpoint(item, ipath, imark, gi, gt, pod=pod)
            if e is not None:
                endpoints.append(e)
        ns: Any = None
        nssel: Any = None
        sel: Any = None
        job_label: Any = None
        if pod:
            ns = m.get("namespace", _p_str, "default")
            if ns is not _BAD:
                problem = _check_namespace(ns)
                if problem:
                    v.err(m.p("namespace"), problem, m.m("namespace"))
            nssel = self.namespace_selector(m)
            sel = self.selector(m)
            job_label = m.get("job_label", _p_str)
            if job_label is not _BAD and job_label is not None and _check_k8s_key(job_label):
                v.err(m.p("job_label"), _check_k8s_key(job_label) or "", m.m("job_label"))
        if enabled is False or _BAD in (name, ttype, relabel, ns, nssel, sel, job_label, limits):
            return None
        if pod:
            return PodMonitorConfig(name=name, namespace=ns, namespace_selector=nssel, selector=sel,
                                    endpoints=tuple(endpoints), relabel_configs=relabel, job_label=job_label,
                                    limits=limits)
        return StaticTargetConfig(name=name, endpoints=tuple(endpoints), relabel_configs=relabel, limits=limits)

    def limits(self, m: _M) -> Any:
        """A target's (job's) ``sample_limit`` / ``label_limit`` / ``label_*_length_limit``:
        integers >= 0, None where not given (the global one applies)."""
        vals = [m.get(k, _p_int, None, lo=0) for k in ScrapeLimits.KEYS]
        if _BAD in vals:
            return _BAD
        return ScrapeLimits(*vals)

    def relabel(self, m: _M, key: str) -> Any:
        if not m.has(key):
            return ()
        raw = m.raw(key)
        path, mark = m.p(key), m.m(key)
        items = self.v.seq(raw, path, mark, "a list of relabel rules")
        if items is None:
            return _BAD
        out: List[Mapping[str, Any]] = []
        ok = True
        for item, ipath, imark in items:
            try:
                rules = compile_rules([item], path=ipath)
            except RelabelError as exc:
                ok = False
                prefix = ipath + "[0]"
                for ppath, msg in exc.problems:
                    # "<ipath>[0].key[...]" -> "<ipath>.key[...]", with the key's line and column.
                    rest = ppath[len(prefix):] if ppath.startswith(prefix) else ""
                    key = rest[1:].split("[")[0] if rest.startswith(".") else ""
                    kmark = imark
                    if key and isinstance(item, _Map) and key in item:
                        kmark = (_key_mark(item, key, imark) if ("unknown key" in msg or "same key" in msg)
                                 else _child_mark(item, key, imark))
                    elif isinstance(item, _Map):
                        kmark = item.mark or imark
                    self.v.err(ipath + rest, msg, kmark)
                continue
            out.extend(rules.to_dicts())
        return tuple(out) if ok else _BAD

    def endpoint(self, x: Any, path: str, mark: _Mark, gi: float, gt: float, *, pod: bool) -> Any:
        v = self.v
        m = v.mapping(x, path, mark, _ENDPOINT_KEYS)
        if m is None:
            return None
        address = port = None
        scheme = m.get("scheme", _p_enum, None, choices=("http", "https"))
        pth = m.get("path", _p_str, None)
        if pth is not None and pth is not _BAD and not pth.startswith("/"):
            pth = "/" + pth
        params = m.get("params", _p_params, {})
        if pod:
            for k in ("url", "address", "labels"):
                if m.has(k):
                    v.err(m.p(k), f"{k} applies to static targets only (a podmonitor endpoint names a "
                          "container port)", m.m(k))
            if m.has("port"):
                port = _p_str(v, m.raw("port"), m.p("port"), m.m("port"), numbers=True)
                if port is not _BAD and port.isdigit() and not 0 < int(port) <= 65535:
                    v.err(m.p("port"), f"port {port} is out of range 1..65535", m.m("port"))
                    port = _BAD
        else:
            if m.has("port"):
                v.err(m.p("port"), "port applies to podmonitor targets; a static endpoint puts it in "
                      "address (host:port) or url", m.m("port"))
            if m.raw("add_node_label") is True:
                v.err(m.p("add_node_label"), f"{m.name('add_node_label')} applies to podmonitor targets only "
                      "(a static endpoint has no node)", m.m("add_node_label"))
            if m.has("url") and m.has("address"):
                v.err(m.p("address"), "give url or address, not both", m.m("address"))
            elif m.has("url"):
                u = m.get("url", _p_url, query_params=True)
                if u is not _BAD:
                    address = u.address
                    if scheme is None:
                        scheme = u.scheme
                    elif scheme != u.scheme:
                        v.err(m.p("scheme"), f"scheme {scheme!r} contradicts the url's {u.scheme!r}", m.m("scheme"))
                    if pth is None:
                        pth = u.path or None
                    elif u.path and u.path != pth:
                        v.err(m.p("path"), "path contradicts the url's path", m.m("path"))
                    if params is not _BAD and u.params:
                        merged = dict(u.params)
                        for k2, vals in params.items():
                            merged[k2] = merged.get(k2, ()) + vals
                        params = merged
                else:
                    address = _BAD
            elif m.has("address"):
                address = m.get("address", _p_str)
                if address is not _BAD:
                    address = address.strip()
                    problem = _check_address(address)
                    if problem:
                        v.err(m.p("address"), problem, m.m("address"))
                        address = _BAD
            else:
                v.err(path, "missing required key 'address' (host:port)" +
                      ("" if isinstance(m.data, _Map) and m.data.key_names else " or 'url'"), m.mark)
                address = _BAD
        interval = m.get("interval", _p_duration, gi)
        timeout = m.get("timeout", _p_duration, None)
        if interval is not _BAD and timeout is not _BAD:
            if timeout is None:
                timeout = min(gt, interval)
            elif timeout > interval:
                v.err(m.p("timeout"), f"timeout {format_duration(timeout)} is longer than the interval "
                      f"{format_duration(interval)}; it must be <= the interval", m.m("timeout"))
                timeout = _BAD
        labels = m.get("labels", _p_str_map, {}, check_key=_check_label_name)
        tls = self.tls(m, "tls")
        basic = self.basic_auth(m, "basic_auth")
        authz = self.authorization(m, "authorization")
        if basic not in (None, _BAD) and authz not in (None, _BAD):
            v.err(m.p("authorization"), "give basic_auth or authorization, not both", m.m("authorization"))
        mrc = self.relabel(m, "metric_relabel_configs")
        add_node = m.get("add_node_label", _p_bool, False)
        vals = (address, port, scheme, pth, params, interval, timeout, labels, tls, basic, authz, mrc, add_node)
        if any(x is _BAD for x in vals):
            return None
        return EndpointConfig(address=address, port=port, path=pth or "/metrics", scheme=scheme or "http",
                              interval=interval, timeout=timeout, params=params, labels=labels, tls=tls,
                              basic_auth=basic, authorization=authz, metric_relabel_configs=mrc,
                              add_node_label=add_node)

    def namespace_selector(self, m: _M) -> Any:
        s = self.v.mapping(m.raw("namespace_selector"), m.p("namespace_selector"), m.m("namespace_selector"),
                           ("any", "match_names"))
        if s is None:
            return _BAD
        any_ = s.get("any", _p_bool, False)
        names = s.get("match_names", _p_str_list, (), check=_check_namespace)
        if any_ is _BAD or names is _BAD:
            return _BAD
        if any_ and names:
            self.v.err(s.p("any"), "any: true selects every namespace; drop match_names or any", s.m("any"))
        return NamespaceSelectorConfig(any=any_, match_names=tuple(dict.fromkeys(names)))

    def selector(self, m: _M) -> Any:
        v = self.v
        s = v.mapping(m.raw("selector"), m.p("selector"), m.m("selector"), ("match_labels", "match_expressions"))
        if s is None:
            return _BAD
        ml = s.get("match_labels", _p_str_map, {}, check_key=_check_k8s_key, check_value=_check_k8s_value)
        exprs = []
        ok = ml is not _BAD
        items = v.seq(s.raw("match_expressions"), s.p("match_expressions"), s.m("match_expressions"),
                      "a list of {key, operator, values}")
        if items is None:
            ok = False
        for item, ipath, imark in items or []:
            e = v.mapping(item, ipath, imark, ("key", "operator", "values"), required=("key", "operator"))
            if e is None:
                ok = False
                continue
            key = e.get("key", _p_str)
            if key is not _BAD and key is not None and _check_k8s_key(key):
                v.err(e.p("key"), _check_k8s_key(key) or "", e.m("key"))
                key = _BAD
            op = e.get("operator", _p_enum, None, choices=("In", "NotIn", "Exists", "DoesNotExist"))
            vals = e.get("values", _p_str_list, (), check=_check_k8s_value)
            if op in ("In", "NotIn") and vals is not _BAD and not vals:
                v.err(e.p("values") if e.has("values") else ipath, f"operator {op} needs at least one value",
                      e.m("values") if e.has("values") else e.mark)
                vals = _BAD
            if op in ("Exists", "DoesNotExist") and vals:
                v.err(e.p("values"), f"operator {op} takes no values", e.m("values"))
                vals = _BAD
            if _BAD in (key, op, vals) or key is None or op is None:
                ok = False
                continue
            exprs.append(LabelSelectorRequirementConfig(key=key, operator=op, values=tuple(vals)))
        if not ok:
            return _BAD
        return LabelSelectorConfig(match_labels=ml, match_expressions=tuple(exprs))

    def tls(self, m: _M, key: str) -> Any:
        if not m.has(key):
            return None
        t = self.v.mapping(m.raw(key), m.p(key), m.m(key), _TLS_KEYS)
        if t is None:
            return _BAD
        vals = dict(ca_file=self.file(t, "ca_file"), cert_file=self.file(t, "cert_file"),
                    key_file=self.file(t, "key_file"),
                    insecure_skip_verify=t.get("insecure_skip_verify", _p_bool, False),
                    server_name=t.get("server_name", _p_str))
        if (vals["cert_file"] is None) != (vals["key_file"] is None):
            have, need = ("cert_file", "key_file") if vals["cert_file"] is not None else ("key_file", "cert_file")
            self.v.err(t.p(have), f"{t.name(have)} needs {t.name(need)} too (a client certificate is a pair)",
                       t.m(have))
            return _BAD
        if any(x is _BAD for x in vals.values()):
            return _BAD
        return TLSConfig(**vals)

    def basic_auth(self, m: _M, key: str) -> Any:
        if not m.has(key):
            return None
        b = self.v.mapping(m.raw(key), m.p(key), m.m(key), _BASIC_KEYS, required=("username",))
        if b is None:
            return _BAD
        user = b.get("username", _p_str)
        pw = b.get("password", _p_secret)
        pwf = self.file(b, "password_file")
        if pw is not None and pwf is not None:
            self.v.err(b.p("password_file"), "give password or password_file, not both", b.m("password_file"))
            return _BAD
        if _BAD in (user, pw, pwf) or user is None:
            return _BAD
        return BasicAuth(username=user, password=pw, password_file=pwf)

    def authorization(self, m: _M, key: str) -> Any:
        if not m.has(key):
            return None
        a = self.v.mapping(m.raw(key), m.p(key), m.m(key), _AUTHZ_KEYS)
        if a is None:
            return _BAD
        typ = a.get("type", _p_str, "Bearer")
        if typ is not _BAD and typ.lower() != "bearer":
            self.v.err(a.p("type"), f"authorization type {typ!r} is not supported; only Bearer", a.m("type"))
            typ = _BAD
        cred = a.get("credentials", _p_secret)
        cfile = self.file(a, "credentials_file")
        cenv = a.get("credentials_env", _p_str)
        given = [k for k, x in (("credentials", cred), ("credentials_file", cfile), ("credentials_env", cenv))
                 if x is not None]
        names = ", ".join(a.name(k) for k in ("credentials", "credentials_file", "credentials_env"))
        if len(given) > 1:
            self.v.err(a.p(given[1]), f"give one of {names} (got {', '.join(a.name(k) for k in given)})",
                       a.m(given[1]))
            return _BAD
        if not given:
            self.v.err(m.p(key), f"authorization needs one of {names}", m.m(key))
            return _BAD
        if _BAD in (typ, cred, cfile, cenv):
            return _BAD
        return Authorization(type="Bearer", credentials=cred, credentials_file=cfile, credentials_env=cenv)

    # -- outputs ------------------------------------------------------------------------------
    def output(self, x: Any, path: str, mark: _Mark, default_name: str) -> Optional[OutputConfig]:
        v = self.v
        m = v.mapping(x, path, mark, _OUTPUT_KEYS, required=("type", "url"))
        if m is None:
            return None
        name = m.get("name", _p_str, default_name)
        typ = m.get("type", _p_enum, None, choices=OUTPUT_TYPES)
        url = m.get("url", _p_url)
        version = None
        if typ == "remote-write":
            version = m.get("version", _p_int, 1, lo=1, hi=2)
        elif m.has("version") and typ is not _BAD:
            v.err(m.p("version"), "version applies to remote-write outputs only", m.m("version"))
        headers = m.get("headers", _p_str_map, {}, check_key=lambda k: None if _HEADER_NAME_RE.match(k)
                        else f"invalid header name {k!r}",
                        check_value=lambda s: "header values cannot contain line breaks"
                        if ("\n" in s or "\r" in s) else None)
        if headers is not _BAD:
            for hk in headers:
                hp, hm = _child_path(m.raw("headers"), m.p("headers"), hk), _child_mark(m.raw("headers"), hk, mark)
                if typ == "remote-write" and hk.lower() in _RW_RESERVED:
                    v.err(hp, f"header {hk!r} is set by the remote-write protocol and cannot be overridden", hm)
                if hk.lower() == "authorization" and (m.has("bearer_token") or m.has("bearer_token_file")
                                                      or m.has("basic_auth")):
                    v.err(hp, "an Authorization header conflicts with bearer_token/basic_auth; give one", hm)
            headers = {k: Secret(val) for k, val in headers.items()} if headers is not _BAD else _BAD
        bt = m.get("bearer_token", _p_secret)
        btf = self.file(m, "bearer_token_file")
        if bt is not None and btf is not None:
            v.err(m.p("bearer_token_file"), "give bearer_token or bearer_token_file, not both",
                  m.m("bearer_token_file"))
            btf = _BAD
        basic = self.basic_auth(m, "basic_auth")
        if basic not in (None, _BAD) and (bt is not None or btf is not None):
            v.err(m.p("basic_auth"), "give basic_auth or a bearer token, not both", m.m("basic_auth"))
            basic = _BAD
        tls = self.tls(m, "tls")
        timeout = m.get("timeout", _p_duration, 30.0)
        comp = _COMPRESSION.get(typ, ("snappy",)) if isinstance(typ, str) else ("snappy",)
        compression = m.get("compression", _p_enum, comp[0], choices=comp)
        msb = m.get("max_samples_per_batch", _p_int, 2000, lo=1)
        mbb = m.get("max_bytes_per_batch", _p_size, 8 * 1024 * 1024)
        fi = m.get("flush_interval", _p_duration, 1.0)
        mif = m.get("max_in_flight", _p_int, 1, lo=1, hi=1024)
        retry: Any = RetryConfig()
        if m.has("retry"):
            r = v.mapping(m.raw("retry"), m.p("retry"), m.m("retry"), _RETRY_KEYS, aliases={"budget": "max_elapsed"})
            if r is None:
                retry = _BAD
            else:
                mn = r.get("min_backoff", _p_duration, 1.0)
                mx = r.get("max_backoff", _p_duration, 30.0)
                me = r.get("max_elapsed", _p_duration, 300.0)
                r429 = r.get("retry_on_429", _p_bool, True)
                if _BAD not in (mn, mx) and mn > mx:
                    v.err(r.p("max_backoff"), f"max_backoff {format_duration(mx)} is shorter than min_backoff "
                          f"{format_duration(mn)}", r.m("max_backoff") if r.has("max_backoff") else r.mark)
                    mx = _BAD
                retry = _BAD if _BAD in (mn, mx, me, r429) else RetryConfig(mn, mx, me, r429)
        send_md = m.get("send_metadata", _p_bool, True)
        wrc = self.relabel(m, "write_relabel_configs")
        vals = (name, typ, url, version, headers, bt, btf, basic, tls, timeout, compression, msb, mbb, fi, mif,
                retry, send_md, wrc)
        if any(x is _BAD for x in vals) or typ is None or url is None:
            return None
        return OutputConfig(name=name, type=typ, url=m.raw("url").strip(), version=version, headers=headers,
                            bearer_token=bt, bearer_token_file=btf, basic_auth=basic,
                            tls=tls if tls is not None else TLSConfig(), timeout=timeout, compression=compression,
                            max_samples_per_batch=msb, max_bytes_per_batch=mbb, flush_interval=fi,
                            max_in_flight=mif, retry=retry, send_metadata=send_md, write_relabel_configs=wrc)

    # -- the small sections -----------------------------------------------------------------
    def relay(self, top: _M) -> Any:
        v = self.v
        r = v.mapping(top.raw("relay"), top.p("relay"), top.m("relay"), _RELAY_KEYS)
        if r is None:
            return RelayOptions()
        inc = r.get("include_non_dcgm", _p_bool, False)
        first = r.get("first_observation", _p_enum, "drop", choices=("drop", "zero", "full"))
        output = r.get("output", _p_enum, "cumulative", choices=("cumulative", "delta", "both"))
        evict = r.get("evict_after", _p_duration, 3600.0)
        state = self.file(r, "state_path")
        overrides: Dict[Union[str, int], str] = {}
        if r.has("kind_overrides"):
            raw = r.raw("kind_overrides")
            if not isinstance(raw, Mapping):
                v.err(r.p("kind_overrides"), f"expected a mapping of DCGM field name (or id) to kind, got "
                      f"{_type_name(raw)}", r.m("kind_overrides"))
            else:
                for key, val in raw.items():
                    kp = _child_path(raw, r.p("kind_overrides"), key)
                    km = _child_mark(raw, key, r.m("kind_overrides"))
                    if isinstance(key, bool) or not isinstance(key, (str, int)):
                        v.err(kp, f"keys are DCGM field names or ids, not {_type_name(key)}", km)
                        continue
                    kind = _p_enum(v, val, kp, km, choices=("gauge", "counter", "rate", "event"))
                    if kind is not _BAD:
                        overrides[key] = kind
        if _BAD in (inc, first, output, evict, state):
            return RelayOptions()
        return RelayOptions(include_non_dcgm=inc, first_observation=first, output=output, evict_after=evict,
                            kind_overrides=overrides, state_path=state)

    def spool(self, top: _M) -> Any:
        v = self.v
        s = v.mapping(top.raw("spool"), top.p("spool"), top.m("spool"), _SPOOL_KEYS)
        if s is None:
            return SpoolConfig()
        d = self.file(s, "dir")
        mx = s.get("max_bytes", _p_size, 1024 ** 3)
        seg = s.get("segment_bytes", _p_size, 64 * 1024 ** 2)
        fs = s.get("fsync", _p_enum, "batch", choices=("always", "batch", "never"))
        fi = s.get("fsync_interval", _p_duration, 1.0)
        if _BAD not in (mx, seg) and seg > mx:
            v.err(s.p("segment_bytes") if s.has("segment_bytes") else s.p("max_bytes"),
                  f"segment_bytes ({_format_size(seg)}) must not exceed max_bytes ({_format_size(mx)})",
                  s.m("segment_bytes") if s.has("segment_bytes") else s.m("max_bytes"))
            seg = _BAD
        if _BAD in (d, mx, seg, fs, fi):
            return SpoolConfig()
        return SpoolConfig(dir=d, max_bytes=mx, segment_bytes=seg, fsync=fs, fsync_interval=fi)

    def kube(self, top: _M) -> Any:
        k = self.v.mapping(top.raw("kubernetes"), top.p("kubernetes"), top.m("kubernetes"), _KUBE_KEYS)
        if k is None:
            return KubeConfig()
        api = k.get("api_url", _p_url)
        in_cluster: Any = "auto"
        if k.has("in_cluster"):
            raw = k.raw("in_cluster")
            word = raw.strip().lower() if isinstance(raw, str) else None
            if isinstance(raw, bool):
                in_cluster = raw
            elif word in ("auto", "true", "false"):
                in_cluster = {"auto": "auto", "true": True, "false": False}[word]
            else:
                self.v.err(k.p("in_cluster"), f"expected auto, true or false, got {_type_name(raw)}",
                           k.m("in_cluster"))
                in_cluster = _BAD
        if in_cluster is True and api is not None:
            self.v.err(k.p("in_cluster"), "in_cluster: true contradicts api_url", k.m("in_cluster"))
            in_cluster = _BAD
        vals = dict(api_url=None if api is None or api is _BAD else k.raw("api_url").strip(),
                    token_file=self.file(k, "token_file"), ca_file=self.file(k, "ca_file"),
                    node_name=k.get("node_name", _p_str), in_cluster=in_cluster,
                    insecure_skip_verify=k.get("insecure_skip_verify", _p_bool, False))
        if api is _BAD or any(x is _BAD for x in vals.values()):
            return KubeConfig()
        return KubeConfig(**vals)


def _check_listen(s: str) -> Optional[str]:
    host, sep, port = s.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"invalid listen address {s!r}: expected host:port or :port (port 0..65535), e.g. 127.0.0.1:9500"
    if host.startswith("[") != host.endswith("]"):
        return f"invalid listen address {s!r}: an IPv6 host is written [::1]:9500"
    return None


def _build(data: Any, *, source: Optional[str], base_dir: Optional[str], origin: str = "native",
           notes: Sequence[str] = (), v: Optional[_V] = None) -> RelayConfig:
    v = v or _V(source)
    fields_ = _Native(v, base_dir).build(data)
    v.raise_if_any()
    return RelayConfig(**fields_, source=source, origin=origin, notes=tuple(notes), _raw=data, _base_dir=base_dir)


# ------------------------------------------------------------------------------------ WhatapAgent

# Keys of the resource that only concern the operator's own deployment: known, accepted, ignored.
_WA_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
_WA_SPEC_KEYS = ("license", "host", "port", "features")
_WA_FEATURE_KEYS = ("apm", "openAgent", "k8sAgent")
_WA_OPENAGENT_USED = ("enabled", "globalInterval", "globalPath", "targets")
_WA_OPENAGENT_IGNORED = ("imageName", "imageVersion", "customImageFullName", "labels", "annotations", "podLabels",
                         "podAnnotations", "imagePullSecrets", "priorityClassName", "nodeSelector", "affinity",
                         "tolerations", "nodeName", "podSecurityContext", "envs", "disableForeground")
_WA_TARGET_KEYS = ("targetName", "type", "enabled", "namespaceSelector", "selector", "relabelConfigs", "endpoints",
                   "sampleLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit")
_WA_ENDPOINT_KEYS = ("port", "address", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig", "basicAuth",
                     "authorization", "metricRelabelConfigs", "params", "addNodeLabel")
_WA_TLS_KEYS = ("insecureSkipVerify", "caSecret", "certSecret", "keySecret", "caFile", "certFile", "keyFile",
                "serverName")
_WA_AUTHZ_KEYS = ("type", "credentials", "credentialsEnv", "credentialsFile", "credentialsSecret")
_WA_TARGET_TYPES = ("PodMonitor", "StaticEndpoints", "ServiceMonitor")


class _WA:
    """Translates a WhatapAgent into a native-schema mapping whose values remember their WhatapAgent path."""

    def __init__(self, v: _V) -> None:
        self.v = v
        self.notes: List[str] = []

    def node(self, src: Any, key: Any, src_path: str) -> Tuple[Any, str, _Mark]:
        return src[key], _child_path(src, src_path, key), _child_mark(src, key, getattr(src, "mark", None))

    def put(self, out: _Map, native_key: str, value: Any, origin: str, mark: _Mark, key_mark: _Mark = None) -> None:
        out[native_key] = value
        out.origins[native_key] = origin
        out.val_marks[native_key] = mark
        out.key_marks[native_key] = key_mark or mark

    def copy(self, out: _Map, src: Any, src_path: str, src_key: str, native_key: str) -> None:
        out.key_names[native_key] = src_key
        if isinstance(src, Mapping) and src_key in src:
            val, p, mk = self.node(src, src_key, src_path)
            self.put(out, native_key, val, p, mk, _key_mark(src, src_key, mk))

    def check_keys(self, m: Any, path: str, keys: Sequence[str], what: str) -> bool:
        if m is None:
            return False
        if not isinstance(m, Mapping):
            self.v.err(path, f"expected a mapping ({what}), got {_type_name(m)}", getattr(m, "mark", None))
            return False
        _M(self.v, m, path, getattr(m, "mark", None), keys, (), {})
        return True

    def translate(self, doc: Mapping[str, Any]) -> _Map:
        v = self.v
        self.check_keys(doc, "", _WA_TOP_KEYS, "a WhatapAgent")
        api = doc.get("apiVersion")
        if api != WHATAP_API_VERSION:
            v.err("apiVersion", f"unsupported apiVersion {api!r} for kind WhatapAgent; expected "
                  f"{WHATAP_API_VERSION!r}", _child_mark(doc, "apiVersion", None))
        out = _Map()
        out.mark = getattr(doc, "mark", None)
        meta = doc.get("metadata")
        namespace = WHATAP_DEFAULT_NAMESPACE
        if isinstance(meta, Mapping) and isinstance(meta.get("namespace"), str) and meta["namespace"]:
            namespace = meta["namespace"]
        elif meta is not None and not isinstance(meta, Mapping):
            v.err("metadata", f"expected a mapping, got {_type_name(meta)}", _child_mark(doc, "metadata", None))
        spec = doc.get("spec")
        if spec is None:
            v.err("", "missing required key 'spec'", out.mark)
            return out
        if not self.check_keys(spec, "spec", _WA_SPEC_KEYS, "the WhatapAgent spec"):
            return out
        whatap = _Map()
        whatap.mark = spec.mark if isinstance(spec, _Map) else None
        for k in _WA_SPEC_KEYS[:3]:
            self.copy(whatap, spec, "spec", k, k)
        if whatap:
            self.put(out, "whatap", whatap, "spec", whatap.mark)
        self.put(out, "csv", "whatap", "spec", whatap.mark)
        features = spec.get("features")
        if features is None:
            self.notes.append("spec.features is missing: no targets")
            return out
        if not self.check_keys(features, "spec.features", _WA_FEATURE_KEYS, "features"):
            return out
        for k in ("apm", "k8sAgent"):
            if k in features and features[k] is not None and not isinstance(features[k], Mapping):
                val, p, mk = self.node(features, k, "spec.features")
                v.err(p, f"expected a mapping, got {_type_name(val)}", mk)
        oa_path = "spec.features.openAgent"
        oa = features.get("openAgent")
        if oa is None:
            self.notes.append(f"{oa_path} is missing: no targets")
            return out
        if not self.check_keys(oa, oa_path, _WA_OPENAGENT_USED + _WA_OPENAGENT_IGNORED, "openAgent"):
            return out
        enabled = oa.get("enabled", True)
        if not isinstance(enabled, bool):
            v.err(_child_path(oa, oa_path, "enabled"), f"expected true or false, got {_type_name(enabled)}",
                  _child_mark(oa, "enabled", None))
            enabled = True
        g = _Map()
        g.mark = oa.mark if isinstance(oa, _Map) else None
        self.copy(g, oa, oa_path, "globalInterval", "interval")
        if g:
            self.put(out, "global", g, oa_path, g.mark)
        gpath = oa.get("globalPath")
        gpath_origin = (_child_path(oa, oa_path, "globalPath"), _child_mark(oa, "globalPath", None))
        targets = _Seq()
        targets.mark = _child_mark(oa, "targets", g.mark)
        raw_targets = oa.get("targets")
        if raw_targets is not None and not isinstance(raw_targets, list):
            v.err(_child_path(oa, oa_path, "targets"), f"expected a list of targets, got {_type_name(raw_targets)}",
                  targets.mark)
            raw_targets = []
        if not enabled:
            self.notes.append(f"{oa_path}.enabled is false: its {len(raw_targets or [])} target(s) are ignored")
        elif not raw_targets:
            gpu = (features.get("k8sAgent") or {}).get("gpuMonitoring") if isinstance(
                features.get("k8sAgent"), Mapping) else None
            if isinstance(gpu, Mapping) and gpu.get("enabled") is True:
                t = _Map()
                t.update(name="whatap-dcgm-exporter", type="podmonitor", namespace=namespace,
                         namespace_selector={"match_names": [namespace]},
                         selector={"match_labels": {"name": "whatap-node-agent"}},
                         endpoints=[{"port": "9400", "path": gpath if isinstance(gpath, str) and gpath else
                                     "/metrics", "scheme": "http"}])
                t.origins = {k: oa_path for k in t}
                targets.append(t)
                targets.origins.append(oa_path)
                targets.item_marks.append(targets.mark)
                self.notes.append(f"{oa_path} has no targets and k8sAgent.gpuMonitoring is enabled: scraping the "
                                  f"built-in dcgm-exporter (pods name=whatap-node-agent in {namespace}, port 9400)")
            else:
                self.notes.append(f"{oa_path} has no targets")
        tpath0 = _child_path(oa, oa_path, "targets")
        for i, t in enumerate(raw_targets or []):
            tpath = _child_path(raw_targets, tpath0, i)
            tmark = _child_mark(raw_targets, i, targets.mark)
            nt = self.target(t, tpath, tmark, namespace, gpath, gpath_origin)
            if nt is None:
                continue
            if not enabled:
                continue
            targets.append(nt)
            targets.origins.append(tpath)
            targets.item_marks.append(tmark)
        self.put(out, "targets", targets, tpath0, targets.mark)
        return out

    def target(self, t: Any, path: str, mark: _Mark, namespace: str, gpath: Any,
               gpath_origin: Tuple[str, _Mark]) -> Optional[_Map]:
        v = self.v
        if not isinstance(t, Mapping):
            v.err(path, f"expected a mapping (a target), got {_type_name(t)}", mark)
            return None
        self.check_keys(t, path, _WA_TARGET_KEYS, "a target")
        out = _Map()
        out.mark = getattr(t, "mark", mark)
        self.copy(out, t, path, "targetName", "name")
        typ = t.get("type", "PodMonitor")
        tp, tm = _child_path(t, path, "type"), _child_mark(t, "type", out.mark)
        if not isinstance(typ, str) or typ.lower() not in [x.lower() for x in _WA_TARGET_TYPES]:
            shown = repr(typ) if isinstance(typ, str) else _type_name(typ)
            v.err(tp, f"{shown} is not a target type{_suggest(typ, _WA_TARGET_TYPES)}; expected PodMonitor or "
                  "StaticEndpoints", tm)
            return None
        typ = {x.lower(): x for x in _WA_TARGET_TYPES}[typ.lower()]
        self.copy(out, t, path, "enabled", "enabled")
        disabled = t.get("enabled") is False
        if typ == "ServiceMonitor":
            if not disabled:
                v.err(tp, "type ServiceMonitor is not supported by dcgmrelay; use PodMonitor (the pods behind the "
                      "service) or StaticEndpoints", tm)
            return None
        pod = typ == "PodMonitor"
        self.put(out, "type", "podmonitor" if pod else "static", tp, tm)
        if pod:
            self.put(out, "namespace", namespace, path, out.mark)
        for src, dst in (("namespaceSelector", "namespace_selector"), ("selector", "selector")):
            if src not in t:
                continue
            val, p, mk = self.node(t, src, path)
            if not pod:
                v.err(p, f"{src} applies to PodMonitor targets only", _key_mark(t, src, mk))
                continue
            keys = ("any", "matchNames") if src == "namespaceSelector" else ("matchLabels", "matchExpressions")
            if isinstance(val, Mapping):
                self.check_keys(val, p, keys, src)
                nm = self.rename(val, p, {"matchNames": "match_names", "matchLabels": "match_labels",
                                          "matchExpressions": "match_expressions", "any": "any"})
                if "match_expressions" in nm and isinstance(nm["match_expressions"], list):
                    exprs = nm["match_expressions"]
                    for j, e in enumerate(exprs):
                        if isinstance(e, Mapping):
                            self.check_keys(e, _child_path(exprs, nm.origins["match_expressions"], j),
                                            ("key", "operator", "values"), "a selector requirement")
                val = nm
            self.put(out, dst, val, p, mk)
        self.copy(out, t, path, "relabelConfigs", "relabel_configs")
        for native_key, wa_key in _POD_MONITOR_LIMIT_KEYS.items():  # PodMonitor spec fields, any target here
            self.copy(out, t, path, wa_key, native_key)
        if "endpoints" in t:
            eps, ep_path, ep_mark = self.node(t, "endpoints", path)
            if isinstance(eps, list):
                neps = _Seq()
                neps.mark = ep_mark
                for j, e in enumerate(eps):
                    epath = _child_path(eps, ep_path, j)
                    emark = _child_mark(eps, j, ep_mark)
                    ne = self.endpoint(e, epath, emark, pod, gpath, gpath_origin)
                    neps.append(ne)
                    neps.origins.append(epath)
                    neps.item_marks.append(emark)
                eps = neps
            self.put(out, "endpoints", eps, ep_path, ep_mark)
        out.key_names["endpoints"] = "endpoints"
        return out

    def rename(self, src: Mapping[str, Any], path: str, names: Mapping[str, str]) -> _Map:
        out = _Map()
        out.mark = getattr(src, "mark", None)
        for k, nk in names.items():
            self.copy(out, src, path, k, nk)
        return out

    def endpoint(self, e: Any, path: str, mark: _Mark, pod: bool, gpath: Any,
                 gpath_origin: Tuple[str, _Mark]) -> Any:
        v = self.v
        if not isinstance(e, Mapping):
            return e  # the native layer reports the type, at this path
        self.check_keys(e, path, _WA_ENDPOINT_KEYS, "an endpoint")
        out = self.rename(e, path, {"path": "path", "interval": "interval", "scrapeTimeout": "timeout",
                                    "scheme": "scheme", "params": "params",
                                    "metricRelabelConfigs": "metric_relabel_configs",
                                    "addNodeLabel": "add_node_label"})
        if "path" not in out and gpath is not None:
            self.put(out, "path", gpath, gpath_origin[0], gpath_origin[1])
        if pod:
            self.copy(out, e, path, "port", "port")
            self.copy(out, e, path, "address", "address")  # refused by the native layer, at this path
        else:
            if "address" in e:
                addr, ap, am = self.node(e, "address", path)
                port = e.get("port")
                hp = _HOST_PORT_RE.match(addr.strip()) if isinstance(addr, str) else None
                if port is not None and isinstance(port, (int, str)) and str(port).isdigit() \
                        and hp is not None and hp.group(2) is None:
                    addr = f"{addr.strip()}:{port}"
                elif port is not None:
                    self.copy(out, e, path, "port", "port")  # the native layer says where the port goes
                self.put(out, "address", addr, ap, am)
        if "tlsConfig" in e:
            val, p, mk = self.node(e, "tlsConfig", path)
            if isinstance(val, Mapping):
                self.check_keys(val, p, _WA_TLS_KEYS, "tlsConfig")
                for sk, fk in (("caSecret", "caFile"), ("certSecret", "certFile"), ("keySecret", "keyFile")):
                    if sk in val:
                        v.err(_child_path(val, p, sk), f"Kubernetes Secret references are not supported by "
                              f"dcgmrelay: mount the Secret into the pod and use {fk}",
                              _key_mark(val, sk, mk))
                val = self.rename(val, p, {"insecureSkipVerify": "insecure_skip_verify", "caFile": "ca_file",
                                           "certFile": "cert_file", "keyFile": "key_file",
                                           "serverName": "server_name"})
            self.put(out, "tls", val, p, mk)
        if "basicAuth" in e:
            val, p, mk = self.node(e, "basicAuth", path)
            if isinstance(val, Mapping):
                self.check_keys(val, p, ("username", "password"), "basicAuth")
                refs = [k for k in ("username", "password") if isinstance(val.get(k), Mapping)]
                for k in refs:
                    v.err(_child_path(val, p, k), "Kubernetes Secret references are not supported by "
                          "dcgmrelay: use authorization.credentialsFile or credentialsEnv, or a native "
                          "config with basic_auth.password_file", _key_mark(val, k, mk))
                val = None if refs else self.rename(val, p, {"username": "username", "password": "password"})
            if val is not None:  # (already reported)
                self.put(out, "basic_auth", val, p, mk)
        if "authorization" in e:
            val, p, mk = self.node(e, "authorization", path)
            if isinstance(val, Mapping):
                self.check_keys(val, p, _WA_AUTHZ_KEYS, "authorization")
                if "credentialsSecret" in val:
                    v.err(_child_path(val, p, "credentialsSecret"), "Kubernetes Secret references are not "
                          "supported by dcgmrelay: mount the Secret and use credentialsFile, or credentialsEnv",
                          _key_mark(val, "credentialsSecret", mk))
                    val = None  # (already reported)
                else:
                    val = self.rename(val, p, {"type": "type", "credentials": "credentials",
                                               "credentialsFile": "credentials_file",
                                               "credentialsEnv": "credentials_env"})
            if val is not None:
                self.put(out, "authorization", val, p, mk)
        return out


# ------------------------------------------------------------------------------------ loading


def _read_source(path_or_text: Any) -> Tuple[str, str, Optional[str]]:
    """(text, source label, base directory)."""
    if isinstance(path_or_text, bytes):
        return path_or_text.decode("utf-8", errors="replace"), "<text>", None
    if isinstance(path_or_text, str) and ("\n" in path_or_text or not path_or_text.strip()):
        return path_or_text, "<text>", None
    path = os.fspath(path_or_text)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file: {exc.strerror or exc}", source=str(path)) from None
    return data.decode("utf-8", errors="replace"), str(path), os.path.dirname(os.path.abspath(path))


def load_config(path_or_text: Union[str, bytes, "os.PathLike[str]", Mapping[str, Any]]) -> RelayConfig:
    """Read a native dcgmrelay configuration or a ``WhatapAgent`` resource.

    ``path_or_text`` is a path (``os.PathLike``, or a ``str`` without a newline),
    YAML text (a ``str`` with a newline, or ``bytes``) or an already parsed
    mapping. Raises :class:`ConfigError` listing every problem (path, line, what).
    Outputs may be empty here (a WhatapAgent has none): :func:`check_complete`
    says whether the result can run.
    """
    if isinstance(path_or_text, Mapping):
        data: Any = path_or_text
        source, base_dir = "<mapping>", None
    else:
        text, source, base_dir = _read_source(path_or_text)
        data = _parse_yaml(text, source)
    v = _V(source)
    if isinstance(data, Mapping) and ("kind" in data or "apiVersion" in data):
        kind = data.get("kind")
        if kind != "WhatapAgent":
            shown = repr(kind) if isinstance(kind, str) else _type_name(kind)
            v.err("kind", f"kind {shown} is not supported: dcgmrelay reads its own schema (no apiVersion/kind) "
                  "or a WhatapAgent (monitoring.whatap.com/v2alpha1)",
                  _child_mark(data, "kind", getattr(data, "mark", None)))
            v.raise_if_any()
        wa = _WA(v)
        native = wa.translate(data)
        return _build(native, source=source, base_dir=base_dir, origin="WhatapAgent", notes=wa.notes, v=v)
    return _build(data, source=source, base_dir=base_dir, v=v)


# ------------------------------------------------------------------------------------ to dict / effective


def _secret_out(s: Optional[Secret], reveal_: bool) -> Any:
    if s is None:
        return None
    return s.reveal() if reveal_ else "<secret>"


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _tls_dict(t: Optional[TLSConfig]) -> Optional[Dict[str, Any]]:
    if t is None or t == TLSConfig():
        return None
    return _drop_none({"ca_file": t.ca_file, "cert_file": t.cert_file, "key_file": t.key_file,
                       "insecure_skip_verify": t.insecure_skip_verify or None, "server_name": t.server_name})


def _basic_dict(b: Optional[BasicAuth], r: bool) -> Optional[Dict[str, Any]]:
    if b is None:
        return None
    return _drop_none({"username": b.username, "password": _secret_out(b.password, r),
                       "password_file": b.password_file})


def _endpoint_dict(e: EndpointConfig, pod: bool, r: bool) -> Dict[str, Any]:
    d: Dict[str, Any] = {}
    if pod:
        if e.port is not None:
            d["port"] = e.port
        d["path"] = e.path
        d["scheme"] = e.scheme
    else:
        d["url"] = e.url
    d["interval"] = format_duration(e.interval)
    d["timeout"] = format_duration(e.timeout)
    if e.params:
        d["params"] = {k: list(v) for k, v in e.params.items()}
    if e.labels:
        d["labels"] = dict(e.labels)
    if e.tls is not None:
        d["tls"] = _tls_dict(e.tls) or {}
    if e.basic_auth is not None:
        d["basic_auth"] = _basic_dict(e.basic_auth, r)
    if e.authorization is not None:
        a = e.authorization
        d["authorization"] = _drop_none({"type": a.type, "credentials": _secret_out(a.credentials, r),
                                         "credentials_file": a.credentials_file,
                                         "credentials_env": a.credentials_env})
    if e.metric_relabel_configs:
        d["metric_relabel_configs"] = [dict(x) for x in e.metric_relabel_configs]
    if pod and e.add_node_label:
        d["add_node_label"] = True
    return d


def config_to_dict(cfg: RelayConfig, *, reveal_secrets: bool = False) -> Dict[str, Any]:
    """The effective configuration as a native-schema mapping (every default filled in).

    Secrets are ``"<secret>"`` unless ``reveal_secrets``; with it, the mapping
    loads back (:func:`load_config`) into an equal configuration.
    """
    r = reveal_secrets
    targets = []
    for t in cfg.targets:
        if isinstance(t, PodMonitorConfig):
            d: Dict[str, Any] = {"name": t.name, "type": "podmonitor", "namespace": t.namespace}
            d["namespace_selector"] = {"any": t.namespace_selector.any,
                                       "match_names": list(t.namespace_selector.match_names)}
            d["selector"] = {"match_labels": dict(t.selector.match_labels),
                             "match_expressions": [{"key": x.key, "operator": x.operator, "values": list(x.values)}
                                                   for x in t.selector.match_expressions]}
            if t.job_label:
                d["job_label"] = t.job_label
        else:
            d = {"name": t.name, "type": "static"}
        if t.relabel_configs:
            d["relabel_configs"] = [dict(x) for x in t.relabel_configs]
        d.update(t.limits.set_items())
        d["endpoints"] = [_endpoint_dict(e, isinstance(t, PodMonitorConfig), r) for e in t.endpoints]
        targets.append(d)
    outputs = []
    for o in cfg.outputs:
        od: Dict[str, Any] = {"name": o.name, "type": o.type}
        if o.version is not None:
            od["version"] = o.version
        od["url"] = o.url
        if o.headers:
            od["headers"] = {k: _secret_out(val, r) for k, val in o.headers.items()}
        if o.bearer_token is not None:
            od["bearer_token"] = _secret_out(o.bearer_token, r)
        if o.bearer_token_file is not None:
            od["bearer_token_file"] = o.bearer_token_file
        if o.basic_auth is not None:
            od["basic_auth"] = _basic_dict(o.basic_auth, r)
        if _tls_dict(o.tls):
            od["tls"] = _tls_dict(o.tls)
        od.update({
            "timeout": format_duration(o.timeout), "compression": o.compression,
            "max_samples_per_batch": o.max_samples_per_batch,
            "max_bytes_per_batch": _format_size(o.max_bytes_per_batch),
            "flush_interval": format_duration(o.flush_interval), "max_in_flight": o.max_in_flight,
            "retry": {"min_backoff": format_duration(o.retry.min_backoff),
                      "max_backoff": format_duration(o.retry.max_backoff),
                      "max_elapsed": format_duration(o.retry.max_elapsed),
                      "retry_on_429": o.retry.retry_on_429},
            "send_metadata": o.send_metadata,
        })
        if o.write_relabel_configs:
            od["write_relabel_configs"] = [dict(x) for x in o.write_relabel_configs]
        outputs.append(od)
    out: Dict[str, Any] = {
        "global": {"interval": format_duration(cfg.global_interval), "timeout": format_duration(cfg.global_timeout),
                   "body_size_limit": _format_size(cfg.global_body_size_limit),
                   **cfg.global_limits.set_items(),
                   **({"external_labels": dict(cfg.global_external_labels)} if cfg.global_external_labels else {})},
        "targets": targets,
        "outputs": outputs,
        "csv": cfg.csv,
        "relay": {"include_non_dcgm": cfg.relay.include_non_dcgm,
                  "first_observation": cfg.relay.first_observation, "output": cfg.relay.output,
                  "evict_after": format_duration(cfg.relay.evict_after),
                  "kind_overrides": dict(cfg.relay.kind_overrides), "state_path": cfg.relay.state_path},
        "spool": {"dir": cfg.spool.dir, "max_bytes": _format_size(cfg.spool.max_bytes),
                  "segment_bytes": _format_size(cfg.spool.segment_bytes), "fsync": cfg.spool.fsync,
                  "fsync_interval": format_duration(cfg.spool.fsync_interval)},
        "listen": cfg.listen,
        "logging": {"level": cfg.logging.level, "format": cfg.logging.format},
        "shard": f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else None,
        "kubernetes": {"api_url": cfg.kubernetes.api_url, "token_file": cfg.kubernetes.token_file,
                       "ca_file": cfg.kubernetes.ca_file, "node_name": cfg.kubernetes.node_name,
                       "in_cluster": cfg.kubernetes.in_cluster,
                       "insecure_skip_verify": cfg.kubernetes.insecure_skip_verify},
    }
    if cfg.whatap is not None:
        out["whatap"] = _drop_none({"license": _secret_out(cfg.whatap.license, r), "host": cfg.whatap.host,
                                    "port": cfg.whatap.port})
    return out


def effective_config_text(cfg: RelayConfig) -> str:
    """YAML of the effective configuration (native schema, defaults filled in), secrets as ``<secret>``."""
    import yaml

    head = "# dcgmrelay effective configuration"
    if cfg.source:
        head += f" (from {cfg.source}" + (", a WhatapAgent" if cfg.origin == "WhatapAgent" else "") + ")"
    head += "\n# secrets are shown as <secret>\n"
    return head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False,
                                 allow_unicode=True, width=120)


# ------------------------------------------------------------------------------------ merge


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = _Map() if isinstance(base, _Map) else {}
        if isinstance(base, _Map):
            for attr in ("mark", "key_marks", "val_marks", "origins"):
                setattr(out, attr, copy.copy(getattr(base, attr)))
        out.update(base)
        for k, val in over.items():
            if isinstance(out, _Map) and k in getattr(base, "origins", {}) and not (
                    isinstance(val, Mapping) and isinstance(base.get(k), Mapping)):
                out.origins.pop(k, None)  # replaced: the WhatapAgent path no longer applies
                out.val_marks.pop(k, None)
            out[k] = _deep_merge(base.get(k), val) if k in base else val
        return out
    return over


def merge(config: RelayConfig, overrides: Mapping[str, Any]) -> RelayConfig:
    """``config`` with ``overrides`` (a native-schema mapping) applied on top.

    Mappings merge key by key; lists and scalars replace (``{"targets": [...]}``
    replaces every target). Settings the config inherits (an endpoint's interval
    from ``global.interval``) keep inheriting. Re-validates; :class:`ConfigError`.
    """
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping, not {type(overrides).__name__}")
    base = config._raw if config._raw is not None else config_to_dict(config, reveal_secrets=True)
    merged = _deep_merge(base, dict(overrides))
    return _build(merged, source=config.source, base_dir=config._base_dir, origin=config.origin,
                  notes=config.notes)


def check_complete(cfg: RelayConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg`` has at least one target and one output (what `run` needs)."""
    problems = []
    if not cfg.targets:
        problems.append(ConfigProblem("targets", "no targets: give --target URL (or DCGMRELAY_TARGET) or "
                                                 "targets in the config file"))
    if not cfg.outputs:
        problems.append(ConfigProblem("outputs", "no outputs: give --remote-write URL, --openmetrics-push URL "
                                                 "or --compact URL (or DCGMRELAY_REMOTE_WRITE, "
                                                 "DCGMRELAY_OPENMETRICS_PUSH, DCGMRELAY_COMPACT) or outputs "
                                                 "in the config file"))
    if problems:
        raise ConfigError(problems, source=cfg.source)


# ------------------------------------------------------------------------------------ flags and env


class _Setting(NamedTuple):
    dest: str
    flag: Optional[str]
    env: str
    kind: str  # str | path | csv | urls | duration | size | int12 | count | bool | enum:<a,b> | headers | labels | secret | shard
    help: str
    metavar: Optional[str] = None


_SETTINGS: Tuple[_Setting, ...] = (
    _Setting("config", "--config", "DCGMRELAY_CONFIG", "path", "configuration file (native YAML or a WhatapAgent)",
             "FILE"),
    _Setting("target", "--target", "DCGMRELAY_TARGET", "urls",
             "scrape this dcgm-exporter URL (repeatable; env: comma-separated); replaces the file's targets", "URL"),
    _Setting("remote_write", "--remote-write", "DCGMRELAY_REMOTE_WRITE", "urls",
             "Prometheus remote-write URL (repeatable)", "URL"),
    _Setting("remote_write_version", "--remote-write-version", "DCGMRELAY_REMOTE_WRITE_VERSION", "int12",
             "remote-write protocol version, 1 (default) or 2", "{1,2}"),
    _Setting("openmetrics_push", "--openmetrics-push", "DCGMRELAY_OPENMETRICS_PUSH", "urls",
             "push OpenMetrics text here, e.g. VictoriaMetrics /api/v1/import/prometheus (repeatable)", "URL"),
    _Setting("compact", "--compact", "DCGMRELAY_COMPACT", "urls", "compact columnar output URL (repeatable)", "URL"),
    _Setting("interval", "--interval", "DCGMRELAY_INTERVAL", "duration", "scrape interval (default 15s)", "DURATION"),
    _Setting("timeout", "--timeout", "DCGMRELAY_TIMEOUT", "duration",
             "scrape timeout (default min(10s, interval))", "DURATION"),
    _Setting("body_size_limit", "--body-size-limit", "DCGMRELAY_BODY_SIZE_LIMIT", "size",
             "a scrape whose body (after decompression) exceeds this fails (default 64MiB)", "SIZE"),
    _Setting("sample_limit", "--sample-limit", "DCGMRELAY_SAMPLE_LIMIT", "count",
             "a scrape with more samples than this after metric relabeling fails (default 0: no limit)", "N"),
    _Setting("label_limit", "--label-limit", "DCGMRELAY_LABEL_LIMIT", "count",
             "a scrape with a series of more labels than this (__name__ counted) fails (default 0: no limit)", "N"),
    _Setting("label_name_length_limit", "--label-name-length-limit", "DCGMRELAY_LABEL_NAME_LENGTH_LIMIT", "count",
             "a scrape with a label name longer than this (bytes) fails (default 0: no limit)", "N"),
    _Setting("label_value_length_limit", "--label-value-length-limit", "DCGMRELAY_LABEL_VALUE_LENGTH_LIMIT",
             "count", "a scrape with a label value longer than this (bytes) fails (default 0: no limit)", "N"),
    _Setting("external_label", "--external-label", "DCGMRELAY_EXTERNAL_LABELS", "labels",
             "add NAME=VALUE to every series a collector gets that lacks NAME (repeatable; env: "
             "comma-separated); replaces the file's external_labels", "NAME=VALUE"),
    _Setting("csv", "--csv", "DCGMRELAY_CSV", "csv", "collectors CSV file or built-in profile "
             "(default, dcp, whatap, 1.x)", "CSV|PROFILE"),
    _Setting("listen", "--listen", "DCGMRELAY_LISTEN", "str", "address of /metrics and /healthz "
             "(default 127.0.0.1:9500; '' = none)", "HOST:PORT"),
    _Setting("spool_dir", "--spool-dir", "DCGMRELAY_SPOOL_DIR", "path", "spool to this directory while an output "
             "is down", "DIR"),
    _Setting("spool_max_bytes", "--spool-max-bytes", "DCGMRELAY_SPOOL_MAX_BYTES", "size",
             "spool size limit (default 1GiB)", "SIZE"),
    _Setting("spool_fsync", "--spool-fsync", "DCGMRELAY_SPOOL_FSYNC", "enum:always,batch,never",
             "when the spool fsyncs (default batch)", None),
    _Setting("state_path", "--state-path", "DCGMRELAY_STATE_PATH", "path",
             "persist counter-delta state here (survives restarts)", "FILE"),
    _Setting("first_observation", "--first-observation", "DCGMRELAY_FIRST_OBSERVATION", "enum:drop,zero,full",
             "delta of a counter's first sample (default drop)", None),
    _Setting("relay_output", "--relay-output", "DCGMRELAY_RELAY_OUTPUT", "enum:cumulative,delta,both",
             "ship cumulative values, deltas or both (default cumulative)", None),
    _Setting("include_non_dcgm", "--include-non-dcgm", "DCGMRELAY_INCLUDE_NON_DCGM", "bool",
             "also relay non-DCGM series (go_*, process_* ...)", None),
    _Setting("bearer_token_file", "--bearer-token-file", "DCGMRELAY_BEARER_TOKEN_FILE", "path",
             "outputs: bearer token file", "FILE"),
    _Setting("bearer_token", None, "DCGMRELAY_BEARER_TOKEN", "secret", "outputs: bearer token (environment only)"),
    _Setting("header", "--header", "DCGMRELAY_HEADER", "headers",
             "outputs: extra HTTP header 'Name: value' (repeatable; env: one per line); values are secrets",
             "'NAME: VALUE'"),
    _Setting("insecure_skip_verify", "--insecure-skip-verify", "DCGMRELAY_INSECURE_SKIP_VERIFY", "bool",
             "outputs: do not verify the collector's TLS certificate", None),
    _Setting("ca_file", "--ca-file", "DCGMRELAY_CA_FILE", "path", "outputs: CA bundle of the collector", "FILE"),
    _Setting("log_level", "--log-level", "DCGMRELAY_LOG_LEVEL", "enum:debug,info,warning,error,critical",
             "log level (default info)", None),
    _Setting("log_format", "--log-format", "DCGMRELAY_LOG_FORMAT", "enum:plain,json", "log format (default plain)",
             None),
    _Setting("shard", "--shard", "DCGMRELAY_SHARD", "shard", "scrape only shard i of n of the targets", "I/N"),
    _Setting("kube_api_url", "--kube-api-url", "DCGMRELAY_KUBE_API_URL", "url",
             "Kubernetes API server URL when running outside the cluster", "URL"),
    _Setting("kube_token_file", "--kube-token-file", "DCGMRELAY_KUBE_TOKEN_FILE", "path",
             "Kubernetes bearer token file", "FILE"),
    _Setting("kube_ca_file", "--kube-ca-file", "DCGMRELAY_KUBE_CA_FILE", "path", "Kubernetes API CA bundle", "FILE"),
    _Setting("kube_insecure_skip_tls_verify", "--kube-insecure-skip-tls-verify",
             "DCGMRELAY_KUBE_INSECURE_SKIP_TLS_VERIFY", "bool", "do not verify the API server certificate", None),
    _Setting("node_name", "--node-name", "DCGMRELAY_NODE_NAME", "str",
             "per-node mode: only pods on this node", "NODE"),
)

#: Environment variable -> the flag it stands for ("" for the environment-only DCGMRELAY_BEARER_TOKEN).
ENV_VARS: Dict[str, str] = {s.env: s.flag or "" for s in _SETTINGS}

_KUBE_DESTS = ("kube_api_url", "kube_token_file", "kube_ca_file", "kube_insecure_skip_tls_verify", "node_name")


def add_run_arguments(parser: argparse.ArgumentParser, *, kube: bool = True) -> None:
    """Add the ``dcgmrelay run`` flags (``--config``, ``--target``, ``--remote-write``, ``--interval`` ...).

    Every default is None (= not given), so :func:`config_from_args` can tell a
    flag from the environment and the file. ``kube=False`` leaves out the
    Kubernetes flags (when :func:`dcgmrelay.discovery.add_kube_arguments` adds them).
    """
    groups: Dict[str, Any] = {}

    def group(title: str) -> Any:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for s in _SETTINGS:
        if s.flag is None or (not kube and s.dest in _KUBE_DESTS):
            continue
        title = ("Kubernetes discovery" if s.dest in _KUBE_DESTS else
                 "outputs" if s.dest in ("remote_write", "remote_write_version", "openmetrics_push", "compact",
                                         "bearer_token_file", "header", "insecure_skip_verify", "ca_file")
                 else "relay")
        g = group(title)
        helptext = f"{s.help} [env {s.env}]"
        if s.kind == "bool":
            g.add_argument(s.flag, dest=s.dest, action="store_true", default=None, help=helptext)
        elif s.kind in ("urls", "headers", "labels"):
            g.add_argument(s.flag, dest=s.dest, action="append", default=None, metavar=s.metavar, help=helptext)
        elif s.kind.startswith("enum:"):
            g.add_argument(s.flag, dest=s.dest, default=None, choices=s.kind[5:].split(","), help=helptext)
        else:
            g.add_argument(s.flag, dest=s.dest, default=None, metavar=s.metavar, help=helptext)


def _args_dict(args: Any) -> Dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, (list, tuple)):
        parser = argparse.ArgumentParser(prog="dcgmrelay run", add_help=False)
        add_run_arguments(parser)
        args = parser.parse_args(list(args))
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise TypeError(f"expected an argparse.Namespace, a mapping or an argv list, not {type(args).__name__}")
    return {str(k).lstrip("-").replace("-", "_"): val for k, val in args.items()}


def _split_env(kind: str, raw: str) -> Any:
    if kind == "urls":
        return [u for u in re.split(r"[,\s]+", raw) if u]
    if kind == "headers":
        return [h for h in raw.splitlines() if h.strip()]
    if kind == "labels":
        return [x for x in raw.split(",") if x.strip()]
    return raw


def _target_url(u: str) -> str:
    u = u.strip()
    if "://" not in u:
        u = "http://" + u
    parts = urlsplit(u)
    if not parts.path:
        u = u.replace(parts.netloc, parts.netloc + "/metrics", 1) if parts.netloc else u
    return u


def _abspath(p: str) -> str:
    return os.path.abspath(os.path.expanduser(p))


def overrides_from_args(args: Any, env: Optional[Mapping[str, str]] = None,
                        base: Optional[RelayConfig] = None) -> Dict[str, Any]:
    """The native-schema overrides given by flags (an argparse Namespace from :func:`add_run_arguments`,
    a mapping of dest names, or an argv list) and ``DCGMRELAY_*`` variables; flags win per setting.

    ``base`` (the file's configuration) is needed only to apply the output settings
    to the file's outputs when no output URL is given. Values are checked here and
    problems name the flag or variable. ``config`` is not part of the result.
    """
    env = os.environ if env is None else env
    given = _args_dict(args)
    v = _V("command line")
    vals: Dict[str, Tuple[Any, str]] = {}  # dest -> (value, where)
    for s in _SETTINGS:
        x = given.get(s.dest)
        where = s.flag or s.env
        if x is None or (isinstance(x, (list, tuple)) and not x):
            raw = env.get(s.env)
            if raw is None or raw == "":
                continue
            x = _split_env(s.kind, raw)
            where = s.env
        vals[s.dest] = (x, where)

    def parsed(dest: str) -> Any:
        if dest not in vals:
            return None
        s = next(s for s in _SETTINGS if s.dest == dest)
        x, where = vals[dest]
        k = s.kind
        if k == "duration":
            return _p_duration(v, x, where, None)
        if k == "size":
            return _p_size(v, x, where, None)
        if k == "int12":
            return _p_int(v, x, where, None, lo=1, hi=2)
        if k == "count":
            return _p_int(v, x, where, None, lo=0)
        if k == "bool":
            return _p_bool(v, x, where, None)
        if k.startswith("enum:"):
            return _p_enum(v, x, where, None, choices=k[5:].split(","))
        if k == "secret":
            return _p_secret(v, x, where, None)
        if k == "path":
            s_ = _p_str(v, x, where, None)
            return s_ if s_ is _BAD else _abspath(s_)
        if k == "csv":
            from .csvspec import builtin_profiles

            s_ = _p_str(v, x, where, None)
            return s_ if s_ is _BAD or s_ in builtin_profiles() else _abspath(s_)
        if k == "url":
            u = _p_url(v, x, where, None)
            return u if u is _BAD else x.strip()
        if k == "urls":
            out = []
            for item in (x if isinstance(x, (list, tuple)) else [x]):
                u = _target_url(item) if dest == "target" else str(item).strip()
                ok = _p_url(v, u, where, None)
                if ok is not _BAD:
                    out.append(u)
            return out
        if k == "headers":
            out_h: Dict[str, str] = {}
            for item in (x if isinstance(x, (list, tuple)) else [x]):
                name, sep, value = str(item).partition(":")
                name = name.strip()
                if not sep or not _HEADER_NAME_RE.match(name):
                    v.err(where, "expected 'Name: value' with a valid header name")  # the value is not shown
                    continue
                out_h[name] = value.strip()
            return out_h
        if k == "labels":
            out_l: Dict[str, str] = {}
            for item in (x if isinstance(x, (list, tuple)) else [x]):
                name, sep, value = str(item).partition("=")
                name, value = name.strip(), value.strip()
                problem = _check_external_label_name(name) if sep else "expected NAME=VALUE"
                if problem or not value:
                    v.err(where, f"{item!r}: {problem or 'an external label needs a value'}")
                    continue
                out_l[name] = value
            return out_l
        if k == "shard":
            return _Native(v, None).shard(x, where, None)
        s_ = _p_str(v, x, where, None, empty=(dest == "listen"))
        return s_

    p = {s.dest: parsed(s.dest) for s in _SETTINGS if s.dest in vals and s.dest != "config"}
    v.raise_if_any()
    o: Dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    if p.get("target"):
        o["targets"] = [{"name": FLAG_TARGET_JOB, "type": "static", "endpoints": [{"url": u} for u in p["target"]]}]
    put("global", "interval", p.get("interval"))
    put("global", "timeout", p.get("timeout"))
    put("global", "body_size_limit", p.get("body_size_limit"))
    for k in ScrapeLimits.KEYS:
        put("global", k, p.get(k))
    put("global", "external_labels", p.get("external_label"))
    if p.get("csv") is not None:
        o["csv"] = p["csv"]
    if p.get("listen") is not None:
        o["listen"] = p["listen"]
    put("spool", "dir", p.get("spool_dir"))
    put("spool", "max_bytes", p.get("spool_max_bytes"))
    put("spool", "fsync", p.get("spool_fsync"))
    put("relay", "state_path", p.get("state_path"))
    put("relay", "first_observation", p.get("first_observation"))
    put("relay", "output", p.get("relay_output"))
    put("relay", "include_non_dcgm", p.get("include_non_dcgm"))
    put("logging", "level", p.get("log_level"))
    put("logging", "format", p.get("log_format"))
    if p.get("shard") is not None:
        o["shard"] = f"{p['shard'][0]}/{p['shard'][1]}"
    put("kubernetes", "api_url", p.get("kube_api_url"))
    put("kubernetes", "token_file", p.get("kube_token_file"))
    put("kubernetes", "ca_file", p.get("kube_ca_file"))
    put("kubernetes", "insecure_skip_verify", p.get("kube_insecure_skip_tls_verify"))
    put("kubernetes", "node_name", p.get("node_name"))

    # Outputs: URLs from flags/env replace the file's outputs; the output settings apply to
    # those, or to the file's outputs when no URL was given.
    new_outputs: List[Dict[str, Any]] = []
    for dest, typ in (("remote_write", "remote-write"), ("openmetrics_push", "openmetrics"), ("compact", "compact")):
        for u in p.get(dest) or []:
            new_outputs.append({"type": typ, "url": u})
    settings = {k: p.get(k) for k in ("remote_write_version", "bearer_token", "bearer_token_file", "header",
                                      "insecure_skip_verify", "ca_file")}
    if new_outputs:
        outputs = new_outputs
    elif any(val is not None for val in settings.values()) and base is not None and base.outputs:
        outputs = config_to_dict(base, reveal_secrets=True)["outputs"]
    else:
        outputs = []
    if outputs:
        for od in outputs:
            if settings["remote_write_version"] is not None and od["type"] == "remote-write":
                od["version"] = settings["remote_write_version"]
            if settings["bearer_token"] is not None:
                od.pop("bearer_token_file", None)
                od.pop("basic_auth", None)
                od["bearer_token"] = settings["bearer_token"].reveal()
            if settings["bearer_token_file"] is not None:
                od.pop("bearer_token", None)
                od.pop("basic_auth", None)
                od["bearer_token_file"] = settings["bearer_token_file"]
            if settings["header"]:
                od["headers"] = {**(od.get("headers") or {}), **settings["header"]}
            if settings["insecure_skip_verify"] is not None or settings["ca_file"] is not None:
                tls = dict(od.get("tls") or {})
                if settings["insecure_skip_verify"] is not None:
                    tls["insecure_skip_verify"] = settings["insecure_skip_verify"]
                if settings["ca_file"] is not None:
                    tls["ca_file"] = settings["ca_file"]
                od["tls"] = tls
        o["outputs"] = outputs
    return o


def config_from_args(args: Any, env: Optional[Mapping[str, str]] = None, *,
                     require_complete: bool = True) -> RelayConfig:
    """The configuration of ``dcgmrelay run``: ``--config FILE`` (or ``DCGMRELAY_CONFIG``) if given,
    then the ``DCGMRELAY_*`` variables and flags on top (flag > env > file > default, per setting).

    ``args`` is an argparse Namespace built with :func:`add_run_arguments`, a
    mapping of dest names (``{"target": [...], "remote_write": [...]}``) or an argv
    list. With ``require_complete`` (default) it also needs at least one target and
    one output (:func:`check_complete`). Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    given = _args_dict(args)
    path = given.get("config") or env.get("DCGMRELAY_CONFIG") or None
    base = load_config(path) if path else _build({}, source=None, base_dir=None)
    overrides = overrides_from_args(given, env, base)
    cfg = merge(base, overrides) if overrides else base
    if require_complete:
        check_complete(cfg)
    return cfg


# ------------------------------------------------------------------------------------ targets


def _auth_of(ep: EndpointConfig, where: str, env: Mapping[str, str]) -> Dict[str, object]:
    auth: Dict[str, object] = {}
    if ep.authorization is not None:
        a = ep.authorization
        if a.credentials is not None:
            auth["bearer_token"] = a.credentials
        elif a.credentials_file is not None:
            auth["bearer_token_file"] = a.credentials_file
        elif a.credentials_env is not None:
            val = env.get(a.credentials_env)
            if not val:
                raise ConfigError(f"environment variable {a.credentials_env} (credentials_env) is not set or empty",
                                  path=f"{where}.authorization.credentials_env")
            auth["bearer_token"] = Secret(val)
    if ep.basic_auth is not None:
        b = ep.basic_auth
        pw = b.password
        if pw is None and b.password_file is not None:
            try:
                with open(b.password_file, encoding="utf-8") as fh:
                    pw = Secret(fh.read().strip())
            except OSError as exc:
                raise ConfigError(f"cannot read password_file {b.password_file}: {exc.strerror or exc}",
                                  path=f"{where}.basic_auth.password_file") from None
        auth["basic"] = (b.username, pw if pw is not None else Secret(""))
    return auth


def _tls_target(t: Optional[TLSConfig]) -> Dict[str, object]:
    """``Target.tls`` form of a TLSConfig: only the settings that are set."""
    if t is None:
        return {}
    return {k: val for k, val in (("ca_file", t.ca_file), ("cert_file", t.cert_file), ("key_file", t.key_file),
                                  ("insecure_skip_verify", t.insecure_skip_verify),
                                  ("server_name", t.server_name)) if val}


def static_targets(cfg: RelayConfig, env: Optional[Mapping[str, str]] = None) -> List[Target]:
    """:class:`~dcgmrelay.targets.Target` objects for every static endpoint, after the target's
    ``relabel_configs``, with Prometheus semantics (:func:`dcgmrelay.targets.scrape_labels` and
    :func:`dcgmrelay.targets.target_from_labels`): ``job``, ``__address__``, ``__scheme__``,
    ``__metrics_path__``, ``__scrape_interval__``, ``__scrape_timeout__``, ``__param_<name>`` and the
    endpoint's ``labels`` go in; a dropped set gives no target; labels with an empty value are
    left out; ``instance`` defaults to ``__address__``; ``__*`` labels are removed. A set whose
    address, scheme, interval or timeout cannot be used, or whose timeout is longer than its
    interval, gives no target and a logged warning (Prometheus drops it with an error too).

    ``auth`` holds :class:`Secret` objects (``auth["bearer_token"]``, the password of
    ``auth["basic"]``): the HTTP client calls :func:`reveal` on them, so a logged
    Target shows ``<secret>``. ``credentials_env`` is read from ``env`` (default
    ``os.environ``) and ``password_file`` is read now. ``metric_relabel`` holds the
    endpoint's rules (compile them with :func:`dcgmrelay.relabel.compile_rules`).
    """
    env = os.environ if env is None else env
    out: List[Target] = []
    for ti, t in enumerate(cfg.targets):
        if not isinstance(t, StaticTargetConfig):
            continue
        rules = compile_rules(t.relabel_configs, path=f"targets[{ti}].relabel_configs") if t.relabel_configs else None
        for ei, ep in enumerate(t.endpoints):
            where = f"targets[{ti}].endpoints[{ei}]"
            labels = scrape_labels(job=t.name, address=ep.address or "", scheme=ep.scheme, path=ep.path,
                                   interval_s=ep.interval, timeout_s=ep.timeout, params=ep.params)
            labels.update(ep.labels)
            if rules is not None:
                res = rules.apply(labels)
                if res is None:
                    continue
                labels = res
            try:
                target = target_from_labels(labels, name=f"{where} (job {t.name})", job=t.name, scheme=ep.scheme,
                                            interval_s=ep.interval, timeout_s=ep.timeout, params=ep.params,
                                            auth=_auth_of(ep, where, env), tls=_tls_target(ep.tls),
                                            metric_relabel=ep.metric_relabel_configs, limits=t.limits)
            except TargetLabelError as exc:
                log.warning("%s; it is not scraped", exc)
                continue
            if target is not None:
                out.append(target)
    return out


def pod_monitor_dicts(cfg: RelayConfig, env: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """The PodMonitor targets in the form :meth:`dcgmrelay.discovery.PodMonitor.from_dict` reads
    (see :meth:`PodMonitorConfig.to_discovery_dict`)."""
    return [t.to_discovery_dict(env) for t in cfg.pod_monitors]


# ------------------------------------------------------------------------------------ warnings


def _secret_fields(cfg: RelayConfig) -> List[str]:
    """Paths of the inline secrets of ``cfg`` (names only)."""
    found: List[str] = []
    for ti, t in enumerate(cfg.targets):
        for ei, e in enumerate(t.endpoints):
            if e.basic_auth is not None and e.basic_auth.password:
                found.append(f"targets[{ti}].endpoints[{ei}].basic_auth.password")
            if e.authorization is not None and e.authorization.credentials:
                found.append(f"targets[{ti}].endpoints[{ei}].authorization.credentials")
    for oi, o in enumerate(cfg.outputs):
        for h, val in o.headers.items():
            if val:
                found.append(_join(f"outputs[{oi}].headers", h))
        if o.bearer_token:
            found.append(f"outputs[{oi}].bearer_token")
        if o.basic_auth is not None and o.basic_auth.password:
            found.append(f"outputs[{oi}].basic_auth.password")
    if cfg.whatap is not None and cfg.whatap.license:
        found.append("spec.license" if cfg.origin == "WhatapAgent" else "whatap.license")
    return found


def _secret_files(cfg: RelayConfig) -> List[Tuple[str, str]]:
    files: List[Tuple[str, str]] = []
    for ti, t in enumerate(cfg.targets):
        for ei, e in enumerate(t.endpoints):
            w = f"targets[{ti}].endpoints[{ei}]"
            if e.basic_auth is not None and e.basic_auth.password_file:
                files.append((f"{w}.basic_auth.password_file", e.basic_auth.password_file))
            if e.authorization is not None and e.authorization.credentials_file:
                files.append((f"{w}.authorization.credentials_file", e.authorization.credentials_file))
            if e.tls is not None and e.tls.key_file:
                files.append((f"{w}.tls.key_file", e.tls.key_file))
    for oi, o in enumerate(cfg.outputs):
        if o.bearer_token_file:
            files.append((f"outputs[{oi}].bearer_token_file", o.bearer_token_file))
        if o.basic_auth is not None and o.basic_auth.password_file:
            files.append((f"outputs[{oi}].basic_auth.password_file", o.basic_auth.password_file))
        if o.tls.key_file:
            files.append((f"outputs[{oi}].tls.key_file", o.tls.key_file))
    return files


def _readable_by_others(path: str) -> Optional[str]:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    who = [w for w, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH)) if mode & bit]
    if not who:
        return None
    return f"readable by {' and '.join(who)} (mode {mode:04o})"


def secret_file_warnings(path: Union[str, "os.PathLike[str]"], cfg: Optional[RelayConfig] = None) -> List[str]:
    """Warnings for secrets that other users can read: the config file ``path`` when it holds
    inline secrets (tokens, passwords, header values, a license) and is readable by group or
    others, and the secret files it names (token/password/key files). Never shows a secret."""
    if os.name != "posix":
        return []
    path = os.fspath(path)
    if cfg is None:
        try:
            cfg = load_config(path)
        except ConfigError:
            return []
    out: List[str] = []
    fields_ = _secret_fields(cfg)
    bad = _readable_by_others(path)
    if fields_ and bad:
        shown = ", ".join(fields_[:5]) + (f" and {len(fields_) - 5} more" if len(fields_) > 5 else "")
        out.append(f"{path} holds secrets ({shown}) and is {bad}: chmod 600 it, or move the secrets to files "
                   "(bearer_token_file, password_file, credentials_file)")
    for where, f in _secret_files(cfg):
        bad = _readable_by_others(f)
        if bad:
            out.append(f"{f} ({where}) is {bad}: chmod 600 it (in Kubernetes: defaultMode 0400 on the volume)")
    return out


def config_warnings(cfg: RelayConfig) -> List[str]:
    """Things worth saying about a valid configuration: remarks made while reading it, no targets or
    outputs, secret files it names that do not exist (yet). File permissions are
    :func:`secret_file_warnings`' business (call both)."""
    out = list(cfg.notes)
    if not cfg.targets:
        out.append("no targets")
    if not cfg.outputs:
        out.append("no outputs" + (": a WhatapAgent has none; give --remote-write URL (or "
                                   "DCGMRELAY_REMOTE_WRITE), --openmetrics-push or --compact"
                                   if cfg.origin == "WhatapAgent" else ""))
    for where, f in _secret_files(cfg):
        if not os.path.exists(f):
            out.append(f"{where}: file {f} does not exist (yet)")
    return out

