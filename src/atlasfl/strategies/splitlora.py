"""``splitlora``: the SplitLoRA baseline (Lin et al., arXiv:2407.00952).

Every client is split: it trains the LoRA modules of its first blocks (where ``split.cut`` or the
auto choice of ``atlasfl.phases.split`` puts the cut), one server model trains the rest on every
client's activations, batch by batch, and the client-side adapters are averaged over all clients,
weighted by examples, at the end of each round. ``split.mode=u-shape`` keeps the last blocks,
the head and the labels on the clients. It is ``homolora`` (one rank everywhere) with one global
group and ``split.enabled=always``; ``homolora`` and ``hetlora`` split per ``split.enabled``.
"""

from __future__ import annotations

from atlasfl.strategies.base import register
from atlasfl.strategies.mixed_rank import HomoLoRA


@register
class SplitLoRA(HomoLoRA):
    """Every client split, one server model, client adapters averaged over all clients."""

    name = "splitlora"
    fixed_grouping = "global"
    fixed_split = "always"
