from atlasfl.engine import build_experiment


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
