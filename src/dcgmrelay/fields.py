"""The DCGM field table: every field id with its names, type, entity level and unit.

One field reaches us under several metric names: the DCGM 4.6 canonical name
(``DCGM_FI_DEV_GPU_TEMP_CELSIUS``), the pre-4.6 name that dcgm-exporter renders
(``DCGM_FI_DEV_GPU_TEMP``) and the dcgm-exporter 1.x name (``dcgm_gpu_temp``).
All of them resolve to the same id::

    >>> from dcgmrelay import fields
    >>> fields.by_name("DCGM_FI_DEV_GPU_TEMP").id
    150
    >>> fields.by_name("dcgm_gpu_temp") is fields.by_id(150)
    True

The table is generated from DCGM's own header by ``tools/gen_fields.py``; the
dcgm-exporter synthesised fields ``DCGM_EXP_*`` (9001-9004) are included.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from ._fields_data import FIELDS as _ROWS
from .errors import UnknownFieldError

__all__ = ["Field", "NOT_A_FIELD", "all_fields", "by_id", "by_name", "get", "id_of"]

#: The field id given to a metric that is not a DCGM field (``go_*``, ``up`` ...).
NOT_A_FIELD = -1


class Field(NamedTuple):
    """One DCGM field."""

    id: int
    #: DCGM 4.6 canonical name, e.g. ``DCGM_FI_DEV_GPU_TEMP_CELSIUS``.
    name: str
    #: The name dcgm-exporter renders as the metric name (pre-4.6), e.g. ``DCGM_FI_DEV_GPU_TEMP``.
    exporter_name: str
    #: DCGM value type: ``int64``, ``double``, ``string``, ``binary`` or ``unknown``.
    type: str
    #: DCGM entity level: ``GPU``, ``GPU_I``, ``GPU_CI``, ``LINK``, ``SWITCH``, ``CPU``, ``CPU_CORE``,
    #: ``VGPU``, ``CONNECTX``, ``global`` (empty when DCGM does not say).
    entity: str
    #: Unit as DCGM states it (``C``, ``W``, ``mJ``, ``MB/s`` ...), empty when none.
    unit: str
    description: str
    #: Every name that resolves to this id.
    names: tuple[str, ...]


_BY_ID: dict[int, Field] = {}
_BY_NAME: dict[str, Field] = {}
for _row in _ROWS:
    _f = Field(*_row)
    _BY_ID[_f.id] = _f
    for _n in _f.names:
        _BY_NAME[_n] = _f
del _row, _f, _n


def by_name(name: str) -> Field:
    """The field a metric or CSV name denotes; raises :class:`UnknownFieldError`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownFieldError(f"unknown DCGM field name {name!r}") from None


def by_id(field_id: int) -> Field:
    """The field with this id; raises :class:`UnknownFieldError`."""
    try:
        return _BY_ID[field_id]
    except KeyError:
        raise UnknownFieldError(f"unknown DCGM field id {field_id}") from None


def get(name: str) -> Field | None:
    """Like :func:`by_name`, but ``None`` for an unknown name."""
    return _BY_NAME.get(name)


def id_of(name: str) -> int:
    """The field id of a metric name, or :data:`NOT_A_FIELD` (-1)."""
    f = _BY_NAME.get(name)
    return NOT_A_FIELD if f is None else f.id


def all_fields() -> Iterator[Field]:
    """Every field, in id order."""
    return iter(_BY_ID.values())
