"""Executors deliver plans to clients and bring their replies back: transport only.

The in-process executor is what Flower's Grid is to a ServerApp: given a batch of plans (one per
client) it sends each through the channel (counted), lets the client side answer it
(``atlasfl.client.ClientRuntime``) and returns each reply through the channel (counted), as it
arrives. It runs no algorithm of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from atlasfl.client import ClientRuntime, ClientState
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.engine.setup import Experiment
    from atlasfl.messages import Plan, Reply


class Executor(Protocol):
    """Delivers a batch of plans, one per client, and yields the replies as they arrive."""

    def run(self, round_idx: int, plans: Sequence[Plan]) -> Iterator[Reply]:
        """Send each plan to its client and bring its reply back, counting both."""
        ...


class InProcessExecutor:
    """All clients in this process, sharing one frozen backbone."""

    def __init__(self, runtime: ClientRuntime, clients: Mapping[ClientId, ClientState],
                 channel: InProcessChannel):
        self.runtime, self.clients, self.channel = runtime, clients, channel

    def run(self, round_idx: int, plans: Sequence[Plan]) -> Iterator[Reply]:
        """Deliver every plan and yield each client's reply as it arrives."""
        for plan in plans:
            cid = plan.client_id
            received = self.channel.send(round_idx, cid, "down", plan)
            reply = self.runtime.handle(self.clients[cid], received, round_idx)
            yield self.channel.send(round_idx, cid, "up", reply)


def make_executor(exp: Experiment, ledger: CommLedger) -> InProcessExecutor:
    """The in-process executor of an experiment, counting transfers in ``ledger``."""
    return InProcessExecutor(exp.runtime, exp.clients, InProcessChannel(ledger))
