"""The collectors-CSV reader: dcgm-exporter's Go encoding/csv rules, the tolerated vendor quirks,
the built-in profiles, and MetricSpec's lookups."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from dcgmrelay import fields
from dcgmrelay.csvspec import (
    PROM_TYPES,
    TOLERATED_NAMES,
    CsvSpecWarning,
    MetricSpec,
    SpecRow,
    builtin_profiles,
    load_csv,
)
from dcgmrelay.errors import CsvSpecError, DcgmRelayError, UnknownFieldError
from dcgmrelay.kinds import Kind

G, C, R, E, L = Kind.GAUGE, Kind.COUNTER, Kind.RATE, Kind.EVENT, Kind.LABEL


def quiet(source: object, **kw: object) -> MetricSpec:
    """load_csv with its warnings swallowed (they stay on spec.warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CsvSpecWarning)
        return load_csv(source, **kw)  # type: ignore[arg-type]


def table(spec: MetricSpec) -> List[Tuple[str, int, str, Kind]]:
    return [(r.name, r.field_id, r.prom_type, r.kind) for r in spec.rows]


# ---------------------------------------------------------------------------------------
# built-in profiles
# ---------------------------------------------------------------------------------------

DEFAULT_ROWS = [
    ("DCGM_FI_DEV_SM_CLOCK", 100, "gauge", G),
    ("DCGM_FI_DEV_MEM_CLOCK", 101, "gauge", G),
    ("DCGM_FI_DEV_MEMORY_TEMP", 140, "gauge", G),
    ("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", G),
    ("DCGM_FI_DEV_POWER_USAGE", 155, "gauge", G),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 156, "counter", C),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 202, "counter", C),
    ("DCGM_FI_DEV_GPU_UTIL", 203, "gauge", G),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", 204, "gauge", G),
    ("DCGM_FI_DEV_ENC_UTIL", 206, "gauge", G),
    ("DCGM_FI_DEV_DEC_UTIL", 207, "gauge", G),  # written "DCGM_FI_DEV_DEC_UTIL ," in the file
    ("DCGM_FI_DEV_XID_ERRORS", 230, "gauge", E),
    ("DCGM_FI_DEV_FB_FREE", 251, "gauge", G),
    ("DCGM_FI_DEV_FB_USED", 252, "gauge", G),
    ("DCGM_FI_DEV_FB_RESERVED", 253, "gauge", G),
    ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 449, "counter", R),
    ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", 526, "gauge", G),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 393, "counter", C),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 394, "counter", C),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", 395, "gauge", G),
    ("DCGM_FI_DRIVER_VERSION", 1, "label", L),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, "gauge", G),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, "gauge", G),
    ("DCGM_FI_PROF_DRAM_ACTIVE", 1005, "gauge", G),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", 1009, "gauge", R),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", 1010, "gauge", R),
]

WHATAP_ROWS = [
    ("DCGM_FI_DRIVER_VERSION", 1, "label", L),
    ("DCGM_FI_NVML_VERSION", 2, "label", L),
    ("DCGM_FI_DEV_NAME", 50, "label", L),
    ("DCGM_FI_DEV_SERIAL", 53, "label", L),
    ("DCGM_FI_DEV_UUID", 54, "label", L),
    ("DCGM_FI_DEV_COMPUTE_MODE", 65, "label", L),
    ("DCGM_FI_DEV_PERSISTENCE_MODE", 66, "label", L),
    ("DCGM_FI_DEV_VIRTUAL_MODE", 500, "label", L),
    ("DCGM_FI_DEV_MIG_MODE", 67, "label", L),
    ("DCGM_FI_DEV_MIG_MAX_SLICES", 69, "label", L),
    ("DCGM_FI_DEV_MIG_GI_INFO", 76, "label", L),
    ("DCGM_FI_DEV_MIG_CI_INFO", 77, "label", L),
    ("DCGM_FI_DEV_SM_CLOCK", 100, "gauge", G),
    ("DCGM_FI_DEV_MEM_CLOCK", 101, "gauge", G),
    ("DCGM_FI_DEV_POWER_USAGE", 155, "gauge", G),
    ("DCGM_FI_DEV_PSTATE", 190, "gauge", G),
    ("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", G),
    ("DCGM_FI_DEV_GPU_UTIL", 203, "gauge", G),
    ("DCGM_FI_DEV_WEIGHTED_GPU_UTIL", 9005, "gauge", G),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", 1009, "counter", R),  # WhaTap says counter: it is a rate
    ("DCGM_FI_PROF_PCIE_RX_BYTES", 1010, "counter", R),
    ("DCGM_FI_DEV_FB_TOTAL", 250, "gauge", G),
    ("DCGM_FI_DEV_FB_FREE", 251, "gauge", G),
    ("DCGM_FI_DEV_FB_USED", 252, "gauge", G),
    ("DCGM_FI_DEV_FB_RESERVED", 253, "gauge", G),
    ("DCGM_FI_DEV_FB_USED_PERCENT", 254, "gauge", G),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 312, "counter", C),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 313, "counter", C),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, "gauge", G),
    ("DCGM_FI_PROF_SM_ACTIVE", 1002, "gauge", G),
    ("DCGM_FI_PROF_SM_OCCUPANCY", 1003, "gauge", G),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, "gauge", G),
    ("DCGM_FI_PROF_DRAM_ACTIVE", 1005, "gauge", G),
]

ONE_X_ROWS = [
    ("dcgm_sm_clock", 100, "gauge", G),
    ("dcgm_memory_clock", 101, "gauge", G),
    ("dcgm_memory_temp", 140, "gauge", G),
    ("dcgm_gpu_temp", 150, "gauge", G),
    ("dcgm_power_usage", 155, "gauge", G),
    ("dcgm_total_energy_consumption", 156, "counter", C),
    ("dcgm_fi_prof_pcie_tx_bytes", 1009, "counter", R),
    ("dcgm_fi_prof_pcie_rx_bytes", 1010, "counter", R),
    ("dcgm_pcie_replay_counter", 202, "counter", C),
    ("dcgm_gpu_utilization", 203, "gauge", G),
    ("dcgm_mem_copy_utilization", 204, "gauge", G),
    ("dcgm_enc_utilization", 206, "gauge", G),
    ("dcgm_dec_utilization", 207, "gauge", G),
    ("dcgm_xid_errors", 230, "gauge", E),
    ("dcgm_fb_free", 251, "gauge", G),
    ("dcgm_fb_used", 252, "gauge", G),
    ("dcgm_nvlink_bandwidth_total", 449, "counter", R),
    ("dcgm_fi_prof_gr_engine_active", 1001, "gauge", G),
    ("dcgm_fi_prof_pipe_tensor_active", 1004, "gauge", G),
    ("dcgm_fi_prof_dram_active", 1005, "gauge", G),
]


def test_builtin_profiles_listed() -> None:
    profiles = builtin_profiles()
    assert set(profiles) == {"default", "dcp", "whatap", "1.x"}
    assert all(isinstance(d, str) and d for d in profiles.values())


def test_default_profile() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped file is clean
        spec = load_csv("default")
    assert table(spec) == DEFAULT_ROWS
    assert len(spec) == 26
    assert spec.field_ids.tolist() == sorted(i for _, i, t, _ in DEFAULT_ROWS if t != "label")
    assert spec.field_ids.dtype == np.int32 and len(spec.field_ids) == 25
    assert spec.label_field_ids.tolist() == [1]
    assert spec.source == "<profile:default>"
    assert spec.warnings == []
    # Lines are the file's own, comments and blank lines included.
    assert spec.row(100).line == 6 and spec.row(1010).line == 98
    assert spec.help(207) == "Decoder utilization (in %)."
    assert spec.prom_type(449) == "counter" and spec.kind(449) is R


def test_dcp_profile_has_the_same_rows_as_default() -> None:
    spec = load_csv("dcp")
    assert table(spec) == DEFAULT_ROWS
    assert spec.warnings == []
    assert spec.source == "<profile:dcp>"


def test_whatap_profile() -> None:
    with pytest.warns(CsvSpecWarning) as caught:
        spec = load_csv("whatap")
    assert table(spec) == WHATAP_ROWS
    assert len(spec) == 33 and len(spec.field_ids) == 21 and len(spec.label_field_ids) == 12
    assert spec.label_field_ids.tolist() == [1, 2, 50, 53, 54, 65, 66, 67, 69, 76, 77, 500]

    # Exactly two warnings: the tolerated fork field and the duplicated PSTATE row.
    assert len(spec.warnings) == 2
    assert [str(w.message) for w in caught] == spec.warnings
    tolerated, duplicate = spec.warnings
    assert tolerated.startswith("<profile:whatap>:35: ") and "DCGM_FI_DEV_WEIGHTED_GPU_UTIL" in tolerated
    assert "9005" in tolerated
    assert duplicate.startswith("<profile:whatap>:68: ") and "DCGM_FI_DEV_PSTATE" in duplicate
    assert "line 27" in duplicate  # the row that won
    assert spec.row(190).line == 27

    # Inline "# code N" comments are not part of the help text.
    for row in spec.rows:
        assert "#" not in row.help and "code" not in row.help, row
        assert row.help == row.help.strip(), row
    assert spec.help("DCGM_FI_DRIVER_VERSION") == "Driver Version."
    assert spec.help(500) == "Virtual mode status"
    assert spec.help(9005) == "Weighted GPU utilization for MIG and non-MIG devices (ratio 0.0-1.0)."
    assert spec.help(190) == "GPU power state."


def test_whatap_strict_names_refuses_the_fork_field() -> None:
    with pytest.raises(CsvSpecError) as ei:
        quiet("whatap", strict_names=True)
    err = ei.value
    assert (err.file, err.line, err.column) == ("<profile:whatap>", 35, 1)
    assert "DCGM_FI_DEV_WEIGHTED_GPU_UTIL" in str(err)


def test_one_x_profile() -> None:
    with pytest.warns(CsvSpecWarning):
        spec = load_csv("1.x")
    assert table(spec) == ONE_X_ROWS
    assert spec.label_field_ids.tolist() == []
    # The file lists the two PCIe byte fields twice (PCIe and DCP sections).
    assert len(spec.warnings) == 2
    assert spec.warnings[0].startswith("<profile:1.x>:65: dcgm_fi_prof_pcie_tx_bytes (field 1009)")
    assert spec.warnings[1].startswith("<profile:1.x>:66: dcgm_fi_prof_pcie_rx_bytes (field 1010)")
    assert spec.help(1009) == "Total number of bytes transmitted through PCIe TX via NVML."  # the first row's


# ---------------------------------------------------------------------------------------
# where the CSV comes from
# ---------------------------------------------------------------------------------------

ONE_ROW = "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n"


def test_sources(tmp_path: Path) -> None:
    p = tmp_path / "counters.csv"
    p.write_text("# header\n" + ONE_ROW)
    for src, expected in ((p, str(p)), (str(p), str(p)), (ONE_ROW, "<text>"), (ONE_ROW.encode(), "<text>")):
        spec = load_csv(src)
        assert spec.source == expected
        assert spec.field_ids.tolist() == [150]
    assert load_csv(p, name="configmap gpu/metrics").source == "configmap gpu/metrics"
    assert load_csv("default", name="mine").source == "mine"


def test_missing_file_is_not_mistaken_for_text(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="newline"):
        load_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError):
        load_csv(tmp_path / "nope.csv")


def test_errors_name_the_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(ONE_ROW + "DCGM_FI_DEV_NOPE, gauge, x\n")
    with pytest.raises(CsvSpecError) as ei:
        load_csv(p)
    assert ei.value.file == str(p)
    assert str(ei.value).startswith(f"{p}: line 2, column 1: ")
    with pytest.raises(CsvSpecError) as ei:
        load_csv(p, name="cm/metrics")
    assert str(ei.value).startswith("cm/metrics: line 2, column 1: ")


# ---------------------------------------------------------------------------------------
# Go encoding/csv rules
# ---------------------------------------------------------------------------------------


def only_row(text: str) -> SpecRow:
    spec = quiet(text)
    assert len(spec.rows) == 1
    return spec.rows[0]


def test_spaces_are_trimmed() -> None:
    row = only_row("DCGM_FI_DEV_GPU_TEMP   ,    gauge  ,   GPU temperature   \n")
    assert (row.name, row.prom_type, row.help) == ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature")


def test_tabs_are_not_trimmed() -> None:
    # In the name or the type a tab makes the row invalid, as in dcgm-exporter ...
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP\t, gauge, x\n")
    assert (ei.value.line, ei.value.column) == (1, 1)
    assert "tab" in str(ei.value)  # the hint
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP, gauge\t, x\n")
    assert (ei.value.line, ei.value.column) == (1, 2)
    # ... and in the help text it stays.
    assert only_row("DCGM_FI_DEV_GPU_TEMP, gauge, \tx\t\n").help == "\tx\t"


def test_quoted_fields() -> None:
    assert only_row('DCGM_FI_DEV_GPU_TEMP, gauge,"Temperature, in C"\n').help == "Temperature, in C"
    assert only_row('DCGM_FI_DEV_GPU_TEMP,"gauge","say ""hi"""\n').help == 'say "hi"'
    assert only_row('"DCGM_FI_DEV_GPU_TEMP",gauge,""\n').help == ""
    # Trim applies after unquoting, as strings.Trim runs on the parsed field.
    assert only_row('DCGM_FI_DEV_GPU_TEMP, gauge," padded "\n').help == "padded"
    # A quoted field may span lines; the next record's line number follows the real lines.
    spec = quiet('DCGM_FI_DEV_GPU_TEMP, gauge,"two\r\nlines"\r\nDCGM_FI_DEV_SM_CLOCK, gauge, x\r\n')
    assert spec.help(150) == "two\nlines"
    assert spec.row(100).line == 3


def test_hash_inside_quotes_is_data() -> None:
    assert only_row('DCGM_FI_DEV_GPU_TEMP, gauge,"C # not a comment"\n').help == "C # not a comment"


@pytest.mark.parametrize(
    "text, line, column, needle",
    [
        # The quote is not the first character of the field (a space precedes it).
        ('DCGM_FI_DEV_GPU_TEMP, gauge, "Temperature, in C"\n', 1, 3, 'bare "'),
        ('DCGM_FI_DEV_GPU_TEMP, gauge, 15" screen\n', 1, 3, "character 32"),
        ('DCGM_FI_DEV_GPU_TEMP, ga"uge, x\n', 1, 2, 'bare "'),
        ('# ok\nDCGM_FI_DEV_GPU_TEMP, gauge,"closed"then\n', 2, 3, "after the closing quote"),
        # Reported where the input ends, as Go does.
        ('DCGM_FI_DEV_GPU_TEMP, gauge,"never\nclosed\n', 2, 3, "never closed"),
    ],
)
def test_quote_errors(text: str, line: int, column: int, needle: str) -> None:
    with pytest.raises(CsvSpecError) as ei:
        load_csv(text)
    assert (ei.value.line, ei.value.column) == (line, column)
    assert needle in str(ei.value)


def test_field_count_must_match_the_first_record() -> None:
    text = ONE_ROW + "DCGM_FI_DEV_SM_CLOCK, gauge, SM clock, MHz\n"
    with pytest.raises(CsvSpecError) as ei:
        load_csv(text)
    assert (ei.value.line, ei.value.column) == (2, 4)
    assert "first record (line 1) has 3" in str(ei.value)

    with pytest.raises(CsvSpecError) as ei:
        load_csv(ONE_ROW + "\nDCGM_FI_DEV_SM_CLOCK, gauge\n")
    assert (ei.value.line, ei.value.column) == (3, 3)


def test_exactly_three_fields() -> None:
    # All records agree with the first one, but there are only two fields.
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP, gauge\nDCGM_FI_DEV_SM_CLOCK, gauge\n")
    assert (ei.value.line, ei.value.column) == (1, 3)
    assert "expected 3 fields" in str(ei.value)
    # Go's reader reports the first record whose count differs from the first record's.
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP, gauge\n" + ONE_ROW)
    assert ei.value.line == 2 and "first record (line 1) has 2" in str(ei.value)
    # A trailing comma is a fourth, empty field.
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP, gauge, x,\n")
    assert (ei.value.line, ei.value.column) == (1, 4)


def test_syntax_errors_come_before_name_errors() -> None:
    # ReadAll runs over the whole file before any name is looked up.
    with pytest.raises(CsvSpecError) as ei:
        load_csv('DCGM_FI_DEV_NOPE, gauge, x\nDCGM_FI_DEV_GPU_TEMP, gauge, 5" \n')
    assert ei.value.line == 2 and 'bare "' in str(ei.value)


def test_comments_and_blank_lines() -> None:
    text = (
        "# a comment line\n"
        "\n"
        "#DCGM_FI_DEV_SM_CLOCK, gauge, commented out\n"
        "\r\n"
        "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature\n"
        "\n"
        "\n"
        "DCGM_FI_DEV_POWER_USAGE, gauge, Power\n"
    )
    spec = quiet(text)
    assert [(r.field_id, r.line) for r in spec.rows] == [(150, 5), (155, 8)]
    assert spec.warnings == []


def test_hash_is_data_outside_column_one_for_stock_rows() -> None:
    # In the name it is part of the name ...
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP#1, gauge, x\n")
    assert ei.value.column == 1 and "DCGM_FI_DEV_GPU_TEMP#1" in str(ei.value)
    # ... in the type column too (the inline-comment extension starts at column 3) ...
    with pytest.raises(CsvSpecError) as ei:
        load_csv("DCGM_FI_DEV_GPU_TEMP, gauge # g, x\n")
    assert ei.value.column == 2
    # ... and in the help text unless it follows whitespace.
    assert only_row("DCGM_FI_DEV_GPU_TEMP, gauge, C#-style x#1\n").help == "C#-style x#1"


def test_crlf_and_final_carriage_return() -> None:
    spec = quiet("DCGM_FI_DEV_GPU_TEMP, gauge, a\r\nDCGM_FI_DEV_SM_CLOCK, gauge, b\r")
    assert [r.help for r in spec.rows] == ["a", "b"]
    # A lone \r inside a line is data, as in Go.
    assert only_row("DCGM_FI_DEV_GPU_TEMP, gauge, a\rb\n").help == "a\rb"


def test_last_line_without_newline() -> None:
    assert only_row("# x\nDCGM_FI_DEV_GPU_TEMP, gauge, last").help == "last"


def test_empty_input() -> None:
    for text in ("\n", "# only comments\n\n"):
        spec = load_csv(text)
        assert len(spec) == 0 and spec.field_ids.tolist() == [] and spec.label_field_ids.tolist() == []


# ---------------------------------------------------------------------------------------
# tolerant extensions
# ---------------------------------------------------------------------------------------


def test_indented_lines_and_indented_comments() -> None:
    text = (
        "    # indented comment, a record for stock dcgm-exporter\n"
        "\t# tab-indented comment, with, commas\n"
        "    DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature\n"
        "   \n"
        '  "DCGM_FI_DEV_SM_CLOCK", gauge, SM clock\n'
    )
    spec = quiet(text)
    assert [(r.field_id, r.name, r.line) for r in spec.rows] == [
        (150, "DCGM_FI_DEV_GPU_TEMP", 3),
        (100, "DCGM_FI_DEV_SM_CLOCK", 5),
    ]
    assert spec.warnings == []


@pytest.mark.parametrize(
    "line, help_text",
    [
        ("DCGM_FI_DEV_GPU_TEMP, gauge, Temp.     # code 150", "Temp."),
        ("DCGM_FI_DEV_GPU_TEMP, gauge, Temp.\t# code 150", "Temp."),
        ("DCGM_FI_DEV_GPU_TEMP, gauge, Temp. # code 150, with a comma", "Temp."),
        ('DCGM_FI_DEV_GPU_TEMP, gauge, Temp. # a "quote" in the comment', "Temp."),
        ('DCGM_FI_DEV_GPU_TEMP, gauge,"Temp, C"   # code 150', "Temp, C"),
        ("DCGM_FI_DEV_GPU_TEMP, gauge, # only a comment", ""),
        ("DCGM_FI_DEV_GPU_TEMP, gauge,# no space before: data", "# no space before: data"),
    ],
)
def test_inline_comment_after_the_third_column(line: str, help_text: str) -> None:
    assert only_row(line + "\n").help == help_text


def test_byte_order_mark() -> None:
    with pytest.warns(CsvSpecWarning, match="byte-order mark"):
        spec = load_csv(b"\xef\xbb\xbf" + ONE_ROW.encode())
    assert spec.field_ids.tolist() == [150]


def test_duplicate_rows_first_wins() -> None:
    text = ONE_ROW + "DCGM_FI_DEV_GPU_TEMP_CELSIUS, counter, again under its 4.6 name\n"
    with pytest.warns(CsvSpecWarning) as caught:
        spec = load_csv(text, name="dup.csv")
    assert len(caught) == 1
    assert spec.warnings == [
        "dup.csv:2: DCGM_FI_DEV_GPU_TEMP_CELSIUS (field 150) is already listed on line 1 "
        "as DCGM_FI_DEV_GPU_TEMP; this row is ignored, the first wins"
    ]
    assert table(spec) == [("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", G)]


def test_string_field_as_metric_warns() -> None:
    with pytest.warns(CsvSpecWarning, match="not numbers"):
        spec = load_csv("DCGM_FI_DEV_UUID, gauge, uuid\n")
    assert spec.kind(54) is G and spec.mask([54]).tolist() == [True]


# ---------------------------------------------------------------------------------------
# names and types
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, field_id",
    [
        (("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_TEMP_CELSIUS", "dcgm_gpu_temp"), 150),
        (("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_BOARD_POWER_WATTS", "dcgm_power_usage"), 155),
        (("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_XID_ERROR", "dcgm_xid_errors"), 230),
        (("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_NVLINK_THROUGHPUT_TOTAL", "dcgm_nvlink_bandwidth_total"), 449),
        (("DCGM_FI_DRIVER_VERSION", "DCGM_FI_SYSTEM_DRIVER_VERSION"), 1),
        (("DCGM_EXP_XID_ERRORS_COUNT",), 9001),
        (("DCGM_EXP_P2P_STATUS",), 9004),
    ],
)
def test_every_name_generation_resolves_to_the_same_id(names: Tuple[str, ...], field_id: int) -> None:
    kinds = set()
    for name in names:
        row = only_row(f"{name}, gauge, x\n")
        assert (row.field_id, row.name) == (field_id, name)
        kinds.add(row.kind)
        assert field_id in quiet(f"{name}, gauge, x\n")
        assert name in quiet(f"{names[0]}, gauge, x\n")  # any name finds the row
    assert len(kinds) == 1


def test_unknown_name() -> None:
    with pytest.raises(CsvSpecError) as ei:
        load_csv("# c\nDCGM_FI_DEV_GPU_TEMP, gauge, x\n  DCGM_FI_DEV_BOGUS , gauge, x\n", name="c.csv")
    err = ei.value
    assert (err.file, err.line, err.column) == ("c.csv", 3, 1)
    assert "DCGM_FI_DEV_BOGUS" in str(err)
    assert str(err).startswith("c.csv: line 3, column 1: ")
    assert isinstance(err, DcgmRelayError) and isinstance(err, ValueError)


def test_unknown_name_hints_at_case() -> None:
    with pytest.raises(CsvSpecError, match="case-sensitive; did you mean 'DCGM_FI_DEV_GPU_TEMP'"):
        load_csv("dcgm_fi_dev_gpu_temp, gauge, x\n")


def test_marker_defines_are_not_fields() -> None:
    # Netdata's live check: these names make dcgm-exporter exit at startup.
    with pytest.raises(CsvSpecError):
        load_csv("DCGM_FI_FIRST_NVSWITCH_FIELD_ID, gauge, x\n")


@pytest.mark.parametrize("prom_type", ["Gauge", "GAUGE", "untyped", "rate", ""])
def test_bad_type(prom_type: str) -> None:
    with pytest.raises(CsvSpecError) as ei:
        load_csv(f"# c\nDCGM_FI_DEV_GPU_TEMP, {prom_type}, x\n")
    err = ei.value
    assert (err.line, err.column) == (2, 2)
    msg = str(err)
    assert msg.startswith("<text>: line 2, column 2: ")
    for allowed in PROM_TYPES:
        assert allowed in msg


@pytest.mark.parametrize("prom_type", PROM_TYPES)
def test_every_allowed_type(prom_type: str) -> None:
    row = only_row(f"DCGM_FI_DEV_GPU_TEMP, {prom_type}, x\n")
    assert row.prom_type == prom_type
    assert (row.kind is L) == (prom_type == "label")


def test_exporter_fields_type_is_not_checked() -> None:
    with pytest.warns(CsvSpecWarning, match="does not check"):
        spec = load_csv("DCGM_EXP_XID_ERRORS_COUNT, Counter, windowed xid count\n")
    assert spec.field_ids.tolist() == [9001] and spec.kind(9001) is G
    # Even "label" keeps them metrics: the exporter never makes them labels.
    spec = quiet("DCGM_EXP_GPU_HEALTH_STATUS, label, health\n")
    assert spec.field_ids.tolist() == [9003] and spec.label_field_ids.tolist() == []


def test_tolerated_names_are_a_small_documented_table() -> None:
    assert set(TOLERATED_NAMES) == {"DCGM_FI_DEV_WEIGHTED_GPU_UTIL"}
    t = TOLERATED_NAMES["DCGM_FI_DEV_WEIGHTED_GPU_UTIL"]
    assert t.field_id == 9005 and t.kind is G and t.why
    for name, t in TOLERATED_NAMES.items():
        assert fields.get(name) is None  # really not DCGM fields
        assert t.field_id not in {f.id for f in fields.all_fields()}


def test_every_error_names_file_line_and_column() -> None:
    bad = [
        "DCGM_FI_DEV_NOPE, gauge, x\n",
        "DCGM_FI_DEV_GPU_TEMP, gaugee, x\n",
        "DCGM_FI_DEV_GPU_TEMP, gauge\n",
        "DCGM_FI_DEV_GPU_TEMP, gauge, x, y\n",
        'DCGM_FI_DEV_GPU_TEMP, gauge, "x"\n',
        'DCGM_FI_DEV_GPU_TEMP, gauge,"x\n',
        'DCGM_FI_DEV_GPU_TEMP, gauge,"x"y\n',
        ONE_ROW + "DCGM_FI_DEV_SM_CLOCK\n",
    ]
    for text in bad:
        with pytest.raises(CsvSpecError) as ei:
            load_csv("# header\n" + text, name="f.csv")
        err = ei.value
        assert err.file == "f.csv" and err.line >= 2 and err.column is not None and err.column >= 1, text
        assert re.match(rf"f\.csv: line {err.line}, column {err.column}: \S", str(err)), str(err)


# ---------------------------------------------------------------------------------------
# kind overrides
# ---------------------------------------------------------------------------------------


def test_kind_overrides() -> None:
    spec = load_csv(
        "default",
        kind_overrides={
            "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "counter",  # by exporter name, str kind
            1009: Kind.GAUGE,  # by id
            "DCGM_FI_DEV_XID_ERROR": "gauge",  # by the 4.6 name
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "counter",  # not in the CSV: ignored
        },
    )
    assert spec.kind(449) is C and spec.kind(1009) is G and spec.kind(230) is G
    assert spec.kind(1010) is R  # untouched
    assert 311 not in spec
    assert spec.kind_array(np.array([449, 1009, 230, 1010])).tolist() == [1, 0, 0, 2]


def test_kind_overrides_for_tolerated_names() -> None:
    spec = quiet("whatap", kind_overrides={"DCGM_FI_DEV_WEIGHTED_GPU_UTIL": Kind.RATE})
    assert spec.kind(9005) is R


@pytest.mark.parametrize(
    "overrides, exc",
    [
        ({"DCGM_FI_DEV_NOPE": "gauge"}, UnknownFieldError),
        ({150: "delta"}, ValueError),
        ({150: "label"}, ValueError),
        ({"DCGM_FI_DRIVER_VERSION": "gauge"}, ValueError),  # a label row has no metric kind
    ],
)
def test_bad_kind_overrides(overrides: dict, exc: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(exc):
        load_csv("default", kind_overrides=overrides)


# ---------------------------------------------------------------------------------------
# MetricSpec lookups
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whatap() -> MetricSpec:
    return quiet("whatap")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.intp])
def test_mask_and_kind_array(whatap: MetricSpec, dtype: type) -> None:
    ids = np.array([-1, 0, 150, 1, 1009, 312, 9005, 9006, 449, 54, 32000, -32000], dtype=dtype)
    assert whatap.mask(ids).tolist() == [False, False, True, False, True, True, True, False, False, False, False, False]
    assert whatap.kind_array(ids).tolist() == [-1, -1, 0, 4, 2, 1, 0, -1, -1, 4, -1, -1]
    assert whatap.mask(ids).dtype == np.bool_
    assert whatap.kind_array(ids).dtype == np.int8


def test_lookups_on_huge_and_unsigned_ids(whatap: MetricSpec) -> None:
    big = np.array([2**62, -(2**62), 150], dtype=np.int64)
    assert whatap.mask(big).tolist() == [False, False, True]
    u = np.array([150, 65535, 0], dtype=np.uint16)
    assert whatap.kind_array(u).tolist() == [0, -1, -1]
    u64 = np.array([150, 2**64 - 1, 2**63, 1], dtype=np.uint64)
    assert whatap.kind_array(u64).tolist() == [0, -1, -1, 4]
    assert whatap.mask(u64).tolist() == [True, False, False, False]


def test_lookups_keep_the_shape(whatap: MetricSpec) -> None:
    ids = np.array([[150, 1], [-1, 230]], dtype=np.int32)
    assert whatap.mask(ids).shape == (2, 2)
    assert whatap.kind_array(ids).tolist() == [[0, 4], [-1, -1]]
    assert whatap.mask(np.array([], dtype=np.int32)).shape == (0,)
    assert whatap.mask([]).shape == (0,)
    assert whatap.kind_array([150, 1]).tolist() == [0, 4]  # plain lists work


def test_lookups_refuse_float_ids(whatap: MetricSpec) -> None:
    with pytest.raises(TypeError):
        whatap.mask(np.array([150.0]))


def test_mask_matches_membership_for_every_id(whatap: MetricSpec) -> None:
    ids = np.arange(-5, 9100, dtype=np.int32)
    mask = whatap.mask(ids)
    assert set(ids[mask].tolist()) == set(whatap.field_ids.tolist())
    kinds = whatap.kind_array(ids)
    listed = set(whatap.field_ids.tolist()) | set(whatap.label_field_ids.tolist())
    assert set(ids[kinds >= 0].tolist()) == listed
    for r in whatap.rows:
        assert kinds[r.field_id + 5] == int(r.kind)


def test_spec_is_read_only(whatap: MetricSpec) -> None:
    with pytest.raises(ValueError):
        whatap.field_ids[0] = 1
    with pytest.raises(ValueError):
        whatap.label_field_ids[0] = 1
    with pytest.raises(AttributeError):
        whatap.rows = ()  # type: ignore[misc]
    whatap.warnings.append("x")  # a copy
    assert len(whatap.warnings) == 2


def test_contains_len_and_keyed_lookups(whatap: MetricSpec) -> None:
    assert len(whatap) == 33 and len(list(whatap)) == 33
    assert 150 in whatap and 1 in whatap and np.int64(1009) in whatap
    assert "DCGM_FI_DEV_GPU_TEMP_CELSIUS" in whatap and "dcgm_gpu_temp" in whatap
    assert "DCGM_FI_DEV_WEIGHTED_GPU_UTIL" in whatap
    assert 449 not in whatap and -1 not in whatap and "nope" not in whatap and None not in whatap
    assert whatap.kind("DCGM_FI_DEV_UUID") is L and whatap.prom_type(54) == "label"
    for key in (449, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "nope"):
        with pytest.raises(KeyError):
            whatap.kind(key)
        with pytest.raises(KeyError):
            whatap.help(key)
    assert repr(whatap) == "<MetricSpec <profile:whatap>: 21 metrics, 12 labels, 2 warnings>"


def test_metric_spec_from_rows() -> None:
    rows = [SpecRow(150, "DCGM_FI_DEV_GPU_TEMP", "gauge", "t", G, 1), SpecRow(1, "DCGM_FI_DRIVER_VERSION", "label", "", L, 2)]
    spec = MetricSpec(rows, source="mine")
    assert spec.field_ids.tolist() == [150] and spec.label_field_ids.tolist() == [1] and spec.source == "mine"
    with pytest.raises(ValueError):
        MetricSpec(rows + [rows[0]])
    with pytest.raises(ValueError):
        MetricSpec([SpecRow(0, "x", "gauge", "", G, 1)])
    with pytest.raises(ValueError):
        MetricSpec([SpecRow(150, "x", "gauge", "", L, 1)])
