"""dcgmrelay: parse, relay and ship NVIDIA dcgm-exporter metrics."""

from . import fields
from ._version import __version__
from .errors import CsvSpecError, DcgmRelayError, ParseError, UnknownFieldError

__all__ = [
    "CsvSpecError",
    "DcgmRelayError",
    "ParseError",
    "UnknownFieldError",
    "__version__",
    "fields",
]
