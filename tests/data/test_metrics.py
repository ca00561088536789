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


def test_references_by_hand_task_majority_and_each_clients_own():
    from atlasfl.data.metrics import reference_scores
    spec = GLUE_TASKS["sst2"]
    # client 0 trains on 1,1,1,0 (own majority 1), client 1 on 0,0,0 (own majority 0);
    # together 3 ones and 4 zeros: the task's majority class is 0
    train = [np.array([1, 1, 1, 0]), np.array([0, 0, 0])]
    local = [np.array([1, 1, 0]), np.array([0, 1])]  # each client's local test labels
    shared = np.array([0, 0, 1, 1, 1])
    refs = reference_scores(spec, train, local, shared)
    # task majority (0): shared 2/5; local: client 0 1/3, client 1 1/2 -> mean 5/12
    assert refs["majority"] == pytest.approx({"global_metric": 0.4, "global_accuracy": 0.4,
                                              "local_metric": 5 / 12, "local_accuracy": 5 / 12})
    # own majorities (1 and 0): shared 3/5 and 2/5 -> 1/2; local 2/3 and 1/2 -> 7/12
    assert refs["own_majority"] == pytest.approx({"global_metric": 0.5, "global_accuracy": 0.5,
                                                  "local_metric": 7 / 12,
                                                  "local_accuracy": 7 / 12})


def test_references_of_a_correlation_task_are_zero_and_a_client_without_rows_is_skipped():
    from atlasfl.data.metrics import reference_scores
    refs = reference_scores(GLUE_TASKS["cola"], [np.array([1, 1, 0]), np.array([0])],
                            [np.array([1, 0]), np.array([], dtype=np.int64)], np.array([0, 1]))
    # a constant prediction has MCC 0; only client 0 has local rows: accuracy 1/2 for class 1
    assert refs["own_majority"]["local_metric"] == 0.0
    assert refs["own_majority"]["local_accuracy"] == 0.5
    assert refs["majority"]["global_accuracy"] == 0.5


def test_references_without_any_local_rows_have_only_global_scores():
    from atlasfl.data.metrics import reference_scores
    refs = reference_scores(GLUE_TASKS["sst2"], [np.array([1, 1, 0]), np.array([0, 0])],
                            [np.array([], dtype=np.int64)] * 2, np.array([0, 1, 1, 1]))
    # pooled training labels 1, 1, 0, 0, 0: class 0, right on 1 of the 4 shared rows; no local
    # keys, as no client has local rows
    assert refs["majority"] == {"global_metric": 0.25, "global_accuracy": 0.25}
    # each client's own: client 0 predicts 1 (3 of 4 right), client 1 predicts 0 (1 of 4)
    assert refs["own_majority"] == {"global_metric": 0.5, "global_accuracy": 0.5}


def test_mcc_of_a_constant_prediction_is_zero():
    m = compute_metrics(GLUE_TASKS["cola"], np.array([1, 1, 1, 1]), np.array([1, 0, 1, 0]))
    assert m["mcc"] == 0.0 and m["metric"] == 0.0 and m["accuracy"] == 0.5
