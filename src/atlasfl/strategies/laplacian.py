"""Phase 4 in a strategy: each client keeps its own model; the Laplacian step personalises it.

``Laplacian`` turns a rank strategy (``homolora``, ``hetlora``) into a personalised one. The
server keeps each client's OWN model (adapter and head) and never replaces it by a group average:

1. Before round 1 (and at every re-clustering) every client uploads its Phase 1 fingerprint;
   the server builds the client graph from the clustering's similarity, with edges within each
   group (``atlasfl.phases.laplacian.client_graph``; ``laplacian.*``) and writes it to
   ``graph.json`` in the run folder.
2. After local training the server takes every trained client's upload (a split client's
   completed with its group's server copies), and every other client's latest model, and applies
   MIRA's step ``W_k - eta lam sum_l a_kl (W_k - W_l)`` to the trained clients only: a client not
   sampled keeps its model and still pulls its neighbours. Heads step among neighbours with the
   same label space. ``laplacian.space=auto`` steps the factors when every client has the same
   ranks and the products ``s B A`` (re-factorised to each client's ranks) when they differ.
3. Each client receives its own new model with its next plan; a client whose step left its
   model unchanged (lambda 0, or no neighbour) already holds it and receives nothing.

A client that has not trained yet has no model of its own on the server: it receives its
group's latest aggregate (the group machinery of ``atlasfl.strategies.fedavg``), as a newcomer
to a cluster would. Group aggregates are also what the server side of split learning trains
with (one server model per group). With lambda 0 every client keeps exactly what it trained:
the run is ``local`` (same ranks, no split).

``mira`` (below) is the method of Elbakary et al., arXiv:2410.15524: one graph over all clients,
no clustering, equal ranks, no split. ``atlas`` (``atlasfl.strategies.atlas``) composes all four
phases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atlasfl.errors import AtlasError
from atlasfl.messages import EvaluateReply, Model, ProbeReply, TrainReply
from atlasfl.phases.laplacian import client_graph, laplacian_step
from atlasfl.strategies.base import RoundInfo, RoundOutcome, register
from atlasfl.strategies.groups import recluster_due
from atlasfl.strategies.mixed_rank import HomoLoRA, RankState
from atlasfl.types import AdapterState, ClientId, LaplacianSpace

GRAPH_FILE = "graph.json"


@dataclass(frozen=True)
class PersonalState(RankState):
    """A rank strategy's state plus every client's own model and the client graph."""

    models: dict[str, AdapterState] = field(default_factory=dict)  # client -> own adapter
    heads: dict[str, AdapterState] = field(default_factory=dict)  # client -> own head
    stepped: dict[str, int] = field(default_factory=dict)  # client -> round its model was set
    holds: dict[str, int] = field(default_factory=dict)  # client -> round of the model it holds
    adjacency: Tensor | None = None  # (N, N) client graph, clients in id order
    eta: float = 0.0  # the step size (laplacian.eta, or 1 / the graph's largest eigenvalue)


class Laplacian(HomoLoRA):
    """Personalisation by MIRA's Laplacian step over the clients' own models (a mixin base)."""

    personal_delivery = False  # clients receive their own models, not shares of an aggregate

    def init(self) -> PersonalState:  # noqa: D102
        base = super().init()
        return PersonalState(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})

    def fingerprints_due(self, round_idx: int) -> bool:
        """The graph needs fingerprints whatever the grouping: round 1 and every re-clustering."""
        return recluster_due(self.cfg, round_idx)

    # -- the graph ----------------------------------------------------------------------------

    def aggregate_probe(self, state: Any, rnd: RoundInfo,
                        replies: Sequence[ProbeReply]) -> RoundOutcome:
        """Groups (and ranks) as the base strategy; then the client graph over the groups."""
        outcome = super().aggregate_probe(state, rnd, replies)
        new: PersonalState = outcome.state
        if new.groups.similarity is None or not any(r.fingerprint is not None for r in replies):
            return outcome
        ids = sorted(self.clients)
        names = [new.groups.group(c) for c in ids]
        labels = [sorted(set(names)).index(n) for n in names]
        lp = self.cfg.laplacian
        graph = client_graph(new.groups.similarity.double().cpu().numpy(), labels,
                             kind=lp.graph, k=lp.k, cross_weight=lp.cross_weight)
        top = float(np.linalg.eigvalsh(graph.laplacian).max()) if len(ids) else 0.0
        eta = lp.fixed_eta or (1.0 / top if top > 0 else 1.0)
        if eta * lp.lam * top >= 2.0:
            raise AtlasError(
                f"laplacian.eta * laplacian.lam = {eta * lp.lam:g} makes the step diverge on "
                f"this client graph (largest Laplacian eigenvalue {top:.3f}); allowed: "
                f"eta * lam < {2.0 / top:.3f}"
                + ("" if lp.fixed_eta else " (with eta auto: lam < 2)"))
        tasks = [self.clients[c].task for c in ids]
        same = np.equal.outer(tasks, tasks) & ~np.eye(len(ids), dtype=bool)
        adj = graph.adjacency
        metrics = {"graph_edges": float((adj[np.triu_indices(len(ids), 1)] > 0).sum()),
                   "graph_lambda_max": top, "laplacian_eta": eta,
                   # of the edge weight, the share joining clients of one true task (scoring only)
                   "graph_same_task_weight": float(adj[same].sum() / adj.sum()) if adj.sum()
                   else 0.0}
        document = {"clients": ids, "group": names, "task": tasks, "kind": lp.graph,
                    "bandwidth": graph.bandwidth, "cross_weight": lp.cross_weight,
                    "lambda_max": top, "eta": eta, "lam": lp.lam,
                    "adjacency": adj.round(6).tolist()}
        return dataclasses.replace(
            outcome, state=dataclasses.replace(new, adjacency=torch.from_numpy(adj), eta=eta),
            metrics={**outcome.metrics, **metrics}, files={**outcome.files, GRAPH_FILE: document})

    # -- delivery -----------------------------------------------------------------------------

    def next_model(self, state: Any, client_id: ClientId) -> Model:
        """Its own latest model if it does not hold it; the group's aggregate before it trained."""
        key = str(client_id)
        if key not in state.models:
            return super().next_model(state, client_id)
        if state.holds.get(key) == state.stepped[key]:
            return Model()
        return Model(adapter=state.models[key], head=state.heads[key])

    def acknowledge_own(self, state: PersonalState, client_ids: Sequence[ClientId]
                        ) -> PersonalState:
        """These clients replied to a plan: they hold their latest own model now."""
        holds = dict(state.holds)
        holds.update({str(c): state.stepped[str(c)] for c in client_ids
                      if str(c) in state.stepped})
        return dataclasses.replace(state, holds=holds)

    def aggregate_evaluate(self, state: Any, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """As the base strategy; the evaluated clients hold their own latest models."""
        outcome = super().aggregate_evaluate(state, rnd, replies)
        return dataclasses.replace(outcome, state=self.acknowledge_own(
            outcome.state, [r.client_id for r in replies if r.delivered]))

    # -- the step -----------------------------------------------------------------------------

    def space(self, models: Sequence[AdapterState]) -> LaplacianSpace:
        """``laplacian.space``; auto: factors when all clients' tensors have equal shapes."""
        space = self.cfg.laplacian.space
        if space != "auto":
            return space
        shapes = [{k: tuple(v.shape) for k, v in m.items()} for m in models]
        return "factors" if all(s == shapes[0] for s in shapes) else "product"

    def aggregate_train(self, state: Any, rnd: RoundInfo,
                        replies: Sequence[TrainReply]) -> RoundOutcome:
        """Group aggregates as the base strategy (server models, newcomers); then the step."""
        # a refused client is forgotten: its next plan carries its own last accepted model
        state = self.acknowledge_own(state, [r.client_id for r in replies
                                             if r.update is not None])
        refused = {str(r.client_id) for r in replies if r.update is None}
        state = dataclasses.replace(state, holds={c: v for c, v in state.holds.items()
                                                  if c not in refused})
        outcome = super().aggregate_train(state, rnd, replies)
        updates = [r.update for r in self.completed(state, rnd, replies)
                   if r.update is not None]
        if not updates:
            return outcome
        new: PersonalState = outcome.state
        if new.adjacency is None:  # internal: the probe of round 1 builds the graph
            raise RuntimeError(f"{self.name}: no client graph before training")
        models = {**new.models, **{str(u.client_id): u.adapter for u in updates}}
        heads = {**new.heads, **{str(u.client_id): u.head for u in updates}}
        trained = {str(u.client_id) for u in updates}
        stepped_models, stepped_heads = self.step(new.adjacency.cpu().numpy(), new.eta, models,
                                                  heads, trained)
        stepped, holds = dict(new.stepped), dict(new.holds)
        change = []
        for c in sorted(trained, key=int):
            stepped[c] = rnd.round_idx
            before = {**models[c], **{f"head/{k}": v for k, v in heads[c].items()}}
            after = {**stepped_models[c], **{f"head/{k}": v for k, v in stepped_heads[c].items()}}
            if all(torch.equal(before[k], after[k]) for k in before):
                holds[c] = rnd.round_idx  # unchanged: the client holds it already
            change.append(_relative_change(before, after))
        metrics = {**outcome.metrics, "laplacian_change": float(np.mean(change))}
        return dataclasses.replace(outcome, metrics=metrics, state=dataclasses.replace(
            new, models={**models, **stepped_models}, heads={**heads, **stepped_heads},
            stepped=stepped, holds=holds))

    def step(self, adjacency: np.ndarray, eta: float, models: dict[str, AdapterState],
             heads: dict[str, AdapterState], trained: set[str]
             ) -> tuple[dict[str, AdapterState], dict[str, AdapterState]]:
        """The Laplacian step of the trained clients over every client with a model.

        Clients without a model yet (never trained) are left out of the graph; heads step within
        each label space (a head is only comparable with heads of its shape).
        """
        lp = self.cfg.laplacian
        index = {str(c): i for i, c in enumerate(sorted(self.clients))}
        present = sorted(models, key=int)
        sub = adjacency[np.ix_([index[c] for c in present], [index[c] for c in present])]
        rows = [i for i, c in enumerate(present) if c in trained]
        adapters = [models[c] for c in present]
        out = laplacian_step(adapters, sub, eta=eta, lam=lp.lam, space=self.space(adapters),
                             scaling=self.scaling, rows=rows)
        new_models = {present[i]: out[i] for i in rows}
        new_heads: dict[str, AdapterState] = {}
        by_shape: dict[tuple[Any, ...], list[int]] = {}
        for i, c in enumerate(present):
            by_shape.setdefault(tuple((k, tuple(v.shape)) for k, v in heads[c].items()),
                                []).append(i)
        for members in by_shape.values():
            moved = laplacian_step([heads[present[i]] for i in members],
                                   sub[np.ix_(members, members)], eta=eta, lam=lp.lam,
                                   rows=[j for j, i in enumerate(members)
                                         if present[i] in trained])
            new_heads.update({present[i]: moved[j] for j, i in enumerate(members)
                              if present[i] in trained})
        return new_models, new_heads


def _relative_change(before: AdapterState, after: AdapterState) -> float:
    num = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before)
    den = sum(float(before[k].double().pow(2).sum()) for k in before)
    return (num / den) ** 0.5 if den else 0.0


@register
class Mira(Laplacian):
    """MIRA: one client graph over all clients, equal ranks, the Laplacian step, no split."""

    name = "mira"
    fixed_grouping = "global"
    fixed_split = "never"
