"""Tests for the strict OpenMetrics 1.0 validator, written from the spec's ABNF and MUSTs."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcgmrelay._openmetrics_strict import validate
from dcgmrelay.errors import ParseError

HIST = '# TYPE a histogram\n'
E = "# EOF\n"

# --------------------------------------------------------------------------
# Valid expositions.

VALID = {
    "only_eof": "# EOF\n",
    "eof_without_newline": "# EOF",
    "unknown_no_metadata": "a 1\n# EOF\n",
    "empty_braces": "a{} 1\n# EOF\n",
    "colon_in_name": "a:b 1\n# EOF\n",
    "number_forms": "a 1\nb -2.5\nc 1.\nd .5\ne 1e5\nf 1E-5\ng +3\nh 0042\n# EOF\n",
    "non_real_numbers": "a +Inf\nb -inf\nc Infinity\nd NaN\ne nan\n# EOF\n",
    "timestamps": "a 1 1520879607.789\nb 1 -1\nc 1 .5\nd 1 1e3\n# EOF\n",
    "empty_help_and_unit": "# HELP a \n# UNIT a \n# EOF\n",
    "help_escapes": '# HELP a x \\\\ \\n \\" \\q y\n# EOF\n',
    "label_escapes": 'a{a="\\\\",b="\\n",c="\\"",d="\\q"} 1\n# EOF\n',
    "label_value_specials": 'a{a="# { } , = 1 2",b="",c="\x00",d="\u4e2d\u6587"} 1\n# EOF\n',
    "metadata_any_order": "# HELP a_seconds h\n# UNIT a_seconds seconds\n# TYPE a_seconds gauge\na_seconds 1\n# EOF\n",
    "family_without_samples": "# TYPE a gauge\n# TYPE b gauge\nb 1\n# EOF\n",
    "gauge_with_timestamps": "# TYPE a gauge\na 17.0 123\na 18.0 456\n# EOF\n",
    "tiny_timestamp_steps": (
        "# TYPE a gauge\n"
        'a{a="1"} 1 0.0000000000\na{a="1"} 2 0.0000000001\na{a="1"} 3 0.0000000010\n'
        'a{a="2"} 4 0.0000000000\n# EOF\n'
    ),
    "counter": "# TYPE a counter\n# HELP a h\na_total 17.0\na_created 1520430000.123\n# EOF\n",
    "counter_timestamps": "# TYPE a counter\na_total 17 1520879607.789\na_created 1520430000.123 1520879607.789\n# EOF\n",
    "counter_uint64": "# TYPE a counter\na_total 18446744073709551615\n# EOF\n",
    "counter_exemplars": (
        "# TYPE a counter\n"
        'a_total{b="1"} 0 # {} 1\n'
        'a_total{b="2"} 0 123 # {trace_id="x"} 0.5\n'
        'a_total{b="3"} 0 # {trace_id="x # y"} 0.5 123\n# EOF\n'
    ),
    "exemplar_128_wide_chars": '# TYPE a counter\na_total 1 # {a="' + "\u4e2d" * 127 + '"} 1\n# EOF\n',
    "histogram": (
        HIST + 'a_bucket{le="0.0"} 0\na_bucket{le="1e-05"} 0\na_bucket{le="1"} 5\n'
        'a_bucket{le="1.1e+23"} 7\na_bucket{le="+Inf"} 7\na_count 7\na_sum 324789.3\na_created 1520430000.123\n' + E
    ),
    "histogram_exemplars": (
        HIST + 'a_bucket{le="0.1"} 8 # {} 0.054\na_bucket{le="1"} 11 # {trace_id="K"} 0.67\n'
        'a_bucket{le="10"} 17 # {trace_id="o"} 9.8 1520879607.789\na_bucket{le="+Inf"} 17 # {} 1e9\n' + E
    ),
    "histogram_negative_buckets": HIST + 'a_bucket{le="-1.0"} 0\na_bucket{le="1.0"} 1\na_bucket{le="+Inf"} 3\n' + E,
    "histogram_labels_any_order": HIST + 'a_bucket{le="+Inf",x="1"} 1\na_count{x="1"} 1\na_sum{x="1"} 2\n' + E,
    "histogram_two_metrics": (
        HIST + 'a_bucket{x="1",le="+Inf"} 1\na_count{x="1"} 1\na_sum{x="1"} 1\n'
        'a_bucket{x="2",le="+Inf"} 2\na_count{x="2"} 2\na_sum{x="2"} 1\n' + E
    ),
    "gaugehistogram": (
        "# TYPE a gaugehistogram\n"
        'a_bucket{le="0.01"} 20.0\na_bucket{le="+Inf"} 42.0\na_gcount 42.0\na_gsum 3289.3\n' + E
    ),
    "gaugehistogram_negative_gsum": (
        '# TYPE a gaugehistogram\na_bucket{le="-1"} 1\na_bucket{le="+Inf"} 2\na_gcount 2\na_gsum -5\n' + E
    ),
    "summary": (
        '# TYPE a summary\na{quantile="0"} 1\na{quantile="0.95"} 123.7\na{quantile="1"} NaN\n'
        "a_count 17\na_sum 9.1\na_created 123\n" + E
    ),
    "summary_metric_points": (
        "# TYPE a_seconds summary\n# UNIT a_seconds seconds\n"
        'a_seconds_count{a="bb"} 0 123\na_seconds_sum{a="bb"} 0 123\n'
        'a_seconds_count{a="bb"} 0 456\na_seconds_sum{a="bb"} 0 456\n'
        'a_seconds_count{a="ccc"} 0 123\na_seconds_sum{a="ccc"} 0 123\n' + E
    ),
    "stateset": (
        '# TYPE a stateset\na{e="c",a="x"} 1\na{e="c",a="y"} 0.0\na{e="r",a="x"} 0\na{e="r",a="y"} 1.0\n' + E
    ),
    "info": '# TYPE a info\na_info{name="pretty name",version="8.2.7"} 1\na_info{name="b"} 1.0\n' + E,
    "info_timestamps": '# TYPE a info\na_info{a="1"} 1 1\na_info{a="2"} 1 0\n' + E,
    "unknown_typed": "# TYPE a unknown\na 42.23\n" + E,
    "suffix_name_as_own_family": "# TYPE a counter\na_total 1\n# TYPE a_bucket gauge\na_bucket 1\n" + E,
    "help_after_samples_of_other_family": "a 1\n# HELP b x\nb 1\n" + E,
    # gaugehistograms have no _created sample, so a_created is a family of its own
    "gaugehistogram_then_created_family": (
        '# TYPE a gaugehistogram\na_bucket{le="+Inf"} 1\na_created 1\n' + E
    ),
}


@pytest.mark.parametrize("text", list(VALID.values()), ids=list(VALID))
def test_valid(text: str) -> None:
    validate(text.encode("utf-8"))


# --------------------------------------------------------------------------
# Invalid expositions: (text, line, column or None, piece of the reason).

INVALID = {
    # framing
    "empty": ("", 1, 1, "# EOF"),
    "no_eof": ("a 1\n", 2, 1, "expected '# EOF' as the last line"),
    "no_final_newline_or_eof": ("a 1", 1, 4, "# EOF"),
    "text_after_eof": ("a 1\n# EOF\nblah", 3, 1, "follow"),
    "blank_after_eof": ("# EOF\n\n", 2, 1, "follow"),
    "eof_with_suffix": ("a 1\n# EOFblah\n", 2, 6, "alone"),
    "eof_trailing_space": ("# EOF \n", 1, 6, "alone"),
    "blank_line": ("a 1\n\n# EOF\n", 2, 1, "blank"),
    "crlf": ("a 1\r\n# EOF\n", 1, 4, "carriage return"),
    "crlf_eof": ("a 1\n# EOF\r\n", 2, 6, "carriage return"),
    "bom": ("\ufeffa 1\n# EOF\n", 1, 1, "byte order mark"),
    "comment": ("# just a comment\na 1\n# EOF\n", 1, 1, "comments are not allowed"),
    "leading_space": (" # HELP a x\n# EOF\n", 1, 1, "metric name"),
    # names and labels
    "name_starts_with_digit": ("0a 1\n# EOF\n", 1, 1, "metric name"),
    "name_with_dot": ("a.b 1\n# EOF\n", 1, 2, "'.'"),
    "name_with_dash": ("a-b 1\n# EOF\n", 1, 2, "'-'"),
    "reserved_family_name": ("_a 1\n# EOF\n", 1, 1, "reserved"),
    "label_unquoted": ("a{a=1} 1\n# EOF\n", 1, 5, "'\"'"),
    "label_single_quotes": ("a{a='1'} 1\n# EOF\n", 1, 5, "'\"'"),
    "label_unterminated": ('a{a="1} 1\n# EOF\n', 1, 10, "unterminated"),
    "label_no_equals": ("a{a} 1\n# EOF\n", 1, 4, "'='"),
    "label_no_value": ("a{a=} 1\n# EOF\n", 1, 5, "'\"'"),
    "label_missing_comma": ('a{a="1"b="2"} 1\n# EOF\n', 1, 8, "','"),
    "label_double_comma": ('a{a="1",,b="2"} 1\n# EOF\n', 1, 9, "label name"),
    "label_trailing_comma": ('a{a="1",b="2",} 1\n# EOF\n', 1, 15, "trailing comma"),
    "label_space_after_brace": ('a{ a="1"} 1\n# EOF\n', 1, 3, "label name"),
    "label_space_before_equals": ('a{a ="1"} 1\n# EOF\n', 1, 4, "'='"),
    "label_name_digit": ('a{1="1"} 1\n# EOF\n', 1, 3, "label name"),
    "label_name_colon": ('a{a:b="1"} 1\n# EOF\n', 1, 4, "'='"),
    "duplicate_label": ('a{a="1",a="2"} 1\n# EOF\n', 1, 9, "duplicate label name 'a'"),
    "reserved_label": ('a{__name__="x"} 1\n# EOF\n', 1, 3, "reserved"),
    "label_value_ends_in_backslash": ('a{a="\\"} 1\n# EOF\n', 1, 11, "unterminated"),
    # sample fields
    "no_value": ("a\n# EOF\n", 1, 2, "value"),
    "no_space_after_labels": ('a{a="1"}1\n# EOF\n', 1, 9, "' '"),
    "empty_value": ("a \n# EOF\n", 1, 3, "value"),
    "two_spaces": ("a  1\n# EOF\n", 1, 3, "exactly one space"),
    "tab_separator": ("a\t1\n# EOF\n", 1, 2, "'\\t'"),
    "trailing_space": ("a 1 \n# EOF\n", 1, 4, "trailing space"),
    "value_word": ("a a\n# EOF\n", 1, 3, "invalid sample value"),
    "value_underscore": ("a 1_2\n# EOF\n", 1, 3, "invalid sample value"),
    "value_hex": ("a 0x1\n# EOF\n", 1, 3, "invalid sample value"),
    "value_hexfloat": ("a 0x1p-3\n# EOF\n", 1, 3, "invalid sample value"),
    "value_lone_dot": ("a .\n# EOF\n", 1, 3, "invalid sample value"),
    "value_bare_exponent": ("a 1e\n# EOF\n", 1, 3, "invalid sample value"),
    "value_signed_nan": ("a +NaN\n# EOF\n", 1, 3, "invalid sample value"),
    "value_overflow": ("a 1e400\n# EOF\n", 1, 3, "float64"),
    "timestamp_nan": ("a 1 NaN\n# EOF\n", 1, 5, "invalid timestamp"),
    "timestamp_inf": ("a 1 +Inf\n# EOF\n", 1, 5, "invalid timestamp"),
    "timestamp_two_dots": ("a 1 1.1.1\n# EOF\n", 1, 5, "invalid timestamp"),
    "timestamp_garbage": ("a 1 1z\n# EOF\n", 1, 5, "invalid timestamp"),
    # metadata
    "help_no_name": ("# HELP\n# EOF\n", 1, 7, "' '"),
    "help_no_text_separator": ("# HELP a\n# EOF\n", 1, 9, "' '"),
    "help_tab": ("# HELP a\tx\n# EOF\n", 1, 9, "' '"),
    "help_bare_quote": ('# HELP a say "hi"\n# EOF\n', 1, 14, "escaped"),
    "help_trailing_backslash": ("# HELP a x\\\n# EOF\n", 1, 11, "backslash"),
    "type_missing": ("# TYPE a\n# EOF\n", 1, 9, "' '"),
    "type_unknown_word": ("# TYPE a meh\n# EOF\n", 1, 10, "invalid metric type 'meh'"),
    "type_untyped": ("# TYPE a untyped\n# EOF\n", 1, 10, "invalid metric type"),
    "type_uppercase": ("# TYPE a Gauge\n# EOF\n", 1, 10, "invalid metric type"),
    "type_trailing_space": ("# TYPE a gauge \n# EOF\n", 1, 10, "invalid metric type"),
    "type_double_space": ("# TYPE  a gauge\n# EOF\n", 1, 8, "metric name"),
    "keyword_lowercase": ("# type a gauge\n# EOF\n", 1, 1, "comments"),
    "unit_not_suffix": ("# UNIT a seconds\n# EOF\n", 1, 10, "suffix"),
    "unit_not_underscore_suffix": ("# UNIT aseconds seconds\n# EOF\n", 1, 17, "suffix"),
    "unit_trailing_space": ("# UNIT a_s s \n# EOF\n", 1, 13, "unit"),
    "unit_on_info": ("# TYPE x_u info\n# UNIT x_u u\n# EOF\n", 2, 12, "empty unit"),
    "unit_before_stateset": ("# UNIT x_u u\n# TYPE x_u stateset\n# EOF\n", 2, 12, "empty unit"),
    "type_after_samples": ("# HELP a x\na 1\n# TYPE a gauge\n# EOF\n", 3, 1, "before"),
    "help_after_samples": ("# TYPE a gauge\na 1\n# HELP a x\n# EOF\n", 3, 1, "before"),
    "duplicate_help": ("# HELP a \n# HELP a \n# EOF\n", 2, 1, "duplicate '# HELP'"),
    "duplicate_type": ("# TYPE a counter\n# TYPE a counter\n# EOF\n", 2, 1, "duplicate '# TYPE'"),
    "duplicate_unit": ("# UNIT a_s s\n# UNIT a_s s\n# EOF\n", 2, 1, "duplicate '# UNIT'"),
    # families
    "family_repeated": ("a 1\nb 1\na 2\n# EOF\n", 3, 1, "already appeared"),
    "family_metadata_repeated": ("# TYPE a gauge\na 1\n# TYPE b gauge\n# HELP a x\n# EOF\n", 4, 8, "already appeared"),
    "clash_created_then_counter": ("# TYPE a_created gauge\n# TYPE a counter\n# EOF\n", 2, 10, "clashes"),
    "clash_counter_then_created": ("# TYPE a counter\na_total 1\n# TYPE a_created gauge\n# EOF\n", 3, 8, "clashes"),
    "interleaved_families": (
        "# TYPE a summary\nquantile{quantile=\"0\"} 0\na_sum 0\n# EOF\n",
        3,
        1,
        "clashes",
    ),
    "counter_bare_name": ("# TYPE a counter\na 1\n# EOF\n", 2, 1, "counter sample name must end in _total or _created"),
    "info_bare_name": ("# TYPE a info\na 1\n# EOF\n", 2, 1, "_info"),
    "histogram_bare_name": (HIST + "a 1\n# EOF\n", 2, 1, "_bucket"),
    # metrics and points
    "duplicate_series": ("# TYPE a gauge\na 1\na 2\n# EOF\n", 3, 1, "duplicate sample"),
    "interleaved_metrics": ('a{x="1"} 1\na{x="2"} 1\na{x="1"} 1\n# EOF\n', 3, 1, "contiguous"),
    "timestamps_backwards": ("# TYPE a gauge\na 0 1\na 0 0\n# EOF\n", 3, 5, "backwards"),
    "timestamp_equal": ("# TYPE a gauge\na 0 1\na 1 1.0\n# EOF\n", 3, 1, "duplicate sample"),
    "timestamp_presence_mixed": ("# TYPE a gauge\na 0\na 0 0\n# EOF\n", 3, 5, "timestamps"),
    "interleaved_points": (
        "# TYPE a summary\na_count 0 123\na_count 0 456\na_sum 0 123\n# EOF\n",
        4,
        9,
        "backwards",
    ),
    # counter
    "counter_nan": ("# TYPE a counter\na_total NaN\n# EOF\n", 2, 9, "NaN"),
    "counter_negative": ("# TYPE a counter\na_total -1\n# EOF\n", 2, 9, "negative"),
    "counter_created_only": ("# TYPE a counter\na_created 1\n# EOF\n", 2, 1, "_total"),
    # histogram
    "bucket_without_le": (HIST + "a_bucket 0\n# EOF\n", 2, 9, "'le'"),
    "le_on_count": (HIST + 'a_bucket{le="+Inf"} 1\na_count{le="1"} 1\n# EOF\n', 3, 9, "'le'"),
    "le_lowercase_inf": (HIST + 'a_bucket{le="inf"} 0\n# EOF\n', 2, 14, "+Inf"),
    "le_nan": (HIST + 'a_bucket{le="NaN"} 0\n# EOF\n', 2, 14, "invalid le"),
    "le_word": (HIST + 'a_bucket{le="x"} 0\n# EOF\n', 2, 14, "invalid le"),
    "no_inf_bucket": (HIST + 'a_bucket{le="1"} 0\n# EOF\n', 2, 1, "+Inf"),
    "sum_without_buckets": (HIST + "a_sum 1\n# EOF\n", 2, 1, "+Inf"),
    "buckets_out_of_order": (
        HIST + 'a_bucket{le="2"} 0\na_bucket{le="1"} 0\na_bucket{le="+Inf"} 0\n# EOF\n', 3, 14, "increasing le"
    ),
    "buckets_same_threshold": (
        HIST + 'a_bucket{le="1"} 0\na_bucket{le="1.0"} 0\na_bucket{le="+Inf"} 0\n# EOF\n', 3, 14, "increasing le"
    ),
    "buckets_not_cumulative": (
        HIST + 'a_bucket{le="1"} 2\na_bucket{le="+Inf"} 1\n# EOF\n', 3, 21, "cumulative"
    ),
    "bucket_negative": (HIST + 'a_bucket{le="+Inf"} -1\n# EOF\n', 2, 21, "negative"),
    "bucket_nan": (HIST + 'a_bucket{le="+Inf"} NaN\n# EOF\n', 2, 21, "NaN"),
    "bucket_fraction": (HIST + 'a_bucket{le="+Inf"} 0.5\n# EOF\n', 2, 21, "integer"),
    "count_mismatch": (HIST + 'a_bucket{le="+Inf"} 0\na_count 1\na_sum 0\n# EOF\n', 3, 9, "differs"),
    "count_without_sum": (HIST + 'a_bucket{le="+Inf"} 1\na_count 1\n# EOF\n', 3, 1, "requires"),
    "sum_without_count": (HIST + 'a_bucket{le="+Inf"} 1\na_sum 1\n# EOF\n', 3, 1, "requires"),
    "sum_negative": (HIST + 'a_bucket{le="+Inf"} 1\na_count 1\na_sum -1\n# EOF\n', 4, 7, "negative"),
    "sum_with_negative_threshold": (
        HIST + 'a_bucket{le="-1"} 1\na_bucket{le="+Inf"} 2\na_count 2\na_sum 1\n# EOF\n', 5, 7, "negative bucket"
    ),
    "gsum_negative_without_negative_threshold": (
        '# TYPE a gaugehistogram\na_bucket{le="+Inf"} 1\na_gcount 1\na_gsum -1\n# EOF\n', 4, 8, "_gsum"
    ),
    "gaugehistogram_gcount_without_gsum": (
        '# TYPE a gaugehistogram\na_bucket{le="+Inf"} 1\na_gcount 1\n# EOF\n', 3, 1, "requires"
    ),
    # summary
    "quantile_missing": ("# TYPE a summary\na 0\n# EOF\n", 2, 2, "'quantile'"),
    "quantile_above_one": ('# TYPE a summary\na{quantile="1.01"} 0\n# EOF\n', 2, 13, "between 0 and 1"),
    "quantile_negative": ('# TYPE a summary\na{quantile="-1"} 0\n# EOF\n', 2, 13, "between 0 and 1"),
    "quantile_nan": ('# TYPE a summary\na{quantile="NaN"} 0\n# EOF\n', 2, 13, "between 0 and 1"),
    "quantile_value_negative": ('# TYPE a summary\na{quantile="0.5"} -1\n# EOF\n', 2, 19, "negative"),
    "quantile_on_count": ('# TYPE a summary\na_count{quantile="0.5"} 1\n# EOF\n', 2, 9, "'quantile'"),
    "summary_count_nan": ("# TYPE a summary\na_count NaN\n# EOF\n", 2, 9, "NaN"),
    "summary_sum_negative": ("# TYPE a summary\na_sum -1\n# EOF\n", 2, 7, "negative"),
    # stateset / info
    "stateset_missing_label": ("# TYPE a stateset\na 0\n# EOF\n", 2, 2, "label named 'a'"),
    "stateset_value_two": ('# TYPE a stateset\na{a="x"} 2\n# EOF\n', 2, 10, "0 or 1"),
    "info_value_two": ('# TYPE a info\na_info{x="1"} 2\n# EOF\n', 2, 15, "must be 1"),
    # exemplars
    "exemplar_on_gauge": ('# TYPE a gauge\na 1 # {a="b"} 1\n# EOF\n', 2, 5, "exemplars are only allowed"),
    "exemplar_on_unknown": ('a_total 1 # {a="b"} 1\n# EOF\n', 1, 11, "exemplars are only allowed"),
    "exemplar_on_sum": (HIST + 'a_sum 1 # {a="b"} 0.5\n# EOF\n', 2, 9, "exemplars are only allowed"),
    "exemplar_on_created": ('# TYPE a counter\na_created 1 # {a="b"} 0.5\n# EOF\n', 2, 13, "exemplars"),
    "exemplar_no_space_before_hash": (HIST + 'a_bucket{le="+Inf"} 1# {} 1\n# EOF\n', 2, 21, "invalid sample value"),
    "exemplar_no_space_after_hash": (HIST + 'a_bucket{le="+Inf"} 1 #{} 1\n# EOF\n', 2, 24, "' '"),
    "exemplar_lonely_hash": (HIST + 'a_bucket{le="+Inf"} 1 #\n# EOF\n', 2, 24, "' '"),
    "exemplar_no_braces": ('# TYPE a counter\na_total 1 # id="a" 1\n# EOF\n', 2, 13, "'{'"),
    "exemplar_no_value": ('# TYPE a counter\na_total 1 1 # {id="a"}  \n# EOF\n', 2, 24, "exemplar value"),
    "exemplar_trailing_space": (HIST + 'a_bucket{le="+Inf"} 1 # {} 1 \n# EOF\n', 2, 29, "trailing space"),
    "exemplar_extra_field": (HIST + 'a_bucket{le="+Inf"} 1 # {} 1 1 1\n# EOF\n', 2, 31, "unexpected text"),
    "exemplar_bad_timestamp": (HIST + 'a_bucket{le="+Inf"} 1 # {} 1 NaN\n# EOF\n', 2, 30, "exemplar timestamp"),
    "exemplar_too_long": ('# TYPE a counter\na_total 1 # {a="' + "x" * 128 + '"} 1\n# EOF\n', 2, 13, "128"),
    "exemplar_above_bucket": (
        HIST + 'a_bucket{le="1"} 1 # {} 2\na_bucket{le="+Inf"} 1\n# EOF\n', 2, 25, "above"
    ),
    "exemplar_duplicate_label": ('# TYPE a counter\na_total 1 # {a="1",a="2"} 1\n# EOF\n', 2, 20, "duplicate"),
}


@pytest.mark.parametrize(
    ("text", "line", "column", "reason"), list(INVALID.values()), ids=list(INVALID)
)
def test_invalid(text: str, line: int, column: Optional[int], reason: str) -> None:
    with pytest.raises(ParseError) as info:
        validate(text.encode("utf-8"))
    err = info.value
    assert err.line == line, err.reason
    if column is not None:
        assert err.column == column, err.reason
    assert reason in err.reason
    lines = text.split("\n")
    expected_source = lines[line - 1] if line - 1 < len(lines) else ""
    assert err.source_line == expected_source


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [
        (b'a{a="\xff"} 1\n# EOF\n', 1, 6),
        (b"# HELP a caf\xc3\xa9 \xe2\x82\n# EOF\n", 1, 15),
        (b"a 1\n\xed\xa0\x80 1\n# EOF\n", 2, 1),  # an encoded surrogate is not UTF-8
        (b"# EOF\n\x80", 2, 1),
    ],
)
def test_invalid_utf8(data: bytes, line: int, column: int) -> None:
    with pytest.raises(ParseError) as info:
        validate(data)
    assert (info.value.line, info.value.column) == (line, column)
    assert "UTF-8" in info.value.reason or "follow" in info.value.reason
    assert info.value.source_line is not None and "\ufffd" in info.value.source_line


def test_earlier_syntax_error_wins_over_later_bad_byte() -> None:
    with pytest.raises(ParseError) as info:
        validate(b'a{a=1} "\xff"\n# EOF\n')
    assert info.value.column == 5


def test_message_shows_line_and_caret() -> None:
    with pytest.raises(ParseError) as info:
        validate(b'# TYPE g gauge\ng{gpu="0",gpu="1"} 1\n# EOF\n', source="http://host:9400/metrics")
    err = info.value
    assert (err.line, err.column, err.reason) == (2, 11, "duplicate label name 'gpu'")
    assert err.source == "http://host:9400/metrics"
    text = str(err)
    assert text.splitlines() == [
        "http://host:9400/metrics:line 2, column 11: duplicate label name 'gpu'",
        '    g{gpu="0",gpu="1"} 1',
        "              ^",
    ]


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate(b"")


def test_accepts_bytearray_and_rejects_str() -> None:
    validate(bytearray(b"a 1\n# EOF\n"))
    with pytest.raises(TypeError):
        validate("a 1\n# EOF\n")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Robustness: only ParseError, never a hang, linear time.

_SEEDS = [VALID["histogram_exemplars"], VALID["summary"], VALID["stateset"], VALID["counter_exemplars"],
          VALID["gauge_with_timestamps"], VALID["label_escapes"], VALID["info"]]
_PIECES = [b" ", b"#", b"{", b"}", b'"', b"\\", b",", b"=", b"\n", b"\r", b"\xff", b"\xc3", b"_total", b"_bucket",
           b"le", b"quantile", b"+Inf", b"NaN", b"1e400", b"-1", b".", b"# EOF", b"# TYPE a counter", b"\x00"]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)).encode("utf-8"))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            data[pos:pos] = draw(st.sampled_from(_PIECES))
        elif kind == 1:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == 2:
            data[pos:pos] = draw(st.binary(max_size=6))
        else:
            start = draw(st.integers(0, len(data)))
            data[pos:pos] = data[start:start + draw(st.integers(1, 30))]
    return bytes(data)


def _check_only_parse_error(data: bytes) -> None:
    try:
        validate(data)
    except ParseError as err:
        assert err.line >= 1 and err.column >= 1
        assert err.line <= data.count(b"\n") + 2
        assert err.source_line is not None
        str(err)


@settings(max_examples=400, deadline=timedelta(seconds=2))
@given(_mutated())
def test_mutations_raise_only_parse_error(data: bytes) -> None:
    _check_only_parse_error(data)


@settings(max_examples=200, deadline=timedelta(seconds=2))
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    _check_only_parse_error(data)


def test_large_input_is_linear() -> None:
    families = "".join(
        f'# TYPE f{i} counter\n# HELP f{i} h\nf{i}_total{{gpu="{i}"}} {i}\nf{i}_created{{gpu="{i}"}} 1\n' for i in range(20000)
    )
    long_line = 'big{v="' + "x" * 2_000_000 + '"} 1\n'
    hist = HIST + "".join(f'a_bucket{{le="{i}"}} {i}\n' for i in range(50000)) + 'a_bucket{le="+Inf"} 50000\n'
    for text in (families + E, long_line + E, hist + E):
        start = time.perf_counter()
        validate(text.encode("utf-8"))
        assert time.perf_counter() - start < 20
