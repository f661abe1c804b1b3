"""The command line, driven in-process through main(argv)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dcgmrelay.cli import main

from conftest import REAL_PAYLOADS

PAYLOADS = Path(__file__).parent.parent / "benchmarks" / "payloads"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_table_shows_every_gpu_and_field(capsys):
    rc, out, _ = run(capsys, "inspect", str(PAYLOADS / "gpu8.prom"))
    assert rc == 0
    lines = out.splitlines()
    assert "200 samples" in lines[0] and "8 GPUs/MIG instances" in lines[0]
    header = lines[3].split()
    assert header == ["field", "0", "1", "2", "3", "4", "5", "6", "7"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[5:] if ln.strip()}
    assert len(rows["GPU_TEMP"]) == 8 and "POWER_USAGE" in rows and "PCIE_RX_BYTES" in rows


def test_inspect_json_matches_the_parser(capsys, tmp_path):
    import dcgmrelay

    path = PAYLOADS / "gpu8.prom"
    rc, out, _ = run(capsys, "inspect", str(path), "--json")
    assert rc == 0
    doc = json.loads(out)
    scrape = dcgmrelay.parse(path.read_bytes())
    assert doc["samples"] == len(scrape) == 200
    assert len(doc["entities"]) == 8
    e = doc["entities"][3]
    assert e["fields"]["DCGM_FI_DEV_GPU_TEMP"] == scrape.value(e["uuid"], "DCGM_FI_DEV_GPU_TEMP")


def test_inspect_gzip_and_many_gpus_go_down(capsys):
    rc, out, _ = run(capsys, "inspect", str(PAYLOADS / "gpu1024.prom.gz"), "--fields", "DCGM_FI_DEV_GPU_TEMP,155")
    assert rc == 0
    lines = out.splitlines()
    assert lines[3].split() == ["gpu", "uuid", "GPU_TEMP", "POWER_USAGE"]
    assert len([ln for ln in lines[5:] if ln.strip()]) == 1024


def test_inspect_mig_labels_instances(capsys):
    rc, out, _ = run(capsys, "inspect", str(PAYLOADS / "mig7.prom"))
    assert rc == 0
    assert "56 GPUs/MIG instances" in out.splitlines()[0]


def test_inspect_real_payloads(capsys):
    for path in REAL_PAYLOADS:
        rc, out, _ = run(capsys, "inspect", str(path))
        assert rc == 0, path


def test_inspect_broken_payload_reports_where(capsys):
    (bad,) = [p for p in REAL_PAYLOADS if p.name.startswith("10-")]
    rc, out, _ = run(capsys, "inspect", str(bad))
    assert rc == 0 and "line 1, column 158: expected a value" in out
    rc, _, err = run(capsys, "inspect", str(bad), "--strict")
    assert rc == 2
    assert "line 1, column 158: expected a value" in err and "^" in err


def test_inspect_csv_alone_lists_rows_and_kinds(capsys):
    rc, out, _ = run(capsys, "inspect", "--csv", "whatap")
    assert rc == 0
    assert "21 metric fields, 12 label fields" in out
    assert out.count("warning:") == 2  # the duplicate PSTATE row and the non-DCGM field, once each
    row = next(ln for ln in out.splitlines() if ln.startswith("DCGM_FI_PROF_PCIE_TX_BYTES"))
    assert row.split()[1:4] == ["1009", "counter", "rate"]  # typed counter in the CSV, relayed as a rate
    rc, out, _ = run(capsys, "inspect", "--csv", "default", "--json")
    rows = json.loads(out)
    assert {r["name"]: r["prom_type"] for r in rows}["DCGM_FI_DRIVER_VERSION"] == "label"


def test_inspect_payload_with_csv_marks_dropped_fields(capsys):
    rc, out, _ = run(capsys, "inspect", str(PAYLOADS / "gpu8.prom"), "--csv", "whatap")
    assert rc == 0
    assert "(XID_ERRORS)" in out and "(GPU_TEMP)" not in out
    assert "the relay drops them" in out


def test_inspect_url(capsys, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    body = (PAYLOADS / "gpu8.prom").read_bytes()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            data = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rc, out, _ = run(capsys, "inspect", f"http://127.0.0.1:{srv.server_port}/metrics", "--json")
    finally:
        srv.shutdown()
    assert rc == 0 and json.loads(out)["samples"] == 200


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing.prom"))
    assert rc == 2 and "No such file" in err
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("DCGM_FI_DEV_NOPE, gauge, help\n")
    rc, _, err = run(capsys, "inspect", "--csv", str(bad_csv))
    assert rc == 2 and "bad.csv" in err and "line 1" in err
    with pytest.raises(SystemExit):
        main(["inspect"])
