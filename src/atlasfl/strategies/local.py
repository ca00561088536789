"""``local``: every client trains alone; nothing crosses the network."""

from __future__ import annotations

from atlasfl.strategies.base import Strategy, register


@register
class Local(Strategy):
    """Local training only: the lower reference for what collaboration adds."""

    name = "local"
    uploads = False
