# Native parser of Prometheus text / OpenMetrics bodies into columns.
#
# The fast path handles an ordinary sample line in C: metric name, label block,
# value and an integer timestamp. dcgm-exporter repeats each GPU's exact label
# block in every family, so a label block is hashed and compared as bytes
# against the blocks already seen; only a new block is parsed (by the shared
# Builder in _parser_py). Anything unusual on a line (a special value, an
# OpenMetrics timestamp or exemplar, a syntax error) sends the whole line to the
# Builder, which is also what the pure-Python twin runs: both report the same
# errors by construction.
#
# No NumPy headers: output arrays are NumPy arrays filled through typed memoryviews.

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII
from cpython.object cimport PyObject

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)

import gc

import numpy as np

from ._parser_py import MEMO_MAX_KEY, TS_ABSENT, Builder, LineError, RawScrape, keep_memo

cdef int64_t C_TS_ABSENT = TS_ABSENT

#: parse_raw copies its columns to their length when more than half of their slots are
#: spare and the spare slots are more than this many (24 bytes each over the four columns):
#: a body of garbage lines does not keep a large empty buffer alive, and a copy is made only
#: when it saves that much.
SPARE_MAX = 4096

cdef double POW10[23]
POW10[0] = 1.0
for _i in range(1, 23):
    POW10[_i] = POW10[_i - 1] * 10.0

# Character classes, indexed by byte.
cdef unsigned char NAME_START[256]
cdef unsigned char NAME_CHAR[256]
cdef unsigned char LABEL_START[256]
cdef unsigned char LABEL_CHAR[256]
for _i in range(256):
    LABEL_START[_i] = (ord('a') <= _i <= ord('z')) or (ord('A') <= _i <= ord('Z')) or _i == ord('_')
    LABEL_CHAR[_i] = LABEL_START[_i] or (ord('0') <= _i <= ord('9'))
    NAME_START[_i] = LABEL_START[_i] or _i == ord(':')
    NAME_CHAR[_i] = LABEL_CHAR[_i] or _i == ord(':')

# Label blocks with more labels than this go to the Builder (the duplicate check is quadratic).
DEF MAX_FAST_LABELS = 64


cdef void* realloc_or_raise(void* p, size_t n) except NULL:
    cdef void* q = realloc(p, n)
    if q == NULL:
        raise MemoryError()
    return q


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9  # ' ', '\t'


cdef inline uint64_t hash_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Word-at-a-time multiplicative hash; collisions are resolved by memcmp.
    cdef uint64_t h = <uint64_t>n * 0x9E3779B97F4A7C15ULL
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 32
        p += 8
        n -= 8
    w = 0
    if n > 0:
        memcpy(&w, p, n)
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 29
    return h


cdef struct Slot:
    uint64_t hash
    Py_ssize_t off      # offset of the block in the input buffer (valid for one parse)
    Py_ssize_t length
    int32_t lid         # label-set id; -1 marks an empty slot


cdef class _BlockCache:
    """Open-addressing map: label-block bytes (by position in the input) -> label-set id."""
    cdef Slot* slots
    cdef Py_ssize_t mask
    cdef Py_ssize_t used

    def __cinit__(self):
        self.mask = 255
        self.used = 0
        self.slots = <Slot*>malloc((self.mask + 1) * sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError()
        self._clear(self.slots, self.mask + 1)

    def __dealloc__(self):
        free(self.slots)

    cdef void _clear(self, Slot* s, Py_ssize_t n) noexcept:
        cdef Py_ssize_t i
        for i in range(n):
            s[i].lid = -1

    cdef inline int32_t lookup(self, const unsigned char* base, Py_ssize_t off, Py_ssize_t n,
                               uint64_t h) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self.mask)
        cdef Slot* s
        while True:
            s = &self.slots[i]
            if s.lid < 0:
                return -1
            if s.hash == h and s.length == n and memcmp(base + s.off, base + off, n) == 0:
                return s.lid
            i = (i + 1) & self.mask

    cdef int insert(self, Py_ssize_t off, Py_ssize_t n, uint64_t h, int32_t lid) except -1:
        cdef Py_ssize_t i, cap, j
        cdef Slot* old
        cdef Slot* fresh
        if (self.used + 1) * 2 > self.mask + 1:
            cap = (self.mask + 1) * 2
            fresh = <Slot*>malloc(cap * sizeof(Slot))
            if fresh == NULL:
                raise MemoryError()
            self._clear(fresh, cap)
            old = self.slots
            for j in range(self.mask + 1):
                if old[j].lid >= 0:
                    i = <Py_ssize_t>(old[j].hash & <uint64_t>(cap - 1))
                    while fresh[i].lid >= 0:
                        i = (i + 1) & (cap - 1)
                    fresh[i] = old[j]
            self.slots = fresh
            self.mask = cap - 1
            free(old)
        i = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.slots[i].lid >= 0:
            i = (i + 1) & self.mask
        self.slots[i].hash = h
        self.slots[i].off = off
        self.slots[i].length = n
        self.slots[i].lid = lid
        self.used += 1
        return 0


cdef inline bint parse_float_fast(const unsigned char* p, Py_ssize_t n, double* out) noexcept nogil:
    # Decimal with optional fraction and exponent, converted exactly when the
    # mantissa fits 53 bits and the power of ten is exact (Clinger's fast path):
    # one correctly rounded multiply or divide gives the same double as strtod.
    # Anything else (NaN, Inf, long mantissas) is left to the Builder.
    cdef Py_ssize_t i = 0
    cdef bint neg = False
    cdef uint64_t m = 0
    cdef int digits = 0
    cdef int frac = 0
    cdef int e = 0
    cdef int esign = 1
    cdef int edigits = 0
    cdef unsigned char c
    if n == 0:
        return False
    c = p[0]
    if c == 45 or c == 43:  # '-', '+'
        neg = c == 45
        i = 1
    while i < n:
        c = p[i]
        if 48 <= c <= 57:
            if m > 900719925474099ULL:  # another digit could pass 2**53
                return False
            m = m * 10 + (c - 48)
            digits += 1
            i += 1
        else:
            break
    if i < n and p[i] == 46:  # '.'
        i += 1
        while i < n:
            c = p[i]
            if 48 <= c <= 57:
                if m > 900719925474099ULL:
                    return False
                m = m * 10 + (c - 48)
                digits += 1
                frac += 1
                i += 1
            else:
                break
    if digits == 0:
        return False
    if i < n and (p[i] == 101 or p[i] == 69):  # 'e', 'E'
        i += 1
        if i < n and (p[i] == 45 or p[i] == 43):
            if p[i] == 45:
                esign = -1
            i += 1
        while i < n and 48 <= p[i] <= 57:
            if edigits > 4:
                return False
            e = e * 10 + (p[i] - 48)
            edigits += 1
            i += 1
        if edigits == 0:
            return False
    if i != n:
        return False
    e = esign * e - frac
    cdef double v = <double>m
    if e > 0:
        if e > 22:
            return False
        v = v * POW10[e]
    elif e < 0:
        if e < -22:
            return False
        v = v / POW10[-e]
    out[0] = -v if neg else v
    return True


cdef inline bint parse_int_ts_fast(const unsigned char* p, Py_ssize_t n, int64_t* out) noexcept nogil:
    # Integer milliseconds of at most 18 digits (cannot overflow); anything else goes to the Builder.
    cdef Py_ssize_t i = 0
    cdef bint neg = False
    cdef int64_t v = 0
    if n > 0 and p[0] == 45:
        neg = True
        i = 1
    if i == n or n - i > 18:
        return False
    while i < n:
        if not (48 <= p[i] <= 57):
            return False
        v = v * 10 + (p[i] - 48)
        i += 1
    out[0] = -v if neg else v
    return True


cdef class _Parser:
    cdef object builder
    cdef dict memo               # the last body's blocks and comments (read only)
    cdef dict kept               # this body's: the Builder's ``kept``, which replaces ``memo`` at the end
    cdef dict ls_by_key          # the Builder's tables, updated here directly on the hot path
    cdef dict families
    cdef list labelsets
    # label-name sequence (bytes, comma-joined) -> (names as str, permutation sorting them):
    # a scrape has a handful of label schemas, so names are decoded and sorted once per schema
    cdef dict schemas
    cdef _BlockCache cache
    cdef const unsigned char* base
    cdef bint om
    cdef int32_t empty_lid
    # last metric name seen: most lines repeat the previous line's name
    cdef Py_ssize_t last_off
    cdef Py_ssize_t last_len
    cdef int32_t last_nid
    # Per label set: where its block was first seen, and the set that followed it last
    # time. dcgm-exporter writes the GPUs in the same order in every family, so the
    # successor predicts the next block and one memcmp confirms it.
    cdef Py_ssize_t* blk_off
    cdef Py_ssize_t* blk_len
    cdef int32_t* succ
    cdef Py_ssize_t n_lids
    cdef int32_t prev_lid
    cdef readonly int lineno

    def __cinit__(self):
        self.cache = _BlockCache()
        self.schemas = {}
        self.empty_lid = -1
        self.last_len = -1
        self.last_nid = -1
        self.prev_lid = -1
        self.n_lids = 0
        self.blk_off = NULL
        self.blk_len = NULL
        self.succ = NULL

    def __dealloc__(self):
        free(self.blk_off)
        free(self.blk_len)
        free(self.succ)

    cdef int comment_seen(self, const unsigned char* line, Py_ssize_t n) except -1:
        """Builder.comment's steady state without a Python call per line: a HELP/TYPE/UNIT line
        (or plain comment) already in the memo is applied here. 0 sends the line to the
        Builder: not remembered, '# EOF', or a duplicate it must report."""
        if self.memo is None:
            return 0
        cdef Py_ssize_t pre = 2 if self.om else 1  # the Builder's key: b"\n\x01" or b"\n", then the line
        key = PyBytes_FromStringAndSize(NULL, pre + n)
        cdef char* k = PyBytes_AS_STRING(key)
        k[0] = 10
        if self.om:
            k[1] = 1
        memcpy(k + pre, line, n)
        rec = self.memo.get(key)
        if rec is None or type(rec) is not tuple:
            return 0
        cdef tuple r = <tuple>rec
        if len(r) == 0:
            self.kept[key] = rec
            return 1  # a plain comment
        if len(r) != 4:
            return 0  # '# EOF'
        slot, name, value = r[0], r[1], r[2]
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = [None, None, None]
        if (<list>fam)[slot] is not None:
            return 0
        (<list>fam)[slot] = value
        self.kept[key] = rec
        return 1

    cdef object parse_block_fast(self, const unsigned char* b, Py_ssize_t n):
        """Memo entry (ordered pairs, sorted pairs) of a plain label block, or None for the Builder.

        Plain means: no backslash in a value, no duplicate name, valid UTF-8, at most
        MAX_FAST_LABELS labels. The result equals the Builder's for such blocks.
        """
        cdef Py_ssize_t i = 0, j, k, r, count = 0, x, siglen = 0
        cdef Py_ssize_t name_off[MAX_FAST_LABELS]
        cdef Py_ssize_t name_len[MAX_FAST_LABELS]
        cdef Py_ssize_t val_off[MAX_FAST_LABELS]
        cdef Py_ssize_t val_len[MAX_FAST_LABELS]
        cdef char sig[2048]
        cdef const unsigned char* hit
        while i < n and is_ws(b[i]):
            i += 1
        while i < n:
            if not LABEL_START[b[i]]:
                return None
            j = i + 1
            while j < n and LABEL_CHAR[b[j]]:
                j += 1
            k = j
            while k < n and is_ws(b[k]):
                k += 1
            if k >= n or b[k] != 61:  # '='
                return None
            k += 1
            while k < n and is_ws(b[k]):
                k += 1
            if k >= n or b[k] != 34:
                return None
            hit = <const unsigned char*>memchr(b + k + 1, 34, n - k - 1)
            if hit == NULL:
                return None
            r = hit - b
            if memchr(b + k + 1, 92, r - k - 1) != NULL:  # a backslash: escapes are the Builder's job
                return None
            if count == MAX_FAST_LABELS or siglen + (j - i) + 1 > 2048:
                return None
            for x in range(count):
                if name_len[x] == j - i and memcmp(b + name_off[x], b + i, j - i) == 0:
                    return None
            name_off[count] = i
            name_len[count] = j - i
            val_off[count] = k + 1
            val_len[count] = r - k - 1
            memcpy(sig + siglen, b + i, j - i)
            siglen += j - i
            sig[siglen] = 44
            siglen += 1
            count += 1
            i = r + 1
            while i < n and is_ws(b[i]):
                i += 1
            if i >= n:
                break
            if b[i] != 44:  # ','
                return None
            i += 1
            while i < n and is_ws(b[i]):
                i += 1
        sigb = PyBytes_FromStringAndSize(sig, siglen)
        schema = self.schemas.get(sigb)
        if schema is None:
            names = tuple([PyUnicode_DecodeASCII(<const char*>b + name_off[x], name_len[x], NULL)
                           for x in range(count)])
            perm = tuple(sorted(range(count), key=names.__getitem__))
            schema = self.schemas[sigb] = (names, perm)
        names, perm = schema
        cdef list pairs = []
        try:
            for x in range(count):
                pair = (names[x], PyUnicode_DecodeUTF8(<const char*>b + val_off[x], val_len[x], NULL))
                PyObject_GC_UnTrack(<PyObject*>pair)
                pairs.append(pair)
        except UnicodeDecodeError:
            return None
        # Tuples of strings can hold no reference cycle; untracked now, the cyclic GC never
        # walks the (many, long-lived) label tables, which CPython would only find out at
        # its first collection after the parse.
        ordered = tuple(pairs)
        key = tuple([ordered[x] for x in perm])
        entry = (ordered, key)
        PyObject_GC_UnTrack(<PyObject*>ordered)
        PyObject_GC_UnTrack(<PyObject*>key)
        PyObject_GC_UnTrack(<PyObject*>entry)
        return entry

    cdef int32_t register(self, tuple entry) except -1:
        """Label-set id of a memo entry (as Builder.labelset_id, without the Python call)."""
        lid_obj = self.ls_by_key.get(entry[1])
        if lid_obj is not None:
            return lid_obj
        cdef int32_t lid = len(self.labelsets)
        self.ls_by_key[entry[1]] = lid
        self.labelsets.append(entry[0])
        return lid

    cdef int remember(self, int32_t lid, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap, i
        if lid >= self.n_lids:
            cap = max(64, 2 * (lid + 1))
            self.blk_off = <Py_ssize_t*>realloc_or_raise(self.blk_off, cap * sizeof(Py_ssize_t))
            self.blk_len = <Py_ssize_t*>realloc_or_raise(self.blk_len, cap * sizeof(Py_ssize_t))
            self.succ = <int32_t*>realloc_or_raise(self.succ, cap * sizeof(int32_t))
            for i in range(self.n_lids, cap):
                self.blk_len[i] = -1
                self.succ[i] = -1
            self.n_lids = cap
        if self.blk_len[lid] < 0:
            self.blk_off[lid] = off
            self.blk_len[lid] = n
        return 0

    cdef Py_ssize_t run(self, const unsigned char* b, Py_ssize_t n, double[::1] values, int64_t[::1] tss,
                        int32_t[::1] nids, int32_t[::1] lids) except -1:
        """The line loop: fills the columns, returns the number of samples."""
        cdef Py_ssize_t pos = 0, eol, lend, p, line_start, k = 0
        cdef const unsigned char* hit
        cdef int lineno = 0
        cdef int32_t nid, lid
        cdef double v
        cdef int64_t ts
        cdef bint eof = False
        builder = self.builder
        while pos < n:
            hit = <const unsigned char*>memchr(b + pos, 10, n - pos)
            eol = (hit - b) if hit != NULL else n
            lend = eol
            if lend > pos and b[lend - 1] == 13:  # '\r'
                lend -= 1
            lineno += 1
            line_start = pos
            pos = eol + 1
            if eof:
                if builder.after_eof(PyBytes_FromStringAndSize(<const char*>b + line_start, lend - line_start), lineno):
                    break
                continue
            p = line_start
            while p < lend and is_ws(b[p]):
                p += 1
            if p == lend:
                continue
            if b[p] == 35:  # '#'
                if not self.comment_seen(b + line_start, lend - line_start):
                    builder.comment(PyBytes_FromStringAndSize(<const char*>b + line_start, lend - line_start),
                                    p - line_start, lineno)
                    eof = builder.eof
                continue
            if not self.fast_sample(p, lend, &nid, &lid, &v, &ts):
                s = builder.sample(PyBytes_FromStringAndSize(<const char*>b + line_start, lend - line_start),
                                   p - line_start, lineno)
                if s is None:
                    continue
                nid, lid, v, ts = s
            if k >= nids.shape[0]:  # cannot happen (parse_raw counts every line that can be a sample)
                raise AssertionError("more samples than sample lines")
            nids[k] = nid
            lids[k] = lid
            values[k] = v
            tss[k] = ts
            k += 1
        self.lineno = lineno
        return k

    cdef int fast_sample(self, Py_ssize_t p, Py_ssize_t lend, int32_t* nid_out, int32_t* lid_out,
                         double* v_out, int64_t* ts_out) except -1:
        """1 if the line was taken by the fast path, 0 to hand it to the Builder."""
        cdef const unsigned char* b = self.base
        cdef Py_ssize_t q, r, bstart, bend, v_end
        cdef int32_t lid
        if not NAME_START[b[p]]:
            return 0
        q = p + 1
        while q < lend and NAME_CHAR[b[q]]:
            q += 1
        r = q
        while r < lend and is_ws(b[r]):
            r += 1
        if r < lend and b[r] == 123:  # '{'
            bstart = r + 1
            lid = self.succ[self.prev_lid] if self.prev_lid >= 0 else -1
            if lid >= 0:
                bend = bstart + self.blk_len[lid]
                if not (bend < lend and b[bend] == 125
                        and memcmp(b + self.blk_off[lid], b + bstart, bend - bstart) == 0):
                    lid = -1
            if lid < 0:
                lid = self.find_block(bstart, lend, &bend)
                if lid < 0:
                    return 0
            if self.prev_lid >= 0:
                self.succ[self.prev_lid] = lid
            self.prev_lid = lid
            r = bend + 1
        else:
            if r == q and r < lend:
                return 0
            if self.empty_lid < 0:
                self.empty_lid = self.builder.block_id(b"")
            lid = self.empty_lid
        while r < lend and is_ws(b[r]):
            r += 1
        if r >= lend:
            return 0
        v_end = r
        while v_end < lend and not is_ws(b[v_end]):
            v_end += 1
        if not parse_float_fast(b + r, v_end - r, v_out):
            return 0
        r = v_end
        while r < lend and is_ws(b[r]):
            r += 1
        ts_out[0] = C_TS_ABSENT
        if r < lend:
            if self.om:
                return 0  # seconds timestamps and exemplars: the Builder's job
            v_end = r
            while v_end < lend and not is_ws(b[v_end]):
                v_end += 1
            if not parse_int_ts_fast(b + r, v_end - r, ts_out):
                return 0
            r = v_end
            while r < lend and is_ws(b[r]):
                r += 1
            if r < lend:
                return 0
        # the name is registered only now, for an accepted line (as the Builder does)
        if q - p == self.last_len and memcmp(b + self.last_off, b + p, q - p) == 0:
            nid_out[0] = self.last_nid
        else:
            self.last_nid = self.builder.name_id(PyBytes_FromStringAndSize(<const char*>b + p, q - p))
            self.last_off = p
            self.last_len = q - p
            nid_out[0] = self.last_nid
        lid_out[0] = lid
        return 1

    cdef int32_t find_block(self, Py_ssize_t bstart, Py_ssize_t lend, Py_ssize_t* bend_out) except -2:
        """Label-set id of the block starting at ``bstart`` (its '}' goes to bend_out); -1: not fast."""
        cdef const unsigned char* b = self.base
        cdef Py_ssize_t bend = bstart, k, nbs
        cdef const unsigned char* hit
        cdef unsigned char c
        cdef uint64_t h
        cdef int32_t lid
        # find the closing '}' outside quotes
        while True:
            while bend < lend:
                c = b[bend]
                if c == 34 or c == 125:  # '"', '}'
                    break
                bend += 1
            if bend >= lend:
                return -1
            if b[bend] == 125:
                break
            bend += 1
            while True:
                hit = <const unsigned char*>memchr(b + bend, 34, lend - bend)
                if hit == NULL:
                    return -1
                k = hit - b
                nbs = 0
                while k - 1 - nbs >= bend and b[k - 1 - nbs] == 92:  # '\\'
                    nbs += 1
                bend = k + 1
                if nbs % 2 == 0:
                    break
        h = hash_bytes(b + bstart, bend - bstart)
        lid = self.cache.lookup(b, bstart, bend - bstart, h)
        if lid < 0:
            block = PyBytes_FromStringAndSize(<const char*>b + bstart, bend - bstart)
            entry = self.memo.get(block) if self.memo is not None else None
            if entry is None:
                entry = self.parse_block_fast(b + bstart, bend - bstart)
                if entry is not None:
                    self.builder.added += 1
            if entry is not None:
                if self.kept is not None and bend - bstart <= MEMO_MAX_KEY:
                    self.kept[block] = entry
                lid = self.register(entry)
            else:
                try:
                    lid = self.builder.block_id(block)
                except LineError:
                    return -1
            self.cache.insert(bstart, bend - bstart, h, lid)
            self.remember(lid, bstart, bend - bstart)
        bend_out[0] = bend
        return lid


def parse_raw(data, bint om, bint strict, int max_errors, source, dict memo=None):
    """Parse a whole body; the native implementation (same contract as _parser_py.parse_raw)."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t n = view.shape[0]
    cdef const unsigned char* b = &view[0] if n > 0 else NULL
    cdef Py_ssize_t cap = 0, pos = 0, k = 0
    cdef const unsigned char* hit
    cdef int lineno

    # One slot per line that can hold a sample (a line holds at most one): every line but an
    # empty one and one that starts with '#' (a comment, whatever follows). So a body of
    # HELP/TYPE lines (a one-GPU dcgm-exporter page is two thirds comments) gets columns of
    # exactly its samples, and the columns are returned without a copy.
    while pos < n:
        if b[pos] != 35 and b[pos] != 10:  # '#', '\n'
            cap += 1
        hit = <const unsigned char*>memchr(b + pos, 10, n - pos)
        if hit == NULL:
            break
        pos = hit - b + 1
    values_a = np.empty(cap, dtype=np.float64)
    ts_a = np.empty(cap, dtype=np.int64)
    nid_a = np.empty(cap, dtype=np.int32)
    lid_a = np.empty(cap, dtype=np.int32)
    cdef double[::1] values = values_a
    cdef int64_t[::1] tss = ts_a
    cdef int32_t[::1] nids = nid_a
    cdef int32_t[::1] lids = lid_a

    builder = Builder(om, strict, max_errors, source, memo)
    cdef _Parser ps = _Parser()
    ps.builder = builder
    ps.memo = memo
    ps.kept = builder.kept
    ps.ls_by_key = builder._ls_by_key
    ps.labelsets = builder.labelsets
    ps.families = builder.families
    ps.base = b
    ps.om = om

    # A parse creates one tuple per new label set and frees none of them; the cyclic GC
    # would walk them over and over while they can only be live, so it waits until the end.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        k = ps.run(b, n, values, tss, nids, lids)
    finally:
        if gc_was_enabled:
            gc.enable()
    lineno = ps.lineno
    builder.finish(lineno)
    keep_memo(memo, builder.kept, builder.added)
    if cap - k > k and cap - k > SPARE_MAX:
        # lines that could have been samples and were not (errors, garbage, after '# EOF'):
        # do not keep a mostly empty buffer alive when that is much memory
        values_a, ts_a, nid_a, lid_a = values_a[:k].copy(), ts_a[:k].copy(), nid_a[:k].copy(), lid_a[:k].copy()
    else:
        values_a, ts_a, nid_a, lid_a = values_a[:k], ts_a[:k], nid_a[:k], lid_a[:k]
    return RawScrape(values_a, ts_a, nid_a, lid_a, builder.names, builder.labelsets, builder.families,
                     builder.errors, builder.n_errors, lineno)

