"""The personalisation part: what of a client's model stays its own.

``none``: every client receives its group's model. ``shared-a`` (FedSA-LoRA, Guo et al.,
arXiv:2410.01463): clients upload only their A factors, the group averages them, and B factors
and heads never leave the client. ``laplacian`` (Phase 4, MIRA, Elbakary et al., arXiv:2410.15524):
the server keeps each client's OWN model (adapter and head) and never replaces it by a group
average:

1. Before round 1 (and at every re-clustering) every client uploads its Phase 1 fingerprint; the
   server builds the client graph from the clustering's similarity, with edges within each group
   (``atlasfl.phases.laplacian.client_graph``; ``laplacian.*``) and writes it to ``graph.json``.
2. After local training the server takes every trained client's upload (a split client's
   completed with its group's server copies), and every other client's latest model, and applies
   MIRA's step ``W_k - eta lam sum_l a_kl (W_k - W_l)`` to the trained clients only: a client not
   sampled keeps its model and still pulls its neighbours. Heads step among neighbours with the
   same label space. ``laplacian.space=auto`` steps the factors when every client has the same
   ranks and the products ``s B A`` (re-factorised to each client's ranks) when they differ.
3. Each client receives its own new model with its next plan; a client whose step left its model
   unchanged (lambda 0, or no neighbour) already holds it and receives nothing.

A client that has not trained yet has no model of its own on the server: it receives its group's
latest aggregate, as a newcomer to a cluster would. Group aggregates are also what the server side
of split learning trains with. FedAvg within a cluster is the step on a complete graph with unit
weights at eta lam = 1/N, so ``laplacian.lam`` interpolates between ``local`` (0) and FedAvg
within groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atlasfl.errors import AtlasError
from atlasfl.messages import Model, ProbeReply, Shares, Update
from atlasfl.phases.laplacian import client_graph, laplacian_step
from atlasfl.runfiles import GRAPH_FILE
from atlasfl.strategies.context import Context
from atlasfl.strategies.state import ServerState
from atlasfl.types import AdapterState, ClientId, LaplacianSpace


@dataclass(frozen=True)
class NoPersonalisation:
    """Every client receives its group's model."""

    name = "none"
    needs_graph = False  # fingerprints at every (re)clustering, whatever the grouping
    own_models = False  # the server keeps each client's own model
    shares: Shares = "all"  # what a trained client uploads

    def next_model(self, ctx: Context, state: ServerState, client_id: ClientId,
                   group_model: Callable[[], Model]) -> Model:
        """The adapter and head a client lacks (``group_model()``: its group's share)."""
        return group_model()

    def build_graph(self, ctx: Context, state: ServerState, replies: Sequence[ProbeReply]
                    ) -> tuple[ServerState, dict[str, float], dict[str, Any]]:
        """The client graph from a probe's fingerprints (state, metrics, files)."""
        return state, {}, {}

    def after_train(self, ctx: Context, state: ServerState, round_idx: int,
                    updates: Sequence[Update]) -> tuple[ServerState, dict[str, float]]:
        """The personal step over the (completed) uploads, after the group aggregation."""
        return state, {}


@dataclass(frozen=True)
class SharedA(NoPersonalisation):
    """Only A factors are uploaded and averaged; B factors and heads stay on each client."""

    name = "shared-a"
    shares: Shares = "lora_A"

    def next_model(self, ctx: Context, state: ServerState, client_id: ClientId,
                   group_model: Callable[[], Model]) -> Model:
        """The group's averaged A factors, never a head (each client keeps its own)."""
        return dataclasses.replace(group_model(), head=None)


@dataclass(frozen=True)
class LaplacianStep(NoPersonalisation):
    """MIRA's Laplacian step over the clients' own models, on the client graph."""

    name = "laplacian"
    needs_graph = True
    own_models = True

    def next_model(self, ctx: Context, state: ServerState, client_id: ClientId,
                   group_model: Callable[[], Model]) -> Model:
        """Its own latest model if it does not hold it; the group's aggregate before it trained."""
        key, own = str(client_id), state.personal
        if key not in own.models:
            return group_model()
        if state.held.own.get(key) == own.stepped[key]:
            return Model()
        return Model(adapter=own.models[key], head=own.heads[key])

    def build_graph(self, ctx: Context, state: ServerState, replies: Sequence[ProbeReply]
                    ) -> tuple[ServerState, dict[str, float], dict[str, Any]]:
        """The client graph over the groups, from the clustering's similarity."""
        if state.groups.similarity is None or not any(r.fingerprint is not None
                                                      for r in replies):
            return state, {}, {}
        ids = sorted(ctx.clients)
        names = [state.groups.group(c) for c in ids]
        labels = [sorted(set(names)).index(n) for n in names]
        lp = ctx.cfg.laplacian
        graph = client_graph(state.groups.similarity.double().cpu().numpy(), labels,
                             kind=lp.graph, k=lp.k, cross_weight=lp.cross_weight)
        top = float(np.linalg.eigvalsh(graph.laplacian).max()) if len(ids) else 0.0
        eta = lp.fixed_eta or (1.0 / top if top > 0 else 1.0)
        if eta * lp.lam * top >= 2.0:
            raise AtlasError(
                f"laplacian.eta * laplacian.lam = {eta * lp.lam:g} makes the step diverge on "
                f"this client graph (largest Laplacian eigenvalue {top:.3f}); allowed: "
                f"eta * lam < {2.0 / top:.3f}"
                + ("" if lp.fixed_eta else " (with eta auto: lam < 2)"))
        tasks = [ctx.clients[c].task for c in ids]
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
        personal = dataclasses.replace(state.personal, adjacency=torch.from_numpy(adj), eta=eta)
        return dataclasses.replace(state, personal=personal), metrics, {GRAPH_FILE: document}

    def after_train(self, ctx: Context, state: ServerState, round_idx: int,
                    updates: Sequence[Update]) -> tuple[ServerState, dict[str, float]]:
        """The step of the trained clients; each receives its own new model next."""
        if not updates:
            return state, {}
        own = state.personal
        if own.adjacency is None:  # internal: the probe of round 1 builds the graph
            raise RuntimeError(f"{ctx.method}: no client graph before training")
        models = {**own.models, **{str(u.client_id): u.adapter for u in updates}}
        heads = {**own.heads, **{str(u.client_id): u.head for u in updates}}
        trained = {str(u.client_id) for u in updates}
        stepped_models, stepped_heads = _step(ctx, own.adjacency.cpu().numpy(), own.eta, models,
                                              heads, trained)
        stepped, holds = dict(own.stepped), dict(state.held.own)
        change = []
        for c in sorted(trained, key=int):
            stepped[c] = round_idx
            before = {**models[c], **{f"head/{k}": v for k, v in heads[c].items()}}
            after = {**stepped_models[c], **{f"head/{k}": v for k, v in stepped_heads[c].items()}}
            if all(torch.equal(before[k], after[k]) for k in before):
                holds[c] = round_idx  # unchanged: the client holds it already
            change.append(_relative_change(before, after))
        personal = dataclasses.replace(own, models={**models, **stepped_models},
                                       heads={**heads, **stepped_heads}, stepped=stepped)
        return (dataclasses.replace(state, personal=personal,
                                    held=dataclasses.replace(state.held, own=holds)),
                {"laplacian_change": float(np.mean(change))})


def laplacian_space(ctx: Context, models: Sequence[AdapterState]) -> LaplacianSpace:
    """``laplacian.space``; auto: factors when all clients' tensors have equal shapes."""
    space = ctx.cfg.laplacian.space
    if space != "auto":
        return space
    shapes = [{k: tuple(v.shape) for k, v in m.items()} for m in models]
    return "factors" if all(s == shapes[0] for s in shapes) else "product"


def _step(ctx: Context, adjacency: np.ndarray, eta: float, models: dict[str, AdapterState],
          heads: dict[str, AdapterState], trained: set[str]
          ) -> tuple[dict[str, AdapterState], dict[str, AdapterState]]:
    """The Laplacian step of the trained clients over every client with a model.

    Clients without a model yet (never trained) are left out of the graph; heads step within each
    label space (a head is only comparable with heads of its shape).
    """
    lam = ctx.cfg.laplacian.lam
    index = {str(c): i for i, c in enumerate(sorted(ctx.clients))}
    present = sorted(models, key=int)
    sub = adjacency[np.ix_([index[c] for c in present], [index[c] for c in present])]
    rows = [i for i, c in enumerate(present) if c in trained]
    adapters = [models[c] for c in present]
    out = laplacian_step(adapters, sub, eta=eta, lam=lam, space=laplacian_space(ctx, adapters),
                         scaling=ctx.scaling, rows=rows)
    new_models = {present[i]: out[i] for i in rows}
    new_heads: dict[str, AdapterState] = {}
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(present):
        by_shape.setdefault(tuple((k, tuple(v.shape)) for k, v in heads[c].items()),
                            []).append(i)
    for members in by_shape.values():
        moved = laplacian_step([heads[present[i]] for i in members],
                               sub[np.ix_(members, members)], eta=eta, lam=lam,
                               rows=[j for j, i in enumerate(members) if present[i] in trained])
        new_heads.update({present[i]: moved[j] for j, i in enumerate(members)
                          if present[i] in trained})
    return new_models, new_heads


def _relative_change(before: AdapterState, after: AdapterState) -> float:
    num = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before)
    den = sum(float(before[k].double().pow(2).sum()) for k in before)
    return (num / den) ** 0.5 if den else 0.0
