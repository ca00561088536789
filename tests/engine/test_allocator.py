import ctypes.util

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
