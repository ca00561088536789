"""The Flower ``ClientApp``: answers the server's messages with the client code of the runner.

Every message is answered by ``ClientRuntime.handle`` (training, fingerprint, importance,
evaluation), as the in-process executor does: this module only unpacks a message, puts the
client's own state back, calls the runtime and packs the reply.

What the node keeps between messages lives in ``context.state``: the experiment's config (sent
once by ``query.setup``) and the client's state (adapter, head, optimizer moments and what it was
last scored with, ``ClientState.checkpoint``). A ``ClientApp`` process may be fresh for every
message (deployment) or serve several nodes (simulation): each message restores its client from
``context.state`` before it acts, so neither case leaks state between clients.

A split plan (``Train.split``/``Evaluate.split``) takes several messages: the node answers the
plan with the first window of its split messages (``atlasfl.client.split_training``), each
``train.split``/``evaluate.split`` message (the server's answers) with the next window, and the
last with the plan's reply. Between them ``context.state`` holds the plan's settings and where
the session stands (its ``export``), so any process can take the next message; nothing else
is kept (no autograd graph: the client recomputes its forward when the gradients arrive).

Per-node settings come from ``node_config``: ``partition-id`` (which client of the experiment
the node serves: its data partition), optionally ``data-dir`` (the GLUE folder on that node),
``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``device-profile`` (a ``devices.profiles`` name
the node reports at setup; the server plans with it instead of the seeded assignment).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from atlasfl.client import ClientState
from atlasfl.client.split_training import SplitMessage, SplitScoring, SplitTraining
from atlasfl.config import from_dict
from atlasfl.engine.flower.records import (
    ARRAYS,
    CONFIG,
    is_window,
    plan_from_content,
    records_to_state,
    state_to_records,
    to_content,
    window_from_content,
    window_to_content,
)
from atlasfl.engine.setup import Experiment, build_experiment
from atlasfl.errors import AtlasError
from atlasfl.messages import Evaluate, Train
from atlasfl.types import ClientId

SETUP_KEY, STATE_KEY, META_KEY = "atlasfl.setup", "atlasfl.client", "atlasfl.client.meta"
# an open split plan: its settings (the plan's config record and type), its session's export
SPLIT_PLAN, SPLIT_STATE, SPLIT_META = "atlasfl.split.plan", "atlasfl.split", "atlasfl.split.meta"

app = ClientApp()

# One experiment per process, rebuilt only when the config changes: a simulation's worker serves
# many messages (and nodes) and building the model and data is the slow part. A client's state is
# never taken from here (always from context.state); the initial checkpoints are the shared start.
_BUILT: dict[str, tuple[Experiment, dict[ClientId, tuple[dict[str, torch.Tensor],
                                                          dict[str, Any]]]]] = {}


def _node_settings(context: Context) -> dict[str, Any]:
    """Config overrides from this node's ``node_config``."""
    out: dict[str, Any] = {"federation.resident_clients": 1, "progress": False}
    if "data-dir" in context.node_config:
        out["data.data_dir"] = str(context.node_config["data-dir"])
    if "device" in context.node_config:
        out["device"] = str(context.node_config["device"])
    return out


def _experiment(context: Context) -> Experiment:
    setup = context.state.config_records.get(SETUP_KEY)
    if setup is None:
        raise AtlasError("this node got a message before query.setup: the ServerApp must send "
                         "the experiment's config first")
    raw = str(setup["experiment"])
    key = json.dumps([raw, _node_settings(context)])
    if key not in _BUILT:
        _BUILT.clear()
        cfg = from_dict(json.loads(raw)).replace(**_node_settings(context))
        _BUILT[key] = (build_experiment(cfg), {})
    return _BUILT[key][0]


def _client_id(context: Context, exp: Experiment) -> ClientId:
    value = context.node_config.get("partition-id")
    ids = sorted(exp.clients)
    if not isinstance(value, int) or isinstance(value, bool) or value not in exp.clients:
        raise AtlasError(f"node_config partition-id = {value!r} is invalid; allowed: "
                         f"{ids[0]}..{ids[-1]} (one node per client of the experiment)")
    return value


def _client(context: Context, exp: Experiment, cid: ClientId) -> ClientState:
    """The client, exactly as it was after this node's last message (or at the shared start)."""
    initial = _BUILT[next(iter(_BUILT))][1]
    if cid not in initial:  # before this process first touches the client: the shared start
        tensors, meta = exp.clients.checkpoint(cid)
        initial[cid] = ({k: v.detach().clone() for k, v in tensors.items()}, meta)
    client = exp.clients[cid]
    arrays = context.state.array_records.get(STATE_KEY)
    if arrays is None:
        client.restore(*initial[cid])
    else:
        client.restore(*records_to_state(arrays, context.state.config_records[META_KEY]))
    return client


def _keep(context: Context, client: ClientState) -> None:
    arrays, config = state_to_records(*client.checkpoint())
    context.state[STATE_KEY] = arrays
    context.state[META_KEY] = config


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Keep the experiment's config; answer with the client this node serves."""
    context.state[SETUP_KEY] = ConfigRecord(
        {"experiment": str(msg.content.config_records[CONFIG]["experiment"])})
    cid = _client_id(context, _experiment(context))  # bad settings fail here, before round 1
    answer = ConfigRecord({"client_id": cid})
    if "device-profile" in context.node_config:  # what this node is (Phase 2 budgets)
        answer["device_profile"] = str(context.node_config["device-profile"])
    return Message(RecordDict({CONFIG: answer}), reply_to=msg)


def _answer(msg: Message, context: Context) -> Message:
    """Any plan: the runtime's handler, with the client's state restored and kept."""
    exp = _experiment(context)
    cid = _client_id(context, exp)
    plan = plan_from_content(msg.metadata.message_type, msg.content)
    if plan.client_id != cid:
        raise AtlasError(f"a plan for client {plan.client_id} reached the node of client {cid}")
    client = _client(context, exp, cid)
    round_idx = int(msg.metadata.group_id)
    if getattr(plan, "split", None) is None:
        content = to_content(exp.runtime.handle(client, plan, round_idx))
    else:
        assert isinstance(plan, Train | Evaluate)
        session = exp.runtime.open_split(client, plan, round_idx)
        config = msg.content.config_records[CONFIG]
        context.state[SPLIT_PLAN] = ConfigRecord({
            "type": msg.metadata.message_type,
            **{k: v for k, v in config.items() if k != "kinds" and not k.startswith("dtype/")}})
        content = _split_step(context, exp, client, plan, session, session.begin())
    _keep(context, client)
    return Message(content, reply_to=msg)


def _split_step(context: Context, exp: Experiment, client: ClientState, plan: Train | Evaluate,
                session: SplitTraining | SplitScoring, requests: list[SplitMessage]
                ) -> RecordDict:
    """The next window of a split plan, or (when the session is done) the plan's reply."""
    if requests:
        arrays, config = state_to_records(*session.export())
        context.state[SPLIT_STATE], context.state[SPLIT_META] = arrays, config
        return window_to_content(client.client_id, requests)
    for key in (SPLIT_PLAN, SPLIT_STATE, SPLIT_META):
        if key in context.state:
            del context.state[key]
    return to_content(exp.runtime.close_split(client, plan, session))


def _continue(msg: Message, context: Context) -> Message:
    """The server's answers to a split window: the next window, or the plan's reply."""
    exp = _experiment(context)
    cid = _client_id(context, exp)
    saved = context.state.config_records.get(SPLIT_PLAN)
    if saved is None or SPLIT_STATE not in context.state.array_records:
        raise AtlasError(f"client {cid} got {msg.metadata.message_type} but has no split plan "
                         f"open (the server must send the train or evaluate plan first)")
    if not is_window(msg.content):
        raise AtlasError(f"{msg.metadata.message_type} must carry a window of split messages")
    settings = ConfigRecord({k: v for k, v in saved.items() if k != "type"})
    plan = plan_from_content(str(saved["type"]), RecordDict({ARRAYS: ArrayRecord(),
                                                             CONFIG: settings}))
    assert isinstance(plan, Train | Evaluate)
    client = _client(context, exp, cid)
    tensors, meta = records_to_state(context.state.array_records[SPLIT_STATE],
                                     context.state.config_records[SPLIT_META])
    session = exp.runtime.resume_split(client, plan, int(msg.metadata.group_id), tensors, meta)
    content = _split_step(context, exp, client, plan, session,
                          session.answer(window_from_content(msg.content)))
    _keep(context, client)
    return Message(content, reply_to=msg)


app.train()(_answer)
app.evaluate()(_answer)
app.train("split")(_continue)
app.evaluate("split")(_continue)
app.query("fingerprint")(_answer)
app.query("importance")(_answer)


@app.query("state")
def state(msg: Message, context: Context) -> Message:
    """The client's state, for the server's checkpoint."""
    exp = _experiment(context)
    client = _client(context, exp, _client_id(context, exp))
    arrays, config = state_to_records(*client.checkpoint())
    return Message(RecordDict({ARRAYS: arrays, CONFIG: config}), reply_to=msg)


@app.query("restore")
def restore(msg: Message, context: Context) -> Message:
    """Take back a checkpointed state (a resumed run)."""
    content = msg.content
    context.state[STATE_KEY] = content.array_records[ARRAYS]
    context.state[META_KEY] = content.config_records[CONFIG]
    return Message(RecordDict(), reply_to=msg)
