"""``centralized``: the clients' data of each task pooled into one trainer (an upper reference).

Not a federated method: it shows what the same model reaches when the data of a task could be
moved. The runner builds one client per task from the union of that task's client splits.
"""

from __future__ import annotations

from atlasfl.strategies.base import Strategy, register


@register
class Centralized(Strategy):
    """Pooled training per task; no aggregation."""

    name = "centralized"
    uploads = False
    pools_data = True
