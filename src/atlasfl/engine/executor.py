"""Executors deliver plans to clients and bring their replies back: transport only.

The in-process executor is what Flower's Grid is to a ServerApp: given a batch of plans (one per
client) it sends each through the channel (counted), lets the client side answer it
(``atlasfl.client.ClientRuntime``) and returns each reply through the channel (counted), as it
arrives. A split client talks to the server's half of split learning during its plan
(``atlasfl.engine.split_server``): every per-batch message crosses the same channel and is
counted by kind. With ``train.batch_clients`` > 0 it hands the client side groups of Train
plans that can share one batched step (``atlasfl.client.batched``); with ``train.workers`` > 1 it
hands plans that need no server during their work to worker processes (``atlasfl.engine.pool``).
Only the schedule changes, not the replies or the bytes counted. It runs no algorithm of its own,
and draws no failure: simulated faults wrap its channel (``atlasfl.engine.faults``) and a client
that vanishes is recorded where the channel says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from atlasfl.client import ClientRuntime
from atlasfl.client.batched import group_by_key, step_sizes, supports_batching
from atlasfl.client.runtime import client_seed
from atlasfl.client.split_training import Link
from atlasfl.client.store import ClientStore
from atlasfl.devices import known_profiles
from atlasfl.engine.channel import Channel, InProcessChannel
from atlasfl.engine.faults import ClientVanished, FaultyChannel
from atlasfl.engine.faults import active as faults_active
from atlasfl.engine.ledger import CommLedger
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


class InProcessExecutor:
    """All clients in this process, sharing one frozen backbone (or in its worker processes)."""

    def __init__(self, runtime: ClientRuntime, clients: ClientStore, channel: Channel, *,
                 batch_clients: int = 0, pool: ClientPool | None = None):
        """Deliver through ``channel`` (counting; simulated failures wrap it).

        The schedule: ``batch_clients`` >= 2 trains groups of at most that many Train plans
        together (``_groups``); ``pool`` runs plans that need no server in worker processes.
        """
        self.runtime, self.clients, self.channel = runtime, clients, channel
        self.batch_clients, self.pool = batch_clients, pool

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
        queued: dict[int, Future[Payload] | Reply] = {}
        for i, plan in enumerate(plans):
            if self.pool is not None:  # keep the workers busy: queue plans ahead of this one
                while len(queued) < 2 * self.pool.workers:
                    j = next(pooled, None)
                    if j is None:
                        break
                    queued[j] = self._submit(round_idx, plans[j], self.pool)
            if i in queued:
                yield self._collect(round_idx, plan, queued.pop(i))
                continue
            if i not in groups:
                yield self._deliver(round_idx, plan, server)
                continue
            if i not in trained:
                trained.update(self._train_group(round_idx, plans, groups[i]))
            yield self.channel.send(round_idx, plan.client_id, "up", trained.pop(i))

    def _groups(self, round_idx: int, plans: Sequence[Plan]) -> dict[int, list[int]]:
        """Plan index -> the indices of its batched group (at most ``batch_clients`` each).

        Whole-model Train plans whose batches have the same sizes step for step.
        """
        if self.batch_clients < 2:
            return {}
        keys = [self._batch_key(round_idx, p) for p in plans]
        return {i: group for group in group_by_key(keys, self.batch_clients) for i in group}

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

    def _submit(self, round_idx: int, plan: Plan, pool: ClientPool) -> Future[Payload] | Reply:
        """Deliver a plan (counted) to a worker, with its client's state.

        A client that vanishes before its plan arrives gets its reply here instead.
        """
        try:
            received = self.channel.send(round_idx, plan.client_id, "down", plan)
        except ClientVanished as exc:
            return _never_arrived(plan.client_id, exc)
        return pool.submit(received, round_idx, self.clients.checkpoint(plan.client_id))

    def _collect(self, round_idx: int, plan: Plan, queued: Future[Payload] | Reply) -> Reply:
        """A worker's reply, its client's new state written into the store."""
        if not isinstance(queued, Future):
            return queued
        assert self.pool is not None
        reply, state = self.pool.answer(queued)
        self.clients.restore(plan.client_id, *state)
        return self._returned(round_idx, reply)

    def _deliver(self, round_idx: int, plan: Plan, server: SplitServer | None
                 ) -> Reply:
        """Deliver one plan and bring its client's reply back."""
        cid = plan.client_id
        try:
            received = self.channel.send(round_idx, cid, "down", plan)
        except ClientVanished as exc:  # the plan never arrives
            return _never_arrived(cid, exc)
        link = None
        split = getattr(plan, "split", None)
        if split is not None:
            if server is None:  # internal: a strategy planned split without serving it
                raise RuntimeError(f"client {cid} was planned split but no server runs")
            server.open(cid, split, client_seed(self.runtime.seed, round_idx, cid))
            link = self._link(round_idx, cid, server)
        try:
            reply = self.runtime.handle(self.clients[cid], received, round_idx, link)
        except ClientVanished as exc:
            assert server is not None
            server.abandon(cid)  # the unfinished batch never reaches the server model
            return TrainReply(cid, None, {"trained": True, "dropped": str(exc)})
        return self._returned(round_idx, reply)

    def _returned(self, round_idx: int, reply: Reply) -> Reply:
        """A client's answer on its way back (counted), unless its client vanished first."""
        try:
            return self.channel.send(round_idx, reply.client_id, "up", reply)
        except ClientVanished as exc:  # it trained, then vanished before uploading
            assert isinstance(reply, TrainReply)
            return dataclasses.replace(reply, update=None,
                                       record={**reply.record, "dropped": str(exc)})

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


def _never_arrived(client_id: ClientId, why: ClientVanished) -> TrainReply:
    """The reply of a client that vanished before its plan arrived."""
    return TrainReply(client_id, None, {"trained": False, "dropped": str(why)}, delivered=False)


def split_messages(clients: ClientStore, batch_size: int) -> Callable[[Train], int]:
    """How many link calls a split client's training on a plan makes (one or two per batch)."""
    def count(plan: Train) -> int:
        rows = clients.num_examples(plan.client_id)
        batches = plan.steps or plan.epochs * -(-rows // batch_size)
        return batches * (2 if plan.split is not None and plan.split.u_shape else 1)
    return count


def make_executor(exp: Experiment, ledger: CommLedger) -> InProcessExecutor:
    """The in-process executor of an experiment, counting transfers in ``ledger``.

    Its schedule is decided here: clients train in batched groups (``train.batch_clients``, at
    most ``federation.resident_clients`` live at once) unless simulated failures are on (they act
    on one client's plan) or the adapters cannot be batched; in ``train.workers`` processes when
    more than one.
    """
    cfg = exp.cfg
    channel: Channel = InProcessChannel(ledger)
    batch = cfg.train.batch_clients
    if exp.clients.resident > 0:
        batch = min(batch, exp.clients.resident)
    if faults_active(cfg.faults):
        profiles = known_profiles(cfg.devices)
        devices = {cid: profiles[info.device] for cid, info in exp.strategy.clients.items()}
        channel = FaultyChannel(channel, cfg.faults, seed=cfg.seed, devices=devices,
                                messages=split_messages(exp.clients, cfg.train.batch_size))
        batch = 0
    if not supports_batching(exp.runtime.binder):
        batch = 0
    workers = resolve_workers(cfg.train.workers, cfg.train.threads, exp.device)
    pool = (ClientPool(cfg, workers, resolve_threads(cfg.train.threads)) if workers > 1
            else None)
    return InProcessExecutor(exp.runtime, exp.clients, channel, batch_clients=batch, pool=pool)
