"""Run the fuzz harnesses for a bounded time; exit non-zero on a finding.

    python fuzz/run.py --all --ci                  # CI: every harness, a fixed seed and input count
    python fuzz/run.py --all --seconds 30          # every harness, 30 s each, a new seed each time
    python fuzz/run.py parser --seconds 3600       # a long run of one harness
    python fuzz/run.py compact --runs 100000       # a number of inputs instead of a time

Per target: seeds are (re)made in fuzz/seeds/<target>/ (make_seeds.py), libFuzzer grows its
corpus in fuzz/corpus/<target>/ (kept between runs: a long run resumes where it stopped),
and a finding (an exception other than the documented errors, a crash, an input slower
than --timeout seconds, memory past --rss-limit-mb) is written to
fuzz/findings/<target>/ with the log; the runner prints the file and the command that
replays it. Extra arguments after ``--`` go to libFuzzer (``-- -jobs=2 -workers=2``).

``--ci`` keeps CI's short run close to a function of the commit: libFuzzer's seed is fixed,
each harness runs a fixed number of inputs (``CI_RUNS``, about 30 s each here) from the
seeds alone (a fresh clone has no corpus) with Python's hash seed fixed. The first couple of
thousand inputs are then the same on every machine; after that libFuzzer's corpus
scheduling drifts between runs (measured: two runs of the csv harness part after ~1,900
inputs), so CI still explores a little. Exploring is what the long runs are for; what they
find is fixed and goes to fuzz/regressions/, which every run (and the test suite) replays.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

FUZZ_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ_DIR))

import make_seeds  # noqa: E402

#: libFuzzer's -max_len per target: bodies large enough for what each reads in practice
#: (a few dozen exporter lines, the largest CSV profile and config file, a few compact
#: batches of a small node), small enough to keep the pure-Python paths fast.
MAX_LEN: Dict[str, int] = {"parser": 16384, "csv": 8192, "config": 8192, "compact": 16384}

#: Inputs per harness with --ci: about 30 s each on a 2-core CI machine (the parser harness
#: is the slowest: every input goes through the pure twin, the relay and five encoders).
CI_RUNS: Dict[str, int] = {"parser": 1000, "csv": 20000, "config": 10000, "compact": 8000}
CI_SEED = 1
#: With --ci a harness that has not finished its inputs after this long stops there (a slow
#: machine explores a prefix of the same sequence) instead of holding CI up.
CI_MAX_SECONDS = 180


def _stat(log: str, key: str) -> Optional[int]:
    m = re.findall(rf"stat::{key}:\s+(\d+)", log)
    return int(m[-1]) if m else None


def _finding(artifacts: Path, since: float) -> Optional[Path]:
    found = [p for p in artifacts.iterdir() if p.is_file() and p.suffix != ".log" and p.stat().st_mtime >= since]
    # libFuzzer's own file (crash-, timeout-, oom-) first; exception- is the harness' copy
    found.sort(key=lambda p: (not p.name.startswith("exception-"), p.stat().st_mtime))
    return found[-1] if found else None


def run_target(target: str, args: argparse.Namespace, extra: List[str]) -> int:
    seeds = FUZZ_DIR / "seeds" / target
    corpus = FUZZ_DIR / "corpus" / target
    artifacts = FUZZ_DIR / "findings" / target
    for d in (corpus, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    n_seeds = make_seeds.write(target, seeds)
    harness = FUZZ_DIR / f"fuzz_{target}.py"
    cmd = [sys.executable, str(harness), str(corpus), str(seeds),
           f"-max_len={MAX_LEN[target]}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
           f"-artifact_prefix={artifacts}{os.sep}", "-print_final_stats=1"]
    if args.dict and (FUZZ_DIR / "dicts" / f"{target}.dict").is_file():
        cmd.append(f"-dict={FUZZ_DIR / 'dicts' / f'{target}.dict'}")
    env = None
    if args.ci:
        # only the seeds: a corpus left by an earlier run would change what is explored
        cmd = [c for c in cmd if c != str(corpus)]
        corpus = artifacts / "ci-corpus"
        if corpus.exists():
            shutil.rmtree(corpus)
        corpus.mkdir()
        cmd.insert(2, str(corpus))
        cmd += [f"-seed={CI_SEED}", f"-runs={CI_RUNS[target]}", f"-max_total_time={CI_MAX_SECONDS}"]
        env = dict(os.environ, PYTHONHASHSEED="0")
    else:
        if args.seconds:
            cmd.append(f"-max_total_time={args.seconds}")
        if args.runs is not None:
            cmd.append(f"-runs={args.runs}")
        if args.seed is not None:
            cmd.append(f"-seed={args.seed}")
    cmd += extra
    log_path = artifacts / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"==> {target}: {n_seeds} seeds, corpus {corpus}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=FUZZ_DIR.parent, env=env)
    text = log_path.read_text(errors="replace")
    runs, cov = _stat(text, "number_of_executed_units"), re.findall(r"\bcov: (\d+)", text)
    took = time.time() - start
    print(f"    {runs if runs is not None else '?'} inputs in {took:.0f} s, coverage {cov[-1] if cov else '?'} "
          f"edges, corpus {sum(1 for _ in corpus.iterdir())} files; log {log_path}", flush=True)
    if rc == 0:
        return 0
    found = _finding(artifacts, start - 1)
    print("\n".join(text.splitlines()[-60:]))
    print(f"\n!!! {target}: finding (libFuzzer exit {rc})", flush=True)
    if found is not None:
        print(f"    input:     {found}")
        print(f"    replay:    python {harness.relative_to(FUZZ_DIR.parent)} {found}")
        print(f"    regression: cp {found} fuzz/regressions/{target}/  (then tests/test_fuzz_harnesses.py runs it)")
    return rc


def main(argv: List[str]) -> int:
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", metavar="TARGET", help=f"{', '.join(make_seeds.TARGETS)}")
    ap.add_argument("--all", action="store_true", help="every target, one after the other")
    ap.add_argument("--seconds", type=int, default=60, help="time per target (default 60; 0: no limit)")
    ap.add_argument("--runs", type=int, help="number of inputs per target (libFuzzer -runs)")
    ap.add_argument("--seed", type=int, help="libFuzzer's random seed (default: a new one each run)")
    ap.add_argument("--ci", action="store_true",
                    help="reproducible: fixed seed, CI_RUNS inputs per target from the seeds only")
    ap.add_argument("--timeout", type=int, default=10,
                    help="seconds one input may take before it counts as a hang (default 10)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048, help="memory limit (default 2048)")
    ap.add_argument("--no-dict", dest="dict", action="store_false", help="without fuzz/dicts/<target>.dict")
    args = ap.parse_args(argv)
    targets = list(make_seeds.TARGETS) if args.all else args.targets
    if not targets:
        ap.error("name a target or give --all")
    for t in targets:
        if t not in make_seeds.TARGETS:
            ap.error(f"unknown target {t!r}: {', '.join(make_seeds.TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    failed = [t for t in targets if run_target(t, args, extra) != 0]
    if failed:
        print(f"\nfindings in: {', '.join(failed)}")
        return 1
    print(f"\nno findings ({', '.join(targets)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
