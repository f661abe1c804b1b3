"""Fuzz the /metrics parser: native vs pure twin, lenient and strict, text and OpenMetrics,
and what the relay makes of the result.

    python fuzz/run.py parser --seconds 3600        # see fuzz/README.md

For any bytes:

* lenient parsing (``prometheus``, ``openmetrics``, ``auto``) never raises, and the native
  parser (``dcgmrelay._parser``) and the pure twin (``dcgmrelay._parser_py``) return the
  same columns, tables, metadata and errors; a parser that has seen earlier bodies (its
  label-block memo is warm) returns what a fresh one does;
* strict parsing raises only ``ParseError``, the same (line, column, reason) from both,
  with a line inside the input; when it succeeds it equals the lenient result, which then
  has no errors;
* the scrape's views (samples, entities, families, matrix) work, and the relay pipeline
  (``Relay.ingest`` twice, then every output format) takes it: the Prometheus text it
  writes parses strictly, its OpenMetrics passes the strict validator, its compact body
  decodes to the same samples.

The pure twin is instrumented for coverage (the native code is not: no compiler
instrumentation), so coverage of the twin steers the inputs and the native parser is
checked against it on every one of them.
"""

from __future__ import annotations

import sys

from _harness import check_position, fuzz, instrumented, quiet_warnings

with instrumented(__name__ == "__main__"):
    import numpy as np

    import dcgmrelay
    from dcgmrelay import ParseError, Parser
    from dcgmrelay import _parser  # noqa: F401  (ImportError: the native parser is not built)
    from dcgmrelay._openmetrics_strict import validate as validate_openmetrics
    from dcgmrelay.encode import Encoder, decode_batch
    from dcgmrelay.relay import Relay

FORMATS = ("prometheus", "openmetrics", "auto")
OUTPUTS = ("remote-write-1", "remote-write-2", "prometheus", "openmetrics", "compact")

_SPEC = dcgmrelay.load_csv("default")


def snapshot(s: dcgmrelay.Scrape) -> tuple:
    """Everything a Scrape holds, comparable (values by bits: NaN == NaN)."""
    return (s.format, s.values.view(np.int64).tolist(), s.timestamps.tolist(), s.name_ids.tolist(),
            s.labelset_ids.tolist(), s.field_ids.tolist(), s.names, s.labelsets, s._families_raw,
            s.errors, s.n_errors)


def _lenient(data: bytes, fmt: str) -> dcgmrelay.Scrape:
    c = dcgmrelay.parse(data, format=fmt, implementation="c")
    p = dcgmrelay.parse(data, format=fmt, implementation="py")
    assert snapshot(c) == snapshot(p), f"native and pure parsers differ (lenient, {fmt})"
    for e in c.errors:
        check_position(f"lenient {fmt} error {e}", e.line, e.column, data)
    assert c.n_errors >= len(c.errors)
    return c


def _strict(data: bytes, fmt: str, lenient: dcgmrelay.Scrape) -> None:
    out = []
    for impl in ("c", "py"):
        try:
            s = dcgmrelay.parse(data, format=fmt, strict=True, implementation=impl)
            out.append(("ok", snapshot(s)))
        except ParseError as e:
            check_position(f"strict {fmt} ParseError {e.reason!r}", e.line, e.column, data)
            str(e)  # the message with its caret excerpt must render
            out.append(("err", e.line, e.column, e.reason))
    assert out[0] == out[1], f"native and pure parsers differ (strict, {fmt}): {out[0][:4]} vs {out[1][:4]}"
    if out[0][0] == "ok":
        assert lenient.n_errors == 0, f"strict {fmt} accepts what lenient reports errors for: {lenient.errors[:3]}"
        assert out[0][1] == snapshot(lenient), f"strict and lenient {fmt} results differ"


def _views(s: dcgmrelay.Scrape) -> None:
    repr(s)
    samples = list(s.samples())
    assert len(samples) == len(s)
    assert len(s.entity_ids) == len(s)
    for name in s.names:
        s.family_of(name)
    s.families
    m = s.matrix()
    assert m.values.shape == (len(m.entities), len(m.field_ids))
    s.series_count()


def _pipeline(s: dcgmrelay.Scrape) -> None:
    relay = Relay(_SPEC, include_non_dcgm=True, first_observation="full", output="both")
    relay.ingest(s, target="fuzz", timestamp_ms=1_700_000_000_000)
    batch = relay.ingest(s, target="fuzz", timestamp_ms=1_700_000_015_000)
    for fmt in OUTPUTS:
        enc = Encoder(fmt)
        body, _ = enc.encode(batch)
        if fmt == "prometheus":
            back = dcgmrelay.parse(body, format="prometheus", strict=True)
            assert len(back) == enc.last_samples, f"text output: {len(back)} samples parsed, {enc.last_samples} written"
        elif fmt == "openmetrics":
            validate_openmetrics(body)
        elif fmt == "compact":
            d = decode_batch(body)
            assert len(d) == len(batch)
            assert d.values.view(np.int64).tolist() == np.asarray(batch.values).view(np.int64).tolist()
    relay.target_down("fuzz", 1_700_000_030_000)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    scrapes = {fmt: _lenient(data, fmt) for fmt in FORMATS}
    for fmt in ("prometheus", "openmetrics"):
        _strict(data, fmt, scrapes[fmt])
    # the shared parsers behind parse() remember label blocks of earlier inputs: a fresh one agrees
    fresh = Parser(format="prometheus", implementation="c").parse(data)
    assert snapshot(fresh) == snapshot(scrapes["prometheus"]), "a warm parser differs from a fresh one"
    with quiet_warnings():
        _views(scrapes["prometheus"])
        _pipeline(scrapes["auto"])


if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
