"""Executors deliver plans to clients and bring their replies back: transport only.

The in-process executor is what Flower's Grid is to a ServerApp: given a batch of plans (one per
client) it sends each through the channel (counted), lets the client side answer it
(``atlasfl.client.ClientRuntime``) and returns each reply through the channel (counted), as it
arrives. A split client talks to the server's half of split learning during its plan
(``atlasfl.engine.split_server``): every per-batch message crosses the same channel and is
counted by kind. With ``train.batch_clients`` > 0 it hands the client side groups of Train
plans that can share one batched step (``atlasfl.client.batched``); with ``train.workers`` > 1 it
hands plans that need no server during their work to worker processes (``atlasfl.engine.pool``).
Only the schedule changes, not the replies or the bytes counted. It runs no algorithm of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from atlasfl.client import ClientRuntime
from atlasfl.client.batched import group_by_key, step_sizes, supports_batching
from atlasfl.client.runtime import client_seed
from atlasfl.client.split_training import Link
from atlasfl.client.store import ClientStore
from atlasfl.config import FaultsConfig
from atlasfl.devices import DeviceProfile, known_profiles
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.faults import ClientVanished, Fault, draw_fault, simulated_seconds
from atlasfl.engine.ledger import CommLedger, state_bytes
from atlasfl.engine.pool import ClientPool, Payload
from atlasfl.engine.setup import resolve_threads, resolve_workers
from atlasfl.engine.split_server import ServerModel, SplitServer
from atlasfl.messages import SplitMessage, Train, TrainReply
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

    def collect_states(self) -> None:
        """Bring every client's state into the experiment's store (before a checkpoint)."""
        ...

    def restore_states(self) -> None:
        """Give every client the state the experiment's store holds (after a resume)."""
        ...

    def usage(self) -> dict[str, float]:
        """CPU seconds and peak RSS (MiB) of work done in other processes here (workers)."""
        ...

    def close(self) -> None:
        """Release what the executor started (worker processes); called when a session ends."""
        ...


@dataclass(frozen=True)
class Faults:
    """Simulated failures (``faults.*``) and what they are drawn from."""

    cfg: FaultsConfig
    seed: int
    devices: Mapping[ClientId, DeviceProfile]
    batch_size: int

    @property
    def active(self) -> bool:
        """Whether any failure can happen."""
        c = self.cfg
        return c.drop_before > 0 or c.drop_during > 0 or c.deadline_seconds > 0


class InProcessExecutor:
    """All clients in this process, sharing one frozen backbone (or in its worker processes)."""

    def __init__(self, runtime: ClientRuntime, clients: ClientStore,
                 channel: InProcessChannel, faults: Faults | None = None,
                 pool: ClientPool | None = None):
        self.runtime, self.clients, self.channel = runtime, clients, channel
        self.faults = faults if faults is not None and faults.active else None
        self.pool = pool

    def run(self, round_idx: int, plans: Sequence[Plan], server: SplitServer | None = None
            ) -> Iterator[Reply]:
        """Deliver every plan and yield each client's reply as it arrives.

        With ``train.batch_clients`` > 0 the plans of a group (``_groups``) are delivered
        together when the first of them comes up, trained in one batched step each batch, and
        their replies yielded in plan order like any other's. With a pool of workers, the plans
        that need no server during their work go to the workers, at most two per worker queued
        ahead, and their replies are yielded in plan order too.
        """
        groups = self._groups(round_idx, plans)
        trained: dict[int, Reply] = {}
        pooled = iter([] if self.pool is None else
                      [i for i, p in enumerate(plans)
                       if i not in groups and getattr(p, "split", None) is None])
        queued: dict[int, tuple[Future[Payload] | Reply, Fault | None]] = {}
        for i, plan in enumerate(plans):
            if self.pool is not None:  # keep the workers busy: queue plans ahead of this one
                while len(queued) < 2 * self.pool.workers:
                    j = next(pooled, None)
                    if j is None:
                        break
                    queued[j] = self._submit(round_idx, plans[j], self.pool)
            if i in queued:
                yield self._collect(round_idx, plan, *queued.pop(i))
                continue
            if i not in groups:
                yield self._deliver(round_idx, plan, server)
                continue
            if i not in trained:
                trained.update(self._train_group(round_idx, plans, groups[i]))
            arrived = self.channel.send(round_idx, plan.client_id, "up", trained.pop(i))
            yield self._on_time(round_idx, arrived)

    def _groups(self, round_idx: int, plans: Sequence[Plan]) -> dict[int, list[int]]:
        """Plan index -> the indices of its batched group (``train.batch_clients``).

        Whole-model Train plans whose batches have the same sizes step for step, at most
        ``train.batch_clients`` (and ``federation.resident_clients``: a group is live at once)
        per group. None when simulated faults are on (they act on one client's plan).
        """
        rt = self.runtime
        size = rt.train.batch_clients
        if self.clients.resident > 0:
            size = min(size, self.clients.resident)
        if size < 2 or self.faults is not None or not supports_batching(rt.binder):
            return {}
        keys = [self._batch_key(round_idx, p) for p in plans]
        return {i: group for group in group_by_key(keys, size) for i in group}

    def _batch_key(self, round_idx: int, plan: Plan) -> tuple[int, ...] | None:
        """A whole-model Train plan's batch sizes, step by step; None: it trains on its own."""
        if not isinstance(plan, Train) or plan.split is not None or plan.proximal:
            return None  # split and proximal training have no batched path
        cid, rt = plan.client_id, self.runtime
        sizes = step_sizes(self.clients.num_examples(cid), rt.train, epochs=plan.epochs,
                           steps=plan.steps, seed=client_seed(rt.seed, round_idx, cid))
        return sizes or None  # no rows: nothing to batch

    def _train_group(self, round_idx: int, plans: Sequence[Plan], group: list[int]
                     ) -> dict[int, Reply]:
        """Deliver a group's plans (counted) and train them together; replies by plan index."""
        received = []
        for i in group:
            plan = plans[i]
            assert isinstance(plan, Train)
            received.append(self.channel.send(round_idx, plan.client_id, "down", plan))
        clients = [self.clients[p.client_id] for p in received]
        replies = self.runtime.train_group(clients, received, round_idx)
        return dict(zip(group, replies, strict=True))

    def _fault(self, round_idx: int, plan: Plan) -> Fault | None:
        """The simulated failure of a Train plan's client in this round, if any."""
        if self.faults is None or not isinstance(plan, Train):
            return None
        return draw_fault(self.faults.cfg, seed=self.faults.seed, round_idx=round_idx,
                          client_id=plan.client_id)

    def _submit(self, round_idx: int, plan: Plan, pool: ClientPool
                ) -> tuple[Future[Payload] | Reply, Fault | None]:
        """Deliver a plan (counted) to a worker, with its client's state.

        A client that vanishes before its plan arrives gets its reply here instead.
        """
        fault = self._fault(round_idx, plan)
        if fault is not None and fault.kind == "before":
            return _never_arrived(plan.client_id), fault
        received = self.channel.send(round_idx, plan.client_id, "down", plan)
        return pool.submit(received, round_idx, self.clients.checkpoint(plan.client_id)), fault

    def _collect(self, round_idx: int, plan: Plan, queued: Future[Payload] | Reply,
                 fault: Fault | None) -> Reply:
        """A worker's reply, its client's new state written into the store."""
        if not isinstance(queued, Future):
            return queued
        assert self.pool is not None
        reply, state = self.pool.answer(queued)
        self.clients.restore(plan.client_id, *state)
        return self._returned(round_idx, reply, fault)

    def _deliver(self, round_idx: int, plan: Plan, server: SplitServer | None
                 ) -> Reply:
        """Deliver one plan and bring its client's reply back."""
        cid = plan.client_id
        fault = self._fault(round_idx, plan)
        if fault is not None and fault.kind == "before":  # the plan never arrives
            return _never_arrived(cid)
        received = self.channel.send(round_idx, cid, "down", plan)
        link = None
        split = getattr(plan, "split", None)
        if split is not None:
            if server is None:  # internal: a strategy planned split without serving it
                raise RuntimeError(f"client {cid} was planned split but no server runs")
            server.open(cid, split, client_seed(self.runtime.seed, round_idx, cid))
            link = self._link(round_idx, cid, server)
            if fault is not None:
                link = _vanishing(link, fault.fraction, self._messages(plan, split.u_shape))
        try:
            reply = self.runtime.handle(self.clients[cid], received, round_idx, link)
        except ClientVanished as exc:
            assert server is not None
            server.abandon(cid)  # the unfinished batch never reaches the server model
            return TrainReply(cid, None, {"trained": True, "dropped": str(exc)})
        return self._returned(round_idx, reply, fault)

    def _returned(self, round_idx: int, reply: Reply, fault: Fault | None) -> Reply:
        """A client's answer on its way back (counted), unless its client vanished first."""
        if fault is not None:  # it trained, then vanished before uploading
            assert isinstance(reply, TrainReply)
            return dataclasses.replace(reply, update=None, record={
                **reply.record, "dropped": "vanished after training, before its upload"})
        arrived = self.channel.send(round_idx, reply.client_id, "up", reply)
        return self._on_time(round_idx, arrived)

    def _messages(self, plan: Plan, u_shape: bool) -> int:
        """How many link calls a split client's training makes (one or two per batch)."""
        assert isinstance(plan, Train) and self.faults is not None
        rows = self.clients.num_examples(plan.client_id)
        batches = plan.steps or plan.epochs * -(-rows // self.faults.batch_size)
        return batches * (2 if u_shape else 1)

    def _on_time(self, round_idx: int, reply: Reply) -> Reply:
        """The reply, or without its update when it came after ``faults.deadline_seconds``."""
        faults = self.faults
        if (faults is None or faults.cfg.deadline_seconds <= 0
                or not isinstance(reply, TrainReply) or reply.update is None):
            return reply
        cid = reply.client_id
        seconds = simulated_seconds(
            faults.cfg, faults.devices[cid], steps=int(reply.record.get("steps", 0)),
            bytes_up=sum(state_bytes(t) for t in reply.payload().values()), seed=faults.seed,
            round_idx=round_idx, client_id=cid)
        if seconds <= faults.cfg.deadline_seconds:
            return reply
        return dataclasses.replace(reply, update=None, record={
            **reply.record, "late": f"simulated {seconds:.1f} s > faults.deadline_seconds = "
                                    f"{faults.cfg.deadline_seconds:g}"})

    def _link(self, round_idx: int, client_id: ClientId, server: SplitServer) -> Link:
        def link(message: SplitMessage) -> SplitMessage:
            arrived = self.channel.send(round_idx, client_id, "up", message)
            answer = server.handle(client_id, arrived)
            return self.channel.send(round_idx, client_id, "down", answer)
        return link

    def collect_states(self) -> None:
        """Nothing to do: the clients' states are the store's."""

    def restore_states(self) -> None:
        """Nothing to do: the clients' states are the store's."""

    def usage(self) -> dict[str, float]:
        """The workers' CPU seconds and summed peak RSS; empty without workers."""
        return {} if self.pool is None else self.pool.usage()

    def close(self) -> None:
        """Stop the workers, if any."""
        if self.pool is not None:
            self.pool.close()

    def split_server(self, models: dict[str, ServerModel]) -> SplitServer:  # noqa: D102
        rt = self.runtime
        return SplitServer(rt.model, rt.binder, num_layers=rt.num_layers, train=rt.train,
                           initial_adapter=rt.initial_adapter, initial_heads=rt.initial_heads,
                           device=rt.device, models=models)


def _never_arrived(client_id: ClientId) -> TrainReply:
    """The reply of a client that vanished before its plan arrived."""
    return TrainReply(client_id, None, {"trained": False, "dropped": "vanished before training"},
                      delivered=False)


def _vanishing(link: Link, fraction: float, total: int) -> Link:
    """``link``, failing at its call number ``fraction`` x ``total`` (at least one call short)."""
    fail_at = min(int(fraction * total), max(total - 1, 0))
    calls = 0

    def wrapped(message: SplitMessage) -> SplitMessage:
        nonlocal calls
        if calls >= fail_at:
            raise ClientVanished(f"vanished during training, after {calls} of {total} split "
                                 f"messages")
        calls += 1
        return link(message)
    return wrapped


def make_executor(exp: Experiment, ledger: CommLedger) -> InProcessExecutor:
    """The in-process executor of an experiment, counting transfers in ``ledger``."""
    cfg = exp.cfg
    profiles = known_profiles(cfg.devices)
    devices = {cid: profiles[info.device] for cid, info in
               ((i.client_id, i) for i in exp.strategy.clients.values())}
    faults = Faults(cfg.faults, cfg.seed, devices, cfg.train.batch_size)
    workers = resolve_workers(cfg.train.workers, cfg.train.threads, exp.device)
    pool = (ClientPool(cfg, workers, resolve_threads(cfg.train.threads)) if workers > 1
            else None)
    return InProcessExecutor(exp.runtime, exp.clients, InProcessChannel(ledger), faults, pool)
