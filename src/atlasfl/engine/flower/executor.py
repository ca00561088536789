"""The Flower executor: each plan travels as a Flower message to the node of its client.

``FlowerExecutor`` implements ``atlasfl.engine.executor.Executor`` over a Flower ``Grid`` (the
Message API of a ``ServerApp``): a batch of plans becomes one message per client
(``train``, ``evaluate``, ``query.fingerprint`` or ``query.importance``, see
``records.message_type``), sent together with ``grid.send_and_receive``; the replies come back as
typed replies. Bytes are counted by the same ``InProcessChannel`` at the same place as in process:
a plan's payload when it leaves for its client, a reply's when it is back (what the
channel's copy holds is what is serialised, so both sides see identical tensors).

A split client (a plan with ``split``) exchanges windows of per-batch messages with the server's
half of split learning (``atlasfl.engine.split_server``, in this process) until it sends its
reply: its plan, then one ``train.split``/``evaluate.split`` message per window of answers. Each
per-batch message is counted by the channel as in process, one by one. Split clients run one
after another in plan order, after the others' plans are out, so the server models step in the
order the in-process executor steps them.

Replies are handed to the round loop in the order of the plans, not of arrival: aggregation then
sums in one order whatever the network does, and runs are reproducible bit for bit.

A client whose message fails (its ``ClientApp`` raised) or that does not answer within
``timeout`` seconds is recorded and the round goes on with the others: a train plan gets a reply
without update (``dropped``), a probe a reply without results (``failed``), an evaluation a reply
marked undelivered (``failed``, no scores), so the strategy sends that client its model again.

Which node serves which client is settled once, by a ``query.setup`` message that carries the
experiment's resolved config to every node; a node answers with the client it serves (its
``node_config`` ``partition-id``) and, if its ``node_config`` names one, its device profile
(``device-profile``), which replaces the seeded one: ``discover`` learns both before the
experiment is built, so the clients' facts are resolved once (``build_experiment(cfg,
devices=...)``) and no executor rebuilds a strategy. Clients keep
their state on their node (``context.state``); the executor fetches it (``query.state``) for
checkpoints and at the end of a session, and puts a checkpoint's client states back after a
resume (``query.restore``). That traffic is not the protocol's and is not counted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict

from atlasfl.client.runtime import ClientRuntime, client_seed
from atlasfl.client.store import ClientStore
from atlasfl.devices import known_profiles
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.flower.records import (
    ARRAYS,
    CONFIG,
    SPLIT_TYPES,
    is_window,
    message_type,
    records_to_state,
    reply_from_content,
    state_to_records,
    to_content,
    window_from_content,
    window_to_content,
)
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.split_server import SplitServer
from atlasfl.errors import AtlasError
from atlasfl.messages import EvaluateReply, Probe, ProbeReply, Train, TrainReply
from atlasfl.types import ClientId

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from atlasfl.config import ExperimentConfig
    from atlasfl.engine.setup import Experiment
    from atlasfl.engine.split_server import ServerModel
    from atlasfl.messages import Plan, Reply

SETUP, STATE, RESTORE = "query.setup", "query.state", "query.restore"


class FlowerExecutor:
    """Delivers plans to Flower nodes, one node per client."""

    def __init__(self, grid: Grid, nodes: dict[ClientId, int], clients: ClientStore,
                 channel: InProcessChannel, *, timeout: float | None = None,
                 runtime: ClientRuntime | None = None):
        """Deliver to ``nodes`` (client id -> node id).

        ``timeout``: seconds an exchange waits for replies; ``runtime``: the experiment's, whose
        backbone serves split clients.
        """
        self.grid, self.nodes, self.clients, self.channel = grid, dict(nodes), clients, channel
        self.timeout, self.runtime = timeout, runtime
        self._client_of = {node: cid for cid, node in self.nodes.items()}

    @classmethod
    def connect(cls, grid: Grid, exp: Experiment, ledger: CommLedger, *,
                timeout: float | None = None, wait: float = 120.0,
                nodes: Nodes | None = None) -> FlowerExecutor:
        """The executor over the nodes serving ``exp``'s clients (``discover`` them if None).

        ``exp`` must have been built with the device profiles the nodes report
        (``build_experiment(cfg, devices=nodes.profiles)``): Phase 2 plans with them.
        """
        faults = exp.cfg.faults
        if faults.drop_before > 0 or faults.drop_during > 0 or faults.deadline_seconds > 0:
            raise AtlasError("faults.* simulates failures in process; on Flower clients fail for "
                             "real: set faults.drop_before, faults.drop_during and "
                             "faults.deadline_seconds to 0 (use timeout for a deadline)")
        if nodes is None:
            nodes = discover(grid, exp.cfg, len(exp.clients), wait=wait)
        for cid, name in sorted(nodes.profiles.items()):
            built = exp.strategy.clients[cid].device
            if name != built:
                raise AtlasError(f"client {cid}: its node reports device-profile {name!r} but the "
                                 f"experiment was built with {built!r}; build it with the "
                                 f"profiles the nodes report: build_experiment(cfg, "
                                 f"devices=discover(...).profiles)")
        return cls(grid, nodes.served, exp.clients, InProcessChannel(ledger), timeout=timeout,
                   runtime=exp.runtime)

    # -- the Executor protocol ------------------------------------------------------------------

    def run(self, round_idx: int, plans: Sequence[Plan], server: SplitServer | None = None
            ) -> Iterator[Reply]:
        """Send every plan as a message, then yield each client's reply in plan order."""
        messages = []
        for plan in plans:
            if getattr(plan, "split", None) is not None:
                continue  # below, one client at a time
            received = self.channel.send(round_idx, plan.client_id, "down", plan)
            messages.append(Message(to_content(received), self.nodes[plan.client_id],
                                    message_type(received), group_id=str(round_idx)))
        answers: dict[ClientId, Message] = {}
        for got in self.grid.send_and_receive(messages, timeout=self.timeout):
            answers[self._client_of[got.metadata.src_node_id]] = got
        for plan in plans:
            cid = plan.client_id
            if getattr(plan, "split", None) is not None:
                if server is None:  # internal: a strategy planned split without serving it
                    raise RuntimeError(f"client {cid} was planned split but no server runs")
                yield self._split_exchange(round_idx, plan, server)
                continue
            answer = answers.get(cid)
            if answer is None:
                reason = "no reply" + (f" within {self.timeout:g} s" if self.timeout else "")
            elif answer.has_error():
                reason = f"its ClientApp failed: {answer.error.reason}"
            else:
                try:
                    reply = reply_from_content(plan.kind, answer.content)
                except AtlasError as exc:
                    reason = f"its reply is malformed: {exc}"
                else:
                    yield self.channel.send(round_idx, cid, "up", reply)
                    continue
            print(f"atlasfl: round {round_idx}: client {cid} (Flower node {self.nodes[cid]}) "
                  f"{reason}; the round goes on without it", file=sys.stderr)
            yield failed_reply(plan, f"flower: {reason}")

    def _split_exchange(self, round_idx: int, plan: Plan, server: SplitServer) -> Reply:
        """A split client's plan, its windows answered by ``server``, until its reply."""
        cid, node = plan.client_id, self.nodes[plan.client_id]
        split = getattr(plan, "split", None)
        assert split is not None and self.runtime is not None
        received = self.channel.send(round_idx, cid, "down", plan)
        server.open(cid, split, client_seed(self.runtime.seed, round_idx, cid))
        message = Message(to_content(received), node, message_type(received),
                          group_id=str(round_idx))
        windows = 0
        while True:
            got = list(self.grid.send_and_receive([message], timeout=self.timeout))
            if not got:
                reason = "no reply" + (f" within {self.timeout:g} s" if self.timeout else "")
            elif got[0].has_error():
                reason = f"its ClientApp failed: {got[0].error.reason}"
            else:
                try:
                    if not is_window(got[0].content):
                        reply = reply_from_content(plan.kind, got[0].content)
                        return self.channel.send(round_idx, cid, "up", reply)
                    answers = [self.channel.send(round_idx, cid, "down", server.handle(
                        cid, self.channel.send(round_idx, cid, "up", request)))
                        for request in window_from_content(got[0].content)]
                except AtlasError as exc:
                    reason = f"its split messages are malformed: {exc}"
                else:
                    windows += 1
                    message = Message(window_to_content(cid, answers), node,
                                      SPLIT_TYPES[plan.kind], group_id=str(round_idx))
                    continue
            server.abandon(cid)  # its unfinished batches never reach the server model
            print(f"atlasfl: round {round_idx}: client {cid} (Flower node {node}) {reason} "
                  f"after {windows} split windows; the round goes on without it",
                  file=sys.stderr)
            return failed_reply(plan, f"flower: {reason}")

    def split_server(self, models: dict[str, ServerModel]) -> SplitServer:
        """The server's half of split learning, on this process's copy of the backbone."""
        rt = self.runtime
        if rt is None:  # internal: built without the experiment's runtime
            raise RuntimeError("FlowerExecutor needs the runtime to serve split clients")
        return SplitServer(rt.model, rt.binder, num_layers=rt.num_layers, train=rt.train,
                           initial_adapter=rt.initial_adapter, initial_heads=rt.initial_heads,
                           device=rt.device, models=models)

    def collect_states(self) -> None:
        """Fetch every client's state from its node into the server's store (checkpoints)."""
        messages = [Message(RecordDict(), node, STATE) for node in self.nodes.values()]
        answers = {self._client_of[a.metadata.src_node_id]: a
                   for a in self.grid.send_and_receive(messages, timeout=self.timeout)}
        for cid in self.nodes:
            answer = answers.get(cid)
            if answer is None or answer.has_error():
                why = "no reply" if answer is None else answer.error.reason
                print(f"atlasfl: client {cid} did not send its state ({why}); the checkpoint "
                      f"keeps its previous one", file=sys.stderr)
                continue
            content = answer.content
            self.clients.restore(cid, *records_to_state(content.array_records[ARRAYS],
                                                        content.config_records[CONFIG]))

    def restore_states(self) -> None:
        """Send every client the state the server's store holds (after a resume)."""
        messages = []
        for cid, node in self.nodes.items():
            arrays, config = state_to_records(*self.clients.checkpoint(cid))
            messages.append(Message(RecordDict({ARRAYS: arrays, CONFIG: config}), node, RESTORE))
        answers = {a.metadata.src_node_id: a
                   for a in self.grid.send_and_receive(messages, timeout=self.timeout)}
        for cid, node in self.nodes.items():
            answer = answers.get(node)
            if answer is None or answer.has_error():
                why = "no reply" if answer is None else answer.error.reason
                raise AtlasError(f"client {cid} (Flower node {node}) could not take back its "
                                 f"checkpointed state: {why}")

    def usage(self) -> dict[str, float]:
        """Nothing measured here: the nodes' processes are Flower's (``flwr`` reports them)."""
        return {}

    def close(self) -> None:
        """Nothing to release: Flower owns the nodes."""


@dataclass(frozen=True)
class Nodes:
    """Which Flower node serves each client, and the device profiles the nodes reported."""

    served: dict[ClientId, int]  # client id -> node id
    profiles: dict[ClientId, str]  # client id -> its node's device-profile (when it names one)


def discover(grid: Grid, cfg: ExperimentConfig, clients: int, *, wait: float = 120.0) -> Nodes:
    """Wait for one node per client, send each the config and learn which client it serves.

    ``clients``: how many the experiment has (``atlasfl.engine.setup.num_clients``); ``wait``:
    seconds to wait for the nodes to connect (deployment: SuperNodes start late). A node's
    ``device-profile`` must be a ``devices.profiles`` name.
    """
    deadline = time.monotonic() + wait
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < clients and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < clients:
        raise AtlasError(f"{len(nodes)} Flower nodes connected within {wait:g} s but the "
                         f"experiment has {clients} clients (data.tasks x "
                         f"data.clients_per_task): start one SuperNode per client")
    experiment = json.dumps(cfg.to_dict())
    messages = [Message(RecordDict({CONFIG: ConfigRecord({"experiment": experiment})}),
                        node, SETUP) for node in nodes]
    served: dict[ClientId, int] = {}
    profiles: dict[ClientId, str] = {}
    for reply in grid.send_and_receive(messages, timeout=wait):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise AtlasError(f"Flower node {node} failed to set up its client: "
                             f"{reply.error.reason}")
        cid = int(reply.content[CONFIG]["client_id"])  # type: ignore[arg-type]
        if cid in served:
            raise AtlasError(f"Flower nodes {served[cid]} and {node} both serve client {cid} "
                             f"(node_config partition-id must differ)")
        served[cid] = node
        if "device_profile" in reply.content[CONFIG]:
            profiles[cid] = str(reply.content[CONFIG]["device_profile"])
    missing = sorted(set(range(clients)) - set(served))
    if missing:
        raise AtlasError(f"no Flower node serves clients {missing} (node_config "
                         f"partition-id); allowed partition-ids: 0..{clients - 1}")
    known = known_profiles(cfg.devices)
    for cid, name in sorted(profiles.items()):
        if name not in known:
            raise AtlasError(f"client {cid}: node_config device-profile = {name!r} is unknown; "
                             f"allowed: {', '.join(sorted(known))} (devices.profiles)")
    return Nodes(served, profiles)


def failed_reply(plan: Plan, reason: str) -> Reply:
    """What the server records for a client that failed or timed out on ``plan``."""
    cid = plan.client_id
    if isinstance(plan, Train):
        return TrainReply(cid, None, {"trained": False, "dropped": reason}, delivered=False)
    if isinstance(plan, Probe):
        return ProbeReply(cid, record={"failed": reason})
    return dataclasses.replace(EvaluateReply(cid, {"failed": reason}), delivered=False)
