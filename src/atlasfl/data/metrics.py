"""GLUE metrics, computed with scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from atlasfl.data.tasks import TaskSpec


def _safe_corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:  # constant predictions: correlation undefined
        return 0.0
    return float(fn(a, b)[0])


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    a, b = a - np.average(a, weights=w), b - np.average(b, weights=w)
    var_a, var_b = np.average(a * a, weights=w), np.average(b * b, weights=w)
    if var_a <= 0 or var_b <= 0:
        return 0.0
    return float(np.average(a * b, weights=w) / np.sqrt(var_a * var_b))


def compute_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray, *,
                    weights: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of ``spec`` plus ``metric`` (the primary one) for predictions vs labels.

    Classification: ``predictions`` are class ids. Regression: predicted scores. ``weights``
    (one per row, >= 0) weigh the rows as scikit-learn's ``sample_weight`` does; Pearson is the
    weighted correlation and Spearman the weighted correlation of the (unweighted) ranks.
    """
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions, sample_weight=weights))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0,
                                       sample_weight=weights))
        elif name == "mcc":
            mcc = float(matthews_corrcoef(labels, predictions, sample_weight=weights))
            # undefined (a constant prediction or label) is 0, as scikit-learn says unweighted;
            # with float weights its zero test can miss by rounding and give NaN
            out[name] = mcc if math.isfinite(mcc) else 0.0
        elif name == "pearson":
            out[name] = (_safe_corr(stats.pearsonr, predictions, labels) if weights is None
                         else _weighted_pearson(predictions, labels, weights))
        elif name == "spearman":
            out[name] = (_safe_corr(stats.spearmanr, predictions, labels) if weights is None
                         else _weighted_pearson(stats.rankdata(predictions),
                                                stats.rankdata(labels), weights))
    if not spec.is_regression and "accuracy" not in out:
        out["accuracy"] = float(accuracy_score(labels, predictions, sample_weight=weights))
    out["metric"] = out[spec.primary_metric]
    return out


def label_mix_weights(spec: TaskSpec, own_labels: np.ndarray, test_labels: np.ndarray, *,
                      num_bins: int = 5) -> np.ndarray | None:
    """Row weights that give the test rows a client's own label mix: p_own(c) / p_test(c).

    The shared test rows of a task follow the task's label mix; a client of a label-skewed
    partition (``data.partition: dirichlet``) meets its own. Weighted by these, accuracy is
    sum_c p_own(c) * accuracy on class c: the expected accuracy on fresh rows drawn like the
    client's, from the same predictions (importance weighting under label shift). Regression
    scores are binned at the test rows' quantiles (``num_bins``), as the partition bins them.
    None if the client's labels fall in no class the test rows have.
    """
    if spec.is_regression:
        edges = np.quantile(test_labels, np.linspace(0, 1, num_bins + 1)[1:-1])
        own, test, size = np.digitize(own_labels, edges), np.digitize(test_labels, edges), num_bins
    else:
        own, test, size = own_labels.astype(int), test_labels.astype(int), spec.num_labels
    p_own = np.bincount(own, minlength=size) / len(own)
    p_test = np.bincount(test, minlength=size) / len(test)
    ratio = np.divide(p_own, p_test, out=np.zeros(size), where=p_test > 0)
    weights = ratio[test]
    return weights if weights.sum() > 0 else None


def majority_baseline(spec: TaskSpec, train_labels: np.ndarray, test_labels: np.ndarray
                      ) -> dict[str, float]:
    """Metrics of always predicting the training majority class (mean score for regression)."""
    if spec.is_regression:
        constant = np.full(len(test_labels), float(np.mean(train_labels)))
    else:
        majority = int(np.bincount(train_labels, minlength=spec.num_labels).argmax())
        constant = np.full(len(test_labels), majority)
    return compute_metrics(spec, constant, test_labels)
