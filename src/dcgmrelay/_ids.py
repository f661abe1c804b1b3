"""Small helpers on the integer id columns that the hot path compares every scrape."""

from __future__ import annotations

from typing import Any

__all__ = ["same_ids"]


def same_ids(a: Any, b: Any) -> bool:
    """Whether two id arrays (names, label sets, series, codes) hold the same values.

    The steady-state checks ("is this scrape shaped like the last one?") run several times a
    scrape on a few hundred ids; ``np.array_equal`` spends more on its Python-level checks
    than on the comparison. One compare of the raw bytes is exact for arrays of one dtype; a
    dtype or shape difference counts as different, which for these checks only means a rebuild.
    """
    return bool(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes())
