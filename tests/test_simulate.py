"""The dcgm-exporter simulator: exposition validity, label order, value model, events,
and the recorded benchmark payloads."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dcgmrelay import fields
from dcgmrelay.simulate import DEFAULT_FIELDS, XID_MESSAGES, Pod, SimulatedNode, go_float

ROOT = Path(__file__).resolve().parent.parent
FIXED = ["gpu", "UUID", "pci_bus_id", "device", "modelName"]
MIG = ["GPU_I_PROFILE", "GPU_I_ID"]
# Real monotonic counters (the relay may delta them); NVLINK_BANDWIDTH_TOTAL is a rate
# typed counter and DCGM_EXP_*_COUNT count within a sliding window.
MONOTONIC = {156, 202, 240, 241, 310, 311, 312, 313, 390, 391, 393, 394, 409, 419, 429, 439}
ALL_COUNTERS = list(DEFAULT_FIELDS) + [
    "DCGM_FI_DEV_POWER_VIOLATION", "DCGM_FI_DEV_THERMAL_VIOLATION",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    "DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_RETIRED_DBE",
    "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "DCGM_EXP_XID_ERRORS_COUNT",
    "DCGM_EXP_CLOCK_EVENTS_COUNT",
]
_LABEL = re.compile(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"')


def samples(body: bytes) -> list[tuple[str, dict[str, str], str]]:
    """(name, labels in order, raw value) of every sample line; template bodies have no
    escapes in our label values, so a simple scan is exact."""
    out = []
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("} ")
        out.append((name, dict(_LABEL.findall(labels)), value))
    return out


def parse(body: bytes) -> list[Any]:
    return list(text_string_to_metric_families(body.decode()))


def series_key(name: str, labels: dict[str, str]) -> tuple[Any, ...]:
    return (name, labels["gpu"], labels.get("GPU_I_ID"), labels.get("pod"))


# ------------------------------------------------------------------------------------------
# go_float: prometheus/common expfmt writeFloat


@pytest.mark.parametrize("value,text", [
    (0.0, "0"), (1.0, "1"), (-1.0, "-1"), (8.969, "8.969"), (0.000008, "8e-06"),
    (128996013.0, "1.28996013e+08"), (1e6, "1e+06"), (999999.0, "999999"), (0.0001, "0.0001"),
    (0.00001, "1e-05"), (123456.5, "123456.5"), (-2.5, "-2.5"), (70.0, "70"), (1e21, "1e+21"),
    (1.5e300, "1.5e+300"), (5e-324, "5e-324"), (55491669881.0, "5.5491669881e+10"),
    (0.117468, "0.117468"), (float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"),
])
def test_go_float_examples(value: float, text: str) -> None:
    assert go_float(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_go_float_round_trips(x: float) -> None:
    s = go_float(x)
    assert float(s) == x
    assert re.fullmatch(r"-?(\d+(\.\d+)?|\d(\.\d+)?e[+-]\d{2,3})", s), s
    mant = s.lstrip("-").split("e")[0]
    assert not (("." in mant) and mant.endswith("0")), s  # shortest: no trailing zeros


# ------------------------------------------------------------------------------------------
# Every option combination parses and has dcgm-exporter's label order


def expected_order(node: SimulatedNode, name: str, labels: dict[str, str], mig: bool) -> list[str]:
    host = "hostname" if node.renderer == "expfmt" else "Hostname"
    csv_labels = sorted(n for n in node_label_fields(node))
    extra_labels = [k for k in ("window_size_in_ms", "xid", "clock_event") if k in labels]
    attrs = [k for k in ("container", "err_code", "err_msg", "namespace", "pod") if k in labels]
    return (FIXED + (MIG if mig else []) + ([host] if node.hostname is not None else [])
            + sorted(csv_labels + extra_labels) + sorted(attrs))


def node_label_fields(node: SimulatedNode) -> list[str]:
    return [f.name for f in node._label_fields]


COMBOS = list(itertools.product(
    ["template", "expfmt"],
    [0, 3],  # MIG instances
    [None, "some", "all", {0: "solo", 1: ["p1", Pod("p2", "ns2", "c2")]}],
    [0, 2],  # shared pods
    [False, True],  # xid
))


@pytest.mark.parametrize("renderer,mig,pods,shared,xid", COMBOS)
def test_combinations_parse_with_exporter_label_order(renderer: str, mig: int, pods: Any,
                                                      shared: int, xid: bool) -> None:
    if isinstance(pods, dict) and mig:
        pods = {(0, 1): "solo", (1, 3): ["p1", Pod("p2", "ns2", "c2")]}
    flds = ALL_COUNTERS + ["DCGM_FI_DEV_SERIAL", "DCGM_FI_NVML_VERSION"]
    node = SimulatedNode(2, renderer=renderer, mig_instances=mig, pods=pods, shared_pods=shared,
                         xid=xid, fields=flds, seed=3)
    owned = {(str(g), None if i is None else str(i)): {p.name for p in ps}
             for (g, i), ps in node.placement().items() if ps}
    for t in (0.0, 300.0, 3600.0):
        body = node.render(t)
        fams = parse(body)  # raises on any exposition error
        assert [f.name for f in fams] == [f for f in node.family_names if f.encode() + b"{" in body]
        for fam in fams:
            for s in fam.samples:
                labels = s.labels
                assert list(labels) == expected_order(node, s.name, labels, bool(mig)), s
                key = (labels["gpu"], labels.get("GPU_I_ID"))
                if key in owned:
                    assert labels["pod"] in owned[key]
                else:
                    assert "pod" not in labels and "container" not in labels
                assert ("err_code" in labels) == (xid and s.name == "DCGM_FI_DEV_XID_ERRORS")
                if mig:
                    assert labels["GPU_I_PROFILE"] == "2g.20gb"
                assert math.isfinite(s.value)


@pytest.mark.parametrize("opts", [
    {"hostname": None},
    {"hostname_is_pod_name": True},
    {"pods": "some", "legacy_empty_pod_labels": True},
    {"model": "Tesla T4"},
    {"model": "NVIDIA A30", "mig_instances": 4},
    {"renderer": "expfmt", "hostname_is_pod_name": True, "pods": "all"},
])
def test_more_options_parse(opts: dict[str, Any]) -> None:
    node = SimulatedNode(3, xid=True, **opts)
    body = node.render(0.0)
    fams = parse(body)
    assert fams
    for fam in fams:
        for s in fam.samples:
            assert list(s.labels) == expected_order(node, s.name, s.labels, "mig_instances" in opts)
    if opts.get("legacy_empty_pod_labels"):
        pods = {s.labels["pod"] for f in fams for s in f.samples}
        assert "" in pods and len(pods) > 1  # unowned GPUs carry empty attributes (<= 3.4.0)
    if opts.get("hostname_is_pod_name"):
        assert re.fullmatch(r"dcgm-exporter-[a-z0-9]{5}", node.hostname or "")


def test_label_values_shape() -> None:
    node = SimulatedNode(16, seed=5)
    seen_uuid = set()
    for name, labels, _ in samples(node.render(0.0)):
        g = int(labels["gpu"])
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", labels["UUID"])
        assert labels["pci_bus_id"] == f"{g // 8:08X}:{labels['pci_bus_id'][9:11]}:00.0"
        assert re.fullmatch(r"[0-9A-F]{8}:[0-9A-F]{2}:00\.0", labels["pci_bus_id"])
        assert labels["device"] == f"nvidia{g}"
        assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
        assert labels["Hostname"] == "gpu-node-0"
        assert labels["DCGM_FI_DRIVER_VERSION"] == "550.127.05"
        seen_uuid.add(labels["UUID"])
    assert len(seen_uuid) == 16
    assert SimulatedNode(16, seed=6).uuids != node.uuids


def test_default_fields_are_the_csv_active_rows() -> None:
    rows = []
    for line in (ROOT / "src" / "dcgmrelay" / "profiles" / "default-counters.csv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, ptype, help_ = (c.strip(" ") for c in line.split(",", 2))
        rows.append((name, ptype, help_))
    assert tuple(r[0] for r in rows) == DEFAULT_FIELDS
    body = SimulatedNode(1).render(0.0).decode()
    for name, ptype, help_ in rows:
        if ptype == "label":
            assert f'{name}="' in body
        else:
            assert f"# HELP {name} {help_}\n# TYPE {name} {ptype}\n" in body


def test_family_order() -> None:
    tmpl = SimulatedNode(2, fields=ALL_COUNTERS).render(0.0)
    names = [line.split()[2] for line in tmpl.decode().splitlines() if line.startswith("# TYPE")]
    ids = [fields.by_name(n).id for n in names]
    assert ids == sorted(ids) and ids[-1] == 9002  # ascending field id, DCGM_EXP_* last
    exp = SimulatedNode(2, fields=ALL_COUNTERS, renderer="expfmt").render(0.0)
    names = [line.split()[2] for line in exp.decode().splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)  # the 2026 renderer sorts families by name


def test_value_renderers() -> None:
    tmpl = samples(SimulatedNode(8, seed=2).render(600.0))
    exp = samples(SimulatedNode(8, seed=2, renderer="expfmt").render(600.0))
    assert [(n, dict(l, Hostname="")) for n, l, _ in tmpl] == [
        (n, {("Hostname" if k == "hostname" else k): ("" if k == "hostname" else v) for k, v in l.items()})
        for n, l, _ in sorted(exp, key=lambda s: (fields.by_name(s[0]).id, int(s[1]["gpu"])))
    ]
    by_key = {(n, l["gpu"]): v for n, l, v in exp}
    for name, labels, value in tmpl:
        ftype = fields.by_name(name).type
        if ftype == "double":
            assert re.fullmatch(r"\d+\.\d{6}", value), (name, value)  # %f
        else:
            assert re.fullmatch(r"\d+", value), (name, value)  # %d
        other = by_key[(name, labels["gpu"])]
        assert float(other) == float(value)  # the same number, ParseFloat'ed back
        assert other == go_float(float(value))
    assert any("e+" in v for _, _, v in exp)  # energy and PCIe bytes go exponent form


def test_expfmt_escapes_template_does_not() -> None:
    pods = {0: Pod('we"ird\\pod', "ns", "c")}
    exp = SimulatedNode(1, pods=pods, renderer="expfmt").render(0.0)
    assert b'pod="we\\"ird\\\\pod"' in exp
    assert {s.labels["pod"] for f in parse(exp) for s in f.samples} == {'we"ird\\pod'}
    tmpl = SimulatedNode(1, pods=pods).render(0.0)
    assert b'pod="we"ird\\pod"' in tmpl  # text/template writes it raw: a corrupt line, as the real one


def test_xid_labels() -> None:
    node = SimulatedNode(8, xid=True)
    fams = {f.name: f for f in parse(node.render(0.0))}
    xids = fams["DCGM_FI_DEV_XID_ERRORS"].samples
    msgs = {s.labels["err_msg"] for s in xids}
    assert XID_MESSAGES[45] in msgs and any(":" in m and "(" in m for m in msgs)
    for s in xids:
        assert s.labels["err_code"] == str(int(s.value))
        assert s.labels["err_msg"] == XID_MESSAGES.get(int(s.value), "Unknown Error")
    plain = {f.name: f for f in parse(SimulatedNode(8).render(0.0))}["DCGM_FI_DEV_XID_ERRORS"]
    assert all(s.value == 0 and "err_code" not in s.labels for s in plain.samples)


def test_exp_families() -> None:
    node = SimulatedNode(4, xid=True, fields=ALL_COUNTERS)
    for t in range(0, 3600, 15):
        body = node.render(float(t))
    fams = {f.name: f for f in parse(body)}
    for name, key in (("DCGM_EXP_XID_ERRORS_COUNT", "xid"), ("DCGM_EXP_CLOCK_EVENTS_COUNT", "clock_event")):
        ss = fams[name].samples
        assert all(s.labels["window_size_in_ms"] == "300000" for s in ss)
        for s in ss:
            assert (key in s.labels) == (s.value > 0)
    events = {s.labels.get("clock_event") for s in fams["DCGM_EXP_CLOCK_EVENTS_COUNT"].samples}
    assert "gpu_idle" in events or "power_cap" in events


def test_label_columns() -> None:
    flds = list(DEFAULT_FIELDS) + ["DCGM_FI_DEV_SERIAL", "DCGM_FI_DEV_MIG_GI_INFO",
                                   ("DCGM_FI_DEV_MINOR_NUMBER", "label", "Minor number")]
    _, labels, _ = samples(SimulatedNode(2, fields=flds).render(0.0))[1]
    assert list(labels)[6:] == ["DCGM_FI_DEV_MIG_GI_INFO", "DCGM_FI_DEV_MINOR_NUMBER",
                                "DCGM_FI_DEV_SERIAL", "DCGM_FI_DRIVER_VERSION"]
    assert labels["DCGM_FI_DEV_MIG_GI_INFO"] == "ERROR - FAILED TO CONVERT TO STRING"  # binary field
    assert labels["DCGM_FI_DEV_MINOR_NUMBER"] == "1"
    assert re.fullmatch(r"\d{13}", labels["DCGM_FI_DEV_SERIAL"])


def test_field_specs() -> None:
    node: SimulatedNode = SimulatedNode(1, fields=[("DCGM_FI_PROF_PCIE_TX_BYTES", "counter", "PCIe tx"),
                                    "DCGM_FI_DEV_GPU_TEMP_CELSIUS", "dcgm_sm_clock"])
    body = node.render(0.0).decode()
    assert "# TYPE DCGM_FI_PROF_PCIE_TX_BYTES counter\n" in body  # a mis-typed rate, as users write
    assert body.index("dcgm_sm_clock{") < body.index("DCGM_FI_DEV_GPU_TEMP_CELSIUS{")  # id 100 < 150
    with pytest.raises(ValueError):
        SimulatedNode(1, fields=["DCGM_FI_DEV_SERIAL", "DCGM_FI_DEV_SERIAL"])
    with pytest.raises(ValueError):
        SimulatedNode(1, fields=[("DCGM_FI_DEV_SERIAL", "gauge", "x")])
    with pytest.raises(KeyError):
        SimulatedNode(1, fields=["DCGM_FI_NOT_A_FIELD"])


# ------------------------------------------------------------------------------------------
# Determinism, collect interval, value model


@pytest.mark.parametrize("opts", [{}, {"renderer": "expfmt", "mig_instances": 7, "pods": "some"},
                                  {"shared_pods": 3, "xid": True}])
def test_deterministic(opts: dict[str, Any]) -> None:
    def run(seed: int) -> list[bytes]:
        node = SimulatedNode(4, seed=seed, **opts)
        return [node.render(t) for t in (0.0, 15.0, 30.0, 95.0, 7200.0)]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_identical_within_collect_interval() -> None:
    node = SimulatedNode(8, pods="some", xid=True)
    a = node.render(30.0)
    assert node.render(45.0) == a and node.render(59.999) == a
    b = node.render(60.0)
    assert b != a and node.render(75.0) == b
    node5 = SimulatedNode(2, collect_interval=5.0)
    assert node5.render(0.0) != node5.render(5.0)
    with pytest.raises(ValueError):
        node.render(10.0)  # time went backwards


def test_values_plausible() -> None:
    node = SimulatedNode(16, seed=11)
    spec_fb = 81559
    for t in range(0, 7200, 30):
        vals: dict[tuple[str, str], float] = {}
        for name, labels, v in samples(node.render(float(t))):
            vals[(name, labels["gpu"])] = float(v)
        for g in map(str, range(16)):
            v = lambda n: vals[(f"DCGM_FI_DEV_{n}", g)]  # noqa: E731
            assert v("FB_USED") + v("FB_FREE") + v("FB_RESERVED") == spec_fb
            assert 0 <= v("GPU_UTIL") <= 100 and 0 <= v("MEM_COPY_UTIL") <= 100
            assert 20 <= v("GPU_TEMP") <= 95 and v("MEMORY_TEMP") >= v("GPU_TEMP")
            assert 60 <= v("POWER_USAGE") <= 700
            assert v("SM_CLOCK") in (345,) or 1700 <= v("SM_CLOCK") <= 1980
            assert 0 <= vals[("DCGM_FI_PROF_GR_ENGINE_ACTIVE", g)] <= 1
    utils = [vals[("DCGM_FI_DEV_GPU_UTIL", str(g))] for g in range(16)]
    assert max(utils) > 50  # some GPUs are busy ...
    assert min(utils) < 10  # ... and some idle


def test_energy_integrates_power() -> None:
    node = SimulatedNode(1, seed=4)
    e = []
    for t in (0.0, 30.0, 60.0):
        v = {n: float(x) for n, _, x in samples(node.render(t))}
        e.append((v["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"], v["DCGM_FI_DEV_POWER_USAGE"]))
    assert e[1][0] - e[0][0] == pytest.approx(e[1][1] * 30 * 1000, abs=1)
    assert e[2][0] - e[1][0] == pytest.approx(e[2][1] * 30 * 1000, abs=1)


def test_rates_go_up_and_down() -> None:
    node = SimulatedNode(2, seed=1)
    seen: dict[str, list[float]] = {}
    for t in range(0, 1800, 30):
        for name, labels, v in samples(node.render(float(t))):
            if labels["gpu"] == "0":
                seen.setdefault(name, []).append(float(v))
    for name in ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"):
        d = [b - a for a, b in zip(seen[name], seen[name][1:])]
        assert any(x < 0 for x in d) and any(x > 0 for x in d), name


def test_counters_monotonic_except_after_reset() -> None:
    node = SimulatedNode(32, fields=ALL_COUNTERS, pods="some", xid=True, seed=9)
    last: dict[tuple[Any, ...], float] = {}
    increased: set[str] = set()
    reset_done = False
    for step, t in enumerate(range(0, 30 * 400, 30)):
        if step == 150:
            node.restart_exporter()  # counters come from the driver: unaffected
            node.remove_gpu(3)
        if step == 160:
            node.restore_gpu(3)
        if step == 200:
            node.reset_counters(5)
            reset_done = True
        cur = {}
        for name, labels, v in samples(node.render(float(t))):
            if fields.by_name(name).id in MONOTONIC:
                cur[series_key(name, labels)] = float(v)
        for k, v in cur.items():
            if k in last:
                if reset_done and k[1] == "5":
                    assert v <= last[k]  # restarted near 0 (persistent ones unchanged)
                else:
                    assert v >= last[k], (t, k, last[k], v)
                if v > last[k]:
                    increased.add(k[0])
        if reset_done:
            energy = [v for k, v in cur.items() if k[:2] == ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "5")]
            assert len(energy) == 1 and energy[0] < 700 * 30 * 1000  # under one tick at full power
            reset_done = False
        last = cur
    # besides energy, the rare error counters do move in 400 ticks × 32 GPUs
    assert {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"} <= increased


def test_long_gap_is_cheap_and_monotonic() -> None:
    node = SimulatedNode(64)
    a = {k: v for n, l, v in samples(node.render(0.0)) if (k := series_key(n, l))}
    t0 = time.perf_counter()
    b = {k: v for n, l, v in samples(node.render(30 * 86400.0)) if (k := series_key(n, l))}
    assert time.perf_counter() - t0 < 5
    e = [k for k in a if k[0] == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    assert all(float(b[k]) > float(a[k]) + 60 * 30 * 86400 * 1000 for k in e)  # > 60 W for 30 days


# ------------------------------------------------------------------------------------------
# MIG, shared pods, events


def count(body: bytes, name: str) -> int:
    return sum(1 for n, _, _ in samples(body) if n == name)


def test_mig_series() -> None:
    node = SimulatedNode(8, mig_instances=7, pods="all")
    body = node.render(0.0)
    assert count(body, "DCGM_FI_DEV_FB_USED") == 56
    assert count(body, "DCGM_FI_DEV_POWER_USAGE") == 56  # device-level value repeated per instance
    assert b"DCGM_FI_DEV_GPU_UTIL" not in body  # unsupported on MIG: no family at all
    ss = [l for n, l, _ in samples(body) if n == "DCGM_FI_DEV_FB_USED"]
    assert [(l["gpu"], l["GPU_I_ID"]) for l in ss] == [(str(g), str(i)) for g in range(8) for i in range(1, 8)]
    assert {l["GPU_I_PROFILE"] for l in ss} == {"1g.10gb"}
    fb = [(float(v), l["GPU_I_ID"]) for n, l, v in samples(body) if n in ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED")]
    assert len(fb) == 112
    for n, want in ((1, "7g.80gb"), (2, "3g.40gb"), (3, "2g.20gb")):
        assert {l["GPU_I_PROFILE"] for _, l, _ in samples(SimulatedNode(1, mig_instances=n).render(0.0))} == {want}
    with pytest.raises(ValueError):
        SimulatedNode(1, mig_instances=8)
    with pytest.raises(ValueError):
        SimulatedNode(1, model="Tesla T4", mig_instances=1)


def test_shared_pod_series() -> None:
    node = SimulatedNode(8, shared_pods=4)
    body = node.render(0.0)
    ss = [(l, v) for n, l, v in samples(body) if n == "DCGM_FI_DEV_GPU_TEMP"]
    assert len(ss) == 32
    for g in range(8):
        mine = [(l, v) for l, v in ss if l["gpu"] == str(g)]
        assert len({l["pod"] for l, _ in mine}) == 4
        assert len({v for _, v in mine}) == 1  # identical value, different pod labels
    assert count(SimulatedNode(2, mig_instances=3, shared_pods=2).render(0.0), "DCGM_FI_DEV_FB_USED") == 12
    assert len({l["pod"] for l, _ in ss}) == 32


def test_remove_restore_gpu() -> None:
    node = SimulatedNode(4, seed=1)
    node.render(0.0)
    node.remove_gpu(2)
    body = node.render(30.0)
    assert {l["gpu"] for _, l, _ in samples(body)} == {"0", "1", "3"}
    node.restore_gpu(2)
    ss = samples(node.render(60.0))
    assert {l["gpu"] for _, l, _ in ss} == {"0", "1", "2", "3"}
    assert {l["UUID"] for _, l, _ in ss if l["gpu"] == "2"} == {node.uuids[2]}


def test_reconfigure_mig() -> None:
    node = SimulatedNode(2, mig_instances=7)
    node.render(0.0)
    node.reconfigure_mig(0, 3)
    ids = {(l["gpu"], l["GPU_I_ID"], l["GPU_I_PROFILE"]) for _, l, _ in samples(node.render(30.0))}
    assert {i for g, i, _ in ids if g == "0"} == {"8", "9", "10"}  # new GPU_I_IDs
    assert {p for g, _, p in ids if g == "0"} == {"2g.20gb"}
    assert {i for g, i, _ in ids if g == "1"} == {str(i) for i in range(1, 8)}
    node.reconfigure_mig(0, 0)
    ss = samples(node.render(60.0))
    assert any(l["gpu"] == "0" and "GPU_I_ID" not in l for _, l, _ in ss)
    assert any(n == "DCGM_FI_DEV_GPU_UTIL" and l["gpu"] == "0" for n, l, _ in ss)  # whole GPU again
    assert node.mig_instances(0) == [] and node.mig_instances(1) == list(range(1, 8))


def test_move_pod() -> None:
    node = SimulatedNode(4, pods={0: "alpha", 1: "beta"})
    node.render(0.0)
    node.move_pod("alpha", 3)
    pods = {l["gpu"]: l.get("pod") for n, l, _ in samples(node.render(30.0)) if n == "DCGM_FI_DEV_GPU_TEMP"}
    assert pods == {"0": None, "1": "beta", "2": None, "3": "alpha"}
    with pytest.raises(KeyError):
        node.move_pod("nope", 1)
    mig = SimulatedNode(2, mig_instances=2, pods={(0, 1): "gamma"})
    mig.move_pod("gamma", 1, gi_id=2)
    assert mig.placement()[(1, 2)] == [Pod("gamma")]


def test_restart_exporter() -> None:
    node = SimulatedNode(2, hostname_is_pod_name=True, xid=True)
    before = samples(node.render(0.0))
    old = node.hostname
    node.restart_exporter()
    after = samples(node.render(0.0))
    assert node.hostname != old and {l["Hostname"] for _, l, _ in after} == {node.hostname}
    for (n1, l1, v1), (n2, l2, v2) in zip(before, after):
        assert n1 == n2
        if n1 == "DCGM_FI_DEV_XID_ERRORS":
            assert v2 == "0"  # the last XID starts over with the exporter
        else:
            assert v1 == v2  # counters keep their values
    steady = SimulatedNode(1)
    steady.restart_exporter()
    assert {l["Hostname"] for _, l, _ in samples(steady.render(0.0))} == {"gpu-node-0"}


def test_render_1024_gpus_is_fast() -> None:
    node = SimulatedNode(1024, pods="some", xid=True)
    node.render(0.0)
    t0 = time.perf_counter()
    body = node.render(30.0)
    assert time.perf_counter() - t0 < 2.0
    assert count(body, "DCGM_FI_DEV_GPU_TEMP") == 1024


# ------------------------------------------------------------------------------------------
# The recorded payloads are what tools/gen_payloads.py produces now


def _gen_payloads() -> Any:
    spec = importlib.util.spec_from_file_location("gen_payloads", ROOT / "tools" / "gen_payloads.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_payloads_are_current() -> None:
    gen = _gen_payloads()
    bodies = gen.build()
    wanted = gen.files(bodies)
    out = ROOT / "benchmarks" / "payloads"
    assert sorted(p.name for p in out.iterdir()) == sorted(wanted)
    for name, data in wanted.items():
        got = (out / name).read_bytes()
        if name.endswith(".gz"):
            # Compare bodies: another zlib build may compress the same body differently.
            assert got[4:8] == b"\0\0\0\0"  # mtime 0
            assert len(got) < len(bodies[name.split(".")[0]]) and gzip.decompress(got) == gzip.decompress(data)
        else:
            assert got == data, f"{name} is stale: run python tools/gen_payloads.py"
    for name, body in bodies.items():
        assert name + (".prom.gz" if len(body) > 1_000_000 else ".prom") in wanted
        parse(body)
