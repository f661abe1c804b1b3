"""Packaging: the platforms the wheels are built for, and what the sdist and wheel carry.

The sdist builds from scratch: it carries the ``.pyx`` and never generated C or compiled
modules. The wheel carries the compiled parser and encoder (unless built with
DCGMRELAY_NO_EXTENSIONS=1), ``py.typed``, the stubs and the profiles.

The artifacts checked are those in $DCGMRELAY_TEST_DIST (one sdist and one wheel: how
.ci/wheel-check.sh points the suite it runs against an installed wheel at that very
wheel); without it they are built here from the source tree with ``python -m build``
(the sdist, then the wheel from the unpacked sdist).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"
NO_EXTENSIONS = bool(os.environ.get("DCGMRELAY_NO_EXTENSIONS"))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs 3.11
    tomllib = None

# What the wheels are built for: every CPython from the project's minimum on, for Linux
# (glibc and musl) on x86_64 and aarch64, and for macOS on Intel and Apple silicon.
PYTHONS = ["cp39", "cp310", "cp311", "cp312", "cp313", "cp314"]
EXPECTED_IDENTIFIERS = {
    "linux": {f"{py}-{libc}_{arch}" for py in PYTHONS for libc in ("manylinux", "musllinux")
              for arch in ("x86_64", "aarch64")},
    "macos": {f"{py}-macosx_{arch}" for py in PYTHONS for arch in ("x86_64", "arm64")},
}

# Never in an sdist or a wheel: generated C, compiled modules, Cython annotations, bytecode.
BUILD_OUTPUTS = (".c", ".so", ".pyd", ".html", ".pyc", ".pyo")


def _need(what: str, why: str) -> None:
    if CI:
        pytest.fail(f"{what} is missing ({why}); `pip install -e .[test]` installs it", pytrace=False)
    pytest.skip(f"{what} is not installed ({why})")


def _pyproject() -> dict:
    if tomllib is None:  # pragma: no cover
        _need("tomllib", "Python 3.11+ reads pyproject.toml")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ------------------------------------------------------------------------------- cibuildwheel


@pytest.mark.parametrize("platform", sorted(EXPECTED_IDENTIFIERS))
def test_cibuildwheel_builds_every_platform_family(platform: str) -> None:
    """cibuildwheel's own expansion of [tool.cibuildwheel] (build selector, archs, the
    project's requires-python), without Docker: exactly the expected identifiers."""
    if importlib.util.find_spec("cibuildwheel") is None:
        _need("cibuildwheel", "expands [tool.cibuildwheel]; Python 3.11+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}  # only the file's config
    r = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform, str(ROOT)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = set(r.stdout.split())
    expected = EXPECTED_IDENTIFIERS[platform]
    assert got == expected, f"missing: {sorted(expected - got)}, unexpected: {sorted(got - expected)}"


def test_cibuildwheel_tests_the_wheel_from_copied_sources() -> None:
    """The wheel builds' test command runs the suite on copies of what it reads, none of
    which is dcgmrelay code (so it imports the installed wheel), and every copied path exists
    (cibuildwheel stops on a missing one)."""
    cfg = _pyproject()["tool"]["cibuildwheel"]
    sources = cfg["test-sources"]
    assert "tests" in sources and "pyproject.toml" in sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"[tool.cibuildwheel] test-sources: {src} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        in_package = [p for p in files if (ROOT / "src") in p.parents and p.suffix in (".py", ".pyx", ".so")]
        assert not in_package, f"test-sources copies dcgmrelay code: {in_package[:3]}"
    command = " && ".join(cfg["test-command"]) if isinstance(cfg["test-command"], list) else cfg["test-command"]
    assert "{project}" not in command and "{package}" not in command, "the test command must not use the source tree"
    assert "implementation() == 'c'" in command
    assert '-m "not integration"' in command


# ------------------------------------------------------------------------------- sdist, wheel


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """{"sdist": path, "wheel": path}: given by $DCGMRELAY_TEST_DIST or built here."""
    given = os.environ.get("DCGMRELAY_TEST_DIST")
    if given:
        out = Path(given)
    else:
        if not (ROOT / "setup.py").is_file():
            pytest.fail(f"no source tree at {ROOT} to build from; set DCGMRELAY_TEST_DIST", pytrace=False)
        if importlib.util.find_spec("build") is None:
            _need("build", "builds the sdist and wheel")
        out = tmp_path_factory.mktemp("dist")
        r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"python -m build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    sdists, wheels = sorted(out.glob("dcgmrelay-*.tar.gz")), sorted(out.glob("dcgmrelay-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"want one sdist and one wheel in {out}: {sdists + wheels}"
    return {"sdist": sdists[0], "wheel": wheels[0]}


def _sdist_names(path: Path) -> List[str]:
    """Members of the sdist, relative to its top directory."""
    with tarfile.open(path) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    tops = {PurePosixPath(n).parts[0] for n in names}
    assert len(tops) == 1, f"{path.name}: not one top directory: {sorted(tops)}"
    return [str(PurePosixPath(*PurePosixPath(n).parts[1:])) for n in names]


def _package_files(names: List[str], prefix: str) -> Set[str]:
    """The dcgmrelay package's files among names, relative to the package."""
    return {n[len(prefix):] for n in names if n.startswith(prefix) and ".egg-info/" not in n}


def _source_package_files() -> Set[str]:
    pkg = ROOT / "src" / "dcgmrelay"
    return {str(p.relative_to(pkg).as_posix()) for p in pkg.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in BUILD_OUTPUTS}


def test_sdist_carries_the_sources_and_no_build_output(dist: Dict[str, Path]) -> None:
    names = _sdist_names(dist["sdist"])
    for required in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "PKG-INFO"):
        assert required in names, f"{dist['sdist'].name} lacks {required}"
    pkg = _package_files(names, "src/dcgmrelay/")
    for required in ("__init__.py", "_parser.pyx", "_encode.pyx", "_parser_py.py", "_encode_py.py",
                     "py.typed", "profiles/default-counters.csv", "discovery/__init__.py"):
        assert required in pkg, f"{dist['sdist'].name} lacks src/dcgmrelay/{required}"
    outputs = [n for n in names if n.endswith(BUILD_OUTPUTS)]
    assert not outputs, f"{dist['sdist'].name} carries build outputs: {outputs}"
    assert not [n for n in names if n.startswith("tests/")], "the tests need the checkout; see MANIFEST.in"
    if (ROOT / "src" / "dcgmrelay" / "__init__.py").is_file():  # a source tree: nothing of it left out
        missing = _source_package_files() - pkg
        assert not missing, f"{dist['sdist'].name} lacks {sorted(missing)}"


def test_wheel_carries_the_package_and_the_native_core(dist: Dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = zf.namelist()
    pkg = _package_files(names, "dcgmrelay/")
    # every source, stub, profile and py.typed of the sdist made it into the wheel
    sdist_pkg = _package_files(_sdist_names(dist["sdist"]), "src/dcgmrelay/")
    missing = sdist_pkg - pkg
    assert not missing, f"{dist['wheel'].name} lacks {sorted(missing)} (in the sdist)"
    assert "py.typed" in pkg
    assert {p for p in sdist_pkg if p.endswith(".pyi")} <= pkg
    generated = [n for n in names if n.endswith((".c", ".html", ".pyc", ".pyo"))]
    assert not generated, f"{dist['wheel'].name} carries build outputs: {generated}"
    native = sorted(p for p in pkg if p.endswith((".so", ".pyd")))
    tag = dist["wheel"].name[:-len(".whl")].split("-", 2)[2]
    if NO_EXTENSIONS:
        assert native == [] and tag == "py3-none-any", (dist["wheel"].name, native)
    else:
        assert [p.split(".", 1)[0] for p in native] == ["_encode", "_parser"], native
        assert tag != "py3-none-any", dist["wheel"].name


def test_without_a_compiler_the_install_falls_back_to_the_pure_twin(dist: Dict[str, Path], tmp_path: Path) -> None:
    """The sdist still builds where the C compiler fails: a wheel without the native core,
    and the build output says so."""
    env = {k: v for k, v in os.environ.items() if k != "DCGMRELAY_NO_EXTENSIONS"}
    env["CC"] = "false"  # a compiler that fails every compilation
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir",
                        "-w", str(tmp_path), str(dist["sdist"])], capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for ext in ("dcgmrelay._parser", "dcgmrelay._encode"):
        assert f"*** {ext} not built (" in out and "dcgmrelay will run on the pure-Python twin" in out, out[-4000:]
    (wheel,) = tmp_path.glob("dcgmrelay-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        native = [n for n in zf.namelist() if n.endswith((".so", ".pyd"))]
    assert native == [], native
