"""The relay step (dcgmrelay.relay): allow-list, kinds, label fields, deltas, staleness,
eviction and persisted state.

Scenario tests drive :class:`SimulatedNode` and compute the expected deltas from the
rendered bodies parsed with ``dcgmrelay.parse`` (previous and current value of every
series); the tiny hand-written payloads at the top state exact numbers.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import dcgmrelay
from dcgmrelay.csvspec import load_csv
from dcgmrelay.kinds import Kind
from dcgmrelay.relay import STATE_VERSION, Relay, RelayBatch, RelayStats
from dcgmrelay.simulate import SimulatedNode

SPEC = load_csv("default")
TARGET = "gpu-node-0:9400"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
XID = "DCGM_FI_DEV_XID_ERRORS"
NVLINK_BW = "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"
PCIE_TX = "DCGM_FI_PROF_PCIE_TX_BYTES"

SeriesKey = Tuple[str, Tuple[Tuple[str, str], ...]]


# ------------------------------------------------------------------------------------------
# helpers


def skey(name: str, labels: Dict[str, str]) -> SeriesKey:
    return name, tuple(sorted(labels.items()))


def rows(batch: RelayBatch) -> Dict[SeriesKey, Tuple[float, str, Optional[float], int]]:
    """(value, kind, delta, timestamp) per series of a batch."""
    out = {}
    for name, labels, value, kind, delta, ts in batch.samples():
        out[skey(name, labels)] = (value, kind, delta, ts)
    return out


def values_of(scrape: dcgmrelay.Scrape) -> Dict[SeriesKey, float]:
    return {skey(n, l): v for n, l, v, _ in scrape.samples()}


def deltas_of(batch: RelayBatch) -> Dict[SeriesKey, Optional[float]]:
    return {k: r[2] for k, r in rows(batch).items()}


def stale_of(batch: RelayBatch) -> set:
    return {skey(n, l) for n, l in batch.stale_series()}


def expected_deltas(prev: Optional[dcgmrelay.Scrape], cur: dcgmrelay.Scrape,
                    first: str = "drop") -> Dict[SeriesKey, Optional[float]]:
    """What the relay must give for ``cur`` after ``prev`` (same target), for the default
    spec: COUNTER cur - prev, or cur after a decrease; a series not in ``prev`` per the
    first-observation policy; GAUGE/RATE no delta. (EVENT series are checked separately.)"""
    before = values_of(prev) if prev is not None else {}
    out: Dict[SeriesKey, Optional[float]] = {}
    for k, v in values_of(cur).items():
        kind = SPEC.kind(k[0])
        if kind is not Kind.COUNTER:
            continue
        if k not in before:
            out[k] = {"drop": None, "zero": 0.0, "full": v}[first]
        else:
            p = before[k]
            out[k] = v if v < p else v - p
    return out


def check_counters(batch: RelayBatch, prev: Optional[dcgmrelay.Scrape], cur: dcgmrelay.Scrape,
                   first: str = "drop") -> Dict[SeriesKey, Optional[float]]:
    want = expected_deltas(prev, cur, first)
    got = {k: d for k, d in deltas_of(batch).items() if k in want}
    assert got == want
    for k, (value, kind, delta, _) in rows(batch).items():
        if kind in ("gauge", "rate"):
            assert delta is None, k
    return want


def by_gpu(keys, gpu: str) -> set:
    return {k for k in keys if dict(k[1]).get("gpu") == gpu}


class Feed:
    """A SimulatedNode scraped into a Relay, keeping the parsed scrapes."""

    def __init__(self, node: SimulatedNode, relay: Relay, target: str = TARGET) -> None:
        self.node, self.relay, self.target = node, relay, target
        self.scrapes: List[dcgmrelay.Scrape] = []

    def at(self, t: float) -> Tuple[RelayBatch, dcgmrelay.Scrape]:
        scrape = dcgmrelay.parse(self.node.render(t))
        self.scrapes.append(scrape)
        return self.relay.ingest(scrape, target=self.target, timestamp_ms=int(t * 1000)), scrape

    @property
    def prev(self) -> dcgmrelay.Scrape:
        return self.scrapes[-2]


def body(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def gpu_line(name: str, gpu: int, value: float, extra: str = "") -> str:
    return f'{name}{{gpu="{gpu}",UUID="GPU-{gpu:04d}"{extra}}} {value}'


# ------------------------------------------------------------------------------------------
# hand-written payloads: exact numbers


def test_counter_delta_exact_numbers() -> None:
    relay = Relay(SPEC, output="both")

    def step(energy0: float, energy1: float, temp: float, t: int) -> RelayBatch:
        b = body("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
                 gpu_line(ENERGY, 0, energy0), gpu_line(ENERGY, 1, energy1), gpu_line(TEMP, 0, temp))
        return relay.ingest(dcgmrelay.parse(b), target="n", timestamp_ms=t)

    b0 = step(1000, 5000, 40, 0)
    assert np.isnan(b0.deltas).all()  # first observation, policy "drop"
    assert b0.start_timestamps.tolist() == [0, 0, 0]
    assert b0.stats.new_series == 3

    b1 = step(1500, 5250, 41, 15_000)
    assert b1.deltas[:2].tolist() == [500.0, 250.0]
    assert math.isnan(b1.deltas[2])  # gauge
    assert b1.values.tolist() == [1500.0, 5250.0, 41.0]
    assert b1.resets.tolist() == [False, False, False]
    assert b1.start_timestamps.tolist() == [0, 0, 0]

    b2 = step(1500, 5250, 41, 30_000)  # identical scrape: delta 0, not a gap
    assert b2.deltas[:2].tolist() == [0.0, 0.0]

    b3 = step(200, 5300, 42, 45_000)  # GPU 0 reset: delta = new value, flagged, new start
    assert b3.deltas[:2].tolist() == [200.0, 50.0]
    assert b3.resets.tolist() == [True, False, False]
    assert b3.start_timestamps.tolist() == [45_000, 0, 0]
    assert b3.stats.resets == 1

    b4 = step(260, 5300, 42, 60_000)
    assert b4.deltas[:2].tolist() == [60.0, 0.0]
    assert b4.start_timestamps.tolist() == [45_000, 0, 0]
    assert relay.stats.resets == 1 and relay.stats.samples_in == 15


@pytest.mark.parametrize("policy, want", [("drop", [None, None]), ("zero", [0.0, None]), ("full", [1000.0, None])])
def test_first_observation_policies(policy: str, want: list) -> None:
    relay = Relay(SPEC, first_observation=policy, output="both")
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 1000), gpu_line(TEMP, 0, 40))),
                     target="n", timestamp_ms=1)
    assert [d for *_, d, _ in b.samples()] == want
    assert len(b) == 2 and b.stats.dropped_first_observation == 0
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 1100), gpu_line(TEMP, 0, 40))),
                     target="n", timestamp_ms=2)
    assert [d for *_, d, _ in b.samples()] == [100.0, None]


def test_output_delta_drops_first_observation_and_types() -> None:
    lines = (gpu_line(ENERGY, 0, 1000), gpu_line(TEMP, 0, 40), gpu_line(NVLINK_BW, 0, 7))
    relay = Relay(SPEC, output="delta")
    b = relay.ingest(dcgmrelay.parse(body(*lines)), target="n", timestamp_ms=1)
    # the counter has no delta yet: left out; the gauge and the rate are shipped as they are
    assert [n for n, *_ in b.samples()] == [TEMP, NVLINK_BW]
    assert b.stats.dropped_first_observation == 1 and b.stats.kept == 2 and relay.stats.kept == 2
    assert len(b.entity_ids) == 2 and b.entities[b.entity_ids[0]].uuid == "GPU-0000"
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 1300), *lines[1:])), target="n", timestamp_ms=2)
    assert [(n, d) for n, _, _, _, d, _ in b.samples()] == [(ENERGY, 300.0), (TEMP, None), (NVLINK_BW, None)]
    assert b.families[ENERGY][0] == "gauge"  # a delta per interval
    assert b.families[TEMP] == ("gauge", "GPU temperature (in C).", None)

    for mode, energy_type in (("cumulative", "counter"), ("both", "counter")):
        relay = Relay(SPEC, output=mode)
        b = relay.ingest(dcgmrelay.parse(body(*lines)), target="n", timestamp_ms=1)
        assert len(b) == 3 and b.stats.dropped_first_observation == 0
        assert b.families[ENERGY][0] == energy_type
        assert b.families[NVLINK_BW][0] == "gauge"  # CSV says counter; it is a rate


def test_batch_families_reused_while_nothing_they_depend_on_changes() -> None:
    """An unchanged scrape gets the same families dict as the last batch (the encoders skip
    it); new HELP text, a new name or other options give a fresh, correct one."""
    cpu = "# HELP process_cpu_seconds_total {}\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}"
    lines = (gpu_line(ENERGY, 0, 1000), gpu_line(TEMP, 0, 40), cpu.format("CPU time.", 1))
    relay = Relay(SPEC, include_non_dcgm=True)
    parser = dcgmrelay.Parser()
    b1 = relay.ingest(parser.parse(body(*lines)), target="n", timestamp_ms=1)
    b2 = relay.ingest(parser.parse(body(gpu_line(ENERGY, 0, 1100), gpu_line(TEMP, 0, 41), cpu.format("CPU time.", 2))),
                      target="n", timestamp_ms=2)
    assert b2.families is b1.families and b1.families[ENERGY][0] == "counter"
    assert b1.families["process_cpu_seconds_total"] == ("counter", "CPU time.", None)
    other = relay.ingest(parser.parse(body(*lines)), target="other", timestamp_ms=2)
    assert other.families == b1.families and other.families is not b1.families  # per target
    # the exporter's HELP changes
    b3 = relay.ingest(parser.parse(body(*lines[:2], cpu.format("User and system CPU time.", 3))),
                      target="n", timestamp_ms=3)
    assert b3.families is not b2.families
    assert b3.families["process_cpu_seconds_total"][1] == "User and system CPU time."
    # a name more
    b4 = relay.ingest(parser.parse(body(*lines, gpu_line(NVLINK_BW, 0, 7))), target="n", timestamp_ms=4)
    assert set(b4.families) == {ENERGY, TEMP, NVLINK_BW, "process_cpu_seconds_total"}
    # other options (a reload): the energy counter is now a gauge of deltas
    relay.reconfigure(output="delta")
    b5 = relay.ingest(parser.parse(body(*lines, gpu_line(NVLINK_BW, 0, 7))), target="n", timestamp_ms=5)
    assert b5.families[ENERGY][0] == "gauge"
    relay.reconfigure(kind_overrides={ENERGY: "gauge"}, output="cumulative")
    b6 = relay.ingest(parser.parse(body(*lines, gpu_line(NVLINK_BW, 0, 7))), target="n", timestamp_ms=6)
    assert b6.families[ENERGY][0] == "gauge"


def test_batch_columns() -> None:
    relay = Relay(SPEC, output="both")
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 10), gpu_line(TEMP, 1, 40, ',pod="p"'))),
                     target="n", timestamp_ms=5)
    assert b.target == "n" and b.timestamp_ms == 5 and b.output == "both" and len(b) == 2
    assert b.name_ids.dtype == np.int32 and b.labelset_ids.dtype == np.int32
    assert b.field_ids.tolist() == [156, 150] and b.field_ids.dtype == np.int32
    assert b.kinds.tolist() == [int(Kind.COUNTER), int(Kind.GAUGE)] and b.kinds.dtype == np.int8
    assert b.values.dtype == np.float64 and b.deltas.dtype == np.float64
    assert b.resets.dtype == np.bool_ and b.timestamps.dtype == np.int64 and b.start_timestamps.dtype == np.int64
    assert b.stale_name_ids.dtype == np.int32 and b.stale_labelset_ids.dtype == np.int32
    assert [e.uuid for e in b.entities] == ["GPU-0000", "GPU-0001"] and b.entity_ids.tolist() == [0, 1]
    assert b.names[b.name_ids[1]] == TEMP
    assert b.labelsets[b.labelset_ids[1]] == (("gpu", "1"), ("UUID", "GPU-0001"), ("pod", "p"))
    assert b.series_labels(1) == [("UUID", "GPU-0001"), ("__name__", TEMP), ("gpu", "1"), ("pod", "p")]
    assert b.series_labels(1) == b.series_labels(1) and b.series_labels(1) is not b.series_labels(1)
    # upper-case label names sort before "__name__", lower-case ones after
    scrape = dcgmrelay.parse(SimulatedNode(1, pods="all").render(0))
    b2 = Relay(SPEC).ingest(scrape, target="n", timestamp_ms=0)
    names = [k for k, _ in b2.series_labels(0)]
    assert names == ["DCGM_FI_DRIVER_VERSION", "Hostname", "UUID", "__name__", "container", "device", "gpu",
                     "modelName", "namespace", "pci_bus_id", "pod"]
    assert b.labels(0) == {"gpu": "0", "UUID": "GPU-0000"}
    assert list(b.samples())[0] == (ENERGY, {"gpu": "0", "UUID": "GPU-0000"}, 10.0, "counter", None, 5)
    assert "RelayBatch" in repr(b)


def test_sample_timestamps_and_nan_values() -> None:
    relay = Relay(SPEC, output="both")
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 100) + " 1700000000000", gpu_line(ENERGY, 1, 7))),
                     target="n", timestamp_ms=1_700_000_000_500)
    assert b.timestamps.tolist() == [1_700_000_000_000, 1_700_000_000_500]
    assert b.start_timestamps.tolist() == [1_700_000_000_000, 1_700_000_000_500]
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, "NaN"), gpu_line(ENERGY, 1, 9))),
                     target="n", timestamp_ms=1_700_000_015_000)
    assert math.isnan(b.deltas[0]) and b.deltas[1] == 2.0 and not b.resets.any()
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 130), gpu_line(ENERGY, 1, 9))),
                     target="n", timestamp_ms=1_700_000_030_000)
    assert b.deltas.tolist() == [30.0, 0.0]  # NaN left the last real value in place


def test_xid_event_counts_exact() -> None:
    """XID: delta = 1 when the value changes to a non-zero value, event_counts accumulates;
    err_code/err_msg change with the value but the event state follows the device."""
    relay = Relay(SPEC, output="both")
    seq = [0, 0, 45, 45, 13, 0, 13, 79]
    want_delta = [None, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    want_count = [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0]
    got_d, got_c, stale = [], [], []
    for i, code in enumerate(seq):
        line = gpu_line(XID, 0, code, f',err_code="{code}",err_msg="m{code}"')
        b = relay.ingest(dcgmrelay.parse(body(line)), target="n", timestamp_ms=i * 15_000)
        ((name, labels, value, kind, delta, _),) = list(b.samples())
        assert kind == "event" and value == code and labels["err_code"] == str(code)
        got_d.append(delta)
        got_c.append(float(b.event_counts[0]))
        stale.append([l["err_code"] for _, l in b.stale_series()])
    assert got_d == want_delta
    assert got_c == want_count
    assert stale == [[], [], ["0"], [], ["45"], ["13"], ["0"], ["13"]]
    assert relay.stats.events == 4 and relay.stats.new_series == 1
    assert relay.series_count("n") == 1


def test_xid_first_observation_is_no_event() -> None:
    for policy, want in (("drop", None), ("zero", 0.0), ("full", 0.0)):
        relay = Relay(SPEC, output="both", first_observation=policy)
        b = relay.ingest(dcgmrelay.parse(body(gpu_line(XID, 0, 45))), target="n", timestamp_ms=0)
        assert [d for *_, d, _ in b.samples()] == [want]
        assert b.event_counts.tolist() == [0.0] and b.stats.events == 0


# ------------------------------------------------------------------------------------------
# allow-list, non-DCGM, kinds, label fields

MIXED = body(
    "# TYPE process_cpu_seconds_total counter",
    "process_cpu_seconds_total 10.5",
    "# TYPE go_goroutines gauge",
    "go_goroutines 12",
    gpu_line(TEMP, 0, 40),
    gpu_line("DCGM_FI_DEV_POWER_VIOLATION", 0, 5000),  # a DCGM field the default CSV leaves out
    gpu_line(ENERGY, 0, 1000),
)


def test_allow_list_and_non_dcgm_dropped() -> None:
    relay = Relay(SPEC)
    scrape = dcgmrelay.parse(MIXED)
    b = relay.ingest(scrape, target="n", timestamp_ms=0)
    assert [n for n, *_ in b.samples()] == [TEMP, ENERGY]
    assert b.stats == RelayStats(samples_in=5, kept=2, dropped_not_in_spec=1, dropped_non_dcgm=2, new_series=2)
    # the allow-list is the spec's mask over the field-id column
    assert b.field_ids.tolist() == scrape.field_ids[SPEC.mask(scrape.field_ids)].tolist()
    assert set(b.families) == {TEMP, ENERGY}


def test_non_dcgm_pass_with_option() -> None:
    relay = Relay(SPEC, include_non_dcgm=True, output="both")
    b = relay.ingest(dcgmrelay.parse(MIXED), target="n", timestamp_ms=0)
    assert [(n, k) for n, _, _, k, _, _ in b.samples()] == [
        ("process_cpu_seconds_total", "counter"), ("go_goroutines", "gauge"), (TEMP, "gauge"), (ENERGY, "counter")]
    assert b.stats.dropped_non_dcgm == 0 and b.stats.dropped_not_in_spec == 1
    assert b.field_ids.tolist() == [-1, -1, 150, 156]
    assert b.families["process_cpu_seconds_total"][0] == "counter"
    assert b.families["go_goroutines"][0] == "gauge"
    b = relay.ingest(dcgmrelay.parse(MIXED.replace(b"10.5", b"12.0")), target="n", timestamp_ms=15_000)
    assert deltas_of(b)[("process_cpu_seconds_total", ())] == 1.5

    relay = Relay(SPEC, include_non_dcgm=True, kind_overrides={"process_cpu_seconds_total": "gauge"})
    b = relay.ingest(dcgmrelay.parse(MIXED), target="n", timestamp_ms=0)
    assert b.kinds[0] == int(Kind.GAUGE) and b.families["process_cpu_seconds_total"][0] == "gauge"


def test_kinds_by_field_id_not_type_line() -> None:
    """Mis-typed counters: the CSV (and # TYPE) say counter, the field id says rate."""
    csv = textwrap.dedent(f"""\
        {ENERGY}, counter, energy
        {NVLINK_BW}, counter, typed counter but a MiB/s rate
        {PCIE_TX}, counter, typed counter as in WhaTap CSV but bytes per second
        {XID}, gauge, last XID
        """)
    spec = load_csv(csv)
    lines = lambda e, bw, tx: body(f"# TYPE {NVLINK_BW} counter", f"# TYPE {PCIE_TX} counter",  # noqa: E731
                                   gpu_line(ENERGY, 0, e), gpu_line(NVLINK_BW, 0, bw), gpu_line(PCIE_TX, 0, tx))
    relay = Relay(spec, output="both")
    relay.ingest(dcgmrelay.parse(lines(100, 9000, 5e9)), target="n", timestamp_ms=0)
    b = relay.ingest(dcgmrelay.parse(lines(150, 3000, 1e9)), target="n", timestamp_ms=15_000)
    assert [(k, d) for _, _, _, k, d, _ in b.samples()] == [("counter", 50.0), ("rate", None), ("rate", None)]
    assert not b.resets.any()
    assert b.families[NVLINK_BW][0] == "gauge" and b.families[PCIE_TX][0] == "gauge"

    # Forced to COUNTER, the rates that go down look like resets: why the table exists.
    relay = Relay(spec, output="both", kind_overrides={PCIE_TX: Kind.COUNTER, 449: "counter"})
    relay.ingest(dcgmrelay.parse(lines(100, 9000, 5e9)), target="n", timestamp_ms=0)
    b = relay.ingest(dcgmrelay.parse(lines(150, 3000, 1e9)), target="n", timestamp_ms=15_000)
    assert [(k, d) for _, _, _, k, d, _ in b.samples()] == [("counter", 50.0), ("counter", 3000.0), ("counter", 1e9)]
    assert b.resets.tolist() == [False, True, True]
    b = relay.ingest(dcgmrelay.parse(lines(150, 3500, 3e9)), target="n", timestamp_ms=30_000)
    assert b.deltas.tolist() == [0.0, 500.0, 2e9]


def test_kind_override_errors() -> None:
    with pytest.raises(ValueError, match="LABEL"):
        Relay(SPEC, kind_overrides={TEMP: "label"})
    with pytest.raises(ValueError, match="label"):
        Relay(SPEC, kind_overrides={"DCGM_FI_DRIVER_VERSION": "gauge"})
    with pytest.raises(ValueError):
        Relay(SPEC, kind_overrides={TEMP: "sideways"})
    with pytest.raises(ValueError):
        Relay(SPEC, first_observation="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Relay(SPEC, output="rate")  # type: ignore[arg-type]


LABEL_CSV = textwrap.dedent(f"""\
    {TEMP}, gauge, temp
    {ENERGY}, counter, energy
    DCGM_FI_DEV_SERIAL, label, serial
    DCGM_FI_DRIVER_VERSION, label, driver
    """)


def test_label_fields_sent_as_samples_become_entity_attributes() -> None:
    relay = Relay(load_csv(LABEL_CSV), output="both")
    mig = ',GPU_I_PROFILE="1g.10gb",GPU_I_ID="1"'
    b1 = body(gpu_line(TEMP, 0, 40), gpu_line(TEMP, 1, 41), gpu_line(TEMP, 0, 42, mig), gpu_line(ENERGY, 0, 100),
              gpu_line("DCGM_FI_DEV_SERIAL", 0, 1650000000123),
              gpu_line("DCGM_FI_DRIVER_VERSION", 0, 1, ',DCGM_FI_DRIVER_VERSION="550.127.05"'),
              'DCGM_FI_DEV_SERIAL 7')  # about no entity: dropped
    b = relay.ingest(dcgmrelay.parse(b1), target="n", timestamp_ms=0)
    attrs = {"DCGM_FI_DEV_SERIAL": "1650000000123", "DCGM_FI_DRIVER_VERSION": "550.127.05"}
    got = [(n, l) for n, l, *_ in b.samples()]
    assert got == [
        (TEMP, {"gpu": "0", "UUID": "GPU-0000", **attrs}),
        (TEMP, {"gpu": "1", "UUID": "GPU-0001"}),
        (TEMP, {"gpu": "0", "UUID": "GPU-0000", "GPU_I_PROFILE": "1g.10gb", "GPU_I_ID": "1", **attrs}),
        (ENERGY, {"gpu": "0", "UUID": "GPU-0000", **attrs}),
    ]
    assert b.stats.label_samples == 3 and b.stats.kept == 4 and b.stats.dropped_not_in_spec == 0

    # Attributes stay until the entity sends new ones; series identity is the input label set.
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(TEMP, 0, 40), gpu_line(ENERGY, 0, 130))),
                     target="n", timestamp_ms=15_000)
    assert [(n, l, d) for n, l, _, _, d, _ in b.samples()] == [
        (TEMP, {"gpu": "0", "UUID": "GPU-0000", **attrs}, None),
        (ENERGY, {"gpu": "0", "UUID": "GPU-0000", **attrs}, 30.0)]
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 131), gpu_line("DCGM_FI_DEV_SERIAL", 0, 99))),
                     target="n", timestamp_ms=30_000)
    ((_, labels, _, _, delta, _),) = list(b.samples())
    assert labels["DCGM_FI_DEV_SERIAL"] == "99" and delta == 1.0
    assert {n for n, _ in b.stale_series()} == {TEMP}


def test_label_fields_rendered_as_labels_pass_untouched() -> None:
    """dcgm-exporter's own way: DCGM_FI_DRIVER_VERSION is a label of every sample."""
    scrape = dcgmrelay.parse(SimulatedNode(2).render(0))
    b = Relay(SPEC).ingest(scrape, target="n", timestamp_ms=0)
    assert len(b) == len(scrape) == 50 and b.stats.label_samples == 0
    assert b.labelsets == scrape.labelsets
    assert all(l["DCGM_FI_DRIVER_VERSION"] == "550.127.05" for _, l, *_ in b.samples())


# ------------------------------------------------------------------------------------------
# scenarios from the simulator


def test_steady_growth_and_identical_scrapes() -> None:
    feed = Feed(SimulatedNode(8, pods="some", xid=True), Relay(SPEC, output="both"))
    b, s = feed.at(0)
    want = check_counters(b, None, s)
    assert len(want) == 8 * 4 and all(d is None for d in want.values())  # 4 COUNTER fields
    assert b.stats.new_series == 200 and b.stats.kept == 200

    # t=15 is in the same 30 s collect period: the exporter serves the same body -> delta 0.
    b, s = feed.at(15)
    assert feed.node.render(15) == feed.node.render(15)
    want = check_counters(b, feed.prev, s)
    assert set(want.values()) == {0.0}
    assert b.stats.new_series == 0 and b.stats.resets == 0 and len(b.stale_name_ids) == 0

    energy_sum: Dict[SeriesKey, float] = {}
    for t in range(30, 601, 15):
        b, s = feed.at(t)
        want = check_counters(b, feed.prev, s)
        assert b.stats.resets == 0 and b.stats.new_series == 0
        for k, d in want.items():
            if k[0] == ENERGY:
                assert d is not None and d >= 0
                energy_sum[k] = energy_sum.get(k, 0.0) + d
        if t % 30 == 0:  # a new collect tick: energy grows on every GPU
            assert all(d > 0 for k, d in want.items() if k[0] == ENERGY)
        else:
            assert all(d == 0.0 for d in want.values())
    # the deltas add up to the growth over the whole run
    first, last = values_of(feed.scrapes[0]), values_of(feed.scrapes[-1])
    assert energy_sum == {k: last[k] - first[k] for k in energy_sum}
    assert feed.relay.series_count(TARGET) == 200


def test_driver_reload_resets_one_gpu() -> None:
    feed = Feed(SimulatedNode(8, pods="some"), Relay(SPEC, output="both"))
    for t in (0, 30, 60):
        feed.at(t)
    feed.node.reset_counters(3)
    b, s = feed.at(90)
    want = check_counters(b, feed.prev, s)
    cur = values_of(s)
    reset_keys = {skey(b.names[b.name_ids[i]], b.labels(i)) for i in np.flatnonzero(b.resets)}
    # energy restarts near 0 on GPU 3 (the only counter of GPU 3 that was not already 0)
    energy3 = next(k for k in by_gpu(want, "3") if k[0] == ENERGY)
    assert reset_keys <= by_gpu(want, "3") and energy3 in reset_keys
    assert want[energy3] == cur[energy3] and cur[energy3] < values_of(feed.prev)[energy3]
    assert b.start_timestamps[b.resets].tolist() == [90_000] * len(reset_keys)
    assert set(b.start_timestamps[~b.resets].tolist()) == {0}
    assert b.stats.resets == len(reset_keys)
    # the next scrape deltas normally against the value after the reset
    b, s = feed.at(120)
    want = check_counters(b, feed.prev, s)
    assert want[energy3] == values_of(s)[energy3] - cur[energy3] > 0
    assert not b.resets.any()


def test_gpu_disappears_and_comes_back() -> None:
    feed = Feed(SimulatedNode(4, pods="some"), Relay(SPEC, output="both"))
    feed.at(0)
    b, before = feed.at(30)
    gpu2 = by_gpu(values_of(before), "2")
    assert len(gpu2) == 25

    feed.node.remove_gpu(2)
    b, s = feed.at(60)
    check_counters(b, feed.prev, s)
    assert stale_of(b) == gpu2  # exactly GPU 2's series, for stale markers
    assert b.stats.stale_series == 25 and len(b) == 75 and b.stats.new_series == 0
    b, s = feed.at(90)
    assert len(b.stale_name_ids) == 0  # reported once

    feed.node.restore_gpu(2)
    b, s = feed.at(120)
    # GPU 2 deltas against its last value before it left (the counter kept running)
    want = expected_deltas(before, s)
    got = deltas_of(b)
    for k in by_gpu(want, "2"):
        assert got[k] == want[k]
    assert got[next(k for k in by_gpu(want, "2") if k[0] == ENERGY)] > 0
    assert b.stats.new_series == 0 and len(b.stale_name_ids) == 0


def test_mig_reconfiguration() -> None:
    feed = Feed(SimulatedNode(2, mig_instances=3, pods="some", seed=7), Relay(SPEC, output="both"))
    feed.at(0)
    b, before = feed.at(30)
    old = by_gpu(values_of(before), "0")
    assert {dict(k[1])["GPU_I_ID"] for k in old} == {"1", "2", "3"}

    feed.node.reconfigure_mig(0, 2)
    b, s = feed.at(60)
    new = by_gpu(values_of(s), "0")
    assert {dict(k[1])["GPU_I_ID"] for k in new} == {"4", "5"}
    assert stale_of(b) == old
    assert b.stats.new_series == len(new) == 42
    want = check_counters(b, before, s)
    assert all(want[k] is None for k in new if k in want)  # first observation: no delta
    assert all(want[k] is not None for k in by_gpu(want, "1"))  # GPU 1 untouched
    b, s = feed.at(90)
    want = check_counters(b, feed.prev, s)
    assert all(want[k] is not None for k in want) and b.stats.new_series == 0


@pytest.mark.parametrize("policy", ["drop", "zero"])
def test_pod_moves_to_another_gpu(policy: str) -> None:
    node = SimulatedNode(4, pods={0: "pod-a", 1: "pod-b"})
    feed = Feed(node, Relay(SPEC, output="both", first_observation=policy))
    feed.at(0)
    b, before = feed.at(30)
    node.move_pod("pod-a", 2)
    b, s = feed.at(60)
    old_keys, new_keys = set(values_of(before)), set(values_of(s))
    gone, came = old_keys - new_keys, new_keys - old_keys
    assert {(dict(k[1])["gpu"], dict(k[1]).get("pod")) for k in gone} == {("0", "pod-a"), ("2", None)}
    assert {(dict(k[1])["gpu"], dict(k[1]).get("pod")) for k in came} == {("0", None), ("2", "pod-a")}
    assert stale_of(b) == gone and len(gone) == 50
    assert b.stats.new_series == len(came) == 50
    want = check_counters(b, before, s, first=policy)
    for k in came:
        if k in want:
            assert want[k] == (None if policy == "drop" else 0.0)
    for k in by_gpu(want, "1") | by_gpu(want, "3"):
        assert want[k] is not None


def test_exporter_restart_keeps_counters() -> None:
    node = SimulatedNode(4, pods="some", xid=True)
    feed = Feed(node, Relay(SPEC, output="both"))
    feed.at(0)
    b, before = feed.at(30)
    xid1 = [k for k in values_of(before) if k[0] == XID and dict(k[1])["gpu"] == "1"]
    assert [values_of(before)[k] for k in xid1] == [45.0]

    node.restart_exporter()
    b, s = feed.at(60)
    check_counters(b, before, s)
    # The last XID clears: err_code 45 -> 0 is a new label set (old one stale) but the same
    # event state: not a new series, and a change to 0 is no event.
    assert stale_of(b) == set(xid1)
    assert b.stats.new_series == 0 and b.stats.events == 0
    xi = [i for i, (n, l, *_) in enumerate(b.samples()) if n == XID and l["gpu"] == "1"]
    assert b.deltas[xi].tolist() == [0.0] and b.values[xi].tolist() == [0.0]
    assert b.labels(xi[0])["err_code"] == "0"


def test_exporter_restart_with_pod_hostname_changes_every_series() -> None:
    node = SimulatedNode(4, hostname_is_pod_name=True)
    feed = Feed(node, Relay(SPEC, output="both"))
    feed.at(0)
    b, before = feed.at(30)
    node.restart_exporter()
    b, s = feed.at(60)
    assert stale_of(b) == set(values_of(before)) and b.stats.stale_series == 100
    assert b.stats.new_series == 100
    want = check_counters(b, before, s)
    assert set(want.values()) == {None}


def test_shared_gpus_repeated_per_pod() -> None:
    feed = Feed(SimulatedNode(2, shared_pods=3), Relay(SPEC, output="both"))
    feed.at(0)
    b, s = feed.at(30)
    want = check_counters(b, feed.prev, s)
    assert len(want) == 2 * 3 * 4
    for gpu in ("0", "1"):
        energy = [want[k] for k in by_gpu(want, gpu) if k[0] == ENERGY]
        assert len(energy) == 3 and len(set(energy)) == 1 and energy[0] > 0  # same delta per pod
        assert len({dict(k[1])["pod"] for k in by_gpu(want, gpu) if k[0] == ENERGY}) == 3
    assert feed.relay.series_count(TARGET) == 150


def test_misbehaving_rates_never_delta() -> None:
    """NVLINK_BANDWIDTH_TOTAL is typed counter by the default CSV and goes down."""
    node = SimulatedNode(4, pods="all")
    feed = Feed(node, Relay(SPEC, output="both"))
    feed.at(0)
    went_down = 0
    for t in range(30, 301, 30):
        b, s = feed.at(t)
        prev = values_of(feed.prev)
        for k, (value, kind, delta, _) in rows(b).items():
            if k[0] == NVLINK_BW:
                assert kind == "rate" and delta is None
                went_down += value < prev[k]
        assert not b.resets.any()
    assert went_down > 0
    forced = Feed(SimulatedNode(4, pods="all"), Relay(SPEC, output="both", kind_overrides={NVLINK_BW: "counter"}))
    forced.at(0)
    resets = 0
    for t in range(30, 301, 30):
        b, s = forced.at(t)
        prev = values_of(forced.prev)
        for i, (n, l, v, k, d, _) in enumerate(b.samples()):
            if n == NVLINK_BW:
                p = prev[skey(n, l)]
                assert k == "counter" and b.resets[i] == (v < p) and d == (v if v < p else v - p)
                resets += v < p
    assert resets == went_down


def test_pcie_bytes_forced_to_counter() -> None:
    fields = [f for f in SimulatedNode(1).family_names]
    fields = [(PCIE_TX, "counter", "typed counter like WhaTap") if f == PCIE_TX else f for f in fields]
    node = SimulatedNode(2, pods="all", fields=fields)
    relay = Relay(SPEC, output="both", kind_overrides={"DCGM_FI_PROF_PCIE_TX_BYTES": "COUNTER"})
    feed = Feed(node, relay)
    feed.at(0)
    b, s = feed.at(30)
    prev = values_of(feed.prev)
    idx = [i for i, (n, *_) in enumerate(b.samples()) if n == PCIE_TX]
    assert len(idx) == 2 and (b.kinds[idx] == int(Kind.COUNTER)).all()
    for i in idx:
        k = skey(PCIE_TX, b.labels(i))
        v, p = b.values[i], prev[k]
        assert b.deltas[i] == (v if v < p else v - p)
    assert b.families[PCIE_TX][0] == "counter"


# ------------------------------------------------------------------------------------------
# staleness, eviction, target down


def test_target_down_and_back() -> None:
    node = SimulatedNode(2)
    feed = Feed(node, Relay(SPEC, output="both"))
    feed.at(0)
    b, before = feed.at(30)
    down = feed.relay.target_down(TARGET, 45_000)
    assert len(down) == 0 and down.stats.stale_series == 50
    assert stale_of(down) == set(values_of(before))
    assert down.timestamp_ms == 45_000
    again = feed.relay.target_down(TARGET, 60_000)
    assert again.stats.stale_series == 0  # reported once
    b, s = feed.at(90)
    want = check_counters(b, before, s)  # deltas since the last scrape before the outage
    assert all(d is not None and d > 0 for k, d in want.items() if k[0] == ENERGY)
    assert b.stats.new_series == 0 and len(b.stale_name_ids) == 0
    assert feed.relay.target_down("never-seen", 1).stats.stale_series == 0


def test_eviction_bounds_state() -> None:
    node = SimulatedNode(4)
    relay = Relay(SPEC, output="both", evict_after_ms=60_000)
    feed = Feed(node, relay)
    feed.at(0)
    feed.at(15)
    node.remove_gpu(2)
    b, _ = feed.at(30)
    assert b.stats.stale_series == 25 and relay.series_count() == 100
    b, _ = feed.at(75)  # GPU 2 last seen at 15 s: exactly 60 s, kept
    assert b.stats.evicted_series == 0 and relay.series_count() == 100
    b, _ = feed.at(90)
    assert b.stats.evicted_series == 25 and relay.series_count() == 75
    assert relay.stats.evicted_series == 25
    node.restore_gpu(2)
    b, s = feed.at(105)  # after eviction GPU 2 is new again
    assert b.stats.new_series == 25
    want = check_counters(b, feed.prev, s)
    assert all(want[k] is None for k in by_gpu(want, "2"))
    assert all(want[k] is not None for k in by_gpu(want, "1"))

    # a target that is no longer scraped is dropped whole
    other = Feed(SimulatedNode(1, seed=5), relay, target="other:9400")
    other.at(105)
    assert relay.targets == [TARGET, "other:9400"]
    feed.at(200)
    assert relay.targets == [TARGET]
    assert relay.stats.evicted_series == 50


def test_label_tables_compacted_after_churn() -> None:
    """XID codes and pods churn label sets; evicted series give their strings back."""
    relay = Relay(SPEC, output="both", evict_after_ms=30_000)
    for i in range(200):
        line = gpu_line(XID, 0, i % 7, f',err_code="{i}"')
        other = gpu_line(TEMP, 0, 40, f',pod="p{i}"')
        relay.ingest(dcgmrelay.parse(body(line, other)), target="n", timestamp_ms=i * 15_000)
    t = relay._targets["n"]
    assert relay.series_count("n") <= 4
    assert len(t.labelsets) < 100 and len(t.names) <= 2
    b = relay.ingest(dcgmrelay.parse(body(gpu_line(XID, 0, 5, ',err_code="x"'))), target="n", timestamp_ms=200 * 15_000)
    assert b.stats.new_series == 0 and b.deltas.tolist() == [1.0]


# ------------------------------------------------------------------------------------------
# persistence


def test_relay_restart_with_persisted_state(tmp_path: Path) -> None:
    path = tmp_path / "state" / "relay.npz"
    path.parent.mkdir()
    node = SimulatedNode(8, pods="some", xid=True)
    feed = Feed(node, Relay(SPEC, output="both", state_path=path))
    for t in (0, 15, 30, 45):
        feed.at(t)
    assert path.exists() and os.listdir(path.parent) == ["relay.npz"]  # no temp files left

    # a new relay process: the delta since the last scrape before the restart, no spike, no gap
    relay2 = Relay(SPEC, output="both", state_path=path)
    assert relay2.series_count(TARGET) == 200
    feed2 = Feed(node, relay2)
    feed2.scrapes = feed.scrapes[:]
    b, s = feed2.at(60)
    want = check_counters(b, feed.scrapes[-1], s)
    assert all(d is not None for d in want.values())
    assert b.stats.new_series == 0 and b.stats.resets == 0 and len(b.stale_name_ids) == 0
    assert set(b.start_timestamps.tolist()) == {0}  # start kept across the restart

    # ... unless the counter itself reset meanwhile
    node.reset_counters(5)
    relay3 = Relay(SPEC, output="both", state_path=path)
    feed3 = Feed(node, relay3)
    feed3.scrapes = feed2.scrapes[:]
    b, s = feed3.at(90)
    want = check_counters(b, feed2.scrapes[-1], s)
    energy5 = next(k for k in by_gpu(want, "5") if k[0] == ENERGY)
    assert want[energy5] == values_of(s)[energy5]
    assert b.stats.resets >= 1 and b.start_timestamps[b.resets].tolist() == [90_000] * b.stats.resets


def test_state_carries_stale_and_events(tmp_path: Path) -> None:
    path = tmp_path / "relay.npz"
    relay = Relay(SPEC, output="both", state_path=path)
    relay.ingest(dcgmrelay.parse(body(gpu_line(XID, 0, 45), gpu_line(TEMP, 1, 40))), target="n", timestamp_ms=0)
    relay.ingest(dcgmrelay.parse(body(gpu_line(XID, 0, 13), gpu_line(TEMP, 1, 40))), target="n", timestamp_ms=15_000)
    relay2 = Relay(SPEC, output="both", state_path=path)
    b = relay2.ingest(dcgmrelay.parse(body(gpu_line(XID, 0, 31))), target="n", timestamp_ms=30_000)
    assert b.deltas.tolist() == [1.0] and b.event_counts.tolist() == [2.0]
    assert [(n, l["gpu"]) for n, l in b.stale_series()] == [(TEMP, "1")]
    assert b.start_timestamps.tolist() == [0]


def test_state_survives_another_process(tmp_path: Path) -> None:
    """Keys are the strings, not per-process ids (hash randomisation differs per process)."""
    path = tmp_path / "relay.npz"
    code = textwrap.dedent(f"""
        import dcgmrelay
        from dcgmrelay.relay import Relay
        from dcgmrelay.simulate import SimulatedNode
        node = SimulatedNode(4, pods="some")
        relay = Relay("default", state_path={str(path)!r})
        for t in (0, 30):
            relay.ingest(dcgmrelay.parse(node.render(t)), target="t", timestamp_ms=t * 1000)
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    node = SimulatedNode(4, pods="some")
    prev = dcgmrelay.parse(node.render(0))
    prev = dcgmrelay.parse(node.render(30))
    cur = dcgmrelay.parse(node.render(60))
    b = Relay(SPEC, output="both", state_path=path).ingest(cur, target="t", timestamp_ms=60_000)
    want = check_counters(b, prev, cur)
    assert all(d is not None for d in want.values()) and b.stats.new_series == 0


def test_save_cadence(tmp_path: Path) -> None:
    path = tmp_path / "relay.npz"
    relay = Relay(SPEC, state_path=path, save_every_s=3600)
    relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 1))), target="n", timestamp_ms=0)
    assert path.exists()  # the first ingest saves
    mtime = path.stat().st_mtime_ns
    relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 2))), target="n", timestamp_ms=15_000)
    assert path.stat().st_mtime_ns == mtime
    assert Relay(SPEC, state_path=path).ingest(
        dcgmrelay.parse(body(gpu_line(ENERGY, 0, 5))), target="n", timestamp_ms=30_000).deltas.tolist() == [4.0]
    relay.save()
    assert Relay(SPEC, state_path=path).ingest(
        dcgmrelay.parse(body(gpu_line(ENERGY, 0, 5))), target="n", timestamp_ms=30_000).deltas.tolist() == [3.0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "version", "inconsistent"])
def test_corrupt_state_file_starts_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    path = tmp_path / "relay.npz"
    relay = Relay(SPEC, state_path=path)
    for t in (0, 15):
        relay.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 10 + t))), target="n", timestamp_ms=t * 1000)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a state file" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        import json
        import zipfile
        z = dict(np.load(path))
        if damage == "version":
            meta = json.loads(bytes(z["meta"]).decode())
            meta["version"] = STATE_VERSION + 1
            z["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        else:
            z["t0_prev"] = z["t0_prev"][:0]
        with open(path, "wb") as fh:
            np.savez(fh, **z)
        assert zipfile.is_zipfile(path)
    with caplog.at_level(logging.WARNING, logger="dcgmrelay.relay"):
        fresh = Relay(SPEC, state_path=path, output="both")
    assert fresh.series_count() == 0
    assert any("unreadable" in r.getMessage() and r.name == "dcgmrelay.relay" for r in caplog.records)
    b = fresh.ingest(dcgmrelay.parse(body(gpu_line(ENERGY, 0, 40))), target="n", timestamp_ms=30_000)
    assert b.stats.new_series == 1  # and the file is good again
    assert Relay(SPEC, state_path=path).series_count() == 1


# ------------------------------------------------------------------------------------------
# no Python loop per sample


def _line_events(fn) -> int:
    """Python lines executed inside dcgmrelay/relay.py while ``fn`` runs."""
    import dcgmrelay.relay as mod

    count = 0

    def local(frame, event, arg):  # noqa: ANN001
        nonlocal count
        if event == "line":
            count += 1
        return local

    def glob(frame, event, arg):  # noqa: ANN001
        if frame.f_code.co_filename == mod.__file__:
            return local
        return None

    sys.settrace(glob)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def _repeated_body(reps: int, step: int) -> bytes:
    """Two GPUs x (gauge, counter, event): the same 6 series repeated ``reps`` times
    (a degenerate body, but it has many samples and only 2 label sets and 3 names)."""
    lines = []
    for r in range(reps):
        for g in (0, 1):
            lines.append(gpu_line(TEMP, g, 40 + step))
            lines.append(gpu_line(ENERGY, g, 1000 * step))
            lines.append(gpu_line(XID, g, step % 2 * 13))
    return body(*lines)


def test_relay_work_does_not_grow_with_samples() -> None:
    """The same label sets and names, 1,020 vs 102,000 samples: the Python work (lines run
    in relay.py) is identical, for a structural ingest and for a steady one."""
    counts = []
    for reps in (170, 17_000):
        relay = Relay(SPEC, output="delta", first_observation="zero")
        scrapes = [dcgmrelay.parse(_repeated_body(reps, k)) for k in range(3)]
        assert len(scrapes[0]) == 6 * reps and len(scrapes[0].labelsets) == 2
        first = _line_events(lambda: relay.ingest(scrapes[0], target="n", timestamp_ms=0))
        relay.ingest(scrapes[1], target="n", timestamp_ms=15_000)
        steady = _line_events(lambda: relay.ingest(scrapes[2], target="n", timestamp_ms=30_000))
        b = relay.ingest(scrapes[1], target="n", timestamp_ms=45_000)
        # every copy of a duplicated series deltas against the same previous value
        assert len(b) == 6 * reps and b.stats.events == 2 * reps and b.stats.resets == 2 * reps
        counts.append((first, steady))
    assert counts[0] == counts[1]
    assert counts[0][1] < 400  # a few hundred lines for the whole steady ingest


# ------------------------------------------------------------------------------------------
# against a plain-Python model of the delta rules, on random scrape sequences

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Model:
    """The delta rules, one series at a time, with dicts."""

    def __init__(self, first: str, evict_after_ms: int) -> None:
        self.first, self.evict_after_ms = first, evict_after_ms
        self.state: Dict[Any, Dict[str, float]] = {}  # state key -> prev, start, events, seen
        self.present: set = set()

    def ingest(self, samples, now: int):
        out = []
        for name, labels, value in samples:
            kind = SPEC.kind(name)
            skey_ = skey(name, {k: v for k, v in labels.items()
                                if not (kind is Kind.EVENT and k in ("err_code", "err_msg"))})
            s = self.state.get(skey_)
            delta, reset, events = None, False, None
            if s is None:
                s = self.state[skey_] = {"prev": None, "start": now, "events": 0.0}
                if kind is Kind.COUNTER:
                    delta = {"drop": None, "zero": 0.0, "full": value}[self.first]
                elif kind is Kind.EVENT:
                    delta = None if self.first == "drop" else 0.0
            elif kind is Kind.COUNTER:
                reset = value < s["prev"]
                delta = value if reset else value - s["prev"]
                if reset:
                    s["start"] = now
            elif kind is Kind.EVENT:
                delta = float(value != s["prev"] and value != 0)
                s["events"] += delta
            if kind is Kind.EVENT:
                events = s["events"]
            s["prev"], s["seen"] = value, now
            out.append((name, labels, value, delta, reset, s["start"], events))
        cur = {skey(n, l) for n, l, _ in samples}
        stale = self.present - cur
        self.present = cur
        for k in [k for k, s in self.state.items() if s["seen"] < now - self.evict_after_ms]:
            del self.state[k]
        return out, stale

    def down(self, now: int):
        stale, self.present = self.present, set()
        for k in [k for k, s in self.state.items() if s["seen"] < now - self.evict_after_ms]:
            del self.state[k]
        return stale


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), first=st.sampled_from(["drop", "zero", "full"]))
def test_matches_model_on_random_sequences(seed: int, first: str) -> None:
    import random

    rnd = random.Random(seed)
    universe = [(name, g, pod) for name in (ENERGY, TEMP, XID) for g in range(3) for pod in (None, "a", "b")]
    counters: Dict[Any, int] = {}
    relay = Relay(SPEC, output="both", first_observation=first, evict_after_ms=45_000)
    model = Model(first, 45_000)
    now = 0
    for step in range(14):
        now += rnd.choice((15_000, 15_000, 15_000, 30_000, 60_000))
        if rnd.random() < 0.1:
            got = relay.target_down("t", now)
            assert stale_of(got) == model.down(now)
            continue
        keep_p = rnd.choice((0.3, 0.8, 1.0))
        series = [u for u in universe if rnd.random() < keep_p]
        if rnd.random() < 0.3:
            rnd.shuffle(series)
        samples = []
        for name, g, pod in series:
            labels = {"gpu": str(g), "UUID": f"GPU-{g}"}
            if pod:
                labels["pod"] = pod
            if name == ENERGY:
                c = counters.get((g, pod), rnd.randrange(100))
                c = rnd.randrange(3) if rnd.random() < 0.1 else c + rnd.choice((0, 0, 1, 7))
                counters[(g, pod)] = c
                value = float(c)
            elif name == TEMP:
                value = float(rnd.randrange(30, 90))
            else:
                value = float(rnd.choice((0, 0, 13, 45)))
                labels["err_code"] = str(int(value))
            samples.append((name, labels, value))
        text = body(*(f'{n}{{{",".join(f"{k}={chr(34)}{v}{chr(34)}" for k, v in l.items())}}} {v}'
                      for n, l, v in samples)) if samples else b""
        b = relay.ingest(dcgmrelay.parse(text), target="t", timestamp_ms=now)
        want, want_stale = model.ingest(samples, now)
        got = [(n, l, v, d, bool(b.resets[i]), int(b.start_timestamps[i]),
                None if math.isnan(b.event_counts[i]) else float(b.event_counts[i]))
               for i, (n, l, v, _, d, _) in enumerate(b.samples())]
        assert got == want, (step, seed)
        assert stale_of(b) == want_stale
        assert relay.series_count("t") == len(model.state)
