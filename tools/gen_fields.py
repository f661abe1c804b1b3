"""Generate src/dcgmrelay/_fields_data.py from tools/data/*.tsv.

    python tools/gen_fields.py [--check]

--check exits 1 if the committed module differs from what would be generated
(the test suite runs it, so the table cannot drift from its data).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS_TSV = ROOT / "tools" / "data" / "dcgm_fields.tsv"
NAMES_1X_TSV = ROOT / "tools" / "data" / "dcgm_exporter_1x_names.tsv"
OUT = ROOT / "src" / "dcgmrelay" / "_fields_data.py"

# Fields dcgm-exporter synthesises itself (internal/pkg/counters/exporter_counters.go:
# iota + 9000). They are not DCGM fields but a collectors CSV may name them.
EXPORTER_FIELDS = [
    (9001, "DCGM_EXP_XID_ERRORS_COUNT", "int64", "GPU", "", "Count of XID errors within the window (dcgm-exporter)"),
    (9002, "DCGM_EXP_CLOCK_EVENTS_COUNT", "int64", "GPU", "", "Count of clock events within the window (dcgm-exporter)"),
    (9003, "DCGM_EXP_GPU_HEALTH_STATUS", "int64", "GPU", "", "GPU health status (dcgm-exporter)"),
    (9004, "DCGM_EXP_P2P_STATUS", "int64", "GPU", "", "Peer-to-peer link status (dcgm-exporter)"),
]

_LEGACY = re.compile(r"legacy name \(canonical until DCGM [\d.]+ renamed it to (\w+)\)")


def _split_note(note: str) -> tuple[str, str, str]:
    """Return (entity, unit, description) from the TSV's note column."""
    entity = unit = ""
    rest = []
    for part in note.split("; "):
        if part.startswith("entity="):
            entity = part[len("entity="):]
        elif part.startswith("unit="):
            unit = part[len("unit="):]
        elif part.startswith(("legacy name", "name since", "older name", "new in DCGM", "type not in")):
            continue
        else:
            rest.append(part)
    return entity, unit, "; ".join(rest).strip()


def build() -> str:
    rows = list(csv.reader(FIELDS_TSV.open(encoding="utf-8"), delimiter="\t"))[1:]
    by_id: dict[int, dict[str, object]] = {}
    for name, fid_s, ftype, note in rows:
        fid = int(fid_s)
        entity, unit, desc = _split_note(note)
        rec = by_id.setdefault(fid, {"names": [], "canonical": None, "legacy": None,
                                     "type": ftype, "entity": entity, "unit": unit, "desc": desc})
        rec["names"].append(name)  # type: ignore[union-attr]
        if _LEGACY.search(note):
            rec["legacy"] = name
        else:
            # Canonical: either "name since 4.6" or a field DCGM never renamed.
            rec["canonical"] = name
        for key, val in (("entity", entity), ("unit", unit), ("desc", desc)):
            if val and not rec[key]:
                rec[key] = val
        if rec["type"] == "?" and ftype != "?":
            rec["type"] = ftype
    for fid, name, ftype, entity, unit, desc in EXPORTER_FIELDS:
        by_id[fid] = {"names": [name], "canonical": name, "legacy": None,
                      "type": ftype, "entity": entity, "unit": unit, "desc": desc}
    for name, fid_s, _dcgm, _note in list(csv.reader(NAMES_1X_TSV.open(encoding="utf-8"), delimiter="\t"))[1:]:
        by_id[int(fid_s)]["names"].append(name)  # type: ignore[union-attr]

    out = [
        "# GENERATED FROM tools/data/dcgm_fields.tsv and tools/data/dcgm_exporter_1x_names.tsv",
        "# DO NOT MODIFY, use tools/gen_fields.py to update",
        '"""The DCGM field table: (id, canonical name, exporter name, type, entity, unit, description, all names)."""',
        "",
        "FIELDS = (",
    ]
    n_names = 0
    for fid in sorted(by_id):
        rec = by_id[fid]
        canonical = rec["canonical"] or rec["legacy"]
        exporter = rec["legacy"] or canonical  # dcgm-exporter renders the pre-4.6 name
        names = tuple(dict.fromkeys(rec["names"]))  # type: ignore[arg-type]
        n_names += len(names)
        ftype = "unknown" if rec["type"] == "?" else rec["type"]
        out.append(f"    ({fid}, {canonical!r}, {exporter!r}, {ftype!r}, {rec['entity']!r}, "
                   f"{rec['unit']!r}, {rec['desc']!r}, {names!r}),")
    out.append(")")
    out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = build()
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python tools/gen_fields.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
