"""pytest fixture for the real kube-apiserver + etcd in ``kube.py``.

Import it by name in a test module (``from fixtures_kube import kube_apiserver``).
Session-scoped: one apiserver per test run, so tests use namespaces and label
values of their own. Without the binaries (``.ci/install-kube.sh`` builds
kube-apiserver) the fixture skips, except in CI (``CI=true``) where it fails.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from kube import KubeAPIServer, KubeBinaryMissing, find_etcd, find_kube_apiserver  # noqa: E402

__all__ = ["kube_apiserver"]


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[KubeAPIServer]:
    """etcd + kube-apiserver on free 127.0.0.1 ports (RBAC, admin + namespaced agent tokens)."""
    missing = [n for n, found in (("kube-apiserver", find_kube_apiserver()), ("etcd", find_etcd())) if not found]
    if missing:
        msg = f"{' and '.join(missing)} not installed: run .ci/install-kube.sh (builds kube-apiserver once, ~5 min)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    try:
        srv = KubeAPIServer().start()
    except KubeBinaryMissing as exc:  # pragma: no cover - raced with the check above
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    try:
        yield srv
    finally:
        srv.stop()
