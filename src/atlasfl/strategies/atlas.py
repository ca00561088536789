"""``atlas``: the four phases composed, and its ablations by name.

One round of ``atlas``, in order (each step is one phase's module; this is the only place they
meet):

1. **Fingerprints -> clusters and graph** (round 1, and every ``clustering.recluster_every``
   rounds): every client uploads a gradient fingerprint (``phases.fingerprint``, optionally
   with DP noise) and its module importance from the same gradients; the server clusters them and
   picks k itself (``phases.clustering``); the client graph joins clients of one cluster with
   RBF weights in the clustering's geometry (``phases.laplacian.client_graph``; optional weak
   edges across clusters with ``laplacian.cross_weight``). Written to ``graph.json``.
2. **Rank plan** (``phases.ranks``): per-module ranks for each client from its importance
   spectrum under its device's memory and the device-proportional parameter budget
   (``ranks.utility=spectrum``, ``ranks.budget=device``: the pair that met Phase 2's targets).
   Written to ``clients.json``.
3. **Split where a device needs it** (``phases.split``, ``split.enabled=auto``): a client
   whose device cannot hold the whole model trains its first blocks and exchanges activations
   and gradients with its cluster's server model every batch. Cuts are in ``clients.json``.
4. **Local training** on each sampled client, from its own model.
5. **Per-cluster mixed-rank aggregate** (``phases.aggregation``, exact stacking): it trains the
   server models of split learning and starts clients that have not trained yet.
6. **The Laplacian step** on the clients' own models (``strategies.laplacian``): each trained
   client moves toward its neighbours, ``W_k - eta lam sum_l a_kl (W_k - W_l)``, in product
   space when ranks differ, and receives its own next model.

FedAvg within a cluster is the step on a complete graph with unit weights at eta lam = 1/N, so
``laplacian.lam`` interpolates between ``local`` (0) and ``fedavg-cluster``;
``atlasfl sweep --set laplacian.lam=...`` shows the curve.

Ablations (each removes one part, everything else as ``atlas``): ``atlas-no-laplacian`` (every
client gets its cluster's aggregate: ``hetlora`` over found clusters), ``atlas-no-split`` (weak
devices are not split; those that cannot hold the model are refused or excluded per
``ranks.on_infeasible``), ``atlas-homo-rank`` (rank ``model.lora.r`` everywhere),
``atlas-oracle-clusters`` (groups and graph edges by the true task).
"""

from __future__ import annotations

from typing import ClassVar

from atlasfl.strategies.base import register
from atlasfl.strategies.hetlora import HetLoRA
from atlasfl.strategies.laplacian import Laplacian
from atlasfl.types import Grouping


@register
class Atlas(Laplacian, HetLoRA):
    """ATLAS: clusters and graph from fingerprints, device ranks, split, Laplacian step."""

    name = "atlas"
    fixed_grouping: ClassVar[Grouping | None] = "cluster"


@register
class AtlasNoLaplacian(HetLoRA):
    """Ablation: each client receives its cluster's aggregate instead of the Laplacian step."""

    name = "atlas-no-laplacian"
    fixed_grouping = "cluster"


@register
class AtlasNoSplit(Atlas):
    """Ablation: no split learning (a device that cannot hold the model does not join)."""

    name = "atlas-no-split"
    fixed_split = "never"


@register
class AtlasHomoRank(Laplacian):
    """Ablation: rank ``model.lora.r`` for every client and module (no rank plan)."""

    name = "atlas-homo-rank"
    fixed_grouping = "cluster"


@register
class AtlasOracleClusters(Atlas):
    """Ablation: groups and graph edges by the true task instead of the found clusters."""

    name = "atlas-oracle-clusters"
    fixed_grouping = "task"
