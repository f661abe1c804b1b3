"""Shared fixtures: the parser implementations, the recorded payloads, and the real servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dcgmrelay
from dcgmrelay import _impl

from fixtures_servers import prometheus_server, victoria_metrics_server  # noqa: F401  (pytest fixtures)

DATA = Path(__file__).parent / "data"
REAL_PAYLOADS = sorted((DATA / "payloads" / "real").glob("*.prom"))

try:
    from dcgmrelay import _parser as _c_parser  # noqa: F401

    HAVE_C = True
except ImportError:  # pragma: no cover - pure build
    HAVE_C = False

IMPLEMENTATIONS = [
    pytest.param("c", marks=pytest.mark.skipif(not HAVE_C and os.environ.get("CI") != "true",
                                               reason="native parser not built")),
    "py",
]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    """Name of a parser implementation: 'c' (native) or 'py' (pure twin)."""
    return request.param


@pytest.fixture
def parse(impl: str):
    """dcgmrelay.parse bound to one implementation."""

    def _parse(data, **kw):
        return dcgmrelay.parse(data, implementation=impl, **kw)

    return _parse


def pytest_report_header(config: pytest.Config) -> str:
    return f"dcgmrelay {dcgmrelay.__version__}, parser implementation: {_impl.IMPLEMENTATION}"
