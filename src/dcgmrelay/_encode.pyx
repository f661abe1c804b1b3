# cython: language_level=3
"""Native encoder loops: the per-sample work of the remote write and text encoders.

Same functions, arguments and output bytes as the pure twin ``_encode_py.py`` (read its
docstrings); :mod:`dcgmrelay.encode` picks one. Everything per series arrives
precomputed as CSR tables (``buf[off[s]:off[s + 1]]``); these loops only frame samples.
Bodies are sized exactly (protobuf) or grown geometrically (text), then returned as one
``bytes`` object.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport fabs, floor, isinf, isnan, signbit
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags, int* ptype) except NULL

IMPLEMENTATION = "c"

__all__ = ["format_float", "gather", "rw1_body", "rw2_body", "rw2_refs", "text_body", "IMPLEMENTATION"]


# ------------------------------------------------------------------------------------------
# varints

cdef inline int vlen(uint64_t n) noexcept nogil:
    cdef int k = 1
    while n >= 0x80:
        n >>= 7
        k += 1
    return k


cdef inline char* put_varint(char* p, uint64_t n) noexcept nogil:
    while n >= 0x80:
        p[0] = <char>((n & 0x7F) | 0x80)
        p += 1
        n >>= 7
    p[0] = <char>n
    return p + 1


cdef inline uint64_t dbits(double v) noexcept nogil:
    cdef uint64_t b
    memcpy(&b, &v, 8)
    return b


cdef inline char* put_double(char* p, double v) noexcept nogil:
    memcpy(p, &v, 8)  # little-endian hosts only (x86-64, aarch64)
    return p + 8


# ------------------------------------------------------------------------------------------
# Go-style float formatting

cdef Py_ssize_t _go_digits(char* out, bint neg, const char* digits, int nd, int dp) noexcept:
    """Write sign + digits (no leading/trailing zeros, nd >= 1) with the decimal point at dp,
    in Go's 'g' shortest style. Returns the length."""
    cdef char* p = out
    cdef int exp = dp - 1
    cdef int i, ae
    if neg:
        p[0] = c'-'
        p += 1
    if exp < -4 or exp >= 6:
        p[0] = digits[0]
        p += 1
        if nd > 1:
            p[0] = c'.'
            p += 1
            memcpy(p, digits + 1, nd - 1)
            p += nd - 1
        p[0] = c'e'
        p[1] = c'-' if exp < 0 else c'+'
        p += 2
        ae = -exp if exp < 0 else exp
        if ae >= 100:
            p[0] = <char>(c'0' + ae // 100)
            p += 1
            ae %= 100
            p[0] = <char>(c'0' + ae // 10)
            p[1] = <char>(c'0' + ae % 10)
            p += 2
        else:
            p[0] = <char>(c'0' + ae // 10)
            p[1] = <char>(c'0' + ae % 10)
            p += 2
    elif dp <= 0:
        p[0] = c'0'
        p[1] = c'.'
        p += 2
        for i in range(-dp):
            p[0] = c'0'
            p += 1
        memcpy(p, digits, nd)
        p += nd
    elif dp >= nd:
        memcpy(p, digits, nd)
        p += nd
        for i in range(dp - nd):
            p[0] = c'0'
            p += 1
    else:
        memcpy(p, digits, dp)
        p += dp
        p[0] = c'.'
        p += 1
        memcpy(p, digits + dp, nd - dp)
        p += nd - dp
    return p - out


cdef Py_ssize_t fmt_float(double v, char* out) except -1:
    """Go strconv.FormatFloat(v, 'g', -1, 64) into out (at least 40 bytes)."""
    cdef char digits[32]
    cdef char tmp[24]
    cdef int nd, dp, k, i, e, esign
    cdef bint neg
    cdef uint64_t n
    cdef char* r
    cdef char* q
    if isnan(v):
        memcpy(out, b"NaN", 3)
        return 3
    if isinf(v):
        memcpy(out, b"+Inf" if v > 0 else b"-Inf", 4)
        return 4
    neg = signbit(v)
    if v == 0:
        if neg:
            memcpy(out, b"-0", 2)
            return 2
        out[0] = c'0'
        return 1
    if fabs(v) < 1e15 and v == floor(v):
        # integral: the integer's digits are the shortest round-trip digits
        n = <uint64_t>fabs(v)
        k = 0
        while n:
            tmp[k] = <char>(c'0' + n % 10)
            n //= 10
            k += 1
        dp = k
        for i in range(k):
            digits[i] = tmp[k - 1 - i]
        nd = k
        while nd > 1 and digits[nd - 1] == c'0':
            nd -= 1
        return _go_digits(out, neg, digits, nd, dp)
    r = PyOS_double_to_string(v, c'r', 0, 0, NULL)
    try:
        q = r
        if q[0] == c'-':
            q += 1
        nd = 0
        dp = -1
        while q[0] != 0 and q[0] != c'e':
            if q[0] == c'.':
                dp = nd
            elif nd < 30:
                digits[nd] = q[0]
                nd += 1
            q += 1
        if dp < 0:
            dp = nd
        if q[0] == c'e':
            q += 1
            esign = 1
            if q[0] == c'-':
                esign = -1
                q += 1
            elif q[0] == c'+':
                q += 1
            e = 0
            while q[0] != 0:
                e = e * 10 + (q[0] - c'0')
                q += 1
            dp += esign * e
        # strip leading zeros (0.00123 -> digits 123, dp -2)
        k = 0
        while k < nd - 1 and digits[k] == c'0':
            k += 1
        if k:
            for i in range(nd - k):
                digits[i] = digits[i + k]
            nd -= k
            dp -= k
        while nd > 1 and digits[nd - 1] == c'0':
            nd -= 1
        return _go_digits(out, neg, digits, nd, dp)
    finally:
        PyMem_Free(r)


def format_float(double v):
    """A float as Prometheus writes it (Go ``strconv.FormatFloat(v, 'g', -1, 64)``)."""
    cdef char buf[48]
    cdef Py_ssize_t n = fmt_float(v, buf)
    return buf[:n].decode("ascii")


cdef inline Py_ssize_t fmt_int(int64_t v, char* out) noexcept:
    cdef char tmp[24]
    cdef int k = 0, i
    cdef uint64_t n
    cdef Py_ssize_t pos = 0
    if v < 0:
        out[0] = c'-'
        pos = 1
        n = <uint64_t>(-(v + 1)) + 1
    else:
        n = <uint64_t>v
    if n == 0:
        out[pos] = c'0'
        return pos + 1
    while n:
        tmp[k] = <char>(c'0' + n % 10)
        n //= 10
        k += 1
    for i in range(k):
        out[pos + i] = tmp[k - 1 - i]
    return pos + k


cdef inline Py_ssize_t fmt_seconds(int64_t ms, char* out) noexcept:
    cdef Py_ssize_t pos = 0
    cdef uint64_t a
    cdef int64_t q, r
    cdef int d
    if ms < 0:
        out[0] = c'-'
        pos = 1
        a = <uint64_t>(-(ms + 1)) + 1
    else:
        a = <uint64_t>ms
    q = <int64_t>(a // 1000)
    r = <int64_t>(a % 1000)
    pos += fmt_int(q, out + pos)
    if r:
        out[pos] = c'.'
        out[pos + 1] = <char>(c'0' + r // 100)
        out[pos + 2] = <char>(c'0' + (r // 10) % 10)
        out[pos + 3] = <char>(c'0' + r % 10)
        pos += 4
        while out[pos - 1] == c'0':
            pos -= 1
    return pos


# ------------------------------------------------------------------------------------------
# CSR gather

def gather(const unsigned char[::1] buf, const int64_t[::1] off, const int64_t[::1] idx):
    """Concatenation of the CSR pieces ``buf[off[i]:off[i + 1]]`` for ``i`` in ``idx``."""
    cdef Py_ssize_t k, total = 0, n = idx.shape[0]
    cdef int64_t i, a, b
    for k in range(n):
        i = idx[k]
        total += off[i + 1] - off[i]
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    for k in range(n):
        i = idx[k]
        a = off[i]
        b = off[i + 1]
        if b > a:
            memcpy(p, &buf[a], b - a)
            p += b - a
    return out


# ------------------------------------------------------------------------------------------
# remote write 1.0

cdef inline Py_ssize_t _sample1_len(double v, int64_t t) noexcept nogil:
    cdef Py_ssize_t n = 0
    if dbits(v):
        n += 9
    if t:
        n += 1 + vlen(<uint64_t>t)
    return n


def rw1_body(const unsigned char[::1] lab_buf, const int64_t[::1] lab_off, const int64_t[::1] sids,
             const double[::1] values, const int64_t[::1] ts, bytes tail):
    """``prometheus.WriteRequest``: one ``TimeSeries`` per sample, then ``tail``."""
    cdef Py_ssize_t n = sids.shape[0], i, total = 0, L, S, inner
    cdef int64_t sid
    if values.shape[0] != n or ts.shape[0] != n:
        raise ValueError("column lengths differ")
    with nogil:
        for i in range(n):
            sid = sids[i]
            L = lab_off[sid + 1] - lab_off[sid]
            S = _sample1_len(values[i], ts[i])
            inner = L + 1 + vlen(S) + S
            total += 1 + vlen(inner) + inner
    cdef Py_ssize_t tlen = len(tail)
    out = PyBytes_FromStringAndSize(NULL, total + tlen)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef const char* tp = tail
    with nogil:
        for i in range(n):
            sid = sids[i]
            L = lab_off[sid + 1] - lab_off[sid]
            S = _sample1_len(values[i], ts[i])
            inner = L + 1 + vlen(S) + S
            p[0] = 0x0A
            p = put_varint(p + 1, inner)
            if L:
                memcpy(p, &lab_buf[lab_off[sid]], L)
                p += L
            p[0] = 0x12
            p = put_varint(p + 1, S)
            if dbits(values[i]):
                p[0] = 0x09
                p = put_double(p + 1, values[i])
            if ts[i]:
                p[0] = 0x10
                p = put_varint(p + 1, <uint64_t>ts[i])
        if tlen:
            memcpy(p, tp, tlen)
    return out


# ------------------------------------------------------------------------------------------
# remote write 2.0

def rw2_refs(const int64_t[::1] lab_off, const uint32_t[::1] refs, int64_t[::1] out_off):
    """Per series: its ``labels_refs`` field (packed varints); CSR offsets into ``out_off``."""
    cdef Py_ssize_t ns = lab_off.shape[0] - 1, s, total = 0, R
    cdef int64_t j
    if out_off.shape[0] != ns + 1:
        raise ValueError("out_off must have one entry per series plus one")
    out_off[0] = 0
    for s in range(ns):
        R = 0
        for j in range(lab_off[s], lab_off[s + 1]):
            R += vlen(refs[j])
        if R:
            total += 1 + vlen(R) + R
        out_off[s + 1] = total
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    for s in range(ns):
        R = 0
        for j in range(lab_off[s], lab_off[s + 1]):
            R += vlen(refs[j])
        if R:
            p[0] = 0x0A
            p = put_varint(p + 1, R)
            for j in range(lab_off[s], lab_off[s + 1]):
                p = put_varint(p, refs[j])
    return out


cdef inline Py_ssize_t _sample2_len(double v, int64_t t, int64_t st) noexcept nogil:
    cdef Py_ssize_t n = _sample1_len(v, t)
    if st:
        n += 1 + vlen(<uint64_t>st)
    return n


def rw2_body(bytes head, const unsigned char[::1] pre_buf, const int64_t[::1] pre_off,
             const unsigned char[::1] suf_buf, const int64_t[::1] suf_off, const int64_t[::1] ser_suf,
             const int64_t[::1] sids, const double[::1] values, const int64_t[::1] ts,
             const int64_t[::1] start):
    """``io.prometheus.write.v2.Request``: ``head`` (symbols), then one ``TimeSeries`` per sample."""
    cdef Py_ssize_t n = sids.shape[0], i, total, S, P, Q, inner
    cdef int64_t sid, g
    if values.shape[0] != n or ts.shape[0] != n or start.shape[0] != n:
        raise ValueError("column lengths differ")
    cdef Py_ssize_t hlen = len(head)
    total = hlen
    with nogil:
        for i in range(n):
            sid = sids[i]
            g = ser_suf[sid]
            P = pre_off[sid + 1] - pre_off[sid]
            Q = suf_off[g + 1] - suf_off[g]
            S = _sample2_len(values[i], ts[i], start[i])
            inner = P + 1 + vlen(S) + S + Q
            total += 1 + vlen(inner) + inner
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef const char* hp = head
    if hlen:
        memcpy(p, hp, hlen)
        p += hlen
    with nogil:
        for i in range(n):
            sid = sids[i]
            g = ser_suf[sid]
            P = pre_off[sid + 1] - pre_off[sid]
            Q = suf_off[g + 1] - suf_off[g]
            S = _sample2_len(values[i], ts[i], start[i])
            inner = P + 1 + vlen(S) + S + Q
            p[0] = 0x2A
            p = put_varint(p + 1, inner)
            if P:
                memcpy(p, &pre_buf[pre_off[sid]], P)
                p += P
            p[0] = 0x12
            p = put_varint(p + 1, S)
            if dbits(values[i]):
                p[0] = 0x09
                p = put_double(p + 1, values[i])
            if ts[i]:
                p[0] = 0x10
                p = put_varint(p + 1, <uint64_t>ts[i])
            if start[i]:
                p[0] = 0x18
                p = put_varint(p + 1, <uint64_t>start[i])
            if Q:
                memcpy(p, &suf_buf[suf_off[g]], Q)
                p += Q
    return out


# ------------------------------------------------------------------------------------------
# text exposition

cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = b.len + extra
    cdef Py_ssize_t cap
    cdef char* nd
    if want <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < want:
        cap *= 2
    nd = <char*>PyMem_Realloc(b.data, cap)
    if nd == NULL:
        raise MemoryError()
    b.data = nd
    b.cap = cap
    return 0


def text_body(const unsigned char[::1] pre_buf, const int64_t[::1] pre_off,
              const unsigned char[::1] hdr_buf, const int64_t[::1] hdr_off,
              const int64_t[::1] ser_group, const int64_t[::1] order, const int64_t[::1] sids,
              const double[::1] values, const int64_t[::1] ts, int ts_mode, bytes tail):
    """Text exposition lines, family headers before each change of group, then ``tail``."""
    cdef Py_ssize_t n = order.shape[0], k, i, L, H
    cdef int64_t sid, g, last = -1
    cdef Buf b
    b.data = NULL
    b.len = 0
    b.cap = 0
    cdef Py_ssize_t tlen = len(tail)
    cdef const char* tp = tail
    try:
        buf_reserve(&b, n * 64 + tlen + 64)
        for k in range(n):
            i = order[k]
            sid = sids[i]
            g = ser_group[sid]
            L = pre_off[sid + 1] - pre_off[sid]
            if g != last:
                H = hdr_off[g + 1] - hdr_off[g]
                if H:
                    buf_reserve(&b, H)
                    memcpy(b.data + b.len, &hdr_buf[hdr_off[g]], H)
                    b.len += H
                last = g
            buf_reserve(&b, L + 80)
            if L:
                memcpy(b.data + b.len, &pre_buf[pre_off[sid]], L)
                b.len += L
            b.data[b.len] = c' '
            b.len += 1
            b.len += fmt_float(values[i], b.data + b.len)
            if ts_mode == 1:
                b.data[b.len] = c' '
                b.len += 1
                b.len += fmt_int(ts[i], b.data + b.len)
            elif ts_mode == 2:
                b.data[b.len] = c' '
                b.len += 1
                b.len += fmt_seconds(ts[i], b.data + b.len)
            b.data[b.len] = 10
            b.len += 1
        if tlen:
            buf_reserve(&b, tlen)
            memcpy(b.data + b.len, tp, tlen)
            b.len += tlen
        return PyBytes_FromStringAndSize(b.data, b.len)
    finally:
        PyMem_Free(b.data)
