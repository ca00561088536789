"""Every method as a recipe of parts, looked up by name (``atlasfl methods`` lists them).

A recipe names one part of each kind (``atlasfl.strategies.strategy`` drives them):

============= ======================================================================
grouping      ``global`` | ``task`` (oracle) | ``cluster`` (Phase 1) | ``config``
ranks         ``none`` | ``equal`` (``model.lora.r``, memory-checked) | ``device`` (Phase 2)
split         ``never`` | ``always`` | ``auto`` | ``config`` (Phase 3)
aggregation   ``none`` | ``fedavg`` | ``mixed`` (``ranks.aggregation``)
personal      ``none`` | ``shared-a`` (FedSA) | ``laplacian`` (Phase 4)
objective     ``plain`` | ``proximal`` (FedProx, ``train.prox_mu``)
============= ======================================================================

``config`` defers to the run's ``ranks.grouping`` / ``split.enabled``. A ``variant`` of a recipe
(each ablation of ``atlas``) swaps exactly one part, and ``atlasfl methods`` names it. To add a
method, add a recipe here, and a part (one class beside its kind's base) when no existing part
does what it needs.
"""

from __future__ import annotations

from atlasfl.errors import unknown_name
from atlasfl.strategies.aggregators import Mean, MixedRank, NoAggregation
from atlasfl.strategies.grouping import GroupBy
from atlasfl.strategies.objective import Proximal
from atlasfl.strategies.personal import LaplacianStep, NoPersonalisation, SharedA
from atlasfl.strategies.rank_plan import DeviceRanks, EqualRanks, NoPlan
from atlasfl.strategies.recipe import PARTS, Recipe, differing_parts, variant
from atlasfl.strategies.split_learning import Splitting

__all__ = ["METHODS", "PARTS", "Recipe", "differing_parts", "get_method", "variant"]

NONE, FEDAVG, MIXED = NoAggregation(), Mean(), MixedRank()
SHARED, SHARED_A, LAPLACIAN = NoPersonalisation(), SharedA(), LaplacianStep()
NO_PLAN, EQUAL, DEVICE = NoPlan(), EqualRanks(), DeviceRanks()
NEVER, CONFIG_SPLIT = Splitting("never"), Splitting("config")


FEDAVG_RECIPE = Recipe("fedavg", "One adapter averaged over all clients, task-agnostic.",
                       GroupBy("global"), NO_PLAN, NEVER, FEDAVG, SHARED,
                       paper="McMahan et al., arXiv:1602.05629")
HOMOLORA = Recipe("homolora", "One LoRA rank for every client and module; mixed-rank "
                  "aggregation.", GroupBy("config"), EQUAL, CONFIG_SPLIT, MIXED, SHARED)
ATLAS = Recipe("atlas", "ATLAS: clusters and graph from fingerprints, device ranks, split, "
               "Laplacian step.", GroupBy("cluster"), DEVICE, CONFIG_SPLIT, MIXED, LAPLACIAN,
               paper="MIRA's clustering and graph (arXiv:2410.15524), HSplitLoRA's ranks "
                     "(arXiv:2505.02795), SplitLoRA's split (arXiv:2407.00952)")

RECIPES = [
    Recipe("local", "Local training only: the lower reference for what collaboration adds.",
           GroupBy("global"), NO_PLAN, NEVER, NONE, SHARED),
    Recipe("centralized", "Each task's data pooled into one trainer (an upper reference).",
           GroupBy("global"), NO_PLAN, NEVER, NONE, SHARED, pools_data=True),
    FEDAVG_RECIPE,
    variant(FEDAVG_RECIPE, "fedavg-task", "FedAvg within each true task: the oracle "
            "clustering.", grouping=GroupBy("task")),
    variant(FEDAVG_RECIPE, "fedavg-cluster", "FedAvg within the clusters found from gradient "
            "fingerprints.", grouping=GroupBy("cluster")),
    variant(FEDAVG_RECIPE, "fedprox", "FedAvg whose clients add a proximal term toward the "
            "received model.", "Li et al., arXiv:1812.06127", objective=Proximal()),
    variant(FEDAVG_RECIPE, "fedsa", "FedSA-LoRA: A factors averaged over all clients, B "
            "factors and heads kept.", "Guo et al., arXiv:2410.01463", personal=SHARED_A),
    HOMOLORA,
    variant(HOMOLORA, "hetlora", "Per-client, per-module ranks from importance under each "
            "device's memory.", "Cho et al., arXiv:2401.06432", ranks=DEVICE),
    Recipe("splitlora", "Every client split, one server model, client adapters averaged.",
           GroupBy("global"), EQUAL, Splitting("always"), MIXED, SHARED,
           paper="Lin et al., arXiv:2407.00952"),
    Recipe("mira", "MIRA: one client graph over all clients, equal ranks, the Laplacian step.",
           GroupBy("global"), EQUAL, NEVER, MIXED, LAPLACIAN,
           paper="Elbakary et al., arXiv:2410.15524"),
    ATLAS,
    variant(ATLAS, "atlas-no-laplacian", "Ablation: each client receives its cluster's "
            "aggregate.", personal=SHARED),
    variant(ATLAS, "atlas-no-split", "Ablation: no split learning (a device that cannot hold "
            "the model does not join).", split=NEVER),
    variant(ATLAS, "atlas-homo-rank", "Ablation: rank model.lora.r for every client and "
            "module.", ranks=EQUAL),
    variant(ATLAS, "atlas-oracle-clusters", "Ablation: groups and graph edges by the true "
            "task.", grouping=GroupBy("task")),
]
METHODS: dict[str, Recipe] = {r.name: r for r in RECIPES}


def get_method(name: str) -> Recipe:
    """Look up a method's recipe by name."""
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]
