"""Scrape targets and where they come from.

A :class:`TargetSource` yields the *whole* current set of targets each time it
changes; the scrape manager diffs consecutive sets by :attr:`Target.key`. Static
targets are a source that yields once; Kubernetes discovery is a source that
yields on every pod change. Sharding is applied to any source's output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["DEFAULT_BODY_SIZE_LIMIT", "StaticTargets", "Target", "TargetSource", "shard_of", "shard_targets"]

#: A scrape whose body (after decompression) grows past this many bytes fails (the
#: config's ``global.body_size_limit``, Prometheus' ``body_size_limit``). A 1,024-GPU
#: exporter page is ~7 MB, so this leaves room while bounding what a hostile one costs.
DEFAULT_BODY_SIZE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """One endpoint to scrape.

    ``labels`` are attached to every series scraped from it (``job``, ``instance``,
    and for discovered pods ``namespace``, ``pod``, ``container``, ``node``).
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
