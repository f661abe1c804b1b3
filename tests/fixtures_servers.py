"""pytest fixtures for the real collectors in ``servers.py``.

Use from tests/conftest.py (``from fixtures_servers import *`` or
``pytest_plugins = ["fixtures_servers"]``) or import the fixtures by name in a
test module. Session-scoped: one server of each kind per test run, so tests
should use metric names of their own. Without the binaries the fixtures skip,
except in CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # importable as a plugin without tests/ on sys.path
    sys.path.insert(0, _HERE)

from servers import (  # noqa: E402
    BinaryMissingError,
    PrometheusServer,
    VictoriaMetricsServer,
    require_binaries,
)

__all__ = ["prometheus_server", "victoria_metrics_server"]


def _need(binary: str) -> None:
    try:
        reason = require_binaries(binary)
    except BinaryMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def prometheus_server() -> Iterator[PrometheusServer]:
    """A Prometheus with the remote-write receiver on, on a free 127.0.0.1 port."""
    _need("prometheus")
    with PrometheusServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def victoria_metrics_server() -> Iterator[VictoriaMetricsServer]:
    """A single-node VictoriaMetrics on a free 127.0.0.1 port."""
    _need("victoria-metrics")
    with VictoriaMetricsServer() as srv:
        yield srv
