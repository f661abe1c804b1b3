"""One type for values that must never be shown (tokens, passwords, license keys).

The config loader wraps every secret setting in :class:`Secret`; the transport and
the scraper call :meth:`Secret.reveal` only where the value is used (a header, a TLS
handshake). ``repr``, ``str`` and ``format`` all give ``<secret>``, so a secret cannot
reach a log line, an exception message or ``check-config`` output by accident.
"""

from __future__ import annotations

import hmac
from typing import Any, Union

__all__ = ["Secret", "reveal"]


class Secret:
    """A string that must not be shown: ``repr``/``str``/``format`` give ``"<secret>"``; :meth:`reveal` gives it."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: Union[str, "Secret"]) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError(f"a Secret wraps a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The secret value itself. Only pass it to where it is used (an HTTP header, a TLS handshake)."""
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is immutable")

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format("<secret>", spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("dcgmrelay.Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def reveal(value: Any) -> Any:
    """``value.reveal()`` for a :class:`Secret` (also inside tuples, e.g. ``auth["basic"]``), else ``value``."""
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, tuple):
        return tuple(reveal(v) for v in value)
    return value
