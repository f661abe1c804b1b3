"""Scrape targets and where they come from.

A :class:`TargetSource` yields the *whole* current set of targets each time it
changes; the scrape manager diffs consecutive sets by :attr:`Target.key`. Static
targets are a source that yields once; Kubernetes discovery is a source that
yields on every pod change. Sharding is applied to any source's output.

Both sources describe a target as a label set first, as Prometheus does:
:func:`scrape_labels` is the set relabeling starts from (``job``, ``__address__``,
``__scheme__``, ``__metrics_path__``, ``__scrape_interval__``,
``__scrape_timeout__``, ``__param_<name>``) and :func:`target_from_labels` the
target a relabeled set means (Prometheus' ``scrape.PopulateLabels``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import (AsyncIterator, ClassVar, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

from .errors import DcgmRelayError

__all__ = [
    "DEFAULT_BODY_SIZE_LIMIT",
    "ScrapeLimits",
    "StaticTargets",
    "Target",
    "TargetLabelError",
    "TargetSource",
    "format_duration",
    "parse_duration",
    "scrape_labels",
    "shard_of",
    "shard_targets",
    "target_from_labels",
]

#: A scrape whose body (after decompression) grows past this many bytes fails (the
#: config's ``global.body_size_limit``, Prometheus' ``body_size_limit``). A 1,024-GPU
#: exporter page is ~7 MB, so this leaves room while bounding what a hostile one costs.
DEFAULT_BODY_SIZE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeLimits:
    """A job's limits on one scrape, as Prometheus' scrape_config has them (PodMonitor:
    ``sampleLimit``, ``labelLimit``, ``labelNameLengthLimit``, ``labelValueLengthLimit``).

    None: not set on the job, the global one (``global.*``) applies; 0: no limit; N: a scrape
    past it fails as a whole (``up`` 0). :meth:`over` resolves a job's limits against the
    global ones. A job's 0 lifts a global limit for that job (Prometheus instead reads a
    scrape_config's 0 as "the global one", so a job there cannot opt out).
    """

    #: samples after metric relabeling
    sample_limit: Optional[int] = None
    #: labels of one series, ``__name__`` included (Prometheus' ``verifyLabelLimits`` counts it)
    label_limit: Optional[int] = None
    #: bytes (UTF-8) of one label name
    label_name_length_limit: Optional[int] = None
    #: bytes (UTF-8) of one label value (``__name__``'s value, the metric name, included)
    label_value_length_limit: Optional[int] = None

    #: the limit names, as the native config spells them
    KEYS: ClassVar[Tuple[str, ...]] = ("sample_limit", "label_limit", "label_name_length_limit",
                                       "label_value_length_limit")

    def over(self, base: "ScrapeLimits") -> "ScrapeLimits":
        """These limits where set, ``base``'s elsewhere (a job's over the global ones)."""
        return ScrapeLimits(*(b if s is None else s for s, b in zip(self.as_tuple(), base.as_tuple())))

    def as_tuple(self) -> Tuple[Optional[int], Optional[int], Optional[int], Optional[int]]:
        return (self.sample_limit, self.label_limit, self.label_name_length_limit, self.label_value_length_limit)

    def set_items(self) -> Dict[str, int]:
        """The limits that are set (not None), by config key."""
        return {k: v for k, v in zip(self.KEYS, self.as_tuple()) if v is not None}


@dataclass(frozen=True)
class Target:
    """One endpoint to scrape.

    ``labels`` are attached to every series scraped from it (``job``, ``instance``,
    and for discovered pods ``namespace``, ``pod``, ``container``, and ``node`` with
    ``addNodeLabel``).
    ``auth``, ``tls`` and ``params`` are passed to the HTTP client as they are.
    """

    url: str
    labels: Mapping[str, str] = field(default_factory=dict)
    interval_s: float = 15.0
    timeout_s: float = 10.0
    params: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: {"bearer_token": ..., "bearer_token_file": ..., "basic": (user, password)} (any subset)
    auth: Mapping[str, object] = field(default_factory=dict)
    #: {"ca_file": ..., "cert_file": ..., "key_file": ..., "insecure_skip_verify": bool, "server_name": ...}
    tls: Mapping[str, object] = field(default_factory=dict)
    #: Prometheus-style relabel rules applied to scraped samples (metricRelabelConfigs).
    metric_relabel: Sequence[Mapping[str, object]] = ()
    #: Name of the config target (job) this endpoint came from.
    job: str = ""
    #: The job's own scrape limits (None where the global ones apply).
    limits: ScrapeLimits = ScrapeLimits()

    @property
    def key(self) -> str:
        """Stable identity: the URL with its query parameters (labels do not change identity)."""
        if not self.params:
            return self.url
        query = "&".join(f"{k}={v}" for k in sorted(self.params) for v in self.params[k])
        return f"{self.url}?{query}"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and (self.key, dict(self.labels)) == (other.key, dict(other.labels))

    def same_scrape(self, other: "Target") -> bool:
        """Everything a scrape of it uses is the same (``==`` compares identity and labels
        only): a reload that changes a timeout, credentials, TLS, metric relabeling or a
        limit gives the scraper a changed target, whose loop it restarts."""
        return (self == other and self.interval_s == other.interval_s and self.timeout_s == other.timeout_s
                and dict(self.params) == dict(other.params) and dict(self.auth) == dict(other.auth)
                and dict(self.tls) == dict(other.tls) and self.job == other.job and self.limits == other.limits
                and [dict(r) for r in self.metric_relabel] == [dict(r) for r in other.metric_relabel])


@runtime_checkable
class TargetSource(Protocol):
    """Anything that yields the full current target list whenever it changes."""

    def updates(self) -> AsyncIterator[list[Target]]:
        """Yield the complete set of targets, first at start and then after every change."""
        ...

    async def aclose(self) -> None:
        """Stop watching and release connections."""
        ...


class StaticTargets:
    """A fixed list of targets (``--target`` flags, ``StaticEndpoints`` in the config)."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self._targets = list(targets)

    async def updates(self) -> AsyncIterator[list[Target]]:
        yield list(self._targets)

    async def aclose(self) -> None:
        return None


def shard_of(key: str, n: int) -> int:
    """Shard (0..n-1) owning a target key: rendezvous (highest random weight) hashing.

    Stable across processes and restarts, and when ``n`` changes only the
    targets whose winning shard is new (about 1/n of them) move.
    """
    if n <= 1:
        return 0
    best, best_w = 0, -1
    data = key.encode()
    for i in range(n):
        w = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=i.to_bytes(4, "big")).digest(), "big")
        if w > best_w:
            best, best_w = i, w
    return best


def shard_targets(targets: Sequence[Target], index: int, count: int) -> list[Target]:
    """The targets shard ``index`` of ``count`` scrapes."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, not {index}")
    return [t for t in targets if shard_of(t.key, count) == index]


# ------------------------------------------------------------------------------ label set -> target


class TargetLabelError(DcgmRelayError, ValueError):
    """A (relabeled) target label set that names no valid scrape: an ``__address__``,
    ``__scheme__``, ``__scrape_interval__`` or ``__scrape_timeout__`` that cannot be used,
    or a ``__scrape_timeout__`` longer than the ``__scrape_interval__``.

    ``target`` names the target as the caller did (a config path, a pod and port),
    ``label`` is the special label at fault, ``message`` what is wrong with it.
    """

    def __init__(self, target: str, label: str, message: str) -> None:
        self.target, self.label, self.message = target, label, message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"target {self.target}: {self.label} {self.message}"

    def __reduce__(self) -> Tuple[type[TargetLabelError], Tuple[str, str, str]]:
        return (TargetLabelError, (self.target, self.label, self.message))


_DURATION_RE = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?\Z")
_DURATION_UNITS = (365 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0, 0.001)


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds of a Prometheus duration (``"15s"``, ``"1m30s"``, ``"500ms"``, ``"2h"``, ``"1d"``) or
    a number of seconds (int, float or numeric string). ValueError if invalid or negative.
    The one parser of durations: the config file, discovered endpoints and relabeled
    ``__scrape_interval__``/``__scrape_timeout__`` labels all read theirs here."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("a duration must be finite")
        if value < 0:
            raise ValueError(f"a duration cannot be negative ({value})")
        return float(value)
    if not isinstance(value, str):
        what = ("null" if value is None else "a mapping" if isinstance(value, Mapping)
                else "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}")
        raise ValueError(f"expected a duration, got {what}")
    s = value.strip()
    try:
        return parse_duration(float(s))
    except ValueError as exc:
        if "negative" in str(exc) or "finite" in str(exc):
            raise
    m = _DURATION_RE.match(s)
    if not s or not m or not any(m.groups()):
        raise ValueError(f"invalid duration {value!r}: use a Prometheus duration such as 15s, 1m30s, "
                         "500ms, 2h, or a number of seconds")
    return sum(int(g) * u for g, u in zip(m.groups(), _DURATION_UNITS) if g)
# host[:port]: a bracketed IPv6 address (zone allowed) or a name / IPv4 address without the
# characters that would end or change the authority of a URL.
_ADDRESS_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+(?:%[\w.~-]+)?\]|[^\s/?#@\[\]:\\]+)(?::(\d{1,5}))?\Z")


def format_duration(seconds: float) -> str:
    """Prometheus form of a number of seconds: 90 -> ``"1m30s"``, 0.5 -> ``"500ms"``, 0 -> ``"0s"``."""
    ms_total = round(seconds * 1000)
    if abs(ms_total - seconds * 1000) > 1e-6:
        return repr(float(seconds))
    if ms_total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms_total = divmod(ms_total, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def _duration_label(target: str, label: str, value: str) -> float:
    """Seconds of a ``__scrape_interval__`` / ``__scrape_timeout__`` value (a Prometheus
    duration such as ``15s``, ``1m30s``, ``500ms``, or a number of seconds); more than 0."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        if "negative" in str(exc) or "finite" in str(exc):
            raise TargetLabelError(target, label, f"{value!r} is not a duration of more than 0") from None
        raise TargetLabelError(target, label, f"{value!r} is not a duration (e.g. 15s, 1m30s, 500ms)") from None
    if seconds <= 0:
        raise TargetLabelError(target, label, f"{value!r} is not a duration of more than 0")
    return seconds


def scrape_labels(*, job: str, address: str, scheme: str, path: str, interval_s: float, timeout_s: float,
                  params: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, str]:
    """The labels a target's relabeling starts from, as Prometheus sets them: ``job``,
    ``__address__``, ``__scheme__``, ``__metrics_path__``, ``__scrape_interval__`` and
    ``__scrape_timeout__`` (Prometheus durations: ``15s``, ``1m30s``, ``500ms``) and
    ``__param_<name>`` (the first value of each URL parameter). The caller adds its own
    target labels and meta labels."""
    labels = {"job": job, "__address__": address, "__scheme__": scheme, "__metrics_path__": path,
              "__scrape_interval__": format_duration(interval_s), "__scrape_timeout__": format_duration(timeout_s)}
    for k, vals in (params or {}).items():
        if vals:
            labels[f"__param_{k}"] = vals[0]
    return labels


def target_from_labels(labels: Mapping[str, str], *, name: str, job: str = "", scheme: str = "http",
                       interval_s: float = 15.0, timeout_s: float = 10.0,
                       params: Optional[Mapping[str, Sequence[str]]] = None,
                       auth: Optional[Mapping[str, object]] = None, tls: Optional[Mapping[str, object]] = None,
                       metric_relabel: Sequence[Mapping[str, object]] = (),
                       limits: Optional[ScrapeLimits] = None) -> Optional[Target]:
    """The :class:`Target` a relabeled target label set means (Prometheus' ``PopulateLabels``),
    or None when it has no ``__address__`` (no target, as when a rule drops the set).

    * A label with an empty value is an absent label (Prometheus: the same thing), so it is
      neither a target label nor a special one.
    * ``__address__``: ``host[:port]`` (an IPv6 host in brackets); the URL's authority.
    * ``__scheme__``: ``http`` or ``https`` (any case); absent: ``scheme``.
    * ``__metrics_path__``: the URL path (a leading ``/`` is added); absent: ``/``.
    * ``__scrape_interval__`` / ``__scrape_timeout__``: Prometheus durations (``15s``,
      ``1m30s``, ``500ms``) or numbers of seconds, more than 0; absent: ``interval_s`` /
      ``timeout_s``. The timeout must not be longer than the interval (compared to the
      nanosecond, Prometheus' resolution), whichever of them the labels set: a set whose
      timeout is longer -- say a rule shortened ``__scrape_interval__`` but not
      ``__scrape_timeout__`` -- is an error (Prometheus: "scrape timeout cannot be greater
      than scrape interval"), not a target scraped with a timeout other than the one it gives.
    * ``__param_<name>``: the first value of URL parameter ``<name>`` (its further values in
      ``params`` stay); ``params`` without such a label are sent as they are.
    * Every other label starting with ``__`` (``__meta_*``, ``__tmp_*`` ...) is removed; the
      rest are the target's labels, ``instance`` defaulting to ``__address__``.
      ``Target.job`` is the ``job`` label, else ``job``.

    An unusable address, scheme, interval or timeout, or a timeout longer than the interval,
    raises :class:`TargetLabelError` naming the target by ``name`` (Prometheus drops such a
    target with an error).
    ``params``, ``auth``, ``tls``, ``metric_relabel`` and ``limits`` (the job's
    :class:`ScrapeLimits`) go into the target as they are.
    """
    present = {k: v for k, v in labels.items() if v != ""}
    address = present.get("__address__")
    if address is None:
        return None
    m = _ADDRESS_RE.match(address)
    if m is None or (m.group(1) is not None and int(m.group(1)) > 65535):
        raise TargetLabelError(name, "__address__", f"{address!r} is not host:port (an IPv6 host in brackets)")
    t_scheme = present.get("__scheme__", scheme)
    if t_scheme.lower() not in ("http", "https"):
        raise TargetLabelError(name, "__scheme__", f"{t_scheme!r} is not http or https")
    t_scheme = t_scheme.lower()
    path = present.get("__metrics_path__", "/")
    if not path.startswith("/"):
        path = "/" + path
    interval = (_duration_label(name, "__scrape_interval__", present["__scrape_interval__"])
                if "__scrape_interval__" in present else float(interval_s))
    timeout = (_duration_label(name, "__scrape_timeout__", present["__scrape_timeout__"])
               if "__scrape_timeout__" in present else float(timeout_s))
    if round(timeout * 1e9) > round(interval * 1e9):
        shown_t = present.get("__scrape_timeout__") or format_duration(timeout)
        shown_i = present.get("__scrape_interval__") or format_duration(interval)
        raise TargetLabelError(name, "__scrape_timeout__", f"{shown_t!r} is longer than __scrape_interval__ "
                               f"{shown_i!r}; a scrape timeout must be <= the interval")
    t_params = {k: list(v) for k, v in (params or {}).items()}
    for k, v in present.items():
        if k.startswith("__param_"):
            pname = k[len("__param_"):]
            t_params[pname] = [v] + t_params.get(pname, [])[1:]
    final = {k: v for k, v in present.items() if not k.startswith("__")}
    final.setdefault("instance", address)
    return Target(
        url=f"{t_scheme}://{address}{path}",
        labels=final,
        interval_s=interval,
        timeout_s=timeout,
        params=t_params,
        auth=dict(auth or {}),
        tls=dict(tls or {}),
        metric_relabel=tuple(metric_relabel),
        job=final.get("job", job),
        limits=limits if limits is not None else ScrapeLimits(),
    )
