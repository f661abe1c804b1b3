#!/usr/bin/env bash
# The packages as users get them, tested whole:
#
#   native  python -m build: the sdist, then the wheel built from the unpacked sdist (from
#           the .pyx alone, with Cython from build-system.requires, not from this tree's
#           in-place build outputs), installed with its test extras in a fresh venv; the
#           suite runs against it, less the scale run and the fault scenarios (see suite()).
#   pure    the same sdist built with DCGMRELAY_NO_EXTENSIONS=1 (a py3-none-any wheel, as
#           where no compiler is at hand), in a venv of its own; the same suite runs with
#           DCGMRELAY_NO_EXTENSIONS=1 less the tests of the native core (marked c_extension).
#
#   bash .ci/wheel-check.sh [native] [pure]     # both when none is named
#
# The suites run from copies of what the tests read (the [tool.cibuildwheel] test-sources,
# none of it dcgmrelay code), one per run, so `import dcgmrelay` can only find the venv's;
# that, and the implementation (c or py), is asserted first. tests/test_packaging.py is
# pointed at the sdist and wheel installed (DCGMRELAY_TEST_DIST). The two suites run one
# after the other: side by side (WHEEL_CHECK_PARALLEL=1) they save minutes, but on 2 cores
# the timing-bound scenarios (1,000 targets, faults) then compete for the CPU with a
# whole second suite. Env: PYTHON (default python3, 3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

modes=("$@")
[ "${#modes[@]}" -gt 0 ] || modes=(native pure)
want_native="" want_pure=""
for m in "${modes[@]}"; do
    case "$m" in
        native) want_native=1 ;;
        pure) want_pure=1 ;;
        *) echo "wheel-check: unknown mode '$m' (native, pure)" >&2; exit 2 ;;
    esac
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log() { printf 'wheel-check: [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
quiet() {  # run "$@" with its output in a log shown only on failure
    local out
    out="$(mktemp "$WORK/cmd.XXXXXX")"
    if ! "$@" >"$out" 2>&1; then
        tail -n 60 "$out" >&2
        echo "wheel-check: failed: $*" >&2
        exit 1
    fi
}

# build (the frontend) from the test extras when this python has it, else a venv of its own
if "$PY" -c "import build" 2>/dev/null; then
    BUILD_PY="$PY"
else
    log "build frontend"
    "$PY" -m venv "$WORK/tools"
    quiet "$WORK/tools/bin/python" -m pip install -q "build>=1"
    BUILD_PY="$WORK/tools/bin/python"
fi

mkdir -p "$WORK/native" "$WORK/pure"
if [ -n "$want_native" ]; then
    log "sdist and, from it, the native wheel (python -m build)"
    quiet "$BUILD_PY" -m build --outdir "$WORK/native" "$ROOT"
else
    log "sdist (python -m build --sdist)"
    quiet "$BUILD_PY" -m build --sdist --outdir "$WORK/native" "$ROOT"
fi
sdist="$(ls "$WORK"/native/dcgmrelay-*.tar.gz)"
if [ -n "$want_pure" ]; then
    log "pure wheel: the same sdist built with DCGMRELAY_NO_EXTENSIONS=1"
    cp "$sdist" "$WORK/pure/"
    DCGMRELAY_NO_EXTENSIONS=1 quiet "$BUILD_PY" -m pip wheel -q --no-deps --no-cache-dir -w "$WORK/pure" "$sdist"
fi
ls -l "$WORK"/native/ "$WORK"/pure/

prepare() {  # prepare MODE: venv with the wheel, the copied test tree, the import asserted
    local mode="$1" wheel want=c
    wheel="$(ls "$WORK/$mode"/dcgmrelay-*.whl)"
    if [ "$mode" = pure ]; then want=py; fi
    log "$mode: fresh venv with $(basename "$wheel")[test]"
    "$PY" -m venv "$WORK/venv-$mode"
    quiet "$WORK/venv-$mode/bin/python" -m pip install -q "${wheel}[test]"
    "$PY" - "$ROOT" "$WORK/tree-$mode" <<'EOF'
import shutil, sys, tomllib
from pathlib import Path

root, tree = Path(sys.argv[1]), Path(sys.argv[2])
with open(root / "pyproject.toml", "rb") as f:
    sources = tomllib.load(f)["tool"]["cibuildwheel"]["test-sources"]
for src in sources:
    s, d = root / src, tree / src
    d.parent.mkdir(parents=True, exist_ok=True)
    if s.is_dir():
        shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    else:
        shutil.copy2(s, d)
EOF
    local envs=(PATH="$PATH")
    if [ "$mode" = pure ]; then envs+=(DCGMRELAY_NO_EXTENSIONS=1); fi
    (cd "$WORK/tree-$mode" && env "${envs[@]}" "$WORK/venv-$mode/bin/python" -I - "$want" <<'EOF'
import importlib.util, os, sys, sysconfig
import dcgmrelay

want = sys.argv[1]
where = os.path.realpath(dcgmrelay.__file__)
site = os.path.realpath(sysconfig.get_paths()["platlib"])
assert where.startswith(site + os.sep), f"dcgmrelay imported from {where}, not from the venv's {site}"
assert dcgmrelay.implementation() == want, f"implementation {dcgmrelay.implementation()!r}, want {want!r}"
if want == "py":
    assert importlib.util.find_spec("dcgmrelay._parser") is None, "a native parser in the pure wheel"
    assert importlib.util.find_spec("dcgmrelay._encode") is None, "a native encoder in the pure wheel"
print(f"wheel-check: dcgmrelay {dcgmrelay.__version__} from {where}, implementation {want}")
EOF
    )
}

suite() {  # suite MODE: the suite against the installed wheel
    local mode="$1"
    # Not the 1,000-target scale run and the fault scenarios (~3 min a suite): they exercise
    # the relay process's timing and its behaviour under kill -9, a full disk, a collector
    # down, none of which depends on how the package was installed. .ci/run's pytest runs
    # them once, on the native build made from these same sources; every other test runs
    # here against the wheel (WHEEL_CHECK_ALL=1 runs them here too).
    local args=(-p no:cacheprovider)
    if [ -z "${WHEEL_CHECK_ALL:-}" ]; then
        args+=(--deselect tests/test_scale.py --deselect tests/test_faults.py)
    fi
    local envs=(DCGMRELAY_TEST_DIST="$WORK/$mode")
    if [ "$mode" = pure ]; then
        # The pure twins are the fallback where no compiler is at hand: every test of behaviour
        # runs on them (and the twins parse ~50x slower by design, so the scale and fault runs
        # would measure them, not the relay).
        args+=(-m "not c_extension")
        envs+=(DCGMRELAY_NO_EXTENSIONS=1)
    fi
    # -I: neither the working directory nor PYTHON* variables reach sys.path
    (cd "$WORK/tree-$mode" && env "${envs[@]}" "$WORK/venv-$mode/bin/python" -I -m pytest "${args[@]}")
}

for m in native pure; do
    v="want_$m"
    if [ -n "${!v}" ]; then prepare "$m"; fi
done

rc=0
if [ -n "$want_native" ] && [ -n "$want_pure" ] && [ -n "${WHEEL_CHECK_PARALLEL:-}" ]; then
    log "native and pure: the suite against each installed wheel, side by side (pure's output follows)"
    suite pure >"$WORK/pure.log" 2>&1 &
    pure_pid=$!
    suite native || rc=1
    wait "$pure_pid" || rc=1
    log "pure: the suite's output"
    cat "$WORK/pure.log"
else
    for m in native pure; do
        v="want_$m"
        if [ -n "${!v}" ]; then
            log "$m: the suite against the installed wheel"
            suite "$m" || rc=1
        fi
    done
fi
if [ "$rc" -ne 0 ]; then
    log "FAILED (see the suites' summaries above)"
    exit 1
fi
log "done"
