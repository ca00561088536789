"""A method as a recipe: one part of each kind, the paper it follows, a line for the listing.

``variant`` derives a recipe by swapping exactly one part (an ablation, or a near relative such
as ``fedavg-task`` of ``fedavg``); ``differing_parts`` names the parts two recipes differ in.
The registry of every method is ``atlasfl.strategies.methods``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from atlasfl.strategies.aggregators import MixedRank, NoAggregation
from atlasfl.strategies.grouping import GroupBy
from atlasfl.strategies.objective import PlainLoss
from atlasfl.strategies.personal import NoPersonalisation
from atlasfl.strategies.rank_plan import NoPlan
from atlasfl.strategies.split_learning import Splitting

PARTS = ("grouping", "ranks", "split", "aggregation", "personal", "objective")


@dataclass(frozen=True)
class Recipe:
    """A method: its parts, the paper it follows and a line for ``atlasfl methods``."""

    name: str
    summary: str
    grouping: GroupBy
    ranks: NoPlan
    split: Splitting
    aggregation: NoAggregation
    personal: NoPersonalisation
    objective: PlainLoss = PlainLoss()
    paper: str = ""
    ablates: str | None = None  # the method this one changes in exactly one part
    pools_data: bool = False  # one client per task holding all its data (centralized)

    def __post_init__(self) -> None:
        if self.split.enabled != "never" and not (self.ranks.plans
                                                  and isinstance(self.aggregation, MixedRank)):
            raise ValueError(f"{self.name}: split learning needs a rank plan and mixed-rank "
                             f"aggregation (the server model's share)")
        if self.personal.name != "none" and not self.aggregation.uploads:
            raise ValueError(f"{self.name}: personalisation needs uploads")
        if self.objective.name == "proximal" and self.split.enabled != "never":
            raise ValueError(f"{self.name}: a proximal term across a cut is not implemented")

    def parts(self) -> dict[str, str]:
        """Part kind -> the name of this recipe's part."""
        return {kind: getattr(self, kind).name for kind in PARTS}



def variant(of: Recipe, name: str, summary: str, paper: str = "", **part: Any) -> Recipe:
    """``of`` with exactly one part swapped: how an ablation or a near relative is made."""
    if len(part) != 1 or not set(part) <= set(PARTS):
        raise ValueError(f"{name}: a variant swaps exactly one of {', '.join(PARTS)}")
    return dataclasses.replace(of, name=name, summary=summary, paper=paper, ablates=of.name,
                               **part)


def differing_parts(a: Recipe, b: Recipe) -> list[str]:
    """The part kinds in which two recipes differ."""
    return [kind for kind in PARTS if getattr(a, kind) != getattr(b, kind)]
