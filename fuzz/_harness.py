"""What the fuzz harnesses share: instrumentation, the libFuzzer entry point, error checks.

A harness is a plain module with ``TestOneInput(data: bytes)``; importing it neither needs
atheris nor starts libFuzzer (tests/test_fuzz_harnesses.py calls it on the seed corpora).
Run as a script it instruments dcgmrelay's Python modules for coverage and fuzzes.
This module must not import dcgmrelay: the harness imports it inside ``instrumented()``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent


def instrumented(enabled: bool) -> ContextManager[Any]:
    """Coverage instrumentation of dcgmrelay's Python modules imported inside (only when
    fuzzing: ``enabled`` is ``__name__ == "__main__"`` of the harness)."""
    if not enabled:
        return contextlib.nullcontext()
    import atheris

    if any(m == "dcgmrelay" or m.startswith("dcgmrelay.") for m in sys.modules):
        raise RuntimeError("dcgmrelay was imported before instrumentation: nothing would be covered")
    return atheris.instrument_imports(include=["dcgmrelay"])


def fuzz(test_one_input: Callable[[bytes], None], argv: Optional[list] = None) -> None:
    """Run libFuzzer on ``test_one_input`` with the command line's libFuzzer flags.

    An input that raises is also saved as ``<artifact_prefix>exception-<sha1>`` before
    libFuzzer handles it: libFuzzer's own ``crash-`` file can be lost when its timer signal
    hits the process while it exits."""
    import atheris

    args = list(sys.argv if argv is None else argv)
    prefix = next((a.split("=", 1)[1] for a in args if a.startswith("-artifact_prefix=")), "./")

    def guarded(data: bytes) -> None:
        try:
            test_one_input(data)
        except BaseException:
            import hashlib

            with open(f"{prefix}exception-{hashlib.sha1(data).hexdigest()}", "wb") as fh:
                fh.write(data)
            raise

    atheris.Setup(args, guarded)
    atheris.Fuzz()


def line_count(data: bytes) -> int:
    """Lines of a body as an error may number them (a last line without a newline counts)."""
    return data.count(b"\n") + 1


def yaml_line_count(data: bytes) -> int:
    """Lines as YAML counts them: ``\r\n``, ``\r``, ``\n``, NEL, LS and PS each end one."""
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    return sum(text.count(c) for c in "\r\n\x85\u2028\u2029") + 1


def check_position(what: str, line: Optional[int], column: Optional[int], data: bytes, *,
                   lines: Optional[int] = None) -> None:
    """An error must say where: a 1-based line inside the input (``lines`` of them; default
    the newline count) and a 1-based column."""
    if line is not None:
        n = line_count(data) if lines is None else lines
        assert 1 <= line <= n, f"{what}: line {line} outside the input ({n} lines)"
    if column is not None:
        assert column >= 1, f"{what}: column {column} is not 1-based"


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Warnings (CsvSpecWarning, ...) are results, not findings: keep them off stderr."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
