"""The fuzz harnesses in fuzz/ stay runnable: each passes its seed corpus (the recorded
payloads, profiles, configs, encoder streams, and fuzz/regressions/), imports without
atheris, and -- with atheris -- runs under libFuzzer; the runner reports a finding with the
input that reproduces it and exits non-zero."""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "fuzz"
sys.path.insert(0, str(FUZZ))

import make_seeds  # noqa: E402

CI = os.environ.get("CI") == "true"

try:
    from dcgmrelay import _parser as _c_parser  # noqa: F401

    HAVE_C = True
except ImportError:  # pragma: no cover - a pure build
    HAVE_C = False

try:
    import atheris  # noqa: F401

    HAVE_ATHERIS = True
except ImportError:
    HAVE_ATHERIS = False

# The harnesses need the native parser (the parser harness compares it with the pure twin).
# Tests of the parser harness compare the native core with the twin: marked c_extension (the
# pure install's run deselects them); elsewhere a missing core skips them, except in CI.
# atheris comes from PyPI as wheels for CPython >= 3.11 on Linux x86_64 (elsewhere it needs
# clang to build): where those exist, CI installs it and it must be present.
ATHERIS_WHEELS = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info >= (3, 11)
needs_atheris = pytest.mark.skipif(not HAVE_ATHERIS and not (CI and ATHERIS_WHEELS),
                                   reason="atheris not installed")


# Seeds that fail on a bug reported but not fixed yet, with a piece of the failure message.
# Like a strict xfail: they must keep failing that way, and the entry goes with the fix.
#: Seeds that fail because of a known, not yet fixed bug: target -> {seed name: message}.
#: A seed listed here that passes fails the test (the entry must then go): a strict xfail.
KNOWN_BUGS: Dict[str, Dict[str, str]] = {}


def _harness(target: str) -> Any:
    return importlib.import_module(f"fuzz_{target}")


@pytest.mark.c_extension
@pytest.mark.skipif(not HAVE_C and not CI, reason="native parser not built")
@pytest.mark.parametrize("target", make_seeds.TARGETS)
def test_harness_passes_its_seeds(target: str) -> None:
    seeds = make_seeds.seeds(target)
    assert len(seeds) >= 5, f"{target}: too few seeds"
    harness = _harness(target)
    known = KNOWN_BUGS.get(target, {})
    failures = []
    for name, data in seeds.items():
        try:
            harness.TestOneInput(data)
        except Exception as exc:  # noqa: BLE001 - every failing seed is reported, not just the first
            if name in known and known[name] in str(exc):
                continue
            failures.append(f"--- {target} seed {name} ({len(data)} bytes)\n{traceback.format_exc(limit=6)}")
        else:
            if name in known:
                failures.append(f"--- {target} seed {name} passes now: remove it from KNOWN_BUGS ({known[name]})")
    assert not failures, "\n".join(failures)


def test_seeds_come_from_the_repository_data() -> None:
    """Every recorded payload, profile and config is a seed (no data set left out)."""
    parser, csv, config = (set(make_seeds.seeds(t).values()) for t in ("parser", "csv", "config"))
    for p in (REPO / "tests" / "data" / "payloads" / "real").glob("*.prom"):
        assert p.read_bytes() in parser, p
    for p in (REPO / "src" / "dcgmrelay" / "profiles").glob("*.csv"):
        assert p.read_bytes() in csv, p
    for p in (REPO / "tests" / "data" / "config").glob("*.yaml"):
        assert p.read_bytes() in config, p
    assert any(b"# EOF" in s for s in parser), "no OpenMetrics seed"


def test_compact_seed_streams_decode_in_full() -> None:
    """The compact seeds are streams the receiver takes whole: every body decodes (a seed
    that failed at the door would only fuzz the error paths)."""
    from dcgmrelay.receiver import CompactReceiver

    fc = _harness("compact")
    for name, data in make_seeds.seeds("compact").items():
        if name.startswith("regression-"):
            continue
        rx = CompactReceiver()
        bodies = fc.bodies(data)
        assert bodies, name
        for body in bodies:
            rx.receive(body)
        assert rx.stats["batches_received"] == len(bodies), name


@pytest.mark.parametrize("harness", [pytest.param("parser", marks=pytest.mark.c_extension), "csv", "config",
                                     "compact"])
def test_harnesses_import_without_atheris(harness: str) -> None:
    # the parser harness compares the native core with the twin: it needs the core (c_extension)
    code = ("import sys; sys.modules['atheris'] = None; sys.path.insert(0, sys.argv[1]); "
            f"import fuzz_{harness} as m; assert callable(m.TestOneInput)")
    subprocess.run([sys.executable, "-c", code, str(FUZZ)], check=True, timeout=120)


@pytest.mark.c_extension
@pytest.mark.skipif(not HAVE_C and not CI, reason="native parser not built")
@needs_atheris
def test_harnesses_run_under_libfuzzer(tmp_path: Path) -> None:
    """Each harness instruments dcgmrelay, loads its seeds and runs a few mutations."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for target in make_seeds.TARGETS:
        seeds = tmp_path / "seeds" / target
        corpus = tmp_path / "corpus" / target
        corpus.mkdir(parents=True)
        make_seeds.write(target, seeds)
        r = subprocess.run([sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(corpus), str(seeds), "-runs=30",
                            "-max_len=4096", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
                           capture_output=True, text=True, timeout=600, env=env)
        log = r.stdout + r.stderr
        if r.returncode != 0 and any(msg in log for msg in KNOWN_BUGS.get(target, {}).values()):
            continue  # stopped on a known bug (libFuzzer tries the empty input first)
        assert r.returncode == 0, f"{target}:\n{log[-4000:]}"
        assert "stat::number_of_executed_units" in log, log[-2000:]
        cov = [int(x) for x in re.findall(r"\bcov: (\d+)", log)]
        assert cov and max(cov) > 100, f"{target}: no coverage feedback (is dcgmrelay instrumented?)\n{log[-2000:]}"


_BROKEN = '''
import sys
from _harness import fuzz

def TestOneInput(data: bytes) -> None:
    if b"boom" in data:
        raise RuntimeError("a finding")

if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
'''


@needs_atheris
def test_runner_reports_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A harness that fails on a seed: run.py exits non-zero and names the input and the
    command that replays it; the replay fails the same way."""
    import run

    shutil.copy(FUZZ / "_harness.py", tmp_path / "_harness.py")
    (tmp_path / "fuzz_csv.py").write_text(_BROKEN)
    monkeypatch.setattr(run, "FUZZ_DIR", tmp_path)

    def write(target: str, out_dir: Path) -> int:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ok").write_bytes(b"fine")
        (out_dir / "bad").write_bytes(b"ka-boom")
        return 2

    monkeypatch.setattr(run.make_seeds, "write", write)
    rc = run.main(["csv", "--seconds", "60", "--no-dict"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "!!! csv: finding" in out and "RuntimeError: a finding" in out, out
    found = [p for p in (tmp_path / "findings" / "csv").iterdir() if p.name.startswith("crash-")]
    assert len(found) == 1 and found[0].read_bytes() == b"ka-boom"
    assert "replay:    python " in out and str(found[0]) in out
    # in tmp_path: the harness saves the failing input as ./exception-<sha1> (not in the checkout)
    replay = subprocess.run([sys.executable, str(tmp_path / "fuzz_csv.py"), str(found[0])], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert replay.returncode != 0 and "RuntimeError: a finding" in replay.stdout + replay.stderr


_COUNTING = '''
import sys
from _harness import fuzz

def TestOneInput(data: bytes) -> None:
    if data.startswith(b"left by an earlier run"):
        raise RuntimeError("--ci read the kept corpus")

if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
'''


@needs_atheris
def test_runner_ci_mode_is_seeded_counted_and_ignores_the_kept_corpus(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--ci (what CI runs): libFuzzer's seed fixed, a fixed number of inputs, a fixed hash
    seed, and only the seeds -- not a corpus an earlier long run left in fuzz/corpus/."""
    import run

    shutil.copy(FUZZ / "_harness.py", tmp_path / "_harness.py")
    (tmp_path / "fuzz_csv.py").write_text(_COUNTING)
    kept = tmp_path / "corpus" / "csv"
    kept.mkdir(parents=True)
    (kept / "old").write_bytes(b"left by an earlier run")
    monkeypatch.setattr(run, "FUZZ_DIR", tmp_path)
    monkeypatch.setitem(run.CI_RUNS, "csv", 300)

    def write(target: str, out_dir: Path) -> int:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "seed").write_bytes(b"a,b\n")
        return 1

    monkeypatch.setattr(run.make_seeds, "write", write)
    assert run.main(["csv", "--ci", "--no-dict"]) == 0
    (log,) = (tmp_path / "findings" / "csv").glob("run-*.log")
    text = log.read_text()
    assert f"Seed: {run.CI_SEED}" in text, text[-2000:]
    assert run._stat(text, "number_of_executed_units") == 300, text[-2000:]
