"""The on-disk spool: order, rollover, the size cap, torn and corrupt records, the ack
cursor, disk full (simulated and real), kill -9 at random points, and a model check."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dcgmrelay
from dcgmrelay import spool as spool_mod
from dcgmrelay.errors import DcgmRelayError
from dcgmrelay.spool import (
    HEADER_SIZE,
    MAGIC,
    Spool,
    SpooledRecord,
    SpoolFullError,
    SpoolLockedError,
)

SRC = str(Path(dcgmrelay.__file__).resolve().parents[1])


def segs(d: Path, name: str = "spool") -> list[Path]:
    return sorted(d.glob(f"{name}-*.seg"))


def rec_size(payload: bytes, meta: dict) -> int:
    raw = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    return HEADER_SIZE + len(raw) + len(payload)


def drain(sp: Spool) -> list[SpooledRecord]:
    return sp.peek(max_records=10**9)


def fill(sp: Spool, n: int, size: int = 50, start: int = 0) -> list[int]:
    return [sp.append(bytes([i % 251]) * size + b"#%d" % i, meta={"i": i}) for i in range(start, start + n)]


def payload_of(i: int, size: int = 50) -> bytes:
    return bytes([i % 251]) * size + b"#%d" % i


# --------------------------------------------------------------------------- basics
def test_append_peek_ack_and_order_across_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync="always") as sp:
        seqs = fill(sp, 5)
        assert seqs == [1, 2, 3, 4, 5]
        assert len(sp) == 5
        assert sp.pending_bytes == sum(rec_size(payload_of(i), {"i": i}) for i in range(5))
        head = sp.peek(2)
        assert [r.seq for r in head] == [1, 2]
        assert head[0].payload == payload_of(0) and head[0].meta == {"i": 0}
        assert sp.peek(2) == head  # peeking does not consume
        sp.ack(2)
        assert [r.seq for r in drain(sp)] == [3, 4, 5]
        assert sp.stats.appended == 5 and sp.stats.acked == 2 and sp.stats.replayed == 5
    with Spool(tmp_path, fsync="always") as sp:
        assert [r.meta["i"] for r in drain(sp)] == [2, 3, 4]
        assert sp.stats.recovered_records == 3
        assert sp.append(b"x") == 6  # numbering continues
        assert [r.seq for r in drain(sp)] == [3, 4, 5, 6]
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [3, 4, 5, 6]
        assert [r.payload for r in drain(sp)][-1] == b"x"


def test_record_fields_and_meta(tmp_path: Path) -> None:
    meta = {"content-type": "application/x-protobuf", "content-encoding": "snappy", "samples": 1200,
            "note": "ünïcode"}
    t0 = time.time()
    with Spool(tmp_path) as sp:
        sp.append(b"\x00\x01binary\xff", meta=meta)
        sp.append(b"")
        a, b = drain(sp)
        assert a.payload == b"\x00\x01binary\xff" and a.meta == meta
        assert b.payload == b"" and b.meta == {}
        assert t0 * 1000 - 5 <= a.created_ms <= time.time() * 1000 + 5
        assert 0 <= sp.oldest_age_s() < 5
        assert sp.oldest_age_s(now=a.created_ms / 1000 + 10) == pytest.approx(10)
        sp.ack(2)
        assert sp.oldest_age_s() == 0.0 and len(sp) == 0 and sp.pending_bytes == 0
        with pytest.raises(TypeError):
            sp.append(b"x", meta={"bad": 1.5})
        with pytest.raises(TypeError):
            sp.append(b"x", meta={"bad": True})
        with pytest.raises(ValueError):
            sp.append(b"x", meta={"k": "v" * 70000})
        assert sp.next_seq == 3


def test_ack_rules(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        fill(sp, 3)
        with pytest.raises(ValueError):
            sp.ack(4)
        sp.ack(2)
        sp.ack(1)  # older: no-op
        assert [r.seq for r in drain(sp)] == [3]
        assert sp.acked_seq == 2


def test_bad_arguments_and_lock(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError):
        Spool(tmp_path, fsync_interval_s=0)
    sp = Spool(tmp_path)
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    Spool(tmp_path, name="other").close()  # another name in the same directory is fine
    sp.close()
    sp.close()  # idempotent
    with pytest.raises(spool_mod.SpoolError):
        sp.append(b"x")
    Spool(tmp_path).close()  # the lock went with close()
    assert issubclass(SpoolFullError, DcgmRelayError)


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
def test_policies_roundtrip(tmp_path: Path, policy: str) -> None:
    with Spool(tmp_path, fsync=policy, fsync_interval_s=0.01, segment_bytes=300) as sp:
        fill(sp, 20)
        time.sleep(0.05)  # let the batch syncer run at least once
        sp.ack(5)
        sp.sync()
    with Spool(tmp_path, fsync=policy) as sp:
        assert [r.meta["i"] for r in drain(sp)] == list(range(5, 20))
        assert sp.stats.write_errors == 0


# --------------------------------------------------------------------------- segments
def test_rollover_and_deletion_of_acked_segments(tmp_path: Path) -> None:
    size = rec_size(payload_of(0), {"i": 0})  # all records the same size below 10
    with Spool(tmp_path, segment_bytes=3 * size) as sp:
        fill(sp, 9)  # 3 records a segment
        files = segs(tmp_path)
        assert [f.name for f in files] == [
            "spool-00000000000000000001.seg",
            "spool-00000000000000000004.seg",
            "spool-00000000000000000007.seg",
        ]
        assert all(f.stat().st_size == 3 * size for f in files)
        assert sp.disk_bytes == 9 * size
        sp.ack(2)
        assert len(segs(tmp_path)) == 3  # segment 1 still holds record 3
        sp.ack(4)
        assert [f.name[-11:] for f in segs(tmp_path)] == ["0000004.seg", "0000007.seg"]
        assert sp.pending_bytes == 5 * size and sp.disk_bytes == 6 * size
        sp.ack(9)
        assert segs(tmp_path) == []  # the active one too, once fully acked
        assert len(sp) == 0
        assert sp.append(b"later") == 10
        assert [f.name for f in segs(tmp_path)] == ["spool-00000000000000000010.seg"]
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [10]
        sp.ack(10)
    with Spool(tmp_path) as sp:  # nothing on disk but the cursor: numbering still continues
        assert segs(tmp_path) == []
        assert sp.append(b"y") == 11


def test_reopen_appends_to_a_new_segment(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        fill(sp, 2)
    with Spool(tmp_path) as sp:
        fill(sp, 2, start=2)
        assert len(segs(tmp_path)) == 2
        assert [r.meta["i"] for r in drain(sp)] == [0, 1, 2, 3]


def test_big_record_gets_its_own_segment(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=200, max_bytes=10**6) as sp:
        sp.append(b"a" * 10)
        sp.append(b"b" * 1000)
        sp.append(b"c" * 10)
        assert [len(r.payload) for r in drain(sp)] == [10, 1000, 10]
        assert len(segs(tmp_path)) == 3


# --------------------------------------------------------------------------- size cap
def test_size_cap_drops_oldest_segments_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    size = rec_size(payload_of(0), {"i": 0})
    cap = 10 * size
    caplog.set_level(logging.WARNING, logger="dcgmrelay.spool")
    with Spool(tmp_path, max_bytes=cap, segment_bytes=3 * size) as sp:
        events = 0
        last_dropped = 0
        for i in range(40):
            sp.append(payload_of(i), meta={"i": i})
            assert sp.disk_bytes <= cap
            st_ = sp.stats
            if st_.dropped_records > last_dropped:
                events += 1
                last_dropped = st_.dropped_records
            got = [r.meta["i"] for r in drain(sp)]
            # always the newest records, contiguous, including the one just written
            assert got == list(range(i + 1 - len(got), i + 1))
            assert len(got) + st_.dropped_records == i + 1
        st_ = sp.stats
        assert st_.dropped_records > 0
        assert st_.dropped_bytes == sum(rec_size(payload_of(i), {"i": i}) for i in range(st_.dropped_records))
        msgs = [r for r in caplog.records if "size cap" in r.getMessage()]
        assert len(msgs) == events  # one log line per drop event
        assert "dropped the 1 oldest segment(s), 3 unacked records" in msgs[0].getMessage()
        # acked records in a dropped segment are not counted as dropped
        sp.ack(sp.peek(1)[0].seq)
        before_ids = {r.seq for r in drain(sp)}
        before = sp.stats.dropped_records
        i = 40
        while sp.stats.dropped_records == before:
            sp.append(payload_of(i), meta={"i": i})
            i += 1
        lost = before_ids - {r.seq for r in drain(sp)}
        assert len(lost) >= 1
        assert sp.stats.dropped_records - before == len(lost)


def test_size_cap_record_too_big_and_segment_clamp(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1000, segment_bytes=1 << 20) as sp:
        assert sp.segment_bytes == 500
        sp.append(b"ok")
        with pytest.raises(SpoolFullError) as ei:
            sp.append(b"x" * 1000)
        assert ei.value.errno is None
        assert sp.stats.rejected_records == 1 and sp.stats.write_errors == 0
        assert [r.payload for r in drain(sp)] == [b"ok"]


# --------------------------------------------------------------------------- torn tail
def _write_n(d: Path, n: int, **kw) -> list[tuple[int, int]]:
    """n records in one segment; return (start, end) offsets of each record."""
    offs = []
    with Spool(d, fsync="never", **kw) as sp:
        for i in range(n):
            before = sp.disk_bytes
            sp.append(b"payload-%d-" % i + bytes(range(256))[: 40 + 13 * i], meta={"i": i})
            offs.append((before, sp.disk_bytes))
    return offs


def test_torn_tail_every_byte_offset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    offs = _write_n(src, 5)
    (seg,) = segs(src)
    full = seg.read_bytes()
    start, end = offs[-1]
    assert end == len(full)
    work = tmp_path / "work"
    for cut in range(start, end):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        (wseg,) = segs(work)
        wseg.write_bytes(full[:cut])
        with Spool(work, fsync="never") as sp:
            got = drain(sp)
            assert [r.meta["i"] for r in got] == [0, 1, 2, 3], cut
            assert sp.stats.torn_records_skipped == (1 if cut > start else 0), cut
            assert sp.stats.corrupt_records_skipped == 0
            assert wseg.stat().st_size == start  # truncated away
            if cut in (start, start + 1, start + HEADER_SIZE - 1, start + HEADER_SIZE, end - 1):
                assert sp.append(b"after") == 5  # the torn record never counted
        if cut in (start + 1, end - 1):
            with Spool(work, fsync="never") as sp:
                assert [r.seq for r in drain(sp)] == [1, 2, 3, 4, 5]
                assert drain(sp)[-1].payload == b"after"
                assert sp.stats.torn_records_skipped == 0


def test_torn_tail_bad_crc_and_zero_fill(tmp_path: Path) -> None:
    offs = _write_n(tmp_path, 4)
    (seg,) = segs(tmp_path)
    data = bytearray(seg.read_bytes())
    data[offs[-1][1] - 1] ^= 0xFF  # last byte of the last record: body CRC fails at the tail
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as sp:
        assert [r.meta["i"] for r in drain(sp)] == [0, 1, 2]
        assert sp.stats.torn_records_skipped == 1
    # a power loss may leave the file extended with zeros
    with open(seg, "ab") as f:
        f.write(b"\0" * 8192)
    with Spool(tmp_path) as sp:
        assert [r.meta["i"] for r in drain(sp)] == [0, 1, 2]
        assert sp.stats.torn_records_skipped == 1 and sp.stats.corrupt_records_skipped == 0
    assert seg.stat().st_size == offs[2][1]


# --------------------------------------------------------------------------- corrupt middle
@pytest.mark.parametrize("where", ["payload", "length", "magic", "garbage"])
def test_corrupt_middle_record_is_skipped(tmp_path: Path, where: str) -> None:
    offs = _write_n(tmp_path, 6)
    (seg,) = segs(tmp_path)
    data = bytearray(seg.read_bytes())
    s, e = offs[2]
    if where == "payload":
        data[e - 3] ^= 0x01
    elif where == "length":
        data[s + 8:s + 12] = (10**9).to_bytes(4, "little")  # would run past the end
    elif where == "magic":
        data[s] ^= 0xFF
    else:
        data[s:s] = MAGIC + b"\x01" + os.urandom(200)  # junk with a fake magic before record 2
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as sp:
        got = [r.meta["i"] for r in drain(sp)]
        if where == "garbage":
            assert got == [0, 1, 2, 3, 4, 5]
        else:
            assert got == [0, 1, 3, 4, 5]
        assert sp.stats.corrupt_records_skipped == 1
        assert sp.stats.torn_records_skipped == 0
        assert sp.append(b"z") == 7


def test_bad_tail_of_an_older_segment_is_corrupt_not_torn(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        fill(sp, 3)
    with Spool(tmp_path) as sp:
        fill(sp, 3, start=3)
    first = segs(tmp_path)[0]
    with open(first, "ab") as f:
        f.write(b"DRSP\x01 torn")
    with Spool(tmp_path) as sp:
        assert [r.meta["i"] for r in drain(sp)] == [0, 1, 2, 3, 4, 5]
        assert sp.stats.corrupt_records_skipped == 1 and sp.stats.torn_records_skipped == 0


def test_corruption_found_on_read(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        fill(sp, 4)
        (seg,) = segs(tmp_path)
        data = bytearray(seg.read_bytes())
        size = rec_size(payload_of(0), {"i": 0})
        data[size + 40] ^= 0xFF  # record 2's meta/payload
        seg.write_bytes(bytes(data))
        assert [r.meta["i"] for r in drain(sp)] == [0, 2, 3]
        assert sp.stats.corrupt_records_skipped == 1
        assert len(sp) == 3
        sp.ack(4)
        assert len(sp) == 0


# --------------------------------------------------------------------------- cursor
def test_ack_cursor_persistence_and_fallback(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync="always") as sp:
        fill(sp, 10)
        sp.ack(3)
        sp.ack(6)
    cursor = tmp_path / "spool.cursor"
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [7, 8, 9, 10]
    # damage the newest slot (a torn cursor write): the previous ack holds, more replays
    data = bytearray(cursor.read_bytes())
    slots = [0, 4096]
    gens = [int.from_bytes(data[o + 8:o + 16], "little") for o in slots]
    newest = slots[gens.index(max(gens))]
    data[newest + 16] ^= 0xFF
    cursor.write_bytes(bytes(data))
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [4, 5, 6, 7, 8, 9, 10]
        assert sp.stats.cursor_resets == 0
        sp.ack(5)
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [6, 7, 8, 9, 10]
    # both slots unreadable: everything still on disk replays (never a loss)
    cursor.write_bytes(b"\xff" * len(cursor.read_bytes()))
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)][0] <= 6
        assert [r.seq for r in drain(sp)][-5:] == [6, 7, 8, 9, 10]
        assert sp.stats.cursor_resets == 1
        assert sp.append(b"n") == 11


# --------------------------------------------------------------------------- disk full (simulated)
def _enospc_after(limit: int):
    """A pwrite that writes at most ``limit`` bytes in total, then fails with ENOSPC."""
    state = {"left": limit}

    def pwrite(fd, data, off):
        if state["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), state["left"])
        state["left"] -= n
        return os.pwrite(fd, bytes(data[:n]), off)

    return pwrite


def test_disk_full_partial_write_is_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(tmp_path, fsync="always") as sp:
        fill(sp, 3)
        (seg,) = segs(tmp_path)
        size_before = seg.stat().st_size
        monkeypatch.setattr(spool_mod, "_pwrite", _enospc_after(30))  # half a header
        with pytest.raises(SpoolFullError) as ei:
            sp.append(b"q" * 500)
        assert ei.value.errno == errno.ENOSPC
        assert isinstance(ei.value, DcgmRelayError)
        assert seg.stat().st_size == size_before
        st_ = sp.stats
        assert st_.write_errors == 1 and st_.rejected_records == 1 and st_.rejected_bytes == HEADER_SIZE + 500
        assert len(sp) == 3
        monkeypatch.undo()
        assert sp.append(b"fits") == 4  # usable again, the failed record took no seq
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [1, 2, 3, 4]
        assert sp.stats.torn_records_skipped == 0


def test_disk_full_truncate_also_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_truncate(fd, length):
        raise OSError(errno.EIO, "truncate failed")

    with Spool(tmp_path) as sp:
        fill(sp, 3)
        monkeypatch.setattr(spool_mod, "_pwrite", _enospc_after(300))
        monkeypatch.setattr(spool_mod, "_ftruncate", no_truncate)
        with pytest.raises(SpoolFullError):
            sp.append(b"q" * 500)
        monkeypatch.setattr(spool_mod, "_pwrite", os.pwrite)
        # a shorter record overwrites the garbage from the logical end; the rest stays
        assert sp.append(b"short") == 4
        assert [r.seq for r in drain(sp)] == [1, 2, 3, 4]
        assert sp.stats.write_errors >= 2
    monkeypatch.undo()
    with Spool(tmp_path) as sp:  # leftovers past the last record: a torn tail
        assert [r.payload for r in drain(sp)][-1] == b"short"
        assert [r.seq for r in drain(sp)] == [1, 2, 3, 4]
        assert sp.stats.torn_records_skipped == 1


def test_fsync_failure_rejects_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_sync(fd):
        raise OSError(errno.EIO, "I/O error")

    with Spool(tmp_path, fsync="always") as sp:
        fill(sp, 2)
        monkeypatch.setattr(spool_mod, "_fdatasync", bad_sync)
        with pytest.raises(SpoolFullError) as ei:
            sp.append(b"lost")
        assert ei.value.errno == errno.EIO
        monkeypatch.undo()
        assert [r.seq for r in drain(sp)] == [1, 2]
        assert sp.append(b"ok") == 3


def test_cursor_write_failure_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd, data, off):
        raise OSError(errno.ENOSPC, "full")

    sp = Spool(tmp_path)
    fill(sp, 5)
    monkeypatch.setattr(spool_mod, "_pwrite", fail)
    sp.ack(2)  # counted, logged, held in memory
    assert sp.stats.write_errors == 1
    assert [r.seq for r in drain(sp)] == [3, 4, 5]
    monkeypatch.undo()
    sp.ack(2)  # the same ack again retries the write
    sp.close()
    with Spool(tmp_path) as sp:
        assert [r.seq for r in drain(sp)] == [3, 4, 5]
        monkeypatch.setattr(spool_mod, "_pwrite", fail)
        sp.ack(4)
        sp.close()  # still failing at close: the ack is not on disk
    monkeypatch.undo()
    with Spool(tmp_path) as sp:  # at-least-once: 3 and 4 replay
        assert [r.seq for r in drain(sp)] == [3, 4, 5]


# --------------------------------------------------------------------------- disk full (real)
_TINYFS_SCENARIO = r"""
import errno, json, os, random, subprocess, sys
sys.path.insert(0, {src!r})
mnt = sys.argv[1]
mode = sys.argv[2]
if mode == "tmpfs":
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], capture_output=True)
    if r.returncode != 0:
        print("MOUNT-FAILED", r.stderr.decode(errors="replace")); sys.exit(77)
else:
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from dcgmrelay.spool import Spool, SpoolFullError
d = os.path.join(mnt, "sp")
rng = random.Random(7)
def payload(i):
    return b"%d:" % i + rng.randbytes(rng.randint(500, 7000))
seg = 32 * 1024 if mode == "tmpfs" else 1 << 20
sp = Spool(d, fsync="always", segment_bytes=seg, max_bytes=1 << 30)
stored, errs, i = [], [], 0
while len(errs) < 4:
    p = payload(i)
    try:
        seq = sp.append(p, meta={{"i": i}})
        stored.append((seq, p))
    except SpoolFullError as e:
        errs.append(e.errno)
    i += 1
assert stored, "nothing fit"
got = sp.peek(10**9)
assert [(r.seq, r.payload) for r in got] == stored
st = sp.stats
assert st.rejected_records == 4 and st.write_errors >= 4, st
# ack while full: the cursor is written in place, no new space needed
sp.ack(stored[0][0])
assert sp.stats.write_errors == st.write_errors, sp.stats
sp.close()
sp = Spool(d, fsync="always", segment_bytes=seg, max_bytes=1 << 30)
got = sp.peek(10**9)
assert [(r.seq, r.payload) for r in got] == stored[1:], "reopen"
assert sp.stats.torn_records_skipped == 0 and sp.stats.corrupt_records_skipped == 0, sp.stats
if mode == "tmpfs":
    # acking frees whole segments, after which appends fit again
    sp.ack(stored[len(stored) // 2][0])
    seq = sp.append(b"after", meta={{"i": -1}})
    assert sp.peek(10**9)[-1].payload == b"after"
    stored = stored[len(stored) // 2 + 1:] + [(seq, b"after")]
else:
    stored = stored[1:]
sp.close()
with Spool(d) as sp:
    assert [(r.seq, r.payload) for r in sp.peek(10**9)] == stored
print("OK", json.dumps({{"stored": len(stored), "errnos": errs}}))
"""


def _run_tinyfs(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "scenario.py"
    script.write_text(_TINYFS_SCENARIO.format(src=SRC))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = [sys.executable, str(script), str(mnt), mode]
    if mode == "tmpfs":
        # a private mount namespace: the tmpfs disappears with the process
        unshare = shutil.which("unshare")
        if unshare is None or not sys.platform.startswith("linux"):
            pytest.skip("needs Linux unshare(1) to mount a tiny tmpfs")
        cmd = [unshare, "-m" if os.geteuid() == 0 else "-Urm", "--propagation", "private", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_disk_full_real_tmpfs(tmp_path: Path) -> None:
    r = _run_tinyfs(tmp_path, "tmpfs")
    if r.returncode != 0 and ("MOUNT-FAILED" in r.stdout or r.stderr.startswith("unshare:")):
        if os.environ.get("DCGMRELAY_REQUIRE_TINYFS") == "1":
            pytest.fail(f"cannot mount a tiny tmpfs: {r.stdout}{r.stderr}")
        pytest.skip(f"cannot mount a tiny tmpfs here: {(r.stdout + r.stderr).strip()[:200]}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK")
    assert set(json.loads(r.stdout.split(" ", 1)[1])["errnos"]) == {errno.ENOSPC}


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_write_error_real_rlimit_fsize(tmp_path: Path) -> None:
    """A real kernel write failure (EFBIG past RLIMIT_FSIZE), partial writes included."""
    r = _run_tinyfs(tmp_path, "rlimit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(json.loads(r.stdout.split(" ", 1)[1])["errnos"]) == {errno.EFBIG}


# --------------------------------------------------------------------------- kill -9
_CHILD = r"""
import os, random, sys, time
sys.path.insert(0, {src!r})
from dcgmrelay.spool import Spool

def payload(i):
    n = random.Random(i).randint(0, 400_000)
    unit = b"rec-%d;" % i
    return (unit * (n // len(unit) + 1))[:n]

d, start, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sp = Spool(d, segment_bytes=256 * 1024, max_bytes=1 << 40, fsync="batch", fsync_interval_s=0.02)
out = lambda s: os.write(1, s.encode())
out("ready\n")
i = start
while True:
    seq = sp.append(payload(i), meta={{"i": i}})
    out(f"A {{i}} {{seq}}\n")
    i += 1
    if mode == "consumer" and i % 3 == 0:
        for rec in sp.peek(4):
            out(f"D {{rec.meta['i']}} {{rec.seq}}\n")
            time.sleep(0.001)  # the delivery's network time: a record in flight
            sp.ack(rec.seq)
            out(f"K {{rec.seq}}\n")
"""


def _payload(i: int) -> bytes:
    """Up to 400 kB, so that a kill often lands inside the write of a record."""
    n = random.Random(i).randint(0, 400_000)
    unit = b"rec-%d;" % i
    return (unit * (n // len(unit) + 1))[:n]


def _run_and_kill(script: Path, d: Path, start: int, mode: str, rng: random.Random) -> list[list[str]]:
    p = subprocess.Popen([sys.executable, str(script), str(d), str(start), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        first = p.stdout.readline()
        assert first == b"ready\n", first + p.stderr.read()  # type: ignore[union-attr]
        time.sleep(rng.uniform(0.005, 0.25))
        os.kill(p.pid, signal.SIGKILL)
        out = p.stdout.read()
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    text = out.decode()
    complete = text[: text.rfind("\n") + 1] if "\n" in text else ""
    return [line.split() for line in complete.splitlines()]


def _check_records(recs: list[SpooledRecord]) -> list[int]:
    seqs = [r.seq for r in recs]
    assert seqs == sorted(set(seqs))
    out = []
    for r in recs:
        i = int(r.meta["i"])
        assert r.payload == _payload(i), i
        out.append(i)
    return out


def test_kill9_producer_loses_nothing(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(src=SRC))
    d = tmp_path / "spool"
    rng = random.Random(1234)
    start = 0
    torn = total = 0
    deadline = time.monotonic() + 60
    for it in range(12):
        assert time.monotonic() < deadline, "kill -9 test over its time budget"
        lines = _run_and_kill(script, d, start, "producer", rng)
        reported = [(int(i), int(seq)) for tag, i, seq in lines if tag == "A"]
        with Spool(d, fsync="never") as sp:
            recs = drain(sp)
            torn += sp.stats.torn_records_skipped
            assert sp.stats.corrupt_records_skipped == 0
            got = _check_records(recs)
            # exactly the records appended since the last check, in order, once each
            assert got == list(range(start, start + len(got))), (it, got[:5])
            by_i = {int(r.meta["i"]): r.seq for r in recs}
            for i, seq in reported:
                assert by_i.get(i) == seq, (it, i)  # every reported append is there
            # at most one more: its append finished but the report did not get out
            assert len(got) - len(reported) in (0, 1), (it, len(got), len(reported))
            total += len(got)
            start += len(got)
            if recs:
                sp.ack(recs[-1].seq)  # consumed: must not come back next round
    assert total > 12
    print(f"kill -9 producer: {total} records over 12 kills, {torn} torn tails skipped")


def test_kill9_consumer_duplicates_bounded(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(src=SRC))
    d = tmp_path / "spool"
    rng = random.Random(99)
    delivered: list[int] = []
    delivered_set: set[int] = set()
    appended: set[int] = set()
    inflight_prev: set[int] = set()
    duplicates = 0
    bound = 0
    start = 0
    deadline = time.monotonic() + 60
    iterations = 12
    for it in range(iterations):
        assert time.monotonic() < deadline, "kill -9 test over its time budget"
        lines = _run_and_kill(script, d, start, "consumer", rng)
        acked_upto = 0
        in_flight: dict[int, int] = {}
        this_round: list[int] = []
        for tag, *rest in lines:
            if tag == "A":
                appended.add(int(rest[0]))
            elif tag == "D":
                i, seq = int(rest[0]), int(rest[1])
                this_round.append(i)
                if i in delivered_set:
                    # a re-delivery: only what was in flight at the previous kill
                    assert i in inflight_prev, (it, i)
                    duplicates += 1
                delivered.append(i)
                delivered_set.add(i)
                in_flight[seq] = i
            elif tag == "K":
                acked_upto = max(acked_upto, int(rest[0]))
                in_flight = {s: i for s, i in in_flight.items() if s > acked_upto}
        assert this_round == sorted(this_round) and len(set(this_round)) == len(this_round)
        assert len(in_flight) <= 4  # peek(4): at most one batch in flight
        with Spool(d, fsync="never") as sp:
            pending = _check_records(drain(sp))
            assert sp.stats.corrupt_records_skipped == 0
        # what is still pending: contiguous, after everything delivered-and-acked
        if pending:
            assert pending == list(range(pending[0], pending[0] + len(pending)))
            for i in pending:
                assert i not in delivered_set or i in in_flight.values(), (it, i)
            assert all(i in delivered_set for i in range(pending[0]))
        hi = max([*pending, *delivered_set], default=-1)
        assert all(i in delivered_set for i in range(hi + 1) if i not in pending)
        assert appended <= delivered_set | set(pending)
        inflight_prev = set(in_flight.values())
        bound += len(inflight_prev)
        start = hi + 1
    assert duplicates <= bound <= 4 * iterations
    assert len(delivered_set) > 12
    print(f"kill -9 consumer: {len(delivered_set)} delivered, {duplicates} duplicates "
          f"(bound {bound}) over {iterations} kills")


# --------------------------------------------------------------------------- model check
class SpoolMachine(RuleBasedStateMachine):
    """append / ack / peek / reopen / crash-with-torn-tail against a list model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-hyp-"))
        self.kw = {"max_bytes": 3000, "segment_bytes": 700, "fsync": "never"}
        self.sp = Spool(self.dir, **self.kw)
        self.model: deque[tuple[int, bytes, dict]] = deque()
        self.last_seq = 0
        self.acked = 0
        self.dropped_base = 0

    def _reopen(self) -> None:
        self.sp = Spool(self.dir, **self.kw)
        self.dropped_base = 0

    @rule(payload=st.binary(max_size=400), tag=st.integers(0, 10**6))
    def append(self, payload: bytes, tag: int) -> None:
        before = self.sp.stats.dropped_records
        seq = self.sp.append(payload, meta={"t": tag})
        assert seq == self.last_seq + 1
        self.last_seq = seq
        self.model.append((seq, payload, {"t": tag}))
        dropped = len(self.model) - len(self.sp)
        assert dropped >= 0
        assert self.sp.stats.dropped_records - before == dropped
        for _ in range(dropped):  # the oldest go first
            self.model.popleft()

    @precondition(lambda self: self.model)
    @rule(k=st.integers(0, 20))
    def ack(self, k: int) -> None:
        seq = self.model[min(k, len(self.model) - 1)][0]
        self.sp.ack(seq)
        self.acked = max(self.acked, seq)
        while self.model and self.model[0][0] <= seq:
            self.model.popleft()

    @precondition(lambda self: self.acked > 0)
    @rule()
    def ack_again(self) -> None:
        self.sp.ack(self.acked)

    @rule(n=st.integers(1, 6))
    def peek(self, n: int) -> None:
        got = [(r.seq, r.payload, r.meta) for r in self.sp.peek(n)]
        assert got == list(self.model)[:n]

    @rule()
    def reopen(self) -> None:
        self.sp.close()
        self._reopen()

    @precondition(lambda self: self.model and self.model[-1][0] == self.last_seq)
    @rule(frac=st.floats(0.01, 0.99))
    def crash_with_torn_tail(self, frac: float) -> None:
        """Power loss in the middle of the last append: its tail never reached the disk."""
        self.sp.close()
        seg = segs(self.dir)[-1]
        seq, payload, meta = self.model[-1]
        size = rec_size(payload, meta)
        data = seg.read_bytes()
        cut = len(data) - size + max(1, int(size * frac))
        seg.write_bytes(data[: min(cut, len(data) - 1)])
        self._reopen()
        assert self.sp.stats.torn_records_skipped == 1
        self.model.pop()
        self.last_seq = max(seq - 1, self.acked)

    @invariant()
    def matches_model(self) -> None:
        assert len(self.sp) == len(self.model)
        assert self.sp.pending_bytes == sum(rec_size(p, m) for _s, p, m in self.model)
        assert self.sp.disk_bytes <= self.kw["max_bytes"]
        assert [(r.seq, r.payload, r.meta) for r in drain(self.sp)] == list(self.model)

    def teardown(self) -> None:
        self.sp.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestSpoolModel = SpoolMachine.TestCase
TestSpoolModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
