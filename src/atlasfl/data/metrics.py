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
    if not spec.is_regression:  # every classification task reports accuracy
        out["accuracy"] = float(accuracy_score(labels, predictions))
    for name in spec.metrics:
        if name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name == "mcc":
            # undefined (a constant prediction or label) is 0.0, as scikit-learn returns it
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = _safe_corr(stats.pearsonr, predictions, labels)
        elif name == "spearman":
            out[name] = _safe_corr(stats.spearmanr, predictions, labels)
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


def reference_scores(spec: TaskSpec, client_train: list[np.ndarray],
                     client_local: list[np.ndarray], test_labels: np.ndarray
                     ) -> dict[str, dict[str, float]]:
    """What predicting a constant scores, the references every method must clear.

    ``majority``: the task's majority class (of every client's training labels together); its
    ``global_*`` metrics on the shared test rows, its ``local_*`` metrics the mean over clients
    of those on each client's local test. ``own_majority``: each client predicts its own
    training majority class (under label skew a client's own test rows follow its own mix, so a
    personalised method must beat this, not the task's majority); global and local as above.
    Regression predicts the mean score instead of a class.

    Args:
        spec: the task.
        client_train: per client, the labels it trains on.
        client_local: per client, the labels of its local test (in the same order).
        test_labels: the task's shared test labels.
    """
    pooled = np.concatenate(client_train)
    out: dict[str, dict[str, float]] = {}
    for name, trains in (("majority", [pooled] * len(client_train)),
                         ("own_majority", client_train)):
        glob = [majority_baseline(spec, t, test_labels) for t in trains]
        local = [majority_baseline(spec, t, own) for t, own in zip(trains, client_local,
                                                                    strict=True) if len(own)]
        entry: dict[str, float] = {}
        for prefix, scores in (("global", glob), ("local", local)):
            for key in ("metric", "accuracy"):
                if scores and key in scores[0]:
                    entry[f"{prefix}_{key}"] = float(np.mean([m[key] for m in scores]))
        out[name] = entry
    return out
