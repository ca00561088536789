import pytest

from atlasfl.engine import build_experiment
from atlasfl.errors import AtlasError


def test_clients_own_only_adapter_head_and_optimizer_state(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="local", **{"federation.rounds": 1}))
    backbone_ptrs = {p.data_ptr() for n, p in exp.model.named_parameters() if "lora_" not in n}
    adapter_numel = sum(v.numel() for v in exp.initial_adapter.values())
    for client in exp.clients.values():
        owned = list(client.adapter.values()) + list(client.head.parameters())
        assert not {t.data_ptr() for t in owned} & backbone_ptrs
        assert sum(p.numel() for p in client.adapter.values()) == adapter_numel
    # every client's tensors are its own: no two clients alias memory
    ptrs = [p.data_ptr() for c in exp.clients.values() for p in c.adapter.values()]
    assert len(ptrs) == len(set(ptrs))
    backbone_numel = sum(p.numel() for n, p in exp.model.named_parameters() if "lora_" not in n)
    assert adapter_numel < backbone_numel / 10


def test_task_samples_give_one_task_more_rows_and_leave_the_others_as_they_were(tiny_cfg):
    def train_rows(**dotted):
        exp = build_experiment(tiny_cfg(method="local", **dotted))
        return {task: sorted(c.num_examples for c in exp.strategy.clients.values()
                             if c.task == task) for task in ("cola", "mrpc")}

    # 32 rows a client: 8 validation (25%), 6 local test (20%), 18 to train; 48: 12, 10, 26
    assert train_rows() == {"cola": [18, 18], "mrpc": [18, 18]}
    assert train_rows(**{"data.task_samples": {"cola": 48}}) == {"cola": [26, 26],
                                                                 "mrpc": [18, 18]}
    # a task the run leaves out may keep its count; a misspelt one is named
    assert train_rows(**{"data.task_samples": {"rte": 48}}) == {"cola": [18, 18], "mrpc": [18, 18]}
    with pytest.raises(AtlasError, match="task_samples: unknown task 'colaa'; did you mean cola"):
        train_rows(**{"data.task_samples": {"colaa": 48}})
