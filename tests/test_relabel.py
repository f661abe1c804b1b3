"""Prometheus relabeling: every action with Prometheus' documented semantics (model/relabel), the
"__" meta-label rule, rule validation with YAML paths, and the memo of RelabelRules.apply.

Expected outputs are written out explicitly; several are the cases of Prometheus'
model/relabel/relabel_test.go (hashmod of "baz" mod 1000 is 976 there too)."""

from __future__ import annotations

import pickle

import pytest

from dcgmrelay.errors import DcgmRelayError
from dcgmrelay.relabel import ACTIONS, RelabelError, RelabelRules, Rule, compile_rules


def relabel(labels, *rules, drop_meta=False):
    return compile_rules(list(rules), path="rules").apply(labels, drop_meta=drop_meta)


# ----------------------------------------------------------------------------- replace


def test_replace_defaults_copy_the_source_label():
    # action replace, regex (.*), replacement $1 are the defaults
    assert relabel({"a": "foo"}, {"source_labels": ["a"], "target_label": "b"}) == {"a": "foo", "b": "foo"}


def test_replace_with_group_references():
    rule = {"source_labels": ["a"], "regex": "f(.*)", "target_label": "d", "replacement": "ch${1}-ch${1}"}
    assert relabel({"a": "foo", "b": "bar"}, rule) == {"a": "foo", "b": "bar", "d": "choo-choo"}


def test_replace_joins_source_labels_with_the_separator():
    rule = {"source_labels": ["a", "b"], "target_label": "c"}
    assert relabel({"a": "foo", "b": "bar"}, rule) == {"a": "foo", "b": "bar", "c": "foo;bar"}
    rule["separator"] = "-"
    assert relabel({"a": "foo", "b": "bar"}, rule) == {"a": "foo", "b": "bar", "c": "foo-bar"}
    # a missing source label is the empty string
    rule = {"source_labels": ["a", "missing", "b"], "target_label": "c"}
    assert relabel({"a": "foo", "b": "bar"}, rule) == {"a": "foo", "b": "bar", "c": "foo;;bar"}


def test_replace_regex_is_anchored():
    # "f" matches a prefix of "foo" only: Prometheus anchors ^(?s:f)$, so no match, no change
    assert relabel({"a": "foo"}, {"source_labels": ["a"], "regex": "f", "target_label": "b"}) == {"a": "foo"}
    assert relabel({"a": "foo"}, {"source_labels": ["a"], "regex": "o+", "target_label": "b"}) == {"a": "foo"}
    assert relabel({"a": "foo"}, {"source_labels": ["a"], "regex": "fo+", "target_label": "b",
                                  "replacement": "yes"}) == {"a": "foo", "b": "yes"}
    # alternation is anchored as a whole, not per branch
    assert relabel({"a": "xfoo"}, {"source_labels": ["a"], "regex": "foo|bar", "target_label": "b",
                                   "replacement": "y"}) == {"a": "xfoo"}


def test_replace_dot_matches_newline():
    # (?s): "." also matches \n, as in Prometheus
    assert relabel({"a": "foo\nbar"}, {"source_labels": ["a"], "regex": "foo.bar", "target_label": "b",
                                       "replacement": "m"}) == {"a": "foo\nbar", "b": "m"}


def test_replace_no_match_changes_nothing():
    rule = {"source_labels": ["a"], "regex": "nope(.*)", "target_label": "a", "replacement": "x"}
    assert relabel({"a": "foo"}, rule) == {"a": "foo"}


def test_replace_with_empty_result_deletes_the_target():
    # source missing -> "" matches (.*) -> $1 = "" -> target label removed
    rule = {"source_labels": ["missing"], "target_label": "b"}
    assert relabel({"a": "foo", "b": "bar"}, rule) == {"a": "foo"}


def test_replace_target_label_is_expanded_too():
    rule = {"source_labels": ["a"], "regex": "some-([^-]+)-([^,]+)", "replacement": "${2}", "target_label": "${1}"}
    assert relabel({"a": "some-name-value"}, rule) == {"a": "some-name-value", "name": "value"}
    # an expanded target that is not a valid label name is skipped
    rule = {"source_labels": ["a"], "regex": "(.*)", "replacement": "x", "target_label": "${1}"}
    assert relabel({"a": "1-invalid"}, rule) == {"a": "1-invalid"}


def test_replace_template_rules_of_go_expand():
    def rep(template, value="foo"):
        return relabel({"a": value}, {"source_labels": ["a"], "regex": "(f)(o+)", "target_label": "b",
                                      "replacement": template}).get("b")

    assert rep("$1") == "f"
    assert rep("${2}x") == "oox"
    assert rep("$2x") is None  # "$2x" names the group "2x": empty, so b is not set
    assert rep("$$1") == "$1"  # $$ is a literal $
    assert rep("$") == "$"  # a malformed reference stays text
    assert rep("${1") == "${1"
    assert rep("$3") is None  # a group that does not exist is empty
    assert rep("[$1][$2]") == "[f][oo]"


def test_replace_named_groups_python_and_go_syntax():
    for regex in ("(?P<host>[^:]+):(?P<port>\\d+)", "(?<host>[^:]+):(?<port>\\d+)"):
        rule = {"source_labels": ["__address__"], "regex": regex, "target_label": "host",
                "replacement": "${host} on $port"}
        assert relabel({"__address__": "gpu-1:9400"}, rule) == {"__address__": "gpu-1:9400",
                                                                 "host": "gpu-1 on 9400"}


def test_leading_flags_apply_to_the_whole_regex():
    rule = {"source_labels": ["a"], "regex": "(?i)foo", "action": "keep"}
    assert relabel({"a": "FOO"}, rule) == {"a": "FOO"}
    assert relabel({"a": "FOOX"}, rule) is None


# ----------------------------------------------------------------------------- keep / drop


def test_keep_and_drop():
    keep = {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_(GPU_TEMP|POWER_USAGE)", "action": "keep"}
    assert relabel({"__name__": "DCGM_FI_DEV_GPU_TEMP", "gpu": "0"}, keep) == {"__name__": "DCGM_FI_DEV_GPU_TEMP",
                                                                                "gpu": "0"}
    assert relabel({"__name__": "DCGM_FI_DEV_GPU_TEMP_MAX", "gpu": "0"}, keep) is None  # anchored
    drop = dict(keep, action="drop")
    assert relabel({"__name__": "DCGM_FI_DEV_GPU_TEMP"}, drop) is None
    assert relabel({"__name__": "DCGM_FI_DEV_SM_CLOCK"}, drop) == {"__name__": "DCGM_FI_DEV_SM_CLOCK"}


def test_keep_and_drop_on_a_missing_label_match_the_empty_string():
    assert relabel({"a": "x"}, {"source_labels": ["pod"], "regex": "", "action": "drop"}) is None
    assert relabel({"a": "x"}, {"source_labels": ["pod"], "regex": ".+", "action": "keep"}) is None
    assert relabel({"a": "x", "pod": "p"}, {"source_labels": ["pod"], "regex": ".+", "action": "keep"}) == {
        "a": "x", "pod": "p"}
    # with the default regex (.*) keep keeps and drop drops everything
    assert relabel({"a": "x"}, {"action": "keep"}) == {"a": "x"}
    assert relabel({"a": "x"}, {"action": "drop"}) is None


def test_keepequal_and_dropequal():
    same = {"a": "1", "b": "1"}
    diff = {"a": "1", "b": "2"}
    keq = {"source_labels": ["a"], "target_label": "b", "action": "keepequal"}
    deq = {"source_labels": ["a"], "target_label": "b", "action": "dropequal"}
    assert relabel(same, keq) == same
    assert relabel(diff, keq) is None
    assert relabel(same, deq) is None
    assert relabel(diff, deq) == diff


# ----------------------------------------------------------------------------- other actions


def test_hashmod():
    rule = {"source_labels": ["c"], "target_label": "d", "action": "hashmod", "modulus": 1000}
    assert relabel({"a": "foo", "b": "bar", "c": "baz"}, rule) == {"a": "foo", "b": "bar", "c": "baz", "d": "976"}
    assert relabel({"c": "foo"}, rule) == {"c": "foo", "d": "696"}


def test_labelmap():
    rule = {"action": "labelmap", "regex": "(b.*)", "replacement": "bar_${1}_bar"}
    assert relabel({"a": "foo", "b": "bar", "c": "baz"}, rule) == {"a": "foo", "b": "bar", "c": "baz",
                                                                    "bar_b_bar": "bar"}
    rule = {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"}
    assert relabel({"__meta_kubernetes_pod_label_app": "dcgm", "__meta_kubernetes_pod_name": "p"}, rule) == {
        "__meta_kubernetes_pod_label_app": "dcgm", "__meta_kubernetes_pod_name": "p", "app": "dcgm"}


def test_labeldrop_and_labelkeep_match_whole_names():
    labels = {"__name__": "m", "gpu": "0", "gpu_uuid": "GPU-1", "pci_bus_id": "00:1e.0"}
    assert relabel(labels, {"action": "labeldrop", "regex": "gpu"}) == {"__name__": "m", "gpu_uuid": "GPU-1",
                                                                         "pci_bus_id": "00:1e.0"}
    assert relabel(labels, {"action": "labeldrop", "regex": "gpu.*|pci_bus_id"}) == {"__name__": "m"}
    assert relabel(labels, {"action": "labelkeep", "regex": "__name__|gpu"}) == {"__name__": "m", "gpu": "0"}


def test_lowercase_and_uppercase():
    assert relabel({"foo": "bAr123Foo"}, {"source_labels": ["foo"], "target_label": "foo",
                                          "action": "lowercase"}) == {"foo": "bar123foo"}
    assert relabel({"foo": "bAr123Foo"}, {"source_labels": ["foo"], "target_label": "foo_up",
                                          "action": "uppercase"}) == {"foo": "bAr123Foo", "foo_up": "BAR123FOO"}


def test_rules_run_in_order():
    rules = [
        {"source_labels": ["UUID"], "target_label": "gpu_uuid"},
        {"action": "labeldrop", "regex": "UUID"},
        {"source_labels": ["gpu_uuid"], "regex": "GPU-dead.*", "action": "drop"},
    ]
    assert relabel({"UUID": "GPU-abc", "gpu": "0"}, *rules) == {"gpu": "0", "gpu_uuid": "GPU-abc"}
    assert relabel({"UUID": "GPU-deadbeef", "gpu": "1"}, *rules) is None


def test_camel_case_keys_and_action_names_of_prometheus_operator():
    rule = {"sourceLabels": ["a"], "targetLabel": "b", "action": "Replace"}
    assert relabel({"a": "foo"}, rule) == {"a": "foo", "b": "foo"}
    assert relabel({"a": "foo", "b": "x"}, {"action": "LabelDrop", "regex": "b"}) == {"a": "foo"}
    assert relabel({"c": "baz"}, {"sourceLabels": ["c"], "targetLabel": "d", "action": "HashMod",
                                  "modulus": 1000}) == {"c": "baz", "d": "976"}


def test_empty_label_values_are_absent():
    assert relabel({"a": "", "b": "x"}) == {"b": "x"}
    assert relabel({"a": "", "b": "x"}, {"source_labels": ["a"], "regex": "", "action": "keep"}) == {"b": "x"}


# ----------------------------------------------------------------------------- meta labels


def test_drop_meta_removes_double_underscore_labels_after_relabeling():
    rules = compile_rules([{"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}],
                          path="relabel_configs", drop_meta=True)
    labels = {"__address__": "10.0.0.5:9400", "__meta_kubernetes_pod_name": "dcgm-x", "__tmp_x": "1", "job": "j"}
    assert rules.apply(labels) == {"job": "j", "pod": "dcgm-x"}
    # __name__ is a metric's name, not a meta label: kept
    assert rules.apply({"__name__": "DCGM_FI_DEV_GPU_TEMP", "__tmp": "1"}) == {"__name__": "DCGM_FI_DEV_GPU_TEMP"}
    # per-call override
    assert rules.apply(labels, drop_meta=False) == dict(labels, pod="dcgm-x")
    # without drop_meta they stay
    assert compile_rules([]).apply({"__address__": "a:1", "x": "y"}) == {"__address__": "a:1", "x": "y"}


# ----------------------------------------------------------------------------- memo


def test_apply_is_memoised_and_results_are_independent_copies():
    rules = compile_rules([{"source_labels": ["a"], "target_label": "b"}])
    first = rules.apply({"a": "1"})
    assert (rules.hits, rules.misses) == (0, 1)
    first["mutated"] = "yes"  # the caller owns the dict it gets
    second = rules.apply({"a": "1"})
    assert second == {"a": "1", "b": "1"}
    assert (rules.hits, rules.misses) == (1, 1)
    assert rules.apply({"a": "2"}) == {"a": "2", "b": "2"}
    assert rules.cache_len == 2
    # drop_meta is part of the key
    rules.apply({"a": "1"}, drop_meta=True)
    assert rules.misses == 3


def test_memo_key_is_the_label_tuple_and_order_does_not_change_the_result():
    rules = compile_rules([{"action": "labeldrop", "regex": "x"}])
    assert rules.apply({"a": "1", "x": "2"}) == rules.apply({"x": "2", "a": "1"}) == {"a": "1"}
    items = rules.apply_items((("a", "1"), ("x", "2")))
    assert items == (("a", "1"),)
    assert rules.apply_items((("a", "1"), ("x", "2"))) is items  # the memoised object
    assert compile_rules([{"action": "drop"}]).apply_items((("a", "1"),)) is None


def test_memo_is_bounded():
    rules = compile_rules([{"action": "labeldrop", "regex": "x"}], cache_size=10)
    for i in range(25):
        assert rules.apply({"a": str(i), "x": "1"}) == {"a": str(i)}
    assert rules.cache_len <= 10
    assert rules.apply({"a": "24", "x": "1"}) == {"a": "24"}
    rules.clear_cache()
    assert rules.cache_len == 0


def test_memoised_drop_is_remembered():
    rules = compile_rules([{"source_labels": ["a"], "regex": "bad", "action": "drop"}])
    assert rules.apply({"a": "bad"}) is None
    assert rules.apply({"a": "bad"}) is None
    assert rules.hits == 1


# ----------------------------------------------------------------------------- validation


def errors_of(rules, path="metricRelabelConfigs"):
    with pytest.raises(RelabelError) as ei:
        compile_rules(rules, path=path)
    return ei.value.problems


def test_unknown_action_with_suggestion():
    [(path, msg)] = errors_of([{"action": "repalce", "target_label": "x"}])
    assert path == "metricRelabelConfigs[0].action"
    assert "unknown action 'repalce'" in msg and "did you mean 'replace'" in msg
    assert "labelkeep" in msg  # lists what is allowed


def test_bad_regex():
    [(path, msg)] = errors_of([{"source_labels": ["a"], "regex": "(unclosed", "action": "keep"}])
    assert path == "metricRelabelConfigs[0].regex"
    assert "invalid regex '(unclosed'" in msg
    [(path, msg)] = errors_of([{"regex": "(?U)a", "action": "keep"}])
    assert path.endswith(".regex") and "unsupported regex flag" in msg


def test_missing_target_label_and_modulus():
    problems = errors_of([{"source_labels": ["a"]}, {"source_labels": ["a"], "action": "hashmod"}])
    assert problems == [
        ("metricRelabelConfigs[0].target_label", "required for action replace"),
        ("metricRelabelConfigs[1].modulus", "hashmod needs a non-zero modulus"),
        ("metricRelabelConfigs[1].target_label", "required for action hashmod"),
    ]


def test_field_combinations_prometheus_refuses():
    problems = dict(errors_of([
        {"action": "labeldrop", "regex": "a", "source_labels": ["b"]},
        {"action": "keepequal", "source_labels": ["a"], "target_label": "b", "regex": "x"},
        {"action": "lowercase", "source_labels": ["a"], "target_label": "b", "replacement": "x"},
        {"action": "labelmap", "regex": "(.*)", "replacement": "not valid!"},
        {"action": "replace", "source_labels": ["a"], "target_label": "0bad"},
    ]))
    assert problems["metricRelabelConfigs[0].source_labels"] == "action labeldrop takes only regex"
    assert problems["metricRelabelConfigs[1].regex"] == "action keepequal takes only source_labels and target_label"
    assert "takes only" in problems["metricRelabelConfigs[2].replacement"]
    assert "not a valid replacement for labelmap" in problems["metricRelabelConfigs[3].replacement"]
    assert "'0bad' is not a valid label name" in problems["metricRelabelConfigs[4].target_label"]


def test_wrong_types_and_unknown_keys():
    problems = errors_of([
        {"source_labels": "a", "target_label": "b"},
        {"sourcelabels": ["a"], "target_label": "b"},
        {"source_labels": ["ok", "not-valid"], "target_label": "b"},
        {"action": "hashmod", "source_labels": ["a"], "target_label": "b", "modulus": "ten"},
        "keep",
        {"source_labels": ["a"], "sourceLabels": ["a"], "target_label": "b"},
    ])
    got = dict(problems)
    assert got["metricRelabelConfigs[0].source_labels"] == "expected a list of label names, got a string"
    assert got["metricRelabelConfigs[1].sourcelabels"].startswith(
        "unknown key 'sourcelabels' (did you mean 'sourceLabels'?)")
    assert got["metricRelabelConfigs[2].source_labels[1]"].startswith("'not-valid' is not a valid label name")
    assert got["metricRelabelConfigs[3].modulus"] == "expected a positive integer, got a string"
    assert got["metricRelabelConfigs[4]"] == "a relabel rule must be a mapping, not a string"
    assert "are the same key" in got["metricRelabelConfigs[5].sourceLabels"]
    with pytest.raises(RelabelError, match="expected a list of relabel rules"):
        compile_rules({"action": "keep"}, path="x")


def test_all_problems_are_reported_at_once():
    with pytest.raises(RelabelError) as ei:
        compile_rules([{"action": "nope"}, {"regex": "("}, {"action": "hashmod", "target_label": "x"}], path="r")
    err = ei.value
    assert isinstance(err, DcgmRelayError) and isinstance(err, ValueError)
    assert [p for p, _ in err.problems] == ["r[0].action", "r[1].regex", "r[1].target_label", "r[2].modulus"]
    assert err.path == "r[0].action"
    text = str(err)
    assert text.count("\n") == 3 and text.startswith("r[0].action: unknown action 'nope'")
    assert pickle.loads(pickle.dumps(err)).problems == err.problems


def test_every_action_compiles_and_round_trips():
    specs = {
        "replace": {"source_labels": ["a"], "target_label": "b"},
        "keep": {"source_labels": ["a"], "regex": "x"},
        "drop": {"source_labels": ["a"], "regex": "x"},
        "keepequal": {"source_labels": ["a"], "target_label": "b"},
        "dropequal": {"source_labels": ["a"], "target_label": "b"},
        "hashmod": {"source_labels": ["a"], "target_label": "b", "modulus": 8},
        "labelmap": {"regex": "x_(.*)"},
        "labeldrop": {"regex": "x"},
        "labelkeep": {"regex": "x"},
        "lowercase": {"source_labels": ["a"], "target_label": "b"},
        "uppercase": {"source_labels": ["a"], "target_label": "b"},
    }
    assert set(specs) == set(ACTIONS)
    raw = [dict(spec, action=action) for action, spec in specs.items()]
    rules = compile_rules(raw)
    assert [r.action for r in rules] == list(specs)
    again = compile_rules(rules.to_dicts())
    assert again.rules == rules.rules
    assert isinstance(rules, RelabelRules) and len(rules) == 11 and all(isinstance(r, Rule) for r in rules)
    assert compile_rules(None).apply({"a": "1"}) == {"a": "1"}
