"""Pure-Python twin of the native encoder loops (``_encode.pyx``): byte-identical output.

These are the per-sample loops of the encoders; everything per *series* (label bytes,
symbol references, escaped text prefixes) is computed once and cached by
:class:`dcgmrelay.encode.Encoder`, which hands the loops flat buffers:

* a CSR table of per-series bytes: ``buf[off[s]:off[s + 1]]`` is series ``s``'s piece,
* per-sample columns: series id, value, timestamp (and start timestamp),

and gets back the body. The selector in :mod:`dcgmrelay.encode` picks the native module
unless ``DCGMRELAY_NO_EXTENSIONS`` is set (or it is not built).

Protobuf fields are written in field-number order and fields holding their proto3
default (0, 0.0 with all bits zero, empty) are left out, as the official runtime does,
so a body decoded and re-serialised by the protobuf runtime gives the same bytes.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    # What the loops take (the native ones need C-contiguous arrays of exactly these dtypes).
    Bytes = Union[bytes, bytearray, memoryview]
    I64 = npt.NDArray[np.int64]
    U32 = npt.NDArray[np.uint32]
    F64 = npt.NDArray[np.float64]

__all__ = ["format_float", "gather", "rw1_body", "rw2_body", "rw2_refs", "text_body", "IMPLEMENTATION"]

IMPLEMENTATION = "py"

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<q").pack
_unpack_Q = struct.Struct("<Q").unpack


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of an unsigned 64-bit value (negative int64: two's complement)."""
    n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def format_float(v: float) -> str:
    """A float as Prometheus writes it: Go ``strconv.FormatFloat(v, 'g', -1, 64)``.

    Shortest round-trip digits (Python's ``repr`` and Go agree on them); the exponent form
    from exponent -5 down and 6 up (Go decides with precision 6 in shortest mode);
    ``NaN``, ``+Inf``, ``-Inf``; negative zero is ``-0``.
    """
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    r = repr(float(v))
    sign = ""
    if r[0] == "-":
        sign, r = "-", r[1:]
    mant, _, e = r.partition("e")
    ip, _, fp = mant.partition(".")
    digits = ip + fp
    dp = len(ip) + (int(e) if e else 0)  # decimal point position within digits
    stripped = digits.lstrip("0")
    dp -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    exp = dp - 1
    if exp < -4 or exp >= 6:
        m = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{m}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{sign}0.{'0' * -dp}{digits}"
    if dp >= len(digits):
        return f"{sign}{digits}{'0' * (dp - len(digits))}"
    return f"{sign}{digits[:dp]}.{digits[dp:]}"


def _seconds(ms: int) -> str:
    """Milliseconds as decimal seconds, shortest exact form (OpenMetrics timestamps)."""
    sign = "-" if ms < 0 else ""
    q, r = divmod(abs(ms), 1000)
    if not r:
        return f"{sign}{q}"
    frac = f"{r:03d}".rstrip("0")
    return f"{sign}{q}.{frac}"


def gather(buf: Bytes, off: I64, idx: I64) -> bytes:
    """Concatenation of the CSR pieces ``buf[off[i]:off[i + 1]]`` for ``i`` in ``idx``."""
    mv = memoryview(buf)
    o = [int(x) for x in off]
    return b"".join(mv[o[i]:o[i + 1]] for i in (int(x) for x in idx))


def _sample_rw1(value: float, ts: int) -> bytes:
    out = b""
    if _unpack_Q(_pack_d(value))[0]:
        out += b"\x09" + _pack_d(value)
    if ts:
        out += b"\x10" + _varint(ts)
    return out


def rw1_body(lab_buf: Bytes, lab_off: I64, sids: I64, values: F64, ts: I64, tail: bytes) -> bytes:
    """``prometheus.WriteRequest``: one ``TimeSeries`` (field 1) per sample, then ``tail``
    (the already encoded metadata, field 3).

    ``lab_buf[lab_off[s]:lab_off[s + 1]]``: series ``s``'s encoded ``repeated Label labels = 1``.
    """
    mv = memoryview(lab_buf)
    off = [int(x) for x in lab_off]
    parts: list[bytes | memoryview] = []
    for sid, v, t in zip((int(x) for x in sids), (float(x) for x in values), (int(x) for x in ts)):
        labels = mv[off[sid]:off[sid + 1]]
        sample = _sample_rw1(v, t)
        inner_len = len(labels) + 1 + len(_varint(len(sample))) + len(sample)
        parts.append(b"\x0a" + _varint(inner_len))
        parts.append(labels)
        parts.append(b"\x12" + _varint(len(sample)) + sample)
    parts.append(tail)
    return b"".join(parts)


def rw2_refs(lab_off: I64, refs: U32, out_off: I64) -> bytes:
    """Per series: its ``labels_refs`` field (packed varints); CSR offsets into ``out_off``."""
    off = [int(x) for x in lab_off]
    refl = [int(x) for x in refs]
    parts = []
    total = 0
    out_off[0] = 0
    for s in range(len(off) - 1):
        r = refl[off[s]:off[s + 1]]
        if r:
            packed = b"".join(_varint(x) for x in r)
            piece = b"\x0a" + _varint(len(packed)) + packed
            parts.append(piece)
            total += len(piece)
        out_off[s + 1] = total
    return b"".join(parts)


def rw2_body(head: bytes, pre_buf: Bytes, pre_off: I64, suf_buf: Bytes, suf_off: I64, ser_suf: I64, sids: I64,
             values: F64, ts: I64, start: I64) -> bytes:
    """``io.prometheus.write.v2.Request``: ``head`` (the encoded ``symbols``, field 4), then one
    ``TimeSeries`` (field 5) per sample: the series' ``pre_buf`` piece (its ``labels_refs``),
    the ``Sample``, then the ``suf_buf`` piece ``ser_suf[s]`` (its ``metadata``, or empty).
    """
    pmv, smv = memoryview(pre_buf), memoryview(suf_buf)
    poff = [int(x) for x in pre_off]
    soff = [int(x) for x in suf_off]
    grp = [int(x) for x in ser_suf]
    parts = [head]
    for sid, v, t, st in zip((int(x) for x in sids), (float(x) for x in values), (int(x) for x in ts),
                             (int(x) for x in start)):
        g = grp[sid]
        sample = b""
        if _unpack_Q(_pack_d(v))[0]:
            sample += b"\x09" + _pack_d(v)
        if t:
            sample += b"\x10" + _varint(t)
        if st:
            sample += b"\x18" + _varint(st)
        body = bytes(pmv[poff[sid]:poff[sid + 1]]) + b"\x12" + _varint(len(sample)) + sample + \
            bytes(smv[soff[g]:soff[g + 1]])
        parts.append(b"\x2a" + _varint(len(body)) + body)
    return b"".join(parts)


def text_body(pre_buf: Bytes, pre_off: I64, hdr_buf: Bytes, hdr_off: I64, ser_group: I64, order: I64, sids: I64,
              values: F64, ts: I64, ts_mode: int, tail: bytes) -> bytes:
    """Text exposition lines for samples ``order[0], order[1], ...``.

    Each line is series prefix (``name{labels}``), a space, the value, then (``ts_mode`` 1)
    a space and the timestamp in ms or (2) in seconds. Before a sample whose series' group
    (family) differs from the previous line's, that group's header
    ``hdr_buf[hdr_off[g]:hdr_off[g + 1]]`` is written. ``tail`` ends the body.
    """
    pmv, hmv = memoryview(pre_buf), memoryview(hdr_buf)
    poff = [int(x) for x in pre_off]
    hoff = [int(x) for x in hdr_off]
    groups = [int(x) for x in ser_group]
    sid_l = [int(x) for x in sids]
    val_l = [float(x) for x in values]
    ts_l = [int(x) for x in ts]
    parts: list[bytes | memoryview] = []
    last = -1
    for i in (int(x) for x in order):
        sid = sid_l[i]
        g = groups[sid]
        if g != last:
            parts.append(hmv[hoff[g]:hoff[g + 1]])
            last = g
        parts.append(pmv[poff[sid]:poff[sid + 1]])
        line = " " + format_float(val_l[i])
        if ts_mode == 1:
            line += f" {ts_l[i]}"
        elif ts_mode == 2:
            line += " " + _seconds(ts_l[i])
        parts.append((line + "\n").encode())
    parts.append(tail)
    return b"".join(parts)
