"""Native vs pure twin vs prometheus_client, on generated, mutated and hostile input.

The two dcgmrelay parsers must agree on *everything* (columns, tables, metadata,
errors) for any bytes at all; both must agree with prometheus_client on names,
labels and values for valid input.
"""

from __future__ import annotations

import math
import os
import resource
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import dcgmrelay

from conftest import HAVE_C, REAL_PAYLOADS

# Compares the native core with the twin: the pure install's run deselects it (-m "not c_extension").
pytestmark = [pytest.mark.c_extension,
              pytest.mark.skipif(not HAVE_C and os.environ.get("CI") != "true", reason="native parser not built")]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def snapshot(s: dcgmrelay.Scrape):
    """Everything a Scrape holds, in comparable form (NaN-safe)."""
    return (
        s.format, s.values.view(np.int64).tolist(), s.timestamps.tolist(), s.name_ids.tolist(),
        s.labelset_ids.tolist(), s.field_ids.tolist(), s.names, s.labelsets, s._families_raw,
        s.errors, s.n_errors,
    )


def both(data: bytes, **kw):
    c = dcgmrelay.parse(data, implementation="c", **kw)
    p = dcgmrelay.parse(data, implementation="py", **kw)
    assert snapshot(c) == snapshot(p)
    return c


def both_strict(data: bytes, **kw):
    """Strict mode: both raise the same error or both succeed identically."""
    out = []
    for impl in ("c", "py"):
        try:
            out.append(("ok", snapshot(dcgmrelay.parse(data, implementation=impl, strict=True, **kw))))
        except dcgmrelay.ParseError as e:
            out.append(("err", e.line, e.column, e.reason))
    assert out[0] == out[1]


# -- generators of valid exposition --------------------------------------------------------------
metric_names = st.from_regex(r"\A[a-zA-Z_:][a-zA-Z0-9_:]{0,20}\Z")
label_names = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_]{0,12}\Z")  # no leading '__' (reserved)
label_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False)


def render_value(draw, x: float) -> str:
    style = draw(st.sampled_from(["repr", "f", "g", "d", "e"]))
    if style == "f":
        return "%f" % x
    if style == "g":
        return "%.9g" % x
    if style == "e":
        return "%e" % x
    if style == "d" and abs(x) < 2**62:
        return "%d" % int(x)
    return repr(x)


def escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def expositions(draw):
    n_series = draw(st.integers(1, 6))
    lines = []
    names = draw(st.lists(metric_names, min_size=1, max_size=4, unique=True))
    for name in names:
        lines.append(f"# HELP {name} {escape(draw(st.text(alphabet=string.ascii_letters + ' .,()%', max_size=30)))}".rstrip())
        lines.append(f"# TYPE {name} gauge")
        for _ in range(n_series):
            labels = draw(st.dictionaries(label_names, label_values, max_size=5))
            sep = draw(st.sampled_from([",", ", "]))
            trailing = draw(st.sampled_from(["", ","]))
            block = sep.join(f'{k}="{escape(v)}"' for k, v in labels.items())
            x = draw(st.one_of(finite, st.sampled_from([math.inf, -math.inf])))
            val = render_value(draw, x) if math.isfinite(x) else ("+Inf" if x > 0 else "-Inf")
            ts = draw(st.one_of(st.none(), st.integers(-(2**62), 2**62)))
            line = f"{name}{{{block}{trailing if labels else ''}}} {val}" if labels or draw(st.booleans()) else f"{name} {val}"
            if ts is not None:
                line += f" {ts}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def client_samples(text: str):
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, s.labels, float(s.value)))
    return out


@FAST
@given(expositions())
def test_valid_input_agrees_with_prometheus_client(text):
    s = both(text.encode())
    assert s.n_errors == 0
    ours = [(n, lab, v) for n, lab, v, _ in s.samples()]
    theirs = client_samples(text)
    # prometheus_client groups samples by family; compare as multisets keyed by (name, labels)
    key = lambda t: (t[0], sorted(t[1].items()), repr(t[2]))  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)


@FAST
@given(expositions(), st.data())
def test_mutated_input_native_and_pure_agree(text, data):
    raw = bytearray(text.encode())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = data.draw(st.integers(0, len(raw)))
        byte = data.draw(st.sampled_from(list(b'{}",=\\\n\r\t #\x00\xff\xc3a1.-+eE') + [data.draw(st.integers(0, 255))]))
        if op == "insert":
            raw[pos:pos] = bytes([byte])
        elif op == "delete" and pos < len(raw):
            del raw[pos]
        elif pos < len(raw):
            raw[pos] = byte
    both(bytes(raw))
    both(bytes(raw), format="openmetrics")
    both_strict(bytes(raw), format="prometheus")


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_never_crash_and_agree(raw):
    both(raw)
    both(raw, format="openmetrics")
    both_strict(raw, format="prometheus")


@pytest.mark.parametrize("path", REAL_PAYLOADS, ids=lambda p: p.name)
def test_real_payloads_agree_and_every_truncation_too(path):
    data = path.read_bytes()
    both(data)
    for cut in range(0, len(data), max(1, len(data) // 200)):
        both(data[:cut])


def test_real_payloads_agree_with_prometheus_client():
    for path in REAL_PAYLOADS:
        if path.name.startswith("10-"):
            continue  # not valid exposition (the value was cut out when it was published)
        text = path.read_text()
        s = both(text.encode())
        # prometheus_client appends _total to counter samples that lack it; compare without it
        base = lambda n: n[:-6] if n.endswith("_total") else n  # noqa: E731
        ours = sorted((base(n), sorted(lab.items()), v) for n, lab, v, _ in s.samples())
        theirs = sorted((base(n), sorted(lab.items()), v) for n, lab, v in client_samples(text))
        assert ours == theirs, path.name


# -- hostile input -------------------------------------------------------------------------------
def test_nul_bytes_and_invalid_utf8():
    s = both(b'a{x="\x00"} 1\nb\x00 2\nc{x="\xc3\x28"} 3\n\xff\xfe 4\nd 5\n')
    assert s.names == ("a", "d")
    assert s.labels(0) == {"x": "\x00"}
    assert [e.line for e in s.errors] == [2, 3, 4]


def test_ten_megabyte_line():
    long_value = "v" * (10 * 1024 * 1024)
    s = both(f'a{{x="{long_value}"}} 1\nb 2\n'.encode())
    assert s.labels(0)["x"] == long_value and s.values.tolist() == [1.0, 2.0]
    s = both(b"a{x=\"" + b"v" * (10 * 1024 * 1024) + b"\n" + b"b 2\n")  # unterminated
    assert s.names == ("b",) and s.errors[0].reason == "label value has no closing quote"


def test_truncated_openmetrics_body_is_flagged():
    s = both(b"# TYPE a gauge\na 1\na{x=\"1\"} 2\n", format="openmetrics")
    assert s.values.tolist() == [1.0, 2.0]
    assert s.errors[-1].reason.startswith("missing '# EOF'")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_million_distinct_label_sets_stays_linear():
    n = 1_000_000
    data = b"".join(b'm{gpu="%d",pod="p%d"} %d\n' % (i, i, i) for i in range(n))
    before = _maxrss_mib()
    s = dcgmrelay.parse(data, implementation="c")
    assert len(s) == n and len(s.labelsets) == n and s.n_errors == 0
    assert s.values[-1] == n - 1
    grown = _maxrss_mib() - before
    # O(input): the label tables cost a bounded number of bytes per input byte.
    assert grown < 20 * len(data) / 2**20, grown
