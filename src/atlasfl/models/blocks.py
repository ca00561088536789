"""Cutting a model between blocks: run any contiguous range of its transformer blocks.

Split learning (SplitLoRA, Lin et al., arXiv:2407.00952) runs the embeddings and the first ``s``
blocks on the client and the rest on the server; the U-shape variant (Vepakomma et al.,
arXiv:1812.00564) keeps the last ``t`` blocks, the final norm and the head on the client too.
``run_blocks(model, num_layers, start, stop, ...)`` runs blocks ``start .. stop - 1`` of the ONE
shared backbone, without copying it and without a list of names per family:

- the blocks are found by index, as the fingerprints find them (``transformer_blocks``: the
  module list of ``num_layers`` blocks), so BERT, RoBERTa, DistilBERT, GPT-2, Llama and Qwen
  work alike;
- from hidden states (the server's side): the model's forward is called on placeholder
  embeddings of the right shape while its block list holds only blocks ``start..`` (swapped for
  the call), and a pre-hook on block ``start`` replaces its input by the received hidden states.
  The model still builds its attention mask, positions and rotary tables from the mask and the
  shape, exactly as for the whole model, so no family-specific code is needed. Token ids never
  reach this side;
- ``stop < num_layers``: a hook on block ``stop - 1`` ends the forward with that block's
  output (what crosses the cut); ``stop == num_layers`` returns the model's last hidden state,
  after the final norm when the family has one.

Autograd sees the same operations on the same tensors as in the unsplit forward, so a split step
computes the unsplit loss and gradients (``tests/models/test_split.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from torch import Tensor, nn

from atlasfl.errors import AtlasError
from atlasfl.phases.fingerprint import transformer_blocks

T = TypeVar("T")


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    """Ends a forward at the cut, carrying the hidden states that cross it."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise AtlasError("the transformer blocks' list has no parent module")  # internal


@contextlib.contextmanager
def _blocks_from(model: nn.Module, blocks: nn.ModuleList, start: int) -> Iterator[None]:
    """While open, the model's block list holds only blocks ``start..``."""
    if start == 0:
        yield
        return
    parent, name = _parent_of(model, blocks)
    # a plain list assignment would bypass nn.Module's registry; _modules is what forward reads
    parent._modules[name] = nn.ModuleList(list(blocks)[start:])
    try:
        yield
    finally:
        parent._modules[name] = blocks


def check_range(num_layers: int, start: int, stop: int) -> None:
    """Refuse a block range outside ``0 <= start < stop <= num_layers`` (or 0..0: embeddings)."""
    if not (0 <= start < stop <= num_layers or start == stop == 0):
        raise AtlasError(f"block range {start}..{stop - 1} is invalid for a model of "
                         f"{num_layers} blocks; allowed: 0 <= start < stop <= {num_layers}, or "
                         f"start = stop = 0 (the embeddings only)")


def run_blocks(model: nn.Module, num_layers: int, start: int, stop: int, *,
               batch: dict[str, Tensor] | None = None, hidden: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
    """Hidden states after blocks ``start .. stop - 1`` of the (LoRA-bound) shared model.

    Args:
        model: the backbone (with LoRA injected, bound to the adapter this part trains).
        num_layers: its number of blocks.
        start: the first block to run.
        stop: one past the last block; ``num_layers`` ends with the model's last hidden state
            (final norm included), any smaller value with block ``stop - 1``'s output, and 0
            (with ``start`` 0) with the embeddings' output.
        batch: the tokenised batch (``input_ids``, ``attention_mask``, ...): start from the
            token ids (``start`` 0).
        hidden: instead, the hidden states entering block ``start`` (B, T, H) (the
            embeddings' output for ``start`` 0).
        attention_mask: the batch's (B, T) mask, with ``hidden``.

    Returns:
        (B, T, H) hidden states.
    """
    check_range(num_layers, start, stop)
    blocks = transformer_blocks(model, num_layers)
    handles = []
    if hidden is None:
        if batch is None or start != 0:
            raise AtlasError("run_blocks needs the batch (from block 0) or hidden states")
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    else:
        if attention_mask is None:
            raise AtlasError("run_blocks from hidden states needs the attention mask")
        received = hidden

        def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (received, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": received}

        handles.append(blocks[start].register_forward_pre_hook(enter, with_kwargs=True))
        # placeholder embeddings: the model derives masks and positions from their shape only
        inputs = {"inputs_embeds": hidden.detach().new_zeros(hidden.shape),
                  "attention_mask": attention_mask}
    if stop == 0:  # the embeddings only: stop at the first block's input
        def arrive(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Reached(args[0] if args else kwargs["hidden_states"])

        handles.append(blocks[0].register_forward_pre_hook(arrive, with_kwargs=True))
    elif stop < num_layers:
        def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            raise _Reached(output[0] if isinstance(output, tuple) else output)

        handles.append(blocks[stop - 1].register_forward_hook(leave))
    try:
        with _blocks_from(model, blocks, start):
            out = model(**inputs)
    except _Reached as reached:
        return reached.hidden
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state  # type: ignore[no-any-return]


def client_side(module_path: str, num_layers: int, cut: int, tail: int) -> bool:
    """Whether a LoRA module lies in the blocks a split client runs (first cut, last tail).

    Modules outside any block (none of the supported targets) stay with the client.
    """
    block = block_of(module_path)
    return block is None or block < cut or block >= num_layers - tail


def split_tensors(state: Mapping[str, T], num_layers: int, cut: int, tail: int
                  ) -> tuple[dict[str, T], dict[str, T]]:
    """An adapter's tensors (``<module>.lora_A.weight`` ...) as (client's part, server's part)."""
    client: dict[str, T] = {}
    server: dict[str, T] = {}
    for key, value in state.items():
        mine = client_side(key.rsplit(".lora_", 1)[0], num_layers, cut, tail)
        (client if mine else server)[key] = value
    return client, server


def block_of(module_path: str) -> int | None:
    """The block index in a LoRA module path (``...layer.3.attention...`` -> 3), else None.

    The index is the number right after the block list's name; module paths name it the way
    ``named_modules`` does, so the first integer component is the block.
    """
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None
