"""Fuzz the compact-format decoder through the reference receiver (``CompactReceiver``).

    python fuzz/run.py compact --seconds 3600       # see fuzz/README.md

The body's CRC-32 and zstd would stop almost every mutation at the door, so the input is a
*stream* of records the harness turns into bodies, as a sender would:

    record := control:u8  length:u16le  bytes[length]      (a short last record takes what is left)
    control bit 0  FULL: the body carries full dictionaries (header flag)
            bit 1  RAW: ``bytes`` is a whole body, sent as is (header, checksum and zstd are fuzzed too)
            bit 2  RESEND: same sequence number as the previous body (a retry), else the next one
            bit 3  NEW STREAM: another stream id from here on

Otherwise ``bytes`` is the uncompressed payload: the harness compresses it, computes the
CRC-32 and writes the header (docs/compact-format.md). Every body goes to one receiver, in
order, so dictionaries and previous values carry over as in a real stream.

For any input:

* ``receive`` raises only ``CompactFormatError``, with a known code and its HTTP status;
  a rejected body changes nothing (the next body decodes as if it never came);
* a decoded batch is consistent (every column as long as the batch, every reference inside
  its table, one field id, kind and entity per series, as in every batch the relay makes:
  the decoder rejects a body that lists a name, label set or series twice), re-encodes as
  compact to the same columns, re-encodes as remote write 1.0 and
  2.0 (what forwarding does), and the receiver's ``/metrics`` (text and OpenMetrics) is
  valid: the text parses strictly, the OpenMetrics passes the strict validator.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import Iterator, List, Tuple

from _harness import fuzz, instrumented, quiet_warnings

with instrumented(__name__ == "__main__"):
    import cramjam
    import numpy as np

    import dcgmrelay
    from dcgmrelay._openmetrics_strict import validate as validate_openmetrics
    from dcgmrelay.encode import CompactFormatError, DecodedBatch, DecoderState, decode_batch, encode
    from dcgmrelay.receiver import CompactReceiver

MAX_RECORDS = 8

# The header as docs/compact-format.md specifies it (written here, not taken from the encoder).
HEADER = struct.Struct("<4sBBHQIII")  # magic, version, flags, reserved, stream id, seq, payload length, crc32
MAGIC = b"DCRC"
VERSION = 1
FLAG_FULL = 0x01
STREAM_ID = 0x5EED_F022_0000_0001

C_FULL, C_RAW, C_RESEND, C_NEW_STREAM = 0x01, 0x02, 0x04, 0x08

_COLUMNS = ("name_ids", "labelset_ids", "field_ids", "kinds", "entity_ids", "values", "deltas", "resets",
            "timestamps", "start_timestamps", "event_counts")


def records(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """The (control, bytes) records of a fuzz input."""
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos + 3 > len(data):
            return
        control = data[pos]
        (length,) = struct.unpack_from("<H", data, pos + 1)
        pos += 3
        yield control, data[pos:pos + length]
        pos += length


def record(control: int, payload: bytes) -> bytes:
    """One record of the input format (make_seeds.py writes seed streams with it)."""
    assert len(payload) < 1 << 16
    return bytes([control]) + struct.pack("<H", len(payload)) + payload


def seal(payload: bytes, *, full: bool, stream_id: int, seq: int) -> bytes:
    comp = bytes(cramjam.zstd.compress(payload, level=1))
    return HEADER.pack(MAGIC, VERSION, FLAG_FULL if full else 0, 0, stream_id, seq & 0xFFFFFFFF, len(payload),
                       zlib.crc32(comp)) + comp


def bodies(data: bytes) -> List[bytes]:
    out = []
    stream, seq = STREAM_ID, -1
    for control, b in records(data):
        if control & C_NEW_STREAM:
            stream += 1
        if not control & C_RESEND:
            seq += 1
        out.append(b if control & C_RAW else seal(b, full=bool(control & C_FULL), stream_id=stream, seq=seq))
    return out


def bits(a: np.ndarray) -> list:
    return np.asarray(a, dtype=np.float64).view(np.int64).tolist()


def columns(d: DecodedBatch) -> tuple:
    """What a decoded batch means, comparable (floats by bits)."""
    per_sample = []
    for i in range(len(d)):
        per_sample.append((d.names[d.name_ids[i]], d.labelsets[d.labelset_ids[i]], int(d.field_ids[i]),
                           int(d.kinds[i]),
                           None if d.entity_ids[i] < 0 else d.entities[d.entity_ids[i]], bits(d.values[i:i + 1]),
                           bits(d.deltas[i:i + 1]), bool(d.resets[i]), int(d.timestamps[i]),
                           int(d.start_timestamps[i]), bits(d.event_counts[i:i + 1])))
    stale = sorted((d.names[n], d.labelsets[ls]) for n, ls in zip(d.stale_name_ids.tolist(),
                                                                   d.stale_labelset_ids.tolist()))
    return (d.target, d.timestamp_ms, d.output, per_sample, stale, d.families)


def _consistent(d: DecodedBatch) -> None:
    n = len(d.values)
    for col in _COLUMNS:
        assert len(getattr(d, col)) == n, f"decoded column {col} has {len(getattr(d, col))} rows, not {n}"
    for col, table in (("name_ids", d.names), ("labelset_ids", d.labelsets)):
        a = np.asarray(getattr(d, col))
        assert not len(a) or (a.min() >= 0 and a.max() < len(table)), f"{col} outside its table"
    e = np.asarray(d.entity_ids)
    assert not len(e) or (e.min() >= -1 and e.max() < len(d.entities)), "entity_ids outside the table"
    assert len(d.stale_name_ids) == len(d.stale_labelset_ids)
    for col, table in (("stale_name_ids", d.names), ("stale_labelset_ids", d.labelsets)):
        a = np.asarray(getattr(d, col))
        assert not len(a) or (a.min() >= 0 and a.max() < len(table)), f"{col} outside its table"
    assert d.output in ("cumulative", "delta", "both"), d.output


def _one_kind_per_series(d: DecodedBatch) -> None:
    """Every (name, label set) of the batch has one field id, kind and entity, as in any
    batch the relay makes (encoders key series by (name, label set)). Compared by value:
    the decoder rejects a body listing one name, label set or series under two ids, but a
    body may still hold one entity under two ids (equal entities are one entity)."""
    seen: dict = {}
    names, labelsets, entities = d.names, d.labelsets, d.entities
    for n, ls, f, k, e in zip(d.name_ids.tolist(), d.labelset_ids.tolist(), d.field_ids.tolist(),
                              d.kinds.tolist(), d.entity_ids.tolist()):
        attrs = (f, k, None if e < 0 else entities[e])
        old = seen.setdefault((names[n], labelsets[ls]), attrs)
        assert old == attrs, f"series {names[n]}{labelsets[ls]} decoded with two sets of attributes: {old}, {attrs}"


def _downstream(rx: CompactReceiver, d: DecodedBatch) -> None:
    _consistent(d)
    _one_kind_per_series(d)
    again = decode_batch(encode(d, "compact")[0])
    assert columns(again) == columns(d), "a decoded batch does not re-encode to itself"
    encode(d, "remote-write-1")
    encode(d, "remote-write-2")
    text, _ = rx.metrics()
    dcgmrelay.parse(text, format="prometheus", strict=True)
    om, _ = rx.metrics(openmetrics=True)
    validate_openmetrics(om)


def fingerprint(state: DecoderState) -> list:
    """The receiver's stream state, comparable (to see that a rejected body changed nothing)."""
    out = []
    for sid, st in state.streams.items():
        out.append((sid, st.seq, st.last_crc, st.n_series, tuple(st.strings), tuple(st.names), tuple(st.labelsets),
                    tuple(st.entities), dict(st.families),
                    tuple(a[:st.n_series].tobytes() for a in st.copy_arrays().values())))
    return out


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    rx = CompactReceiver()  # never started: receive() is what POST /api/v1/compact runs
    with quiet_warnings():
        for body in bodies(data):
            before = fingerprint(rx.state)
            try:
                d = rx.receive(body)
            except CompactFormatError as e:
                assert e.code in CompactFormatError.STATUS, f"unknown error code {e.code!r}"
                assert e.http_status == CompactFormatError.STATUS[e.code]
                str(e), e.as_dict()
                assert fingerprint(rx.state) == before, f"a rejected body ({e.code}) changed the stream state"
                continue
            _downstream(rx, d)


if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
