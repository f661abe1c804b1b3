"""dcgmrelay.targets: what a (relabeled) target label set means for a scrape.

Static targets (config.static_targets) and discovered ones (discovery.pod_targets)
both end in target_from_labels; these tests pin its Prometheus semantics.
"""

from __future__ import annotations

import pickle

import pytest

from dcgmrelay.errors import DcgmRelayError
from dcgmrelay.relabel import compile_rules
from dcgmrelay.targets import (ScrapeLimits, Target, TargetLabelError, format_duration, scrape_labels,
                               target_from_labels)

BASE = {"job": "dcgm", "__address__": "10.0.0.5:9400", "__scheme__": "http", "__metrics_path__": "/metrics",
        "__scrape_interval__": "15s", "__scrape_timeout__": "10s"}


def _t(extra=None, **kw) -> Target:
    labels = dict(BASE, **(extra or {}))
    kw.setdefault("name", "t0")
    t = target_from_labels(labels, **kw)
    assert t is not None
    return t


def test_plain_label_set():
    t = _t({"rack": "r12"})
    assert t.url == "http://10.0.0.5:9400/metrics"
    assert dict(t.labels) == {"job": "dcgm", "rack": "r12", "instance": "10.0.0.5:9400"}
    assert (t.interval_s, t.timeout_s, t.job, dict(t.params)) == (15.0, 10.0, "dcgm", {})


def test_address_scheme_and_path():
    t = _t({"__address__": "[fd00::5]:9500", "__scheme__": "HTTPS", "__metrics_path__": "m/v2"})
    assert t.url == "https://[fd00::5]:9500/m/v2"  # scheme any case, a leading / added
    assert t.labels["instance"] == "[fd00::5]:9500"
    assert _t({"__address__": "gpu-node-2"}).url == "http://gpu-node-2/metrics"  # no port: the scheme's
    # absent (or empty) __scheme__: the given default; absent __metrics_path__: "/"
    t = target_from_labels({"__address__": "h:1"}, name="t0", scheme="https")
    assert t is not None and t.url == "https://h:1/"
    t = target_from_labels({"__address__": "h:1", "__scheme__": "", "__metrics_path__": ""}, name="t0")
    assert t is not None and t.url == "http://h:1/"


def test_no_address_is_no_target():
    assert target_from_labels({"job": "dcgm"}, name="t0") is None
    assert target_from_labels(dict(BASE, __address__=""), name="t0") is None


def test_interval_and_timeout():
    t = _t({"__scrape_interval__": "1m30s", "__scrape_timeout__": "500ms"})
    assert (t.interval_s, t.timeout_s) == (90.0, 0.5)
    t = _t({"__scrape_interval__": "2", "__scrape_timeout__": "1.5"})  # numbers of seconds
    assert (t.interval_s, t.timeout_s) == (2.0, 1.5)
    t = _t({"__scrape_interval__": "5s", "__scrape_timeout__": "5s"})
    assert (t.interval_s, t.timeout_s) == (5.0, 5.0)  # a timeout equal to the interval is fine
    # absent: the given defaults
    t = target_from_labels({"__address__": "h:1"}, name="t0", interval_s=30.0, timeout_s=3.0)
    assert t is not None and (t.interval_s, t.timeout_s) == (30.0, 3.0)



def _timeout_error(labels, **kw) -> TargetLabelError:
    kw.setdefault("name", "targets[0].endpoints[3] (job dcgm)")
    with pytest.raises(TargetLabelError) as ei:
        target_from_labels(labels, **kw)
    e = ei.value
    assert (e.target, e.label) == ("targets[0].endpoints[3] (job dcgm)", "__scrape_timeout__")
    assert str(e).startswith("target targets[0].endpoints[3] (job dcgm): __scrape_timeout__ ")
    assert pickle.loads(pickle.dumps(e)).message == e.message
    return e


def test_timeout_longer_than_the_interval_is_no_target():
    """Prometheus' PopulateLabels: "scrape timeout cannot be greater than scrape interval"; the
    target is dropped, not scraped with a timeout other than the one asked for."""
    e = _timeout_error(dict(BASE, __scrape_interval__="5s", __scrape_timeout__="10s"))
    assert e.message == "'10s' is longer than __scrape_interval__ '5s'; a scrape timeout must be <= the interval"
    # by a millisecond, and with other spellings: the durations are compared, not the strings
    e = _timeout_error(dict(BASE, __scrape_interval__="1m", __scrape_timeout__="1m1ms"))
    assert "'1m1ms'" in e.message and "'1m'" in e.message
    e = _timeout_error(dict(BASE, __scrape_interval__="2", __scrape_timeout__="2.5"))
    assert "'2.5'" in e.message and "'2'" in e.message


def test_timeout_equal_to_the_interval_is_kept():
    for interval, timeout, seconds in [("5s", "5s", 5.0), ("1m", "60s", 60.0), ("1m30s500ms", "90.5", 90.5),
                                       ("300ms", "0.3", 0.3), ("0.3", "300ms", 0.3), ("2", "2s", 2.0),
                                       # 9ms reads as 0.009000000000000001 s, "0.009" as 0.009: equal
                                       # to the nanosecond (Prometheus' resolution), so equal
                                       ("0.009", "9ms", 0.009), ("1.144", "1s144ms", 1.144)]:
        t = _t({"__scrape_interval__": interval, "__scrape_timeout__": timeout})
        assert (t.interval_s, t.timeout_s) == pytest.approx((seconds, seconds), abs=1e-12), (interval, timeout)
    t = _t({"__scrape_interval__": "5s", "__scrape_timeout__": "4999ms"})
    assert (t.interval_s, t.timeout_s) == (5.0, 4.999)


def test_interval_relabeled_below_the_timeout_is_no_target():
    """As in Prometheus, where __scrape_timeout__ is always set from the config before relabeling:
    a rule that shortens __scrape_interval__ below the endpoint's timeout leaves a target that
    is dropped (the timeout is not quietly shortened with it)."""
    lb = scrape_labels(job="dcgm", address="10.0.0.5:9400", scheme="http", path="/metrics", interval_s=15.0,
                       timeout_s=10.0)
    rules = compile_rules([{"target_label": "__scrape_interval__", "replacement": "5s"}])
    relabeled = rules.apply(lb)
    assert relabeled is not None and relabeled["__scrape_timeout__"] == "10s"
    e = _timeout_error(relabeled, interval_s=15.0, timeout_s=10.0)
    assert e.message == "'10s' is longer than __scrape_interval__ '5s'; a scrape timeout must be <= the interval"
    # the timeout relabeled down with it: a target
    both = compile_rules([{"target_label": "__scrape_interval__", "replacement": "5s"},
                          {"target_label": "__scrape_timeout__", "replacement": "5s"}]).apply(lb)
    assert both is not None
    t = target_from_labels(both, name="t0", interval_s=15.0, timeout_s=10.0)
    assert t is not None and (t.interval_s, t.timeout_s) == (5.0, 5.0)
    # a label set without __scrape_timeout__ (a rule emptied it) has the given default, as
    # Prometheus' config value: checked against the relabeled interval alike
    e = _timeout_error(dict(BASE, __scrape_interval__="5s", __scrape_timeout__=""), timeout_s=10.0)
    assert e.message == "'10s' is longer than __scrape_interval__ '5s'; a scrape timeout must be <= the interval"
    # and the default interval against a relabeled timeout
    labels = {k: v for k, v in BASE.items() if k != "__scrape_interval__"}
    e = _timeout_error(dict(labels, __scrape_timeout__="20s"), interval_s=15.0)
    assert e.message == "'20s' is longer than __scrape_interval__ '15s'; a scrape timeout must be <= the interval"


def test_params():
    t = _t({"__param_collect": "gpu", "__param_format": "text"}, params={"collect": ["a", "b"], "x": ["1"]})
    # __param_<name> replaces the first value; the rest and the other parameters stay
    assert dict(t.params) == {"collect": ["gpu", "b"], "x": ["1"], "format": ["text"]}
    assert t.key == "http://10.0.0.5:9400/metrics?collect=gpu&collect=b&format=text&x=1"
    assert "__param_collect" not in t.labels


def test_instance_job_and_double_underscore_labels():
    t = _t({"instance": "gpu-box", "job": "other", "__meta_kubernetes_pod_name": "p", "__tmp_x": "y",
            "__name__": "n"}, job="fallback")
    assert dict(t.labels) == {"job": "other", "instance": "gpu-box"}
    assert t.job == "other"
    labels = dict(BASE)
    del labels["job"]
    t = target_from_labels(labels, name="t0", job="fallback")
    assert t is not None and t.job == "fallback" and "job" not in t.labels


def test_empty_valued_labels_are_absent():
    t = _t({"rack": "", "instance": "", "zone": "a"})
    assert dict(t.labels) == {"job": "dcgm", "zone": "a", "instance": "10.0.0.5:9400"}


def test_auth_tls_and_metric_relabel_go_in_as_they_are():
    rule = {"source_labels": ["__name__"], "regex": "DCGM_.*", "action": "keep"}
    t = _t(auth={"bearer_token_file": "/t"}, tls={"ca_file": "/ca"}, metric_relabel=[rule])
    assert (dict(t.auth), dict(t.tls), list(t.metric_relabel)) == ({"bearer_token_file": "/t"}, {"ca_file": "/ca"},
                                                                  [rule])


def test_limits_go_in_and_a_job_limit_wins_over_the_global_one():
    """A job's ScrapeLimits ride on its targets; over() takes each limit the job sets, 0 (no
    limit) included, and the global one for each it leaves unset (None)."""
    job = ScrapeLimits(sample_limit=500, label_limit=0)
    assert _t(limits=job).limits == job
    assert _t().limits == ScrapeLimits()  # none given: every one unset
    glob = ScrapeLimits(1000, 30, 64, 256)
    assert job.over(glob) == ScrapeLimits(500, 0, 64, 256)
    assert ScrapeLimits().over(glob) == glob
    assert job.set_items() == {"sample_limit": 500, "label_limit": 0}
    assert ScrapeLimits.KEYS == ("sample_limit", "label_limit", "label_name_length_limit", "label_value_length_limit")
    assert pickle.loads(pickle.dumps(_t(limits=job))).limits == job


@pytest.mark.parametrize("label,value,says", [
    ("__scrape_interval__", "soon", "'soon' is not a duration"),
    ("__scrape_interval__", "0s", "is not a duration of more than 0"),
    ("__scrape_interval__", "-5", "is not a duration of more than 0"),
    ("__scrape_interval__", "nan", "is not a duration of more than 0"),
    ("__scrape_timeout__", "1.5s", "'1.5s' is not a duration"),
    ("__scrape_timeout__", "0", "is not a duration of more than 0"),
    ("__address__", "h:1/metrics", "is not host:port"),
    ("__address__", "user@h:1", "is not host:port"),
    ("__address__", "h:99999", "is not host:port"),
    ("__address__", "fd00::5:9400", "is not host:port"),
    ("__address__", "h 1:9400", "is not host:port"),
    ("__scheme__", "ftp", "'ftp' is not http or https"),
])
def test_unusable_special_labels_name_the_target(label, value, says):
    with pytest.raises(TargetLabelError) as ei:
        target_from_labels(dict(BASE, **{label: value}), name="targets[2].endpoints[1] (job dcgm)")
    e = ei.value
    assert (e.target, e.label) == ("targets[2].endpoints[1] (job dcgm)", label)
    assert str(e).startswith(f"target targets[2].endpoints[1] (job dcgm): {label} ") and says in str(e)
    assert isinstance(e, DcgmRelayError) and isinstance(e, ValueError)
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), str(again)) == (TargetLabelError, str(e))


def test_scrape_labels_are_what_relabeling_starts_from():
    assert scrape_labels(job="dcgm", address="h:1", scheme="https", path="/m", interval_s=90.0, timeout_s=0.5,
                         params={"collect": ["a", "b"], "none": []}) == {
        "job": "dcgm", "__address__": "h:1", "__scheme__": "https", "__metrics_path__": "/m",
        "__scrape_interval__": "1m30s", "__scrape_timeout__": "500ms", "__param_collect": "a"}
    # and they round-trip: the target without relabeling is the endpoint itself
    lb = scrape_labels(job="dcgm", address="h:1", scheme="http", path="/metrics", interval_s=0.25, timeout_s=0.1,
                       params={"collect": ["a", "b"]})
    t = target_from_labels(lb, name="t0", params={"collect": ["a", "b"]})
    assert t is not None and (t.url, t.interval_s, t.timeout_s, dict(t.params)) == (
        "http://h:1/metrics", 0.25, 0.1, {"collect": ["a", "b"]})
    assert [format_duration(s) for s in (0, 15, 90, 3600, 86400 + 1.5)] == ["0s", "15s", "1m30s", "1h", "1d1s500ms"]
