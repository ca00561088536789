import warnings

import numpy as np
import pytest

from atlasfl.data.metrics import compute_metrics, majority_baseline
from atlasfl.data.tasks import GLUE_TASKS, TaskSpec


def test_classification_metrics_by_hand():
    labels = np.array([1, 1, 0, 0])
    preds = np.array([1, 0, 0, 0])
    m = compute_metrics(GLUE_TASKS["mrpc"], preds, labels)
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 1, recall 1/2
    assert m["metric"] == m["f1"]
    cola = compute_metrics(GLUE_TASKS["cola"], preds, labels)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (1*2 - 0) / sqrt(1*2*2*3)
    assert cola["mcc"] == pytest.approx(2 / np.sqrt(12))


def test_regression_metrics_and_constant_prediction():
    spec = GLUE_TASKS["stsb"]
    labels = np.array([0.0, 1.0, 2.0, 4.0])
    m = compute_metrics(spec, labels * 2 + 1, labels)
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert majority_baseline(spec, labels, labels)["pearson"] == 0.0


def test_majority_baseline_uses_training_majority():
    spec = GLUE_TASKS["sst2"]
    out = majority_baseline(spec, np.array([1, 1, 0]), np.array([0, 0, 0, 1]))
    assert out["accuracy"] == 0.25


def test_accuracy_is_always_reported_for_classification():
    # a task scored by F1 alone still reports accuracy: 3 of 4 right
    spec = TaskSpec("toy", ("text",), "label", 2, ("0", "1"), ("f1",), "train.tsv", "dev.tsv")
    m = compute_metrics(spec, np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0]))
    assert m == pytest.approx({"f1": 2 / 3, "accuracy": 0.75, "metric": 2 / 3})
    assert "accuracy" not in compute_metrics(GLUE_TASKS["stsb"], np.array([0.0, 1.0]),
                                             np.array([1.0, 2.0]))


def test_f1_without_any_positive_is_zero_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's zero-division warning would be an error here
        m = compute_metrics(GLUE_TASKS["mrpc"], np.array([0, 0, 0]), np.array([0, 0, 0]))
    assert m["f1"] == 0.0 and m["accuracy"] == 1.0


def test_correlation_with_constant_labels_is_zero():
    spec = GLUE_TASKS["stsb"]
    m = compute_metrics(spec, np.array([0.0, 1.0, 2.0]), np.array([3.0, 3.0, 3.0]))
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0 and m["metric"] == 0.0
