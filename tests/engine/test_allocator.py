import ctypes.util
import os

import pytest

from atlasfl.engine import allocator, build_experiment


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library found")
def test_the_threshold_is_set_through_mallopt_and_0_leaves_glibc_alone(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1
    monkeypatch.setattr(allocator, "_LIBC", FakeLibc())
    assert allocator.set_mmap_threshold(128) is True
    assert calls == [(-3, 128 * 1024)]  # M_MMAP_THRESHOLD, in bytes
    assert allocator.set_mmap_threshold(0) is False and len(calls) == 1


def test_an_experiment_applies_train_mmap_threshold_kb(tiny_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr("atlasfl.engine.setup.set_mmap_threshold", seen.append)
    build_experiment(tiny_cfg(**{"train.mmap_threshold_kb": 256}))
    assert seen == [256]


def test_the_onednn_cache_cap_sets_both_variables_but_never_the_users(monkeypatch):
    for name in allocator.ONEDNN_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")  # the user's own choice wins
    assert allocator.set_onednn_cache(8) == ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert allocator.set_onednn_cache(0) == []  # 0: the libraries' default
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ


def test_an_experiment_applies_train_onednn_cache(tiny_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr("atlasfl.engine.setup.set_onednn_cache", seen.append)
    build_experiment(tiny_cfg(**{"train.onednn_cache": 32}))
    assert seen == [32]
