"""Phase 3 planning: bytes, FLOPs, client-part memory and the choice of the cut."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from atlasfl.errors import AtlasError
from atlasfl.phases.memory import ModelDims, estimate_memory
from atlasfl.phases.cuts import (
    REFERENCE_FLOPS,
    CutOption,
    block_flops,
    choose_cut,
    cut_options,
    message_bytes,
    split_memory,
)

DIMS = ModelDims(family="bert", hidden=4, intermediate=8, num_layers=4, num_heads=2,
                 num_kv_heads=2, vocab_size=10, embedding_params=100, block_params=50,
                 final_params=8)


def test_block_flops_by_hand():
    # 2 x 50 weights x (2 x 3 tokens) + 4 x B 2 x T^2 9 x attention width 4
    assert block_flops(DIMS, batch_size=2, seq_len=3) == 600 + 288


def test_message_bytes_by_hand():
    # B 2, T 3, H 4: hidden 24 elements; int64 mask (6) and labels (2); float32 loss
    assert message_bytes(DIMS, batch_size=2, seq_len=3, act_bytes=4, u_shape=False) == (
        96 + 48 + 16, 96 + 4)
    assert message_bytes(DIMS, batch_size=2, seq_len=3, act_bytes=2, u_shape=True) == (
        48 + 48 + 48, 48 + 48)


def test_split_memory_is_the_client_part_plus_its_message_buffers():
    modules = [(2, 4, 4)]
    vanilla = split_memory(DIMS, modules, cut=1, tail=0, batch_size=2, seq_len=3, act_bytes=4,
                           head_params=10)
    part = estimate_memory(DIMS, modules, batch_size=2, seq_len=3, blocks_held=1)
    assert vanilla == part.total + 2 * 24 * 4  # the head is on the server: not counted
    ushape = split_memory(DIMS, modules, cut=1, tail=1, batch_size=2, seq_len=3, act_bytes=4,
                          head_params=10)
    held = estimate_memory(DIMS, modules, batch_size=2, seq_len=3, blocks_held=2,
                           head_params=10, final=True)
    assert ushape == held.total + 4 * 24 * 4
    assert held.weights == (100 + 2 * 50 + 8) * 4  # the final norm is the client's in U-shape
    with pytest.raises(AtlasError, match="must fit"):
        split_memory(DIMS, modules, cut=4, tail=1, batch_size=2, seq_len=3, act_bytes=4)


def _options(memory, budget, compute=1.0, server=20.0, up=5.0, down=20.0, tail=0):
    return cut_options(DIMS, list(range(0, DIMS.num_layers - tail)), tail=tail,
                       memory_of=lambda c: memory[c], budget_bytes=budget, batch_size=2,
                       seq_len=3, act_bytes=4, compute=compute, server_compute=server,
                       uplink_mbps=up, downlink_mbps=down)


def test_time_per_batch_by_hand():
    option = _options([1, 2, 3, 4], 10)[1]
    flops = 888  # block_flops at B 2, T 3
    client = 2 * flops * 1 / (1.0 * REFERENCE_FLOPS)
    server = 2 * flops * 3 / (20.0 * REFERENCE_FLOPS)
    link = 8 * 160 / 5e6 + 8 * 100 / 20e6
    assert option.seconds_per_batch == pytest.approx(client + server + link, rel=1e-12)
    assert (option.up_bytes, option.down_bytes, option.fits) == (160, 100, True)


def test_the_fastest_fitting_cut_is_chosen_and_none_when_nothing_fits():
    # a slow device next to a fast server: the least client work wins where it fits
    memory = [50, 60, 70, 80]
    assert choose_cut(_options(memory, 100, compute=0.1)).cut == 0
    assert choose_cut(_options(memory, 100, compute=0.1, server=0.01)).cut == 3
    assert choose_cut(_options(memory, 10)) is None
    with pytest.raises(AtlasError, match="leaves the server no block"):
        cut_options(DIMS, [4], tail=0, memory_of=lambda c: 0, budget_bytes=1, batch_size=1,
                    seq_len=1, act_bytes=4, compute=1, server_compute=1, uplink_mbps=1,
                    downlink_mbps=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=4, max_size=4), st.integers(1, 1000),
       st.floats(0.01, 50), st.floats(0.01, 50), st.floats(0.1, 1000), st.floats(0.1, 1000))
def test_the_chosen_cut_fits_and_no_fitting_cut_is_faster(memory, budget, compute, server, up,
                                                          down):
    options = _options(memory, budget, compute, server, up, down)
    chosen = choose_cut(options)
    fitting = [o for o in options if o.memory_bytes <= budget]
    if not fitting:
        assert chosen is None
        return
    assert isinstance(chosen, CutOption) and chosen.memory_bytes <= budget
    assert all(chosen.seconds_per_batch <= o.seconds_per_batch for o in fitting)
