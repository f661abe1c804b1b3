"""`dcgmrelay demo`, the README's first command: a simulated exporter, the relay and the
embedded collector on 127.0.0.1, and the per-GPU table of what the collector received."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_the_pipeline_and_shows_every_gpu() -> None:
    r = subprocess.run([sys.executable, "-m", "dcgmrelay", "demo", "--duration", "4", "--interval", "1", "--plain"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tables = r.stdout.split("\ngpu ")
    assert len(tables) >= 2, r.stdout[-2000:]
    last = tables[-1]
    assert last.startswith(" util %  mem used GiB") and "energy Δ J" in last
    rows = [ln for ln in last.splitlines() if re.match(r"\s+\d\s+\d+\s", ln)]
    assert [int(ln.split()[0]) for ln in rows] == list(range(8))
    # every GPU has a temperature, a power draw and an energy delta the relay computed
    for ln in rows:
        temp, power, energy = (float(x) for x in ln.split()[4:7])
        assert 20 <= temp <= 100 and power > 0 and energy > 0, ln
    m = re.findall(r"batches received (\d+), samples (\d+)", r.stdout)
    assert m and int(m[-1][0]) >= 2 and int(m[-1][1]) > 0
