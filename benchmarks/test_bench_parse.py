"""Parse throughput: native (cold and warm), the pure twin, and prometheus_client.

"cold" parses with a new Parser each round (every label block is new to it);
"warm" reuses one Parser, as the relay does when it scrapes the same exporter
again (label blocks are recognised, not re-parsed). Same payloads, same run.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dcgmrelay

from conftest import load_payload, real_payloads_concatenated

PAYLOADS = ["gpu8.prom", "gpu8-expfmt.prom", "gpu64.prom", "gpu1024.prom", "mig7.prom", "shared-pods.prom", "real"]


def _data(name: str) -> bytes:
    return real_payloads_concatenated() if name == "real" else load_payload(name)


def _info(benchmark, name: str, data: bytes, impl: str) -> None:
    n = len(dcgmrelay.parse(data))
    benchmark.extra_info.update(payload=name, bytes=len(data), samples=n, impl=impl)


@pytest.mark.parametrize("name", PAYLOADS)
def test_native_cold(benchmark, name):
    data = _data(name)
    _info(benchmark, name, data, "dcgmrelay native cold")
    benchmark.group = "parse"
    benchmark(lambda: dcgmrelay.Parser(implementation="c").parse(data))


@pytest.mark.parametrize("name", PAYLOADS)
def test_native_warm(benchmark, name):
    data = _data(name)
    _info(benchmark, name, data, "dcgmrelay native warm")
    parser = dcgmrelay.Parser(implementation="c")
    parser.parse(data)
    benchmark.group = "parse"
    benchmark(parser.parse, data)


@pytest.mark.parametrize("name", PAYLOADS)
def test_pure_twin(benchmark, name):
    data = _data(name)
    _info(benchmark, name, data, "dcgmrelay pure twin")
    parser = dcgmrelay.Parser(implementation="py")
    benchmark.group = "parse"
    benchmark.pedantic(parser.parse, args=(data,), rounds=3 if len(data) > 1e6 else 10, warmup_rounds=1)


@pytest.mark.parametrize("name", PAYLOADS)
def test_prometheus_client(benchmark, name):
    data = _data(name)
    _info(benchmark, name, data, "prometheus_client")
    text = data.decode()
    benchmark.group = "parse"

    def run():
        for fam in text_string_to_metric_families(text):
            fam.samples  # noqa: B018

    benchmark.pedantic(run, rounds=3 if len(data) > 1e6 else 10, warmup_rounds=0)
