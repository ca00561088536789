"""A run's summary: scores side by side, references, and the round early stopping reports."""

from __future__ import annotations

import pytest

from atlasfl.report.summary import average_val, best_evaluation, stop_early, summarize


def _row(task: str, val: float | None, local: float = 0.5, glob: float = 0.4) -> dict:
    row = {"task": task, "local_metric": local, "global_metric": glob}
    return row | ({} if val is None else {"val_metric": val})


def test_average_val_is_the_mean_over_tasks_of_the_clients_mean():
    rows = [_row("a", 0.2), _row("a", 0.4), _row("b", 0.9)]
    assert average_val(rows) == pytest.approx((0.3 + 0.9) / 2)  # not (0.2 + 0.4 + 0.9) / 3
    assert average_val([_row("a", 0.2), _row("b", None)]) is None  # a client without scores


def test_the_best_evaluation_is_chosen_on_validation_and_ties_keep_the_earliest():
    history = [[_row("a", None)],  # not evaluated
               [_row("a", 0.5, local=0.1)],
               [_row("a", 0.7, local=0.0, glob=0.0)],  # best on validation, worst on test
               [_row("a", 0.7, local=0.9, glob=0.9)],  # a tie: the earlier stays
               [_row("a", 0.6, local=1.0, glob=1.0)]]
    assert best_evaluation(history) == 2
    assert best_evaluation([[_row("a", None)]]) is None


@pytest.mark.parametrize("patience, stops", [(0, False), (1, True), (2, True), (3, False)])
def test_stop_early_counts_the_evaluations_since_the_best(patience, stops):
    # best at index 1; then two evaluated rounds and one that was not evaluated
    history = [[_row("a", 0.1)], [_row("a", 0.8)], [_row("a", None)], [_row("a", 0.5)],
               [_row("a", 0.8)]]
    assert stop_early(history, patience) is stops


def test_summary_keeps_local_and_global_apart_and_averages_accuracy_over_tasks_with_it():
    rows = [{"task": "sst2", "local_metric": 0.9, "local_accuracy": 0.9, "global_metric": 0.8,
             "global_accuracy": 0.8, "val_metric": 0.7},
            {"task": "sst2", "local_metric": 0.7, "local_accuracy": 0.7, "global_metric": 0.6,
             "global_accuracy": 0.6, "val_metric": 0.5},
            {"task": "stsb", "local_metric": 0.3, "global_metric": 0.2, "val_metric": 0.1},
            {"task": "stsb"}]  # a client whose evaluation failed: left out
    refs = {t: {"majority": {"global_metric": 0.5}, "own_majority": {"local_metric": 0.6}}
            for t in ("sst2", "stsb")}
    out = summarize(rows, refs, {"sst2": "accuracy", "stsb": "pearson"})
    assert out["tasks"]["sst2"] == pytest.approx({
        "clients": 2, "metric_name": "accuracy", "local_metric": 0.8, "local_accuracy": 0.8,
        "global_metric": 0.7, "global_accuracy": 0.7, "val_metric": 0.6})
    assert out["tasks"]["stsb"]["clients"] == 1
    assert out["average"] == pytest.approx({"local_metric": 0.55, "global_metric": 0.45,
                                            "val_metric": 0.35, "local_accuracy": 0.8,
                                            "global_accuracy": 0.7})
    assert out["references"]["majority"]["average"] == {"global_metric": 0.5}
    assert out["references"]["own_majority"]["tasks"]["stsb"] == {"local_metric": 0.6}
