"""Pick the parser implementation: the native core unless told or forced otherwise.

``DCGMRELAY_NO_EXTENSIONS=1`` selects the pure-Python twin, as does any
interpreter other than CPython. Type checkers read the typed twin.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

NO_EXTENSIONS = bool(os.environ.get("DCGMRELAY_NO_EXTENSIONS")) or sys.implementation.name != "cpython"

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._parser_py import parse_raw

    IMPLEMENTATION = "py"
else:
    try:
        from ._parser import parse_raw

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - a source checkout without a build
        from ._parser_py import parse_raw

        IMPLEMENTATION = "py"

__all__ = ["IMPLEMENTATION", "NO_EXTENSIONS", "parse_raw"]
