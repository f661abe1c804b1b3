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
    pytest.param("c", marks=[pytest.mark.c_extension,
                             pytest.mark.skipif(not HAVE_C and os.environ.get("CI") != "true",
                                                reason="native parser not built")]),
    "py",
]

# Fixtures that start a real server binary: a test using one is an integration test even
# when its module is not marked, so `-m "not integration"` (the wheel builds' test command,
# where no such binary exists) deselects exactly these.
SERVER_FIXTURES = frozenset({"prometheus_server", "victoria_metrics_server", "kube_apiserver"})


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        # A test run with impl="c" (this file's ``impl`` fixture or a module's own IMPLS
        # parameter) exercises the native core: the pure install's run deselects it with
        # `-m "not c_extension"`. Tests of the native core that take no ``impl`` mark themselves.
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("impl") == "c":
            item.add_marker(pytest.mark.c_extension)


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
