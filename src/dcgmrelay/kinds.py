"""What a DCGM field's value *means*, decided per field id rather than by ``# TYPE``.

dcgm-exporter's ``# TYPE`` line comes from the collectors CSV, and the CSVs in
the wild get it wrong: ``DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL`` is typed
``counter`` but is a MiB/s rate that goes down (dcgm-exporter #417),
``DCGM_FI_PROF_PCIE_*_BYTES`` are bytes/s rates that old CSVs and WhaTap's
call counters, and ``DCGM_FI_DEV_XID_ERRORS`` is the number of the *last* XID,
not a count. The relay needs to know which values it may turn into deltas, so
every field id gets a :class:`Kind`:

``GAUGE``    a level; relayed as is.
``COUNTER``  truly monotonic (resets only on driver reload / GPU reset); safe to delta.
``RATE``     a per-second rate, whatever the CSV says; never delta'd.
``EVENT``    last-value event code: a *change* of value is a new event (XID, SXID).
``LABEL``    a string/blob attribute; only useful as a label, never a sample value.

The table is derived from the field table (DCGM type and names) by a few name
rules, with a short dict of explicit exceptions, so that new fields from a
regenerated field table are classified without hand edits::

    >>> from dcgmrelay.kinds import Kind, builtin_kind
    >>> builtin_kind(449) is Kind.RATE        # NVLINK_BANDWIDTH_TOTAL
    True
    >>> builtin_kind(230) is Kind.EVENT       # XID_ERRORS
    True
"""

from __future__ import annotations

import enum
import re
from typing import Dict, Mapping, Pattern, Tuple

from . import fields
from .errors import UnknownFieldError

__all__ = ["BUILTIN_KINDS", "Kind", "OVERRIDES", "builtin_kind", "derive_kind"]


class Kind(enum.IntEnum):
    """How the relay treats a field's values. The int values are stored in int8 arrays: keep them."""

    GAUGE = 0
    COUNTER = 1
    RATE = 2
    EVENT = 3
    LABEL = 4

    @classmethod
    def parse(cls, value: "Kind | str | int") -> "Kind":
        """``Kind.COUNTER``, ``"counter"``/``"COUNTER"`` or ``1`` -> ``Kind.COUNTER``; ValueError otherwise."""
        if isinstance(value, Kind):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                allowed = ", ".join(k.name.lower() for k in cls)
                raise ValueError(f"unknown metric kind {value!r}; expected one of {allowed}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        raise TypeError(f"a metric kind must be a Kind, str or int, not {type(value).__name__}")


# --- derivation rules -------------------------------------------------------------------
# Matched against every upper-case name of a field (DCGM 4.6 canonical, pre-4.6 exporter
# name, 1.x alias), so a rule written for one naming generation catches the others.
# Order matters: RATE is tested before COUNTER because the 4.6 naming standard calls the
# lane sums of bandwidth fields "..._THROUGHPUT_TOTAL" although they are MB/s rates.

_RATE_RULES: Tuple[Pattern[str], ...] = (
    # NVLink / PCIe / NVSwitch throughput and bandwidth fields are MB/s or KB/s rates.
    re.compile(r"THROUGHPUT|BANDWIDTH"),
    # Profiling (GPM/DCP) byte fields are bytes per second over the sample period; the
    # cumulative variants are the separate *_BYTES_TOTAL fields (1091/1092).
    re.compile(r"^DCGM_FI_PROF_\w*_BYTES(_PER_LINK)?$"),
)

_COUNTER_RULES: Tuple[Pattern[str], ...] = (
    # Throttle time in ns since driver load (240-247).
    re.compile(r"_VIOLATION$"),
    # Clock-event-reason durations in ns, the newer form of the violation counters.
    re.compile(r"^DCGM_FI_DEV_CLOCKS_EVENT_REASON_\w+_NS$"),
    # Single/double-bit ECC error counts, total and per location; not ECC_MODE/ECC_PENDING.
    re.compile(r"ECC_[SD]BE_"),
    # Pre-4.6 names of the NVLink CRC/replay/recovery error counters (..._ERROR_COUNT_L0).
    re.compile(r"_ERROR_COUNT"),
    # Retired pages (390/391; 392 is an exception below).
    re.compile(r"RETIRED_"),
    # Remapped rows (393/394); ROW_REMAP_FAILURE/PENDING are flags and do not match.
    re.compile(r"REMAPPED_ROWS"),
    # Energy since driver load (156 in mJ, 1611 in J).
    re.compile(r"ENERGY"),
)

# The DCGM 4.6 field-naming standard gives monotonic counters a _TOTAL suffix
# (PCIE_REPLAY_TOTAL, PAGE_RETIRED_SBE_TOTAL, *_CYCLES_ACTIVE_TOTAL ...). Tested on the
# canonical name only: older names and 1.x aliases (dcgm_nvlink_bandwidth_total) use
# "total" loosely. The exceptions (capacities) are in OVERRIDES.
_CANONICAL_COUNTER_RULE: Pattern[str] = re.compile(r"^DCGM_FI_\w+_TOTAL$")


def derive_kind(field: fields.Field) -> Kind:
    """The kind the rules give ``field``, before :data:`OVERRIDES`."""
    if field.type in ("string", "binary"):
        return Kind.LABEL
    names = {n.upper() for n in (field.name, field.exporter_name, *field.names)}
    for rule in _RATE_RULES:
        if any(rule.search(n) for n in names):
            return Kind.RATE
    for rule in _COUNTER_RULES:
        if any(rule.search(n) for n in names):
            return Kind.COUNTER
    if _CANONICAL_COUNTER_RULE.search(field.name):
        return Kind.COUNTER
    return Kind.GAUGE


#: Exceptions to the rules, by field id. Each says why.
OVERRIDES: Mapping[int, Kind] = {
    # XID_ERRORS: the value is the number of the last XID, kept until driver reload
    # (dcgm-exporter #190, #500); a change of value means a new XID.
    230: Kind.EVENT,
    # NVSwitch SXID fatal / non-fatal: like XID, "value field indicates the specific
    # SXid reported".
    856: Kind.EVENT,
    857: Kind.EVENT,
    # BAR1_TOTAL / FB_TOTAL: "total" means capacity (MB), not a running count.
    90: Kind.GAUGE,
    250: Kind.GAUGE,
    # RETIRED_PENDING: DCGM documents a 0/1 flag ("whether any pages are pending
    # retirement"), although dcgm-exporter's CSVs comment it as a counter; a flag going
    # 1 -> 0 must not look like a counter reset.
    392: Kind.GAUGE,
    # C2C_MAX_BANDWIDTH: the link speed in MB/s, a static capability, not a traffic rate.
    287: Kind.GAUGE,
}
# Not overrides because no rule matches them, but worth saying: DCGM_EXP_XID_ERRORS_COUNT
# and DCGM_EXP_CLOCK_EVENTS_COUNT (9001/9002) are GAUGE although the CSVs type them
# counter: they count events inside a sliding window (default 5 min) and fall again.


def _build() -> Dict[int, Kind]:
    table = {f.id: derive_kind(f) for f in fields.all_fields()}
    for fid, kind in OVERRIDES.items():
        if fid in table:  # an override for a field the table dropped is simply moot
            table[fid] = kind
    return table


#: Field id -> Kind, for every field id of :mod:`dcgmrelay.fields`.
BUILTIN_KINDS: Mapping[int, Kind] = _build()


def builtin_kind(field_id: int) -> Kind:
    """The built-in kind of a DCGM field id; :class:`UnknownFieldError` for an unknown id."""
    try:
        return BUILTIN_KINDS[field_id]
    except KeyError:
        raise UnknownFieldError(f"unknown DCGM field id {field_id}") from None
