"""Messages <-> Flower records: hand-built payloads come back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord  # noqa: E402

from atlasfl.engine.flower.records import (  # noqa: E402
    message_type,
    payload_to_records,
    plan_from_content,
    records_to_payload,
    records_to_state,
    reply_from_content,
    state_to_records,
    to_content,
)
from atlasfl.errors import AtlasError  # noqa: E402
from atlasfl.messages import (  # noqa: E402
    Evaluate,
    EvaluateReply,
    FingerprintSpec,
    ImportanceSpec,
    Model,
    Probe,
    ProbeReply,
    SplitPlan,
    Train,
    TrainReply,
    Update,
)


def _bits(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for kind in a:
        assert sorted(a[kind]) == sorted(b[kind])
        for name in a[kind]:
            x, y = a[kind][name], b[kind][name]
            assert x.dtype == y.dtype and x.shape == y.shape
            assert _bits(x) == _bits(y), (kind, name)


def test_payload_round_trip_is_bit_exact_for_bf16_fp32_int_and_empty_kinds():
    # values chosen to stress bits: a NaN payload, -0.0, subnormal, the largest bf16
    bf16 = torch.tensor([[1.0, -0.0], [float("nan"), 3.3895e38]], dtype=torch.bfloat16)
    odd = torch.tensor([1e-40, -2.5, float("inf")], dtype=torch.float32)
    payload = {"adapter": {"m.lora_A.weight": bf16, "m.lora_B.weight": odd},
               "rank_plan": {"m": torch.tensor(4, dtype=torch.int32)},
               "head": {}}
    arrays, config = payload_to_records(payload)
    assert sorted(arrays) == ["adapter/m.lora_A.weight", "adapter/m.lora_B.weight",
                              "rank_plan/m"]
    assert config["dtype/adapter/m.lora_A.weight"] == "bfloat16"
    assert "dtype/adapter/m.lora_B.weight" not in config  # NumPy carries float32 itself
    back = records_to_payload(arrays, config)
    _same(payload, back)
    assert back["head"] == {}
    assert back["rank_plan"]["m"].shape == ()  # 0-d stays 0-d
    assert records_to_payload(*payload_to_records({})) == {}
    # every record can be sized (flwr's count_bytes fails on an empty list)
    assert arrays.count_bytes() > 0 and config.count_bytes() > 0
    assert all(r.count_bytes() >= 0 for r in to_content(Probe(1)).values())
    assert _bits(back["adapter"]["m.lora_A.weight"]) == _bits(bf16)


def test_unknown_dtype_note_names_the_key_and_the_allowed_values():
    arrays, config = payload_to_records({"adapter": {"w": torch.zeros(2, dtype=torch.int16)}})
    config["dtype/adapter/w"] = "float8"
    with pytest.raises(AtlasError, match=r"dtype/adapter/w = 'float8'.*bfloat16"):
        records_to_payload(arrays, config)


def test_array_of_an_undeclared_kind_is_refused():
    arrays, _ = payload_to_records({"adapter": {"w": torch.zeros(2)}})
    with pytest.raises(AtlasError, match="kind 'adapter'"):
        records_to_payload(arrays, ConfigRecord({"kinds": "head"}))


def test_plans_round_trip_with_their_settings_and_model():
    model = Model(ranks={"m": 3}, adapter={"m.lora_A.weight": torch.randn(3, 4)},
                  head={"out.weight": torch.randn(2, 4, dtype=torch.bfloat16)})
    split = SplitPlan(cut=1, tail=0, activation_dtype="bf16", server_model="g0", outputs=2,
                      version=3)
    fp = FingerprintSpec(samples=8, batch_size=4, layers=2, params="lora", statistic="fisher",
                         dim=16, epsilon=None, delta=1e-5, clip=1.0)
    imp = ImportanceSpec(kind="spectrum", samples=8, top=4, batch_size=4)
    plans = [Train(5, model, epochs=2, steps=7, upload=False, split=split, shares="lora_A",
                   proximal=0.25),
             Evaluate(1, Model(adapter={"x": torch.ones(1)})),
             Probe(2, fp, imp), Probe(3, None, imp)]
    types = ["train", "evaluate", "query.fingerprint", "query.importance"]
    for plan, kind in zip(plans, types, strict=True):
        assert message_type(plan) == kind
        back = plan_from_content(kind, to_content(plan))
        assert type(back) is type(plan)
        assert {f: getattr(back, f) for f in ("client_id", "split", "fingerprint", "importance",
                                              "epochs", "steps", "upload", "shares", "proximal")
                if hasattr(plan, f)} == \
            {f: getattr(plan, f) for f in ("client_id", "split", "fingerprint", "importance",
                                           "epochs", "steps", "upload", "shares", "proximal")
             if hasattr(plan, f)}
        _same(plan.payload(), back.payload())
    assert plan_from_content("train", to_content(plans[0])).model.ranks == {"m": 3}


def test_replies_round_trip_with_record_update_and_probe_results():
    update = Update(4, {"a": torch.randn(2, 3)}, {"out.bias": torch.zeros(2)}, num_examples=18)
    train = TrainReply(4, update, {"trained": True, "train_loss": np.float32(0.25), "steps": 3,
                                   "cut": 2}, seconds=1.5)
    back = reply_from_content("train", to_content(train))
    assert back.record == {"trained": True, "train_loss": 0.25, "steps": 3, "cut": 2}
    assert back.seconds == 1.5 and back.delivered
    assert back.update.num_examples == 18 and back.update.client_id == 4
    _same(train.payload(), back.payload())
    dropped = TrainReply(2, None, {"trained": False, "dropped": "gone"}, delivered=False)
    back = reply_from_content("train", to_content(dropped))
    assert back.update is None and not back.delivered and back.record["dropped"] == "gone"
    probe = ProbeReply(1, np.array([0.5, -1.25], dtype=np.float32), 0.125,
                       {"m1": 2.0, "m2": [3.0, 1.0]}, {"probe_loss": 0.5}, 0.25)
    back = reply_from_content("probe", to_content(probe))
    assert back.fingerprint.tolist() == [0.5, -1.25] and back.noise_var == 0.125
    assert back.importance == {"m1": 2.0, "m2": [3.0, 1.0]}
    assert back.record == {"probe_loss": 0.5}
    ev = EvaluateReply(3, {"global_metric": 0.75, "local_metric": 0.5, "unchanged": 1.0}, 0.5)
    assert reply_from_content("evaluate", to_content(ev)) == ev


def test_record_value_that_is_no_scalar_names_the_key():
    with pytest.raises(AtlasError, match="'confusion'.*allowed: bool, int, float, str"):
        to_content(EvaluateReply(0, {"confusion": [1, 2]}))


def test_client_state_round_trip_keeps_tensors_and_meta():
    tensors = {"adapter/m.lora_A.weight": torch.randn(2, 2), "opt/0/step": torch.tensor(3.0)}
    meta = {"param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0]}],
            "state": {"0": {"step": None}}, "scored": "abc"}
    t, m = records_to_state(*state_to_records(tensors, meta))
    assert m == meta
    assert all(_bits(t[k]) == _bits(v) for k, v in tensors.items())
