"""Messages of the round protocol as Flower records, and back: pure functions, no transport.

A plan or reply (``atlasfl.messages``) becomes a ``RecordDict`` of two records:

- ``arrays`` (``ArrayRecord``): every tensor of its ``payload()`` under the flat key
  ``<kind>/<name>`` (``adapter/<module>.lora_A.weight``, ``rank_plan/<module>``, ...). NumPy has
  no bfloat16, so a bf16 tensor travels as its bit pattern (an int16 view) and is viewed back:
  bit-exact, the same bytes on the wire.
- ``config`` (``ConfigRecord``): everything else under flat keys: ``client_id``, the plan's
  settings (``epochs``, ``split.cut``, ``fingerprint.samples``...), a reply's ``record.<key>``
  and ``seconds``, ``kinds`` (the payload's kinds, comma-separated: an empty kind survives) and
  ``dtype/<kind>/<name>`` = ``bfloat16`` for each tensor sent as its bit pattern.

The receiver rebuilds the message without tensors from the config and puts the payload back
with the message's own ``with_payload``: the message types define their payloads once.

A window of split messages (``atlasfl.client.split_training``: activations, gradients or logits of K
batches) travels as one message: message ``i``'s kinds become ``<i>.<kind>``, and
``window.count`` and ``window.<i>.type`` (``Activations``...) say what to rebuild. Such a window
is what a split client answers a ``train``/``evaluate`` plan with until its last, and what
the server sends back as ``train.split``/``evaluate.split`` (``SPLIT_TYPES``).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from atlasfl.errors import AtlasError
from atlasfl.messages import (
    Activations,
    Evaluate,
    EvaluateReply,
    FingerprintSpec,
    Gradients,
    ImportanceSpec,
    Logits,
    Payload,
    Plan,
    Probe,
    ProbeReply,
    Reply,
    SplitMessage,
    SplitPlan,
    Train,
    TrainReply,
    Update,
)

ARRAYS, CONFIG = "arrays", "config"
BITS = {torch.bfloat16: torch.int16}  # dtypes NumPy lacks -> the same-width integer view
_DTYPE_NAMES = {torch.bfloat16: "bfloat16"}
_FROM_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


# -- tensors ----------------------------------------------------------------------------------

def payload_to_records(payload: Payload) -> tuple[ArrayRecord, ConfigRecord]:
    """Tensors by kind and name -> an ``ArrayRecord`` with flat keys, and their dtype notes."""
    arrays = ArrayRecord()
    # one string, left out when empty: flwr 1.42's ConfigRecord.count_bytes fails on an empty
    # list or string
    config = ConfigRecord({"kinds": ",".join(sorted(payload))} if payload else {})
    for kind, tensors in payload.items():
        if "/" in kind or "," in kind:  # internal: kinds are the fixed names of messages.py
            raise ValueError(f"payload kind {kind!r} holds '/' or ','")
        for name, tensor in tensors.items():
            key = f"{kind}/{name}"
            t = tensor.detach().cpu().contiguous()
            if t.dtype in BITS:
                config[f"dtype/{key}"] = _DTYPE_NAMES[t.dtype]
                t = t.view(BITS[t.dtype])
            arrays[key] = Array(t.numpy())
    return arrays, config


def records_to_payload(arrays: ArrayRecord, config: ConfigRecord) -> Payload:
    """Inverse of ``payload_to_records``: the same tensors, bit for bit."""
    kinds = str(config.get("kinds", ""))
    payload: Payload = {kind: {} for kind in kinds.split(",") if kind}
    for key, array in arrays.items():
        kind, _, name = key.partition("/")
        if kind not in payload:
            raise AtlasError(f"received array {key!r} of kind {kind!r}, not one of the "
                             f"message's kinds {sorted(payload)}")
        t = torch.from_numpy(np.array(array.numpy(), copy=True))
        dtype = config.get(f"dtype/{key}")
        if dtype is not None:
            if dtype not in _FROM_NAME:
                raise AtlasError(f"received dtype/{key} = {dtype!r}; allowed: "
                                 f"{', '.join(_FROM_NAME)}")
            t = t.view(_FROM_NAME[str(dtype)])
        payload[kind][name] = t
    return payload


def state_to_records(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                     ) -> tuple[ArrayRecord, ConfigRecord]:
    """A client's checkpoint (``ClientState.checkpoint``) as records: tensors and JSON meta."""
    arrays, config = payload_to_records({"state": tensors})
    config["meta"] = json.dumps(meta)
    return arrays, config


def records_to_state(arrays: ArrayRecord, config: ConfigRecord
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of ``state_to_records``."""
    return records_to_payload(arrays, config)["state"], json.loads(str(config["meta"]))


# -- messages ---------------------------------------------------------------------------------

def to_content(message: Plan | Reply) -> RecordDict:
    """A plan or reply as the content of a Flower message."""
    arrays, config = payload_to_records(message.payload())
    config["client_id"] = int(message.client_id)
    match message:
        case Probe():
            _put(config, "fingerprint.", message.fingerprint)
            _put(config, "importance.", message.importance)
        case Train():
            config.update({"epochs": message.epochs, "steps": message.steps,
                           "upload": message.upload, "shares": message.shares,
                           "proximal": float(message.proximal)})
            _put(config, "split.", message.split)
        case Evaluate():
            _put(config, "split.", message.split)
        case ProbeReply():
            _put_record(config, message.record, message.seconds)
        case EvaluateReply():
            _put_record(config, message.record, message.seconds)
            config["delivered"] = message.delivered
        case TrainReply():
            _put_record(config, message.record, message.seconds)
            config["delivered"] = message.delivered
            if message.update is not None:
                config["update.num_examples"] = int(message.update.num_examples)
        case _:  # internal: a new message type
            raise TypeError(f"no record form for {type(message).__name__}")
    return RecordDict({ARRAYS: arrays, CONFIG: config})


def plan_from_content(message_type: str, content: RecordDict) -> Plan:
    """The plan a message of ``message_type`` carries (``PLAN_TYPES``)."""
    arrays, config = _records(content)
    payload = records_to_payload(arrays, config)
    cid = int(_get(config, "client_id"))
    category = message_type.partition(".")[0]
    if category == "query":
        return Probe(cid, _get_spec(config, "fingerprint.", FingerprintSpec),
                     _get_spec(config, "importance.", ImportanceSpec))
    if category == "train":
        return Train(cid, epochs=int(_get(config, "epochs")), steps=int(_get(config, "steps")),
                     upload=bool(_get(config, "upload")), shares=_get(config, "shares"),
                     proximal=float(_get(config, "proximal")),
                     split=_get_spec(config, "split.", SplitPlan)).with_payload(payload)
    if category == "evaluate":
        return Evaluate(cid, split=_get_spec(config, "split.", SplitPlan)).with_payload(payload)
    raise AtlasError(f"message type {message_type!r} carries no plan; allowed: "
                     f"{', '.join(sorted(PLAN_TYPES.values()))}")


def reply_from_content(kind: str, content: RecordDict) -> Reply:
    """The reply to a plan of ``kind`` (``probe``, ``train``, ``evaluate``)."""
    arrays, config = _records(content)
    payload = records_to_payload(arrays, config)
    cid = int(_get(config, "client_id"))
    record = {k.removeprefix("record."): v for k, v in config.items()
              if k.startswith("record.")}
    seconds = float(_get(config, "seconds"))
    if kind == "probe":
        return ProbeReply(cid, record=record, seconds=seconds).with_payload(payload)
    if kind == "train":
        update = None
        if "update.num_examples" in config:
            update = Update(cid, {}, {}, int(_get(config, "update.num_examples")))
        return TrainReply(cid, update, record, seconds, bool(_get(config, "delivered"))
                          ).with_payload(payload)
    if kind == "evaluate":
        return EvaluateReply(cid, record, seconds, bool(_get(config, "delivered")))
    raise AtlasError(f"reply kind {kind!r} is unknown; allowed: probe, train, evaluate")


def message_type(plan: Plan) -> str:
    """The Flower message type of a plan: ``train``, ``evaluate`` or a ``query.<action>``."""
    if isinstance(plan, Probe):
        return "query.fingerprint" if plan.fingerprint is not None else "query.importance"
    return plan.kind


PLAN_TYPES = {"fingerprint": "query.fingerprint", "importance": "query.importance",
              "train": "train", "evaluate": "evaluate"}
SPLIT_TYPES = {"train": "train.split", "evaluate": "evaluate.split"}  # the server's answers


# -- windows of split messages ------------------------------------------------------------------

_SPLIT: dict[str, type[Activations] | type[Gradients] | type[Logits]] = {
    "Activations": Activations, "Gradients": Gradients, "Logits": Logits}


def window_to_content(client_id: int, messages: list[SplitMessage]) -> RecordDict:
    """The messages of one window (at least one) as the content of a Flower message."""
    payload: Payload = {}
    meta: dict[str, Any] = {"window.count": len(messages), "client_id": int(client_id)}
    for i, message in enumerate(messages):
        meta[f"window.{i}.type"] = type(message).__name__
        if isinstance(message, Activations):
            meta[f"window.{i}.evaluating"] = message.evaluating
        payload.update({f"{i}.{kind}": tensors for kind, tensors in message.payload().items()})
    arrays, config = payload_to_records(payload)
    config.update(meta)
    return RecordDict({ARRAYS: arrays, CONFIG: config})


def is_window(content: RecordDict) -> bool:
    """Whether a message carries a window of split messages (else a plan or a reply)."""
    config = content.get(CONFIG)
    return isinstance(config, ConfigRecord) and "window.count" in config


def window_from_content(content: RecordDict) -> list[SplitMessage]:
    """Inverse of ``window_to_content``."""
    arrays, config = _records(content)
    payload = records_to_payload(arrays, config)
    cid = int(_get(config, "client_id"))
    count = int(_get(config, "window.count"))
    if count < 1:
        raise AtlasError(f"a window of {count} split messages; allowed: at least 1")
    out: list[SplitMessage] = []
    blank = torch.empty(0)
    for i in range(count):
        name = str(_get(config, f"window.{i}.type"))
        if name not in _SPLIT:
            raise AtlasError(f"window.{i}.type = {name!r}; allowed: {', '.join(_SPLIT)}")
        own = {kind.partition(".")[2]: t for kind, t in payload.items()
               if kind.partition(".")[0] == str(i)}
        message: SplitMessage
        if name == "Activations":
            message = Activations(cid, blank, evaluating=bool(
                config.get(f"window.{i}.evaluating", False)))
        elif name == "Gradients":
            message = Gradients(cid, blank)
        else:
            message = Logits(cid, blank)
        try:
            out.append(message.with_payload(own))
        except KeyError as exc:
            raise AtlasError(f"window message {i} ({name}) lacks {exc}") from None
    return out


# -- helpers ------------------------------------------------------------------------------------

def _records(content: RecordDict) -> tuple[ArrayRecord, ConfigRecord]:
    arrays, config = content.get(ARRAYS), content.get(CONFIG)
    if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
        raise AtlasError(f"message content holds {sorted(content)}; expected an ArrayRecord "
                         f"{ARRAYS!r} and a ConfigRecord {CONFIG!r}")
    return arrays, config


def _get(config: ConfigRecord, key: str) -> Any:
    if key not in config:
        raise AtlasError(f"message config lacks {key!r} (it holds {sorted(config)})")
    return config[key]


def _put(config: ConfigRecord, prefix: str, spec: Any) -> None:
    """A settings dataclass of scalars under ``prefix``; None fields (and None) are left out."""
    if spec is None:
        return
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if value is not None:
            config[prefix + f.name] = value


def _get_spec(config: ConfigRecord, prefix: str, cls: type) -> Any:
    """Inverse of ``_put``: None when no key has ``prefix``; an absent field was None."""
    if not any(k.startswith(prefix) for k in config):
        return None
    values = {f.name: config.get(prefix + f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def _put_record(config: ConfigRecord, record: dict[str, Any], seconds: float) -> None:
    config["seconds"] = float(seconds)
    for key, value in record.items():
        config[f"record.{key}"] = _scalar(key, value)


def _scalar(key: str, value: Any) -> bool | int | float | str:
    """A record value as a config scalar (NumPy numbers become Python ones)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise AtlasError(f"reply record {key!r} = {value!r} is a {type(value).__name__}; allowed: "
                     f"bool, int, float, str")
