"""The plain-text summaries that `python -m pipelines.flows` and `lorax train` print instead of a raw dict."""

from __future__ import annotations

from lorax.continual.summary import write_metrics
from pipelines.summary_table import format_result, format_stream, format_versions, table

V1 = {"version": 1, "tasks": ["deconv"], "aaf": 97.125, "gate": "passed", "gate_reason": "first version",
      "aliases": ["champion"]}
V2 = {"version": 2, "tasks": ["deconv", "nnconv"], "aaf": 88.5, "gate": "failed",
      "gate_reason": "AAF 88.50 < champion's 97.12 - 2.0", "aliases": [], "parent": 1, "gate_margin": -8.625}


def test_table_aligns_columns_under_a_rule() -> None:
    lines = table([{"a": 1.234, "b": None}, {"a": "long value", "b": ["x", "y"]}], ["a", "b"]).splitlines()
    assert lines == ["a           b", "----------  ---", "1.23        -", "long value  x,y"]


def test_versions_one_row_each_with_new_keys_as_columns_and_reasons_below() -> None:
    text = format_versions([V1, V2])
    head, rule, r1, r2, *reasons = text.splitlines()
    assert head.split() == ["version", "task", "tasks", "parent", "aaf", "gate", "aliases", "gate_margin"]
    assert r1.split() == ["1", "deconv", "1", "-", "97.12", "passed", "champion", "-"]
    assert r2.split() == ["2", "nnconv", "2", "1", "88.50", "failed", "-", "-8.62"]
    assert reasons == ["v1 gate passed: first version", "v2 gate failed: AAF 88.50 < champion's 97.12 - 2.0"]
    assert "{" not in text


def test_continual_flow_result_shows_versions_matrix_and_headline(tmp_path) -> None:
    metrics = {"method": "lorax", "aa": 90.0, "aaf": 88.5, "bwt": -3.0, "binary_acc": 95.25, "n_tasks": 2,
               "tasks": ["deconv", "nnconv"], "acc_matrix": [[97.0, 94.0], [None, 83.0]],
               "trainable_params_per_task": [10, 20], "backbone_params": 1000}
    path = tmp_path / "metrics.json"
    write_metrics(path, metrics)
    text = format_result({"metrics": str(path), "versions": [V1, V2]})
    assert text.startswith(format_versions([V1, V2]))
    assert "accuracy matrix R[i, j]" in text and ["deconv", "97.0", "94.0"] in [r.split() for r in text.splitlines()]
    assert "\naaf         88.50\n" in text and "binary_acc  95.25" in text and "acc_matrix " not in text
    assert text.endswith(f"metrics: {path}")
    assert format_stream(metrics) in text


def test_new_watch_and_detect_results_read_as_text() -> None:
    new = {"task": "nnconv", "base": ["deconv"], "quarantined": 0, **V2}
    assert format_result(new).splitlines()[2].split()[:3] == ["2", "nnconv", "2"]
    assert format_result({"task": "deconv", "skipped": "in champion", "version": 1}) == \
        "deconv: skipped (in champion, v1)"
    watch = format_result({"trained": [new], "scan": {"n_images": 40, "n_flagged": 3, "candidates": [{"name": "c1"}],
                                                      "out": "reports/scan/x"}})
    assert "nnconv" in watch and watch.endswith("inbox scan: 40 images, 3 flagged as unknown generator, "
                                                "candidates c1 -> reports/scan/x")
    assert format_result({"trained": []}) == "watch: no new task folder learned"
    det = format_result({"detect": {"method": "mole", "train_tasks": ["a", "b"], "map": 93.456, "threshold": 0.5,
                                    "mlflow_run_id": "abc"},
                         "version": {"name": "lorax-detector", "version": 3, "seen_map": 95.0, "gate": "passed",
                                     "gate_reason": "AP 95.00 >= 90.0", "aliases": ["champion"]}})
    assert "93.46" in det and "a,b" in det and "v3 gate passed: AP 95.00 >= 90.0" in det
    assert not any(c in det for c in "{}'"), det  # plain values: no dict printed as is
