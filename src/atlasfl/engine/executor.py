"""Executors deliver plans to clients and bring their replies back: transport only.

The in-process executor is what Flower's Grid is to a ServerApp: given a batch of plans (one per
client) it sends each through the channel (counted), lets the client side answer it
(``atlasfl.client.ClientRuntime``) and returns each reply through the channel (counted), as it
arrives. A split client talks to the server's half of split learning during its plan
(``atlasfl.engine.split_server``): every per-batch message crosses the same channel and is
counted by kind. It runs no algorithm of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from atlasfl.client import ClientRuntime, ClientState
from atlasfl.client.split import Link
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.split_server import ServerModel, SplitServer
from atlasfl.messages import SplitMessage
from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.engine.setup import Experiment
    from atlasfl.messages import Plan, Reply


class Executor(Protocol):
    """Delivers a batch of plans, one per client, and yields the replies as they arrive."""

    def run(self, round_idx: int, plans: Sequence[Plan], server: SplitServer | None = None
            ) -> Iterator[Reply]:
        """Send each plan to its client and bring its reply back, counting both.

        A split client's per-batch messages go to ``server`` and back, counted too.
        """
        ...

    def split_server(self, models: dict[str, ServerModel]) -> SplitServer:
        """The server's half of split learning, holding ``models`` for one exchange."""
        ...


class InProcessExecutor:
    """All clients in this process, sharing one frozen backbone."""

    def __init__(self, runtime: ClientRuntime, clients: Mapping[ClientId, ClientState],
                 channel: InProcessChannel):
        self.runtime, self.clients, self.channel = runtime, clients, channel

    def run(self, round_idx: int, plans: Sequence[Plan], server: SplitServer | None = None
            ) -> Iterator[Reply]:
        """Deliver every plan and yield each client's reply as it arrives."""
        for plan in plans:
            cid = plan.client_id
            received = self.channel.send(round_idx, cid, "down", plan)
            link = None
            split = getattr(plan, "split", None)
            if split is not None:
                if server is None:  # internal: a strategy planned split without serving it
                    raise RuntimeError(f"client {cid} was planned split but no server runs")
                server.open(cid, split)
                link = self._link(round_idx, cid, server)
            reply = self.runtime.handle(self.clients[cid], received, round_idx, link)
            yield self.channel.send(round_idx, cid, "up", reply)

    def _link(self, round_idx: int, client_id: ClientId, server: SplitServer) -> Link:
        def link(message: SplitMessage) -> SplitMessage:
            arrived = self.channel.send(round_idx, client_id, "up", message)
            answer = server.handle(client_id, arrived)
            return self.channel.send(round_idx, client_id, "down", answer)
        return link

    def split_server(self, models: dict[str, ServerModel]) -> SplitServer:  # noqa: D102
        rt = self.runtime
        return SplitServer(rt.model, rt.binder, num_layers=rt.num_layers, train=rt.train,
                           initial_adapter=rt.initial_adapter, initial_heads=rt.initial_heads,
                           device=rt.device, models=models)


def make_executor(exp: Experiment, ledger: CommLedger) -> InProcessExecutor:
    """The in-process executor of an experiment, counting transfers in ``ledger``."""
    return InProcessExecutor(exp.runtime, exp.clients, InProcessChannel(ledger))
