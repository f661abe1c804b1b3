"""On-disk spool: batches a collector could not take within the retry budget.

    >>> from dcgmrelay.spool import Spool
    >>> with Spool("/var/lib/dcgmrelay/spool/vm-0", max_bytes=1 << 30) as spool:
    ...     seq = spool.append(body, meta={"content-type": "application/x-protobuf",
    ...                                    "content-encoding": "snappy", "samples": 1200})
    ...     for rec in spool.peek(max_records=16):     # oldest first
    ...         deliver(rec.payload, rec.meta)          # raises -> stop, retry later
    ...         spool.ack(rec.seq)                      # ack after EACH delivery

One :class:`Spool` per output (collector), each in its own directory (or with its own
``name`` in a shared directory). Records are opaque bytes (an already-encoded request
body) with a small JSON ``meta`` mapping. The full on-disk layout and the reasoning are
in ``docs/spool.md``; the short version:

Layout
    ``<name>-<first seq, 20 digits>.seg`` segment files, append-only, each a run of
    records; ``<name>.cursor`` the ack position (two checksummed slots, written in place
    alternately); ``<name>.lock`` an advisory ``flock`` so two processes never share a
    spool (:class:`SpoolLockedError`). A record, little-endian::

        off  size  field
          0     4  magic  b"DRSP"
          4     1  version (1)
          5     1  flags (0; reserved)
          6     2  meta_len   u16   bytes of JSON meta
          8     4  payload_len u32
         12     8  seq        u64   1, 2, 3 ... (increasing)
         20     8  created_ms i64   UNIX ms at append
         28     4  body_crc   u32   zlib.crc32(meta + payload)
         32     4  header_crc u32   zlib.crc32(bytes 0..31, body_crc included)
         36     .  meta (UTF-8 JSON object, str -> str|int), then payload

    The header has its own CRC so that a damaged length field is never trusted: without
    it a corrupt length in the middle of a segment would look like a torn tail and the
    records after it would be cut away. ``zlib.crc32`` (stdlib, hardware-assisted in
    zlib-ng/modern zlib) is enough: it detects torn writes and random corruption; it is
    no defence against deliberate tampering, which is out of scope.

fsync policies (``fsync=``) and the worst-case loss window
    =========  ==========================================  =========================================
    policy     ``kill -9`` / process crash                 power loss / kernel crash
    =========  ==========================================  =========================================
    always     nothing whose ``append`` returned is lost;  same: nothing whose ``append`` returned is
               duplicates <= records in flight             lost, no ack that returned is lost (each
                                                           append and ack is fdatasync'ed before it
                                                           returns); assumes the disk honours flushes
    batch      nothing lost (every append is one           records appended (and acks made) in the
    (default)  ``pwrite`` into the page cache, which       last ``fsync_interval_s`` plus the time one
               survives the process); duplicates <=        fsync takes: a background thread fsyncs
               records in flight                           at most every ``fsync_interval_s``. A lost
                                                           ack only replays (duplicates <= acks of
                                                           that window + records in flight)
    never      nothing lost; duplicates <= in flight       whatever the kernel had not written back:
                                                           on Linux by default dirty pages older than
                                                           ``vm.dirty_expire_centisecs`` (30 s) are
                                                           written by a flusher that wakes every
                                                           ``vm.dirty_writeback_centisecs`` (5 s),
                                                           so typically <= ~35 s, but under memory
                                                           or I/O pressure there is no hard bound
    =========  ==========================================  =========================================

    In every case a crash never corrupts what is already durable: a record cut short (a
    torn tail) is detected by its CRC and truncated on the next open, the cursor has two
    slots so a torn cursor write falls back to the previous ack (a replay, never a loss).

Size cap
    ``max_bytes`` bounds the bytes of segment files (``disk_bytes``; ``pending_bytes``,
    the unacked records, is at most that). An append that would exceed it first drops
    the OLDEST whole segments, never the one being written; the unacked records they
    held are counted (``stats.dropped_records`` / ``dropped_bytes``) and one warning is
    logged per drop event on ``dcgmrelay.spool``. ``segment_bytes`` is clamped to
    ``max_bytes // 2`` so the cap keeps at least half of ``max_bytes`` after a drop. A
    record bigger than ``max_bytes`` is refused with :class:`SpoolFullError`.

Disk full and write errors
    An ``OSError`` while appending (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO`` ...) never
    escapes as such: the partial record is truncated away (if even that fails, it stays
    past the logical end, is overwritten by the next append, or is detected as a torn
    tail on the next open), ``stats.write_errors`` and ``stats.rejected_records`` are
    counted, and :class:`SpoolFullError` (a :class:`~dcgmrelay.errors.DcgmRelayError`)
    is raised: the caller counts that batch as lost. Earlier records are untouched. A
    failed cursor write in :meth:`Spool.ack` is counted and logged, not raised: the ack
    holds in memory and is written again with the next ack or :meth:`Spool.sync`; if
    the process dies first those records replay (at-least-once). ``ack`` deletes fully
    acked segments before writing the cursor, so acking frees space on a full disk.

Recovery on open
    Segments are scanned in name order and every record checked (header CRC, body CRC,
    strictly increasing ``seq``). Bad bytes after the last good record of the LAST
    segment are a torn tail: truncated away and counted in ``torn_records_skipped``.
    Bad bytes anywhere else are a corrupt record: skipped (the scan resumes at the next
    valid header, found by searching for the magic) and counted in
    ``corrupt_records_skipped``. Records at or below the persisted ack are skipped;
    the rest replay in append order. Appends after an open go to a new segment.

At-least-once
    A record leaves the spool only by :meth:`Spool.ack` (or the size cap). If the
    process dies between delivering a record and acking it, it is replayed: duplicates
    are bounded by the records delivered but not yet acked ("duplicates <= records in
    flight"), so ack after each successful delivery, not after a whole batch.

Threads and the event loop
    All public methods take one ``threading.RLock``: the spool may be used from several
    threads, though the relay uses it from its asyncio thread. Calls are synchronous
    file I/O: an append is one ``pwrite`` (plus one ``fdatasync`` with ``always``), a
    peek one ``pread`` per record, an ack one 32-byte ``pwrite``; for records up to a few
    MB that is fine to call from the event loop with ``batch``/``never``. With
    ``always`` each call waits for the disk (milliseconds on SSD, more on busy disks):
    call it through ``loop.run_in_executor`` if that matters. ``batch`` starts one
    daemon thread that does the periodic fsyncs on duplicated file descriptors, without
    holding the lock while the disk works. Opening scans every segment (reads all of
    it once: about a second per GiB), so open the spool before serving.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import DcgmRelayError

try:  # POSIX advisory lock; absent on Windows, where the spool is unlocked.
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None  # type: ignore[assignment]

__all__ = [
    "FSYNC_POLICIES",
    "HEADER_SIZE",
    "MAGIC",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
    "SpoolStats",
    "SpooledRecord",
]

logger = logging.getLogger("dcgmrelay.spool")

MAGIC = b"DRSP"
VERSION = 1
# magic, version, flags, meta_len, payload_len, seq, created_ms, body_crc, header_crc
_HEADER = struct.Struct("<4sBBHIQqII")
HEADER_SIZE = _HEADER.size  # 36
_HEADER_CRC_OFF = HEADER_SIZE - 4
MAX_META = 0xFFFF
MAX_PAYLOAD = 0xFFFFFFFF

_CURSOR_MAGIC = b"DRSC"
# magic, version, pad(3), generation, acked_seq, crc (of the first 24 bytes), pad(4)
_CURSOR = struct.Struct("<4sB3xQQI4x")
_CURSOR_SLOTS = (0, 4096)  # two slots in different 4 KiB blocks
_CURSOR_FILE_SIZE = _CURSOR_SLOTS[1] + _CURSOR.size

FSYNC_POLICIES = ("always", "batch", "never")
_SEG_SUFFIX = ".seg"
_SEQ_DIGITS = 20

MetaValue = Union[str, int]

# Indirections so tests can inject write failures (disk full) without touching ``os``.
_pwrite = os.pwrite
_ftruncate = os.ftruncate
_fdatasync = getattr(os, "fdatasync", os.fsync)


class SpoolError(DcgmRelayError):
    """Base of the spool's errors."""


class SpoolFullError(SpoolError):
    """An append that could not be stored (disk full, write error, record over the cap).

    The record is NOT in the spool (the loss is counted in ``stats.rejected_records``);
    the spool stays usable. ``errno`` is the ``OSError``'s errno, or ``None`` when the
    record is larger than ``max_bytes``.
    """

    def __init__(self, reason: str, *, errno: Optional[int] = None) -> None:
        self.reason = reason
        self.errno = errno
        super().__init__(reason)


class SpoolLockedError(SpoolError):
    """Another open spool (this or another process) holds the lock on this spool."""


@dataclass(frozen=True)
class SpooledRecord:
    """One pending record, as :meth:`Spool.peek` returns it."""

    seq: int
    payload: bytes
    meta: dict[str, MetaValue]
    created_ms: int


@dataclass(frozen=True)
class SpoolStats:
    """Counters since this :class:`Spool` was opened (they start at 0 on every open)."""

    appended: int = 0                  # records appended
    appended_bytes: int = 0            # their on-disk bytes (header + meta + payload)
    replayed: int = 0                  # distinct records handed out by peek()
    acked: int = 0                     # pending records removed by ack()
    dropped_records: int = 0           # unacked records dropped by the size cap
    dropped_bytes: int = 0
    rejected_records: int = 0          # appends refused (SpoolFullError): lost batches
    rejected_bytes: int = 0
    torn_records_skipped: int = 0      # torn tails truncated (open)
    corrupt_records_skipped: int = 0   # corrupt records skipped (open or read)
    corrupt_bytes_skipped: int = 0
    write_errors: int = 0              # OSErrors on write/fsync/truncate/cursor
    recovered_records: int = 0         # pending records found at open
    cursor_resets: int = 0             # cursor unreadable at open: everything replays


class _Segment:
    """An index of one segment file: where each still-pending record lives."""

    __slots__ = ("path", "first_seq", "size", "seqs", "offs", "lens", "created", "head",
                 "pending_bytes", "fd", "last_seq")

    def __init__(self, path: Path, first_seq: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.size = 0                   # bytes of valid content (the logical end)
        self.seqs = array("Q")
        self.offs = array("Q")
        self.lens = array("Q")
        self.created = array("q")
        self.head = 0                   # index of the first pending entry
        self.pending_bytes = 0
        self.fd: Optional[int] = None
        self.last_seq = 0               # highest valid seq in the file (0: none)

    @property
    def pending(self) -> int:
        return len(self.seqs) - self.head

    def add(self, seq: int, off: int, length: int, created_ms: int) -> None:
        self.seqs.append(seq)
        self.offs.append(off)
        self.lens.append(length)
        self.created.append(created_ms)
        self.pending_bytes += length
        self.last_seq = max(self.last_seq, seq)

    def pop_through(self, seq: int) -> tuple[int, int]:
        """Forget pending entries with seq <= ``seq``; return (records, bytes)."""
        n = b = 0
        while self.head < len(self.seqs) and self.seqs[self.head] <= seq:
            b += self.lens[self.head]
            n += 1
            self.head += 1
        self.pending_bytes -= b
        if self.head > 4096 and self.head * 2 > len(self.seqs):  # compact
            for arr in (self.seqs, self.offs, self.lens, self.created):
                del arr[: self.head]
            self.head = 0
        return n, b

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:  # pragma: no cover
                pass
            self.fd = None


def _seg_name(name: str, first_seq: int) -> str:
    return f"{name}-{first_seq:0{_SEQ_DIGITS}d}{_SEG_SUFFIX}"


def _encode_meta(meta: Mapping[str, MetaValue]) -> bytes:
    for k, v in meta.items():
        if not isinstance(k, str):
            raise TypeError(f"spool meta keys must be str, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise TypeError(f"spool meta values must be str or int, got {k}={v!r}")
    if not meta:
        return b""
    raw = json.dumps(dict(meta), separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > MAX_META:
        raise ValueError(f"spool meta is {len(raw)} bytes encoded, at most {MAX_META}")
    return raw


def encode_record(seq: int, payload: bytes, meta_raw: bytes, created_ms: int) -> bytes:
    """The bytes of one record (see the module docstring for the layout)."""
    body_crc = zlib.crc32(payload, zlib.crc32(meta_raw))
    head = _HEADER.pack(MAGIC, VERSION, 0, len(meta_raw), len(payload), seq, created_ms,
                        body_crc, 0)[:_HEADER_CRC_OFF]
    return b"".join((head, struct.pack("<I", zlib.crc32(head)), meta_raw, payload))


def _parse_header(buf: Any, pos: int) -> Optional[tuple[int, int, int, int, int]]:
    """(meta_len, payload_len, seq, created_ms, body_crc) of a valid header at ``pos``."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    magic, version, _flags, meta_len, payload_len, seq, created_ms, body_crc, hcrc = \
        _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or version != VERSION:
        return None
    if zlib.crc32(memoryview(buf)[pos:pos + _HEADER_CRC_OFF]) != hcrc:
        return None
    return meta_len, payload_len, seq, created_ms, body_crc


def _scan(buf: Any, prev_seq: int) -> tuple[list[tuple[int, int, int, int]], int, list[tuple[int, int]]]:
    """Validate the records of one segment's bytes.

    Returns ``(records, valid_end, bad_regions)``: ``records`` as (seq, offset, length,
    created_ms), ``valid_end`` the end of the last valid record, ``bad_regions`` the
    (start, end) byte ranges that are not valid records (in order; the last may run to
    the end of the buffer).
    """
    size = len(buf)
    view = memoryview(buf)
    pos = 0
    records: list[tuple[int, int, int, int]] = []
    bad: list[tuple[int, int]] = []
    valid_end = 0
    try:
        while pos < size:
            h = _parse_header(buf, pos)
            if h is not None:
                meta_len, payload_len, seq, created_ms, body_crc = h
                length = HEADER_SIZE + meta_len + payload_len
                end = pos + length
                if end <= size:
                    ok = zlib.crc32(view[pos + HEADER_SIZE:end]) == body_crc and seq > prev_seq
                    if ok:
                        records.append((seq, pos, length, created_ms))
                        prev_seq = seq
                        pos = valid_end = end
                        continue
                    bad.append((pos, end))  # header trusted: skip exactly this record
                    pos = end
                    continue
                # a valid header whose body runs past the end: torn (or cut) record
                bad.append((pos, size))
                break
            # no valid header here: resynchronise on the next magic with a valid header
            nxt = pos + 1
            while True:
                nxt = buf.find(MAGIC, nxt)
                if nxt < 0:
                    nxt = size
                    break
                if _parse_header(buf, nxt) is not None:
                    break
                nxt += 1
            bad.append((pos, nxt))
            pos = nxt
    finally:
        view.release()
    # merge adjacent bad regions (garbage followed by a bad record is one event)
    merged: list[tuple[int, int]] = []
    for s, e in bad:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return records, valid_end, merged


class Spool:
    """An on-disk FIFO of opaque records with at-least-once consumption.

    ``directory`` is created if missing. ``fsync`` is one of ``"always"``, ``"batch"``,
    ``"never"`` (see the module docstring for what each may lose). ``name`` prefixes
    every file, so several spools may share a directory.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike[str]],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: str = "batch",
        fsync_interval_s: float = 1.0,
        name: str = "spool",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if max_bytes < 1 or segment_bytes < 1:
            raise ValueError("max_bytes and segment_bytes must be positive")
        if not fsync_interval_s > 0:
            raise ValueError("fsync_interval_s must be > 0")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad spool name {name!r}")
        self.directory = Path(directory)
        self.name = name
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(min(segment_bytes, max(self.max_bytes // 2, 1)))
        self.fsync = fsync
        self.fsync_interval_s = float(fsync_interval_s)

        self._lock = threading.RLock()
        self._stats: dict[str, int] = dict.fromkeys(SpoolStats.__dataclass_fields__, 0)
        self._segments: list[_Segment] = []   # oldest first; the last may be active
        self._active: Optional[_Segment] = None
        self._needs_truncate = False          # a failed append left bytes past the end
        self._acked = 0
        self._cursor_gen = 0
        self._cursor_fd: Optional[int] = None
        self._cursor_failed = False
        self._next_seq = 1
        self._replayed_upto = 0
        self._dir_fd: Optional[int] = None
        self._lock_fd: Optional[int] = None
        self._closed = False
        # batch policy: what the syncer thread still has to make durable
        self._dirty_active = False
        self._dirty_cursor = False
        self._dirty_dir = False
        self._pending_sync_fds: list[int] = []
        self._stop = threading.Event()
        self._syncer: Optional[threading.Thread] = None

        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._take_lock()
            self._dir_fd = os.open(self.directory, os.O_RDONLY)
            self._open_cursor()
            self._recover()
        except BaseException:
            self._release_fds()
            raise
        if fsync == "batch":
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name=f"dcgmrelay-spool-sync-{name}")
            self._syncer.start()

    # ------------------------------------------------------------------ open / recovery
    def _take_lock(self) -> None:
        path = self.directory / f"{self.name}.lock"
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if _fcntl is None:  # pragma: no cover
            return
        try:
            _fcntl.flock(self._lock_fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolLockedError(f"spool {path} is in use by another Spool") from None
            raise

    def _open_cursor(self) -> None:
        path = self.directory / f"{self.name}.cursor"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._cursor_fd = fd
        data = os.pread(fd, _CURSOR_FILE_SIZE, 0)
        best: Optional[tuple[int, int]] = None
        for off in _CURSOR_SLOTS:
            slot = data[off:off + _CURSOR.size]
            if len(slot) < _CURSOR.size:
                continue
            magic, version, gen, acked, crc = _CURSOR.unpack(slot)
            if magic != _CURSOR_MAGIC or version != VERSION or zlib.crc32(slot[:24]) != crc:
                continue
            if best is None or gen > best[0]:
                best = (gen, acked)
        if best is not None:
            self._cursor_gen, self._acked = best
            return
        if any(data):
            self._stats["cursor_resets"] += 1
            logger.warning("spool %s: cursor file %s unreadable; replaying everything on disk",
                           self.name, path)
        # new (or reset) cursor: write both slots so the file never needs to grow again
        self._cursor_gen = 0
        self._write_cursor_slot(self._cursor_gen, self._acked)
        self._cursor_gen += 1
        self._write_cursor_slot(self._cursor_gen, self._acked)
        if self.fsync != "never":
            _fdatasync(fd)
            os.fsync(self._dir_fd)  # type: ignore[arg-type]

    def _write_cursor_slot(self, gen: int, acked: int) -> None:
        head = _CURSOR.pack(_CURSOR_MAGIC, VERSION, gen, acked, 0)[:24]
        slot = _CURSOR.pack(_CURSOR_MAGIC, VERSION, gen, acked, zlib.crc32(head))
        data = slot
        off = _CURSOR_SLOTS[gen % 2]
        while data:
            n = _pwrite(self._cursor_fd, data, off)  # type: ignore[arg-type]
            data = data[n:]
            off += n

    def _list_segments(self) -> list[tuple[int, Path]]:
        prefix = f"{self.name}-"
        found = []
        for entry in os.scandir(self.directory):
            n = entry.name
            if not (n.startswith(prefix) and n.endswith(_SEG_SUFFIX)):
                continue
            digits = n[len(prefix):-len(_SEG_SUFFIX)]
            if len(digits) != _SEQ_DIGITS or not digits.isdigit():
                continue
            found.append((int(digits), Path(entry.path)))
        found.sort()
        return found

    def _recover(self) -> None:
        found = self._list_segments()
        prev_seq = 0
        max_seq = self._acked
        for i, (first_seq, path) in enumerate(found):
            is_last = i == len(found) - 1
            # a segment named N exists only once seq N was handed out: N - 1 was used,
            # whatever is left in the file (keeps numbering monotonic across torn tails)
            max_seq = max(max_seq, first_seq - 1)
            seg = _Segment(path, first_seq)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        records, valid_end, bad = _scan(mm, prev_seq)
                else:
                    records, valid_end, bad = [], 0, []
            tail = bad[-1] if bad and bad[-1][1] == size and bad[-1][0] >= valid_end else None
            for s, e in bad:
                if (s, e) == tail and is_last:
                    continue
                self._stats["corrupt_records_skipped"] += 1
                self._stats["corrupt_bytes_skipped"] += e - s
                logger.warning("spool %s: corrupt record skipped in %s at bytes %d..%d",
                               self.name, path.name, s, e)
            seg.size = size
            if tail is not None and is_last:
                self._stats["torn_records_skipped"] += 1
                logger.warning("spool %s: torn record at the tail of %s (bytes %d..%d) "
                               "truncated", self.name, path.name, tail[0], size)
                try:
                    os.truncate(path, tail[0])
                    seg.size = tail[0]
                except OSError as err:  # stays; the next open finds it again
                    self._stats["write_errors"] += 1
                    logger.warning("spool %s: cannot truncate %s: %s", self.name, path.name, err)
            for seq, off, length, created_ms in records:
                seg.last_seq = seq
                if seq > self._acked:
                    seg.add(seq, off, length, created_ms)
            if records:
                prev_seq = records[-1][0]
                max_seq = max(max_seq, prev_seq)
            if seg.pending == 0:
                self._unlink(seg)  # fully acked, empty or only bad bytes
                continue
            self._segments.append(seg)
            self._stats["recovered_records"] += seg.pending
        self._next_seq = max_seq + 1
        if found and self._segments:
            logger.info("spool %s: %d pending records (%d bytes) in %d segments recovered",
                        self.name, len(self), self.pending_bytes, len(self._segments))

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.name} is closed")

    def _unlink(self, seg: _Segment) -> None:
        seg.close()
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._stats["write_errors"] += 1
            logger.warning("spool %s: cannot delete %s: %s", self.name, seg.path.name, err)

    def _seal_active(self) -> None:
        seg = self._active
        if seg is None:
            return
        self._active = None
        if self._needs_truncate and seg.fd is not None:
            self._try_truncate(seg)
        if self.fsync == "batch" and seg.fd is not None and self._dirty_active:
            try:
                self._pending_sync_fds.append(os.dup(seg.fd))
            except OSError:  # pragma: no cover
                pass
            self._dirty_active = False
        seg.close()  # reads reopen it read-only
        if seg.pending == 0:
            self._segments.remove(seg)
            self._unlink(seg)

    def _try_truncate(self, seg: _Segment) -> None:
        try:
            _ftruncate(seg.fd, seg.size)  # type: ignore[arg-type]
            self._needs_truncate = False
        except OSError as err:
            self._stats["write_errors"] += 1
            logger.warning("spool %s: cannot truncate %s after a failed write: %s",
                           self.name, seg.path.name, err)

    def _open_active(self) -> _Segment:
        path = self.directory / _seg_name(self.name, self._next_seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        seg = _Segment(path, self._next_seq)
        seg.fd = fd
        self._segments.append(seg)
        self._active = seg
        if self.fsync == "always":
            os.fsync(self._dir_fd)  # type: ignore[arg-type]
        elif self.fsync == "batch":
            self._dirty_dir = True
        return seg

    def _disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def _drop_for(self, need: int) -> None:
        """Drop the oldest sealed segments until ``need`` more bytes fit under the cap."""
        disk = self._disk_bytes()
        n_seg = n_rec = n_bytes = 0
        while disk + need > self.max_bytes:
            victim = next((s for s in self._segments if s is not self._active), None)
            if victim is None:
                break
            self._segments.remove(victim)
            disk -= victim.size
            n_seg += 1
            n_rec += victim.pending
            n_bytes += victim.pending_bytes
            self._unlink(victim)
        if n_seg:
            self._stats["dropped_records"] += n_rec
            self._stats["dropped_bytes"] += n_bytes
            logger.warning("spool %s: size cap of %d bytes reached: dropped the %d oldest "
                           "segment(s), %d unacked records (%d bytes)",
                           self.name, self.max_bytes, n_seg, n_rec, n_bytes)

    def _reject(self, reason: str, nbytes: int, err: Optional[OSError]) -> SpoolFullError:
        self._stats["rejected_records"] += 1
        self._stats["rejected_bytes"] += nbytes
        if err is not None:
            self._stats["write_errors"] += 1
        logger.warning("spool %s: record of %d bytes not spooled: %s", self.name, nbytes, reason)
        return SpoolFullError(reason, errno=None if err is None else err.errno)

    # ------------------------------------------------------------------ producer
    def append(self, payload: bytes, *, meta: Mapping[str, MetaValue] = {}) -> int:  # noqa: B006
        """Store one record; return its sequence number (1, 2, 3 ...).

        Sequence numbers increase across reopens and ``kill -9``; only a power loss
        (``batch``/``never``) can make numbers of records that are gone from the disk
        (lost, or acked and deleted) be handed out again, never one still pending.

        When this returns the record is in the page cache (a ``kill -9`` cannot lose it)
        and, with ``fsync="always"``, on disk. Raises :class:`SpoolFullError` when it
        could not be stored (the spool is unchanged and still usable), ``TypeError`` /
        ``ValueError`` for a bad ``meta``.
        """
        payload = bytes(payload) if not isinstance(payload, bytes) else payload
        meta_raw = _encode_meta(meta)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("spool payloads are at most 4 GiB - 1")
        with self._lock:
            self._check_open()
            size = HEADER_SIZE + len(meta_raw) + len(payload)
            if size > self.max_bytes:
                raise self._reject(f"record of {size} bytes is larger than max_bytes "
                                   f"({self.max_bytes})", size, None)
            active = self._active
            if active is not None and active.size and active.size + size > self.segment_bytes:
                self._seal_active()
            self._drop_for(size)
            seq = self._next_seq
            created_ms = time.time_ns() // 1_000_000
            data = encode_record(seq, payload, meta_raw, created_ms)
            try:
                seg = self._active or self._open_active()
                if self._needs_truncate:
                    self._try_truncate(seg)
                off = seg.size
                with memoryview(data) as view:
                    pos = 0
                    while pos < size:
                        n = _pwrite(seg.fd, view[pos:], off + pos)  # type: ignore[arg-type]
                        if n <= 0:  # pragma: no cover - POSIX reports an error instead
                            raise OSError(errno.EIO, "pwrite wrote nothing")
                        pos += n
                if self.fsync == "always":
                    _fdatasync(seg.fd)  # type: ignore[arg-type]
            except OSError as err:
                if self._active is not None:
                    # cut whatever part of the record reached the file (also after a
                    # failed fdatasync: the record must not count as stored)
                    self._needs_truncate = True
                    self._try_truncate(self._active)
                reason = os.strerror(err.errno) if err.errno else str(err)
                raise self._reject(reason, size, err) from err
            seg.add(seq, off, size, created_ms)
            seg.size = off + size
            self._next_seq = seq + 1
            self._dirty_active = True
            self._stats["appended"] += 1
            self._stats["appended_bytes"] += size
            return seq

    # ------------------------------------------------------------------ consumer
    def _read(self, seg: _Segment, i: int) -> Optional[SpooledRecord]:
        seq, off, length = seg.seqs[i], seg.offs[i], seg.lens[i]
        if seg.fd is None:
            seg.fd = os.open(seg.path, os.O_RDONLY)
        data = os.pread(seg.fd, length, off)
        h = _parse_header(data, 0)
        if h is not None and len(data) == length:
            meta_len, payload_len, hseq, created_ms, body_crc = h
            if (hseq == seq and HEADER_SIZE + meta_len + payload_len == length
                    and zlib.crc32(memoryview(data)[HEADER_SIZE:]) == body_crc):
                meta_raw = data[HEADER_SIZE:HEADER_SIZE + meta_len]
                try:
                    meta = json.loads(meta_raw) if meta_len else {}
                except ValueError:  # pragma: no cover - CRC-valid but not JSON
                    meta = None
                if isinstance(meta, dict):
                    return SpooledRecord(seq, data[HEADER_SIZE + meta_len:], meta, created_ms)
        self._stats["corrupt_records_skipped"] += 1
        self._stats["corrupt_bytes_skipped"] += length
        logger.warning("spool %s: record %d in %s is corrupt on read; skipped",
                       self.name, seq, seg.path.name)
        return None

    def peek(self, max_records: int = 1) -> list[SpooledRecord]:
        """The oldest pending records, at most ``max_records``, oldest first.

        Peeking does not consume: the same records come back until :meth:`ack`. A record
        found corrupt on read is skipped (counted) and forgotten.
        """
        out: list[SpooledRecord] = []
        with self._lock:
            self._check_open()
            for seg in list(self._segments):
                i = seg.head
                while i < len(seg.seqs) and len(out) < max_records:
                    rec = self._read(seg, i)
                    if rec is None:
                        self._forget(seg, i)  # entry i is gone; i is now the next one
                        continue
                    out.append(rec)
                    i += 1
                if len(out) >= max_records:
                    break
            if out and out[-1].seq > self._replayed_upto:
                self._stats["replayed"] += sum(1 for r in out if r.seq > self._replayed_upto)
                self._replayed_upto = out[-1].seq
        return out

    def _forget(self, seg: _Segment, i: int) -> None:
        seg.pending_bytes -= seg.lens[i]
        for arr in (seg.seqs, seg.offs, seg.lens, seg.created):
            del arr[i]
        if seg.pending == 0 and seg is not self._active:
            self._segments.remove(seg)
            self._unlink(seg)

    def ack(self, seq: int) -> None:
        """Mark every record with sequence <= ``seq`` delivered.

        Fully acked segments are deleted, then the ack position is written to the cursor
        file (and fdatasync'ed with ``always``). A failed cursor write is counted and
        logged, not raised (see the module docstring). Acking a seq never appended is a
        ``ValueError``; acking an older seq again is a no-op.
        """
        with self._lock:
            self._check_open()
            seq = int(seq)
            if seq >= self._next_seq:
                raise ValueError(f"ack({seq}): only {self._next_seq - 1} records were appended")
            if seq <= self._acked:
                if self._cursor_failed:
                    self._persist_cursor()
                return
            self._acked = seq
            emptied = []
            for seg in self._segments:
                n, _b = seg.pop_through(seq)
                self._stats["acked"] += n
                if seg.pending == 0:
                    emptied.append(seg)
                elif seg.seqs[seg.head] > seq:
                    break  # later segments hold only later records
            # cursor first, then delete: a crash in between leaves acked records on disk,
            # which the next open skips and deletes (so a kill -9 never reuses a seq)
            self._persist_cursor()
            for seg in emptied:
                self._segments.remove(seg)
                if seg is self._active:
                    self._active = None
                    self._needs_truncate = False
                    self._dirty_active = False
                self._unlink(seg)
            if self._cursor_failed and emptied:
                self._persist_cursor()  # deleting may have freed the space it needed

    def _persist_cursor(self) -> None:
        gen = self._cursor_gen + 1
        try:
            self._write_cursor_slot(gen, self._acked)
            if self.fsync == "always":
                _fdatasync(self._cursor_fd)  # type: ignore[arg-type]
        except OSError as err:
            self._stats["write_errors"] += 1
            if not self._cursor_failed:
                logger.warning("spool %s: cannot write the ack cursor (%s); acks replay if "
                               "the process dies before the next successful write",
                               self.name, err)
            self._cursor_failed = True
            return
        self._cursor_gen = gen
        self._cursor_failed = False
        self._dirty_cursor = True

    # ------------------------------------------------------------------ durability
    def sync(self) -> None:
        """Make everything appended and acked so far durable now, whatever the policy."""
        with self._lock:
            self._check_open()
            if self._cursor_failed:
                self._persist_cursor()
            fds = self._take_dirty(force=True)
        self._fsync_fds(fds)

    def _take_dirty(self, force: bool = False) -> list[int]:
        fds, self._pending_sync_fds = self._pending_sync_fds, []
        try:
            if (force or self._dirty_active) and self._active is not None \
                    and self._active.fd is not None:
                fds.append(os.dup(self._active.fd))
            if (force or self._dirty_cursor) and self._cursor_fd is not None:
                fds.append(os.dup(self._cursor_fd))
            if (force or self._dirty_dir) and self._dir_fd is not None:
                fds.append(os.dup(self._dir_fd))
        except OSError:  # pragma: no cover - out of fds: try again next round
            pass
        self._dirty_active = self._dirty_cursor = self._dirty_dir = False
        return fds

    def _fsync_fds(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as err:
                with self._lock:
                    self._stats["write_errors"] += 1
                logger.warning("spool %s: fsync failed: %s", self.name, err)
            finally:
                os.close(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            with self._lock:
                if self._closed:
                    return
                fds = self._take_dirty()
            if fds:
                self._fsync_fds(fds)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        with self._lock:
            return sum(s.pending for s in self._segments)

    @property
    def pending_bytes(self) -> int:
        """On-disk bytes (header + meta + payload) of the records not yet acked."""
        with self._lock:
            return sum(s.pending_bytes for s in self._segments)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segment files (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._disk_bytes()

    @property
    def acked_seq(self) -> int:
        """The ack position: every record with a seq up to this one is delivered."""
        return self._acked

    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`append` will return."""
        return self._next_seq

    @property
    def closed(self) -> bool:
        return self._closed

    def oldest_age_s(self, now: Optional[float] = None) -> float:
        """Seconds since the oldest pending record was appended (0.0 when empty).

        ``now`` is a UNIX time in seconds (default ``time.time()``).
        """
        with self._lock:
            for seg in self._segments:
                if seg.pending:
                    now_s = time.time() if now is None else now
                    return max(0.0, now_s - seg.created[seg.head] / 1000.0)
        return 0.0

    @property
    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(**self._stats)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Make everything durable (unless ``fsync="never"``) and release the spool."""
        with self._lock:
            if self._closed:
                return
            if self._active is not None and self._needs_truncate:
                self._try_truncate(self._active)
            if self._cursor_failed:
                self._persist_cursor()
            fds = self._take_dirty(force=True) if self.fsync != "never" else self._take_dirty()
            if self.fsync == "never":
                for fd in fds:
                    os.close(fd)
                fds = []
            self._closed = True
        self._stop.set()
        if self._syncer is not None and self._syncer is not threading.current_thread():
            self._syncer.join()
        self._fsync_fds(fds)
        with self._lock:
            self._release_fds()

    def _release_fds(self) -> None:
        for seg in self._segments:
            seg.close()
        for attr in ("_cursor_fd", "_dir_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                try:
                    os.close(fd)  # closing the lock fd releases the flock
                except OSError:  # pragma: no cover
                    pass
                setattr(self, attr, None)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} pending"
        return f"<Spool {self.name!r} at {str(self.directory)!r}: {state}, fsync={self.fsync}>"
