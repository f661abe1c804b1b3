"""The built-in metric-kind table: derived from the field table, exact for the profiles' fields."""

from __future__ import annotations

import collections

import pytest

from dcgmrelay import fields
from dcgmrelay.errors import UnknownFieldError
from dcgmrelay.kinds import BUILTIN_KINDS, OVERRIDES, Kind, builtin_kind, derive_kind

G, C, R, E, L = Kind.GAUGE, Kind.COUNTER, Kind.RATE, Kind.EVENT, Kind.LABEL

# Every field named by an active row of the built-in profiles (default/dcp, whatap, 1.x),
# with the kind the relay must give it. Written out by hand on purpose: this is the
# contract, the rules in kinds.py are the implementation.
PROFILE_FIELD_KINDS = {
    # default-counters.csv / dcp-metrics-included.csv
    100: G,  # SM_CLOCK
    101: G,  # MEM_CLOCK
    140: G,  # MEMORY_TEMP
    150: G,  # GPU_TEMP
    155: G,  # POWER_USAGE
    156: C,  # TOTAL_ENERGY_CONSUMPTION (mJ since driver load)
    202: C,  # PCIE_REPLAY_COUNTER
    203: G,  # GPU_UTIL
    204: G,  # MEM_COPY_UTIL
    206: G,  # ENC_UTIL
    207: G,  # DEC_UTIL
    230: E,  # XID_ERRORS: last XID number
    251: G,  # FB_FREE
    252: G,  # FB_USED
    253: G,  # FB_RESERVED
    449: R,  # NVLINK_BANDWIDTH_TOTAL: typed counter, really MiB/s
    526: G,  # VGPU_LICENSE_STATUS
    393: C,  # UNCORRECTABLE_REMAPPED_ROWS
    394: C,  # CORRECTABLE_REMAPPED_ROWS
    395: G,  # ROW_REMAP_FAILURE (flag)
    1: L,  # DRIVER_VERSION
    1001: G,  # PROF_GR_ENGINE_ACTIVE
    1004: G,  # PROF_PIPE_TENSOR_ACTIVE
    1005: G,  # PROF_DRAM_ACTIVE
    1009: R,  # PROF_PCIE_TX_BYTES: bytes/s
    1010: R,  # PROF_PCIE_RX_BYTES
    # whatap.csv (besides the above)
    2: L,  # NVML_VERSION
    50: L,  # DEV_NAME
    53: L,  # SERIAL
    54: L,  # UUID
    65: G,  # COMPUTE_MODE (int; a label only because the CSV says so)
    66: G,  # PERSISTENCE_MODE
    500: G,  # VIRTUAL_MODE
    67: G,  # MIG_MODE
    69: G,  # MIG_MAX_SLICES
    76: L,  # MIG_GI_INFO (binary)
    77: L,  # MIG_CI_INFO (binary)
    190: G,  # PSTATE
    250: G,  # FB_TOTAL: capacity, despite the _TOTAL suffix
    254: G,  # FB_USED_PERCENT
    312: C,  # ECC_SBE_AGG_TOTAL
    313: C,  # ECC_DBE_AGG_TOTAL
    1002: G,  # PROF_SM_ACTIVE
    1003: G,  # PROF_SM_OCCUPANCY
    # 1.x-compatibility-metrics.csv adds no field the others lack.
    # Commented-out suggestions in the shipped CSVs, so enabling them is safe too:
    240: C, 241: C, 242: C, 243: C, 244: C, 245: C,  # *_VIOLATION (ns)
    310: C, 311: C,  # ECC SBE/DBE volatile
    390: C, 391: C,  # RETIRED_SBE/DBE
    392: G,  # RETIRED_PENDING: a 0/1 flag per DCGM
    409: C, 419: C, 429: C, 439: C,  # NVLink CRC flit/data, replay, recovery totals
    440: R,  # NVLINK_BANDWIDTH_L0
    1006: G, 1007: G, 1008: G,  # PROF_PIPE_FP64/32/16_ACTIVE
    1011: R, 1012: R,  # PROF_NVLINK_TX/RX_BYTES
    9001: G, 9002: G, 9003: G, 9004: G,  # DCGM_EXP_*: windowed counts and statuses
    51: L, 56: L, 80: L, 81: L, 82: L, 85: L,  # BRAND, *_INFOROM_VER, VBIOS_VERSION
}


def test_kind_values_are_stable() -> None:
    # Stored in int8 arrays by the relay: the numbers are part of the format.
    assert [(k.name, int(k)) for k in Kind] == [("GAUGE", 0), ("COUNTER", 1), ("RATE", 2), ("EVENT", 3), ("LABEL", 4)]


@pytest.mark.parametrize("field_id, kind", sorted(PROFILE_FIELD_KINDS.items()))
def test_profile_fields_have_the_expected_kind(field_id: int, kind: Kind) -> None:
    assert builtin_kind(field_id) is kind, fields.by_id(field_id).exporter_name


def test_table_covers_every_field() -> None:
    ids = [f.id for f in fields.all_fields()]
    assert sorted(BUILTIN_KINDS) == sorted(ids)
    assert all(isinstance(k, Kind) for k in BUILTIN_KINDS.values())


def test_table_summary() -> None:
    # A regenerated field table may shift these; look at what moved before updating.
    counts = collections.Counter(BUILTIN_KINDS.values())
    assert counts == {G: 253, C: 225, R: 114, L: 59, E: 3}


def test_labels_are_exactly_the_string_and_binary_fields() -> None:
    for f in fields.all_fields():
        assert (BUILTIN_KINDS[f.id] is L) == (f.type in ("string", "binary")), f.name


def test_counter_families() -> None:
    # Per-location ECC counts, volatile and aggregate.
    for fid in range(310, 346):
        assert builtin_kind(fid) is C, fid
    # NVLink per-lane error counters: every field 400-499 is an error counter, a
    # bandwidth (rate) or one of the two odd ones (450 error info, 490 absent).
    for fid in range(400, 500):
        if fid not in BUILTIN_KINDS:
            continue
        name = fields.by_id(fid).exporter_name
        if "BANDWIDTH" in name:
            assert builtin_kind(fid) is R, name
        elif "ERROR_COUNT" in name or "ERROR_DL" in name:
            assert builtin_kind(fid) is C, name
    assert builtin_kind(1611) is C  # GPU_ENERGY_JOULES_TOTAL (DCGM 4.6.1)
    assert builtin_kind(246) is C and builtin_kind(247) is C  # *_CLOCKS_VIOLATION
    assert all(builtin_kind(i) is C for i in range(1420, 1425))  # clock-event-reason ns
    assert builtin_kind(1091) is C and builtin_kind(1092) is C  # PROF_PCIE_*_BYTES_TOTAL: cumulative


def test_rate_families() -> None:
    for name in (
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_NVLINK_BANDWIDTH_L17",
        "DCGM_FI_DEV_NVLINK_TX_BANDWIDTH_TOTAL", "DCGM_FI_DEV_NVLINK_RX_BANDWIDTH_L3",
        "DCGM_FI_PROF_NVLINK_L0_TX_BYTES", "DCGM_FI_PROF_NVLINK_L17_RX_BYTES",
        "DCGM_FI_PROF_NVLINK_TX_BYTES_PER_LINK", "DCGM_FI_DEV_NVLINK_THROUGHPUT_PER_LINK",
    ):
        assert builtin_kind(fields.by_name(name).id) is R, name
    # Bytes that are sizes, not traffic.
    for name in ("DCGM_FI_DEV_BAR1_USED_BYTES", "DCGM_FI_DEV_BAR1_CAPACITY_BYTES"):
        assert builtin_kind(fields.by_name(name).id) is G, name


def test_events() -> None:
    assert {i for i, k in BUILTIN_KINDS.items() if k is E} == {230, 856, 857}


def test_every_name_of_a_field_gives_the_same_kind() -> None:
    for name in ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_XID_ERROR", "dcgm_xid_errors"):
        assert builtin_kind(fields.by_name(name).id) is E
    for name in ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_NVLINK_THROUGHPUT_TOTAL", "dcgm_nvlink_bandwidth_total"):
        assert builtin_kind(fields.by_name(name).id) is R


def test_every_override_is_a_real_exception() -> None:
    # An override that agrees with the rules is noise; one for a missing id is stale.
    for fid, kind in OVERRIDES.items():
        assert fid in BUILTIN_KINDS, fid
        assert derive_kind(fields.by_id(fid)) is not kind, fid
        assert BUILTIN_KINDS[fid] is kind
    assert len(OVERRIDES) <= 10


def _field(name: str, type_: str = "int64", *aliases: str) -> fields.Field:
    return fields.Field(99999, name, aliases[0] if aliases else name, type_, "GPU", "", "", (name, *aliases))


@pytest.mark.parametrize(
    "field, kind",
    [
        (_field("DCGM_FI_DEV_NEW_THING", "string"), L),
        (_field("DCGM_FI_DEV_NEW_THING", "binary"), L),
        (_field("DCGM_FI_DEV_NEW_THING", "double"), G),
        (_field("DCGM_FI_DEV_NEW_VIOLATION"), C),
        (_field("DCGM_FI_DEV_NEW_EVENTS_TOTAL"), C),
        (_field("DCGM_FI_DEV_NEW_ERROR_TOTAL", "int64", "DCGM_FI_DEV_NEW_ERROR_COUNT_L3"), C),
        (_field("DCGM_FI_DEV_NEW_THROUGHPUT_TOTAL"), R),
        (_field("DCGM_FI_PROF_NEW_TX_BYTES"), R),
        (_field("DCGM_FI_PROF_NEW_TX_BYTES_TOTAL"), C),
        (_field("DCGM_FI_DEV_NEW_BYTES"), G),
        (_field("DCGM_FI_DEV_NEW_THING", "unknown"), G),
        # _TOTAL only counts on the canonical name, not on an older alias.
        (_field("DCGM_FI_DEV_NEW_THING", "int64", "DCGM_FI_DEV_NEW_THING_TOTAL"), G),
    ],
)
def test_rules_classify_new_fields(field: fields.Field, kind: Kind) -> None:
    assert derive_kind(field) is kind


def test_builtin_kind_unknown_id() -> None:
    with pytest.raises(UnknownFieldError):
        builtin_kind(4242)
    with pytest.raises(KeyError):
        builtin_kind(-1)


@pytest.mark.parametrize(
    "value, kind",
    [(Kind.RATE, R), ("rate", R), (" COUNTER ", C), ("Event", E), (0, G), (4, L)],
)
def test_kind_parse(value: object, kind: Kind) -> None:
    assert Kind.parse(value) is kind  # type: ignore[arg-type]


@pytest.mark.parametrize("value, exc", [("delta", ValueError), (7, ValueError), (1.0, TypeError), (True, TypeError)])
def test_kind_parse_rejects(value: object, exc: type) -> None:
    with pytest.raises(exc):
        Kind.parse(value)  # type: ignore[arg-type]
