"""Every client of a run, with at most ``federation.resident_clients`` of them in memory.

A client's state (adapter, head, AdamW moments) is needed only while it trains or is evaluated.
With ``resident`` > 0 the store keeps that many clients live (least recently used out first) and
spills the others to disk as safetensors (their tensors) plus JSON (optimizer settings), in the
format of the checkpoint; a spilled client is rebuilt from the shared seeded start and its saved
state when it is next used, exactly as a resumed run rebuilds it. With ``resident`` = 0 every
client stays live (the default: no disk traffic). A client's data (its tokenized rows) and task
always stay in memory: they are small next to the state and needed to plan.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from atlasfl.client.state import ClientState
from atlasfl.data.tasks import TaskSpec
from atlasfl.types import ClientId


class ClientStore(Mapping[ClientId, ClientState]):
    """Client id -> live ``ClientState``, building or reloading a client on access."""

    def __init__(self, build: Callable[[ClientId], ClientState], tasks: Mapping[ClientId, TaskSpec],
                 sizes: Mapping[ClientId, int], *, resident: int = 0,
                 release: Callable[[], object] | None = None, release_share: float = 0.1):
        """Clients built by ``build(cid)`` (at the shared start), ``sizes`` their training rows.

        ``release``: gives freed memory back to the system; called once the states spilled since
        its last call reach ``release_share`` of the resident clients' (half the slack of issue
        18's bound, resident x state x 1.2; a call costs ~20 ms on a MiniLM-sized heap).
        """
        self._build, self._tasks, self._sizes = build, dict(tasks), dict(sizes)
        self._resident, self._release, self._share = resident, release, release_share
        self._freed = 0  # bytes of client state spilled since the last release
        self._live: OrderedDict[ClientId, ClientState] = OrderedDict()
        self._spilled: set[ClientId] = set()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        if resident <= 0:
            for cid in sorted(self._tasks):
                self._live[cid] = build(cid)

    # -- the mapping ------------------------------------------------------------------------

    def __getitem__(self, client_id: ClientId) -> ClientState:
        if client_id not in self._tasks:
            raise KeyError(client_id)
        client = self._live.get(client_id)
        if client is not None:
            self._live.move_to_end(client_id)
            return client
        client = self._build(client_id)
        if client_id in self._spilled:
            client.restore(*self._load(client_id))
            self._spilled.discard(client_id)
        self._live[client_id] = client
        self._evict()
        return client

    def __iter__(self) -> Iterator[ClientId]:
        return iter(sorted(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    # -- what is known without building a client --------------------------------------------

    def task(self, client_id: ClientId) -> TaskSpec:
        """The client's task."""
        return self._tasks[client_id]

    def num_examples(self, client_id: ClientId) -> int:
        """The client's training rows."""
        return self._sizes[client_id]

    @property
    def resident(self) -> int:
        """At most this many clients in memory at once (0: all of them)."""
        return self._resident

    @property
    def live(self) -> Sequence[ClientId]:
        """The clients in memory now, least recently used first."""
        return list(self._live)

    # -- checkpoints, without building every client -----------------------------------------

    def checkpoint(self, client_id: ClientId) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The client's tensors and metadata, as ``ClientState.checkpoint`` gives them."""
        if client_id in self._live:
            return self._live[client_id].checkpoint()
        if client_id in self._spilled:
            return self._load(client_id)
        return self._build(client_id).checkpoint()  # the shared start

    def untouched(self, client_id: ClientId) -> bool:
        """Whether the client was never built: it is still at the shared start."""
        return client_id not in self._live and client_id not in self._spilled

    def spilled(self, client_id: ClientId) -> tuple[Path, dict[str, Any]] | None:
        """The safetensors file and metadata of a client that is on disk now, else None."""
        if client_id not in self._spilled or client_id in self._live:
            return None
        path = self._path(client_id)
        return path.with_suffix(".safetensors"), json.loads(path.with_suffix(".json").read_text())

    def restore(self, client_id: ClientId, tensors: dict[str, Tensor], meta: dict[str, Any]
                ) -> None:
        """Put a saved client state back (a spilled client stays on disk)."""
        if self._resident <= 0:
            self[client_id].restore(tensors, meta)
            return
        self._live.pop(client_id, None)
        self._save(client_id, tensors, meta)

    # -- disk ---------------------------------------------------------------------------------

    def _evict(self) -> None:
        while self._resident > 0 and len(self._live) > self._resident:
            client_id, client = self._live.popitem(last=False)
            tensors, meta = client.checkpoint()
            self._save(client_id, tensors, meta)
            state = sum(t.numel() * t.element_size() for t in tensors.values())
            self._freed += state
            del client, tensors
            if (self._release is not None
                    and self._freed >= self._share * self._resident * state):
                self._release()
                self._freed = 0

    def _path(self, client_id: ClientId) -> Path:
        if self._dir is None:  # removed with the store
            self._dir = tempfile.TemporaryDirectory(prefix="atlasfl-clients-")
        return Path(self._dir.name) / f"client-{client_id}"

    def _save(self, client_id: ClientId, tensors: dict[str, Tensor], meta: dict[str, Any]
              ) -> None:
        path = self._path(client_id)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(meta))
        self._spilled.add(client_id)

    def _load(self, client_id: ClientId) -> tuple[dict[str, Tensor], dict[str, Any]]:
        path = self._path(client_id)
        tensors = load_file(str(path.with_suffix(".safetensors")))
        return tensors, json.loads(path.with_suffix(".json").read_text())
