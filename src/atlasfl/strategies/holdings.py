"""What each client holds, as far as the server knows: one store for every part's deliveries.

A plan carries only what its client lacks, and the client holds it once it has answered the plan.
Three things travel that way; each part computes its own, and this store alone records what
reached whom:

- ``group``: the tag (``group@round``, ``Groups.tag``) of the latest group aggregate the client
  received; a client whose group has a newer one is sent it (``lacks_group``);
- ``own``: the round of its own model (Laplacian personalisation, ``PersonalState.stepped``)
  the client received;
- ``ranks``: the clients that received their planned rank map (Phase 2).

A client whose update was refused is forgotten (``forget``): its model is unknown, so it is sent
its group's or its own model again. A plan that never arrived changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.strategies.groups import Groups


@dataclass(frozen=True)
class Holdings:
    """What every client holds (checkpointed with the server state)."""

    group: dict[str, str] = field(default_factory=dict)  # client -> tag of its group's aggregate
    own: dict[str, int] = field(default_factory=dict)  # client -> round of its own model
    ranks: tuple[int, ...] = ()  # clients holding their planned rank map

    def lacks_group(self, groups: Groups, client_id: ClientId) -> bool:
        """Whether a client's group has an aggregate the client does not hold yet."""
        tag = groups.tag(client_id)
        return tag is not None and self.group.get(str(client_id)) != tag

    def received(self, client_ids: Iterable[ClientId], groups: Groups,
                 stepped: Mapping[str, int]) -> Holdings:
        """These clients answered a plan: they hold their group's latest aggregate and own model.

        ``stepped``: the round each client's own model was set (``PersonalState.stepped``).
        """
        group, own = dict(self.group), dict(self.own)
        for cid in client_ids:
            tag = groups.tag(cid)
            if tag is not None:
                group[str(cid)] = tag
            if str(cid) in stepped:
                own[str(cid)] = stepped[str(cid)]
        return dataclasses.replace(self, group=group, own=own)

    def forget(self, client_ids: Iterable[ClientId]) -> Holdings:
        """These clients' models are unknown (an update was refused): send them theirs again.

        Before their group's first aggregate (or their own first model) there is nothing to
        send; they keep what they have.
        """
        drop = {str(c) for c in client_ids}
        return dataclasses.replace(
            self, group={c: t for c, t in self.group.items() if c not in drop},
            own={c: r for c, r in self.own.items() if c not in drop})

    def with_ranks(self, client_ids: Iterable[ClientId]) -> Holdings:
        """These clients hold their planned rank map."""
        return dataclasses.replace(self, ranks=tuple(sorted({*self.ranks, *client_ids})))
