"""Fuzz the collectors CSV reader (``csvspec.load_csv`` on CSV bytes).

    python fuzz/run.py csv --seconds 3600           # see fuzz/README.md

For any bytes:

* ``load_csv`` raises only ``CsvSpecError``, naming the source and a line inside the input
  (and a 1-based column); warnings are ``CsvSpecWarning``s kept in ``spec.warnings``;
* the spec is consistent: every row has a positive field id, a known type (dcgm-exporter's
  own ``DCGM_EXP_*`` fields: any, with a warning) and a line inside the input; ``mask`` / ``kind_array`` / ``row`` / ``in`` agree with the rows;
* the same text with ``\\r\\n`` line ends reads the same (Go's csv reader folds them), text
  and bytes read the same, and ``strict_names=True`` gives the same rows or an error.
"""

from __future__ import annotations

import sys

from _harness import check_position, fuzz, instrumented, quiet_warnings

with instrumented(__name__ == "__main__"):
    import numpy as np

    from dcgmrelay.csvspec import CsvSpecError, load_csv
    from dcgmrelay.kinds import Kind

SOURCE = "<fuzz>"
_TYPES = {"gauge", "counter", "histogram", "summary", "label"}


def _load(data: object, **kw: object) -> tuple:
    """("ok", rows, warnings) or ("err", line, column, reason)."""
    try:
        spec = load_csv(data, name=SOURCE, **kw)  # type: ignore[arg-type]
    except CsvSpecError as e:
        assert e.file == SOURCE, f"CsvSpecError names {e.file!r}, not the source"
        str(e)
        return ("err", e.line, e.column, e.reason)
    return ("ok", spec)


def _check_spec(spec: object, data: bytes) -> None:
    rows = spec.rows  # type: ignore[attr-defined]
    ids = [r.field_id for r in rows]
    assert len(set(ids)) == len(ids), "a field id twice in the rows"
    for r in rows:
        assert r.field_id > 0, r
        if r.name.startswith("DCGM_EXP_"):
            # dcgm-exporter checks no type of its own fields (a warning says so); never labels
            assert r.kind is not Kind.LABEL and (r.prom_type in _TYPES or spec.warnings), r  # type: ignore[attr-defined]
        else:
            assert r.prom_type in _TYPES and (r.kind is Kind.LABEL) == (r.prom_type == "label"), r
        check_position(f"row {r.name}", r.line, None, data)
        assert spec.row(r.field_id) == r and r.field_id in spec  # type: ignore[attr-defined]
        assert spec.row(r.name) == r, f"row({r.name!r}) is not its row"  # type: ignore[attr-defined]
    probe = np.array(sorted(set(ids) | {-1, 0, 1, 10 ** 6}), dtype=np.int64)
    mask = spec.mask(probe)  # type: ignore[attr-defined]
    kinds = spec.kind_array(probe)  # type: ignore[attr-defined]
    by_id = {r.field_id: r for r in rows}
    for fid, m, k in zip(probe.tolist(), mask.tolist(), kinds.tolist()):
        r = by_id.get(fid)
        assert m == (r is not None and r.kind is not Kind.LABEL), f"mask of {fid}"
        assert k == (-1 if r is None else int(r.kind)), f"kind_array of {fid}"
    for w in spec.warnings:  # type: ignore[attr-defined]
        assert w.startswith(SOURCE + ":"), f"warning without its source: {w!r}"
    repr(spec)


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "err":
        return a == b
    return a[1].rows == b[1].rows and a[1].warnings == b[1].warnings


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    with quiet_warnings():
        got = _load(data)
        if got[0] == "err":
            check_position(f"CsvSpecError {got[3]!r}", got[1], got[2], data)
        else:
            _check_spec(got[1], data)
        text = data.decode("utf-8", "replace")
        if "\n" in text:  # a str without a newline is a path or profile name
            assert _same(_load(text), got), "text and bytes read differently"
        if b"\r" not in data:
            crlf = _load(data.replace(b"\n", b"\r\n"))
            assert _same(crlf, got), "\\r\\n line ends read differently"
        strict = _load(data, strict_names=True)
        if strict[0] == "ok":
            assert got[0] == "ok" and strict[1].rows == got[1].rows, "strict_names changed the rows"


if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
