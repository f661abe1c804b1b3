"""Target labels and metric relabeling on a Scrape (per label set / per series, not per sample)."""

from __future__ import annotations

import dcgmrelay
from dcgmrelay.relabel import compile_rules

BODY = (b'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a",pod="train-1"} 40\n'
        b'DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-b"} 41\n'
        b'DCGM_FI_DEV_ENC_UTIL{gpu="0",UUID="GPU-a",pod="train-1"} 0\n'
        b'DCGM_FI_DEV_POWER_USAGE{gpu="1",UUID="GPU-b"} 70.5\n')


def test_with_labels_honours_exporter_labels_by_default():
    s = dcgmrelay.parse(BODY).with_labels({"job": "dcgm", "instance": "n0:9400", "pod": "exporter-x"})
    assert s.labels(0) == {"gpu": "0", "UUID": "GPU-a", "pod": "train-1", "job": "dcgm", "instance": "n0:9400"}
    assert s.labels(1) == {"gpu": "1", "UUID": "GPU-b", "pod": "exporter-x", "job": "dcgm", "instance": "n0:9400"}
    assert s.values.tolist() == [40.0, 41.0, 0.0, 70.5]


def test_with_labels_without_honour_renames_like_prometheus():
    s = dcgmrelay.parse(BODY).with_labels({"pod": "exporter-x"}, honor_labels=False)
    assert s.labels(0) == {"gpu": "0", "UUID": "GPU-a", "exported_pod": "train-1", "pod": "exporter-x"}


def test_relabeled_drops_renames_and_keeps_columns_aligned():
    rules = compile_rules([
        {"action": "drop", "source_labels": ["__name__"], "regex": "DCGM_FI_DEV_ENC_UTIL"},
        {"action": "replace", "source_labels": ["__name__"], "regex": "DCGM_FI_DEV_(.*)",
         "target_label": "__name__", "replacement": "gpu_${1}"},
        {"action": "labeldrop", "regex": "pod"},
    ])
    s = dcgmrelay.parse(BODY).relabeled(rules)
    assert list(s.samples()) == [
        ("gpu_GPU_TEMP", {"UUID": "GPU-a", "gpu": "0"}, 40.0, None),
        ("gpu_GPU_TEMP", {"UUID": "GPU-b", "gpu": "1"}, 41.0, None),
        ("gpu_POWER_USAGE", {"UUID": "GPU-b", "gpu": "1"}, 70.5, None),
    ]
    assert s.field_ids.tolist() == [-1, -1, -1]  # renamed away from DCGM names
    assert [e.uuid for e in s.entities] == ["GPU-a", "GPU-b"]
