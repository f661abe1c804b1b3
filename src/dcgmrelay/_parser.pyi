# Type stub of the native parser (_parser.pyx); same contract as _parser_py.parse_raw.
from typing import Optional, Union

from ._parser_py import MEMO_MAX as MEMO_MAX
from ._parser_py import MEMO_MAX_KEY as MEMO_MAX_KEY
from ._parser_py import TS_ABSENT as TS_ABSENT
from ._parser_py import Memo, RawScrape

SPARE_MAX: int

def parse_raw(data: Union[bytes, bytearray, memoryview], om: bool, strict: bool, max_errors: int,
              source: Optional[str], memo: Optional[Memo] = None) -> RawScrape: ...
