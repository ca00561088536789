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


def test_label_mix_weights_make_accuracy_the_own_mix_of_class_accuracies():
    from atlasfl.data.metrics import label_mix_weights
    spec = GLUE_TASKS["sst2"]
    test_labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # the task's mix: half and half
    preds = np.array([0, 0, 0, 1, 1, 0, 0, 0])  # class 0: 3/4 right, class 1: 1/4 right
    own = np.array([1, 1, 1, 0])  # this client's rows: 1/4 class 0, 3/4 class 1
    weights = label_mix_weights(spec, own, test_labels)
    # p_own / p_test: class 0 -> (1/4)/(1/2) = 1/2, class 1 -> (3/4)/(1/2) = 3/2
    np.testing.assert_allclose(weights, [0.5] * 4 + [1.5] * 4)
    m = compute_metrics(spec, preds, test_labels, weights=weights)
    assert m["accuracy"] == pytest.approx(0.25 * 0.75 + 0.75 * 0.25)
    assert compute_metrics(spec, preds, test_labels)["accuracy"] == 0.5  # unweighted: the task
    # a client with only class 1 counts only class-1 rows; one whose classes the test lacks: None
    assert compute_metrics(spec, preds, test_labels,
                           weights=label_mix_weights(spec, np.array([1, 1]), test_labels)
                           )["accuracy"] == pytest.approx(0.25)
    assert label_mix_weights(spec, np.array([1]), np.array([0, 0])) is None


def test_weighted_metrics_equal_the_metrics_of_repeated_rows():
    from atlasfl.data.metrics import label_mix_weights
    labels = np.array([1, 1, 0, 0, 1])
    preds = np.array([1, 0, 0, 1, 1])
    counts = np.array([2, 1, 3, 1, 2])  # integer weights = rows repeated that often
    for task in ("mrpc", "cola"):
        weighted = compute_metrics(GLUE_TASKS[task], preds, labels, weights=counts.astype(float))
        repeated = compute_metrics(GLUE_TASKS[task], np.repeat(preds, counts),
                                   np.repeat(labels, counts))
        assert weighted == pytest.approx(repeated)
    scores = np.array([0.1, 2.0, 1.5, 3.9, 4.4])
    gold = np.array([0.0, 2.5, 1.0, 4.0, 3.0])
    weighted = compute_metrics(GLUE_TASKS["stsb"], scores, gold, weights=counts.astype(float))
    assert weighted["pearson"] == pytest.approx(
        np.corrcoef(np.repeat(scores, counts), np.repeat(gold, counts))[0, 1])
    # regression weights bin the scores at the test rows' quantiles (5 bins: one row each here)
    weights = label_mix_weights(GLUE_TASKS["stsb"], np.array([4.0, 4.1]), gold)
    assert weights is not None and weights.sum() == pytest.approx(5.0)
    assert np.count_nonzero(weights) == 1 and weights[np.argmax(gold)] == pytest.approx(5.0)


def test_a_constant_prediction_has_weighted_mcc_0_not_nan():
    # scikit-learn's zero test misses by rounding for these float weights and returns NaN
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1,
                       1, 1, 0, 0, 1])
    weights = np.array([0.0, 0.6772250913811823, 0.4661053601182982, 0.0, 0.6392056567399602,
                        0.0, 0.0, 0.4232012457336759, 0.667269780506526, 0.892124516647265,
                        0.03920532692151002, 0.0, 0.0, 0.0, 0.3688955395370517,
                        0.9962864662850552, 0.7502265933699976, 0.0, 0.6883936993913492,
                        0.14994414258337152, 0.0, 0.11615110618872104, 0.3628876680247494,
                        0.2882849316778322, 0.0, 0.8163747123561405, 0.9048174020352262,
                        0.32307219176499224, 0.10635250826982479, 0.6021768352555054])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = compute_metrics(GLUE_TASKS["cola"], np.zeros(30, dtype=int), labels, weights=weights)
    assert m["mcc"] == 0.0 and m["metric"] == 0.0
