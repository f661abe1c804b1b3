"""Parser behaviour, run on both implementations (the ``parse`` fixture)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dcgmrelay
from dcgmrelay import TS_ABSENT, ParseError

from conftest import REAL_PAYLOADS

GPU0 = 'gpu="0",UUID="GPU-aaaa",pci_bus_id="00000000:8D:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a"'
GPU1 = 'gpu="1",UUID="GPU-bbbb",pci_bus_id="00000000:9D:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a"'


def body(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# -- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("1410", 1410.0),                       # INT64 %d
    ("55491669881", 55491669881.0),
    ("9223372036854775794", 9223372036854775794.0),  # an old exporter's raw INT64 sentinel
    ("8.969000", 8.969),                    # DOUBLE %f
    ("0.000008", 8e-06),
    ("1.28996013e+08", 128996013.0),        # Go shortest float with exponent
    ("8e-06", 8e-06),
    ("-1", -1.0),
    ("+3.5", 3.5),
    (".5", 0.5),
    ("5.", 5.0),
    ("1E3", 1000.0),
    ("0.1", 0.1),
    ("123456789012345678901234567890", 1.2345678901234568e29),  # past the fast path
    ("1.7976931348623157e308", 1.7976931348623157e308),
    ("4.9e-324", 5e-324),
    ("+Inf", math.inf),
    ("-Inf", -math.inf),
    ("Inf", math.inf),
    ("inf", math.inf),
])
def test_values(parse, text, expected):
    s = parse(body(f"DCGM_FI_DEV_SM_CLOCK{{{GPU0}}} {text}"))
    assert s.n_errors == 0
    assert s.values.dtype == np.float64
    assert s.values[0] == expected


def test_nan_and_negative_zero(parse):
    s = parse(body(f"a{{{GPU0}}} NaN", f"b{{{GPU0}}} -0", f"c{{{GPU0}}} nan"))
    assert math.isnan(s.values[0]) and math.isnan(s.values[2])
    assert s.values[1] == 0.0 and math.copysign(1.0, s.values[1]) == -1.0


@pytest.mark.parametrize("text", ["1_000", "0x10", "1e", "e5", "--1", "1.2.3", "ERROR - FAILED TO CONVERT TO STRING",
                                  "Infinit", "1,5"])
def test_bad_values_are_reported_not_kept(parse, text):
    s = parse(body(f"a{{{GPU0}}} 1", f"b{{{GPU0}}} {text}", f"c{{{GPU0}}} 3"))
    assert list(s.values) == [1.0, 3.0]
    assert s.n_errors == 1
    err = s.errors[0]
    assert err.line == 2
    assert "value" in err.reason or "unexpected text" in err.reason


# -- timestamps ----------------------------------------------------------------------------------
def test_timestamps_text_format(parse):
    s = parse(body(f"a{{{GPU0}}} 1 1700000000123", f"a{{{GPU1}}} 2", "b 3 -5"))
    assert s.timestamps.dtype == np.int64
    assert s.timestamps.tolist() == [1700000000123, TS_ABSENT, -5]
    assert [x[3] for x in s.samples()] == [1700000000123, None, -5]


def test_timestamp_out_of_range_and_float_in_text_format(parse):
    s = parse(body("a 1 99999999999999999999", "b 1 1.5", "c 1 -9223372036854775808", "d 1 9223372036854775807"))
    assert s.names == ("d",)
    assert [e.line for e in s.errors] == [1, 2, 3]
    assert all("timestamp" in e.reason for e in s.errors)


def test_openmetrics_timestamp_too_large_is_an_error_not_a_crash(parse):
    s = parse(b"a 1 1e308\nb 2 1e17\nc 3 5\n# EOF\n", format="openmetrics")
    assert s.names == ("c",) and s.timestamps.tolist() == [5000]
    assert [(e.line, "out of range" in e.reason) for e in s.errors] == [(1, True), (2, True)]


def test_openmetrics_timestamps_are_seconds(parse):
    s = parse(b"# TYPE a gauge\na 1 1520879607.789\na{x=\"1\"} 2 1520879607\n# EOF\n")
    assert s.format == "openmetrics"
    assert s.timestamps.tolist() == [1520879607789, 1520879607000]


# -- label sets ----------------------------------------------------------------------------------
def test_optional_spaces_and_trailing_comma(parse):
    s = parse(body('a{gpu="0", UUID="GPU-1",} 1', 'a{ gpu = "1" , UUID = "GPU-2" } 2', "a{} 3", "a 4"))
    assert s.n_errors == 0
    assert [x[1] for x in s.samples()] == [
        {"gpu": "0", "UUID": "GPU-1"}, {"gpu": "1", "UUID": "GPU-2"}, {}, {}]
    assert s.labelset_ids[2] == s.labelset_ids[3]  # {} and no braces: one empty set


def test_escapes(parse):
    s = parse(body(r'a{x="q\"uote",y="back\\slash",z="new\nline",w="other\t"} 1'))
    assert s.labels(0) == {"x": 'q"uote', "y": "back\\slash", "z": "new\nline", "w": "other\\t"}


def test_unescaped_exporter_output_with_punctuation(parse):
    # dcgm-exporter does not escape: commas, colons, '--', parentheses and '}' inside err_msg.
    msg = "Preemptive cleanup, due to previous errors -- Most likely to see when running multiple cuda {apps}: (x)"
    s = parse(body(f'DCGM_FI_DEV_XID_ERRORS{{{GPU0},err_code="45",err_msg="{msg}"}} 45'))
    assert s.n_errors == 0
    assert s.labels(0)["err_msg"] == msg
    assert s.values[0] == 45.0


def test_utf8_label_values(parse):
    s = parse(body('a{pod="추론-서버-0",model="GPU \u00e9t\u00e9 \U0001F680"} 1'))
    assert s.labels(0) == {"pod": "추론-서버-0", "model": "GPU \u00e9t\u00e9 \U0001F680"}


def test_same_labels_in_another_order_are_one_set(parse):
    s = parse(body('a{x="1",y="2"} 1', 'b{y="2",x="1"} 2', 'c{y="2", x="1"} 3'))
    assert len(set(s.labelset_ids.tolist())) == 1
    assert s.labelsets[0] == (("x", "1"), ("y", "2"))  # first-seen order is kept for display


@pytest.mark.parametrize("line,reason,column", [
    ('a{x="1",x="2"} 1', "duplicate label name 'x'", 9),
    ('a{x="1" y="2"} 1', "expected ',' or '}'", 9),
    ('a{x=1} 1', "expected '\"'", 5),
    ('a{x} 1', "expected '='", 4),
    ('a{,x="1"} 1', "unexpected ','", 3),
    ('a{1x="1"} 1', "expected a label name", 3),
    ('a{x="1" 1', "no closing '}'", 2),
    ('a{x="1} 1', "no closing quote", 5),
    ('{x="1"} 1', "metric name must come before", 1),
    ('a-b 1', "invalid character '-'", 2),
    ('a', "expected a value", 2),
    ('a{x="1"}', "expected a value", 9),
    ('a 1 2 3', "unexpected text", 7),
    ('9a 1', "expected a metric name", 1),
])
def test_bad_lines_name_line_column_and_reason(parse, line, reason, column):
    s = parse(body("ok 1", line, "ok2 2"))
    assert s.names == ("ok", "ok2")
    assert len(s.errors) == 1
    err = s.errors[0]
    assert err.line == 2
    assert reason in err.reason
    assert err.column == column


def test_strict_raises_with_caret(parse):
    with pytest.raises(ParseError) as ei:
        parse(body("ok 1", 'a{x="1",x="2"} 1'), strict=True, source="node-a.prom")
    e = ei.value
    assert (e.line, e.column) == (2, 9)
    assert isinstance(e, dcgmrelay.DcgmRelayError)
    text = str(e)
    assert text.startswith("node-a.prom:line 2, column 9: duplicate label name 'x'")
    src, caret = text.splitlines()[1:3]
    assert src.strip() == 'a{x="1",x="2"} 1'
    assert caret.index("^") == src.index('x="2"')


def test_invalid_utf8_in_label_value(parse):
    s = parse(b'a{x="\xff\xfe"} 1\nb 2\n')
    assert s.names == ("b",)
    assert s.errors[0].reason == "invalid UTF-8 in the value of label 'x'"


def test_column_counts_characters_not_bytes(parse):
    s = parse('a{x="é",x="2"} 1\n'.encode())
    assert s.errors[0].column == 9


# -- metadata ------------------------------------------------------------------------------------
def test_help_type_unit_and_empty_help(parse):
    s = parse(body(
        "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge",
        f"DCGM_FI_DEV_GPU_TEMP{{{GPU0}}} 45",
        "# HELP DCGM_FI_DEV_MAX_SM_CLOCK ",
        "# TYPE DCGM_FI_DEV_MAX_SM_CLOCK gauge",  # a TYPE without samples
        r"# HELP esc back\\slash new\nline",
        "# a plain comment",
        "#",
    ))
    fam = s.families
    assert fam["DCGM_FI_DEV_GPU_TEMP"] == dcgmrelay.Family("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", None)
    assert fam["DCGM_FI_DEV_MAX_SM_CLOCK"].help == ""
    assert fam["DCGM_FI_DEV_MAX_SM_CLOCK"].type == "gauge"
    assert fam["esc"].help == "back\\slash new\nline"
    assert fam["esc"].type == "untyped"
    assert len(s) == 1 and s.n_errors == 0


def test_sample_names_differing_from_family(parse):
    s = parse(body("# TYPE http_requests counter", "http_requests_total 5", "http_requests_created 1",
                   "# TYPE lat histogram", 'lat_bucket{le="+Inf"} 3', "lat_sum 1.5", "lat_count 3"))
    assert s.family_of("http_requests_total").type == "counter"
    assert s.family_of("lat_bucket").name == "lat"
    assert s.family_of("lat_count").type == "histogram"
    assert s.family_of("unknown_metric").type == "untyped"


def test_bad_and_duplicate_metadata_is_reported(parse):
    s = parse(body("# TYPE a gauge", "# TYPE a counter", "# TYPE b flavour", "# HELP 9x help", "a 1"))
    assert s.families["a"].type == "gauge"
    assert [(e.line, e.reason) for e in s.errors] == [
        (2, "duplicate '# TYPE' line for a"),
        (3, "unknown metric type 'flavour'"),
        (4, "expected a metric name after '# HELP'"),
    ]


def test_non_dcgm_families_are_kept(parse):
    s = parse(body("# TYPE go_goroutines gauge", "go_goroutines 12", "process_resident_memory_bytes 1.2e+07",
                   f"DCGM_FI_DEV_GPU_UTIL{{{GPU0}}} 99"))
    assert s.names == ("go_goroutines", "process_resident_memory_bytes", "DCGM_FI_DEV_GPU_UTIL")
    assert s.field_ids.tolist() == [-1, -1, 203]
    assert s.entity_ids.tolist() == [-1, -1, 0]


# -- framing -------------------------------------------------------------------------------------
def test_crlf_blank_lines_and_no_final_newline(parse):
    s = parse(b"# TYPE a gauge\r\n\r\na 1\r\n   \r\nb{x=\"y\"} 2")
    assert s.values.tolist() == [1.0, 2.0]
    assert s.labels(1) == {"x": "y"}
    assert s.n_errors == 0


def test_input_types(parse):
    text = f"DCGM_FI_DEV_GPU_TEMP{{{GPU0}}} 45\n"
    for data in (text, text.encode(), bytearray(text.encode()), memoryview(text.encode())):
        s = parse(data)
        assert s.values.tolist() == [45.0]
    with pytest.raises(TypeError):
        parse(12345)


def test_empty_body(parse):
    s = parse(b"")
    assert len(s) == 0 and s.n_errors == 0 and s.matrix().values.shape == (0, 0)


def test_openmetrics_eof_and_exemplars(parse):
    s = parse(b'# TYPE c counter\nc_total 5 # {trace_id="abc"} 1.0 1520879607.789\nc_total{a="b"} 6\n# EOF\n')
    assert s.values.tolist() == [5.0, 6.0] and s.n_errors == 0
    s = parse(b"a 1\n# EOF\nb 2\n", format="openmetrics")
    assert s.names == ("a",)
    assert s.errors[0].reason == "content after '# EOF'" and s.errors[0].line == 3
    s = parse(b"a 1\nb 2\n", format="openmetrics")  # a truncated body
    assert "missing '# EOF'" in s.errors[0].reason


def test_format_detection_and_content_type():
    assert dcgmrelay.parse(b"a 1\n# EOF\n").format == "openmetrics"
    assert dcgmrelay.parse(b"a 1\n# EOF\n\n").format == "openmetrics"
    assert dcgmrelay.parse(b"a 1\n").format == "prometheus"
    assert dcgmrelay.parse(b"a 1\nx# EOF\n").format == "prometheus"
    f = dcgmrelay.format_from_content_type
    assert f("application/openmetrics-text; version=1.0.0; charset=utf-8") == "openmetrics"
    assert f("text/plain; version=0.0.4; charset=utf-8") == "prometheus"
    assert f("text/plain; charset=utf-8") == "prometheus"  # dcgm-exporter (Go sniffing)
    assert f(None) == "auto" and f("application/json") == "auto"
    with pytest.raises(ValueError):
        dcgmrelay.parse(b"", format="json")


def test_strict_openmetrics_uses_the_spec_validator():
    with pytest.raises(ParseError) as ei:
        dcgmrelay.parse(b"# TYPE c counter\nc 1\n# EOF\n", format="openmetrics", strict=True)
    assert ei.value.line == 2
    s = dcgmrelay.parse(b"# TYPE c counter\nc_total 1\n# EOF\n", format="openmetrics", strict=True)
    assert s.values.tolist() == [1.0]


def test_error_list_is_capped_but_all_are_counted(parse):
    s = parse(b"bad line here\n" * 500 + b"ok 1\n", max_errors=10)
    assert len(s.errors) == 10 and s.n_errors == 500 and s.values.tolist() == [1.0]


# -- entities and views --------------------------------------------------------------------------
def test_entities_gpu_mig_switch_link_cpu(parse):
    s = parse(body(
        f"DCGM_FI_DEV_GPU_TEMP{{{GPU0}}} 40",
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{GPU1},GPU_I_PROFILE="1g.10gb",GPU_I_ID="3"}} 0.5',
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{GPU1},GPU_I_PROFILE="1g.10gb",GPU_I_ID="4"}} 0.25',
        'DCGM_FI_DEV_NVSWITCH_TEMPERATURE_CURRENT{nvswitch="nvswitch0",Hostname="node-a"} 33',
        'DCGM_FI_DEV_NVLINK_BANDWIDTH_L0{nvlink="3",gpu="0",gpu_uuid="GPU-aaaa",model_name="H100",hostname="node-a"} 7',
        'DCGM_FI_DEV_CPU_UTIL_TOTAL{cpu="0",Hostname="node-a"} 0.1',
        'DCGM_FI_DEV_CPU_UTIL_TOTAL{cpucore="5",cpu="0",Hostname="node-a"} 0.2',
        'dcgm_gpu_temp{gpu="0",uuid="GPU-old",device="nvidia0"} 51',
    ))
    kinds = [e.kind for e in s.entities]
    assert kinds == ["gpu", "mig", "mig", "nvswitch", "nvlink", "cpu", "cpu_core", "gpu"]
    gpu0 = s.entities[0]
    assert (gpu0.uuid, gpu0.gpu, gpu0.pci_bus_id, gpu0.device, gpu0.model_name, gpu0.hostname) == (
        "GPU-aaaa", "0", "00000000:8D:00.0", "nvidia0", "NVIDIA H100 80GB HBM3", "node-a")
    assert s.entities[1].gpu_instance == "3" and s.entities[1].gpu_profile == "1g.10gb"
    assert s.entities[4].uuid == "GPU-aaaa" and s.entities[4].model_name == "H100"
    assert s.entities[7].uuid == "GPU-old"
    assert s.value("GPU-bbbb", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", gpu_instance=4) == 0.25
    assert s.value("GPU-old", 150) == 51.0  # 1.x name resolves to the same field id


def test_shared_gpu_repeats_series_per_pod(parse):
    lines = [f'DCGM_FI_DEV_GPU_UTIL{{{GPU0},container="c",namespace="ns",pod="p{i}"}} 80' for i in range(4)]
    s = parse(body(*lines))
    assert len(set(s.labelset_ids.tolist())) == 4  # four series ...
    assert set(s.entity_ids.tolist()) == {0}  # ... of one GPU
    assert s.series_count() == 4


def test_matrix_and_value(parse):
    s = parse(body(
        f"DCGM_FI_DEV_SM_CLOCK{{{GPU0}}} 1410", f"DCGM_FI_DEV_SM_CLOCK{{{GPU1}}} 1980",
        f"DCGM_FI_DEV_GPU_TEMP{{{GPU1}}} 61",
        f'DCGM_FI_DEV_GPU_TEMP{{{GPU0},pod="first"}} 40', f'DCGM_FI_DEV_GPU_TEMP{{{GPU0},pod="second"}} 41',
        "go_threads 8"))
    m = s.matrix()
    assert [e.uuid for e in m.entities] == ["GPU-aaaa", "GPU-bbbb"]
    assert m.field_ids.tolist() == [100, 150]
    assert m.values.tolist() == [[1410.0, 40.0], [1980.0, 61.0]]  # first sample wins
    assert m.column("DCGM_FI_DEV_GPU_TEMP").tolist() == [40.0, 61.0]
    m2 = s.matrix(["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"])
    assert m2.field_ids.tolist() == [150, 155]
    assert m2.values[0, 0] == 40.0 and math.isnan(m2.values[1, 1])
    assert s.value("GPU-bbbb", "DCGM_FI_DEV_SM_CLOCK") == 1980.0
    with pytest.raises(KeyError):
        s.value("GPU-cccc", "DCGM_FI_DEV_SM_CLOCK")
    with pytest.raises(KeyError):
        s.value("GPU-aaaa", "DCGM_FI_DEV_POWER_USAGE")
    with pytest.raises(dcgmrelay.UnknownFieldError):
        s.value("GPU-aaaa", "NOT_A_FIELD")


# -- real payloads -------------------------------------------------------------------------------
def test_every_real_payload_is_parsed(parse):
    assert len(REAL_PAYLOADS) == 10
    for path in REAL_PAYLOADS:
        s = parse(path.read_bytes(), source=path.name)
        if path.name.startswith("10-"):
            # Published with the value cut out: the one line is rejected, with where and why.
            assert len(s) == 0
            assert [(e.line, e.column, e.reason) for e in s.errors] == [(1, 158, "expected a value")]
        else:
            assert s.n_errors == 0, (path.name, s.errors)
            assert len(s) > 0


def test_real_payload_details(parse):
    def load(prefix):
        (path,) = [p for p in REAL_PAYLOADS if p.name.startswith(prefix)]
        return parse(path.read_bytes())

    s = load("01-")
    assert len(s) == 38 and len(s.entities) == 3
    assert s.families["DCGM_FI_DEV_SLOWDOWN_TEMP"].help == ""  # empty HELP
    assert s.value("GPU-20c56d28-0da5-6d26-a36a-e7af1ce2586e", "DCGM_FI_DEV_POWER_USAGE") == 8.969

    s = load("03-")  # MIG, pod labels empty, a TYPE with no sample at the end
    (ent,) = s.entities
    assert (ent.kind, ent.gpu_instance, ent.gpu_profile) == ("mig", "0", "7g.79gb")
    assert s.families["DCGM_FI_DEV_MAX_SM_CLOCK"] == dcgmrelay.Family(
        "DCGM_FI_DEV_MAX_SM_CLOCK", "gauge", "max sm clock.", None)

    s = load("06-")  # 1.x names map to DCGM field ids
    assert s.field_ids.tolist() == [100, 101, 150, 155, 156, 202, 203]
    assert s.values[4] == 55491669881.0

    s = load("07-")
    assert s.labels(0)["pod"] == "testest-9sxmd"
    assert s.entities[0].kind == "mig"

    s = load("14-")  # pci_bus_id, H100, truncated after a HELP line
    assert s.entities[0].pci_bus_id == "00000000:00:09.0"
    assert s.families["DCGM_FI_DEV_MEMORY_TEMP"].help == "Memory temperature (in C)."


def test_native_module_loads_by_default():
    import os

    if os.environ.get("DCGMRELAY_NO_EXTENSIONS"):
        assert dcgmrelay.implementation() == "py"
    else:
        assert dcgmrelay.implementation() == "c"
        from dcgmrelay import _impl, _parser

        assert _impl.parse_raw is _parser.parse_raw
        assert _parser.__file__.endswith((".so", ".pyd"))


def test_no_extensions_switch_selects_the_twin():
    import subprocess
    import sys

    code = "import dcgmrelay, dcgmrelay._impl as i; print(dcgmrelay.implementation(), i.parse_raw.__module__)"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "DCGMRELAY_NO_EXTENSIONS": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["py", "dcgmrelay._parser_py"]


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=pytest.mark.c_extension)])
def test_comment_line_equal_to_a_label_block(impl):
    # The parser remembers both label blocks and comment lines by their bytes: a block whose
    # bytes equal an earlier comment line must not get the comment's parse back.
    s = dcgmrelay.parse(b"# HELP x y\nm{# HELP x y} 1\n", implementation=impl)
    assert s.labelsets == () and tuple(s.errors[0])[:2] == (2, 3) and s.entities == ()


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=pytest.mark.c_extension)])
def test_memo_keeps_no_huge_label_blocks_or_comments(impl):
    # A target sending ever-new 100 KiB label blocks (or HELP lines) must not make a reused
    # Parser remember them: the memo's bytes stay bounded whatever the target sends.
    from dcgmrelay._parser_py import MEMO_MAX_KEY

    p = dcgmrelay.Parser(implementation=impl)
    for i in range(20):
        pad = b"x" * 100_000
        s = p.parse(b'# HELP m %d %s\nm{a="%d%s"} 1\nn{gpu="0"} 2\n' % (i, pad, i, pad))
        assert len(s) == 2 and dict(s.labelsets[s.labelset_ids[0]])["a"].startswith(str(i))
    assert all(len(k) <= MEMO_MAX_KEY for k in p._memo)
    assert sum(len(k) for k in p._memo) < 10_000


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=pytest.mark.c_extension)])
@pytest.mark.parametrize("fmt", ["prometheus", "openmetrics"])
def test_memo_holds_the_last_body_only(impl, fmt):
    # A target sending ever-new label sets, comments and garbage must not make a reused Parser
    # grow. Bound: after a parse the memo holds the label blocks and comment lines of that body
    # only (at most one entry per line; keys are pieces of its lines), whatever came before.
    # It used to keep them all up to 65,536 entries per parser (~0.5 GB of 4 KiB blocks): a long
    # fuzz run grew ~13 KB per input.
    eof = b"# EOF\n" if fmt == "openmetrics" else b""
    p = dcgmrelay.Parser(format=fmt, implementation=impl)
    for i in range(300):
        data = (b'# HELP m_%d help %d\n# TYPE m_%d gauge\n# junk %d\nm_%d{gpu="%d",x="%d"} 1\n'
                b'bad{gpu="%d"} nope\nm{y="%d",z="\\\\"} 1\n{a="%d"} 2\n' % ((i,) * 10)) + eof
        s = p.parse(data)
        assert len(s) == 2 and s.n_errors == 2
        assert len(p._memo) <= data.count(b"\n")
        assert sum(len(k) for k in p._memo) <= len(data) + 2 * data.count(b"\n")
    steady = b'# TYPE g gauge\ng{gpu="0"} 1\ng{gpu="1"} 2\n' + eof
    first, second = p.parse(steady), p.parse(steady)
    assert len(p._memo) == (4 if eof else 3)  # the two blocks, '# TYPE' (and '# EOF')
    assert second.labelsets[1] is first.labelsets[1]  # what the memo is for: blocks parsed once

    # a strict parse that fails keeps nothing of the body it rejects
    strict = dcgmrelay.Parser(format=fmt, strict=True, implementation=impl)
    strict.parse(steady)
    for i in range(100):
        with pytest.raises(ParseError):
            strict.parse(b'# HELP m_%d help\n# junk %d\nm{gpu="%d"} 1\nm{gpu="%d"} oops\n' % (i, i, i, i) + eof)
    assert len(strict._memo) == (4 if eof else 3)


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=pytest.mark.c_extension)])
@pytest.mark.parametrize("fmt", ["prometheus", "openmetrics"])
def test_a_reused_parser_reads_metadata_lines_as_a_new_one_does(impl, fmt):
    # A reused Parser applies remembered HELP/TYPE/UNIT lines without re-parsing them (the
    # native core without a Python call): families, duplicates reported and '# EOF' must be
    # exactly those of a fresh parser, scrape after scrape, and the two formats' escapes apart.
    body = (b'# HELP g A gauge\\\\ with \\"escapes\\"\n# TYPE g gauge\n# UNIT g celsius\n# plain comment\n'
            b'g{gpu="0"} 1\n# HELP g again\n# TYPE c counter\nc_total{gpu="0"} 2\n')
    if fmt == "openmetrics":
        body += b"# EOF\n"
    fresh = dcgmrelay.parse(body, format=fmt, implementation=impl)
    p = dcgmrelay.Parser(format=fmt, implementation=impl)
    for _ in range(3):
        s = p.parse(body)
        assert s.families == fresh.families
        assert [tuple(e) for e in s.errors] == [tuple(e) for e in fresh.errors]
        assert len(s.errors) == 1 and "duplicate '# HELP' line for g" in s.errors[0].reason
        assert s.values.tolist() == fresh.values.tolist() == [1.0, 2.0]
    # one parser, both formats in turn (a target that switches): each gets its own format's escapes
    text, om = body.replace(b"# EOF\n", b""), body if fmt == "openmetrics" else body + b"# EOF\n"
    p = dcgmrelay.Parser(implementation=impl)
    for _ in range(2):
        for b, f in ((text, "prometheus"), (om, "openmetrics")):
            want = dcgmrelay.parse(b, format=f, implementation=impl).families["g"].help
            assert p.parse(b, content_type=("application/openmetrics-text; version=1.0.0" if f == "openmetrics"
                                            else "text/plain; version=0.0.4")).families["g"].help == want
    assert dcgmrelay.parse(text, format="prometheus", implementation=impl).families["g"].help == 'A gauge\\ with \\"escapes\\"'
    assert dcgmrelay.parse(om, format="openmetrics", implementation=impl).families["g"].help == 'A gauge\\ with "escapes"'


# -- the native parser's column buffers ---------------------------------------------------------
def _spare_slots(col: np.ndarray) -> int:
    """Slots of the buffer behind a returned column that it does not use (0 for a copy)."""
    return 0 if col.base is None else (col.base.nbytes - col.nbytes) // col.itemsize


_ONE_GPU_PAGE = b"".join(b'# HELP DCGM_FI_F%d Field %d.\n# TYPE DCGM_FI_F%d gauge\nDCGM_FI_F%d{gpu="0"} %d\n'
                         % (i, i, i, i, i) for i in range(100))


@pytest.mark.c_extension
@pytest.mark.parametrize("name, data, samples, spare", [
    # a one-GPU dcgm-exporter page, two thirds HELP/TYPE lines: columns of exactly its
    # samples, the parse's own buffers (not copied every scrape)
    ("comment-heavy", _ONE_GPU_PAGE, 100, 0),
    ("comments led by blanks", _ONE_GPU_PAGE.replace(b"# ", b"  # "), 100, 200),
    # lines that could have been samples and were not: a small waste is kept, not copied away
    ("some garbage", _ONE_GPU_PAGE + b"{garbage\n" * 300, 100, 300),
    # ... a large one (more than the samples and SPARE_MAX) is: no big empty buffer kept alive
    ("much garbage", _ONE_GPU_PAGE + b"{garbage\n" * 20_000, 100, None),
])
def test_native_columns_hold_no_large_spare_capacity(name: str, data: bytes, samples: int,
                                                     spare: "int | None") -> None:
    from dcgmrelay import _parser, _parser_py

    r = _parser.parse_raw(data, False, False, 10, None, None)
    py = _parser_py.parse_raw(data, False, False, 10, None, None)
    cols = (r.values, r.timestamps, r.name_ids, r.labelset_ids)
    assert [np.asarray(c).tolist() for c in cols] == [
        np.asarray(c).tolist() for c in (py.values, py.timestamps, py.name_ids, py.labelset_ids)]
    assert len(r.values) == samples and r.n_errors == py.n_errors
    for col in cols:
        if spare is None:
            assert col.base is None  # copied to its length
        else:
            assert col.base is not None and _spare_slots(col) == spare  # a view of the parse's buffer
        assert _spare_slots(col) <= max(len(col), _parser.SPARE_MAX)
