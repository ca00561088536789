"""Phase 3, planning: where each client cuts the model (split learning).

A split client holds the embeddings and the first ``cut`` blocks (and, U-shape, the last ``tail``
blocks, the final norm and the head); the server runs the rest (SplitLoRA, Lin et al.,
arXiv:2407.00952; per-device cuts as in HSplitLoRA, Lin et al., arXiv:2505.02795). For each
candidate cut, ``cut_options`` estimates:

- **memory**: the client part's training peak (``split_memory``): the Phase 2 memory model of the
  blocks it holds (``estimate_memory`` with ``blocks_held``) plus the message buffers: the copy
  of the activations it sends and the gradient it receives (twice that in U-shape), in the
  activation dtype;
- **time per batch**: client compute at the device's speed + bytes at its links + server compute::

      t(s) = 2 F (s + t) / (c * F_ref) + 2 F (L - s - t) / (c_server * F_ref)
             + 8 up / uplink + 8 down / downlink

  with F the forward FLOPs of one block (``block_flops``; the backward of frozen weights costs
  about one forward more: only input gradients), c the profile's compute relative to
  laptop-8gb and F_ref = ``REFERENCE_FLOPS``;
- **bytes per batch** each way (``message_bytes``): hidden states, mask and labels up, the
  gradient (and the loss) down; U-shape adds the hidden states coming back and their gradient.

``choose_cut`` picks, among the cuts that fit the device's memory, the one with the least
estimated time (ties: the smaller cut, which holds less). ``split.min_cut`` is a privacy floor:
activations of shallow cuts are the easiest to invert to the input text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from atlasfl.errors import AtlasError
from atlasfl.phases.memory import ModelDims, estimate_memory

# laptop-8gb's sustained fp32 training throughput (compute 1.0): a 2-core laptop CPU; only ratios
# between devices and the server matter for the choice, the absolute value scales the estimate
REFERENCE_FLOPS = 1e11
INDEX_BYTES = 8  # attention masks and class labels are int64
LOSS_BYTES = 4


@dataclass(frozen=True)
class CutOption:
    """One candidate cut of one client, with its estimates."""

    cut: int  # blocks the client runs first
    tail: int  # blocks it runs last (U-shape), else 0
    memory_bytes: int  # the client part's training peak
    seconds_per_batch: float
    up_bytes: int  # per batch, client to server
    down_bytes: int  # per batch, server to client
    fits: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``clients.json``."""
        return asdict(self)


def block_flops(dims: ModelDims, *, batch_size: int, seq_len: int) -> int:
    """Forward FLOPs of one transformer block: its weights and the two attention products."""
    tokens = batch_size * seq_len
    return 2 * dims.block_params * tokens + 4 * batch_size * seq_len**2 * dims.attention_width


def message_bytes(dims: ModelDims, *, batch_size: int, seq_len: int, act_bytes: int,
                  u_shape: bool) -> tuple[int, int]:
    """Bytes one training batch sends (up, down) across the cut(s)."""
    hidden = batch_size * seq_len * dims.hidden * act_bytes
    mask = batch_size * seq_len * INDEX_BYTES
    if u_shape:  # hidden + mask up, hidden down; the second cut's gradient up, the first's down
        return hidden + mask + hidden, hidden + hidden
    return hidden + mask + batch_size * INDEX_BYTES, hidden + LOSS_BYTES


def split_memory(dims: ModelDims, modules: Sequence[tuple[int, int, int]], *, cut: int,
                 tail: int, batch_size: int, seq_len: int, act_bytes: int, head_params: int = 0,
                 lora_dropout: bool = False) -> int:
    """Training peak (bytes) of a client holding ``cut`` first and ``tail`` last blocks.

    ``modules``: (rank, in, out) of the LoRA modules in those blocks; ``head_params`` counts only
    in U-shape (the vanilla head is on the server); ``act_bytes``: the activation dtype's size.
    """
    if tail < 0 or cut < 0 or cut + tail > dims.num_layers:
        raise AtlasError(f"cut {cut} + tail {tail} must fit in {dims.num_layers} blocks")
    est = estimate_memory(dims, modules, batch_size=batch_size, seq_len=seq_len,
                          blocks_held=cut + tail, head_params=head_params if tail else 0,
                          final=tail > 0, lora_dropout=lora_dropout)
    buffers = (4 if tail else 2) * batch_size * seq_len * dims.hidden * act_bytes
    return est.total + buffers


def cut_options(dims: ModelDims, cuts: Sequence[int], *, tail: int,
                memory_of: Callable[[int], int], budget_bytes: int, batch_size: int,
                seq_len: int, act_bytes: int, compute: float, server_compute: float,
                uplink_mbps: float, downlink_mbps: float) -> list[CutOption]:
    """Estimates of every candidate cut (``memory_of(cut)``: the client part's peak)."""
    flops = block_flops(dims, batch_size=batch_size, seq_len=seq_len)
    out = []
    for cut in cuts:
        if not 0 <= cut <= dims.num_layers - tail - 1:
            raise AtlasError(f"cut {cut} leaves the server no block of {dims.num_layers} "
                             f"(tail {tail}); allowed: 0..{dims.num_layers - tail - 1}")
        up, down = message_bytes(dims, batch_size=batch_size, seq_len=seq_len,
                                 act_bytes=act_bytes, u_shape=tail > 0)
        client = 2 * flops * (cut + tail) / (compute * REFERENCE_FLOPS)
        server = 2 * flops * (dims.num_layers - cut - tail) / (server_compute * REFERENCE_FLOPS)
        link = 8 * up / (uplink_mbps * 1e6) + 8 * down / (downlink_mbps * 1e6)
        memory = memory_of(cut)
        out.append(CutOption(cut, tail, memory, client + server + link, up, down,
                             memory <= budget_bytes))
    return out


def choose_cut(options: Sequence[CutOption]) -> CutOption | None:
    """The fitting option with the least time per batch (ties: smaller cut); None if none fits."""
    fitting = [o for o in options if o.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda o: (o.seconds_per_batch, o.cut))
