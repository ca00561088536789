import numpy as np
import pytest

from atlasfl.data.metrics import compute_metrics, majority_baseline
from atlasfl.data.tasks import GLUE_TASKS


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
