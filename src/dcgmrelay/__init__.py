"""dcgmrelay: parse, relay and ship NVIDIA dcgm-exporter metrics.

    >>> import dcgmrelay
    >>> scrape = dcgmrelay.parse(body)            # bytes from GET :9400/metrics
    >>> scrape.values, scrape.field_ids           # numpy columns
    >>> scrape.value("GPU-…", "DCGM_FI_DEV_GPU_TEMP")
"""

from . import fields
from ._version import __version__
from .csvspec import MetricSpec, load_csv
from .encode import Encoder, decode_batch, encode
from .errors import CsvSpecError, DcgmRelayError, ParseError, UnknownFieldError
from .kinds import Kind
from .relay import Relay, RelayBatch, RelayStats
from .scrape import (
    TS_ABSENT,
    Entity,
    Family,
    GpuMatrix,
    Parser,
    SampleError,
    Scrape,
    format_from_content_type,
    implementation,
    parse,
)

__all__ = [
    "TS_ABSENT",
    "CsvSpecError",
    "DcgmRelayError",
    "Encoder",
    "Entity",
    "Family",
    "GpuMatrix",
    "Kind",
    "MetricSpec",
    "ParseError",
    "Parser",
    "Relay",
    "RelayBatch",
    "RelayStats",
    "SampleError",
    "Scrape",
    "UnknownFieldError",
    "__version__",
    "decode_batch",
    "encode",
    "fields",
    "format_from_content_type",
    "implementation",
    "load_csv",
    "parse",
]
