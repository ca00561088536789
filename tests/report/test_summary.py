"""A run's summary: scores side by side, references, and the round early stopping reports."""

from __future__ import annotations

import pytest

from atlasfl.summary import best_rows, reported_rows, stop_early, summarize


def _row(client: int, val: float | None, local: float = 0.5, glob: float = 0.4) -> dict:
    row = {"client": client, "task": "a", "local_metric": local, "global_metric": glob}
    return row | ({} if val is None else {"val_metric": val})


def test_each_clients_best_evaluation_is_chosen_on_validation_and_ties_keep_the_earliest():
    history = [[_row(0, None), _row(1, None)],  # not evaluated
               [_row(0, 0.5, local=0.1), _row(1, 0.9)],
               [_row(0, 0.7, local=0.0, glob=0.0), _row(1, 0.2)],  # 0: best val, worst test
               [_row(0, 0.7, local=0.9, glob=0.9), _row(1, 0.9)],  # ties: the earlier stays
               [_row(0, 0.6, local=1.0, glob=1.0), _row(1, None)]]
    assert best_rows(history) == {0: 2, 1: 1}
    assert best_rows([[_row(0, None)]]) == {}
    rows, rounds = reported_rows(history, patience=1)
    assert rounds == {0: 3, 1: 2} and rows == [history[2][0], history[1][1]]
    rows, rounds = reported_rows(history, patience=0)  # no early stopping: the last round
    assert rounds == {0: 5, 1: 5} and rows == history[4]


@pytest.mark.parametrize("patience, stops", [(0, False), (1, True), (2, True), (3, False)])
def test_the_run_stops_when_every_client_has_gone_patience_evaluations_without_a_better_one(
        patience, stops):
    # client 0: best at index 1, then evaluated at 3 and 4 (2 since); client 1: best at 3,
    # then evaluated at 4 and 5 (2 since); an unevaluated round counts for no one
    history = [[_row(0, 0.1), _row(1, 0.1)], [_row(0, 0.8), _row(1, 0.2)],
               [_row(0, None), _row(1, None)], [_row(0, 0.5), _row(1, 0.9)],
               [_row(0, 0.8), _row(1, 0.3)], [_row(0, None), _row(1, 0.4)]]
    assert stop_early(history, patience) is stops
    assert stop_early(history[:5], 2) is False  # client 1 has had one evaluation since its best


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
