"""The round protocol: typed messages between the server and one client.

A round is a sequence of exchanges. In each, the strategy sends a plan to each of some clients and
every client answers with one reply, as Flower's Message API does (a message has a type, arrays and
a config; its reply likewise). Who sends what::

    server: Strategy                                        client: atlasfl.client
    configure_round -> Probe(fingerprint?, importance?) ----> probe_client
    aggregate_round <- ProbeReply(fingerprint, importance) <-
    configure_round -> Train(model, epochs, steps) ---------> train_client
    aggregate_round <- TrainReply(update: adapter, head) <---
    configure_round -> Evaluate(model) ---------------------> evaluate
    aggregate_round <- EvaluateReply(metrics) <--------------

``model`` is what the client must hold before it acts (``Model``): a rank plan, an adapter, a head;
each is sent only when the client does not hold it yet, so a download is counted when a plan
reaches the client, never for clients the server does not address.

A split client (``Train.split``, Phase 3) also exchanges per-batch messages with the server's
half of the model during its plan: ``Activations`` (hidden states at a cut, the attention mask
and, vanilla only, the labels), ``Gradients`` (the loss gradient at a cut) and, when a vanilla
client evaluates, ``Logits``.

What crosses the network is each message's ``payload``: tensors grouped by kind (``adapter``,
``head``, ``rank_plan``, ``fingerprint``, ``importance``; split: ``activations``, ``labels``,
``activation_grads``, ``eval_activations``, ``eval_logits``), each under its own name (module
paths travel as keys, never rebuilt from an order). The channel copies payloads and counts their
bytes per kind (``atlasfl.engine.channel``). A reply's ``record`` (metrics for the run's rows) and
``seconds`` are scalars and are not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, TypeVar

import numpy as np
import torch

from atlasfl.phases.ranks import KINDS
from atlasfl.types import (
    ActivationDtype,
    AdapterState,
    ClientId,
    FingerprintParams,
    FingerprintStatistic,
    Shares,
)

if TYPE_CHECKING:
    from torch import Tensor

    from atlasfl.config import ClusteringConfig, RanksConfig
    from atlasfl.phases.ranks import Importance
    from atlasfl.types import ImportanceKind

Payload: TypeAlias = "dict[str, dict[str, Tensor]]"  # kind -> name -> tensor


class Message(Protocol):
    """Anything a channel carries: its tensors by kind, and a copy holding other tensors."""

    @property
    def client_id(self) -> ClientId:
        """The client the message goes to or comes from."""
        ...

    def payload(self) -> Payload:
        """The tensors that cross the network, by kind and name."""
        ...

    def with_payload(self, payload: Payload) -> Any:
        """The same message holding ``payload`` (what the receiver got) instead."""
        ...


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Model:
    """What a client must hold before it acts; ``None`` parts it keeps as they are.

    Applied in this order: a rank plan (the client rebuilds its adapter at these per-module
    ranks, fresh optimizer moments), then the adapter's tensors, then the head's.
    """

    ranks: dict[str, int] | None = None  # module path -> rank
    adapter: AdapterState | None = None
    head: AdapterState | None = None

    def payload(self) -> Payload:
        """Tensors by kind; ranks as one int32 per module."""
        out: Payload = {}
        if self.ranks is not None:
            out["rank_plan"] = {m: torch.tensor(r, dtype=torch.int32)
                                for m, r in self.ranks.items()}
        if self.adapter is not None:
            out["adapter"] = self.adapter
        if self.head is not None:
            out["head"] = self.head
        return out

    @classmethod
    def from_payload(cls, payload: Payload) -> Model:
        """Inverse of ``payload``."""
        ranks = payload.get("rank_plan")
        return cls({m: int(t) for m, t in ranks.items()} if ranks is not None else None,
                   payload.get("adapter"), payload.get("head"))


@dataclass(frozen=True)
class FingerprintSpec:
    """Phase 1 settings a client needs to compute its fingerprint (``ClusteringConfig``)."""

    samples: int
    batch_size: int
    layers: int  # the last L transformer blocks
    params: FingerprintParams
    statistic: FingerprintStatistic
    dim: int
    epsilon: float | None  # None: no privacy noise
    delta: float
    clip: float

    @classmethod
    def from_config(cls, c: ClusteringConfig) -> FingerprintSpec:
        """The client-side part of the clustering settings."""
        return cls(c.samples, c.batch_size, c.layers, c.params, c.statistic, c.dim,
                   c.epsilon or None, c.delta, c.clip)


@dataclass(frozen=True)
class ImportanceSpec:
    """Phase 2 settings a client needs to measure its modules' importance."""

    kind: ImportanceKind
    samples: int  # examples when no fingerprint is asked (else the fingerprint's)
    top: int  # singular values per module (kind spectrum)
    batch_size: int

    @classmethod
    def from_config(cls, ranks: RanksConfig, batch_size: int) -> ImportanceSpec:
        """The client-side part of the rank settings."""
        return cls(KINDS[ranks.utility], ranks.samples, ranks.r_max, batch_size)


@dataclass(frozen=True)
class SplitPlan:
    """How a client trains split (Phase 3): where it cuts, and which server model it talks to.

    The client runs the embeddings and blocks ``0 .. cut - 1``; the server the blocks up to
    ``num_layers - tail``; with ``tail`` > 0 (U-shape) the client runs the last ``tail`` blocks,
    the head and the loss too. ``server_model`` names the server-side model (the client's
    group) and ``version`` the round of its latest aggregate. ``window``: batches whose
    messages travel together (``split.window``, see ``atlasfl.client.split_training``).
    """

    cut: int
    tail: int  # 0: vanilla SplitLoRA (the server holds the head, the loss and the labels)
    activation_dtype: ActivationDtype
    server_model: str
    outputs: int  # the head the server uses (vanilla): its number of outputs; 1 = regression
    version: int = 0
    window: int = 1

    @property
    def u_shape(self) -> bool:
        """Whether labels and logits stay on the client."""
        return self.tail > 0


# -- plans (server -> client) ---------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """One gradient pass at the common initial adapter and head (Phases 1 and 2)."""

    kind: ClassVar[str] = "probe"
    client_id: ClientId
    fingerprint: FingerprintSpec | None = None
    importance: ImportanceSpec | None = None

    def payload(self) -> Payload:  # noqa: D102
        return {}

    def with_payload(self, payload: Payload) -> Probe:  # noqa: D102
        return self


@dataclass(frozen=True)
class Train:
    """Receive ``model``, train ``epochs`` (or ``steps`` > 0 optimizer steps), upload if asked."""

    kind: ClassVar[str] = "train"
    client_id: ClientId
    model: Model = field(default_factory=Model)
    epochs: int = 1
    steps: int = 0
    upload: bool = True
    split: SplitPlan | None = None  # None: the client trains the whole model
    shares: Shares = "all"  # what it uploads: adapter and head | lora_A: only the A factors
    proximal: float = 0.0  # > 0: FedProx's mu, the loss adds mu/2 ||w - w_received||^2

    def payload(self) -> Payload:  # noqa: D102
        return self.model.payload()

    def with_payload(self, payload: Payload) -> Train:  # noqa: D102
        return dataclasses.replace(self, model=Model.from_payload(payload))


@dataclass(frozen=True)
class Evaluate:
    """Receive ``model``, then score the client's model on its test and validation splits."""

    kind: ClassVar[str] = "evaluate"
    client_id: ClientId
    model: Model = field(default_factory=Model)
    split: SplitPlan | None = None  # None: the client evaluates the whole model

    def payload(self) -> Payload:  # noqa: D102
        return self.model.payload()

    def with_payload(self, payload: Payload) -> Evaluate:  # noqa: D102
        return dataclasses.replace(self, model=Model.from_payload(payload))


Plan: TypeAlias = "Probe | Train | Evaluate"


# -- replies (client -> server) -------------------------------------------------------------

@dataclass(frozen=True)
class Update:
    """A trained client's adapter and head; ``num_examples`` weighs it in aggregation."""

    client_id: ClientId
    adapter: AdapterState
    head: AdapterState
    num_examples: int


@dataclass(frozen=True)
class ProbeReply:
    """A fingerprint and its noise variance (Phase 1) and/or module importance (Phase 2)."""

    kind: ClassVar[str] = "probe"
    client_id: ClientId
    fingerprint: np.ndarray | None = None  # (dim,) float32
    noise_var: float = 0.0
    importance: Importance | None = None  # module path -> a number or a spectrum
    record: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def payload(self) -> Payload:  # noqa: D102
        out: Payload = {}
        if self.fingerprint is not None:
            out["fingerprint"] = {
                "vector": torch.from_numpy(self.fingerprint),
                "noise_var": torch.tensor([self.noise_var], dtype=torch.float32)}
        if self.importance is not None:  # a number travels as a 0-d tensor, a spectrum as 1-d
            out["importance"] = {m: torch.tensor(v, dtype=torch.float32)
                                 for m, v in self.importance.items()}
        return out

    def with_payload(self, payload: Payload) -> ProbeReply:  # noqa: D102
        fp, imp = payload.get("fingerprint"), payload.get("importance")
        return dataclasses.replace(
            self, fingerprint=None if fp is None else fp["vector"].numpy(),
            noise_var=0.0 if fp is None else float(fp["noise_var"][0]),
            importance=None if imp is None else {m: t.tolist() for m, t in imp.items()})


@dataclass(frozen=True)
class TrainReply:
    """What a client reports after training: its update (None when it uploads nothing)."""

    kind: ClassVar[str] = "train"
    client_id: ClientId
    update: Update | None
    record: dict[str, Any] = field(default_factory=dict)  # train_loss, steps, ...
    seconds: float = 0.0
    delivered: bool = True  # False: the plan never reached the client (it vanished before)

    def payload(self) -> Payload:  # noqa: D102
        if self.update is None:
            return {}
        out: Payload = {"adapter": self.update.adapter}
        if self.update.head:  # a vanilla split client's head is on the server
            out["head"] = self.update.head
        return out

    def with_payload(self, payload: Payload) -> TrainReply:  # noqa: D102
        if self.update is None:
            return self
        return dataclasses.replace(self, update=dataclasses.replace(
            self.update, adapter=payload["adapter"], head=payload.get("head", {})))


@dataclass(frozen=True)
class EvaluateReply:
    """Test metrics (and validation loss/metric) of the client's model."""

    kind: ClassVar[str] = "evaluate"
    client_id: ClientId
    record: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    delivered: bool = True  # False: it failed, so it may not hold what the plan carried

    def payload(self) -> Payload:  # noqa: D102
        return {}

    def with_payload(self, payload: Payload) -> EvaluateReply:  # noqa: D102
        return self


Reply: TypeAlias = "ProbeReply | TrainReply | EvaluateReply"


# -- split learning: per batch, within a Train or Evaluate exchange ---------------------------

@dataclass(frozen=True)
class Activations:
    """Hidden states crossing a cut (either way), with the mask and, in vanilla, the labels.

    Kinds: ``activations`` (hidden states and attention mask) and ``labels`` while training;
    ``eval_activations`` while evaluating (no labels cross then).
    """

    client_id: ClientId
    hidden: Tensor  # (B, T, H) in the plan's activation dtype
    attention_mask: Tensor | None = None  # (B, T), sent with the client's first cut
    labels: Tensor | None = None  # (B,), vanilla training only
    evaluating: bool = False

    def payload(self) -> Payload:  # noqa: D102
        kind = "eval_activations" if self.evaluating else "activations"
        tensors = {"hidden": self.hidden}
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask
        out: Payload = {kind: tensors}
        if self.labels is not None:
            out["labels"] = {"labels": self.labels}
        return out

    def with_payload(self, payload: Payload) -> Activations:  # noqa: D102
        tensors = payload["eval_activations" if self.evaluating else "activations"]
        labels = payload.get("labels")
        return dataclasses.replace(self, hidden=tensors["hidden"],
                                   attention_mask=tensors.get("attention_mask"),
                                   labels=None if labels is None else labels["labels"])


@dataclass(frozen=True)
class Gradients:
    """The loss gradient at a cut (kind ``activation_grads``); from the server, the loss too."""

    client_id: ClientId
    grad: Tensor  # (B, T, H) in the plan's activation dtype
    loss: Tensor | None = None  # () vanilla: the server computed it

    def payload(self) -> Payload:  # noqa: D102
        tensors = {"grad": self.grad}
        if self.loss is not None:
            tensors["loss"] = self.loss
        return {"activation_grads": tensors}

    def with_payload(self, payload: Payload) -> Gradients:  # noqa: D102
        tensors = payload["activation_grads"]
        return dataclasses.replace(self, grad=tensors["grad"], loss=tensors.get("loss"))


@dataclass(frozen=True)
class Logits:
    """Vanilla split evaluation: the server's logits for the client to score (``eval_logits``)."""

    client_id: ClientId
    logits: Tensor  # (B, num_labels)

    def payload(self) -> Payload:  # noqa: D102
        return {"eval_logits": {"logits": self.logits}}

    def with_payload(self, payload: Payload) -> Logits:  # noqa: D102
        return dataclasses.replace(self, logits=payload["eval_logits"]["logits"])


SplitMessage: TypeAlias = "Activations | Gradients | Logits"
