"""Evaluation scores predictions in row order, and the loss is the task's, by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from atlasfl.client.training import evaluate
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.tasks import GLUE_TASKS
from atlasfl.models.head import ClassificationHead


class FirstTokenModel(nn.Module):
    """A stand-in backbone whose hidden state at every position is (1 - p, p), p = the first
    token's parity: through an identity head, row i's prediction is known in advance."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        parity = (input_ids[:, :1] % 2).float().expand(-1, input_ids.shape[1])  # (B, T)
        return SimpleNamespace(last_hidden_state=torch.stack([1 - parity, parity], -1))


class NoBinder:
    def bind(self, params):
        pass


def _identity_head(outputs: int, hidden: int = 2) -> ClassificationHead:
    head = ClassificationHead(hidden, outputs, pooling="cls", dropout=0.0)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(outputs, hidden))
        head.out.bias.zero_()
    return head


# Rows of lengths 1, 3, 2, 4: the length order (0, 2, 1, 3) differs from the row order.
ROWS = [[5], [2, 9, 9], [3, 1], [4, 4, 4, 4]]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_classification_predictions_are_scored_in_row_order(batch_size):
    labels = np.array([1, 0, 1, 0])  # = each row's first-token parity: every row is right
    data = TokenizedSet(ROWS, None, labels, pad_id=0)
    cfg = TrainConfig(eval_batch_size=batch_size, precision="fp32")
    out = evaluate(FirstTokenModel(), NoBinder(), {}, _identity_head(2), data,
                   GLUE_TASKS["cola"], cfg, device=torch.device("cpu")).metrics()
    assert out["accuracy"] == 1.0 and out["mcc"] == pytest.approx(1.0)
    # logits (0, 1) or (1, 0) for the right class: cross-entropy log(1 + e^-1) on every row
    assert out["loss"] == pytest.approx(math.log(1 + math.exp(-1)))


def test_regression_predictions_are_scored_in_row_order():
    # one output: the first token's parity, as a score; labels follow it exactly but for row 3
    labels = np.array([1.0, 0.0, 1.0, 0.5])
    data = TokenizedSet(ROWS, None, labels, pad_id=0)
    head = ClassificationHead(2, 1, pooling="cls", dropout=0.0)
    with torch.no_grad():
        head.out.weight.copy_(torch.tensor([[0.0, 1.0]]))
        head.out.bias.zero_()
    out = evaluate(FirstTokenModel(), NoBinder(), {}, head, data, GLUE_TASKS["stsb"],
                   TrainConfig(eval_batch_size=2, precision="fp32"),
                   device=torch.device("cpu")).metrics()
    preds = np.array([1.0, 0.0, 1.0, 0.0])
    assert out["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    assert out["loss"] == pytest.approx(np.mean((preds - labels) ** 2))  # MSE: 0.25 / 4


def test_an_empty_split_has_no_metrics():
    data = TokenizedSet([], None, np.array([], dtype=np.int64), pad_id=0)
    assert evaluate(FirstTokenModel(), NoBinder(), {}, _identity_head(2), data,
                    GLUE_TASKS["sst2"], TrainConfig(), device=torch.device("cpu")) is None


@pytest.mark.parametrize("method, extra", [
    ("fedavg-task", {}),
    ("fedavg-task", {"train.batch_clients": 2}),
    ("splitlora", {"split.cut": "1", "split.min_cut": 0, "ranks.aggregation": "zero-pad"}),
])
def test_clients_hold_no_gradients_between_rounds(tiny_cfg, method, extra):
    # a resident client keeps adapter, head and AdamW state; its last step's gradients are not
    # state, and holding them would cost a copy of the adapter and head per client
    from atlasfl.engine import build_experiment, run_experiment

    exp = build_experiment(tiny_cfg(method=method, **extra))
    run_experiment(exp)
    params = [(cid, name, p) for cid, c in exp.clients.items()
              for name, p in [*c.adapter.items(), *c.head.named_parameters()]]
    assert any(c.optimizer.state for c in exp.clients.values())  # the clients did train
    assert [(cid, name) for cid, name, p in params if p.grad is not None] == []
