"""The whole loop runs on every architecture family: encoder, GPT-2 and Llama decoders."""

import pytest
import torch

from atlasfl.engine import build_experiment, run_experiment


@pytest.mark.parametrize("model, pooling", [("tiny-bert", "mean"), ("tiny-gpt2", "last"),
                                            ("tiny-llama", "last")])
def test_fedavg_round_trains_and_evaluates_on_each_family(tiny_cfg, model, pooling):
    exp = build_experiment(tiny_cfg(**{"model.name": model, "model.pooling": "auto"}))
    assert next(iter(exp.clients.values())).head.pooling == pooling
    init = exp.initial_adapter
    summary = run_experiment(exp).summary
    assert set(summary["tasks"]) == {"cola", "mrpc"}
    state = exp.clients[0].adapter_state()
    assert any(not torch.equal(state[k], init[k]) for k in init)  # adapters were trained
