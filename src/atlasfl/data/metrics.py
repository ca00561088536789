"""GLUE metrics, computed with scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from atlasfl.data.tasks import TaskSpec


def _safe_corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:  # constant predictions: correlation undefined
        return 0.0
    return float(fn(a, b)[0])


def compute_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray
                    ) -> dict[str, float]:
    """Every metric of ``spec`` plus ``metric`` (the primary one) for predictions vs labels.

    Classification: ``predictions`` are class ids. Regression: predicted scores.
    """
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = _safe_corr(stats.pearsonr, predictions, labels)
        elif name == "spearman":
            out[name] = _safe_corr(stats.spearmanr, predictions, labels)
    if not spec.is_regression and "accuracy" not in out:
        out["accuracy"] = float(accuracy_score(labels, predictions))
    out["metric"] = out[spec.primary_metric]
    return out


def majority_baseline(spec: TaskSpec, train_labels: np.ndarray, test_labels: np.ndarray
                      ) -> dict[str, float]:
    """Metrics of always predicting the training majority class (mean score for regression)."""
    if spec.is_regression:
        constant = np.full(len(test_labels), float(np.mean(train_labels)))
    else:
        majority = int(np.bincount(train_labels, minlength=spec.num_labels).argmax())
        constant = np.full(len(test_labels), majority)
    return compute_metrics(spec, constant, test_labels)
