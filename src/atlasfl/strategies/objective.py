"""The local-objective part: what a client minimises besides its task loss.

``plain``: the task loss. ``proximal`` (FedProx, Li et al., arXiv:1812.06127): each batch's loss
adds ``mu/2 ||w - w_received||^2`` over the adapter and head, ``mu`` = ``train.prox_mu``, which
keeps a client's local steps near the model it started the round from (``w_received``: what it
holds after receiving its plan's model). The client computes the term
(``atlasfl.client.training.proximal_term``); the plan only carries ``mu``.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasfl.strategies.context import Context


@dataclass(frozen=True)
class PlainLoss:
    """The task loss alone."""

    name = "plain"

    def proximal(self, ctx: Context) -> float:
        """The proximal strength a Train plan carries (0: none)."""
        return 0.0


@dataclass(frozen=True)
class Proximal(PlainLoss):
    """FedProx's proximal term toward the received model."""

    name = "proximal"

    def proximal(self, ctx: Context) -> float:  # noqa: D102
        return ctx.cfg.train.prox_mu
