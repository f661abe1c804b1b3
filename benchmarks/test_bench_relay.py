"""The relay step beside the parse it follows, on the recorded payloads (group "relay").

    python -m pytest benchmarks/test_bench_relay.py -q -p no:cacheprovider --benchmark-only

For each payload (``gpu8.prom``, ``gpu1024.prom.gz``):

* ``test_parse``: ``dcgmrelay.parse`` of the recorded body.
* ``test_relay_ingest``: ``Relay.ingest`` of that parsed body, the relay's state warmed with
  the previous scrape of the same simulated node (t = 585 s; the recorded body is the
  scrape at t = 600 s, see ``tools/gen_payloads.py``). Every round re-ingests the earlier
  scrape (untimed) and times the ingest of the recorded one: the steady-state step,
  including whatever the node changed in 15 s (on 1024 GPUs an XID or two, i.e. new
  ``err_code`` label sets).
* ``test_relay_ingest_identical``: the next scrape within the same 30 s collect period
  (the same body, parsed again): the shape is unchanged, the common case.
* ``test_write_relabel``: an output's ``write_relabel_configs`` on the steady batch, beside
  the same rules applied sample by sample (group "write_relabel <payload>").

The relay tests record ``relay_over_parse`` (median relay time / median parse time of the
same body, measured in the same test) in ``extra_info`` and print it. No assertion on time.
"""

from __future__ import annotations

import functools
import gzip
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest

import dcgmrelay
from dcgmrelay.csvspec import load_csv
from dcgmrelay.relay import Relay
from dcgmrelay.simulate import SimulatedNode

PAYLOADS = Path(__file__).resolve().parent / "payloads"
SCRAPE_INTERVAL = 15.0
RENDER_AT = 600.0  # tools/gen_payloads.py: the recorded body is the scrape at t = 600 s

# The nodes the payloads were rendered from (tools/gen_payloads.py, PAYLOADS).
NODES: Dict[str, Tuple[str, Callable[[], SimulatedNode]]] = {
    "gpu8": ("gpu8.prom", lambda: SimulatedNode(8, pods="some", xid=True)),
    "gpu1024": ("gpu1024.prom.gz", lambda: SimulatedNode(1024, pods="some", xid=True, seed=1024)),
}
TARGET = "gpu-node-0:9400"


@functools.lru_cache(maxsize=None)
def bodies(name: str) -> Tuple[bytes, bytes, bool]:
    """(previous body at t = 585 s, recorded body at t = 600 s, whether the simulator still
    renders the recorded body)."""
    fname, make = NODES[name]
    data = (PAYLOADS / fname).read_bytes()
    cur = gzip.decompress(data) if fname.endswith(".gz") else data
    node = make()
    t, prev = 0.0, b""
    while t < RENDER_AT:
        prev = node.render(t)
        t += SCRAPE_INTERVAL
    return prev, cur, node.render(RENDER_AT) == cur


def median_parse_s(body: bytes, rounds: int = 15) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dcgmrelay.parse(body)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record_ratio(benchmark: Any, name: str, body: bytes) -> None:
    parse_s = median_parse_s(body)
    benchmark.extra_info["parse_median_ms"] = round(parse_s * 1e3, 4)
    benchmark.extra_info["parser"] = dcgmrelay.implementation()
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    relay_s = stats.stats.median
    ratio = relay_s / parse_s
    benchmark.extra_info["relay_median_ms"] = round(relay_s * 1e3, 4)
    benchmark.extra_info["relay_over_parse"] = round(ratio, 4)
    print(f"\n{name}: relay {relay_s * 1e3:.3f} ms / parse {parse_s * 1e3:.3f} ms = {ratio:.1%} "
          f"({benchmark.name})")


@pytest.mark.parametrize("name", list(NODES))
def test_parse(benchmark: Any, name: str) -> None:
    benchmark.group = "relay"
    _, cur, _ = bodies(name)
    scrape = benchmark(dcgmrelay.parse, cur)
    benchmark.extra_info["samples"] = len(scrape)
    benchmark.extra_info["parser"] = dcgmrelay.implementation()


@pytest.mark.parametrize("name", list(NODES))
def test_relay_ingest(benchmark: Any, name: str) -> None:
    benchmark.group = "relay"
    prev_body, cur_body, same = bodies(name)
    prev, cur = dcgmrelay.parse(prev_body), dcgmrelay.parse(cur_body)
    relay = Relay(load_csv("default"), output="both")

    def setup() -> None:
        relay.ingest(prev, target=TARGET, timestamp_ms=585_000)

    def step() -> Any:
        return relay.ingest(cur, target=TARGET, timestamp_ms=600_000)

    batch = benchmark.pedantic(step, setup=setup, rounds=60 if name == "gpu1024" else 300, warmup_rounds=2)
    assert len(batch) == len(cur) and batch.stats.new_series == 0
    benchmark.extra_info.update(samples=len(cur), label_sets=len(cur.labelsets),
                                new_label_sets=len(set(cur.labelsets) - set(prev.labelsets)),
                                prev_from_simulator=same)
    record_ratio(benchmark, name, cur_body)


@pytest.mark.parametrize("name", list(NODES))
def test_relay_ingest_identical(benchmark: Any, name: str) -> None:
    benchmark.group = "relay"
    _, cur_body, _ = bodies(name)
    first, again = dcgmrelay.parse(cur_body), dcgmrelay.parse(cur_body)
    relay = Relay(load_csv("default"), output="both")
    relay.ingest(first, target=TARGET, timestamp_ms=600_000)
    relay.ingest(again, target=TARGET, timestamp_ms=615_000)
    scrapes = [first, again]
    ts = [630_000]

    def step() -> Any:
        # alternate two parses of the same body: equal, but not the same objects
        ts[0] += 15_000
        return relay.ingest(scrapes[ts[0] // 15_000 % 2], target=TARGET, timestamp_ms=ts[0])

    batch = benchmark(step)
    assert len(batch) == len(first) and batch.stats.new_series == 0
    benchmark.extra_info["samples"] = len(first)
    record_ratio(benchmark, name, cur_body)


def test_cycle_bench_runs_every_stage() -> None:
    """``python benchmarks/cycle_bench.py`` (one scrape cycle, back to back and after a pause)
    runs on the recorded payload; its figures are for reading, nothing here asserts on them."""
    import cycle_bench

    out = cycle_bench.run(cycle_bench.load("gpu8.prom"), cycles=8, pause=0.001)
    assert list(out) == list(cycle_bench.STAGES)
    assert all(v >= 0 for v in out.values())


# -- an output's write_relabel_configs on the relayed batch (group "write_relabel") -------------------
WRITE_RULES = [
    {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_(GPU_UTIL|FB_USED|FB_FREE|GPU_TEMP|POWER_USAGE)",
     "action": "keep"},
    {"action": "labeldrop", "regex": "pod|namespace|container|pci_bus_id"},
    {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_GPU_UTIL", "target_label": "__name__",
     "replacement": "gpu_utilization_percent"},
]


def _steady_batches(name: str) -> Tuple[Any, Any]:
    """Two relayed batches of the recorded body (equal tables, not the same objects)."""
    _, cur_body, _ = bodies(name)
    relay = Relay(load_csv("default"), output="both")
    relay.ingest(dcgmrelay.parse(cur_body), target=TARGET, timestamp_ms=600_000)
    a = relay.ingest(dcgmrelay.parse(cur_body), target=TARGET, timestamp_ms=615_000)
    b = relay.ingest(dcgmrelay.parse(cur_body), target=TARGET, timestamp_ms=630_000)
    return a, b


@pytest.mark.parametrize("name", list(NODES))
@pytest.mark.parametrize("impl", ["write_relabel", "per_sample_baseline"])
def test_write_relabel(benchmark: Any, name: str, impl: str) -> None:
    """The steady scrape through ``WriteRelabeler.apply`` beside the plain way: the same
    (memoised) rules applied sample by sample to dicts, as ``RelabelRules.apply`` does.
    Compare the two rows' medians (``extra_info['impl']``)."""
    from dcgmrelay.relabel import compile_rules
    from dcgmrelay.write_relabel import WriteRelabeler

    benchmark.group = f"write_relabel {name}"
    a, b = _steady_batches(name)
    rules = compile_rules(WRITE_RULES, path="bench")
    if impl == "write_relabel":
        w = WriteRelabeler(rules)
        w.apply(a)
        batches = [a, b]
        i = [0]

        def step() -> int:
            i[0] ^= 1
            return len(w.apply(batches[i[0]]))
    else:
        def step() -> int:
            kept = 0
            for n, lab, *_ in b.samples():
                kept += rules.apply({"__name__": n, **lab}, drop_meta=False) is not None
            return kept

        step()  # the rules' memo warm, as it is for WriteRelabeler
    kept = benchmark(step)
    assert 0 < kept < len(b)
    benchmark.extra_info.update(samples=len(b), kept=kept, impl=impl)
